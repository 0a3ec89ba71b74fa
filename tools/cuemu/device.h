// cuemu device side: the CUDA surface kernels/*.cu use, for compiling them as host C++ (g++) and
// running them on the CPU, so the GPU tests check every kernel on machines without a GPU.
//
// Execution model. A launch runs its blocks one after another on the calling OS thread. Each
// block's threads are fibers (own stacks, switched by a few instructions of assembly): a fiber
// runs until it reaches a barrier (__syncthreads, or a warp collective such as a shuffle or an
// mma), then the next one runs. So barriers mean what they mean on the GPU, shared memory is
// per block, warp collectives exchange registers lane by lane with the PTX fragment layouts,
// and a divergent barrier is reported as a deadlock instead of hanging. The order fibers run
// in alternates between phases (ascending, then descending thread index), so a read that lacks
// its barrier sees stale data in one phase or the other rather than passing by luck.
// CUEMU_ORDER=reverse starts descending; CUEMU_ORDER=random shuffles every phase (seeded by
// the block index, so a failure reproduces). The same setting orders a launch's blocks.
//
// What it does not model: timing, memory-model races between blocks, and arithmetic bit-exact to
// the GPU's (expf, tensor-core accumulation order). Tests compare with tolerances, as on a GPU.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

using std::isfinite;
using std::isinf;
using std::isnan;

// ---- declaration specifiers ---------------------------------------------------------------
#ifdef CUEMU_LIST_KERNELS
#define __global__ CUEMU_KERNEL
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#ifdef CUEMU_LIST_KERNELS
#define __launch_bounds__(...) CUEMU_BOUNDS(__VA_ARGS__)
#else
#define __launch_bounds__(...)
#endif
#define __align__(n) __attribute__((aligned(n)))
// One copy per OS thread; a block's fibers share their OS thread, so one copy per running block.
#define __shared__ static thread_local
#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::cuemu::dynamic_shared())

// ---- vector types ---------------------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct __align__(8) float2 {
    float x, y;
};
struct __align__(16) float4 {
    float x, y, z, w;
};
struct __align__(8) uint2 {
    unsigned x, y;
};
struct __align__(16) uint4 {
    unsigned x, y, z, w;
};
struct __align__(8) int2 {
    int x, y;
};
struct __align__(16) int4 {
    int x, y, z, w;
};
struct __align__(16) double2 {
    double x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---- bf16 -----------------------------------------------------------------------------------
struct __nv_bfloat16 {
    uint16_t bits;
};
struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1);                                               // nearest, ties to even
    return {uint16_t(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = uint32_t(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }

// ---- bit casts and math ---------------------------------------------------------------------
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline int __float_as_int(float f) { return int(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(unsigned(i)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
// A product rounded on its own (the device never fuses it into an FMA).
inline float __fmul_rn(float a, float b) {
    volatile float p = a * b;
    return p;
}
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
// CUDA's min / max take any mix of arithmetic types.
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
    return b < a ? b : a;
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
    return a < b ? b : a;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }
inline int __ffs(unsigned v) { return __builtin_ffs(int(v)); }

#if !defined(__x86_64__)
#error "cuemu's fiber switch is written for x86-64 (System V); port cuemu_switch to run elsewhere"
#endif

namespace cuemu {

// ---- fibers ---------------------------------------------------------------------------------
// cuemu_switch(&from_sp, to_sp): saves the callee-saved registers on the current stack, stores
// the stack pointer, and resumes the other context (System V x86-64).
extern "C" void cuemu_switch(void** from_sp, void* to_sp);
asm(R"(
    .text
    .hidden cuemu_switch
    .globl cuemu_switch
    .type cuemu_switch,@function
cuemu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuemu_switch, .-cuemu_switch
)");

enum State { READY, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

// A warpgroup MMA issued but not yet retired by a wait_group (see wgmma_m64n128k16 and
// wgmma_m64n128k8_tf32): bf16 operands (k = 16) or TF32 ones (k = 8); with `scale_d` false the
// product replaces D instead of adding to it.
struct WgmmaOp {
    float* d;
    uint64_t desc_a, desc_b;
    bool tf32 = false;
    bool scale_d = true;
};

struct Fiber {
    void* sp;
    State state;
    uint3 tid;
    int lane, warp;
    std::vector<WgmmaOp> wgmma_ops;       // issued, oldest first
    std::vector<size_t> wgmma_group_ends;  // committed groups, as ends in wgmma_ops
};

constexpr size_t STACK_BYTES = 256 * 1024;

// A stack with an inaccessible guard page below it, so an overflow faults.
struct Stack {
    unsigned char* base;
    unsigned char* top() const { return base + STACK_BYTES + 4096; }
};

struct Block {
    std::vector<Fiber> fibers;
    void* sched_sp = nullptr;
    uint3 block_idx, block_dim, grid_dim;
    std::vector<unsigned char> dynamic_smem;
    unsigned char* smem_base = nullptr;  // dynamic_smem's first 1024-byte boundary: the shared window
    size_t smem_bytes = 0;
    std::vector<uint64_t> warp_slots;  // [warp][lane][8]
    void (*call)(void**) = nullptr;
    void** params = nullptr;
};

inline thread_local Block* g_block = nullptr;
inline thread_local Fiber* g_fiber = nullptr;
inline thread_local std::vector<Stack> g_stacks;

inline void* dynamic_shared() { return g_block->smem_base; }

inline void yield(State s) {
    g_fiber->state = s;
    cuemu_switch(&g_fiber->sp, g_block->sched_sp);
}

[[noreturn]] inline void fiber_main() {
    g_block->call(g_block->params);
    yield(DONE);
    std::abort();  // a finished fiber is never resumed
}

inline void* fresh_context(const Stack& s) {
    void** sp = reinterpret_cast<void**>(s.top());
    *--sp = nullptr;                                      // fiber_main's (never used) return address
    *--sp = reinterpret_cast<void*>(&fiber_main);         // where the first switch "returns" to
    for (int i = 0; i < 6; ++i) *--sp = nullptr;          // rbp rbx r12 r13 r14 r15
    return sp;
}

inline bool ensure_stacks(size_t n, char* err, size_t errlen) {
    while (g_stacks.size() < n) {
        void* p = mmap(nullptr, STACK_BYTES + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            snprintf(err, errlen, "cuemu: cannot map a fiber stack");
            return false;
        }
        mprotect(p, 4096, PROT_NONE);
        g_stacks.push_back({static_cast<unsigned char*>(p)});
    }
    return true;
}

enum class Order { ALTERNATE, REVERSE, RANDOM };

inline Order fiber_order() {
    static const Order order = [] {
        const char* v = getenv("CUEMU_ORDER");
        if (v && !std::strcmp(v, "reverse")) return Order::REVERSE;
        if (v && !std::strcmp(v, "random")) return Order::RANDOM;
        return Order::ALTERNATE;
    }();
    return order;
}

// The order a phase runs the block's fibers in.
inline void phase_order(std::vector<int>& idx, unsigned phase, const uint3& block) {
    const int n = int(idx.size());
    const Order order = fiber_order();
    if (order != Order::RANDOM) {
        const bool descending = (phase + (order == Order::REVERSE)) % 2;
        for (int j = 0; j < n; ++j) idx[j] = descending ? n - 1 - j : j;
        return;
    }
    uint64_t x = (uint64_t(block.x) << 42 ^ uint64_t(block.y) << 21 ^ block.z ^ uint64_t(phase) << 50) * 0x9E3779B97F4A7C15ull + 1;
    for (int j = 0; j < n; ++j) idx[j] = j;
    for (int j = n - 1; j > 0; --j) {  // Fisher-Yates with xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::swap(idx[j], idx[int(x % uint64_t(j + 1))]);
    }
}

// Runs one block to completion; false (with `err` said) on a deadlock.
inline bool run_block(Block& b, const char* name, char* err, size_t errlen) {
    const int n = int(b.fibers.size());
    std::vector<int> order(n);
    for (int i = 0; i < n; ++i) {
        Fiber& f = b.fibers[i];
        f.sp = fresh_context(g_stacks[i]);
        f.state = READY;
        f.wgmma_ops.clear();
        f.wgmma_group_ends.clear();
    }
    std::fill(b.smem_base, b.smem_base + b.smem_bytes, 0xFF);  // unwritten floats read as NaN
    for (unsigned phase = 0;; ++phase) {
        phase_order(order, phase, b.block_idx);
        for (int j = 0; j < n; ++j) {
            Fiber& f = b.fibers[order[j]];
            if (f.state != READY) continue;
            g_fiber = &f;
            cuemu_switch(&b.sched_sp, f.sp);
        }
        bool all_done = true, released = false;
        for (const Fiber& f : b.fibers) all_done &= f.state == DONE;
        if (all_done) return true;
        // A warp whose live lanes all wait at a warp collective goes on.
        for (int w0 = 0; w0 < n; w0 += 32) {
            int w1 = std::min(n, w0 + 32), waiting = 0, other = 0;
            for (int i = w0; i < w1; ++i) {
                State s = b.fibers[i].state;
                waiting += s == AT_WARP_BARRIER;
                other += s == AT_BLOCK_BARRIER;
            }
            if (waiting && !other) {
                for (int i = w0; i < w1; ++i)
                    if (b.fibers[i].state == AT_WARP_BARRIER) b.fibers[i].state = READY;
                released = true;
            }
        }
        if (released) continue;
        bool block_ready = true;
        for (const Fiber& f : b.fibers) block_ready &= f.state == AT_BLOCK_BARRIER || f.state == DONE;
        if (!block_ready) {
            snprintf(err, errlen, "cuemu: kernel %s, block (%u,%u,%u): divergent barrier (threads of one warp wait at different barriers)",
                     name, b.block_idx.x, b.block_idx.y, b.block_idx.z);
            return false;
        }
        for (Fiber& f : b.fibers)
            if (f.state == AT_BLOCK_BARRIER) f.state = READY;
    }
}

// Runs a whole launch; returns 0, or 1 with `err` said.
inline int launch(void (*call)(void**), const char* name, const unsigned grid[3], const unsigned block[3], unsigned smem, void** params,
                  char* err, size_t errlen) {
    const size_t threads = size_t(block[0]) * block[1] * block[2];
    if (!ensure_stacks(threads, err, errlen)) return 1;
    Block b;
    b.fibers.resize(threads);
    b.block_dim = {block[0], block[1], block[2]};
    b.grid_dim = {grid[0], grid[1], grid[2]};
    // Aligned as the GPU's shared window is (far beyond 1024 bytes): the 128-byte swizzle of
    // wgmma operands is a function of address bits 4-9.
    b.dynamic_smem.resize(size_t(smem) + 1024);
    b.smem_base = b.dynamic_smem.data() + (-reinterpret_cast<uintptr_t>(b.dynamic_smem.data()) & 1023);
    b.smem_bytes = smem;
    b.warp_slots.assign((threads + 31) / 32 * 32 * 8, 0);
    b.call = call;
    b.params = params;
    for (size_t i = 0; i < threads; ++i) {
        Fiber& f = b.fibers[i];
        f.tid = {unsigned(i % block[0]), unsigned(i / block[0] % block[1]), unsigned(i / (size_t(block[0]) * block[1]))};
        f.lane = int(i % 32);
        f.warp = int(i / 32);
    }
    Block* outer_block = g_block;
    Fiber* outer_fiber = g_fiber;
    g_block = &b;
    // Blocks run in ascending order, or, under CUEMU_ORDER=reverse|random, descending or
    // shuffled: a kernel that relies on one block of a launch running before another fails.
    const size_t blocks = size_t(grid[0]) * grid[1] * grid[2];
    std::vector<size_t> sequence(blocks);
    for (size_t i = 0; i < blocks; ++i) sequence[i] = fiber_order() == Order::REVERSE ? blocks - 1 - i : i;
    if (fiber_order() == Order::RANDOM) {
        uint64_t x = (blocks * 0x9E3779B97F4A7C15ull) ^ 0xD1B54A32D192ED03ull;
        for (size_t j = blocks; j > 1; --j) {  // Fisher-Yates with xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            std::swap(sequence[j - 1], sequence[x % j]);
        }
    }
    bool ok = true;
    for (size_t i = 0; i < blocks && ok; ++i) {
        size_t lin = sequence[i];
        b.block_idx = {unsigned(lin % grid[0]), unsigned(lin / grid[0] % grid[1]), unsigned(lin / (size_t(grid[0]) * grid[1]))};
        ok = run_block(b, name, err, errlen);
    }
    g_block = outer_block;
    g_fiber = outer_fiber;
    return ok ? 0 : 1;
}

// ---- barriers and warp collectives ----------------------------------------------------------
inline void sync_block() { yield(AT_BLOCK_BARRIER); }
inline void sync_warp() { yield(AT_WARP_BARRIER); }
inline uint64_t* lane_slots(int lane) { return &g_block->warp_slots[(size_t(g_fiber->warp) * 32 + lane) * 8]; }

// Every lane publishes `v`, then reads lane `src`'s (its own where `src` has no thread).
template <class T>
inline T exchange(T v, int src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled values are at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    lane_slots(g_fiber->lane)[0] = bits;
    sync_warp();
    int first = g_fiber->warp * 32;
    if (first + src < int(g_block->fibers.size())) bits = lane_slots(src)[0];
    sync_warp();
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}

}  // namespace cuemu

#define threadIdx (::cuemu::g_fiber->tid)
#define blockIdx (::cuemu::g_block->block_idx)
#define blockDim (::cuemu::g_block->block_dim)
#define gridDim (::cuemu::g_block->grid_dim)
#define warpSize 32

inline void __syncthreads() { cuemu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuemu::sync_warp(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    int lane = cuemu::g_fiber->lane;
    return cuemu::exchange(v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    int lane = cuemu::g_fiber->lane, src = lane ^ mask;
    return cuemu::exchange(v, src / width == lane / width ? src : lane);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = cuemu::g_fiber->lane, src = lane - int(delta);
    return cuemu::exchange(v, src >= (lane & ~(width - 1)) ? src : lane);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = cuemu::g_fiber->lane, src = lane + int(delta);
    return cuemu::exchange(v, src < (lane & ~(width - 1)) + width ? src : lane);
}

// ---- atomics (global memory is shared with other host threads; a block's fibers never
// interleave inside one) ------------------------------------------------------------------------
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
// Floating-point adds have no fetch-add: compare-and-swap until no other thread got between.
template <class T>
inline std::enable_if_t<std::is_floating_point<T>::value, T> atomicAdd(T* p, T v) {
    T old = *p, want;
    do want = old + v;
    while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
inline unsigned atomicAnd(unsigned* p, unsigned v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
    unsigned old = *p;
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

// ---- tensor-core fragments and async copies (the inline-PTX helpers of common.cuh) ------------
namespace cuemu {
// One MMA step's output element as tensor cores compute it: the k products of bf16 or TF32
// operands (exact in double) summed with the accumulator, then rounded toward zero to fp32,
// not to nearest (Fasi et al. 2021, Ootomo and Yokota 2022). Chaining many steps into one
// accumulator thus biases it by up to an ulp a step: on an H200, 384 steps (K = 3072, m16n8k8)
// cost the 3xTF32 GEMM rel L2 2.1e-5 until each step's sum was added outside the tensor core.
inline float tensor_core_step(float c, const float* a, const float* b, int k) {
    double sum = c;
    for (int i = 0; i < k; ++i) sum += double(a[i]) * double(b[i]);
    const float r = float(sum);
    return std::fabs(double(r)) > std::fabs(sum) ? std::nextafter(r, 0.0f) : r;
}

inline float bf16_lo(unsigned r) { return __uint_as_float(r << 16); }
inline float bf16_hi(unsigned r) { return __uint_as_float(r & 0xffff0000u); }

// Puts this lane's MMA operands (a0..a3 in slots 0-3, b0 and b1 in 4 and 5) where its warp can
// read them, and returns once every lane has.
inline void publish_mma_operands(const unsigned (&a)[4], unsigned b0, unsigned b1) {
    uint64_t* mine = lane_slots(g_fiber->lane);
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    mine[4] = b0;
    mine[5] = b1;
    sync_warp();
}
}  // namespace cuemu

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with the PTX ISA's fragment layouts: lane
// l = 4g + t holds A rows g and g+8 at columns 2t, 2t+1 (a0, a1) and 2t+8, 2t+9 (a2, a3), B
// (k x n) rows 2t, 2t+1 (b0) and 2t+8, 2t+9 (b1) of column g, and D rows g, g+8, columns 2t, 2t+1.
inline void mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    const int lane = cuemu::g_fiber->lane, g = lane >> 2, t = lane & 3;
    cuemu::publish_mma_operands(a, b0, b1);
    // This lane's outputs need A rows g and g+8 (held by lanes 4g..4g+3) and B columns 2t and
    // 2t+1 (held by lanes 4(2t)+q and 4(2t+1)+q).
    float A[2][16], B[2][16];
    for (int q = 0; q < 4; ++q) {
        const uint64_t* s = cuemu::lane_slots(4 * g + q);
        for (int i = 0; i < 4; ++i) {
            int half = i & 1, col = 2 * q + (i >> 1) * 8;
            A[half][col] = cuemu::bf16_lo(unsigned(s[i]));
            A[half][col + 1] = cuemu::bf16_hi(unsigned(s[i]));
        }
        for (int c = 0; c < 2; ++c) {
            const uint64_t* sb = cuemu::lane_slots(4 * (2 * t + c) + q);
            for (int j = 0; j < 2; ++j) {
                B[c][2 * q + j * 8] = cuemu::bf16_lo(unsigned(sb[4 + j]));
                B[c][2 * q + j * 8 + 1] = cuemu::bf16_hi(unsigned(sb[4 + j]));
            }
        }
    }
    cuemu::sync_warp();
    for (int i = 0; i < 4; ++i) d[i] = cuemu::tensor_core_step(d[i], A[i >> 1], B[i & 1], 16);
}

// cvt.rna.tf32.f32: round the magnitude to 10 mantissa bits, halves away from zero (NaN and
// infinity kept).
inline unsigned to_tf32(float x) {
    unsigned bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u) return bits;
    return (bits + 0x1000u) & 0xffffe000u;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: lane l = 4g + t holds A rows g (a0, a2)
// and g+8 (a1, a3) at columns t (a0, a1) and t+4 (a2, a3), B (k x n) rows t (b0) and t+4 (b1)
// of column g, and D as for the bf16 MMA. Operands are read as TF32 (the low 13 bits ignored).
inline void mma_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    const int lane = cuemu::g_fiber->lane, g = lane >> 2, t = lane & 3;
    cuemu::publish_mma_operands(a, b0, b1);
    auto tf32 = [](uint64_t r) { return __uint_as_float(unsigned(r) & 0xffffe000u); };
    float A[2][8], B[2][8];
    for (int q = 0; q < 4; ++q) {
        const uint64_t* s = cuemu::lane_slots(4 * g + q);
        for (int i = 0; i < 4; ++i) A[i & 1][q + (i >> 1) * 4] = tf32(s[i]);
        for (int c = 0; c < 2; ++c) {
            const uint64_t* sb = cuemu::lane_slots(4 * (2 * t + c) + q);
            B[c][q] = tf32(sb[4]);
            B[c][q + 4] = tf32(sb[5]);
        }
    }
    cuemu::sync_warp();
    for (int i = 0; i < 4; ++i) d[i] = cuemu::tensor_core_step(d[i], A[i >> 1], B[i & 1], 8);
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8; register j receives, of matrix j, row l / 4 columns 2(l % 4), +1 (untransposed)
// or rows 2(l % 4), +1 of column l / 4 (transposed).
namespace cuemu {
template <bool TRANS>
inline void ldmatrix(unsigned (&r)[4], const void* smem) {
    const int lane = g_fiber->lane;
    lane_slots(lane)[0] = reinterpret_cast<uint64_t>(smem);
    sync_warp();
    auto row = [](int i) { return reinterpret_cast<const uint16_t*>(lane_slots(i)[0]); };
    for (int j = 0; j < 4; ++j) {
        uint16_t lo, hi;
        if (TRANS) {
            lo = row(j * 8 + (lane % 4) * 2)[lane / 4];
            hi = row(j * 8 + (lane % 4) * 2 + 1)[lane / 4];
        } else {
            lo = row(j * 8 + lane / 4)[(lane % 4) * 2];
            hi = row(j * 8 + lane / 4)[(lane % 4) * 2 + 1];
        }
        r[j] = unsigned(lo) | unsigned(hi) << 16;
    }
    sync_warp();
}
}  // namespace cuemu
inline void ldmatrix_x4(unsigned (&r)[4], const void* smem) { cuemu::ldmatrix<false>(r, smem); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) { cuemu::ldmatrix<true>(r, smem); }

// cp.async completes at once here (a legal schedule of an asynchronous copy): `bytes` copied
// when `pred`, zeros otherwise.
inline void cp_async(void* smem, const void* gmem, int bytes, bool pred) {
    if (pred)
        std::memcpy(smem, gmem, size_t(bytes));
    else
        std::memset(smem, 0, size_t(bytes));
}
inline void cp_commit() {}
template <int N>
inline void cp_wait() {}

// Hopper warpgroup MMA (kernels/gemm_sm90a.cu). Descriptors hold offsets into the block's
// shared window (dynamic shared memory, 1024-byte aligned). wgmma.mma_async is asynchronous: an
// issued MMA is recorded here and runs when a wait_group retires its group, reading shared
// memory only then, so a kernel that overwrites an operand tile before waiting for the MMAs
// reading it computes garbage here too. Each thread computes only its own accumulators (every
// operand is in shared memory, nothing passes between lanes), adding the 16 products of a k16
// step in order with fma, as the mma.sync emulation does.
// The shared-window address of a shared-memory pointer: its offset in the block's window, so
// the kernels' own descriptor encoding (wgmma_desc_sw128) runs here as on the GPU.
inline size_t __cvta_generic_to_shared(const void* smem) { return size_t(static_cast<const unsigned char*>(smem) - cuemu::g_block->smem_base); }
inline void wgmma_fence() {}
inline void fence_proxy_async() {}
namespace cuemu {
// Element (row, k) of a K-major operand in the 128-byte swizzle (bf16, or fp32 read as TF32:
// the low 13 bits ignored): rows of 128 bytes in atoms of 8, atoms `stride` bytes apart; the
// hardware XORs address bits 4-6 with bits 7-9.
inline float wgmma_operand(uint64_t desc, int row, int k, bool tf32) {
    if ((desc >> 62) != 1) {
        fprintf(stderr, "cuemu: wgmma descriptor %#llx: only the 128-byte swizzle is emulated\n", (unsigned long long)desc);
        std::abort();
    }
    const size_t start = size_t(desc & 0x3FFF) << 4, stride = size_t((desc >> 32) & 0x3FFF) << 4, bytes = tf32 ? 4 : 2;
    size_t addr = start + size_t(row / 8) * stride + size_t(row % 8) * 128 + size_t(k) * bytes;
    addr ^= ((addr >> 7) & 7) << 4;
    if (addr + bytes > g_block->smem_bytes) {
        fprintf(stderr, "cuemu: wgmma operand byte %zu outside %zu bytes of shared memory\n", addr, g_block->smem_bytes);
        std::abort();
    }
    if (tf32) {
        unsigned bits;
        std::memcpy(&bits, g_block->smem_base + addr, 4);
        return __uint_as_float(bits & 0xffffe000u);
    }
    uint16_t bits;
    std::memcpy(&bits, g_block->smem_base + addr, 2);
    return __uint_as_float(unsigned(bits) << 16);
}
// Runs one m64n128 step (k 16 for bf16, 8 for TF32) for the calling thread's accumulators
// (layout as in kernels/gemm_sm90a.cu).
inline void run_wgmma(const WgmmaOp& op) {
    const int w = g_fiber->warp % 4, g = g_fiber->lane >> 2, t = g_fiber->lane & 3, K = op.tf32 ? 8 : 16;
    float a[2][16], b[32][16];  // this thread's two rows of A and 32 columns of B
    for (int h = 0; h < 2; ++h)
        for (int k = 0; k < K; ++k) a[h][k] = wgmma_operand(op.desc_a, 16 * w + g + 8 * h, k, op.tf32);
    for (int c = 0; c < 32; ++c)
        for (int k = 0; k < K; ++k) b[c][k] = wgmma_operand(op.desc_b, 8 * (c / 2) + 2 * t + c % 2, k, op.tf32);
    for (int j = 0; j < 16; ++j)
        for (int q = 0; q < 4; ++q) {
            float& d = op.d[4 * j + q];
            d = tensor_core_step(op.scale_d ? d : 0.0f, a[q >> 1], b[2 * j + (q & 1)], K);
        }
}
}  // namespace cuemu
inline void wgmma_m64n128k16(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b) {
    cuemu::g_fiber->wgmma_ops.push_back({&d[0][0], desc_a, desc_b});
}
inline void wgmma_m64n128k8_tf32(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
    cuemu::g_fiber->wgmma_ops.push_back({&d[0][0], desc_a, desc_b, true, scale_d});
}
inline void wgmma_commit() { cuemu::g_fiber->wgmma_group_ends.push_back(cuemu::g_fiber->wgmma_ops.size()); }
// Retires committed groups, oldest first, until at most N remain pending.
template <int N>
inline void wgmma_wait() {
    auto& f = *cuemu::g_fiber;
    while (f.wgmma_group_ends.size() > size_t(N)) {
        const size_t end = f.wgmma_group_ends.front();
        for (size_t i = 0; i < end; ++i) cuemu::run_wgmma(f.wgmma_ops[i]);
        f.wgmma_ops.erase(f.wgmma_ops.begin(), f.wgmma_ops.begin() + long(end));
        f.wgmma_group_ends.erase(f.wgmma_group_ends.begin());
        for (size_t& e : f.wgmma_group_ends) e -= end;
    }
}

// WMMA: every lane loads the whole A / B fragment (in logical row-major order); of an
// accumulator, lane l owns the elements e with e % 32 == l, and mma_sync / store_matrix_sync
// compute and write only those, so a warp does the product once, as the hardware does.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static constexpr int ROWS = std::is_same<Use, matrix_b>::value ? K : M;
    static constexpr int COLS = std::is_same<Use, matrix_a>::value ? K : N;
    static constexpr int num_elements = ROWS * COLS;
    T x[ROWS * COLS];
};
template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, T v) {
    for (auto& e : f.x) e = v;
}
template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
    using F = fragment<Use, M, N, K, T, L>;
    for (int r = 0; r < F::ROWS; ++r)
        for (int c = 0; c < F::COLS; ++c) f.x[r * F::COLS + c] = std::is_same<L, col_major>::value ? p[size_t(c) * ldm + r] : p[size_t(r) * ldm + c];
}
template <int M, int N, int K, class TA, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
    for (int e = cuemu::g_fiber->lane; e < M * N; e += 32) {
        const int i = e / N, j = e % N;
        float row[K], col[K];
        for (int k = 0; k < K; ++k) row[k] = __bfloat162float(a.x[i * K + k]), col[k] = __bfloat162float(b.x[k * N + j]);
        d.x[e] = cuemu::tensor_core_step(c.x[e], row, col, K);
    }
}
template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
    for (int e = cuemu::g_fiber->lane; e < M * N; e += 32) {
        const int r = e / N, c = e % N;
        (layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) = f.x[e];
    }
}
}  // namespace wmma
}  // namespace nvcuda

// ---- the module's exports (see kernels.cpp generated by build.rs) -----------------------------
namespace cuemu {
struct KernelEntry {
    const char* name;
    void (*call)(void**);
    int max_threads;  // __launch_bounds__'s first argument, else 1024
};

// `F(*(A0*)p[0], *(A1*)p[1], ...)`: a kernel called with cuLaunchKernel's parameter array.
template <class Sig>
struct Unpack;
template <class... A>
struct Unpack<void (*)(A...)> {
    template <void (*F)(A...), size_t... I>
    static void call(void** p, std::index_sequence<I...>) {
        F(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
    }
    static constexpr size_t ARITY = sizeof...(A);
};
template <auto F>
void trampoline(void** p) {
    using U = Unpack<decltype(F)>;
    U::template call<F>(p, std::make_index_sequence<U::ARITY>{});
}
}  // namespace cuemu

#define CUEMU_MODULE(entries)                                                                                                   \
    extern "C" const cuemu::KernelEntry* cuemu_module_kernels(int* n) {                                                       \
        *n = int(sizeof(entries) / sizeof(entries[0]));                                                                       \
        return entries;                                                                                                       \
    }                                                                                                                         \
    extern "C" int cuemu_module_launch(void (*call)(void**), const char* name, const unsigned* grid, const unsigned* block, \
                                       unsigned smem, void** params, char* err, size_t errlen) {                              \
        return cuemu::launch(call, name, grid, block, smem, params, err, errlen);                                             \
    }
