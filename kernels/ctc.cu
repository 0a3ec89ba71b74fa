// CTC loss and gradient with respect to the logits, log-softmax fused in. version 2.
//
// The recursions are inherently serial over frames (749 at 15 s), so what matters is the time of
// one frame step; everything else runs wide:
//   1. ctc_emissions (a warp per frame, all utterances at once): each frame's log-sum-exp and the
//      log-probabilities of its extended-label states, E[t][s] = logit[t][l'(s)] - lse[t].
//   2. ctc_recursions (one block per utterance and direction: alpha and beta run concurrently):
//      a thread per state (several when the sequence is long), the previous frame in shared
//      memory, one barrier per frame; E is read from registers loaded PREFETCH frames ahead, so
//      no global-memory latency sits on the serial path. Alpha and beta go to global scratch.
//   3. ctc_grad (a warp per frame): occupancies exp(alpha + beta - E - log p), normalised by the
//      frame's total (1 in exact arithmetic), summed per token in a fixed order (the blank over
//      the even states by a warp reduction, each label token over its own positions),
//      grad = (softmax - occupancy) * scale. Deterministic: no atomics.
// Log space throughout, as in version 1 (accurate expf/log1pf: parity with the CPU's f64).
#include "common.cuh"

constexpr int CTC_PREFETCH = 4;   // frames of emissions in flight ahead of the recursion
constexpr int CTC_MAX_SLOTS = 4;  // states per thread: L <= 4 * 1024 (src/backend/cuda/ctc.rs MAX_STATES)

__device__ __forceinline__ float log_add(float a, float b) {
    float m = fmaxf(a, b);
    return m == -INFINITY ? m : m + log1pf(expf(-fabsf(a - b)));
}

// The per-batch index arrays, one upload (i64): see CtcMeta in src/backend/cuda/ctc.rs.
struct CtcMeta {
    const long* frame_off;  // [U + 1] packed frames of each utterance
    const long* label_off;  // [U + 1] into labels
    const long* state_off;  // [U + 1] into E / alpha / beta: sum of T * L
    const long* labels;     // every utterance's label ids
    const long* tok_off;    // [U * (vocab + 1)]: positions of token k in utterance u's labels,
    const long* positions;  // positions[tok_off[u * (vocab + 1) + k] .. + k + 1] (label indices)
    int vocab, blank;
};

// The token of extended-label state s (blanks at even s).
__device__ __forceinline__ int ext_token(const long* lab, int s, int blank) { return (s & 1) ? (int)lab[s >> 1] : blank; }

// May state s be entered from s - 2 (skipping a blank)?
__device__ __forceinline__ bool can_skip(const long* lab, int s, int blank) {
    return s >= 2 && (s & 1) && lab[s >> 1] != lab[(s >> 1) - 1] && lab[s >> 1] != blank;
}

// One warp per frame: lse[f] over the vocabulary, then E[t][s] for every state.
extern "C" __global__ void ctc_emissions(const float* logits, CtcMeta m, float* lse, float* emit) {
    const int u = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long f0 = m.frame_off[u];
    const int T = (int)(m.frame_off[u + 1] - f0), t = blockIdx.x * (blockDim.x / 32) + warp;
    if (t >= T) return;
    const long* lab = m.labels + m.label_off[u];
    const int L = 2 * (int)(m.label_off[u + 1] - m.label_off[u]) + 1;
    const float* row = logits + (f0 + t) * m.vocab;
    float mx = -INFINITY;
    for (int k = lane; k < m.vocab; k += 32) mx = fmaxf(mx, row[k]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int k = lane; k < m.vocab; k += 32) sum += expf(row[k] - mx);
    const float z = mx + logf(warp_sum(sum));
    if (lane == 0) lse[f0 + t] = z;
    float* e = emit + m.state_off[u] + (long)t * L;
    for (int s = lane; s < L; s += 32) e[s] = row[ext_token(lab, s, m.blank)] - z;
}

// blockIdx.x = 0: alpha forward; 1: beta backward (both include the frame's own emission, as in
// version 1). blockIdx.y = utterance. Shared memory: two rows of max L floats.
extern "C" __global__ void __launch_bounds__(1024) ctc_recursions(CtcMeta m, const float* emit, float* alpha, float* beta, int zero_inf, float* losses) {
    DYNAMIC_SHARED(float, rows);
    const int u = blockIdx.y, backward = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const int T = (int)(m.frame_off[u + 1] - m.frame_off[u]);
    const long* lab = m.labels + m.label_off[u];
    const int L = 2 * (int)(m.label_off[u + 1] - m.label_off[u]) + 1;
    if (T == 0) {
        if (!backward && tid == 0) losses[u] = 0.0f;
        return;
    }
    const float* e = emit + m.state_off[u];
    float* out = (backward ? beta : alpha) + m.state_off[u];
    float* prev = rows;
    float* cur = rows + L;
    // This thread's states s = tid + j * nt, whether each may skip (alpha: from s - 2; beta:
    // to s + 2), and its ring of prefetched emissions.
    bool skip[CTC_MAX_SLOTS];
    float ring[CTC_PREFETCH][CTC_MAX_SLOTS];
#pragma unroll
    for (int j = 0; j < CTC_MAX_SLOTS; ++j) {
        const int s = tid + j * nt;
        skip[j] = s < L && (backward ? (s + 2 < L && can_skip(lab, s + 2, m.blank)) : can_skip(lab, s, m.blank));
    }
    // Frame order: t(i) = i forward, T - 1 - i backward.
#pragma unroll
    for (int d = 0; d < CTC_PREFETCH; ++d) {
        const int t = backward ? T - 1 - d : d;
#pragma unroll
        for (int j = 0; j < CTC_MAX_SLOTS; ++j) {
            const int s = tid + j * nt;
            ring[d][j] = (d < T && s < L) ? e[(long)t * L + s] : 0.0f;
        }
    }
    for (int i = 0; i < T; ++i) {
        const int t = backward ? T - 1 - i : i;
        float now[CTC_MAX_SLOTS];
#pragma unroll
        for (int j = 0; j < CTC_MAX_SLOTS; ++j) {
            now[j] = ring[0][j];
#pragma unroll
            for (int d = 0; d + 1 < CTC_PREFETCH; ++d) ring[d][j] = ring[d + 1][j];
            const int s = tid + j * nt, ahead = i + CTC_PREFETCH;
            const int ta = backward ? T - 1 - ahead : ahead;
            ring[CTC_PREFETCH - 1][j] = (ahead < T && s < L) ? e[(long)ta * L + s] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < CTC_MAX_SLOTS; ++j) {
            const int s = tid + j * nt;
            if (s >= L) break;
            float v;
            if (i == 0) {
                v = backward ? (s >= L - 2 ? 0.0f : -INFINITY) : (s < 2 ? 0.0f : -INFINITY);
            } else if (backward) {
                v = prev[s];
                if (s + 1 < L) v = log_add(v, prev[s + 1]);
                if (skip[j]) v = log_add(v, prev[s + 2]);
            } else {
                v = prev[s];
                if (s >= 1) v = log_add(v, prev[s - 1]);
                if (skip[j]) v = log_add(v, prev[s - 2]);
            }
            v += now[j];
            cur[s] = v;
            out[(long)t * L + s] = v;
        }
        __syncthreads();  // cur complete before it becomes prev; prev's readers done before it is overwritten
        float* tmp = prev;
        prev = cur;
        cur = tmp;
    }
    if (!backward && tid == 0) {
        const float log_p = L > 1 ? log_add(prev[L - 1], prev[L - 2]) : prev[0];
        losses[u] = log_p == -INFINITY ? (zero_inf ? 0.0f : INFINITY) : -log_p;
    }
}

// One warp per frame: grad[t][k] = (softmax[t][k] - sum of the occupancies of k's states) * scale.
extern "C" __global__ void ctc_grad(const float* logits, CtcMeta m, const float* lse, const float* emit, const float* alpha,
                                    const float* beta, int zero_inf, float scale, float* grad) {
    const int u = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long f0 = m.frame_off[u];
    const int T = (int)(m.frame_off[u + 1] - f0), t = blockIdx.x * (blockDim.x / 32) + warp;
    if (t >= T) return;
    const int S = (int)(m.label_off[u + 1] - m.label_off[u]), L = 2 * S + 1;
    const long base = m.state_off[u], row_t = base + (long)t * L, last = base + (long)(T - 1) * L;
    const float log_p = L > 1 ? log_add(alpha[last + L - 1], alpha[last + L - 2]) : alpha[last];
    float* g = grad + (f0 + t) * m.vocab;
    if (log_p == -INFINITY) {  // no alignment: zero_infinity gives 0; otherwise the host reports it
        for (int k = lane; k < m.vocab; k += 32) g[k] = zero_inf ? 0.0f : NAN;
        return;
    }
    auto occupancy = [&](int s) {
        const float o = alpha[row_t + s] + beta[row_t + s] - emit[row_t + s] - log_p;
        return o > -INFINITY ? expf(o) : 0.0f;
    };
    // A frame's occupancies sum to 1 in exact arithmetic. In f32, alpha and beta carry rounding
    // accumulated over hundreds of frames, nearly the same for every state of a frame, so each
    // occupancy is off by a common factor (1e-4 and more at T = 2000, which the softmax minus
    // occupancy of a confident frame turns into 1e-3 of the gradient). Dividing by the frame's
    // own total cancels that factor.
    float blank_occ = 0.0f, total = 0.0f;
    for (int s = lane; s < L; s += 32) {
        const float o = occupancy(s);
        total += o;
        if (!(s & 1)) blank_occ += o;
    }
    blank_occ = warp_sum(blank_occ);
    total = warp_sum(total);
    const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
    const float z = lse[f0 + t];
    const float* row = logits + (f0 + t) * m.vocab;
    const long* tok = m.tok_off + (long)u * (m.vocab + 1);
    for (int k = lane; k < m.vocab; k += 32) {
        float occ = 0.0f;
        if (k == m.blank) {
            occ = blank_occ;
        } else {
            for (long p = tok[k]; p < tok[k + 1]; ++p) occ += occupancy(2 * (int)m.positions[p] + 1);
        }
        g[k] = (expf(row[k] - z) - occ * inv_total) * scale;
    }
}
