#!/bin/bash
# job A: bench/decode_modes.py's phases in order on the Qwen2.5-0.5B shape (default finetune settings)
source /root/bin/env.sh; export BENCH_COMMIT=$(cat /root/bin/commit)
cd /root/code
for p in switchable merged decode; do
  echo "=== phase $p start $(date -u +%FT%T)" >> /root/job/log
  extra=""; [ $p = decode ] && extra="--bandwidth-gbs 4800 --out /root/result/decode_modes_qwen25_05b_shape_h200.json"
  t0=$SECONDS
  cmd="python3 bench/decode_modes.py --device cuda --profile qwen2.5-0.5b-shape --context 4096 --keep /root/dm --phases $p $extra"
  echo "+ $cmd" >> /root/job/log
  if ! $cmd >> /root/job/log 2>&1; then
    echo "=== phase $p FAILED after $((SECONDS-t0)) s" >> /root/job/log; echo "FAIL $p" > /root/job/status; bash /root/bin/collect.sh; exit 1
  fi
  echo "=== phase $p done in $((SECONDS-t0)) s $(date -u +%FT%T)" >> /root/job/log
  bash /root/bin/collect.sh
done
echo DONE > /root/job/status
