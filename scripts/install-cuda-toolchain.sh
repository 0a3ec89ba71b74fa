#!/usr/bin/env bash
# Installs nvcc 13.0 without a system CUDA, from pinned NVIDIA Python wheels, into the ignored
# repo-local folder .cuda/ (nvcc ends up at .cuda/nvidia/cu13/bin/nvcc, where build.rs looks).
# The GPU hosts run driver 580 (CUDA 13.0): PTX from a newer toolkit would not load there, so the
# pins stay at 13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cuda
nvcc="$dest/nvidia/cu13/bin/nvcc"
if [ -x "$nvcc" ] && "$nvcc" --version | grep -q "release 13.0"; then
    echo "nvcc already installed: $nvcc"
    exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" --upgrade \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
"$nvcc" --version | tail -2
echo "nvcc installed: $nvcc"
