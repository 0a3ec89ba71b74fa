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

// attention_bf16_mma_hd{16,32,64,128}: version 2 of the tensor-core path, FlashAttention-2 style.
// (Version 1 used WMMA fragments with S and O staged in shared memory, since WMMA accumulators
// cannot be rescaled row by row; 0.46 ms against this version's 0.23 ms on an H100 at b8 h12 t749.)
// One block of 4 warps per (64 queries, head, utterance); each warp owns 16 query rows and keeps
// everything in registers: S = Q Kᵀ from mma.sync m16n8k16 (Q and K fragments via ldmatrix),
// the online softmax on the S accumulators (each lane holds two rows; row statistics reduced over
// the 4 lanes of a quad), P re-packed in registers as the A operand of P V, V fragments via
// ldmatrix.trans, and the output accumulators rescaled per row. K and V tiles of 64 keys go
// through shared memory (converted from fp32 as they are staged).
template <int HD>
struct MmaAttnSmem {
    static constexpr int BQ = 64, BKV = 64, LD = HD + 8;  // +8 bf16: conflict-free ldmatrix rows
    static constexpr int BYTES = (BQ + 2 * BKV) * LD * 2;
};

// Stages rows r0 .. r0 + ROWS of one head's slice of qkv (columns col .. col + hd of each packed
// row `start + r`) into shared memory as bf16 times `scale`: rows at or past `len` and columns at or
// past `hd` as zeros. 16-byte loads (hd % 4 == 0 and c % 4 == 0), each thread issuing a batch of
// them before converting any, from addresses clamped into the utterance and the head so none
// needs a branch: one memory round trip per batch, not one per load.
template <int ROWS, int HD>
__device__ __forceinline__ void stage_rows_vec4(const float* qkv, long row3, int start, int r0, int len, int col, int hd, float scale,
                                                __nv_bfloat16* dst, int ld, int t) {
    // Batches of 8 loads (4 at HD 128, whose accumulators take twice the registers).
    constexpr int PER = ROWS * HD / 4 / 128, MOST = HD >= 128 ? 2 : 8, BATCH = PER < MOST ? PER : MOST;
    static_assert(PER * 4 * 128 == ROWS * HD && PER % BATCH == 0, "whole 16-byte loads per thread");
#pragma unroll
    for (int b0 = 0; b0 < PER; b0 += BATCH) {
        float4 v[BATCH];
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            int i = t + (b0 + j) * 128, r = i / (HD / 4), d = (i % (HD / 4)) * 4;
            int row = min(r0 + r, len - 1), dd = min(d, hd - 4);
            v[j] = *reinterpret_cast<const float4*>(qkv + (long)(start + row) * row3 + col + dd);
        }
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            int i = t + (b0 + j) * 128, r = i / (HD / 4), d = (i % (HD / 4)) * 4;
            float4 x = (r0 + r < len && d < hd) ? v[j] : make_float4(0.f, 0.f, 0.f, 0.f);
            __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(dst + r * ld + d);
            o[0] = __floats2bfloat162_rn(x.x * scale, x.y * scale);
            o[1] = __floats2bfloat162_rn(x.z * scale, x.w * scale);
        }
    }
}

template <int HD>
__device__ void attention_bf16_mma_impl(const float* qkv, float* out, const int* offsets, int c, int hd, float scale) {
    using L = MmaAttnSmem<HD>;
    DYNAMIC_SHARED(unsigned char, smem);
    __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smem);
    __nv_bfloat16* Ks = Qs + L::BQ * L::LD;
    __nv_bfloat16* Vs = Ks + L::BKV * L::LD;
    const int u = blockIdx.z, h = blockIdx.y, t = threadIdx.x, warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
    const int start = offsets[u], len = offsets[u + 1] - start, q0 = blockIdx.x * L::BQ;
    if (q0 >= len) return;
    const long row3 = 3L * c;
    // float4 loads when every head's rows start on 16-byte boundaries (qkv is 256-byte aligned).
    const bool vec4 = (hd % 4 == 0) && (c % 4 == 0);
    if (vec4) {
        stage_rows_vec4<L::BQ, HD>(qkv, row3, start, q0, len, h * hd, hd, scale, Qs, L::LD, t);
    } else {
        for (int i = t; i < L::BQ * HD; i += 128) {
            int r = i / HD, d = i % HD;
            bool in = q0 + r < len && d < hd;
            Qs[r * L::LD + d] = __float2bfloat16(in ? qkv[(start + q0 + r) * row3 + h * hd + d] * scale : 0.0f);
        }
    }
    __syncthreads();
    unsigned qf[HD / 16][4];
#pragma unroll
    for (int kc = 0; kc < HD / 16; ++kc) ldmatrix_x4(qf[kc], Qs + (warp * 16 + lane % 16) * L::LD + kc * 16 + (lane / 16) * 8);
    float o[HD / 8][4] = {};
    float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.0f, 0.0f};  // rows g and g + 8 (l: this lane's partial sum)
    for (int j0 = 0; j0 < len; j0 += L::BKV) {
        __syncthreads();  // everyone is done with the previous K and V tiles
        if (vec4) {
            stage_rows_vec4<L::BKV, HD>(qkv, row3, start, j0, len, c + h * hd, hd, 1.0f, Ks, L::LD, t);
            stage_rows_vec4<L::BKV, HD>(qkv, row3, start, j0, len, 2 * c + h * hd, hd, 1.0f, Vs, L::LD, t);
        } else {
            for (int i = t; i < L::BKV * HD; i += 128) {
                int r = i / HD, d = i % HD;
                bool in = j0 + r < len && d < hd;
                long base = (long)(start + j0 + r) * row3 + h * hd + d;
                Ks[r * L::LD + d] = __float2bfloat16(in ? qkv[base + c] : 0.0f);
                Vs[r * L::LD + d] = __float2bfloat16(in ? qkv[base + 2 * c] : 0.0f);
            }
        }
        __syncthreads();
        float s[L::BKV / 8][4] = {};
#pragma unroll
        for (int kc = 0; kc < HD / 16; ++kc)
#pragma unroll
            for (int nj = 0; nj < L::BKV / 16; ++nj) {
                unsigned kf[4];
                ldmatrix_x4(kf, Ks + (nj * 16 + (lane % 8) + (lane / 16) * 8) * L::LD + kc * 16 + ((lane / 8) % 2) * 8);
                mma_bf16(s[2 * nj], qf[kc], kf[0], kf[1]);
                mma_bf16(s[2 * nj + 1], qf[kc], kf[2], kf[3]);
            }
        // Online softmax: lane holds s[nt][0..1] (row g) and s[nt][2..3] (row g + 8).
        float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < L::BKV / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int key = j0 + nt * 8 + tq * 2 + (e & 1);
                if (key >= len) s[nt][e] = -INFINITY;
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
        // P = exp(S - m) in bf16, summed as rounded (what the MMA multiplies), packed as A fragments.
        unsigned pf[L::BKV / 16][4];
#pragma unroll
        for (int nt = 0; nt < L::BKV / 8; ++nt) {
            __nv_bfloat162 lo = __floats2bfloat162_rn(expf(s[nt][0] - m_row[0]), expf(s[nt][1] - m_row[0]));
            __nv_bfloat162 hi = __floats2bfloat162_rn(expf(s[nt][2] - m_row[1]), expf(s[nt][3] - m_row[1]));
            l_row[0] += __low2float(lo) + __high2float(lo);
            l_row[1] += __low2float(hi) + __high2float(hi);
            // Key chunk nt / 2: tile 2c gives registers 0 (row g) and 1 (row g + 8), tile 2c + 1 gives 2 and 3.
            pf[nt / 2][(nt % 2) * 2] = *reinterpret_cast<unsigned*>(&lo);
            pf[nt / 2][(nt % 2) * 2 + 1] = *reinterpret_cast<unsigned*>(&hi);
        }
#pragma unroll
        for (int kc = 0; kc < L::BKV / 16; ++kc)
#pragma unroll
            for (int dj = 0; dj < HD / 16; ++dj) {
                unsigned vf[4];
                ldmatrix_x4_trans(vf, Vs + (kc * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * L::LD + dj * 16 + (lane / 16) * 8);
                mma_bf16(o[2 * dj], pf[kc], vf[0], vf[1]);
                mma_bf16(o[2 * dj + 1], pf[kc], vf[2], vf[3]);
            }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_row[r] += __shfl_xor_sync(0xffffffffu, l_row[r], 1);
        l_row[r] += __shfl_xor_sync(0xffffffffu, l_row[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int q = q0 + warp * 16 + g + r * 8;
        if (q >= len) continue;
        float inv = 1.0f / l_row[r];
        float* dst = out + (long)(start + q) * c + h * hd;
#pragma unroll
        for (int dt = 0; dt < HD / 8; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                int d = dt * 8 + tq * 2 + e;
                if (d < hd) dst[d] = o[dt][r * 2 + e] * inv;
            }
    }
}

#define ATTENTION_BF16_MMA(HD)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) attention_bf16_mma_hd##HD(const float* qkv, float* out,      \
                                                                                const int* offsets, int c, int hd, \
                                                                                float scale) {                     \
        attention_bf16_mma_impl<HD>(qkv, out, offsets, c, hd, scale);                                              \
    }                                                                                                              \
    extern "C" __global__ void attention_bf16_mma_hd##HD##_smem(int* bytes) { *bytes = MmaAttnSmem<HD>::BYTES; }
ATTENTION_BF16_MMA(16)
ATTENTION_BF16_MMA(32)
ATTENTION_BF16_MMA(64)
ATTENTION_BF16_MMA(128)
