// Packing binary masks to 1 bit per weight (LSB first over the row-major weight) and back.
#include "common.cuh"

// bits[i] collects mask[8i .. 8i+8] (nonzero = keep); a partial last byte has zero high bits.
extern "C" __global__ void pack_mask(const float* mask, uint8_t* bits, long n) {
    long nbytes = (n + 7) / 8;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < nbytes; i += (long)gridDim.x * blockDim.x) {
        uint8_t b = 0;
        for (int j = 0; j < 8; ++j) {
            long e = i * 8 + j;
            if (e < n && mask[e] != 0.0f) b |= (uint8_t)(1u << j);
        }
        bits[i] = b;
    }
}

extern "C" __global__ void unpack_mask(const uint8_t* bits, float* mask, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        mask[i] = mask_bit(bits, i) ? 1.0f : 0.0f;
}
