#!/bin/bash
# job C (after B): the Phi-3.5-mini shape, switchable only (merged was measured at 59e071d and takes 12 minutes), 20 finetune steps,
# decode_modes' decode phase, then both runtimes on its packages
L=/root/jobc/log; mkdir -p /root/jobc /root/resc
while [ ! -s /root/jobb/status ]; do sleep 3; done
source /root/bin/env.sh; export BENCH_COMMIT=$(cat /root/bin/commit); cd /root/code
for p in switchable decode; do
  extra=""; [ $p = decode ] && extra="--bandwidth-gbs 4800 --out /root/resc/decode_modes_phi35_mini_shape_h200.json"
  echo "=== C phase $p start $(date -u +%T)" >> $L; t0=$SECONDS
  python3 bench/decode_modes.py --device cuda --profile phi-3.5-mini-shape --context 4096 --max-steps 20 --keep /root/dp --phases $p $extra >> $L 2>&1 || { echo "=== C phase $p FAILED" >> $L; echo FAIL > /root/jobc/status; exit 1; }
  echo "=== C phase $p done in $((SECONDS-t0)) s $(date -u +%T)" >> $L
done
B=/root/dp/project/build; P=/root/dp/plain
V="--variant plain_fitted=$P/plain_fitted --variant switchable_inactive=$B/switchable/package/cuda --variant switchable_active=$B/switchable/package/cuda:adapter"
python3 bench/lock_runtime_decode.py $V --out /root/resc/phi_cuda13_line.json >> $L 2>&1
LOCKLIBS=$(ls -d /root/lock12site/nvidia/*/lib | paste -sd:)
( export PYTHONPATH=/root/lock12site LD_LIBRARY_PATH=$LOCKLIBS:/usr/local/nvidia/lib64 CUDA_MODULE_LOADING=LAZY
  python3 bench/lock_runtime_decode.py $V --reference /root/resc/phi_cuda13_line.json --out /root/resc/phi_cuda_lock.json ) >> $L 2>&1
echo "=== C done $(date -u +%T)" >> $L; echo DONE > /root/jobc/status
