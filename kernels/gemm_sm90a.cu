// gemm_bf16_wgmma*: the bf16 GEMM of kernels/gemm.cu (same arguments, epilogue and masks) on
// Hopper's warpgroup MMA, `wgmma.mma_async`, which exists only on sm_90a: build.rs compiles this
// file for that target alone, and the backend loads it only on a compute capability 9.0 device.
//
// Why: mma.sync on an H100 leaves most of the tensor cores' rate unused (the mma.sync GEMM
// measured 32% of cuBLAS on the FFN shape); wgmma reads both operands straight from shared
// memory, 64 x N x 16 per instruction per warpgroup, asynchronously, so the warps neither load
// fragments (no ldmatrix) nor wait on each MMA.
//
// Structure: 128 x BN output tiles, BK = 64, 256 threads = two warpgroups of 64 output rows
// each. Operand tiles are staged by the same cp.async loader as the mma.sync kernels, in the
// 128-byte-swizzled row layout (Swizzled128: 64 bf16 per row, 16-byte chunk j of row r at
// chunk j ^ (r % 8)), which is exactly wgmma's 128B-swizzle K-major canonical layout when each
// stage starts on a 1024-byte boundary; the matrix descriptors then name 8-row atoms 1024 bytes
// apart, and each k16 step moves the start 32 bytes along the rows. A STAGES-deep pipeline keeps
// STAGES - 2 stages of copies and one wgmma group in flight: the stage loaded at step kt reuses
// the buffer of step kt - 2, whose wgmma group the previous step's wait retired.
// Masks: each thread ANDs the 16-byte B chunks it copied with their mask byte (8 weights, one
// byte of the packed mask since K % 32 == 0 there) once they land, before the barrier that
// hands the stage to the MMAs; `fence.proxy.async` makes those ordinary shared-memory writes
// (and cp.async's) visible to wgmma, which reads through the async proxy.
// Output: the accumulators (per warp, the m16n8 layout of mma.sync, repeated over N / 8) leave
// through store_accumulators as the mma.sync kernels' do.
#include "gemm_tiles.cuh"

// A matrix descriptor (PTX ISA, "matrix descriptor format") of a K-major operand tile in the
// 128-byte swizzle: start address, leading byte offset (unused by swizzled K-major layouts; 1 by
// convention), stride byte offset 1024 (from one 8-row atom to the next), swizzle mode 1. The
// emulator decodes this same descriptor (its __cvta_generic_to_shared gives offsets into its
// shared window).
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* smem) {
    uint64_t addr = (uint64_t)__cvta_generic_to_shared(smem);
    return ((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}

// The first 1024-byte boundary in a dynamic shared-memory window (the kernels ask for 1024 bytes
// more than they use): where the 128-byte swizzle's 8-row atoms must start.
__device__ __forceinline__ unsigned char* align_1024(unsigned char* raw) {
    return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
}

#ifndef S3R_CUEMU
// The 64 fp32 accumulators of an m64n128 warpgroup MMA as inline-PTX operands %0..%63 (d[j][q]
// below), shared by the bf16 and TF32 forms.
#define WGMMA_ACC_REGS                                                                   \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "   \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "   \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WGMMA_ACC_ROW(d, j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define WGMMA_ACC_OPERANDS(d)                                                                                                        \
    WGMMA_ACC_ROW(d, 0), WGMMA_ACC_ROW(d, 1), WGMMA_ACC_ROW(d, 2), WGMMA_ACC_ROW(d, 3), WGMMA_ACC_ROW(d, 4), WGMMA_ACC_ROW(d, 5),   \
        WGMMA_ACC_ROW(d, 6), WGMMA_ACC_ROW(d, 7), WGMMA_ACC_ROW(d, 8), WGMMA_ACC_ROW(d, 9), WGMMA_ACC_ROW(d, 10), WGMMA_ACC_ROW(d, 11), \
        WGMMA_ACC_ROW(d, 12), WGMMA_ACC_ROW(d, 13), WGMMA_ACC_ROW(d, 14), WGMMA_ACC_ROW(d, 15)
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// D[64 x 128] += A[64 x 16] B[128 x 16]ᵀ, both from shared memory, fp32 accumulators in the
// warpgroup's registers: d[j][q] is row 16 (warp % 4) + lane / 4 + 8 (q / 2), column 8 j +
// 2 (lane % 4) + q % 2.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        WGMMA_ACC_REGS
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : WGMMA_ACC_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(1));
}

// D[64 x 128] (+)= A[64 x 8] B[128 x 8]ᵀ in TF32 (fp32 operands in shared memory, read as TF32:
// their low 13 bits ignored), same accumulator layout; `scale_d` false replaces D by the
// product (a fresh accumulator without zeroing its registers).
__device__ __forceinline__ void wgmma_m64n128k8_tf32(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {"
        WGMMA_ACC_REGS
        "}, %64, %65, p, 1, 1;\n}\n"
        : WGMMA_ACC_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"((int)scale_d));
}
#endif  // S3R_CUEMU

template <int BN_, int STAGES_>
struct WgmmaTile {
    static constexpr int BM = 128, BN = BN_, BK = 64, STAGES = STAGES_, THREADS = 256;
    static constexpr int LOOKAHEAD = STAGES - 2;       // stages of copies in flight
    static constexpr int STAGE_BYTES = (BM + BN) * 128;  // A and B rows of 64 bf16; multiples of 1024
    static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES, EPI_BYTES = BM * (BN + 4) * 4;
    static constexpr int SMEM_BYTES = (PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES) + 1024;  // + room to align
    static_assert(LOOKAHEAD >= 1 && BN % 128 == 0, "pipeline depth and wgmma width");
};
using Wgmma128x128 = WgmmaTile<128, 4>;    // 129 KB of shared memory: one block per SM
using Wgmma128x128s3 = WgmmaTile<128, 3>;  // 97 KB: two blocks per SM, one stage of copies in flight each
using Wgmma128x256 = WgmmaTile<256, 4>;    // 193 KB: one block per SM, half the A traffic per output

// The mask over the B chunks this thread staged (load_stage's assignment of chunks to threads):
// each 16-byte chunk holds weights (gn, gk .. gk + 7), one byte of the packed mask.
template <class Tile>
__device__ __forceinline__ void mask_own_chunks(const GemmArgs& p, __nv_bfloat16* Bs, int n0, int k0, int t) {
    constexpr int PER_ROW = Tile::BK / 8;
#pragma unroll
    for (int i = 0; i < Tile::BN * PER_ROW / Tile::THREADS; ++i) {
        int idx = t + i * Tile::THREADS, r = idx / PER_ROW, ch = (idx % PER_ROW) * 8;
        int gn = n0 + r, gk = k0 + ch;
        if (gn >= p.n || gk >= p.k) continue;  // zero-filled already
        uint4* chunk = reinterpret_cast<uint4*>(Bs + Swizzled128<__nv_bfloat16>::at(r, ch));
        *chunk = mask_eight(*chunk, p.mask[((long)gn * p.k + gk) >> 3]);
    }
}

template <class Tile>
__device__ __forceinline__ void gemm_bf16_wgmma_body(const GemmArgs& p) {
    constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, STAGES = Tile::STAGES, LOOKAHEAD = Tile::LOOKAHEAD;
    DYNAMIC_SHARED(unsigned char, smem_raw);
    unsigned char* smem = align_1024(smem_raw);
    const int z = blockIdx.z;
    const __nv_bfloat16* A = (const __nv_bfloat16*)p.a + z * p.batch_a;
    const __nv_bfloat16* B = (const __nv_bfloat16*)p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int wg = t / 128, warp = t / 32, lane = t % 32;
    GemmArgs copies = p;
    copies.mask = nullptr;  // masks are applied in place (mask_own_chunks), not staged
    const KRange kr = k_range(p);
    auto load = [&](int kt) {
        load_stage<__nv_bfloat16, Swizzled128<__nv_bfloat16>, BM, BN, BK, Tile::THREADS>(copies, A, B, smem + (kt % STAGES) * Tile::STAGE_BYTES, m0, n0,
                                                                           kr.begin + kt * BK, t);
    };
    float acc[1][BN / 8][4] = {};
    const int kt_count = (kr.end - kr.begin + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < LOOKAHEAD; ++s) {
        if (s < kt_count) load(s);
        cp_commit();
    }
    for (int kt = 0; kt < kt_count; ++kt) {
        unsigned char* stage = smem + (kt % STAGES) * Tile::STAGE_BYTES;
        __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(stage);
        __nv_bfloat16* Bs = As + BM * 64;
        cp_wait<LOOKAHEAD - 1>();  // this thread's copies of stage kt have landed
        if (p.mask) mask_own_chunks<Tile>(p, Bs, n0, kr.begin + kt * BK, t);
        fence_proxy_async();
        // Every thread's copies of stage kt are in, and every warpgroup has retired the wgmma
        // group of step kt - 2, whose buffer the next load takes.
        __syncthreads();
        if (kt + LOOKAHEAD < kt_count) load(kt + LOOKAHEAD);
        cp_commit();
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            const uint64_t da = wgmma_desc_sw128(As + wg * 64 * 64 + kk);
#pragma unroll
            for (int h = 0; h < BN / 128; ++h)
                wgmma_m64n128k16(*reinterpret_cast<float(*)[16][4]>(&acc[0][h * 16]), da, wgmma_desc_sw128(Bs + h * 128 * 64 + kk));
        }
        wgmma_commit();
        wgmma_wait<1>();
    }
    wgmma_wait<0>();
    cp_wait<0>();
    __syncthreads();
    store_accumulators<BM, BN, Tile::THREADS>(p, smem, acc, wg * 64 + (warp % 4) * 16, 0, lane, m0, n0, z);
}

GEMM_TILE_KERNEL(gemm_bf16_wgmma, Wgmma128x128, gemm_bf16_wgmma_body)
GEMM_TILE_KERNEL(gemm_bf16_wgmma_s3, Wgmma128x128s3, gemm_bf16_wgmma_body)
GEMM_TILE_KERNEL(gemm_bf16_wgmma_wide, Wgmma128x256, gemm_bf16_wgmma_body)

// gemm_tf32x3_wgmma: gemm_tf32x3 (fp32 A and B, fp32 accuracy from three TF32 products per
// product: big*big + big*small + small*big) on warpgroup MMAs. wgmma takes TF32 operands only
// K-major and only from shared memory or (A) registers, and reads them through the async proxy,
// so the split into TF32 parts happens in shared memory:
//   - a stage is copied as fp32 by cp.async (load_stage, the 128-byte swizzle with 32 floats a
//     row: exactly wgmma's K-major canonical layout), then each thread splits the 16-byte chunks
//     it copied itself (no barrier needed to see them): big = tf32(x) in place, small =
//     tf32(x - big) at the same offset of the stage's small tiles; B's masked weights become
//     zeros there (their bits read from the packed mask, one nibble a chunk);
//   - while the MMAs of stage kt run, the threads split stage kt + 1 (the async MMAs overlap
//     the split), and cp.async has stage kt + 2 in flight.
// Accumulation: Hopper's tensor cores round their accumulation toward zero (see mma_tf32x3 in
// common.cuh), so each stage's 12 MMAs (4 steps of k 8, three products each) go into a fresh
// accumulator (the first with scale-d 0) that is added to the fp32 result with round-to-nearest
// once the stage's MMAs retire: the truncation stays relative to 32 products' partial sums (the
// MMA-promotion interval CUTLASS uses for FP8 for the same reason).
// 128 x 128 tiles, BK 32, 256 threads = two warpgroups of 64 rows; 3 stages of 64 KB.
namespace x3w {
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3, THREADS = 256;
constexpr int ROWS = BM + BN;                               // A's rows, then B's, 128 bytes each
constexpr int TILES_BYTES = ROWS * 128, STAGE_BYTES = 2 * TILES_BYTES;  // big (as copied), small
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;     // + room to align stages to 1024
static_assert(BM * (BN + 4) * 4 <= STAGES * STAGE_BYTES, "epilogue tile must fit the pipeline buffers");
}

// The split of the chunks thread t copied into `stage` (load_stage's assignment: chunk idx = t +
// i * THREADS is row idx / 8 of A then B, floats 4 (idx % 8) ..), B's masked entries zeroed.
__device__ __forceinline__ void split_own_chunks(const GemmArgs& p, float* stage, int n0, int k0, int t) {
    using namespace x3w;
    constexpr int PER_ROW = BK / 4;
    float* small = stage + TILES_BYTES / 4;
#pragma unroll
    for (int i = 0; i < ROWS * PER_ROW / THREADS; ++i) {
        const int idx = t + i * THREADS, r = idx / PER_ROW, ch = (idx % PER_ROW) * 4, at = Swizzled128<float>::at(r, ch);
        float4 v = *reinterpret_cast<const float4*>(stage + at);
        if (r >= BM && p.mask) {
            const int gn = n0 + r - BM, gk = k0 + ch;
            if (gn < p.n && gk < p.k) {
                const unsigned bits = p.mask[((long)gn * p.k + gk) >> 3] >> (gk & 7);
                v.x = (bits & 1) ? v.x : 0.0f;
                v.y = (bits & 2) ? v.y : 0.0f;
                v.z = (bits & 4) ? v.z : 0.0f;
                v.w = (bits & 8) ? v.w : 0.0f;
            }
        }
        unsigned big[4], sml[4];
        split_tf32(v.x, big[0], sml[0]);
        split_tf32(v.y, big[1], sml[1]);
        split_tf32(v.z, big[2], sml[2]);
        split_tf32(v.w, big[3], sml[3]);
        *reinterpret_cast<uint4*>(stage + at) = make_uint4(big[0], big[1], big[2], big[3]);
        *reinterpret_cast<uint4*>(small + at) = make_uint4(sml[0], sml[1], sml[2], sml[3]);
    }
}

extern "C" __global__ void __launch_bounds__(256, 1) gemm_tf32x3_wgmma(GemmArgs p) {
    using namespace x3w;
    DYNAMIC_SHARED(unsigned char, x3w_smem);
    unsigned char* smem = align_1024(x3w_smem);
    const int z = blockIdx.z;
    const float* A = (const float*)p.a + z * p.batch_a;
    const float* B = (const float*)p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int wg = t / 128, warp = t / 32, lane = t % 32;
    GemmArgs copies = p;
    copies.mask = nullptr;  // masks are applied by the split, not staged
    auto stage = [&](int kt) { return reinterpret_cast<float*>(smem + (kt % STAGES) * STAGE_BYTES); };
    const KRange kr = k_range(p);
    auto load = [&](int kt) {
        load_stage<float, Swizzled128<float>, BM, BN, BK, THREADS>(copies, A, B, reinterpret_cast<unsigned char*>(stage(kt)), m0, n0, kr.begin + kt * BK,
                                                                   t);
    };
    float acc[1][BN / 8][4] = {}, part[BN / 8][4] = {};
    const int kt_count = (kr.end - kr.begin + BK - 1) / BK;
    for (int s = 0; s < 2; ++s) {
        if (s < kt_count) load(s);
        cp_commit();
    }
    cp_wait<1>();
    if (kt_count > 0) split_own_chunks(p, stage(0), n0, kr.begin, t);
    for (int kt = 0; kt < kt_count; ++kt) {
        // Every thread's split of stage kt is in, and both warpgroups have retired the MMAs of
        // step kt - 1, whose stage the next load takes.
        fence_proxy_async();
        __syncthreads();
        if (kt + 2 < kt_count) load(kt + 2);
        cp_commit();
        const float* big = stage(kt);
        const float* sml = big + TILES_BYTES / 4;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            const int a_row = wg * 64 * 32 + kk, b_row = BM * 32 + kk;  // float offsets of the rows' k8 slices
            wgmma_m64n128k8_tf32(part, wgmma_desc_sw128(sml + a_row), wgmma_desc_sw128(big + b_row), kk > 0);
            wgmma_m64n128k8_tf32(part, wgmma_desc_sw128(big + a_row), wgmma_desc_sw128(sml + b_row), true);
            wgmma_m64n128k8_tf32(part, wgmma_desc_sw128(big + a_row), wgmma_desc_sw128(big + b_row), true);
        }
        wgmma_commit();
        if (kt + 1 < kt_count) {
            cp_wait<1>();  // this thread's copies of stage kt + 1 have landed
            split_own_chunks(p, stage(kt + 1), n0, kr.begin + (kt + 1) * BK, t);
        }
        wgmma_wait<0>();
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[0][j][q] += part[j][q];
    }
    cp_wait<0>();
    __syncthreads();
    store_accumulators<BM, BN, THREADS>(p, smem, acc, wg * 64 + (warp % 4) * 16, 0, lane, m0, n0, z);
}

extern "C" __global__ void gemm_tf32x3_wgmma_smem(int* bytes) { *bytes = x3w::SMEM_BYTES; }
