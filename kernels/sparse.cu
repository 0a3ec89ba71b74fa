// Linear layers that skip dropped weights: y = act(x · Wᵀ + b) with W stored without its zeros,
// in the layout the CPU's sparse product reads (src/backend/cpu/sparse.rs): the input features
// cut into panels of SP_PANEL; per panel, CSR over the output rows (row_start[p * (d_out + 1) + o]
// .. [.. + o + 1] index cols (u16, within the panel) and vals).
//
// One block computes SP_FRAMES frames x SP_ROWS output rows. Per panel, the block stages its
// frames' inputs transposed in shared memory (a feature's frames contiguous, one per lane); each
// warp walks its rows' kept weights 32 at a time (one coalesced load of indices and values, then
// broadcast by shuffles), every lane accumulating one frame. Work and bytes scale with the kept
// weights; the dense GEMM's tensor cores are not used, so this pays where the product is
// memory-bound (few frames) and the mask is sparse. The outputs are staged through shared memory
// so every row of y is written coalesced.
// Split over panels (few frames: the blocks alone would leave SMs idle; src/backend/cuda/split_k.rs):
// with panels_per_split > 0, block z takes that many panels from panel z * panels_per_split and
// writes its raw sums (the host passes no bias, identity) to slab z of y, [z][n][d_out]; the
// GEMMs' gemm_split_sum then adds the slabs in order and applies bias and activation.
#include "common.cuh"

constexpr int SP_PANEL = 256;   // src/backend/cpu/sparse.rs PANEL: the layout's panel width
constexpr int SP_FRAMES = 32;   // one frame per lane
constexpr int SP_ROWS = 64;
constexpr int SP_WARPS = 8;
constexpr int SP_ROWS_PER_WARP = SP_ROWS / SP_WARPS;

__device__ __forceinline__ float value_f32(float v) { return v; }
__device__ __forceinline__ float value_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename V>
__device__ void sparse_linear(const float* __restrict__ x, const uint32_t* __restrict__ row_start, const uint16_t* __restrict__ cols,
                              const V* __restrict__ vals, const float* __restrict__ bias, float* __restrict__ y, int n, int d_in,
                              int d_out, int act, int panels_per_split) {
    // xs[c * (SP_FRAMES + 1) + f]: padded so the transposing stores and the per-lane loads are
    // both free of bank conflicts.
    __shared__ float xs[SP_PANEL * (SP_FRAMES + 1)];
    __shared__ float ys[SP_FRAMES][SP_ROWS + 1];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int f0 = blockIdx.y * SP_FRAMES, o0 = blockIdx.x * SP_ROWS;
    const int frames = min(SP_FRAMES, n - f0);
    float acc[SP_ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < SP_ROWS_PER_WARP; ++r) acc[r] = 0.0f;
    const int panels = (d_in + SP_PANEL - 1) / SP_PANEL;
    const int p_begin = panels_per_split > 0 ? blockIdx.z * panels_per_split : 0;
    const int p_end = panels_per_split > 0 ? min(panels, p_begin + panels_per_split) : panels;
    y += (long)blockIdx.z * n * d_out;
    const int ow = o0 + warp * SP_ROWS_PER_WARP;  // the warp's first row
    // s + the products of up to 32 kept weights (lane j holds column c and value v of the j-th)
    // with each lane's frame.
    auto fold = [&](int c, float v, int count, float s) {
        for (int j = 0; j < count; ++j) s = fmaf(__shfl_sync(0xffffffffu, v, j), xs[__shfl_sync(0xffffffffu, c, j) * (SP_FRAMES + 1) + lane], s);
        return s;
    };
    for (int p = p_begin; p < p_end; ++p) {
        const int c0 = p * SP_PANEL, width = min(SP_PANEL, d_in - c0);
        // Before the staging (whose latency they share): the warp's row bounds in one load (lane
        // r: where row ow + r starts; lane SP_ROWS_PER_WARP: where the last ends), then every
        // row's first 32 kept weights, all in flight together instead of a round trip per row.
        const uint32_t* rs = row_start + (long)p * (d_out + 1);
        const uint32_t bound = (lane <= SP_ROWS_PER_WARP && ow + lane <= d_out) ? rs[ow + lane] : 0u;
        int first_c[SP_ROWS_PER_WARP];
        float first_v[SP_ROWS_PER_WARP];
#pragma unroll
        for (int r = 0; r < SP_ROWS_PER_WARP; ++r) {
            const uint32_t a = __shfl_sync(0xffffffffu, bound, r), b = __shfl_sync(0xffffffffu, bound, r + 1), k = a + lane;
            const bool in = ow + r < d_out && k < b;
            first_c[r] = in ? cols[k] : 0;
            first_v[r] = in ? value_f32(vals[k]) : 0.0f;
        }
        __syncthreads();  // the previous panel's reads are done
        for (int e = threadIdx.x; e < SP_FRAMES * SP_PANEL; e += blockDim.x) {
            const int f = e / SP_PANEL, c = e % SP_PANEL;
            xs[c * (SP_FRAMES + 1) + f] = (f < frames && c < width) ? x[(long)(f0 + f) * d_in + c0 + c] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < SP_ROWS_PER_WARP; ++r) {
            if (ow + r >= d_out) continue;  // uniform over the warp
            const uint32_t a = __shfl_sync(0xffffffffu, bound, r), b = __shfl_sync(0xffffffffu, bound, r + 1);
            float s = fold(first_c[r], first_v[r], min(32u, b - a), 0.0f);
            for (uint32_t k0 = a + 32; k0 < b; k0 += 32) {
                const uint32_t k = k0 + lane;
                const bool in = k < b;
                s = fold(in ? cols[k] : 0, in ? value_f32(vals[k]) : 0.0f, min(32u, b - k0), s);
            }
            acc[r] += s;  // per panel, as the CPU adds each panel's sum
        }
    }
#pragma unroll
    for (int r = 0; r < SP_ROWS_PER_WARP; ++r) ys[lane][warp * SP_ROWS_PER_WARP + r] = acc[r];
    __syncthreads();
    const int rows = min(SP_ROWS, d_out - o0);
    for (int e = threadIdx.x; e < SP_FRAMES * SP_ROWS; e += blockDim.x) {
        const int f = e / SP_ROWS, r = e % SP_ROWS;
        if (f < frames && r < rows) {
            float v = ys[f][r] + (bias ? bias[o0 + r] : 0.0f);
            y[(long)(f0 + f) * d_out + o0 + r] = apply_act(v, act);
        }
    }
}

extern "C" __global__ void __launch_bounds__(SP_WARPS * 32)
    sparse_linear_f32(const float* x, const uint32_t* row_start, const uint16_t* cols, const float* vals, const float* bias, float* y,
                      int n, int d_in, int d_out, int act, int panels_per_split) {
    sparse_linear(x, row_start, cols, vals, bias, y, n, d_in, d_out, act, panels_per_split);
}

extern "C" __global__ void __launch_bounds__(SP_WARPS * 32)
    sparse_linear_bf16(const float* x, const uint32_t* row_start, const uint16_t* cols, const __nv_bfloat16* vals, const float* bias,
                       float* y, int n, int d_in, int d_out, int act, int panels_per_split) {
    sparse_linear(x, row_start, cols, vals, bias, y, n, d_in, d_out, act, panels_per_split);
}
