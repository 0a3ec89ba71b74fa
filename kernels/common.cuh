// Shared device helpers: GELU, warp reductions, launch-size constants.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#define ACT_IDENTITY 0
#define ACT_GELU 1

// Exact (erf) GELU, as torch.nn.functional.gelu by default. No fast-math: parity with the CPU.
__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }

__device__ __forceinline__ float apply_act(float x, int act) { return act == ACT_GELU ? gelu_erf(x) : x; }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Bit `i` of a mask packed 8 weights per byte, least significant bit first.
__device__ __forceinline__ bool mask_bit(const uint8_t* mask, long i) { return (mask[i >> 3] >> (i & 7)) & 1; }
