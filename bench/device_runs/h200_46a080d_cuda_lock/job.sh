#!/bin/bash
# the cuda lock on the GPU: what import finds, then the project's GPU test (tiny profile: base, quantize, finetune, export, evaluate on cuda)
source /root/bin/lockenv.sh; cd /root/code
{ echo "PYTHONPATH=$PYTHONPATH"; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; python3 /root/bin/envinfo.py; } > /root/result/lock_env.txt 2>&1
python3 - >> /root/result/lock_env.txt 2>&1 <<'PY'
import re, torch
x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16); y = (x @ x).float().sum().item()
print("torch", torch.__version__, torch.__file__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name(0), "matmul ok", y == y)
libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if re.search(r"lib(cu|nccl|nvJit|nvshmem|torch_cuda)", l)})
print("mapped:", *libs, sep="\n  ")
PY
echo "=== build start $(date -u +%T)" > /root/result/gpu_build.log
# tests/test_gpu.py's build and checks, without its fixture's extra CPU build of the tiny project first
python3 -c "from tools.harness import make_project; from pathlib import Path; make_project(Path('/root/gp'))"
cd /root/gp; t0=$SECONDS
timeout 420 python3 -m doit build.device=cuda 'export.targets=["cuda", "cpu"]' build.dir=build/gpu >> /root/result/gpu_build.log 2>&1
echo "=== doit rc=$? in $((SECONDS-t0)) s $(date -u +%T)" >> /root/result/gpu_build.log
python3 - >> /root/result/gpu_build.log 2>&1 <<'PY'
import json
check = json.load(open("build/gpu/export/export_check.json"))
for t in ("cuda", "cpu"):
    print(t, "checked", check[t]["checked"], "adapter same_argmax", check[t]["adapter"]["same_argmax"], {k: check[t][k] for k in check[t] if k not in ("checked",)})
report = json.load(open("build/gpu/package/report.json"))["targets"]
for t in ("cuda", "cpu"):
    print(t, "evaluated", report[t]["evaluated"], "loss", report[t]["loss"])
loss = report["cuda"]["loss"]
print("adapter lowers the cuda loss:", loss["with_adapter"]["loss"] < loss["without_adapter"]["loss"])
PY
for f in check base quantize finetune export evaluate; do [ -f build/gpu/logs/$f.log ] && { echo "===== logs/$f.log"; grep -v -E "matmul_nbits_quantizer|printed: (Saving|Reading|Loading)" build/gpu/logs/$f.log; }; done > /root/result/gpu_stage_logs.txt 2>&1
echo DONE > /root/job.status
