// Multi-head self-attention within each utterance of a packed batch, flash style: one block per
// (64 queries, head, utterance), one thread per query; K and V stream through shared memory in
// tiles and the softmax is computed online, so no T x T matrix ever exists in device memory.
// qkv is [total, 3c] (q, k, v side by side), out is [total, c]. version 1 (fp32 FMA).
#include "common.cuh"

template <int HD>
__device__ void attention_impl(const float* qkv, float* out, const int* offsets, int c, int hd, float scale) {
    constexpr int TILE = 2048 / HD;  // keys per tile: 16 KB of K plus 16 KB of V in shared memory
    __shared__ float Ks[TILE][HD];
    __shared__ float Vs[TILE][HD];
    const int u = blockIdx.z, h = blockIdx.y;
    const int start = offsets[u], len = offsets[u + 1] - start;
    const int qi = blockIdx.x * blockDim.x + threadIdx.x;
    if (blockIdx.x * blockDim.x >= len) return;
    const bool valid = qi < len;
    const long row3 = 3L * c;
    float q[HD], o[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        q[d] = (valid && d < hd) ? qkv[(start + qi) * row3 + h * hd + d] * scale : 0.0f;
        o[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j0 = 0; j0 < len; j0 += TILE) {
        for (int i = threadIdx.x; i < TILE * HD; i += blockDim.x) {
            int r = i / HD, d = i % HD;
            bool in = j0 + r < len && d < hd;
            long base = (long)(start + j0 + r) * row3 + h * hd + d;
            Ks[r][d] = in ? qkv[base + c] : 0.0f;
            Vs[r][d] = in ? qkv[base + 2 * c] : 0.0f;
        }
        __syncthreads();
        const int n = min(TILE, len - j0);
        float s[TILE];
        float tmax = -INFINITY;
#pragma unroll 4
        for (int r = 0; r < TILE; ++r) {
            float acc = 0.0f;
#pragma unroll
            for (int d = 0; d < HD; ++d) acc = fmaf(q[d], Ks[r][d], acc);
            s[r] = r < n ? acc : -INFINITY;
            tmax = fmaxf(tmax, s[r]);
        }
        float m_new = fmaxf(m, tmax);
        float corr = expf(m - m_new);
        l *= corr;
#pragma unroll
        for (int d = 0; d < HD; ++d) o[d] *= corr;
#pragma unroll 4
        for (int r = 0; r < TILE; ++r) {
            float pr = r < n ? expf(s[r] - m_new) : 0.0f;
            l += pr;
#pragma unroll
            for (int d = 0; d < HD; ++d) o[d] = fmaf(pr, Vs[r][d], o[d]);
        }
        m = m_new;
        __syncthreads();
    }
    if (valid) {
        float inv = 1.0f / l;
        for (int d = 0; d < hd; ++d) out[(long)(start + qi) * c + h * hd + d] = o[d] * inv;
    }
}

#define ATTENTION(HD)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(64) attention_hd##HD(const float* qkv, float* out, const int* offsets, \
                                                                      int c, int hd, float scale) {                    \
        attention_impl<HD>(qkv, out, offsets, c, hd, scale);                                                          \
    }
ATTENTION(16)
ATTENTION(32)
ATTENTION(64)
ATTENTION(128)

// The flash-style kernels, FlashAttention-2 style, written once over two operand flavours:
//   attention_bf16_mma_hd*, attention_bwd_{kv,q}_bf16_hd*: bf16 tiles, mma.sync m16n8k16 with
//     ldmatrix fragments (version 2 of the bf16 path; version 1 used WMMA fragments with S and O
//     staged in shared memory, since WMMA accumulators cannot be rescaled row by row: 0.46 ms
//     against 0.23 ms on an H100 at b8 h12 t749).
//   attention_tf32x3_hd*, attention_bwd_{kv,q}_tf32x3_hd*: the fp32 path. fp32 tiles, each
//     product as three mma.sync m16n8k8 over operands split into TF32 parts (x = big + small,
//     small terms first), so scores, outputs and gradients keep fp32 accuracy (the GEMMs' 3xTF32).
// One block of 4 warps per (64 queries, head, utterance); each warp owns 16 query rows and keeps
// everything in registers: S = Q Kᵀ, the online softmax on the S accumulators (each lane holds
// two rows; row statistics reduced over the 4 lanes of a quad), P re-packed in registers as the A
// operand of P V, and the output accumulators rescaled per row. K and V tiles of 64 keys go
// through shared memory (converted from fp32 as they are staged, for bf16).
// Training adds dropout on the probabilities (the CPU's masks: query row r, head h, key j use
// index ((r * heads + h) << 24) | j) and, for the backward, each row's log-sum-exp.
//
// The backward, from the forward's log-sum-exp L and D = rowsum(dO ⊙ O): P = exp(S - L), dP =
// (dO Vᵀ) ⊙ Z (Z the dropout factors), dS = P ⊙ (dP - D); dV = (P ⊙ Z)ᵀ dO, dK = dSᵀ (scale Q),
// dQ = scale dS K. The kernel walks the query tiles for 64 keys (each warp 16 keys: Sᵀ = K Qᵀ and
// dPᵀ = V dOᵀ, so Pᵀ and dSᵀ are A operands in registers) and writes dK and dV; for dQ it writes
// scale dS (as the tile type T: bf16, or fp32 for 3xTF32) and Kᵀ into slabs that a batched
// tensor-core GEMM multiplies (src/backend/cuda/mod.rs): every gradient row is written by one
// warp or GEMM block (no atomics, the same bits every run), and S and dP are computed once where a
// second kernel walking key tiles for 64 queries recomputed them (7 tile products for 5).

// Four staged values into a tile (16 bytes of fp32, 8 of bf16): bf16 for the bf16 kernels,
// fp32 for the 3xTF32 ones.
__device__ __forceinline__ void put4(__nv_bfloat16* dst, float4 x) {
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(dst);
    o[0] = __floats2bfloat162_rn(x.x, x.y);
    o[1] = __floats2bfloat162_rn(x.z, x.w);
}
__device__ __forceinline__ void put4(float* dst, float4 x) { *reinterpret_cast<float4*>(dst) = x; }

// Four consecutive values of a source row (16-byte aligned fp32, 8-byte aligned bf16), as
// loaded and as converted to fp32: a bf16 source is the qkv a bf16 GEMM wrote.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ uint2 load4(const __nv_bfloat16* p) { return *reinterpret_cast<const uint2*>(p); }
__device__ __forceinline__ float4 widen4(float4 v) { return v; }
__device__ __forceinline__ float4 widen4(uint2 v) {
    const __nv_bfloat162 lo = *reinterpret_cast<const __nv_bfloat162*>(&v.x), hi = *reinterpret_cast<const __nv_bfloat162*>(&v.y);
    return make_float4(__low2float(lo), __high2float(lo), __low2float(hi), __high2float(hi));
}

// Where a tile's rows come from: rows r0 .. r0 + 64 of one head's slice of `src` (fp32 or bf16;
// row stride `stride`, columns col .. col + hd of each packed row `start + r`); rows at or past
// `len` and columns at or past `hd` read as zeros. With `vec4` (hd % 4 == 0, stride % 4 == 0),
// thread t's share is vector loads of 4 values j = 0 .. PER, from addresses clamped into the
// utterance and the head so that none needs a branch.
template <int HD, class Src>
struct TileRows {
    static constexpr int PER = 64 * HD / 4 / 128;
    static_assert(PER * 4 * 128 == 64 * HD, "whole vector loads per thread");
    const Src* src;
    long stride;
    int start, r0, len, col, hd;
    bool vec4;

    __device__ __forceinline__ decltype(load4(src)) load(int j, int t) const {
        int i = t + j * 128, r = i / (HD / 4), d = (i % (HD / 4)) * 4;
        int row = min(r0 + r, len - 1), dd = min(d, hd - 4);
        return load4(src + (long)(start + row) * stride + col + dd);
    }
    // Vector j of thread t, loaded as `v`, into the tile times `scale`.
    template <class T, class V>
    __device__ __forceinline__ void put(T* dst, int ld, float scale, int j, int t, V v) const {
        int i = t + j * 128, r = i / (HD / 4), d = (i % (HD / 4)) * 4;
        float4 x = (r0 + r < len && d < hd) ? widen4(v) : make_float4(0.f, 0.f, 0.f, 0.f);
        put4(dst + r * ld + d, make_float4(x.x * scale, x.y * scale, x.z * scale, x.w * scale));
    }
    // The whole tile, loaded and stored now: batches of 8 loads (2 at HD 128, whose accumulators
    // take twice the registers) issued before any is stored, one memory round trip per batch.
    // Without vec4, element by element.
    template <class T>
    __device__ __forceinline__ void stage(T* dst, int ld, float scale, int t) const {
        if (!vec4) {
            for (int i = t; i < 64 * HD; i += 128) {
                int r = i / HD, d = i % HD;
                bool in = r0 + r < len && d < hd;
                store_as(dst + r * ld + d, in ? load_as(src + (long)(start + r0 + r) * stride + col + d) * scale : 0.0f);
            }
            return;
        }
        constexpr int MOST = HD >= 128 ? 2 : 8, BATCH = PER < MOST ? PER : MOST;
        static_assert(PER % BATCH == 0, "whole batches");
#pragma unroll
        for (int b0 = 0; b0 < PER; b0 += BATCH) {
            decltype(load4(src)) v[BATCH];
#pragma unroll
            for (int j = 0; j < BATCH; ++j) v[j] = load(b0 + j, t);
#pragma unroll
            for (int j = 0; j < BATCH; ++j) put(dst, ld, scale, b0 + j, t, v[j]);
        }
    }
};

// Stages a tile now (TileRows::stage).
template <int HD, class T, class Src>
__device__ __forceinline__ void stage_rows(const Src* src, long stride, int start, int r0, int len, int col, int hd, float scale, T* dst,
                                           int ld, int t, bool vec4) {
    TileRows<HD, Src>{src, stride, start, r0, len, col, hd, vec4}.stage(dst, ld, scale, t);
}

// The next tile of a loop over tiles, in flight: `fetch` issues its loads into registers before
// the current tile's MMAs, `put` stores it once they are done, so the loads' latency hides
// behind the MMAs instead of stalling every warp of the block at the top of each tile (the
// staging before, with two or three blocks per SM to cover it). Held only for bf16 sources in
// the bf16 kernels up to head size 64 (F::PREFETCH): 16 registers a tile; fp32 sources would
// take 32, which pushed those kernels to 255 registers and spills (ptxas, sm_90). Otherwise,
// or without vec4, `put` stages the tile then.
template <int HD, class Src, bool PREFETCH>
struct TileInFlight {
    static constexpr bool HELD = PREFETCH && sizeof(Src) == 2;
    TileRows<HD, Src> rows;
    decltype(load4((const Src*)nullptr)) v[HELD ? TileRows<HD, Src>::PER : 1];

    __device__ __forceinline__ void fetch(const TileRows<HD, Src>& next, int t) {
        rows = next;
        if (HELD && rows.vec4)
#pragma unroll
            for (int j = 0; j < TileRows<HD, Src>::PER; ++j) v[j] = rows.load(j, t);
    }
    template <class T>
    __device__ __forceinline__ void put(T* dst, int ld, float scale, int t) const {
        if (!HELD || !rows.vec4) return rows.stage(dst, ld, scale, t);
#pragma unroll
        for (int j = 0; j < TileRows<HD, Src>::PER; ++j) rows.put(dst, ld, scale, j, t, v[HELD ? j : 0]);
    }
};

// Two floats as the bf16 pair of one fragment register.
__device__ __forceinline__ unsigned bf16_pair(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// The operand flavours. Each gives the tile element type T and row strides (LD_ROWS for tiles
// read along rows, LD_COLS for those read down columns only), and a warp's products on 16 rows:
//   load_a(a, tile, ld, row0): A operand = rows row0 .. row0 + 16 of a tile, K = HD;
//   mma_abt(acc, a, tile, ld): acc (16 x 64) += A Bᵀ, B the 64 rows of a tile (Q Kᵀ, dO Vᵀ, and
//     in the backward K Qᵀ, V dOᵀ);
//   pack(pa, x): a product's 16 x 64 accumulators as the A operand of a product over those 64;
//   mma_ab(acc, pa, tile, ld): acc (16 x HD) += A B, B a 64 x HD tile (P V, and in the backward
//     Pᵀ dO, dSᵀ Q, dS K);
//   round_p(x): a probability as the MMA multiplies it (the softmax sums those).
template <int HD_>
struct Bf16Ops {
    static constexpr int HD = HD_, LD_ROWS = HD + 8, LD_COLS = HD + 8;  // +8 bf16: conflict-free ldmatrix rows
    static constexpr bool PREFETCH = HD <= 64;                              // TileInFlight holds next bf16 tiles
    using T = __nv_bfloat16;
    struct ARows {  // ldmatrix fragments, held in registers
        unsigned f[HD / 16][4];
    };
    struct PackedA {
        unsigned f[4][4];
    };

    static __device__ __forceinline__ float round_p(float x) { return __bfloat162float(__float2bfloat16(x)); }

    static __device__ __forceinline__ void load_a(ARows& a, const T* tile, int ld, int row0, int lane) {
#pragma unroll
        for (int kc = 0; kc < HD / 16; ++kc) ldmatrix_x4(a.f[kc], tile + (row0 + lane % 16) * ld + kc * 16 + (lane / 16) * 8);
    }

    static __device__ __forceinline__ void mma_abt(float (&acc)[8][4], const ARows& a, const T* tile, int ld, int lane) {
#pragma unroll
        for (int kc = 0; kc < HD / 16; ++kc)
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) {
                unsigned b[4];
                ldmatrix_x4(b, tile + (nj * 16 + (lane % 8) + (lane / 16) * 8) * ld + kc * 16 + ((lane / 8) % 2) * 8);
                mma_bf16(acc[2 * nj], a.f[kc], b[0], b[1]);
                mma_bf16(acc[2 * nj + 1], a.f[kc], b[2], b[3]);
            }
    }

    // Column tile nt feeds K chunk nt / 2, its rows g and g + 8 registers 0 and 1 (even nt) or 2 and 3.
    static __device__ __forceinline__ void pack(PackedA& a, const float (&x)[8][4]) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            a.f[nt / 2][(nt % 2) * 2] = bf16_pair(x[nt][0], x[nt][1]);
            a.f[nt / 2][(nt % 2) * 2 + 1] = bf16_pair(x[nt][2], x[nt][3]);
        }
    }

    static __device__ __forceinline__ void mma_ab(float (&acc)[HD / 8][4], const PackedA& a, const T* tile, int ld, int lane) {
#pragma unroll
        for (int kc = 0; kc < 4; ++kc)
#pragma unroll
            for (int dj = 0; dj < HD / 16; ++dj) {
                unsigned b[4];
                ldmatrix_x4_trans(b, tile + (kc * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * ld + dj * 16 + (lane / 16) * 8);
                mma_bf16(acc[2 * dj], a.f[kc], b[0], b[1]);
                mma_bf16(acc[2 * dj + 1], a.f[kc], b[2], b[3]);
            }
    }
};

// fp32 tiles, rows padded so a warp's fragment loads hit 32 different banks: LD_ROWS = 4 mod 32
// for element (row g, column tq), LD_COLS = 8 mod 32 for (row tq, column g). Tiles read both
// ways in the backward take LD_ROWS (their column reads conflict two ways). A operands stay in
// shared memory and are split per K chunk as they are used: split fragments held for all of K
// would take four times the registers of bf16 ones.
template <int HD_>
struct Tf32x3Ops {
    static constexpr int HD = HD_, LD_ROWS = HD + 4, LD_COLS = HD + 8;
    static constexpr bool PREFETCH = false;  // ~180-200 registers already: no room for the next tiles
    using T = float;
    struct ARows {
        const float* tile;
        int ld, row0;
    };
    struct PackedA {  // the accumulators themselves: moved into the A layout chunk by chunk
        float x[8][4];
    };

    static __device__ __forceinline__ float round_p(float x) { return x; }

    static __device__ __forceinline__ void load_a(ARows& a, const T* tile, int ld, int row0, int) { a = ARows{tile, ld, row0}; }

    // A's fragment of chunk kc: rows g (registers 0, 2) and g + 8 (1, 3), columns tq (0, 1) and
    // tq + 4; B's: row n = g of each 8-row tile, columns tq and tq + 4. Every caller's acc starts
    // at zero for the tile and sums HD / 8 steps: chained in the tensor core.
    static __device__ __forceinline__ void mma_abt(float (&acc)[8][4], const ARows& a, const T* tile, int ld, int lane) {
        const int g = lane / 4, tq = lane % 4;
#pragma unroll
        for (int kc = 0; kc < HD / 8; ++kc) {
            unsigned ab[4], as[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) split_tf32(a.tile[(a.row0 + g + (i & 1) * 8) * a.ld + kc * 8 + tq + (i >> 1) * 4], ab[i], as[i]);
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                unsigned bb[2], bs[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) split_tf32(tile[(nt * 8 + g) * ld + kc * 8 + tq + e * 4], bb[e], bs[e]);
                mma_tf32x3_few_steps(acc[nt], ab, as, bb, bs);
            }
        }
    }

    static __device__ __forceinline__ void pack(PackedA& a, const float (&x)[8][4]) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) a.x[nt][e] = x[nt][e];
    }

    // Key chunk nt: A's fragment (columns tq and tq + 4 of the chunk) gathered from the lanes of
    // the quad holding them (lane t holds columns 2t, 2t + 1), B's (rows tq, tq + 4; column g).
    static __device__ __forceinline__ void mma_ab(float (&acc)[HD / 8][4], const PackedA& a, const T* tile, int ld, int lane) {
        const int g = lane / 4, tq = lane % 4, quad = lane & ~3, src_lo = quad | (tq >> 1), src_hi = quad | ((tq >> 1) + 2);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            float p[4];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float lo0 = __shfl_sync(0xffffffffu, a.x[nt][2 * r], src_lo), lo1 = __shfl_sync(0xffffffffu, a.x[nt][2 * r + 1], src_lo);
                float hi0 = __shfl_sync(0xffffffffu, a.x[nt][2 * r], src_hi), hi1 = __shfl_sync(0xffffffffu, a.x[nt][2 * r + 1], src_hi);
                p[r] = (tq & 1) ? lo1 : lo0;      // row g + 8r, column tq
                p[2 + r] = (tq & 1) ? hi1 : hi0;  // row g + 8r, column tq + 4
            }
            unsigned pb[4], ps[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) split_tf32(p[i], pb[i], ps[i]);
#pragma unroll
            for (int dt = 0; dt < HD / 8; ++dt) {
                unsigned vb[2], vs[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) split_tf32(tile[(nt * 8 + tq + e * 4) * ld + dt * 8 + g], vb[e], vs[e]);
                mma_tf32x3(acc[dt], pb, ps, vb, vs);
            }
        }
    }
};

// Shared memory of the flash kernels: forward Q, K (rows) and V (columns); backward four tiles,
// then L and D of 64 rows.
template <class F>
struct FlashSmem {
    static constexpr int FWD = (2 * 64 * F::LD_ROWS + 64 * F::LD_COLS) * (int)sizeof(typename F::T);
    static constexpr int BWD = 4 * 64 * F::LD_ROWS * (int)sizeof(typename F::T) + 2 * 64 * 4;
};

// Writes a warp's 16 x HD accumulators (this lane's rows g and g + 8, times f[0] and f[1]) to
// base + (row0 + row) * stride, for rows before `len` and columns before `hd`.
template <int HD>
__device__ __forceinline__ void store_rows(const float (&acc)[HD / 8][4], float* base, long stride, int row0, int len, int hd, const float (&f)[2],
                                           int g, int tq) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int row = row0 + g + r * 8;
        if (row >= len) continue;
        float* dst = base + (long)row * stride;
#pragma unroll
        for (int dt = 0; dt < HD / 8; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                int d = dt * 8 + tq * 2 + e;
                if (d < hd) dst[d] = acc[dt][r * 2 + e] * f[r];
            }
    }
}
// The online softmax's step for a tile of 64 keys from j0 (the flash kernels' score
// accumulators: this lane's rows g in registers 0, 1 and g + 8 in 2, 3): keys past `len` masked
// to -inf, each row's running maximum m updated over the quad, and the running sum l and output
// accumulators o rescaled to it.
template <int HD>
__device__ __forceinline__ void online_softmax_step(float (&s)[8][4], int j0, int len, int tq, float (&m_row)[2], float (&l_row)[2],
                                                    float (&o)[HD / 8][4]) {
    float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (j0 + nt * 8 + tq * 2 + (e & 1) >= len) s[nt][e] = -INFINITY;
            tmax[e / 2] = fmaxf(tmax[e / 2], s[nt][e]);
        }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
        float m_new = fmaxf(m_row[r], tmax[r]);
        corr[r] = expf(m_row[r] - m_new);
        m_row[r] = m_new;
        l_row[r] *= corr[r];
    }
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) {
        o[dt][0] *= corr[0];
        o[dt][1] *= corr[0];
        o[dt][2] *= corr[1];
        o[dt][3] *= corr[1];
    }
}

// Dropout of the probability of (query row `row` of the packed batch, head h, key j of its
// utterance), as the CPU draws it; 1 without dropout.
__device__ __forceinline__ float prob_dropout(float p, unsigned long long site_key, int row, int heads, int h, int j) {
    return p > 0.0f ? dropout_factor(p, site_key, (((unsigned long long)row * heads + h) << 24) | (unsigned long long)j) : 1.0f;
}

template <class F, class Src>
__device__ void attention_flash_impl(const Src* qkv, float* out, const int* offsets, int c, int hd, float scale, float* lse, float p,
                                     unsigned long long site_key) {
    using T = typename F::T;
    constexpr int HD = F::HD;
    DYNAMIC_SHARED(unsigned char, smem);
    T* Qs = reinterpret_cast<T*>(smem);
    T* Ks = Qs + 64 * F::LD_ROWS;
    T* Vs = Ks + 64 * F::LD_ROWS;
    const int u = blockIdx.z, h = blockIdx.y, t = threadIdx.x, warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
    const int start = offsets[u], len = offsets[u + 1] - start, q0 = blockIdx.x * 64, heads = c / hd;
    if (q0 >= len) return;
    const long row3 = 3L * c;
    // float4 loads when every head's rows start on 16-byte boundaries (qkv is 256-byte aligned).
    const bool vec4 = (hd % 4 == 0) && (c % 4 == 0);
    stage_rows<HD>(qkv, row3, start, q0, len, h * hd, hd, scale, Qs, F::LD_ROWS, t, vec4);
    __syncthreads();
    typename F::ARows qa;
    F::load_a(qa, Qs, F::LD_ROWS, warp * 16, lane);
    float o[HD / 8][4] = {};
    float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.0f, 0.0f};  // rows g and g + 8 (l: this lane's partial sum)
    TileInFlight<HD, Src, F::PREFETCH> kn, vn;
    auto fetch = [&](int j0) {
        kn.fetch(TileRows<HD, Src>{qkv, row3, start, j0, len, c + h * hd, hd, vec4}, t);
        vn.fetch(TileRows<HD, Src>{qkv, row3, start, j0, len, 2 * c + h * hd, hd, vec4}, t);
    };
    fetch(0);
    for (int j0 = 0; j0 < len; j0 += 64) {
        __syncthreads();  // everyone is done with the previous K and V tiles
        kn.put(Ks, F::LD_ROWS, 1.0f, t);
        vn.put(Vs, F::LD_COLS, 1.0f, t);
        __syncthreads();
        if (j0 + 64 < len) fetch(j0 + 64);
        float s[8][4] = {};
        F::mma_abt(s, qa, Ks, F::LD_ROWS, lane);
        // Online softmax: lane holds s[nt][0..1] (row g) and s[nt][2..3] (row g + 8).
        online_softmax_step<HD>(s, j0, len, tq, m_row, l_row, o);
        // P = exp(S - m) as the MMA multiplies it, summed as such, then dropped (the sum is of
        // the kept-and-dropped probabilities, as the softmax's).
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float pr = F::round_p(expf(s[nt][e] - m_row[e / 2]));
                l_row[e / 2] += pr;
                int key = j0 + nt * 8 + tq * 2 + (e & 1);
                s[nt][e] = pr * prob_dropout(p, site_key, start + q0 + warp * 16 + g + (e / 2) * 8, heads, h, key);
            }
        typename F::PackedA pa;
        F::pack(pa, s);
        F::mma_ab(o, pa, Vs, F::LD_COLS, lane);
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_row[r] += __shfl_xor_sync(0xffffffffu, l_row[r], 1);
        l_row[r] += __shfl_xor_sync(0xffffffffu, l_row[r], 2);
        inv[r] = 1.0f / l_row[r];
        int q = q0 + warp * 16 + g + r * 8;
        if (lse && tq == 0 && q < len) lse[(long)(start + q) * heads + h] = m_row[r] + logf(l_row[r]);
    }
    store_rows<HD>(o, out + (long)start * c + h * hd, c, q0 + warp * 16, len, hd, inv, g, tq);
}

// D = rowsum(dO ⊙ O) for each (row, head) of the packed batch: [total, heads].
extern "C" __global__ void attention_bwd_dot(const float* d_out, const float* out, float* dot, long total, int c, int hd) {
    const int heads = c / hd;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total * heads; i += (long)gridDim.x * blockDim.x) {
        const long base = (i / heads) * c + (i % heads) * hd;
        float acc = 0.0f;
        for (int d = 0; d < hd; ++d) acc = fmaf(d_out[base + d], out[base + d], acc);
        dot[i] = acc;
    }
}

// The probability terms of one (query, key) pair of the backward: from the score s and its row's
// L and D, the dropout factor z and the gradient dP of the dropped probabilities, returns dS and
// sets pz = P z (what V was multiplied by). Pairs outside the utterance give zeros.
__device__ __forceinline__ float score_grad(float s, float dpz, float lse, float dot, float z, bool in, float& pz) {
    float pr = in ? expf(s - lse) : 0.0f;
    pz = pr * z;
    return pr * (dpz * z - dot);
}


// Where the kernel leaves dQ's operands: slab z = blockIdx.z * heads + h of `ds` holds scale dS
// ([tmax][ld]: query rows, key columns) and of `kt` Kᵀ ([hd][ld]). Every block writes its 64 key
// columns below ld (zeros past the utterance), so the GEMM can run K = ld for all; query rows
// past the utterance are left unwritten (their dQ rows are never read).
template <class T>
struct DqOperands {
    T* ds;
    T* kt;
    int tmax, ld;

    __device__ __forceinline__ T* ds_slab(int heads, int h) const { return ds + (long)(blockIdx.z * heads + h) * tmax * ld; }
    __device__ __forceinline__ T* kt_slab(int heads, int h, int hd) const { return kt + (long)(blockIdx.z * heads + h) * hd * ld; }
};

template <class F, class Src>
__device__ void attention_bwd_kv_impl(const Src* qkv, const float* d_out, const float* lse, const float* dot, float* d_qkv, const int* offsets,
                                      int c, int hd, float scale, float p, unsigned long long site_key, DqOperands<typename F::T> dq) {
    using T = typename F::T;
    constexpr int HD = F::HD, LD = F::LD_ROWS;
    DYNAMIC_SHARED(unsigned char, smem);
    T* Ks = reinterpret_cast<T*>(smem);
    T* Vs = Ks + 64 * LD;
    T* Qs = Vs + 64 * LD;
    T* dOs = Qs + 64 * LD;
    float* Ls = reinterpret_cast<float*>(dOs + 64 * LD);
    float* Ds = Ls + 64;
    const int u = blockIdx.z, h = blockIdx.y, t = threadIdx.x, warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
    const int start = offsets[u], len = offsets[u + 1] - start, j0 = blockIdx.x * 64, heads = c / hd;
    const int cols = min(64, dq.ld - j0);  // this block's key columns of the dQ operands
    T* ds = dq.ds_slab(heads, h);
    T* kt = dq.kt_slab(heads, h, hd);
    if (j0 >= len) {  // keys past the utterance: zero columns
        for (int i = t; i < len * 64; i += 128)
            if (i % 64 < cols) store_as(ds + (long)(i / 64) * dq.ld + j0 + i % 64, 0.0f);
        for (int i = t; i < hd * 64; i += 128)
            if (i % 64 < cols) store_as(kt + (long)(i / 64) * dq.ld + j0 + i % 64, 0.0f);
        return;
    }
    const long row3 = 3L * c;
    const bool vec4 = (hd % 4 == 0) && (c % 4 == 0);
    stage_rows<HD>(qkv, row3, start, j0, len, c + h * hd, hd, 1.0f, Ks, LD, t, vec4);
    stage_rows<HD>(qkv, row3, start, j0, len, 2 * c + h * hd, hd, 1.0f, Vs, LD, t, vec4);
    __syncthreads();
    // Kᵀ as the tiles hold K (bf16-rounded for the bf16 kernels; zeros past the utterance).
    for (int i = t; i < hd * 64; i += 128) {
        const int d = i / 64, jj = i % 64;
        if (jj < cols) kt[(long)d * dq.ld + j0 + jj] = Ks[jj * LD + d];
    }
    float dk[HD / 8][4] = {}, dv[HD / 8][4] = {};
    const int key0 = j0 + warp * 16 + g;  // this lane's keys: key0 (registers 0, 1) and key0 + 8 (2, 3)
    TileInFlight<HD, Src, F::PREFETCH> qn;
    TileInFlight<HD, float, F::PREFETCH> don;
    float l_next = 0.0f, d_next = 0.0f;  // threads t < 64: query i0 + t's L and D
    auto fetch = [&](int i0) {
        qn.fetch(TileRows<HD, Src>{qkv, row3, start, i0, len, h * hd, hd, vec4}, t);
        don.fetch(TileRows<HD, float>{d_out, (long)c, start, i0, len, h * hd, hd, vec4}, t);
        if (t < 64) {
            bool in = i0 + t < len;
            l_next = in ? lse[(long)(start + i0 + t) * heads + h] : 0.0f;
            d_next = in ? dot[(long)(start + i0 + t) * heads + h] : 0.0f;
        }
    };
    fetch(0);
    for (int i0 = 0; i0 < len; i0 += 64) {
        __syncthreads();  // everyone is done with the previous query tile
        qn.put(Qs, LD, scale, t);
        don.put(dOs, LD, 1.0f, t);
        if (t < 64) {
            Ls[t] = l_next;
            Ds[t] = d_next;
        }
        __syncthreads();
        if (i0 + 64 < len) fetch(i0 + 64);
        // Sᵀ and dPᵀ: rows keys, columns queries. The K and V fragments are read again for each
        // query tile rather than held: the accumulators of dK and dV need the registers.
        float st[8][4] = {}, dpt[8][4] = {};
        T* ds_lane = ds + (i0 + tq * 2) * dq.ld + key0;  // (query i0 + 2 tq, key key0)
        {
            typename F::ARows ka;
            F::load_a(ka, Ks, LD, warp * 16, lane);
            F::mma_abt(st, ka, Qs, LD, lane);
        }
        {
            typename F::ARows va;
            F::load_a(va, Vs, LD, warp * 16, lane);
            F::mma_abt(dpt, va, dOs, LD, lane);
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int qi = nt * 8 + tq * 2 + (e & 1), q = i0 + qi, key = key0 + (e / 2) * 8;
                bool in = q < len && key < len;
                float z = prob_dropout(p, site_key, start + q, heads, h, key), pz;
                dpt[nt][e] = score_grad(st[nt][e], dpt[nt][e], Ls[qi], Ds[qi], z, in, pz);
                st[nt][e] = pz;
                // scale dS for dQ's GEMM, at (q, key) of the slab
                if (q < len && key - j0 < cols) store_as(ds_lane + (nt * 8 + (e & 1)) * dq.ld + (e / 2) * 8, dpt[nt][e] * scale);
            }
        typename F::PackedA pa, dsa;
        F::pack(pa, st);
        F::pack(dsa, dpt);
        F::mma_ab(dv, pa, dOs, LD, lane);
        F::mma_ab(dk, dsa, Qs, LD, lane);
    }
    const float one[2] = {1.0f, 1.0f};
    store_rows<HD>(dk, d_qkv + (long)start * row3 + c + h * hd, row3, j0 + warp * 16, len, hd, one, g, tq);
    store_rows<HD>(dv, d_qkv + (long)start * row3 + 2 * c + h * hd, row3, j0 + warp * 16, len, hd, one, g, tq);
}

// The kernels of one flavour, qkv type and head-size class: forward `fwd`, backward
// attention_bwd_kv_`tag`, each with a _smem kernel reporting its dynamic shared memory.
#define ATTENTION_FLASH(fwd, tag, Ops, Src, HD)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                                                 \
        fwd##_hd##HD(const Src* qkv, float* out, const int* offsets, int c, int hd, float scale, float* lse, float p,                 \
                     unsigned long long site_key) {                                                                                   \
        attention_flash_impl<Ops<HD>>(qkv, out, offsets, c, hd, scale, lse, p, site_key);                                             \
    }                                                                                                                                   \
    extern "C" __global__ void fwd##_hd##HD##_smem(int* bytes) { *bytes = FlashSmem<Ops<HD>>::FWD; }                                  \
    extern "C" __global__ void __launch_bounds__(128)                                                                                 \
        attention_bwd_kv_##tag##_hd##HD(const Src* qkv, const float* d_out, const float* lse, const float* dot, float* d_qkv,         \
                                        const int* offsets, int c, int hd, float scale, float p, unsigned long long site_key,         \
                                        DqOperands<Ops<HD>::T> dq) {                                                                  \
        attention_bwd_kv_impl<Ops<HD>>(qkv, d_out, lse, dot, d_qkv, offsets, c, hd, scale, p, site_key, dq);                          \
    }                                                                                                                                   \
    extern "C" __global__ void attention_bwd_kv_##tag##_hd##HD##_smem(int* bytes) { *bytes = FlashSmem<Ops<HD>>::BWD; }
// Every head-size class of one flavour (the classes the host's FlashKernels tables name).
#define ATTENTION_FLASH_CLASSES(fwd, tag, Ops, Src) \
    ATTENTION_FLASH(fwd, tag, Ops, Src, 16)         \
    ATTENTION_FLASH(fwd, tag, Ops, Src, 32)         \
    ATTENTION_FLASH(fwd, tag, Ops, Src, 64)         \
    ATTENTION_FLASH(fwd, tag, Ops, Src, 128)
// bf16 from an fp32 qkv, and from a bf16 one (the output of a bf16 GEMM: half the bytes read).
ATTENTION_FLASH_CLASSES(attention_bf16_mma, bf16, Bf16Ops, float)
ATTENTION_FLASH_CLASSES(attention_bf16_mma_from_bf16, bf16_from_bf16, Bf16Ops, __nv_bfloat16)
ATTENTION_FLASH_CLASSES(attention_tf32x3, tf32x3, Tf32x3Ops, float)

// dQ from the batched GEMM's [slab][tmax][hd] result (slab = utterance * heads + head, see
// DqOperands) into the q columns of d_qkv, rows inside each utterance only.
extern "C" __global__ void attention_dq_scatter(const float* dq, float* d_qkv, const int* offsets, int c, int hd, int tmax, long n) {
    const int heads = c / hd;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const int d = (int)(i % hd), q = (int)(i / hd % tmax);
        const long z = i / ((long)hd * tmax);
        const int u = (int)(z / heads), h = (int)(z % heads), start = offsets[u];
        if (q < offsets[u + 1] - start) d_qkv[(long)(start + q) * 3 * c + h * hd + d] = dq[i];
    }
}
