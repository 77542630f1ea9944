#!/bin/bash
# call 2: join + unpack the CUDA 13 line's site, copy this working tree as the code, start job A
C=$1
cp .gpu-carry/p4/* /root/bin/
echo "site sha256 $(cat /root/parts/site.part-0 .gpu-carry/p2/site.part-1 | sha256sum | cut -c1-16)"
cat /root/parts/site.part-0 .gpu-carry/p2/site.part-1 | xz -dc -T8 | tar -C /root/site -xf - && rm /root/parts/site.part-0
tar --exclude=./.gpu-carry --exclude=./.git --exclude=./.venv --exclude=./build -cf - . | tar -C /root/code -xf -
echo "$C" > /root/bin/commit
source /root/bin/env.sh
for d in "$SP"/onnxruntime-*.dist-info; do [ -e "$d" ] && mv "$d" /root/aside/ && echo "moved aside $d"; done
python3 /root/bin/envinfo.py > /root/result/env_packages.txt 2>&1; cat /root/result/env_packages.txt
setsid nohup bash /root/bin/job.sh > /root/job/nohup.out 2>&1 < /dev/null &
setsid nohup bash /root/bin/jobb.sh > /root/jobb/nohup.out 2>&1 < /dev/null &
sleep 1; echo "jobs started $(date -u +%T)"
