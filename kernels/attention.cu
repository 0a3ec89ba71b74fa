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
