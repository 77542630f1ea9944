#!/bin/bash
# wait at most $1 s for job B (or a failed job A), then bring back what is there
end=$((SECONDS+${1:-60}))
while [ ! -s /root/jobb/status ] && ! grep -q FAIL /root/job/status 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
bash /root/bin/status.sh; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
bash /root/bin/collect.sh; cp /root/result/* $OUT/ 2>/dev/null; ls -la $OUT
