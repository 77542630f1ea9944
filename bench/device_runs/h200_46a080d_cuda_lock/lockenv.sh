# sourced on the device: the cuda lock's CUDA-bearing packages first (torch, onnxruntime-gpu, genai-cuda, nvidia cu12),
# then the carried pure-Python packages; only the lock's CUDA libraries and the driver on the library path
export PYTHONPATH=/root/lock12site:/root/site OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_MODULE_LOADING=LAZY
export LD_LIBRARY_PATH=$(ls -d /root/lock12site/nvidia/*/lib | paste -sd:):/usr/local/nvidia/lib64
