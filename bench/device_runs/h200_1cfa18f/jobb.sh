#!/bin/bash
# job B: once job A is done and the lock site is unpacked, decode A's packages with the CUDA 13 line, then the cuda lock's runtime
L=/root/jobb/log; echo "=== B waiting $(date -u +%T)" >> $L
while [ ! -s /root/job/status ] || [ ! -e /root/lock12site/ready ]; do sleep 3; done
echo "=== A: $(cat /root/job/status) $(date -u +%T)" >> $L
B=/root/dm/project/build; P=/root/dm/plain; V=""
[ -d $P/plain_fitted ] && V="$V --variant plain_fitted=$P/plain_fitted"
[ -d $P/plain_int4_head_fitted ] && V="$V --variant plain_int4_head_fitted=$P/plain_int4_head_fitted"
[ -d $B/switchable/package/cuda ] && V="$V --variant switchable_inactive=$B/switchable/package/cuda --variant switchable_active=$B/switchable/package/cuda:adapter"
[ -d $B/merged/package/cuda ] && V="$V --variant merged=$B/merged/package/cuda"
S=/root/code/bench/lock_runtime_decode.py
( source /root/bin/env.sh; echo "+ [CUDA 13 line] python3 bench/lock_runtime_decode.py$V --out cuda13_line.json"
  python3 $S $V --out /root/result/cuda13_line.json ) >> $L 2>&1
LOCKLIBS=$(ls -d /root/lock12site/nvidia/*/lib | paste -sd:)
( export PYTHONPATH=/root/lock12site LD_LIBRARY_PATH=$LOCKLIBS:/usr/local/nvidia/lib64 CUDA_MODULE_LOADING=LAZY PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
  echo "+ [lock] PYTHONPATH=$PYTHONPATH LD_LIBRARY_PATH=$LD_LIBRARY_PATH CUDA_MODULE_LOADING=LAZY python3 bench/lock_runtime_decode.py$V --reference cuda13_line.json --out cuda_lock.json"
  python3 $S $V --reference /root/result/cuda13_line.json --out /root/result/cuda_lock.json ) >> $L 2>&1
echo "=== B done rc=$? $(date -u +%T)" >> $L; echo DONE > /root/jobb/status
bash /root/bin/collect.sh
