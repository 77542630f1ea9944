"""What import finds on the device (run with /root/bin/env.sh sourced)."""
import importlib, importlib.metadata as md, platform, subprocess, sys
print("python", platform.python_version(), sys.executable)
for mod, dist in [("torch", "torch"), ("onnxruntime", "onnxruntime-gpu"), ("onnxruntime_genai", "onnxruntime-genai-cuda"),
                  ("transformers", "transformers"), ("peft", "peft"), ("awq", "autoawq"), ("tokenizers", "tokenizers"),
                  ("huggingface_hub", "huggingface-hub"), ("safetensors", "safetensors"), ("datasets", "datasets"),
                  ("accelerate", "accelerate"), ("doit", "doit"), ("pydantic", "pydantic"), ("onnx", "onnx"),
                  ("onnxscript", "onnxscript"), ("onnx_ir", "onnx-ir"), ("numpy", "numpy"), ("matplotlib", "matplotlib"),
                  ("triton", "triton"), ("httpx2", "httpx2"), ("hf_xet", "hf-xet")]:
    try:
        m = importlib.import_module(mod)
        try:
            v = md.version(dist)
        except md.PackageNotFoundError:
            v = "(no metadata)"
        print(f"{mod}: __version__={getattr(m, '__version__', '?')} metadata[{dist}]={v} file={m.__file__}")
    except Exception as e:
        print(f"{mod}: IMPORT FAILED {type(e).__name__}: {e}")
for dist in ("onnxruntime", "onnxruntime-genai", "autoawq"):
    try:
        print(f"metadata {dist}: {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"metadata {dist}: not installed")
import onnxruntime as ort
print("onnxruntime providers:", ort.get_available_providers())
import torch
print("torch cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "device", torch.cuda.get_device_name(0))
print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"], capture_output=True, text=True).stdout)
