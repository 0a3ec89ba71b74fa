// Training kernels: the backward pass of the ops between the CTC loss and the trainable tensors,
// dropout with the CPU's counter-based masks, and S3-Router's per-matrix top-k of the scores
// written straight into packed mask bits. Each mirrors a CPU reference in
// src/backend/cpu/{grad,backward}.rs and is checked against it by tests/cuda.rs.
//
// gemm_strided_f32: version 1. C[z](m, n) = alpha * sum_k A[z](m, k) * B[z](k, n) * M(k, n) with
//   any element strides on A and B (transposed operands, per-head views of packed q/k/v, the
//   attention matrices), fp32 FMA; 64x64 tiles, BK 16, 256 threads with 4x4 outputs each, each
//   tile loaded along whichever dimension is contiguous so global reads coalesce. The optional
//   mask is packed bits over B's elements (a weight in [out, in] layout read as k = out).
#include "common.cuh"

struct StridedGemm {
    const float* a; long a_sm, a_sk, batch_a;
    const float* b; long b_sk, b_sn, batch_b;
    const uint8_t* mask;  // bits at B's element offsets; may be null
    float* c; long ldc, batch_c;
    int m, n, k;
    float alpha;
    int accumulate;  // 1: C += alpha * A·B (sums over utterances)
    const float* st_w; const float* st_s;  // may be null: else C times straight_through(st_w, st_s) (batch 1, C's layout)
};

// Element i of a tile's loading (BM x BK of A at (m0, k0), BK x BN of B at (k0, n0)), indexed
// along whichever dimension of each operand is contiguous so a warp's reads coalesce: where it
// goes in the tile and its value (0 outside the matrices or where B's mask drops it).
struct TileElements {
    int ar, ak;
    float a;
    int bk, bc;
    float b;
};
template <int BM, int BN, int BK>
__device__ __forceinline__ TileElements tile_elements(const StridedGemm& p, const float* A, const float* B, int m0, int n0, int k0, int i) {
    TileElements e;
    const bool a_k_contig = p.a_sk == 1, b_n_contig = p.b_sn == 1;
    e.ar = a_k_contig ? i / BK : i % BM;
    e.ak = a_k_contig ? i % BK : i / BM;
    const int gm = m0 + e.ar, gk = k0 + e.ak;
    e.a = (gm < p.m && gk < p.k) ? A[gm * p.a_sm + gk * p.a_sk] : 0.0f;
    e.bc = b_n_contig ? i % BN : i / BK;
    e.bk = b_n_contig ? i / BN : i % BK;
    const int gn = n0 + e.bc, gbk = k0 + e.bk;
    e.b = 0.0f;
    if (gn < p.n && gbk < p.k) {
        const long off = gbk * p.b_sk + gn * p.b_sn;
        e.b = (p.mask && !mask_bit(p.mask, off)) ? 0.0f : B[off];
    }
    return e;
}

// C(gm, gn) of a strided GEMM from its accumulator: alpha, the accumulation into C and the
// straight-through factor applied.
__device__ __forceinline__ void strided_store(const StridedGemm& p, float* C, int gm, int gn, float acc) {
    long o = (long)gm * p.ldc + gn;
    float v = p.alpha * acc + (p.accumulate ? C[o] : 0.0f);
    C[o] = p.st_w ? v * straight_through(p.st_w[o], p.st_s[o]) : v;
}

extern "C" __global__ void __launch_bounds__(256) gemm_strided_f32(StridedGemm p) {
    using namespace fp32_tile;
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    const int z = blockIdx.z;
    const float* A = p.a + z * p.batch_a;
    const float* B = p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int ty = t / 16, tx = t % 16;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < p.k; k0 += BK) {
        for (int i = t; i < BM * BK; i += 256) {
            const TileElements e = tile_elements<BM, BN, BK>(p, A, B, m0, n0, k0, i);
            As[e.ak][e.ar] = e.a;
            Bs[e.bk][e.bc] = e.b;
        }
        __syncthreads();
        fma_tile_4x4(As, Bs, ty, tx, acc);
        __syncthreads();
    }
    float* C = p.c + z * p.batch_c;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int gm = m0 + ty * 4 + i;
        if (gm >= p.m) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int gn = n0 + tx * 4 + j;
            if (gn < p.n) strided_store(p, C, gm, gn, acc[i][j]);
        }
    }
}

// gemm_strided_bf16: version 1, the bf16 precision's gemm_strided_f32 (same arguments, same
// result up to bf16 rounding of the operands): tiles staged through the same coalesced loader,
// rounded to bf16 in shared memory, multiplied on tensor cores by WMMA 16x16x16 fragments with
// fp32 accumulation. 64x64 tiles, BK 32, 8 warps of 16x32 outputs each; the epilogue stages
// each fragment through shared memory to apply alpha, accumulation and the straight-through
// product exactly as the fp32 kernel does.
extern "C" __global__ void __launch_bounds__(256) gemm_strided_bf16(StridedGemm p) {
    using namespace nvcuda;
    constexpr int BM = 64, BN = 64, BK = 32, LD = BK + 8;  // 80-byte rows: fragment loads stay 32-byte aligned
    __shared__ __align__(32) __nv_bfloat16 As[BM * LD];   // [m][k]
    __shared__ __align__(32) __nv_bfloat16 Bs[BN * LD];   // [n][k]: B column-major for matrix_b
    __shared__ __align__(32) float Cs[8][16 * 16];         // a fragment per warp on its way out
    const int z = blockIdx.z;
    const float* A = p.a + z * p.batch_a;
    const float* B = p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int warp = t / 32, lane = t % 32, wm = (warp / 2) * 16, wn = (warp % 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    for (int k0 = 0; k0 < p.k; k0 += BK) {
        for (int i = t; i < BM * BK; i += 256) {
            const TileElements e = tile_elements<BM, BN, BK>(p, A, B, m0, n0, k0, i);
            As[e.ar * LD + e.ak] = __float2bfloat16(e.a);
            Bs[e.bc * LD + e.bk] = __float2bfloat16(e.b);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
            wmma::load_matrix_sync(fa, As + wm * LD + kk, LD);
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
                wmma::load_matrix_sync(fb, Bs + (wn + j * 16) * LD + kk, LD);
                wmma::mma_sync(acc[j], fa, fb, acc[j]);
            }
        }
        __syncthreads();
    }
    float* C = p.c + z * p.batch_c;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(Cs[warp], acc[j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
            int gm = m0 + wm + e / 16, gn = n0 + wn + j * 16 + e % 16;
            if (gm < p.m && gn < p.n) strided_store(p, C, gm, gn, Cs[warp][e]);
        }
        __syncwarp();
    }
}

// gemm_strided_tf32x3: version 1, the fp32 precision's gemm_strided_f32 on tensor cores with
// fp32 accuracy (3xTF32, as gemm_tf32x3 in gemm.cu): tiles staged through the same coalesced
// loader into fp32 [m][k] and [n][k] rows of 36 floats (conflict-free fragment loads), each
// operand split into its TF32 parts as its fragment is loaded, three mma.sync m16n8k8 per
// product. 64x64 tiles, BK 32, 8 warps of 16x32 outputs each, written from the accumulators.
extern "C" __global__ void __launch_bounds__(256) gemm_strided_tf32x3(StridedGemm p) {
    constexpr int BM = 64, BN = 64, BK = 32, LD = BK + 4;
    __shared__ float As[BM * LD];  // [m][k]
    __shared__ float Bs[BN * LD];  // [n][k]
    const int z = blockIdx.z;
    const float* A = p.a + z * p.batch_a;
    const float* B = p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4, wm = (warp / 2) * 16, wn = (warp % 2) * 32;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < p.k; k0 += BK) {
        for (int i = t; i < BM * BK; i += 256) {
            const TileElements e = tile_elements<BM, BN, BK>(p, A, B, m0, n0, k0, i);
            As[e.ar * LD + e.ak] = e.a;
            Bs[e.bc * LD + e.bk] = e.b;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned ab[4], as[4];  // rows g (a0, a2) and g + 8 (a1, a3), columns tq (a0, a1) and tq + 4
#pragma unroll
            for (int i = 0; i < 4; ++i) split_tf32(As[(wm + g + (i & 1) * 8) * LD + kk + tq + (i >> 1) * 4], ab[i], as[i]);
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) {
                unsigned bb[2], bs[2];  // column g, rows tq (b0) and tq + 4 (b1)
#pragma unroll
                for (int h = 0; h < 2; ++h) split_tf32(Bs[(wn + nj * 8 + g) * LD + kk + tq + h * 4], bb[h], bs[h]);
                mma_tf32x3(acc[nj], ab, as, bb, bs);
            }
        }
        __syncthreads();
    }
    float* C = p.c + z * p.batch_c;
#pragma unroll
    for (int nj = 0; nj < 4; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int gm = m0 + wm + g + (e / 2) * 8, gn = n0 + wn + nj * 8 + tq * 2 + e % 2;
            if (gm < p.m && gn < p.n) strided_store(p, C, gm, gn, acc[nj][e]);
        }
}

// ---- dropout (dropout_factor in common.cuh) --------------------------------------------------

// site_key = mix(seed ^ site * golden), computed once on the host.
extern "C" __global__ void dropout_f32(const float* x, float* out, long n, float p, unsigned long long site_key) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = x[i] * dropout_factor(p, site_key, (unsigned long long)i);
}

// ---- elementwise -----------------------------------------------------------------------------

// GELU, then (p > 0) dropout of the result: the two passes of the CPU in one, the same values;
// into f32, or bf16 for an activation only bf16 GEMMs read.
template <class T>
__device__ __forceinline__ void gelu_dropped(const float* x, T* y, long n, float p, unsigned long long site_key) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = gelu_erf(x[i]);
        store_as(y + i, p > 0.0f ? g * dropout_factor(p, site_key, (unsigned long long)i) : g);
    }
}
extern "C" __global__ void gelu_f32(const float* x, float* y, long n, float p, unsigned long long site_key) {
    gelu_dropped(x, y, n, p, site_key);
}
extern "C" __global__ void gelu_bf16(const float* x, __nv_bfloat16* y, long n, float p, unsigned long long site_key) {
    gelu_dropped(x, y, n, p, site_key);
}

// (dy * dropout factor) * (Phi(x) + x phi(x)), Phi through erfc as the CPU computes it; into
// f32, or bf16 for a gradient only bf16 GEMMs (and a bias's column sum) read.
template <class T>
__device__ __forceinline__ void gelu_grad_dropped(const float* dy, const float* x, T* out, long n, float p, unsigned long long site_key) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = x[i], d = p > 0.0f ? dy[i] * dropout_factor(p, site_key, (unsigned long long)i) : dy[i];
        store_as(out + i, d * (0.5f * erfcf(-v * 0.70710678118654752440f) + v * 0.3989423f * expf(-0.5f * v * v)));
    }
}
extern "C" __global__ void gelu_grad_f32(const float* dy, const float* x, float* out, long n, float p, unsigned long long site_key) {
    gelu_grad_dropped(dy, x, out, n, p, site_key);
}
extern "C" __global__ void gelu_grad_bf16(const float* dy, const float* x, __nv_bfloat16* out, long n, float p, unsigned long long site_key) {
    gelu_grad_dropped(dy, x, out, n, p, site_key);
}

// dy where ReLU's output y > 0, else 0 (MMS's adapters; never dropped: p is unused).
extern "C" __global__ void relu_grad_f32(const float* dy, const float* y, float* out, long n, float p, unsigned long long site_key) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        out[i] = y[i] > 0.0f ? dy[i] : 0.0f;
    }
}

// ---- column reductions (bias, layer-norm parameters, the time-mask embedding) ------------------
// Deterministic (no atomics) and accumulated in f64, as the CPU sums, in two launches. One block
// per 32 columns walking every row (the first version) kept 24 blocks busy for 768 columns, each
// warp waiting on its loads in turn: ~0.1-0.3 ms a sum by that count, and a finetuning step takes
// ~100 of them (biases, layer norms). Now:
// 1. block (x, y), 256 threads = 32 columns x 8 row lanes, sums rows COLUMN_CHUNK y .. of columns
//    32 x .. for each of its N quantities into partials[(i * gridDim.y + y) * c + column];
// 2. column_partials_sum adds a column's chunks in order and writes the fp32 result.
constexpr int COLUMN_CHUNK = 128;  // rows per block (src/backend/cuda/backward.rs: the same)

__device__ __forceinline__ double reduce_lanes(double v, double (&red)[8][32], int ty, int tx) {
    red[ty][tx] = v;
    __syncthreads();
    double total = 0.0;
    if (ty == 0)
        for (int i = 0; i < 8; ++i) total += red[i][tx];
    return total;
}

// Pass 1 over the rows of this block's chunk: `add(r, ch, acc)` adds row r's terms of column ch.
template <int N, class Add>
__device__ __forceinline__ void column_partials(Add add, double* partials, int rows, int c) {
    __shared__ double red[8][32];
    const int tx = threadIdx.x % 32, ty = threadIdx.x / 32, ch = blockIdx.x * 32 + tx;
    const int r0 = (int)blockIdx.y * COLUMN_CHUNK, r1 = min(rows, r0 + COLUMN_CHUNK);
    double acc[N] = {};
    if (ch < c)
#pragma unroll 4
        for (int r = r0 + ty; r < r1; r += 8) add(r, ch, acc);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const double total = reduce_lanes(acc[i], red, ty, tx);
        if (ty == 0 && ch < c) partials[((long)i * gridDim.y + blockIdx.y) * c + ch] = total;
        __syncthreads();
    }
}

// Pass 2: out[ch] = the sum of the chunks' partials of column ch, in chunk order.
extern "C" __global__ void column_partials_sum(const double* partials, float* out, int chunks, int c) {
    for (int ch = blockIdx.x * blockDim.x + threadIdx.x; ch < c; ch += gridDim.x * blockDim.x) {
        double total = 0.0;
        for (int y = 0; y < chunks; ++y) total += partials[(long)y * c + ch];
        out[ch] = (float)total;
    }
}

// Column sums of an f32 or bf16 [rows, c] matrix.
template <class T>
__device__ __forceinline__ void column_sum(const T* x, double* partials, int rows, int c) {
    column_partials<1>([&](int r, int ch, double (&acc)[1]) { acc[0] += load_as(x + (long)r * c + ch); }, partials, rows, c);
}
extern "C" __global__ void column_sum_f32(const float* x, double* partials, int rows, int c) { column_sum(x, partials, rows, c); }
extern "C" __global__ void column_sum_bf16(const __nv_bfloat16* x, double* partials, int rows, int c) { column_sum(x, partials, rows, c); }

// Layer-norm backward, one warp per row: the row's mean and 1/std recomputed (two passes, as the
// forward), dx = inv/C * (C*g - sum(g) - xhat*sum(g*xhat)) with g = dy*gamma; the statistics are
// kept for the parameter gradients.
extern "C" __global__ void layer_norm_grad_f32(const float* dy, const float* x, const float* gamma, float eps, float* dx, float2* stats,
                                               int rows, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + (long)row * c;
    const float* dr = dy + (long)row * c;
    float s = 0.0f;
    for (int i = lane; i < c; i += 32) s += xr[i];
    float mean = warp_sum(s) / c;
    float v = 0.0f;
    for (int i = lane; i < c; i += 32) v += (xr[i] - mean) * (xr[i] - mean);
    float inv = rsqrtf(warp_sum(v) / c + eps);
    float sg = 0.0f, sgx = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float g = dr[i] * gamma[i];
        sg += g;
        sgx += g * (xr[i] - mean) * inv;
    }
    sg = warp_sum(sg);
    sgx = warp_sum(sgx);
    for (int i = lane; i < c; i += 32) {
        float g = dr[i] * gamma[i], xh = (xr[i] - mean) * inv;
        dx[(long)row * c + i] = inv / c * (c * g - sg - xh * sgx);
    }
    if (lane == 0) stats[row] = make_float2(mean, inv);
}

// dgamma (partials 0) and dbeta (1) from the statistics layer_norm_grad_f32 kept.
extern "C" __global__ void layer_norm_param_grad_f32(const float* dy, const float* x, const float2* stats, double* partials, int rows,
                                                     int c) {
    column_partials<2>(
        [&](int r, int ch, double (&acc)[2]) {
            const float2 st = stats[r];
            const double d = dy[(long)r * c + ch];
            acc[0] += d * ((x[(long)r * c + ch] - st.x) * st.y);
            acc[1] += d;
        },
        partials, rows, c);
}

// ---- SpecAugment on packed features ----------------------------------------------------------
// time: one flag per row (null: none); channels: flags per (utterance, channel) (null: none);
// row_utt: the utterance of each row.

extern "C" __global__ void mask_features_f32(const float* x, float* out, long rows, int c, const uint8_t* time, const float* embedding,
                                             const uint8_t* channels, const int* row_utt) {
    long n = rows * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / c;
        int ch = (int)(i - r * c);
        float v = (time && time[r]) ? embedding[ch] : x[i];
        out[i] = (channels && channels[(long)row_utt[r] * c + ch]) ? 0.0f : v;
    }
}

// The embedding's gradient: dy summed over time-masked rows, except channels masked after it.
extern "C" __global__ void embedding_grad_f32(const float* dy, const uint8_t* time, const uint8_t* channels, const int* row_utt,
                                              double* partials, int rows, int c) {
    column_partials<1>(
        [&](int r, int ch, double (&acc)[1]) {
            if (time[r] && !(channels && channels[(long)row_utt[r] * c + ch])) acc[0] += dy[(long)r * c + ch];
        },
        partials, rows, c);
}

// The input's gradient: zero where a time mask replaced the row or a channel mask zeroed it.
extern "C" __global__ void mask_features_grad_f32(const float* dy, float* out, long rows, int c, const uint8_t* time,
                                                  const uint8_t* channels, const int* row_utt) {
    long n = rows * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / c;
        int ch = (int)(i - r * c);
        bool masked = (time && time[r]) || (channels && channels[(long)row_utt[r] * c + ch]);
        out[i] = masked ? 0.0f : dy[i];
    }
}

// ---- attention, materialised per utterance (training) ------------------------------------------
// s: [heads, T, T] scores q·k (unscaled) of one utterance whose first packed row is row0.
// Softmax of each row as the CPU's softmax_scaled, kept in s; pd = P * dropout mask (the keys of
// query row r, head h use indices ((r * heads + h) << 24) | j), or a copy of P without dropout.

extern "C" __global__ void attention_softmax_f32(float* s, float* pd, int T, int heads, int row0, float scale, float p,
                                                 unsigned long long site_key) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= heads * T) return;
    int h = row / T, t = row - h * T;
    float* sr = s + (long)row * T;
    float m = -INFINITY;
    for (int j = lane; j < T; j += 32) m = fmaxf(m, sr[j]);
    float shift = warp_max(m) * scale;
    float sum = 0.0f;
    for (int j = lane; j < T; j += 32) {
        float e = expf(sr[j] * scale - shift);
        sr[j] = e;
        sum += e;
    }
    float inv = 1.0f / warp_sum(sum);
    unsigned long long base = ((unsigned long long)(row0 + t) * heads + h) << 24;
    for (int j = lane; j < T; j += 32) {
        float pr = sr[j] * inv;
        sr[j] = pr;
        pd[(long)row * T + j] = p > 0.0f ? pr * dropout_factor(p, site_key, base | j) : pr;
    }
}

// In: p (softmax), g = dO·vᵀ (gradient of the dropped probabilities). Out, in g: dS = P * (dP -
// rowsum(dP * P)) * scale with dP = g * dropout mask.
extern "C" __global__ void attention_softmax_grad_f32(const float* prob, float* g, int T, int heads, int row0, float scale, float p,
                                                      unsigned long long site_key) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= heads * T) return;
    int h = row / T, t = row - h * T;
    const float* pr = prob + (long)row * T;
    float* gr = g + (long)row * T;
    unsigned long long base = ((unsigned long long)(row0 + t) * heads + h) << 24;
    float dot = 0.0f;
    for (int j = lane; j < T; j += 32) {
        float d = p > 0.0f ? gr[j] * dropout_factor(p, site_key, base | j) : gr[j];
        gr[j] = d;
        dot += d * pr[j];
    }
    dot = warp_sum(dot);
    for (int j = lane; j < T; j += 32) gr[j] = pr[j] * (gr[j] - dot) * scale;
}

// ---- positional conv gradients -----------------------------------------------------------------

// The input gradient of a stride-1 conv is the conv of dy with the kernel flipped in time and
// in/out swapped within each group: wf[g*cg + ci, K-1-k, o] = w[g*og + o, k, ci].
extern "C" __global__ void conv_flip_weight_f32(const float* w, float* wf, int c_out, int kernel, int cg, int groups) {
    int og = c_out / groups;
    long n = (long)c_out * kernel * cg;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int ci = (int)(i % cg);
        int k = (int)((i / cg) % kernel);
        int o = (int)(i / ((long)cg * kernel));
        int g = o / og;
        wf[((long)(g * cg + ci) * kernel + (kernel - 1 - k)) * og + (o - g * og)] = w[i];
    }
}

// dW[o, k, ci] = sum over utterances and output frames t of dy[t, o] * x[t - pad + k, g*cg + ci],
// reading only frames of the same utterance (stride 1, output length = input length): the
// positional conv's weight gradient (kernel 128, 16 groups: 56 GFLOP at 8 x 15 s).
//
// Tiled: a block owns TO outputs o of group blockIdx.z and TC (tap, channel) columns, KT taps
// x CI channels, and walks every frame of every utterance in chunks of BT. A chunk's dy rows
// [BT][TO] and the x window its taps meet [BT + KT - 1][CI] (x at frame t + k - pad is window row
// t - t0 + k - k0) are staged in shared memory, zero outside the utterance; each thread keeps 4 x
// 4 accumulators (4 outputs; 4 consecutive channels at one tap), 16 FMAs per two float4 loads
// (a warp's dy load is a broadcast of two addresses, its window load 256 contiguous bytes). Each
// output sums its terms in the order of the one-thread-per-weight kernel this replaced
// (utterances, then frames), with zero terms where that one skipped them.
namespace conv_wgrad {
constexpr int TO = 64, KT = 4, CI = 16, BT = 32, WIN = BT + KT - 1, THREADS = 256;
static_assert((TO / 4) * (KT * CI / 4) == THREADS, "a 4 x 4 tile per thread");
}

extern "C" __global__ void __launch_bounds__(256) conv_weight_grad_f32(const float* dy, const float* x, const int* offsets, int utts, float* dw,
                                                                     int c_in, int c_out, int kernel, int groups, int pad) {
    using namespace conv_wgrad;
    __shared__ __align__(16) float dys[BT][TO];
    __shared__ __align__(16) float xs[WIN][CI];
    const int cg = c_in / groups, og = c_out / groups, ci_tiles = (cg + CI - 1) / CI;
    const int g = blockIdx.z, o0 = blockIdx.y * TO, k0 = (blockIdx.x / ci_tiles) * KT, c0 = (blockIdx.x % ci_tiles) * CI;
    const int t = threadIdx.x, ol = (t / 16) * 4, tap = (t % 16) / 4, cl = (t % 4) * 4;
    float acc[4][4] = {};
    for (int u = 0; u < utts; ++u) {
        const int start = offsets[u], len = offsets[u + 1] - start;
        for (int t0 = 0; t0 < len; t0 += BT) {
            for (int i = t; i < BT * TO; i += THREADS) {
                int r = i / TO, o = o0 + i % TO, f = t0 + r;
                dys[r][i % TO] = (f < len && o < og) ? dy[(long)(start + f) * c_out + g * og + o] : 0.0f;
            }
            for (int i = t; i < WIN * CI; i += THREADS) {
                int r = i / CI, c = c0 + i % CI, f = t0 + r + k0 - pad;
                xs[r][i % CI] = (f >= 0 && f < len && c < cg) ? x[(long)(start + f) * c_in + g * cg + c] : 0.0f;
            }
            __syncthreads();
#pragma unroll 8
            for (int r = 0; r < BT; ++r) {
                const float4 a = *reinterpret_cast<const float4*>(&dys[r][ol]);
                const float4 b = *reinterpret_cast<const float4*>(&xs[r + tap][cl]);
                const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
            }
            __syncthreads();
        }
    }
    const int k = k0 + tap;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int o = o0 + ol + i, ci = c0 + cl + j;
            if (o < og && k < kernel && ci < cg) dw[((long)(g * og + o) * kernel + k) * cg + ci] = acc[i][j];
        }
}

// Input gradient of any 1-D conv, one thread per input element (s, ci) of each utterance:
// dx[s, ci] = sum over taps k with (s + pad - k) = stride * t, 0 <= t < T_out, and the group's
// outputs o of dy[t, o] * w[o, k, ci % cg]. Used for the strided feature-encoder convs.
extern "C" __global__ void conv_input_grad_f32(const float* dy, const float* w, const int* in_off, const int* out_off, const int* row_utt,
                                               float* dx, long rows, int c_in, int c_out, int kernel, int stride, int pad, int groups) {
    int cg = c_in / groups, og = c_out / groups;
    long n = rows * c_in;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long s = i / c_in;
        int ci = (int)(i - s * c_in), g = ci / cg, cl = ci - g * cg;
        int u = row_utt[s];
        int sl = (int)(s - in_off[u]), t_out = out_off[u + 1] - out_off[u];
        float acc = 0.0f;
        for (int k = 0; k < kernel; ++k) {
            int num = sl + pad - k;
            if (num < 0) break;
            if (num % stride) continue;
            int t = num / stride;
            if (t >= t_out) continue;
            const float* dr = dy + (long)(out_off[u] + t) * c_out + g * og;
            const float* wr = w + ((long)(g * og) * kernel + k) * cg + cl;
            for (int o = 0; o < og; ++o) acc = fmaf(dr[o], wr[(long)o * kernel * cg], acc);
        }
        dx[i] = acc;
    }
}

// Group norm over time (one group per channel) backward, per (32 channels, utterance) block: the
// statistics recomputed in f64 as the CPU does, dx written, and this utterance's dgamma / dbeta
// (rows of [utts, c], summed over utterances by column_sum_f32).
extern "C" __global__ void group_norm_time_grad_f32(const float* dy, const float* x, const int* offsets, const float* gamma, float eps,
                                                    float* dx, float* dgamma_u, float* dbeta_u, int c) {
    __shared__ double red[8][32];
    int tx = threadIdx.x % 32, ty = threadIdx.x / 32, ch = blockIdx.x * 32 + tx, u = blockIdx.y;
    int r0 = offsets[u], r1 = offsets[u + 1];
    double n = r1 - r0;
    bool on = ch < c;
    double s = 0.0;
    if (on)
        for (int r = r0 + ty; r < r1; r += 8) s += x[(long)r * c + ch];
    double mean = reduce_lanes(s, red, ty, tx);
    __syncthreads();
    if (ty == 0) red[0][tx] = mean / n;
    __syncthreads();
    mean = red[0][tx];
    __syncthreads();
    double v = 0.0;
    if (on)
        for (int r = r0 + ty; r < r1; r += 8) {
            double d = x[(long)r * c + ch] - mean;
            v += d * d;
        }
    double var = reduce_lanes(v, red, ty, tx);
    __syncthreads();
    if (ty == 0) red[0][tx] = 1.0 / sqrt(var / n + (double)eps);
    __syncthreads();
    double inv = red[0][tx];
    double gm = on ? (double)gamma[ch] : 0.0;
    __syncthreads();
    double sg = 0.0, sgx = 0.0;
    if (on)
        for (int r = r0 + ty; r < r1; r += 8) {
            double d = dy[(long)r * c + ch], xh = (x[(long)r * c + ch] - mean) * inv;
            sg += d;
            sgx += d * xh;
        }
    double tsg = reduce_lanes(sg, red, ty, tx);
    __syncthreads();
    double tsgx = reduce_lanes(sgx, red, ty, tx);
    __syncthreads();
    if (ty == 0) {
        red[0][tx] = tsg;
        red[1][tx] = tsgx;
        if (on) {
            dbeta_u[(long)u * c + ch] = (float)tsg;
            dgamma_u[(long)u * c + ch] = (float)tsgx;
        }
    }
    __syncthreads();
    double sum_g = red[0][tx] * gm, sum_gx = red[1][tx] * gm;
    if (on)
        for (int r = r0 + ty; r < r1; r += 8) {
            double xh = (x[(long)r * c + ch] - mean) * inv;
            dx[(long)r * c + ch] = (float)(inv / n * (n * dy[(long)r * c + ch] * gm - sum_g - xh * sum_gx));
        }
}

// ---- per-matrix top-k of |score| into mask bits ------------------------------------------------
// Keys are |score| bit patterns (monotone in |score|; NaN above infinity, as total_cmp orders).
// A radix select over 4 digits of 8 bits finds the drop-th smallest key T and how many keys equal
// to T are dropped; ties are dropped in index order (the CPU's rule), then surviving bits are
// cleared in a mask that starts all ones. Every scored block of every masked matrix of a step
// is a segment of one batch (blockIdx.y, or blockIdx.x for the one-thread steps), so a step's
// masks take the same dozen launches however many matrices it masks.
// state, per segment: {prefix, fixed-bits mask, remaining rank}; hist: 256 counters per segment.

struct TopkSegment {
    const float* s;     // the block's scores
    long n;             // how many
    unsigned* bits;     // its matrix's mask words
    long bit0;          // bit of the block's first score in them
    unsigned rank;      // dropped count - 1
    int nblocks;        // tie-count blocks of TOPK_PER_BLOCK scores
    unsigned* counts;   // nblocks tie counts, then their exclusive prefix sums
};

// Mask words of one matrix, set to all ones before the drops are cleared.
struct MaskWords {
    unsigned* p;
    long n;
};

__device__ __forceinline__ unsigned score_key(float s) { return __float_as_uint(s) & 0x7fffffffu; }

extern "C" __global__ void topk_fill(const MaskWords* masks) {
    const MaskWords m = masks[blockIdx.y];
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < m.n; i += (long)gridDim.x * blockDim.x) m.p[i] = ~0u;
}

extern "C" __global__ void topk_init(const TopkSegment* segs, unsigned* state, unsigned* hist) {
    const int g = blockIdx.x;
    if (threadIdx.x == 0) {
        state[3 * g] = 0;
        state[3 * g + 1] = 0;
        state[3 * g + 2] = segs[g].rank;
    }
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[256 * g + i] = 0;
}

extern "C" __global__ void topk_histogram(const TopkSegment* segs, const unsigned* state, unsigned* hist, int shift) {
    __shared__ unsigned local[256];
    const int g = blockIdx.y;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) local[i] = 0;
    __syncthreads();
    const float* s = segs[g].s;
    const long n = segs[g].n;
    unsigned prefix = state[3 * g], fixed = state[3 * g + 1];
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        unsigned key = score_key(s[i]);
        if ((key & fixed) == prefix) atomicAdd(&local[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        if (local[i]) atomicAdd(&hist[256 * g + i], local[i]);
}

// One thread per segment: the digit holding the remaining rank; clears the histogram for the
// next digit.
extern "C" __global__ void topk_pick(unsigned* state, unsigned* hist, int shift) {
    unsigned* st = state + 3 * blockIdx.x;
    unsigned* h = hist + 256 * blockIdx.x;
    unsigned rank = st[2], below = 0;
    for (int b = 0; b < 256; ++b) {
        if (below + h[b] > rank) {
            st[0] |= (unsigned)b << shift;
            st[2] = rank - below;
            break;
        }
        below += h[b];
    }
    st[1] |= 255u << shift;
    for (int b = 0; b < 256; ++b) h[b] = 0;
}

constexpr int TOPK_PER_THREAD = 32, TOPK_THREADS = 256, TOPK_PER_BLOCK = TOPK_PER_THREAD * TOPK_THREADS;

// Ties (key == T) of this thread's 32 elements, and their exclusive prefix over the block.
__device__ __forceinline__ unsigned block_tie_prefix(const float* s, long n, unsigned thr, unsigned* total) {
    __shared__ unsigned warp_totals[TOPK_THREADS / 32];
    long e0 = (long)blockIdx.x * TOPK_PER_BLOCK + (long)threadIdx.x * TOPK_PER_THREAD;
    unsigned mine = 0;
    for (int j = 0; j < TOPK_PER_THREAD; ++j)
        if (e0 + j < n && score_key(s[e0 + j]) == thr) ++mine;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    unsigned incl = mine;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
    }
    if (lane == 31) warp_totals[warp] = incl;
    __syncthreads();
    unsigned before = 0, all = 0;
    for (int w = 0; w < TOPK_THREADS / 32; ++w) {
        if (w < warp) before += warp_totals[w];
        all += warp_totals[w];
    }
    *total = all;
    return before + incl - mine;
}

extern "C" __global__ void __launch_bounds__(256) topk_tie_counts(const TopkSegment* segs, const unsigned* state) {
    const TopkSegment sg = segs[blockIdx.y];
    if ((int)blockIdx.x >= sg.nblocks) return;  // the whole block: segments differ in length
    unsigned total;
    block_tie_prefix(sg.s, sg.n, state[3 * blockIdx.y], &total);
    if (threadIdx.x == 0) sg.counts[blockIdx.x] = total;
}

// One thread per segment: exclusive prefix sums of its per-block tie counts.
extern "C" __global__ void topk_tie_scan(const TopkSegment* segs) {
    const TopkSegment sg = segs[blockIdx.x];
    unsigned run = 0;
    for (int b = 0; b < sg.nblocks; ++b) {
        unsigned c = sg.counts[b];
        sg.counts[b] = run;
        run += c;
    }
}

// Clears the bit of every dropped element: key < T, or a tie among the first (rank + 1) ties.
// Element e of a segment's scores is bit bit0 + e of its (stacked) weight's mask.
extern "C" __global__ void __launch_bounds__(256) topk_write(const TopkSegment* segs, const unsigned* state) {
    const TopkSegment sg = segs[blockIdx.y];
    if ((int)blockIdx.x >= sg.nblocks) return;
    const unsigned* st = state + 3 * blockIdx.y;
    unsigned thr = st[0], ties_dropped = st[2] + 1, total;
    unsigned rank = sg.counts[blockIdx.x] + block_tie_prefix(sg.s, sg.n, thr, &total);
    long e0 = (long)blockIdx.x * TOPK_PER_BLOCK + (long)threadIdx.x * TOPK_PER_THREAD;
    for (int j = 0; j < TOPK_PER_THREAD; ++j) {
        long e = e0 + j;
        if (e >= sg.n) break;
        unsigned key = score_key(sg.s[e]);
        bool dropped = key < thr;
        if (key == thr) dropped = rank++ < ties_dropped;
        if (dropped) {
            long b = sg.bit0 + e;
            atomicAnd(&sg.bits[b >> 5], ~(1u << (b & 31)));
        }
    }
}

// ---- tensor-core gradient GEMM operands ---------------------------------------------------------
// The cp.async GEMMs compute A·Bᵀ over row-major operands, so the weight gradient dyᵀ·x takes
// both activations transposed (bf16 for gemm_bf16_mma, fp32 for gemm_tf32x3; rows padded with
// zeros to a multiple of 8, keeping every row 16-byte aligned) and the input gradient
// dy·(W⊙M) takes (W⊙M)ᵀ. 32x32 tiles through shared memory keep reads and writes coalesced.

// y[c, r] = x[r, c] for r < rows, 0 for rows <= r < rows_padded; with `mask` (bits over the
// row-major x), 0 where x's bit is clear too.
template <class In, class Out>
__device__ __forceinline__ void transpose_padded(const In* x, Out* y, int rows, int cols, int rows_padded, const uint8_t* mask = nullptr) {
    __shared__ float tile[32][33];  // exact for bf16 too
    int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        int r = r0 + i, c = c0 + threadIdx.x;
        long at = (long)r * cols + c;
        tile[i][threadIdx.x] = (r < rows && c < cols && (!mask || mask_bit(mask, at))) ? load_as(x + at) : 0.0f;
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        int c = c0 + i, r = r0 + threadIdx.x;
        if (c < cols && r < rows_padded) store_as(y + (long)c * rows_padded + r, tile[threadIdx.x][i]);
    }
}
extern "C" __global__ void transpose_to_bf16(const float* x, __nv_bfloat16* y, int rows, int cols, int rows_padded) {
    transpose_padded(x, y, rows, cols, rows_padded);
}
extern "C" __global__ void transpose_to_f32(const float* x, float* y, int rows, int cols, int rows_padded) {
    transpose_padded(x, y, rows, cols, rows_padded);
}
extern "C" __global__ void transpose_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int rows, int cols, int rows_padded) {
    transpose_padded(x, y, rows, cols, rows_padded);
}

// y[i, o] = w[o, i] where mask bit o*d_in + i is set (or no mask), else 0: (W ⊙ M)ᵀ, the B
// operand of the input gradient dy · (W ⊙ M) on the cp.async GEMMs (bf16, or fp32 for 3xTF32).
extern "C" __global__ void transpose_mask_bf16(const __nv_bfloat16* w, const uint8_t* mask, __nv_bfloat16* y, int d_out, int d_in) {
    transpose_padded(w, y, d_out, d_in, d_out, mask);
}
extern "C" __global__ void transpose_mask_f32(const float* w, const uint8_t* mask, float* y, int d_out, int d_in) {
    transpose_padded(w, y, d_out, d_in, d_out, mask);
}

extern "C" __global__ void bf16_to_f32(const __nv_bfloat16* x, float* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) y[i] = __bfloat162float(x[i]);
}

// ---- optimiser: the scores' Adam state lives on the device --------------------------------------

extern "C" __global__ void scale_f32(const float* x, float* out, long n, float s) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) out[i] = x[i] * s;
}

extern "C" __global__ void count_nonfinite_f32(const float* x, long n, unsigned* count) {
    unsigned local = 0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) local += !isfinite(x[i]);
    if (local) atomicAdd(count, local);
}

// Adam in f64 per element, as src/train/adam.rs (AdamStep::apply) computes it: moments rounded
// to f32 when stored, the parameter updated from the stored moments.
extern "C" __global__ void adam_f32(float* p, const float* g, float* m, float* v, long n, double b1, double b2, double step_size,
                                    double c2_sqrt, double eps) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double gi = g[i];
        float mi = (float)(b1 * (double)m[i] + (1.0 - b1) * gi);
        float vi = (float)(b2 * (double)v[i] + (1.0 - b2) * gi * gi);
        m[i] = mi;
        v[i] = vi;
        double denom = sqrt((double)vi) / c2_sqrt + eps;
        p[i] = (float)((double)p[i] - step_size * (double)mi / denom);
    }
}
