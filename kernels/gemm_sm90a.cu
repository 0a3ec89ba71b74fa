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

#ifndef S3R_CUEMU
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
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "l"(desc_a), "l"(desc_b), "r"(1));
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
        uint4* chunk = reinterpret_cast<uint4*>(Bs + Swizzled128::at(r, ch));
        *chunk = mask_eight(*chunk, p.mask[((long)gn * p.k + gk) >> 3]);
    }
}

template <class Tile>
__device__ __forceinline__ void gemm_bf16_wgmma_body(const GemmArgs& p) {
    constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, STAGES = Tile::STAGES, LOOKAHEAD = Tile::LOOKAHEAD;
    DYNAMIC_SHARED(unsigned char, smem_raw);
    unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    const int z = blockIdx.z;
    const __nv_bfloat16* A = (const __nv_bfloat16*)p.a + z * p.batch_a;
    const __nv_bfloat16* B = (const __nv_bfloat16*)p.b + z * p.batch_b;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, t = threadIdx.x;
    const int wg = t / 128, warp = t / 32, lane = t % 32;
    GemmArgs copies = p;
    copies.mask = nullptr;  // masks are applied in place (mask_own_chunks), not staged
    auto load = [&](int kt) {
        load_stage<__nv_bfloat16, Swizzled128, BM, BN, BK, Tile::THREADS>(copies, A, B, smem + (kt % STAGES) * Tile::STAGE_BYTES, m0, n0,
                                                                           kt * BK, t);
    };
    float acc[1][BN / 8][4] = {};
    const int kt_count = (p.k + BK - 1) / BK;
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
        if (p.mask) mask_own_chunks<Tile>(p, Bs, n0, kt * BK, t);
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
