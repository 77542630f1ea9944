#!/bin/bash
end=$((SECONDS+${1:-60})); while [ ! -s /root/jobc/status ] && [ $SECONDS -lt $end ]; do sleep 5; done
echo "C: $(cat /root/jobc/status 2>/dev/null || echo running) at $(date -u +%T)"; grep -E '^===|tokens_per_s|Error|FAIL' /root/jobc/log | cut -c1-250 | tail -30
ls /root/dp/project/build/switchable/logs 2>/dev/null | tr '\n' ' '; echo
o=/root/resc/phi_stage_logs.txt; : > $o; d=/root/dp/project/build/switchable/logs
for s in check base quantize finetune export evaluate; do [ -f $d/$s.log ] && { echo "===== build/switchable/logs/$s.log" >> $o; awk '!/matmul_nbits_quantizer/ || /exclude/' $d/$s.log >> $o; }; done
cp /root/jobc/log /root/resc/jobC.log; cp /root/resc/* $OUT/ 2>/dev/null; ls -la $OUT
