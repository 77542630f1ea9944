#!/bin/bash
# call 2: unpack that site and the lock's cuDNN adv library, copy this working tree as the code
cp .gpu-carry/p5/* /root/bin/
cat /root/parts/site.part-0 .gpu-carry/p2/site.part-1 | xz -dc -T8 | tar -C /root/site -xf - && rm /root/parts/site.part-0
xz -dc .gpu-carry/p2/adv.tar.xz | tar -C /root/t -xf -
tar --exclude=./.gpu-carry --exclude=./.git --exclude=./.venv --exclude=./build -cf - . | tar -C /root/code -xf -
echo "$1" > /root/bin/commit
SP=$(PYTHONPATH= python3 -c "import site; print(site.getsitepackages()[0])")
for d in "$SP"/onnxruntime-*.dist-info; do [ -e "$d" ] && mv "$d" /root/aside/ && echo "moved aside $d"; done
du -sh /root/site /root/t; date -u +%T
