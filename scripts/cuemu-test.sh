#!/usr/bin/env bash
# Runs the GPU tests (tests/cuda.rs, tests/cuda_train.rs) on the CPU under tools/cuemu: the
# kernels compiled as host C++ (S3R_CUEMU=1 build), the driver replaced by cuemu's libcuda.so.
# Checks kernel logic, launch shapes, buffer sizes and host-side plumbing; timing means nothing.
#   scripts/cuemu-test.sh                 # every GPU test
#   scripts/cuemu-test.sh --test cuda attention   # cargo test arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
target=target/cuemu
mkdir -p "$target/lib"
lib="$target/lib/libcuda.so"
if [[ ! -f "$lib" || tools/cuemu/libcuda.cpp -nt "$lib" ]]; then
    "${CXX:-c++}" -std=c++17 -O2 -fPIC -shared -fvisibility=hidden tools/cuemu/libcuda.cpp -o "$lib" -ldl -lpthread
fi
args=("$@")
if [[ ${#args[@]} -eq 0 ]]; then
    args=(--test cuda --test cuda_train)
fi
S3R_CUEMU=1 S3R_REQUIRE_GPU=1 LD_LIBRARY_PATH="$PWD/$target/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test --release --target-dir "$target" "${args[@]}"
