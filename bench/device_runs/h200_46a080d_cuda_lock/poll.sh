#!/bin/bash
end=$((SECONDS+${1:-60})); while [ ! -s /root/job.status ] && [ $SECONDS -lt $end ]; do sleep 5; done
echo "job: $(cat /root/job.status 2>/dev/null || echo running) at $(date -u +%T)"; head -c 3000 /root/result/lock_env.txt | tail -c 2500; echo; tail -n 30 /root/result/gpu_build.log 2>/dev/null | cut -c1-300
cp /root/result/* $OUT/ 2>/dev/null; cp /root/job.out $OUT/ 2>/dev/null; ls -la $OUT
