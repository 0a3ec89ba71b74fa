// cuemu host side: a stand-in libcuda.so with the driver API calls cudarc makes, running every
// kernel on the CPU through the modules build.rs compiles when S3R_CUEMU=1 (see device.h).
// Put its folder first on LD_LIBRARY_PATH (scripts/cuemu-test.sh does) and the engine's CUDA
// backend and GPU tests run unchanged on a machine without a GPU.
//
// One device, an "H100" (compute capability 9.0, 80 GB). Everything is synchronous: a launch
// has finished when cuLaunchKernel returns, so streams and events only keep order they already
// have. Device memory is host memory with an inaccessible page after each allocation (and one
// before), filled with 0xFF bytes (NaN as floats) when allocated, so an out-of-bounds access or
// a read of never-written memory shows. Copies and memsets check that they stay inside one
// allocation, and a fault inside a kernel names the kernel.
//
// CUEMU_SKIP_KERNELS=1 is a memory dry run, for shapes too large to emulate: allocations, frees
// and the pool's counters as usual, but kernels (other than the `_smem` size queries), memsets
// and the NaN fill are skipped, so device memory costs no host RAM until copied into. What
// the program reads back is then meaningless; the pool's high-water mark is what it is for.
// CUEMU_PEAK_REPORT=1 prints, whenever the program reads and resets that mark, what was live at
// the peak (allocations grouped by size, largest total first): where the memory goes. With it,
// the same report counts what happened since the last one: kernel launches (by kernel) and
// copies between host and device, the costs a real GPU pays per call whatever the kernels do.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

namespace {

enum Result : int {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_IMAGE = 200,
    NOT_FOUND = 500,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
};

using Call = void (*)(void**);
struct KernelEntry {
    const char* name;
    Call call;
    int max_threads;
};
using KernelsFn = const KernelEntry* (*)(int*);
using LaunchFn = int (*)(Call, const char*, const unsigned*, const unsigned*, unsigned, void**, char*, size_t);

struct Module {
    void* handle;
    LaunchFn launch;
    std::map<std::string, KernelEntry> kernels;
};

struct Function {
    Module* module;
    const char* name;
    Call call;
    int max_threads;
    int max_dynamic_smem = 48 * 1024;
};

struct Allocation {
    unsigned char* base;  // the mapping, guard pages included
    size_t mapped, bytes;
};

constexpr int SMEM_OPTIN_LIMIT = 227 * 1024;
constexpr uint64_t TOTAL_MEMORY = 80ull << 30;

std::mutex g_lock;
std::map<uintptr_t, Allocation> g_allocations;  // by device address
uint64_t g_used = 0, g_high = 0;
int g_context_token, g_stream_token, g_pool_token;
thread_local void* g_current_ctx = nullptr;
thread_local const char* g_running_kernel = nullptr;
bool env_flag(const char* name) {
    const char* v = getenv(name);
    return v && *v && std::strcmp(v, "0") != 0;
}
const bool g_skip_kernels = env_flag("CUEMU_SKIP_KERNELS");
const bool g_peak_report = env_flag("CUEMU_PEAK_REPORT");
std::map<size_t, size_t> g_peak_sizes;  // size -> count of live allocations at the last peak
uint64_t g_peak_snapshot = 0;           // g_used when g_peak_sizes was taken
std::map<std::string, uint64_t> g_launches;  // kernel -> launches since the last report
uint64_t g_copies[2] = {0, 0}, g_copy_bytes[2] = {0, 0};  // host->device, device->host
uint64_t g_allocs = 0, g_events = 0;                        // allocations; events created or recorded

// Called with g_lock held after g_used grew: remembers what is live at a new peak (a snapshot
// at most every MiB of growth, so ramping up stays cheap).
void note_peak() {
    if (!g_peak_report || g_used < g_peak_snapshot + (1 << 20)) return;
    g_peak_sizes.clear();
    for (const auto& a : g_allocations) ++g_peak_sizes[a.second.bytes];
    g_peak_snapshot = g_used;
}

void print_peak_report() {
    std::vector<std::pair<size_t, size_t>> rows(g_peak_sizes.begin(), g_peak_sizes.end());
    std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.first * a.second > b.first * b.second; });
    fprintf(stderr, "cuemu: peak %.3f GB; live then, by size (largest total first):\n", g_peak_snapshot / 1e9);
    for (size_t i = 0; i < rows.size() && i < 16; ++i)
        fprintf(stderr, "cuemu:   %6zu x %12zu bytes = %8.3f GB\n", rows[i].second, rows[i].first, rows[i].first * rows[i].second / 1e9);
    g_peak_sizes.clear();
    g_peak_snapshot = 0;
    uint64_t total = 0;
    std::vector<std::pair<uint64_t, std::string>> counts;
    for (const auto& l : g_launches) {
        total += l.second;
        counts.push_back({l.second, l.first});
    }
    std::sort(counts.rbegin(), counts.rend());
    fprintf(stderr,
            "cuemu: since the last report: %lu kernel launches; %lu allocations; %lu event creations or records; %lu copies host->device "
            "(%.3f GB), %lu device->host (%.3f GB)\n",
            (unsigned long)total, (unsigned long)g_allocs, (unsigned long)g_events, (unsigned long)g_copies[0], g_copy_bytes[0] / 1e9,
            (unsigned long)g_copies[1], g_copy_bytes[1] / 1e9);
    for (size_t i = 0; i < counts.size() && i < 12; ++i) fprintf(stderr, "cuemu:   %8lu x %s\n", (unsigned long)counts[i].first, counts[i].second.c_str());
    g_launches.clear();
    g_copies[0] = g_copies[1] = g_copy_bytes[0] = g_copy_bytes[1] = g_allocs = g_events = 0;
}

size_t page() { return size_t(sysconf(_SC_PAGESIZE)); }

void fault_handler(int sig, siginfo_t* info, void*) {
    if (g_running_kernel) {
        char msg[512];
        int n = snprintf(msg, sizeof msg, "cuemu: kernel %s touched %p, outside any allocation (signal %d)\n", g_running_kernel, info->si_addr, sig);
        if (write(2, msg, size_t(n)) < 0) {
        }
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = fault_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
    });
    // A fault on a fiber's guard page needs a stack of its own to be reported from.
    thread_local bool alt = false;
    if (!alt) {
        stack_t ss;
        ss.ss_size = 64 * 1024;
        ss.ss_sp = std::malloc(ss.ss_size);
        ss.ss_flags = 0;
        sigaltstack(&ss, nullptr);
        alt = true;
    }
}

// The allocation holding [p, p + n), or nullptr.
const Allocation* find(uintptr_t p, size_t n) {
    auto it = g_allocations.upper_bound(p);
    if (it == g_allocations.begin()) return nullptr;
    --it;
    return p + n <= it->first + it->second.bytes ? &it->second : nullptr;
}

Result checked(uintptr_t p, size_t n, const char* what) {
    std::lock_guard<std::mutex> l(g_lock);
    if (n == 0 || find(p, n)) return SUCCESS;
    fprintf(stderr, "cuemu: %s of %zu bytes at 0x%lx is not inside one device allocation\n", what, n, (unsigned long)p);
    return INVALID_VALUE;
}

Result allocate(uint64_t* dptr, size_t bytes) {
    const size_t pg = page(), rounded = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
    const size_t data = (rounded + pg - 1) / pg * pg, mapped = data + 2 * pg;
    void* m = mmap(nullptr, mapped, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return OUT_OF_MEMORY;
    unsigned char* base = static_cast<unsigned char*>(m);
    mprotect(base + pg, data, PROT_READ | PROT_WRITE);
    unsigned char* p = base + pg + data - rounded;  // the end touches the guard page
    if (!g_skip_kernels) std::memset(p, 0xFF, rounded);
    std::lock_guard<std::mutex> l(g_lock);
    g_allocations[uintptr_t(p)] = {base, mapped, bytes};
    g_used += bytes;
    ++g_allocs;
    if (g_used > g_high) {
        g_high = g_used;
        note_peak();
    }
    *dptr = uintptr_t(p);
    return SUCCESS;
}

Result release(uint64_t dptr) {
    std::lock_guard<std::mutex> l(g_lock);
    auto it = g_allocations.find(uintptr_t(dptr));
    if (it == g_allocations.end()) return INVALID_VALUE;
    munmap(it->second.base, it->second.mapped);
    g_used -= it->second.bytes;
    g_allocations.erase(it);
    return SUCCESS;
}

Result copy(uintptr_t dst, uintptr_t src, size_t n, bool dst_device, bool src_device) {
    if (dst_device && checked(dst, n, "copy destination")) return INVALID_VALUE;
    if (src_device && checked(src, n, "copy source")) return INVALID_VALUE;
    if (g_peak_report && dst_device != src_device) {
        std::lock_guard<std::mutex> l(g_lock);
        ++g_copies[src_device];
        g_copy_bytes[src_device] += n;
    }
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return SUCCESS;
}

template <class T>
Result fill(uint64_t dst, T value, size_t n) {
    if (checked(dst, n * sizeof(T), "memset")) return INVALID_VALUE;
    if (g_skip_kernels) return SUCCESS;
    T* p = reinterpret_cast<T*>(dst);
    for (size_t i = 0; i < n; ++i) p[i] = value;
    return SUCCESS;
}

double now_ms() { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

API int cuInit(unsigned) {
    install_fault_handler();
    return SUCCESS;
}
API int cuDriverGetVersion(int* v) {
    *v = 13000;
    return SUCCESS;
}
API int cuDeviceGetCount(int* n) {
    *n = 1;
    return SUCCESS;
}
API int cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return INVALID_VALUE;
    *d = 0;
    return SUCCESS;
}
API int cuDeviceGetName(char* name, int len, int) {
    snprintf(name, size_t(len), "cuemu (CPU emulation of an H100)");
    return SUCCESS;
}
API int cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = TOTAL_MEMORY;
    return SUCCESS;
}
API int cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 1: *v = 1024; break;                     // max threads per block
        case 2: case 3: *v = 1024; break;             // max block dim x, y
        case 4: *v = 64; break;                       // max block dim z
        case 5: *v = 2147483647; break;               // max grid dim x
        case 6: case 7: *v = 65535; break;            // max grid dim y, z
        case 8: *v = 48 * 1024; break;                // shared memory per block
        case 10: *v = 32; break;                      // warp size
        case 16: *v = 132; break;                     // multiprocessors
        case 75: *v = 9; break;                       // compute capability
        case 76: *v = 0; break;
        case 97: *v = SMEM_OPTIN_LIMIT; break;        // shared memory per block, opt-in
        case 115: *v = 1; break;                      // memory pools
        default: *v = 0;
    }
    return SUCCESS;
}
API int cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> l(g_lock);
    *total = TOTAL_MEMORY;
    *free_bytes = TOTAL_MEMORY - g_used;
    return SUCCESS;
}

API int cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = &g_context_token;
    return SUCCESS;
}
API int cuDevicePrimaryCtxRelease_v2(int) { return SUCCESS; }
API int cuCtxSetCurrent(void* ctx) {
    g_current_ctx = ctx;
    return SUCCESS;
}
API int cuCtxGetCurrent(void** ctx) {
    *ctx = g_current_ctx;
    return SUCCESS;
}
API int cuCtxSynchronize() { return SUCCESS; }

API int cuStreamCreate(void** s, unsigned) {
    *s = &g_stream_token;
    return SUCCESS;
}
API int cuStreamDestroy_v2(void*) { return SUCCESS; }
API int cuStreamSynchronize(void*) { return SUCCESS; }
API int cuStreamQuery(void*) { return SUCCESS; }
API int cuStreamWaitEvent(void*, void*, unsigned) { return SUCCESS; }

// An event is the host time it was recorded at.
void count_event() {
    if (!g_peak_report) return;
    std::lock_guard<std::mutex> l(g_lock);
    ++g_events;
}

API int cuEventCreate(void** e, unsigned) {
    count_event();
    *e = new double(0.0);
    return SUCCESS;
}
API int cuEventDestroy_v2(void* e) {
    delete static_cast<double*>(e);
    return SUCCESS;
}
API int cuEventRecord(void* e, void*) {
    count_event();
    *static_cast<double*>(e) = now_ms();
    return SUCCESS;
}
API int cuEventSynchronize(void*) { return SUCCESS; }
API int cuEventQuery(void*) { return SUCCESS; }
API int cuEventElapsedTime(float* ms, void* start, void* end) {
    *ms = float(*static_cast<double*>(end) - *static_cast<double*>(start));
    return SUCCESS;
}
API int cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

API int cuMemAlloc_v2(uint64_t* d, size_t bytes) { return allocate(d, bytes); }
API int cuMemAllocAsync(uint64_t* d, size_t bytes, void*) { return allocate(d, bytes); }
API int cuMemFree_v2(uint64_t d) { return release(d); }
API int cuMemFreeAsync(uint64_t d, void*) { return release(d); }
// Page-locked host memory is plain host memory here, filled with NaN bytes like device memory
// so that reading what was never written shows.
API int cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    size_t rounded = (bytes + 4095) / 4096 * 4096;
    *p = aligned_alloc(4096, rounded ? rounded : 4096);
    if (!*p) return OUT_OF_MEMORY;
    memset(*p, 0xFF, rounded);
    return SUCCESS;
}
API int cuMemFreeHost(void* p) {
    free(p);
    return SUCCESS;
}
API int cuMemcpyHtoD_v2(uint64_t dst, const void* src, size_t n) { return copy(dst, uintptr_t(src), n, true, false); }
API int cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t n, void*) { return copy(dst, uintptr_t(src), n, true, false); }
API int cuMemcpyDtoH_v2(void* dst, uint64_t src, size_t n) { return copy(uintptr_t(dst), src, n, false, true); }
API int cuMemcpyDtoHAsync_v2(void* dst, uint64_t src, size_t n, void*) { return copy(uintptr_t(dst), src, n, false, true); }
API int cuMemcpyDtoD_v2(uint64_t dst, uint64_t src, size_t n) { return copy(dst, src, n, true, true); }
API int cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t n, void*) { return copy(dst, src, n, true, true); }
API int cuMemsetD8_v2(uint64_t d, unsigned char v, size_t n) { return fill(d, v, n); }
API int cuMemsetD8Async(uint64_t d, unsigned char v, size_t n, void*) { return fill(d, v, n); }
API int cuMemsetD32_v2(uint64_t d, unsigned v, size_t n) { return fill(d, v, n); }
API int cuMemsetD32Async(uint64_t d, unsigned v, size_t n, void*) { return fill(d, v, n); }

// The default pool: used-memory counters as the real pool keeps them (high water resettable).
API int cuDeviceGetDefaultMemPool(void** pool, int) {
    *pool = &g_pool_token;
    return SUCCESS;
}
API int cuMemPoolSetAttribute(void*, int attr, void* value) {
    if (attr == 8) {  // CU_MEMPOOL_ATTR_USED_MEM_HIGH: reset to the current use
        std::lock_guard<std::mutex> l(g_lock);
        if (g_peak_report) print_peak_report();
        g_high = g_used;
    }
    (void)value;
    return SUCCESS;
}
API int cuMemPoolGetAttribute(void*, int attr, void* value) {
    std::lock_guard<std::mutex> l(g_lock);
    uint64_t* out = static_cast<uint64_t*>(value);
    switch (attr) {
        case 5: case 7: *out = g_used; break;  // reserved / used, current
        case 6: case 8: *out = g_high; break;  // reserved / used, high water
        default: *out = 0;
    }
    return SUCCESS;
}

// A module image is "cuemu:<path of the module's shared object>", as build.rs embeds them.
API int cuModuleLoadData(void** module, const void* image) {
    const char* text = static_cast<const char*>(image);
    if (std::strncmp(text, "cuemu:", 6) != 0) {
        fprintf(stderr, "cuemu: this binary holds real GPU kernels; build it with S3R_CUEMU=1 to run them under the emulator\n");
        return INVALID_IMAGE;
    }
    void* h = dlopen(text + 6, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "cuemu: cannot load %s: %s\n", text + 6, dlerror());
        return INVALID_IMAGE;
    }
    auto kernels = reinterpret_cast<KernelsFn>(dlsym(h, "cuemu_module_kernels"));
    auto launch = reinterpret_cast<LaunchFn>(dlsym(h, "cuemu_module_launch"));
    if (!kernels || !launch) return INVALID_IMAGE;
    Module* m = new Module{h, launch, {}};
    int n = 0;
    const KernelEntry* e = kernels(&n);
    for (int i = 0; i < n; ++i) m->kernels[e[i].name] = e[i];
    *module = m;
    return SUCCESS;
}
API int cuModuleUnload(void*) { return SUCCESS; }  // kept loaded: functions may outlive it
API int cuModuleGetFunction(void** f, void* module, const char* name) {
    Module* m = static_cast<Module*>(module);
    auto it = m->kernels.find(name);
    if (it == m->kernels.end()) return NOT_FOUND;
    *f = new Function{m, it->first.c_str(), it->second.call, it->second.max_threads};
    return SUCCESS;
}
API int cuFuncSetAttribute(void* f, int attr, int value) {
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > SMEM_OPTIN_LIMIT) return INVALID_VALUE;
        static_cast<Function*>(f)->max_dynamic_smem = value;
    }
    return SUCCESS;
}
API int cuFuncGetAttribute(int* v, int attr, void* f) {
    switch (attr) {
        case 0: *v = static_cast<Function*>(f)->max_threads; break;
        case 8: *v = static_cast<Function*>(f)->max_dynamic_smem; break;
        default: *v = 0;
    }
    return SUCCESS;
}

API int cuLaunchKernel(void* func, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned smem, void*,
                       void** params, void** extra) {
    Function* f = static_cast<Function*>(func);
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    const char* bad = nullptr;
    if (extra) bad = "the `extra` parameter form is not supported";
    else if (!gx || !gy || !gz || !bx || !by || !bz) bad = "a zero grid or block dimension";
    else if (uint64_t(bx) * by * bz > 1024 || bz > 64) bad = "more than 1024 threads (or 64 in z) per block";
    else if (uint64_t(bx) * by * bz > uint64_t(f->max_threads)) bad = "more threads per block than the kernel's __launch_bounds__";
    else if (gy > 65535 || gz > 65535) bad = "grid y or z above 65535";
    else if (int(smem) > f->max_dynamic_smem) bad = "more dynamic shared memory than the kernel's attribute allows";
    if (bad) {
        fprintf(stderr, "cuemu: launch of %s (grid %u,%u,%u block %u,%u,%u, %u bytes shared): %s\n", f->name, gx, gy, gz, bx, by, bz, smem, bad);
        return INVALID_VALUE;
    }
    if (g_peak_report) {
        std::lock_guard<std::mutex> l(g_lock);
        ++g_launches[f->name];
    }
    const size_t len = std::strlen(f->name);
    if (g_skip_kernels && !(len > 5 && std::strcmp(f->name + len - 5, "_smem") == 0)) return SUCCESS;
    install_fault_handler();
    char err[512] = {0};
    g_running_kernel = f->name;
    int r = f->module->launch(f->call, f->name, grid, block, smem, params, err, sizeof err);
    g_running_kernel = nullptr;
    if (r) {
        fprintf(stderr, "%s\n", err);
        return LAUNCH_FAILED;
    }
    return SUCCESS;
}

namespace {
// The results this driver returns: (code, name, description).
struct ErrorText {
    int code;
    const char *name, *text;
};
constexpr ErrorText ERRORS[] = {
    {SUCCESS, "CUDA_SUCCESS", "no error"},
    {INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument (cuemu: see its message above)"},
    {OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid (cuemu: see its message above)"},
    {NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure (cuemu: see its message above)"},
    {NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "cuemu: unsupported call"},
};

const ErrorText& error_text(int e) {
    for (const ErrorText& t : ERRORS)
        if (t.code == e) return t;
    return ERRORS[sizeof ERRORS / sizeof ERRORS[0] - 1];
}
}  // namespace

API int cuGetErrorString(int e, const char** s) {
    *s = error_text(e).text;
    return SUCCESS;
}
API int cuGetErrorName(int e, const char** s) {
    *s = error_text(e).name;
    return SUCCESS;
}
