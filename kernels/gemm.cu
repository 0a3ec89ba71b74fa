// GEMMs with a fused epilogue: C[m, n] = act(sum_k A[m, k] * B[n, k] * M[n, k] + bias[n]).
//
// A is fp32 with any row stride (a conv's im2col is a strided view of its input), B is the weight
// in PyTorch's [out, in] layout (row stride ldb), M an optional packed bit mask over B (1 bit per
// weight, LSB first over the row-major [out, in] matrix; applied while loading tiles, so W*M never
// exists in memory). blockIdx.z walks a batch with element strides (grouped convolutions).
//
// gemm_f32:  version 1, 64x64 tiles, BK 16, 256 threads with 4x4 outputs each, fp32 FMA (exact path).
// gemm_bf16: version 1, 128x128 tiles, BK 32, 8 warps of WMMA 16x16x16 bf16 fragments, fp32
//            accumulation; A is rounded to bf16 as it is staged, B is stored in bf16.
#include "common.cuh"
#include <mma.h>

struct GemmArgs {
    const float* a; long lda; long batch_a;
    const void* b; long ldb; long batch_b;
    const uint8_t* mask;  // may be null
    const float* bias; long batch_bias;  // may be null
    float* c; long ldc; long batch_c;
    int m, n, k, act;
};

namespace f32 {
constexpr int BM = 64, BN = 64, BK = 16;
}

extern "C" __global__ void __launch_bounds__(256) gemm_f32(GemmArgs p) {
    using namespace f32;
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    const int z = blockIdx.z;
    const float* A = p.a + z * p.batch_a;
    const float* B = (const float*)p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int ty = t / 16, tx = t % 16;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < p.k; k0 += BK) {
        for (int i = t; i < BM * BK; i += 256) {
            int r = i / BK, kk = i % BK, gm = m0 + r, gk = k0 + kk;
            As[kk][r] = (gm < p.m && gk < p.k) ? A[(long)gm * p.lda + gk] : 0.0f;
            int gn = n0 + r;
            float w = (gn < p.n && gk < p.k) ? B[(long)gn * p.ldb + gk] : 0.0f;
            if (p.mask && gn < p.n && gk < p.k && !mask_bit(p.mask, (long)gn * p.k + gk)) w = 0.0f;
            Bs[kk][r] = w;
        }
        __syncthreads();
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
        __syncthreads();
    }
    float* C = p.c + z * p.batch_c;
    const float* bias = p.bias ? p.bias + z * p.batch_bias : nullptr;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int gm = m0 + ty * 4 + i;
        if (gm >= p.m) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int gn = n0 + tx * 4 + j;
            if (gn < p.n) C[(long)gm * p.ldc + gn] = apply_act(acc[i][j] + (bias ? bias[gn] : 0.0f), p.act);
        }
    }
}

namespace bf {
constexpr int BM = 128, BN = 128, BK = 32, LDS = BK + 8;  // +8 keeps rows 16-byte aligned, skews banks
}

extern "C" __global__ void __launch_bounds__(256) gemm_bf16(GemmArgs p) {
    using namespace bf;
    using namespace nvcuda;
    __shared__ __align__(32) __nv_bfloat16 As[BM * LDS];
    __shared__ __align__(32) __nv_bfloat16 Bs[BN * LDS];
    __shared__ __align__(32) float stage[8][16 * 16];
    const int z = blockIdx.z;
    const float* A = p.a + z * p.batch_a;
    const __nv_bfloat16* B = (const __nv_bfloat16*)p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int warp = t / 32, lane = t % 32;
    const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;  // 2 x 4 warps, 64 x 32 each
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int k0 = 0; k0 < p.k; k0 += BK) {
        for (int i = t; i < BM * BK; i += 256) {
            int r = i / BK, kk = i % BK, gm = m0 + r, gk = k0 + kk, gn = n0 + r;
            As[r * LDS + kk] = __float2bfloat16((gm < p.m && gk < p.k) ? A[(long)gm * p.lda + gk] : 0.0f);
            __nv_bfloat16 w = (gn < p.n && gk < p.k) ? B[(long)gn * p.ldb + gk] : __float2bfloat16(0.0f);
            if (p.mask && gn < p.n && gk < p.k && !mask_bit(p.mask, (long)gn * p.k + gk)) w = __float2bfloat16(0.0f);
            Bs[r * LDS + kk] = w;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[4];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[2];
#pragma unroll
            for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], &As[(wm + i * 16) * LDS + kk], LDS);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[(wn + j * 16) * LDS + kk], LDS);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
    }
    float* C = p.c + z * p.batch_c;
    const float* bias = p.bias ? p.bias + z * p.batch_bias : nullptr;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wmma::store_matrix_sync(stage[warp], acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                int gm = m0 + wm + i * 16 + e / 16, gn = n0 + wn + j * 16 + e % 16;
                if (gm < p.m && gn < p.n) C[(long)gm * p.ldc + gn] = apply_act(stage[warp][e] + (bias ? bias[gn] : 0.0f), p.act);
            }
            __syncwarp();
        }
}
