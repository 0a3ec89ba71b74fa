// Pieces shared by the tensor-core GEMMs of kernels/gemm.cu and kernels/gemm_sm90a.cu: the
// argument struct, the epilogue, the operand addressing, the staged-tile layouts, the cp.async
// stage loader and K loop, and the shared-memory write-out of accumulator tiles.
#pragma once
#include "common.cuh"

struct GemmArgs {
    const void* a; long lda; long batch_a;  // fp32, except bf16 for gemm_bf16_mma
    const void* b; long ldb; long batch_b;
    const uint8_t* mask;  // may be null
    const float* bias; long batch_bias;  // may be null
    float* c; long ldc; long batch_c;
    int m, n, k, act;
    int conv_cg, conv_stride, conv_pad, conv_tin;  // implicit convolution when conv_cg > 0
    int vec;  // 1 when 16-byte vector loads are legal (checked by the host)
    const void* st_w; const float* st_s;  // may be null; st_w fp32, or bf16 with st_w_bf16
    int c_bf16;  // C is bf16 (the operand of a following bf16 GEMM); write_tile's kernels only
    int st_w_bf16;
    int k_split;  // split-K (batch 1): block z multiplies the z-th chunk of k_split along K; 0: all of K
};

// The K range [begin, end) a block multiplies: all of K, or under split-K its chunk. The host
// keeps k_split a multiple of every kernel's BK, so a chunk is whole K tiles (the last one may
// end at K), and points C at fp32 partial sums, one M x N slab per chunk with no epilogue;
// gemm_split_sum then adds the slabs in order and applies the epilogue.
struct KRange {
    int begin, end;
};
__device__ __forceinline__ KRange k_range(const GemmArgs& p) {
    if (p.k_split <= 0) return {0, p.k};
    const int begin = blockIdx.z * p.k_split;
    return {begin, min(p.k, begin + p.k_split)};
}

// Every kernel's output value at (gm, gn) from its accumulator.
__device__ __forceinline__ float epilogue(const GemmArgs& p, const float* bias, float acc, int gm, int gn) {
    float v = apply_act(acc + (bias ? bias[gn] : 0.0f), p.act);
    if (p.st_w) {
        long o = (long)gm * p.ldc + gn;
        float w = p.st_w_bf16 ? load_as((const __nv_bfloat16*)p.st_w + o) : load_as((const float*)p.st_w + o);
        v *= straight_through(w, p.st_s[o]);
    }
    return v;
}

// Offset of A(gm, gk) from A's base, or -1 where it reads as zero (outside the matrix, or padding).
__device__ __forceinline__ long a_offset(const GemmArgs& p, int gm, int gk) {
    if (gm >= p.m || gk >= p.k) return -1;
    if (p.conv_cg == 0) return (long)gm * p.lda + gk;
    int tap = gk / p.conv_cg, ci = gk - tap * p.conv_cg;
    int s = gm * p.conv_stride + tap - p.conv_pad;
    return (s >= 0 && s < p.conv_tin) ? (long)s * p.lda + ci : -1;
}

// The tensor-core kernels' epilogue, in two steps around a __syncthreads: each warp parks its
// m16n8 accumulators acc[MI][NT] (rows wm + 16 mi + g and + 8, columns wn + 8 nt + 2 tq and + 1)
// in an fp32 tile in shared memory (row stride LC; the pipeline buffers are free by then), then
// the block writes the BM x BN tile row by row with float4 stores, bias, activation and
// straight-through factor applied: full 128-byte lines instead of 8-byte pieces of eight rows.
template <int MI, int NT, int LC>
__device__ __forceinline__ void park_accumulators(float* tile, const float (&acc)[MI][NT][4], int wm, int wn, int g, int tq) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                float2 v = make_float2(acc[mi][nt][2 * half], acc[mi][nt][2 * half + 1]);
                *reinterpret_cast<float2*>(tile + (wm + mi * 16 + g + half * 8) * LC + wn + nt * 8 + tq * 2) = v;
            }
}

// Whether 4 outputs from a multiple of 4 along a row of C (batch element z) may be stored as one
// 16-byte (fp32) or 8-byte (bf16) vector.
__device__ __forceinline__ bool vector_output(const GemmArgs& p, int z) {
    const unsigned long c_addr = (unsigned long)p.c + (unsigned long)((long)z * p.batch_c) * (p.c_bf16 ? 2 : 4);
    return (p.ldc % 4 == 0) && (c_addr & (p.c_bf16 ? 7 : 15)) == 0;
}

// Outputs (gm, gn .. gn + 3) of batch element z from their sums e: the epilogue applied (bias,
// activation, straight-through factor), then stored in fp32, or (c_bf16) in bf16 rounded to
// nearest even, as one vector where `vec_out` and all four are inside C.
__device__ __forceinline__ void finish_four(const GemmArgs& p, float (&e)[4], int gm, int gn, int z, bool vec_out) {
    const float* bias = p.bias ? p.bias + z * p.batch_bias : nullptr;
#pragma unroll
    for (int q = 0; q < 4; ++q)
        if (gn + q < p.n) e[q] = epilogue(p, bias, e[q], gm, gn + q);
    const long at = (long)z * p.batch_c + (long)gm * p.ldc + gn;
    const bool whole = vec_out && gn + 3 < p.n;
    if (p.c_bf16) {
        __nv_bfloat16* dst = reinterpret_cast<__nv_bfloat16*>(p.c) + at;
        if (whole) {
            __nv_bfloat162 lo = __floats2bfloat162_rn(e[0], e[1]), hi = __floats2bfloat162_rn(e[2], e[3]);
            uint2 packed;
            packed.x = *reinterpret_cast<unsigned*>(&lo);
            packed.y = *reinterpret_cast<unsigned*>(&hi);
            *reinterpret_cast<uint2*>(dst) = packed;
        } else {
            for (int q = 0; q < 4 && gn + q < p.n; ++q) dst[q] = __float2bfloat16(e[q]);
        }
    } else {
        float* dst = p.c + at;
        if (whole) {
            *reinterpret_cast<float4*>(dst) = make_float4(e[0], e[1], e[2], e[3]);
        } else {
            for (int q = 0; q < 4 && gn + q < p.n; ++q) dst[q] = e[q];
        }
    }
}

template <int BM, int BN, int LC, int THREADS>
__device__ __forceinline__ void write_tile(const GemmArgs& p, const float* tile, int m0, int n0, int z, int t) {
    const bool vec_out = vector_output(p, z);
    for (int i = t; i < BM * BN / 4; i += THREADS) {
        int r = i / (BN / 4), c4 = (i % (BN / 4)) * 4;
        int gm = m0 + r, gn = n0 + c4;
        if (gm >= p.m || gn >= p.n) continue;
        float4 v = *reinterpret_cast<const float4*>(tile + r * LC + c4);
        float e[4] = {v.x, v.y, v.z, v.w};
        finish_four(p, e, gm, gn, z, vec_out);
    }
}

// The two steps of the epilogue for a BM x BN block whose warps hold m16n8 accumulators
// acc[MI][NT] at (wm, wn): parked in `smem` (fp32, row stride BN + 4), then written out.
template <int BM, int BN, int THREADS, int MI, int NT>
__device__ __forceinline__ void store_accumulators(const GemmArgs& p, unsigned char* smem, const float (&acc)[MI][NT][4], int wm, int wn,
                                                   int lane, int m0, int n0, int z) {
    float* tile = reinterpret_cast<float*>(smem);
    park_accumulators<MI, NT, BN + 4>(tile, acc, wm, wn, lane / 4, lane % 4);
    __syncthreads();
    write_tile<BM, BN, BN + 4, THREADS>(p, tile, m0, n0, z, threadIdx.x);
}

// One kernel per tile shape of a tensor-core GEMM whose body is `body<Tile>`, plus a query of
// its dynamic shared memory (the host's table in src/backend/cuda/tune.rs lists the same names,
// tiles and thread counts).
#define GEMM_TILE_KERNEL(name, Tile, body)                                                          \
    extern "C" __global__ void __launch_bounds__(Tile::THREADS) name(GemmArgs p) { body<Tile>(p); } \
    extern "C" __global__ void name##_smem(int* bytes) { *bytes = Tile::SMEM_BYTES; }

// Shared-memory layouts of a staged operand tile, rows of BK elements, `at(r, c)` the offset of
// element (r, c); `c` is a multiple of the 16-byte chunk wherever a chunk is addressed.
// Padded<LDS>: rows of LDS elements, the padding placing the eight rows an ldmatrix (or a
// fragment load) reads in different banks.
template <int LDS>
struct Padded {
    static constexpr int ROW = LDS;
    __device__ static __forceinline__ int at(int r, int c) { return r * LDS + c; }
};
// Swizzled128<T>: 128 bytes of T per row (64 bf16, 32 floats), no padding, 16-byte chunk j of
// row r stored at chunk j ^ (r % 8): the eight rows an ldmatrix reads at one logical chunk sit
// in eight different bank groups, a bf16 BK = 64 stage is 20% smaller than padded rows would
// make it, and a stage starting on 1024 bytes is wgmma's 128-byte-swizzle K-major layout.
template <class T>
struct Swizzled128 {
    static constexpr int ROW = 128 / (int)sizeof(T), CHUNK = 16 / (int)sizeof(T);
    __device__ static __forceinline__ int at(int r, int c) { return r * ROW + ((((c / CHUNK) ^ r) & 7) * CHUNK) + c % CHUNK; }
};

// Keep-mask for a register of two bf16 weights whose mask bits are the low two bits of `bits`.
__device__ __forceinline__ unsigned pair_mask(unsigned bits) { return ((bits & 1) ? 0x0000FFFFu : 0u) | ((bits & 2) ? 0xFFFF0000u : 0u); }

// Eight consecutive bf16 weights (16 bytes) with their mask byte applied: where K % 8 == 0, the
// eight weights from a multiple of 8 along a row are exactly one byte of the packed mask.
__device__ __forceinline__ uint4 mask_eight(uint4 w, unsigned bits) {
    w.x &= pair_mask(bits);
    w.y &= pair_mask(bits >> 2);
    w.z &= pair_mask(bits >> 4);
    w.w &= pair_mask(bits >> 6);
    return w;
}

// One stage of the cp.async GEMMs: BM x BK of A and BN x BK of B (elements of T, laid out by L)
// in 16-byte chunks, zero-filled outside the matrices, then, with a mask, BK / 32 words per B
// row (K % 32 == 0 there: each word is 32 aligned bits of row n; zero past K).
template <class T, class L, int BM, int BN, int BK, int THREADS>
__device__ __forceinline__ void load_stage(const GemmArgs& p, const T* A, const T* B, unsigned char* stage, int m0, int n0, int k0, int t) {
    constexpr int CHUNK = 16 / sizeof(T), PER_ROW = BK / CHUNK, WORDS = BK / 32;
    static_assert(BM * PER_ROW % THREADS == 0 && BN * PER_ROW % THREADS == 0, "whole chunks per thread");
    T* As = reinterpret_cast<T*>(stage);
    T* Bs = As + BM * L::ROW;
    unsigned* Ms = reinterpret_cast<unsigned*>(Bs + BN * L::ROW);
#pragma unroll
    for (int i = 0; i < BM * PER_ROW / THREADS; ++i) {
        int idx = t + i * THREADS, r = idx / PER_ROW, ch = (idx % PER_ROW) * CHUNK;
        long ao = a_offset(p, m0 + r, k0 + ch);
        cp_async(As + L::at(r, ch), ao >= 0 ? (const void*)(A + ao) : (const void*)A, 16, ao >= 0);
    }
#pragma unroll
    for (int i = 0; i < BN * PER_ROW / THREADS; ++i) {
        int idx = t + i * THREADS, r = idx / PER_ROW, ch = (idx % PER_ROW) * CHUNK;
        int gn = n0 + r, gk = k0 + ch;
        bool bin = gn < p.n && gk < p.k;
        cp_async(Bs + L::at(r, ch), bin ? (const void*)(B + (long)gn * p.ldb + gk) : (const void*)B, 16, bin);
    }
    if (p.mask) {
#pragma unroll
        for (int i = 0; i < (BN * WORDS + THREADS - 1) / THREADS; ++i) {
            int idx = t + i * THREADS, gn = n0 + idx / WORDS, gk = k0 + (idx % WORDS) * 32;
            bool in = gn < p.n && gk < p.k;
            if (idx < BN * WORDS) cp_async(Ms + idx, in ? (const void*)(p.mask + (((long)gn * p.k + gk) >> 3)) : (const void*)p.mask, 4, in);
        }
    }
}

// The K loop of the cp.async GEMMs over the block's K range: STAGES - 1 stages in flight ahead of
// the one being multiplied. `load(stage, k0)` queues a stage's copies, `compute(stage)` multiplies a resident
// one; on return every copy has landed and the buffers are free for the epilogue.
template <int STAGES, int STAGE_BYTES, int BK, class Load, class Compute>
__device__ __forceinline__ void cp_async_k_loop(unsigned char* smem, KRange kr, Load load, Compute compute) {
    // K tiles counted from 0 at K = 0 (a chunk starts on a tile), each in stage buffer kt % STAGES.
    const int kt_begin = kr.begin / BK, kt_end = (kr.end + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        const int kt = kt_begin + s;
        if (kt < kt_end) load(smem + (kt % STAGES) * STAGE_BYTES, kt * BK);
        cp_commit();
    }
    for (int kt = kt_begin; kt < kt_end; ++kt) {
        cp_wait<STAGES - 2>();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < kt_end) load(smem + (next % STAGES) * STAGE_BYTES, next * BK);
        cp_commit();
        compute(static_cast<const unsigned char*>(smem + (kt % STAGES) * STAGE_BYTES));
    }
    cp_wait<0>();
    __syncthreads();
}
