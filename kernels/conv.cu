// im2col for the general (grouped and/or padded) 1-D convolution of one utterance, one group:
// cols[t, k * cg + ci] = x[stride * t + k - pad, g * cg + ci], zero outside [0, t_in).
// The feature encoder's plain convolutions need no im2col: their columns are a strided view.
#include "common.cuh"

extern "C" __global__ void im2col_group(const float* x, int t_in, int c_in, int g, int cg, int kernel, int stride, int pad,
                                        float* cols, int t_out) {
    long total = (long)t_out * kernel * cg;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int ci = i % cg;
        long rest = i / cg;
        int k = rest % kernel;
        int t = rest / kernel;
        int s = stride * t + k - pad;
        cols[i] = (s >= 0 && s < t_in) ? x[(long)s * c_in + g * cg + ci] : 0.0f;
    }
}
