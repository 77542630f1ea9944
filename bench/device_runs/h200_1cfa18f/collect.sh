#!/bin/bash
# stage logs of both builds in build order (the quantizer's per-node lines dropped), the jobs' logs
o=/root/result/stage_logs.txt; : > $o
for b in switchable merged; do
  d=/root/dm/project/build/$b/logs
  for f in $(for s in check base quantize finetune export evaluate; do [ -f $d/$s.log ] && echo $d/$s.log; done; ls $d/*.log 2>/dev/null | grep -v -E '/(check|base|quantize|finetune|export|evaluate)\.log$'); do
    echo "===== build/$b/logs/$(basename $f)" >> $o; awk '!/matmul_nbits_quantizer/ || /exclude/' $f >> $o
  done
done
cp /root/job/log /root/result/jobA.log 2>/dev/null; cp /root/jobb/log /root/result/jobB.log 2>/dev/null; true
