// Shared device helpers: GELU, warp reductions, launch-size constants, and the inline-PTX
// helpers (ldmatrix, mma.sync, cp.async). Under S3R_CUEMU the kernels compile as host C++ for
// the CPU emulator (tools/cuemu), which supplies the CUDA surface and those helpers itself.
#pragma once
#ifdef S3R_CUEMU
#include "device.h"
#else
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>
// Dynamic shared memory of a kernel, 128-byte aligned.
#define DYNAMIC_SHARED(type, name) extern __shared__ __align__(128) type name[]
#endif

#define ACT_IDENTITY 0
#define ACT_GELU 1
#define ACT_RELU 2

// Exact (erf) GELU, as torch.nn.functional.gelu by default. No fast-math: parity with the CPU.
__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }

__device__ __forceinline__ float apply_act(float x, int act) {
    return act == ACT_GELU ? gelu_erf(x) : act == ACT_RELU ? fmaxf(x, 0.0f) : x;
}

// A value stored or loaded as f32 or bf16 (the operand of a bf16 GEMM), computed with in f32.
__device__ __forceinline__ void store_as(float* y, float v) { *y = v; }
__device__ __forceinline__ void store_as(__nv_bfloat16* y, float v) { *y = __float2bfloat16(v); }
__device__ __forceinline__ float load_as(const float* x) { return *x; }
__device__ __forceinline__ float load_as(const __nv_bfloat16* x) { return __bfloat162float(*x); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Tile shape of the fp32 GEMMs (gemm_f32, gemm_strided_f32): 64x64 outputs per block of 256
// threads (4x4 each), a K depth of 16 per staged tile.
namespace fp32_tile {
constexpr int BM = 64, BN = 64, BK = 16;
}

// The fp32 GEMMs' inner loop over one staged tile: each thread's 4x4 outputs (rows ty*4.., columns
// tx*4..) accumulate As[k][row] * Bs[k][col] over the tile's BK depth.
template <int BK, int LD>
__device__ __forceinline__ void fma_tile_4x4(const float (&As)[BK][LD], const float (&Bs)[BK][LD], int ty, int tx, float (&acc)[4][4]) {
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[kk][ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx * 4 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

// The straight-through factor turning an entry of dL/dW_eff into dL/dscore: W * sign(score), 0
// where the score is 0 (src/router score_grad; the same product order, so the same bits).
__device__ __forceinline__ float straight_through(float w, float s) { return w * (s > 0.0f ? 1.0f : (s < 0.0f ? -1.0f : 0.0f)); }

// Dropout: the CPU's counter-based masks (src/dropout.rs), bit for bit.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// The factor element i of a site is multiplied by: 0 if dropped, else 1 / (1 - p).
__device__ __forceinline__ float dropout_factor(float p, unsigned long long site_key, unsigned long long i) {
    float u = (float)(mix64(site_key ^ i) >> 40) / 16777216.0f;
    return u < p ? 0.0f : 1.0f / (1.0f - p);
}

// Bit `i` of a mask packed 8 weights per byte, least significant bit first.
__device__ __forceinline__ bool mask_bit(const uint8_t* mask, long i) { return (mask[i >> 3] >> (i & 7)) & 1; }

#ifndef S3R_CUEMU
// Four 8x8 b16 matrices from shared memory (lane l gives the address of row l % 8 of matrix l / 8).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// The same, transposed: register j holds rows 2(l % 4), +1 of column l / 4 of matrix j.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    // Not volatile: a pure register operation the compiler may schedule between the (volatile)
    // shared-memory loads; volatile here serialised every MMA behind every ldmatrix.
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x rounded to TF32 (10 mantissa bits, to nearest, ties away from zero), as a .b32 register.
__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}

// D += A B over m16n8k8 with TF32 operands (fragments as the PTX ISA lays them out).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Asynchronous global -> shared copies of `bytes` (16 or 4), zero-filled when `pred` is false.
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, int bytes, bool pred) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int src = pred ? bytes : 0;
    if (bytes == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif  // S3R_CUEMU

// x as its TF32 parts for the 3xTF32 GEMMs: big = tf32(x), small = tf32(x - big), so that
// big*big + big*small + small*big carries x*y to fp32 accuracy.
__device__ __forceinline__ void split_tf32(float x, unsigned& big, unsigned& small) {
    big = to_tf32(x);
    small = to_tf32(x - __uint_as_float(big));
}

// D += A B to fp32 accuracy from split operands (a = ab + as, b = bb + bs): the three products
// that matter, small terms first (they are the least significant), chained into D inside the
// tensor core. Hopper's tensor cores round their accumulation toward zero, at most an ulp a
// step: fine for a D that starts at zero and sums a handful of steps (attention's products over
// the head size: at most 16 steps of 8); a long K takes mma_tf32x3.
__device__ __forceinline__ void mma_tf32x3_few_steps(float (&d)[4], const unsigned (&ab)[4], const unsigned (&as)[4], const unsigned (&bb)[2],
                                                     const unsigned (&bs)[2]) {
    mma_tf32(d, as, bb[0], bb[1]);
    mma_tf32(d, ab, bs[0], bs[1]);
    mma_tf32(d, ab, bb[0], bb[1]);
}

// The same product for any K: each step's three products summed from zero and added to D
// outside the tensor core, with round-to-nearest, so each step's truncation stays relative to
// its own eight products (Ootomo and Yokota, 2022). Chaining every step into D made the bias
// grow with K: on an H200, rel L2 2.1e-5 against the CPU at K = 3072 (the fp32 path's bound is
// 1e-5). The extra adds cost a fp32 attention gradient 46% there, hence the variant above.
__device__ __forceinline__ void mma_tf32x3(float (&d)[4], const unsigned (&ab)[4], const unsigned (&as)[4], const unsigned (&bb)[2],
                                           const unsigned (&bs)[2]) {
    float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_tf32x3_few_steps(t, ab, as, bb, bs);
    for (int i = 0; i < 4; ++i) d[i] += t[i];
}
