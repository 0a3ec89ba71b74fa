// CTC loss and gradient with respect to the logits, log-softmax fused in. version 1.
// One block per utterance. Pass 1: each frame's log-sum-exp (threads over frames; no separate
// softmax kernel). Pass 2: alpha in log space, two rows in shared memory, all rows kept in a
// global scratch for the backward pass. Pass 3: beta backwards, fused with the gradient: at each
// frame the occupancy exp(alpha + beta - lp - log p) of every extended-label state (a probability,
// so linear-space sums are safe) is added into a per-token shared array, and
// grad[t][k] = (softmax[t][k] - occupancy[k]) * scale.
#include "common.cuh"

__device__ __forceinline__ float log_add(float a, float b) {
    float m = fmaxf(a, b);
    return m == -INFINITY ? m : m + log1pf(expf(-fabsf(a - b)));
}

extern "C" __global__ void ctc_loss(const float* logits, const int* frame_off, const int* labels, const int* label_off, const long* alpha_off,
                                    int vocab, int blank, int zero_inf, float scale, float* lse, float* alpha_all, float* grad, float* losses) {
    extern __shared__ float sm[];
    const int u = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const int f0 = frame_off[u], T = frame_off[u + 1] - f0;
    const int* lab = labels + label_off[u];
    const int S = label_off[u + 1] - label_off[u], L = 2 * S + 1;
    float* buf0 = sm;
    float* buf1 = sm + L;
    int* ext = reinterpret_cast<int*>(sm + 2 * L);
    float* occ = sm + 3 * L;
    __shared__ float log_p_shared;
    if (T == 0) {
        if (tid == 0) losses[u] = 0.0f;
        return;
    }
    for (int s = tid; s < L; s += nt) ext[s] = (s % 2 == 0) ? blank : lab[s / 2];
    for (int k = tid; k < vocab; k += nt) occ[k] = 0.0f;
    const float* x = logits + (long)f0 * vocab;
    float* lse_u = lse + f0;
    for (int t = tid; t < T; t += nt) {
        const float* row = x + (long)t * vocab;
        float m = -INFINITY;
        for (int k = 0; k < vocab; ++k) m = fmaxf(m, row[k]);
        float sum = 0.0f;
        for (int k = 0; k < vocab; ++k) sum += expf(row[k] - m);
        lse_u[t] = m + logf(sum);
    }
    __syncthreads();
#define LP(t, k) (x[(long)(t) * vocab + (k)] - lse_u[t])
#define SKIP(s) ((s) >= 2 && ext[s] != blank && ext[s] != ext[(s) - 2])
    float* alpha = alpha_all + alpha_off[u];
    float *prev = buf0, *cur = buf1;
    for (int s = tid; s < L; s += nt) {
        float a = s < 2 ? LP(0, ext[s]) : -INFINITY;
        prev[s] = a;
        alpha[s] = a;
    }
    for (int t = 1; t < T; ++t) {
        __syncthreads();
        for (int s = tid; s < L; s += nt) {
            float a = prev[s];
            if (s >= 1) a = log_add(a, prev[s - 1]);
            if (SKIP(s)) a = log_add(a, prev[s - 2]);
            a += LP(t, ext[s]);
            cur[s] = a;
            alpha[(long)t * L + s] = a;
        }
        float* tmp = prev;
        prev = cur;
        cur = tmp;
    }
    __syncthreads();
    if (tid == 0) log_p_shared = L > 1 ? log_add(prev[L - 1], prev[L - 2]) : prev[0];
    __syncthreads();
    const float log_p = log_p_shared;
    float* g = grad + (long)f0 * vocab;
    if (log_p == -INFINITY) {  // no alignment: zero_infinity gives 0 and 0; otherwise the host reports it
        for (long i = tid; i < (long)T * vocab; i += nt) g[i] = zero_inf ? 0.0f : NAN;
        if (tid == 0) losses[u] = zero_inf ? 0.0f : INFINITY;
        return;
    }
    float *next = buf0, *bcur = buf1;
    for (int t = T - 1; t >= 0; --t) {
        for (int s = tid; s < L; s += nt) {
            float b;
            if (t == T - 1) {
                b = s >= L - 2 ? 0.0f : -INFINITY;
            } else {
                b = next[s];
                if (s + 1 < L) b = log_add(b, next[s + 1]);
                if (s + 2 < L && SKIP(s + 2)) b = log_add(b, next[s + 2]);
            }
            b += LP(t, ext[s]);
            bcur[s] = b;
        }
        __syncthreads();
        for (int s = tid; s < L; s += nt) {
            float o = alpha[(long)t * L + s] + bcur[s] - LP(t, ext[s]) - log_p;
            if (o > -INFINITY) atomicAdd(&occ[ext[s]], expf(o));
        }
        __syncthreads();
        for (int k = tid; k < vocab; k += nt) {
            g[(long)t * vocab + k] = (expf(LP(t, k)) - occ[k]) * scale;
            occ[k] = 0.0f;
        }
        float* tmp = next;
        next = bcur;
        bcur = tmp;
    }
    if (tid == 0) losses[u] = -log_p;
#undef LP
#undef SKIP
}
