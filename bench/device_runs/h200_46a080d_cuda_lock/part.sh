#!/bin/bash
# calls 3..: keep the carried parts; unpack the lock's ORT site (8 parts), its cuDNN engines, the lock's torch site (8 parts); then start the job
cp .gpu-carry/L*/lock.part-* .gpu-carry/T*/torch.part-* /root/parts/ 2>/dev/null; cp .gpu-carry/X2/extra.tar.xz /root/t/ 2>/dev/null
echo "parts: $(ls /root/parts | tr '\n' ' ') $(date -u +%T)"
if [ "$(ls /root/parts/lock.part-* 2>/dev/null | wc -l)" = 8 ] && [ ! -e /root/lock12site ]; then
  echo "lock sha $(cat /root/parts/lock.part-* | sha256sum | cut -c1-16) expect 46b16da5ac283f79"
  cat /root/parts/lock.part-* | xz -dc -T8 | tar -C /root -xf - && rm /root/parts/lock.part-*
fi
if [ "$(ls /root/parts/torch.part-* 2>/dev/null | wc -l)" = 8 ] && [ ! -e /root/t/site ]; then
  echo "torch sha $(cat /root/parts/torch.part-* | sha256sum | cut -c1-16) expect b4f3e9d9069c3a50"
  cat /root/parts/torch.part-* | xz -dc -T8 | tar -C /root/t -xf - && rm /root/parts/torch.part-*
fi
if [ -e /root/lock12site ] && [ -e /root/t/site ] && [ -e /root/t/extra.tar.xz ] && [ ! -e /root/job.started ]; then
  xz -dc /root/t/extra.tar.xz | tar -C /root -xf -            # cuDNN engines into lock12site
  cp -a /root/t/lock12site/. /root/lock12site/                 # cuDNN adv
  cp -a /root/t/site/. /root/lock12site/                       # torch, its nvidia libraries, cuda-bindings
  du -sh /root/lock12site; ls /root/lock12site/nvidia
  touch /root/job.started; setsid nohup bash /root/bin/job.sh > /root/job.out 2>&1 < /dev/null &
  sleep 1; echo "job started $(date -u +%T)"
fi
