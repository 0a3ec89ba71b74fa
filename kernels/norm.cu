// Normalisations and elementwise ops over row-major [rows, c] activations.
#include "common.cuh"

// layer_norm: one warp per row, two-pass mean and variance in fp32, optional residual added
// first, optional GELU after. version 1. Training's form: x dropped first (p > 0: the CPU's
// masks, element index row * c + i, the product rounded on its own as the separate dropout
// pass rounds it), and the sum x + residual kept in `sum` (the layer norm's backward input).
extern "C" __global__ void layer_norm(const float* x, const float* residual, const float* gamma, const float* beta, float* out,
                                      int rows, int c, float eps, int act, float* sum, float p, unsigned long long site_key) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + (long)row * c;
    const float* rr = residual ? residual + (long)row * c : nullptr;
    float* o = out + (long)row * c;
    float* t = sum ? sum + (long)row * c : o;  // the sum, kept or in the output until normalised
    float s = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float xi = p > 0.0f ? __fmul_rn(xr[i], dropout_factor(p, site_key, (unsigned long long)(row * (long)c + i))) : xr[i];
        float v = xi + (rr ? rr[i] : 0.0f);
        t[i] = v;
        s += v;
    }
    float mean = warp_sum(s) / c;
    float q = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float d = t[i] - mean;
        q += d * d;
    }
    float inv = rsqrtf(warp_sum(q) / c + eps);
    for (int i = lane; i < c; i += 32) o[i] = apply_act((t[i] - mean) * inv * gamma[i] + beta[i], act);
}

// Where group_norm_time reads its input: `x`, or, when `audio` is set, the first conv of a
// group-norm feature encoder (one input channel, no groups) computed on the fly from the raw
// audio. That conv costs `kernel` multiply-adds per value, far less than storing its
// 512-channel output (786 MB for 8 x 15 s, the model's largest activation) and reading it back
// in every pass.
struct NormSource {
    const float* x;
    const float* audio;      // null: read x
    const int* in_offsets;   // per utterance, into audio
    const void* w;           // [c, kernel], f32 or bf16 (w_bf16)
    const float* bias;       // may be null
    int kernel, stride, pad, w_bf16;
};
constexpr int MAX_SOURCE_TAPS = 16;  // the host falls back to conv1d + group_norm_time above this

// The conv's value at frame t of an utterance whose audio starts at `in` and holds `t_in`
// samples, for the channel whose taps are `w` (zero padding outside the utterance).
__device__ __forceinline__ float conv_value(const NormSource& s, const float* w, float bias, int t, const float* in, int t_in) {
    float acc = 0.0f;
    int base = t * s.stride - s.pad;
#pragma unroll
    for (int k = 0; k < MAX_SOURCE_TAPS; ++k) {
        int i = base + k;
        if (k < s.kernel && i >= 0 && i < t_in) acc = fmaf(w[k], in[i], acc);
    }
    return acc + bias;
}

// group_norm_time: GroupNorm with one group per channel, per utterance of a packed batch, from
// `src` into `out`, in three passes over the same grid of (32-channel tile, utterance, chunk of
// `chunk_rows` frames) blocks of 32 x 8 threads, so even one long utterance spreads over
// thousands of blocks:
//   pass 0: per-channel sums, pass 1: sums of squared deviations from the mean (two-pass
//   variance), both accumulated in double (block partials, then atomics into stats[2][utts][c]);
//   pass 2: normalise into `out` (fp32, or bf16 when out_bf16: the operand of the next conv's
//   tensor-core GEMM), with an optional GELU.
// version 3 (version 2 ran in place on a copy of x; version 1, one block per 32 channels of a
// whole utterance, read at ~150 GB/s).
extern "C" __global__ void group_norm_time(NormSource src, void* out, const int* offsets, double* stats, const float* gamma, const float* beta,
                                           int c, int utts, float eps, int act, int pass, int chunk_rows, int out_bf16) {
    __shared__ double red[8][33];
    int u = blockIdx.y, tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    int ch = blockIdx.x * 32 + tx;
    int start = offsets[u], end = offsets[u + 1];
    int r0 = start + blockIdx.z * chunk_rows;
    if (r0 >= end) return;
    int r1 = min(end, r0 + chunk_rows);
    // The conv source's taps and bias for this thread's channel, in registers.
    float w[MAX_SOURCE_TAPS] = {}, bias = 0.0f;
    const float* in = nullptr;
    int t_in = 0;
    if (src.audio && ch < c) {
#pragma unroll
        for (int k = 0; k < MAX_SOURCE_TAPS; ++k) {  // constant indices keep w in registers
            long i = (long)ch * src.kernel + k;
            if (k < src.kernel)
                w[k] = src.w_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(src.w)[i]) : static_cast<const float*>(src.w)[i];
        }
        bias = src.bias ? src.bias[ch] : 0.0f;
        in = src.audio + src.in_offsets[u];
        t_in = src.in_offsets[u + 1] - src.in_offsets[u];
    }
    auto value = [&](int r) { return src.audio ? conv_value(src, w, bias, r - start, in, t_in) : src.x[(long)r * c + ch]; };
    double n = end - start;
    double* sum = stats + (long)u * c;
    double* sq = stats + (long)(utts + u) * c;
    double mean = (pass > 0 && ch < c) ? sum[ch] / n : 0.0;
    if (pass == 2) {
        if (ch >= c) return;
        float scale = (float)(1.0 / sqrt(sq[ch] / n + (double)eps)) * gamma[ch];
        float shift = beta[ch] - (float)mean * scale;
        for (int r = r0 + ty; r < r1; r += 8) {
            float v = apply_act(value(r) * scale + shift, act);
            if (out_bf16)
                static_cast<__nv_bfloat16*>(out)[(long)r * c + ch] = __float2bfloat16(v);
            else
                static_cast<float*>(out)[(long)r * c + ch] = v;
        }
        return;
    }
    double acc = 0.0;
    if (ch < c)
        for (int r = r0 + ty; r < r1; r += 8) {
            double v = value(r);
            acc += pass == 0 ? v : (v - mean) * (v - mean);
        }
    red[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && ch < c) {
        double total = 0.0;
        for (int i = 0; i < 8; ++i) total += red[i][tx];
        atomicAdd(pass == 0 ? sum + ch : sq + ch, total);
    }
}

extern "C" __global__ void add(const float* a, const float* b, float* out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) out[i] = a[i] + b[i];
}

// log_softmax over rows: one warp per row.
extern "C" __global__ void log_softmax(const float* x, float* out, int rows, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + (long)row * c;
    float m = -INFINITY;
    for (int i = lane; i < c; i += 32) m = fmaxf(m, xr[i]);
    m = warp_max(m);
    float s = 0.0f;
    for (int i = lane; i < c; i += 32) s += expf(xr[i] - m);
    float lse = m + logf(warp_sum(s));
    for (int i = lane; i < c; i += 32) out[(long)row * c + i] = xr[i] - lse;
}


// Fills x with v (tests poison outputs with NaN so unwritten elements show).
extern "C" __global__ void fill_f32(float* x, float v, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) x[i] = v;
}

// fp32 -> bf16 (round to nearest even): GEMM operands for the tensor-core path.
extern "C" __global__ void to_bf16(const float* x, __nv_bfloat16* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) y[i] = __float2bfloat16(x[i]);
}
