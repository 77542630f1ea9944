#!/bin/bash
# call 1: the scripts and the first part of the CUDA 13 line's site (its pure-Python packages: transformers, peft, autoawq, doit ...)
mkdir -p /root/bin /root/site /root/code /root/aside /root/result /root/parts /root/t
cp .gpu-carry/p5/* /root/bin/; cp .gpu-carry/p1/site.part-0 /root/parts/
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u +%T
