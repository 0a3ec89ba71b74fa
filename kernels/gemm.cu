// GEMMs with a fused epilogue: C[m, n] = act(sum_k A[m, k] * B[n, k] * M[n, k] + bias[n]), and
// when st_w is set (batch 1) times straight_through(st_w[m, n], st_s[m, n]) (both with C's row
// stride; the weight fp32 or bf16): a weight gradient leaving the GEMM as the S3-Router score
// gradient.
//
// A is fp32: a matrix with any row stride (a plain convolution's im2col is a strided view of its
// input), or, in implicit-convolution mode (conv_cg > 0), the receptive fields of a grouped and
// padded 1-D convolution gathered on the fly: A(t, j) = x[stride*t + j / cg - pad, j % cg], zero
// outside the utterance, so no im2col buffer exists. B is the weight in PyTorch's [out, in] layout.
// M is an optional packed bit mask over B (1 bit per weight, LSB first over the row-major
// [out, in] matrix), applied while loading tiles, so W*M never exists in memory. blockIdx.z walks
// a batch with element strides (the groups of a grouped convolution).
//
// gemm_f32:  version 1. 64x64 tiles, BK 16, 256 threads with 4x4 outputs each, fp32 FMA (the
//            exact path).
// gemm_bf16_mma*: the fast path when A is already bf16 and rows are 16-byte aligned: warps of
//            64x64 outputs, mma.sync m16n8k16 fed by ldmatrix, a cp.async pipeline; masks travel
//            with each stage and are applied to the B fragments in registers. Six tile shapes
//            (128x128x32 is version 3), timed against each other by the host per GEMM shape.
// gemm_bf16: version 2, the general path (any K, fp32 A, layer 0's 1-channel conv). 128x128 tiles, BK 32, 8 warps of WMMA 16x16x16 bf16 fragments with fp32
//            accumulation; tiles double-buffered in shared memory with the next tile's global
//            loads (16-byte vectors) in flight during the current tile's MMAs; A is rounded to
//            bf16 as it is staged, B is stored in bf16, masks are applied a byte (8 weights) at a
//            time. Version 1 (scalar loads, one buffer) reached 51 TFLOP/s on the FFN shape.
#include "gemm_tiles.cuh"

extern "C" __global__ void __launch_bounds__(256) gemm_f32(GemmArgs p) {
    using namespace fp32_tile;
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    const int z = blockIdx.z;
    const float* A = (const float*)p.a + z * p.batch_a;
    const float* B = (const float*)p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int ty = t / 16, tx = t % 16;
    float acc[4][4] = {};
    const KRange kr = k_range(p);
    for (int k0 = kr.begin; k0 < kr.end; k0 += BK) {
        for (int i = t; i < BM * BK; i += 256) {
            int r = i / BK, kk = i % BK, gk = k0 + kk;
            long ao = a_offset(p, m0 + r, gk);
            As[kk][r] = ao >= 0 ? A[ao] : 0.0f;
            int gn = n0 + r;
            float w = (gn < p.n && gk < p.k) ? B[(long)gn * p.ldb + gk] : 0.0f;
            if (p.mask && gn < p.n && gk < p.k && !mask_bit(p.mask, (long)gn * p.k + gk)) w = 0.0f;
            Bs[kk][r] = w;
        }
        __syncthreads();
        fma_tile_4x4(As, Bs, ty, tx, acc);
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
            if (gn < p.n) C[(long)gm * p.ldc + gn] = epilogue(p, bias, acc[i][j], gm, gn);
        }
    }
}

namespace bf {
constexpr int BM = 128, BN = 128, BK = 32, LDS = BK + 8;  // +8: 80-byte rows, conflict-free fragment loads
constexpr int TILE = BM * LDS;                            // elements of one A (or B) stage
}

// The next tile's operands, held in registers while the current tile is multiplied.
struct Staged {
    float4 a[4];  // 4 x 4 consecutive k of A rows (fp32)
    uint4 b[2];   // 2 x 8 consecutive k of B rows (bf16)
};

__device__ __forceinline__ void load_tile(const GemmArgs& p, const float* A, const __nv_bfloat16* B, int m0, int n0, int k0, int t, Staged& s) {
    using namespace bf;
    const float4 zero4 = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int idx = t + i * 256, r = idx / 8, kq = (idx % 8) * 4;
        if (p.vec) {
            long o = a_offset(p, m0 + r, k0 + kq);
            s.a[i] = o >= 0 ? *reinterpret_cast<const float4*>(A + o) : zero4;
        } else {
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                long o = a_offset(p, m0 + r, k0 + kq + e);
                v[e] = o >= 0 ? A[o] : 0.0f;
            }
            s.a[i] = make_float4(v[0], v[1], v[2], v[3]);
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        int idx = t + i * 256, r = idx / 4, kq = (idx % 4) * 8, gn = n0 + r, gk = k0 + kq;
        uint4 w = make_uint4(0, 0, 0, 0);
        if (p.vec) {
            if (gn < p.n && gk < p.k) {
                w = *reinterpret_cast<const uint4*>(B + (long)gn * p.ldb + gk);
                // k % 8 == 0 (vec), so these 8 weights are exactly one mask byte.
                if (p.mask) w = mask_eight(w, p.mask[((long)gn * p.k + gk) >> 3]);
            }
        } else {
            __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(&w);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                bool in = gn < p.n && gk + e < p.k && !(p.mask && !mask_bit(p.mask, (long)gn * p.k + gk + e));
                h[e] = in ? B[(long)gn * p.ldb + gk + e] : __float2bfloat16(0.0f);
            }
        }
        s.b[i] = w;
    }
}

__device__ __forceinline__ void store_tile(__nv_bfloat16* As, __nv_bfloat16* Bs, int t, const Staged& s) {
    using namespace bf;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int idx = t + i * 256, r = idx / 8, kq = (idx % 8) * 4;
        __nv_bfloat162 lo = __floats2bfloat162_rn(s.a[i].x, s.a[i].y), hi = __floats2bfloat162_rn(s.a[i].z, s.a[i].w);
        __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(As + r * LDS + kq);
        dst[0] = lo;
        dst[1] = hi;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        int idx = t + i * 256, r = idx / 4, kq = (idx % 4) * 8;
        *reinterpret_cast<uint4*>(Bs + r * LDS + kq) = s.b[i];
    }
}

extern "C" __global__ void __launch_bounds__(256) gemm_bf16(GemmArgs p) {
    using namespace bf;
    using namespace nvcuda;
    __shared__ __align__(128) __nv_bfloat16 smem[4 * TILE];  // A stage 0, A stage 1, B stage 0, B stage 1
    const int z = blockIdx.z;
    const float* A = (const float*)p.a + z * p.batch_a;
    const __nv_bfloat16* B = (const __nv_bfloat16*)p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int warp = t / 32, lane = t % 32;
    const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;  // 2 x 4 warps, 64 x 32 each
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    const KRange kr = k_range(p);
    Staged s;
    load_tile(p, A, B, m0, n0, kr.begin, t, s);
    store_tile(smem, smem + 2 * TILE, t, s);
    __syncthreads();
    int cur = 0;
    for (int k0 = kr.begin; k0 < kr.end; k0 += BK) {
        const bool more = k0 + BK < kr.end;
        if (more) load_tile(p, A, B, m0, n0, k0 + BK, t, s);
        const __nv_bfloat16* As = smem + cur * TILE;
        const __nv_bfloat16* Bs = smem + (2 + cur) * TILE;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[4];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[2];
#pragma unroll
            for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], As + (wm + i * 16) * LDS + kk, LDS);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + (wn + j * 16) * LDS + kk, LDS);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        if (more) store_tile(smem + (cur ^ 1) * TILE, smem + (2 + (cur ^ 1)) * TILE, t, s);
        __syncthreads();
        cur ^= 1;
    }
    // Epilogue through a 16x16 staging tile per warp (reusing the operand buffers).
    float* stage = reinterpret_cast<float*>(smem) + warp * 256;
    float* C = p.c + z * p.batch_c;
    const float* bias = p.bias ? p.bias + z * p.batch_bias : nullptr;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                int gm = m0 + wm + i * 16 + e / 16, gn = n0 + wn + j * 16 + e % 16;
                if (gm < p.m && gn < p.n) C[(long)gm * p.ldc + gn] = epilogue(p, bias, stage[e], gm, gn);
            }
            __syncwarp();
        }
}

// gemm_bf16_mma: the bf16 tensor-core GEMM (A already bf16, rows 16-byte aligned), in several
// tile shapes the host picks from per GEMM shape by timing them (src/backend/cuda/tune.rs).
// Every shape gives the same bits: each output adds the same m16n8k16 products in the same K
// order, and only how the outputs are shared out among blocks and warps differs.
// Warps own 64 x 64 outputs (mma.sync m16n8k16 fed by ldmatrix, 128 fp32 accumulators each);
// a STAGES-deep cp.async pipeline (zero-filled out of bounds); masks travel with each stage as
// BK / 32 words per weight row and are applied to the B fragments in registers.
//   128x128x32, 4 stages, 4 warps (version 3: 2 blocks of 4 warps per SM);
//   128x128x64, 3 stages, swizzled rows (half the barriers per K, still 2 blocks per SM);
//   128x256x32 and 256x128x32, 4 stages, 8 warps (a quarter less operand traffic per output,
//   one block per SM);
//   64x128x32, 4 stages, 2 warps (twice the blocks where M is a few hundred rows: 1 x 10 s of
//   speech is 499 frames, 4 rows of 128-row tiles, fewer blocks than the H100 has SMs);
//   128x64x32, 4 stages, 2 warps (narrow N: the positional conv's groups have 48 output
//   channels, 37% of a 128-wide tile, 75% of this one).
template <int BM_, int BN_, int BK_, int STAGES_, class L_>
struct MmaTile {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_;
    using L = L_;
    static constexpr int WARPS_N = BN / 64, THREADS = (BM / 64) * WARPS_N * 32;
    static constexpr int STAGE_BYTES = (BM + BN) * L::ROW * 2 + BN * (BK / 32) * 4;  // A, B, mask words
    static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES, EPI_BYTES = BM * (BN + 4) * 4;
    static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;  // the epilogue reuses the pipeline
};
using Mma128x128k32 = MmaTile<128, 128, 32, 4, Padded<40>>;  // 80-byte rows: conflict-free ldmatrix
using Mma128x128k64 = MmaTile<128, 128, 64, 3, Swizzled128<__nv_bfloat16>>;
using Mma128x256k32 = MmaTile<128, 256, 32, 4, Padded<40>>;
using Mma256x128k32 = MmaTile<256, 128, 32, 4, Padded<40>>;
using Mma64x128k32 = MmaTile<64, 128, 32, 4, Padded<40>>;
using Mma128x64k32 = MmaTile<128, 64, 32, 4, Padded<40>>;

template <class Tile>
__device__ __forceinline__ void gemm_bf16_mma_body(const GemmArgs& p) {
    using L = typename Tile::L;
    constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, WORDS = BK / 32;
    DYNAMIC_SHARED(unsigned char, smem);
    const int z = blockIdx.z;
    const __nv_bfloat16* A = (const __nv_bfloat16*)p.a + z * p.batch_a;
    const __nv_bfloat16* B = (const __nv_bfloat16*)p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
    const int wm = (warp / Tile::WARPS_N) * 64, wn = (warp % Tile::WARPS_N) * 64;
    float acc[4][8][4] = {};
    auto load = [&](unsigned char* stage, int k0) { load_stage<__nv_bfloat16, L, BM, BN, BK, Tile::THREADS>(p, A, B, stage, m0, n0, k0, t); };
    cp_async_k_loop<Tile::STAGES, Tile::STAGE_BYTES, BK>(smem, k_range(p), load, [&](const unsigned char* stage) {
        const __nv_bfloat16* As = reinterpret_cast<const __nv_bfloat16*>(stage);
        const __nv_bfloat16* Bs = As + BM * L::ROW;
        const unsigned* Ms = reinterpret_cast<const unsigned*>(Bs + BN * L::ROW);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned af[4][4], bfr[4][4];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) ldmatrix_x4(af[mi], As + L::at(wm + mi * 16 + lane % 16, kk + (lane / 16) * 8));
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) ldmatrix_x4(bfr[nj], Bs + L::at(wn + nj * 16 + (lane % 8) + (lane / 16) * 8, kk + ((lane / 8) % 2) * 8));
            if (p.mask) {
#pragma unroll
                for (int nj = 0; nj < 4; ++nj)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {  // the two n8 tiles of this ldmatrix
                        unsigned w = Ms[(wn + nj * 16 + h * 8 + g) * WORDS + kk / 32] >> (kk % 32);
                        bfr[nj][2 * h] &= pair_mask(w >> (tq * 2));
                        bfr[nj][2 * h + 1] &= pair_mask(w >> (8 + tq * 2));
                    }
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int nj = 0; nj < 4; ++nj) {
                    mma_bf16(acc[mi][2 * nj], af[mi], bfr[nj][0], bfr[nj][1]);
                    mma_bf16(acc[mi][2 * nj + 1], af[mi], bfr[nj][2], bfr[nj][3]);
                }
        }
    });
    store_accumulators<BM, BN, Tile::THREADS>(p, smem, acc, wm, wn, lane, m0, n0, z);
}

GEMM_TILE_KERNEL(gemm_bf16_mma, Mma128x128k32, gemm_bf16_mma_body)
GEMM_TILE_KERNEL(gemm_bf16_mma_k64, Mma128x128k64, gemm_bf16_mma_body)
GEMM_TILE_KERNEL(gemm_bf16_mma_wide, Mma128x256k32, gemm_bf16_mma_body)
GEMM_TILE_KERNEL(gemm_bf16_mma_tall, Mma256x128k32, gemm_bf16_mma_body)
GEMM_TILE_KERNEL(gemm_bf16_mma_short, Mma64x128k32, gemm_bf16_mma_body)
GEMM_TILE_KERNEL(gemm_bf16_mma_narrow, Mma128x64k32, gemm_bf16_mma_body)

// gemm_tf32x3*: the fp32-accurate tensor-core path (fp32 A and B, as gemm_f32). Each operand x
// is split into TF32 parts, x = big + small with big = tf32(x) and small = tf32(x - big), and
// each product is taken as big*big + big*small + small*big (the small*small term is below fp32
// rounding): three mma.sync m16n8k8 per product, fp32 accumulation, an accuracy on par with FMA
// (CUTLASS's "3xTF32"). Warps of 64x32 outputs, BK 32, a 3-stage cp.async pipeline
// (zero-filled out of bounds), masks as in gemm_bf16_mma (one 32-bit word per weight row and
// stage, applied to the B values as they are split). Rows padded to 36 floats: every fragment
// load of a warp hits 32 different banks. Two tile shapes, timed per GEMM shape by the host with
// the wgmma kernel (src/backend/cuda/tune.rs); both give the same bits (same products, same K
// order):
//   gemm_tf32x3: 128x128, 8 warps (version 1; two blocks per SM);
//   gemm_tf32x3_narrow: 128x64, 4 warps. With N = 768 (half the fp32 step's GEMM work: the
//     FFN's second linear, the attention output, the FFN's input gradient) 128-wide tiles make
//     282 blocks at 8 x 15 s, one more than a full wave of two per SM on 132 SMs plus 18 in a
//     second (53% of the rounds busy); 64-wide ones make 564 (71%).
template <int WARPS_M, int WARPS_N_>
struct Tf32x3Tile {
    static constexpr int WARPS_N = WARPS_N_, BM = 64 * WARPS_M, BN = 32 * WARPS_N, BK = 32, STAGES = 3, LDS = BK + 4;
    static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int A_ELEMS = BM * LDS, B_ELEMS = BN * LDS;
    static constexpr int STAGE_BYTES = (A_ELEMS + B_ELEMS) * 4 + BN * 4;
    static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES, EPI_BYTES = BM * (BN + 4) * 4;
    static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;  // the epilogue reuses the pipeline
};
using Tf32x3Tile128x128 = Tf32x3Tile<2, 4>;
using Tf32x3Tile128x64 = Tf32x3Tile<2, 2>;

template <class Tile>
__device__ __forceinline__ void gemm_tf32x3_body(const GemmArgs& p) {
    constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, LDS = Tile::LDS;
    DYNAMIC_SHARED(unsigned char, smem);
    const int z = blockIdx.z;
    const float* A = (const float*)p.a + z * p.batch_a;
    const float* B = (const float*)p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
    const int wm = (warp / Tile::WARPS_N) * 64, wn = (warp % Tile::WARPS_N) * 32;
    float acc[4][4][4] = {};
    auto load = [&](unsigned char* stage, int k0) { load_stage<float, Padded<LDS>, BM, BN, BK, Tile::THREADS>(p, A, B, stage, m0, n0, k0, t); };
    cp_async_k_loop<Tile::STAGES, Tile::STAGE_BYTES, BK>(smem, k_range(p), load, [&](const unsigned char* stage) {
        const float* As = reinterpret_cast<const float*>(stage);
        const float* Bs = As + Tile::A_ELEMS;
        const unsigned* Ms = reinterpret_cast<const unsigned*>(Bs + Tile::B_ELEMS);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            // B fragments of the warp's four n8 tiles (b0: k = tq, b1: k = tq + 4; column g).
            unsigned bb[4][2], bs[4][2];
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) {
                const int n = wn + nj * 8 + g;
                const unsigned bits = p.mask ? Ms[n] : ~0u;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int k = kk + tq + h * 4;
                    split_tf32((bits >> k) & 1 ? Bs[n * LDS + k] : 0.0f, bb[nj][h], bs[nj][h]);
                }
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                // A fragment: rows g (a0, a2) and g + 8 (a1, a3), columns tq (a0, a1) and tq + 4.
                unsigned ab[4], as[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) split_tf32(As[(wm + mi * 16 + g + (i & 1) * 8) * LDS + kk + tq + (i >> 1) * 4], ab[i], as[i]);
#pragma unroll
                for (int nj = 0; nj < 4; ++nj) mma_tf32x3(acc[mi][nj], ab, as, bb[nj], bs[nj]);
            }
        }
    });
    store_accumulators<BM, BN, Tile::THREADS>(p, smem, acc, wm, wn, lane, m0, n0, z);
}

// Version 1's bounds (two blocks of 8 warps per SM: 128 registers) for the 128x128 tile; the
// narrow tile's four warps leave the compiler its choice (shared memory allows two blocks).
extern "C" __global__ void __launch_bounds__(256, 2) gemm_tf32x3(GemmArgs p) { gemm_tf32x3_body<Tf32x3Tile128x128>(p); }
extern "C" __global__ void gemm_tf32x3_smem(int* bytes) { *bytes = Tf32x3Tile128x128::SMEM_BYTES; }
GEMM_TILE_KERNEL(gemm_tf32x3_narrow, Tf32x3Tile128x64, gemm_tf32x3_body)

// Split-K's second half (see k_range in gemm_tiles.cuh): C = epilogue(sum of the `splits` fp32
// M x N slabs of partial sums at `partials`, in slab order), four outputs of a row per thread.
extern "C" __global__ void __launch_bounds__(256) gemm_split_sum(GemmArgs p, const float* partials, int splits) {
    const int quads = (p.n + 3) / 4;
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)p.m * quads) return;
    const int gm = (int)(i / quads), gn = (int)(i % quads) * 4;
    const long slab = (long)p.m * p.n;
    float e[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int z = 0; z < splits; ++z) {
        const float* row = partials + z * slab + (long)gm * p.n;
#pragma unroll
        for (int q = 0; q < 4; ++q)
            if (gn + q < p.n) e[q] += row[gn + q];
    }
    finish_four(p, e, gm, gn, 0, vector_output(p, 0));
}
