#!/bin/bash
# call 1: keep the first part of the CUDA 13 line's site and the scripts
mkdir -p /root/bin /root/site /root/code /root/aside /root/job /root/jobb /root/result /root/parts
cp .gpu-carry/p4/* /root/bin/; cp .gpu-carry/p1/site.part-0 /root/parts/
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; df -h /root | tail -1; nproc; date -u +%T
