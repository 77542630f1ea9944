# sourced on the device: the CUDA 13 line, carried packages first
SP=$(PYTHONPATH= python3 -c "import site; print(site.getsitepackages()[0])")
export PYTHONPATH=/root/site OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
NVLIBS=$(find "$SP/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH=$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
