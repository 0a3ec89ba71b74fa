// CTC loss and gradient with respect to the logits, log-softmax fused in. version 3.
//
// The recursions are inherently serial over frames (749 at 15 s), so what matters is the time of
// one frame step; everything else runs wide:
//   1. ctc_lse (a warp per frame, all utterances at once): each frame's log-sum-exp over the
//      vocabulary. A state's emission E[t][s] = logit[t][l'(s)] - lse[t] is formed where it is
//      used, never stored (version 2 wrote and read back T x L of them per utterance).
//   2. ctc_recursions_s{1,2,4} (one block per utterance and direction: alpha and beta run
//      concurrently): a thread per state (1, 2 or 4 when the sequence is long), the previous
//      frame in shared memory, one barrier per frame. Emissions arrive in registers a chunk of
//      frames ahead: the loads of chunk c + 1 are issued before chunk c is computed, so no
//      global-memory latency sits on the serial path (version 2 kept a ring of 4 frames, shorter
//      than a load's latency once a step got fast). A step adds three log-space terms at once
//      with the fast exp2/log2 units: max, then log(1 + e^(mid - max) + e^(lo - max)), two
//      exponentials and a log where version 2 chained two accurate log-adds (about 4x the
//      latency). Their ~1e-7 absolute error is below the f32 spacing of the values they add
//      to. Alpha and beta go to global scratch relative to a per-frame offset: log-space values
//      fall by a few nats a frame and reach thousands over long utterances, where f32's spacing
//      (2.4e-4 at 2000-4096) is a per-state error no later normalisation removes (rel L2 3e-4
//      on the gradient of 1400 frames x 1100 labels). At the end of each chunk of frames the
//      block's maximum is taken out (a warp max there, read after the step's own barrier) and
//      added to the frame's offset, so stored values stay within a chunk's fall of zero.
//   3. ctc_grad (a warp per frame): occupancies exp(alpha + beta - E - log p), normalised by the
//      frame's total (1 in exact arithmetic), summed per token in a fixed order (the blank over
//      the even states by a warp reduction, each label token over its own positions),
//      grad = (softmax - occupancy) * scale. Deterministic: no atomics.
// Log space throughout; the loss and the gradient use accurate expf/log1pf (parity with the
// CPU's f64).
#include "common.cuh"

__device__ __forceinline__ float log_add(float a, float b) {
    float m = fmaxf(a, b);
    return m == -INFINITY ? m : m + log1pf(expf(-fabsf(a - b)));
}

// log(e^a + e^b + e^c) on the recursion's serial path (see the header).
__device__ __forceinline__ float log_add3_fast(float a, float b, float c) {
    const float hi = fmaxf(a, b), lo = fminf(a, b);
    const float m = fmaxf(hi, c), mid = fminf(hi, c);
    return m == -INFINITY ? m : m + __logf(1.0f + __expf(mid - m) + __expf(lo - m));
}

// The per-batch index arrays, one upload (i64): see CtcMeta in src/backend/cuda/ctc.rs.
struct CtcMeta {
    const long* frame_off;  // [U + 1] packed frames of each utterance
    const long* label_off;  // [U + 1] into labels
    const long* state_off;  // [U + 1] into alpha / beta: sum of T * L
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

// One warp per frame: lse[f] over the vocabulary.
extern "C" __global__ void ctc_lse(const float* logits, int frames, int vocab, float* lse) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long f = (long)blockIdx.x * (blockDim.x / 32) + warp;
    if (f >= frames) return;
    const float* row = logits + f * vocab;
    float mx = -INFINITY;
    for (int k = lane; k < vocab; k += 32) mx = fmaxf(mx, row[k]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int k = lane; k < vocab; k += 32) sum += expf(row[k] - mx);
    sum = warp_sum(sum);  // every lane takes part in the shuffles
    if (lane == 0) lse[f] = mx + logf(sum);
}

// blockIdx.x = 0: alpha forward; 1: beta backward (both include the frame's own emission, as in
// version 1). blockIdx.y = utterance. Shared memory: two rows of max L floats, then a float per
// warp. SLOTS states per thread, emissions CHUNK frames ahead (2 x SLOTS x CHUNK registers).
// Frame t's true values are the stored ones plus offsets[frame_off[u] + t].
template <int SLOTS, int CHUNK>
__device__ __forceinline__ void ctc_recursion(const float* logits, const float* lse, CtcMeta m, float* alpha, float* beta,
                                              float* alpha_offsets, float* beta_offsets, int zero_inf, float* losses) {
    static_assert(CHUNK >= 2, "a chunk's warp maxima are read before the next chunk's last barrier rewrites them");
    DYNAMIC_SHARED(float, rows);
    const int u = blockIdx.y, backward = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const long f0 = m.frame_off[u];
    const int T = (int)(m.frame_off[u + 1] - f0);
    const long* lab = m.labels + m.label_off[u];
    const int L = 2 * (int)(m.label_off[u + 1] - m.label_off[u]) + 1;
    if (T == 0) {
        if (!backward && tid == 0) losses[u] = 0.0f;
        return;
    }
    float* out = (backward ? beta : alpha) + m.state_off[u];
    float* offsets = (backward ? beta_offsets : alpha_offsets) + f0;
    float* prev = rows;
    float* cur = rows + L;
    float* warp_peaks = rows + 2 * L;
    double offset = 0.0;  // of the frame being computed, kept exactly (its float goes out)
    // This thread's states s = tid + j * nt, their tokens, and whether each may skip (alpha:
    // from s - 2; beta: to s + 2).
    int tok[SLOTS];
    bool skip[SLOTS];
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
        const int s = tid + j * nt;
        tok[j] = s < L ? ext_token(lab, s, m.blank) : 0;
        skip[j] = s < L && (backward ? (s + 2 < L && can_skip(lab, s + 2, m.blank)) : can_skip(lab, s, m.blank));
    }
    // Emission of this thread's slot j at step i (frame i forward, T - 1 - i backward).
    auto emission = [&](int i, int j) {
        const long f = f0 + (backward ? T - 1 - i : i);
        return (i < T && tid + j * nt < L) ? logits[f * m.vocab + tok[j]] - lse[f] : 0.0f;
    };
    float now[CHUNK][SLOTS], next[CHUNK][SLOTS];
#pragma unroll
    for (int k = 0; k < CHUNK; ++k)
#pragma unroll
        for (int j = 0; j < SLOTS; ++j) now[k][j] = emission(k, j);
    for (int i0 = 0; i0 < T; i0 += CHUNK) {
#pragma unroll
        for (int k = 0; k < CHUNK; ++k)
#pragma unroll
            for (int j = 0; j < SLOTS; ++j) next[k][j] = emission(i0 + CHUNK + k, j);
        // The previous chunk's peak, taken out of this chunk's first frame.
        float shift = 0.0f;
        if (i0 > 0) {
            float chunk_peak = -INFINITY;
            for (int w = 0; w < nt / 32; ++w) chunk_peak = fmaxf(chunk_peak, warp_peaks[w]);
            shift = chunk_peak == -INFINITY ? 0.0f : chunk_peak;
            offset += shift;
        }
#pragma unroll
        for (int k = 0; k < CHUNK; ++k) {
            const int i = i0 + k;
            if (i >= T) break;  // the same for every thread: no barrier is skipped by some only
            const long t = backward ? T - 1 - i : i;
            float peak = -INFINITY;
#pragma unroll
            for (int j = 0; j < SLOTS; ++j) {
                const int s = tid + j * nt;
                if (s >= L) break;
                float v;
                if (i == 0) {
                    v = backward ? (s >= L - 2 ? 0.0f : -INFINITY) : (s < 2 ? 0.0f : -INFINITY);
                } else if (backward) {
                    v = log_add3_fast(prev[s], s + 1 < L ? prev[s + 1] : -INFINITY, skip[j] ? prev[s + 2] : -INFINITY);
                } else {
                    v = log_add3_fast(prev[s], s >= 1 ? prev[s - 1] : -INFINITY, skip[j] ? prev[s - 2] : -INFINITY);
                }
                v += now[k][j] - (k == 0 ? shift : 0.0f);
                peak = fmaxf(peak, v);
                cur[s] = v;
                out[t * L + s] = v;
            }
            if (tid == 0) offsets[t] = (float)offset;
            if (k == CHUNK - 1) {
                peak = warp_max(peak);
                if (tid % 32 == 0) warp_peaks[tid / 32] = peak;
            }
            __syncthreads();  // cur complete before it becomes prev; prev's readers done before it is overwritten
            float* tmp = prev;
            prev = cur;
            cur = tmp;
        }
#pragma unroll
        for (int k = 0; k < CHUNK; ++k)
#pragma unroll
            for (int j = 0; j < SLOTS; ++j) now[k][j] = next[k][j];
    }
    if (!backward && tid == 0) {
        const float log_p = L > 1 ? log_add(prev[L - 1], prev[L - 2]) : prev[0];
        losses[u] = log_p == -INFINITY ? (zero_inf ? 0.0f : INFINITY) : (float)(-(log_p + offset));
    }
}

// States per thread 1, 2, 4 (src/backend/cuda/ctc.rs picks by the longest transcript): always
// 32 registers of emissions in flight.
#define CTC_RECURSIONS(name, slots, chunk)                                                                                 \
    extern "C" __global__ void __launch_bounds__(1024) name(const float* logits, const float* lse, CtcMeta m, float* alpha,   \
                                                            float* beta, float* alpha_offsets, float* beta_offsets, int zero_inf, \
                                                            float* losses) {                                                  \
        ctc_recursion<slots, chunk>(logits, lse, m, alpha, beta, alpha_offsets, beta_offsets, zero_inf, losses);            \
    }
CTC_RECURSIONS(ctc_recursions_s1, 1, 16)
CTC_RECURSIONS(ctc_recursions_s2, 2, 8)
CTC_RECURSIONS(ctc_recursions_s4, 4, 4)

// One warp per frame: grad[t][k] = (softmax[t][k] - sum of the occupancies of k's states) * scale.
extern "C" __global__ void ctc_grad(const float* logits, CtcMeta m, const float* lse, const float* alpha, const float* beta,
                                    const float* alpha_offsets, const float* beta_offsets, int zero_inf, float scale, float* grad) {
    const int u = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long f0 = m.frame_off[u];
    const int T = (int)(m.frame_off[u + 1] - f0), t = blockIdx.x * (blockDim.x / 32) + warp;
    if (t >= T) return;
    const int S = (int)(m.label_off[u + 1] - m.label_off[u]), L = 2 * S + 1;
    const long base = m.state_off[u], row_t = base + (long)t * L, last = base + (long)(T - 1) * L;
    // log p relative to the last frame's alpha offset; then each occupancy's exponent is the
    // stored alpha and beta plus one per-frame term.
    const float log_p = L > 1 ? log_add(alpha[last + L - 1], alpha[last + L - 2]) : alpha[last];
    float* g = grad + (f0 + t) * m.vocab;
    if (log_p == -INFINITY) {  // no alignment: zero_infinity gives 0; otherwise the host reports it
        for (int k = lane; k < m.vocab; k += 32) g[k] = zero_inf ? 0.0f : NAN;
        return;
    }
    const float z = lse[f0 + t];
    const float* row = logits + (f0 + t) * m.vocab;
    const long* lab = m.labels + m.label_off[u];
    const float frame_term = (float)((double)alpha_offsets[f0 + t] + beta_offsets[f0 + t] - alpha_offsets[f0 + T - 1] - log_p);
    auto occupancy = [&](int s) {
        const float o = alpha[row_t + s] + beta[row_t + s] - (row[ext_token(lab, s, m.blank)] - z) + frame_term;
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
