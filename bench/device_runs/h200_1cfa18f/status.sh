#!/bin/bash
echo "A: $(cat /root/job/status 2>/dev/null || echo running)  B: $(cat /root/jobb/status 2>/dev/null || echo -) at $(date -u +%T)"
grep -E '^(===|\+ )|tokens_per_s|FAIL|Error|error' /root/job/log 2>/dev/null | cut -c1-240 | tail -n 20; tail -n 3 /root/job/log 2>/dev/null | cut -c1-240
ls /root/dm/project/build/*/logs/ 2>/dev/null | tr '\n' ' '; echo
[ -e /root/jobb/log ] && tail -n 25 /root/jobb/log | cut -c1-300
