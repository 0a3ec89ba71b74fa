// Weight layouts and weight norm on the device: what weight finetuning needs to rebuild the model
// from its trained tensors every update without a trip through the host (conv weights to the
// time-major layout and gradients back, the positional conv's weight_norm folded and its
// gradients), and a fixed pruning mask on gradients.
#include "common.cuh"

// y[i, k, j] = x[i, j, k] for x [a, b, c] (one thread per output element).
extern "C" __global__ void swap_last_two_f32(const float* x, float* y, long a, int b, int c) {
    long n = a * b * c;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < n; e += (long)gridDim.x * blockDim.x) {
        long i = e / ((long)b * c);
        int r = (int)(e % ((long)b * c)), k = r / b, j = r % b;
        y[e] = x[(i * b + j) * c + k];
    }
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Per kernel position k (one block each, 256 threads): norm2[k] = Σ v[r, k]², and with dw,
// dot[k] = Σ dw[r, k]·v[r, k], over the rows r of v viewed as [rows, kernel]; f64 as the CPU.
extern "C" __global__ void weight_norm_sums(const float* v, const float* dw, long rows, int kernel, double* norm2, double* dot) {
    __shared__ double part[2][8];
    int k = blockIdx.x;
    double s = 0.0, d = 0.0;
    for (long r = threadIdx.x; r < rows; r += blockDim.x) {
        double x = v[r * kernel + k];
        s += x * x;
        if (dw) d += (double)dw[r * kernel + k] * x;
    }
    s = warp_sum_f64(s);
    d = warp_sum_f64(d);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        part[0][warp] = s;
        part[1][warp] = d;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double ts = 0.0, td = 0.0;
        for (int w = 0; w < blockDim.x / 32; ++w) {
            ts += part[0][w];
            td += part[1][w];
        }
        norm2[k] = ts;
        if (dw) dot[k] = td;
    }
}

// w = g[k] · v / ‖v[:, k]‖ (v viewed as [rows, kernel], n = rows · kernel elements).
extern "C" __global__ void weight_norm_fold(const float* g, const float* v, const double* norm2, float* w, long n, int kernel) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int k = (int)(i % kernel);
        w[i] = (float)((double)g[k] * (double)v[i] / sqrt(norm2[k]));
    }
}

// dg[k] = dot[k] / ‖v[:, k]‖; dv = g[k]/‖v‖ · (dw − dg[k] · v/‖v‖), dg kept in f64 as the CPU does.
extern "C" __global__ void weight_norm_grad(const float* dw, const float* g, const float* v, const double* norm2, const double* dot,
                                            float* dg, float* dv, long n, int kernel) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int k = (int)(i % kernel);
        double norm = sqrt(norm2[k]), dgk = dot[k] / norm;
        dv[i] = (float)((double)g[k] / norm * ((double)dw[i] - dgk * (double)v[i] / norm));
        if (i < kernel) dg[i] = (float)(dot[i] / sqrt(norm2[i]));
    }
}

// y = a * b elementwise.
extern "C" __global__ void mul_f32(const float* a, const float* b, float* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) y[i] = a[i] * b[i];
}
