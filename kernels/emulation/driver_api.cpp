// driver_api.cpp — the CUDA driver API entry points of the emulated device, as cudarc 0.19 calls them:
// init, one device (compute capability 9.0, 132 SMs, memory pools supported as on an H100/H200, so
// cudarc allocates and frees stream-ordered, without the synchronize its plain cuMemFree path needs),
// the primary context, streams, events, memory, modules from PTX, launches. Per-thread call counts
// (host waits, copies, launches) let tests count a step's host round trips.
//
// Everything runs synchronously on the calling thread: a copy or a launch has finished when its call
// returns, so streams and events only need to exist (an event records the host clock). A launch that
// faults (out-of-bounds access, misaligned vector access, a red zone overwritten) fails with
// CUDA_ERROR_ILLEGAL_ADDRESS / CUDA_ERROR_MISALIGNED_ADDRESS from cuLaunchKernel itself, and
// `halo_emu_last_error` names the kernel and the address. Unlike the device, errors are not sticky:
// the context stays usable, so one test's planted fault does not fail the rest.
#undef _FORTIFY_SOURCE  // siglongjmp leaves a fiber stack for the launching thread's: not a bug here
#include "emulated_driver.h"

#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include <chrono>
#include <mutex>
#include <set>
#include <string>
#include <vector>

// ---- the driver's handle types (opaque to callers) ----------------------------------------------
struct CUctx_st {
    int device;
};
struct CUstream_st {
    int unused;
};
struct CUevent_st {
    bool recorded = false;
    double time_ms = 0.0;
};
struct CUfunc_st;
struct CUmod_st {
    std::vector<CUfunc_st*> functions;
};
struct CUfunc_st {
    std::string name;
    const halo_driver::KernelEntry* kernel;
};

typedef int CUresult;
typedef int CUdevice;
typedef uint64_t CUdeviceptr;  // cuda.h: unsigned long long, the same 64 bits
typedef CUctx_st* CUcontext;
typedef CUstream_st* CUstream;
typedef CUevent_st* CUevent;
typedef CUmod_st* CUmodule;
typedef CUfunc_st* CUfunction;

using namespace halo_driver;

namespace {

thread_local std::string t_last_error;
thread_local CUcontext t_current_ctx = nullptr;

// What this thread asked of the device, for tests that count host round trips (the emulated device
// runs every call on the calling thread, so a step's calls are exactly its thread's).
// A host wait is a call after which the host holds the device's results: a stream, context or event
// synchronize, or a synchronous device-to-host copy. On a GPU each is a round trip of the host.
struct CallCounts {
    uint64_t host_waits = 0;
    uint64_t device_to_host_copies = 0;
    uint64_t host_to_device_copies = 0;
    uint64_t kernel_launches = 0;
    uint64_t allocations = 0;
};
thread_local CallCounts t_counts;

CUctx_st g_primary_ctx{0};
bool g_initialized = false;

struct Handles {
    std::mutex mutex;
    std::set<CUstream> streams;
    std::set<CUevent> events;
    std::set<CUmodule> modules;
};
Handles& handles() {
    static Handles h;
    return h;
}

Result not_initialized(const char* call) {
    return fail(ERROR_NOT_INITIALIZED, std::string(call) + ": cuInit has not been called");
}

#define REQUIRE_INIT(call) \
    if (!g_initialized) return not_initialized(call)

// The null stream, the per-thread stream (0x1, 0x2) or one this library created.
bool valid_stream(CUstream s) {
    if (s == nullptr || s == reinterpret_cast<CUstream>(0x1) || s == reinterpret_cast<CUstream>(0x2)) return true;
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    return h.streams.count(s) != 0;
}

#define REQUIRE_STREAM(call, s) \
    if (!valid_stream(s)) return fail(ERROR_INVALID_HANDLE, std::string(call) + ": unknown stream")

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// ---- faults inside a kernel ---------------------------------------------------------------------
//
// While a launch runs, the launching thread has a jump buffer; a fault (SIGSEGV/SIGBUS on a guard
// page or anywhere else, or a misaligned vector access found by cuda_host.h) jumps back to the launch,
// which reports it. A fault on any other thread, or outside a launch, goes to the previous handler
// (Rust's stack-overflow handler, or the default action).

thread_local sigjmp_buf* t_launch_jump = nullptr;
thread_local uintptr_t t_fault_addr = 0;

struct sigaction g_previous_segv, g_previous_bus;

void on_fault(int sig, siginfo_t* info, void* context) {
    if (t_launch_jump != nullptr) {
        t_fault_addr = reinterpret_cast<uintptr_t>(info->si_addr);
        siglongjmp(*t_launch_jump, FAULT_SEGV);
    }
    const struct sigaction& prev = sig == SIGSEGV ? g_previous_segv : g_previous_bus;
    if ((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction != nullptr) {
        prev.sa_sigaction(sig, info, context);
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN && prev.sa_handler != nullptr) {
        prev.sa_handler(sig);
    } else {
        // Default action: returning re-executes the faulting access, which then kills the process.
        signal(sig, SIG_DFL);
    }
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_previous_segv);
        sigaction(SIGBUS, &sa, &g_previous_bus);
    });
}

std::string hex(uintptr_t a) {
    char buf[32];
    snprintf(buf, sizeof buf, "%#llx", (unsigned long long)a);
    return buf;
}

// Runs `f` with the launch lock held and faults trapped; SUCCESS or the fault, described.
Result run_trapped(CUfunction f, const LaunchShape& shape, void** params) {
    lock_launches();
    sigjmp_buf jump;
    volatile int kind = sigsetjmp(jump, 1);
    if (kind == FAULT_NONE) {
        t_fault_addr = 0;
        t_launch_jump = &jump;
        f->kernel->run(shape, params);
    }
    t_launch_jump = nullptr;
    const uintptr_t addr = t_fault_addr;
    // A kernel that ran to the end may still have written past an allocation, into its red zone.
    std::string overwritten = check_red_zones();
    unlock_launches();
    const std::string kernel = "kernel `" + f->name + "`";
    if (kind == FAULT_MISALIGNED) {
        return fail(ERROR_MISALIGNED_ADDRESS,
                    kernel + ": misaligned 16-byte vector access at " + hex(addr) + " (" + describe_address(addr) + ")");
    }
    if (kind == FAULT_SEGV) {
        return fail(ERROR_ILLEGAL_ADDRESS, kernel + ": out-of-bounds access at " + describe_address(addr));
    }
    if (!overwritten.empty()) return fail(ERROR_ILLEGAL_ADDRESS, kernel + ": out-of-bounds write at " + overwritten);
    return SUCCESS;
}

// `.entry NAME(` lines of a PTX module and, for each, the byte size of every `.param`.
struct PtxEntry {
    std::string name;
    std::vector<size_t> param_sizes;
};

size_t ptx_param_size(const std::string& decl) {
    // `.param .u64 .ptr .global .align 4 NAME` or `.param .align 8 .b8 NAME[24]`
    const size_t bracket = decl.find('[');
    if (bracket != std::string::npos) return size_t(strtoull(decl.c_str() + bracket + 1, nullptr, 10));
    static const char* const widths[][2] = {{"64", "8"}, {"32", "4"}, {"16", "2"}, {"8", "1"}};
    for (const char* type : {".u", ".s", ".b", ".f"}) {
        for (const auto& w : widths) {
            const std::string t = std::string(type) + w[0] + " ";
            if (decl.find(t) != std::string::npos) return size_t(atoi(w[1]));
        }
    }
    return 0;
}

std::vector<PtxEntry> parse_ptx_entries(const char* ptx) {
    std::vector<PtxEntry> entries;
    const std::string text(ptx);
    size_t pos = 0;
    while ((pos = text.find(".entry", pos)) != std::string::npos) {
        pos += 6;
        size_t start = text.find_first_not_of(" \t", pos);
        size_t end = start;
        while (end < text.size() && (isalnum((unsigned char)text[end]) || text[end] == '_' || text[end] == '$')) end++;
        PtxEntry e;
        e.name = text.substr(start, end - start);
        const size_t open = text.find('(', end);
        const size_t close = open == std::string::npos ? open : text.find(')', open);
        if (open != std::string::npos && close != std::string::npos && text.find('{', end) > open) {
            std::string params = text.substr(open + 1, close - open - 1);
            size_t p = 0;
            while ((p = params.find(".param", p)) != std::string::npos) {
                size_t stop = params.find(',', p);
                if (stop == std::string::npos) stop = params.size();
                e.param_sizes.push_back(ptx_param_size(params.substr(p, stop - p) + " "));
                p = stop;
            }
        }
        if (!e.name.empty()) entries.push_back(e);
        pos = end;
    }
    return entries;
}

std::string join_sizes(const std::vector<size_t>& v) {
    std::string s = "(";
    for (size_t i = 0; i < v.size(); i++) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + ")";
}

// Every CUresult this library returns: cuda.h's name and cuGetErrorString's text.
struct ErrorText {
    Result code;
    const char* name;
    const char* text;
};
constexpr ErrorText ERROR_TEXTS[] = {
    {SUCCESS, "CUDA_SUCCESS", "no error"},
    {ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {ERROR_INVALID_PTX, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {ERROR_MISALIGNED_ADDRESS, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"},
    {ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

const ErrorText* error_text(CUresult code) {
    for (const ErrorText& e : ERROR_TEXTS)
        if (e.code == code) return &e;
    return nullptr;
}

// Device properties: an H100/H200-like Hopper part (what the kernels are tuned for).
constexpr int COMPUTE_MAJOR = 9, COMPUTE_MINOR = 0, SM_COUNT = 132;
constexpr unsigned MAX_THREADS_PER_BLOCK = 1024, MAX_SHARED_PER_BLOCK = 48 * 1024;

}  // namespace

namespace halo_driver {
Result fail(Result code, const std::string& detail) {
    t_last_error = std::string(error_text(code)->name) + ": " + detail;
    return code;
}
}  // namespace halo_driver

namespace halo_emu {
// cuda_host.h: a fault found by the emulation itself (a misaligned vector access).
[[noreturn]] void fault(int kind, const void* addr) {
    t_fault_addr = reinterpret_cast<uintptr_t>(addr);
    if (t_launch_jump == nullptr) {
        fprintf(stderr, "halo emulated device: fault %d at %p outside a launch\n", kind, addr);
        abort();
    }
    siglongjmp(*t_launch_jump, kind);
}
}  // namespace halo_emu

extern "C" {

// ---- this library's own entry points (not CUDA's) -----------------------------------------------

// What the last failing call of this thread was about ("CUDA_ERROR_…: detail"), copied into `buf`
// (truncated to fit) and then forgotten; returns the full length (without NUL), 0 when none.
size_t halo_emu_take_last_error(char* buf, size_t len) {
    const size_t full = t_last_error.size();
    if (buf != nullptr && len > 0) {
        size_t n = full < len - 1 ? full : len - 1;
        memcpy(buf, t_last_error.data(), n);
        buf[n] = '\0';
    }
    t_last_error.clear();
    return full;
}

// This thread's call counts since it started (or since the last reset), as five u64s in the order
// of `CallCounts`; `reset` non-zero zeroes them after reading.
void halo_emu_call_counts(uint64_t* out, int reset) {
    if (out != nullptr) {
        out[0] = t_counts.host_waits;
        out[1] = t_counts.device_to_host_copies;
        out[2] = t_counts.host_to_device_copies;
        out[3] = t_counts.kernel_launches;
        out[4] = t_counts.allocations;
    }
    if (reset) t_counts = CallCounts{};
}

// 1: this is the emulated driver (a cheap way for the host to tell which libcuda it got).
int halo_emu_is_emulated_driver() { return 1; }

// ---- initialisation, version, errors --------------------------------------------------------------

CUresult cuInit(unsigned flags) {
    if (flags != 0) return fail(ERROR_INVALID_VALUE, "cuInit: flags must be 0");
    install_fault_handler();
    g_initialized = true;
    return SUCCESS;
}

CUresult cuDriverGetVersion(int* version) {
    if (version == nullptr) return fail(ERROR_INVALID_VALUE, "cuDriverGetVersion: null pointer");
    *version = 13000;  // CUDA 13.0, as the lent GPUs' driver 580
    return SUCCESS;
}

CUresult cuGetErrorName(CUresult code, const char** out) {
    const ErrorText* e = error_text(code);
    const char* s = e ? e->name : nullptr;
    if (out == nullptr || s == nullptr) {
        if (out) *out = nullptr;
        return ERROR_INVALID_VALUE;
    }
    *out = s;
    return SUCCESS;
}

CUresult cuGetErrorString(CUresult code, const char** out) {
    const ErrorText* e = error_text(code);
    const char* s = e ? e->text : nullptr;
    if (out == nullptr || s == nullptr) {
        if (out) *out = nullptr;
        return ERROR_INVALID_VALUE;
    }
    *out = s;
    return SUCCESS;
}

// ---- device -----------------------------------------------------------------------------------

CUresult cuDeviceGetCount(int* count) {
    REQUIRE_INIT("cuDeviceGetCount");
    if (count == nullptr) return fail(ERROR_INVALID_VALUE, "cuDeviceGetCount: null pointer");
    *count = 1;
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    REQUIRE_INIT("cuDeviceGet");
    if (device == nullptr) return fail(ERROR_INVALID_VALUE, "cuDeviceGet: null pointer");
    if (ordinal != 0) {
        return fail(ERROR_INVALID_DEVICE,
                    "cuDeviceGet: device " + std::to_string(ordinal) + " requested, the emulation has one device (0)");
    }
    *device = 0;
    return SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice device) {
    REQUIRE_INIT("cuDeviceGetName");
    if (device != 0) return fail(ERROR_INVALID_DEVICE, "cuDeviceGetName: no such device");
    if (name == nullptr || len <= 0) return fail(ERROR_INVALID_VALUE, "cuDeviceGetName: no buffer");
    snprintf(name, size_t(len), "%s", "halo-kernels emulated CUDA device (host CPU)");
    return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice device) {
    REQUIRE_INIT("cuDeviceTotalMem");
    if (device != 0) return fail(ERROR_INVALID_DEVICE, "cuDeviceTotalMem: no such device");
    if (bytes == nullptr) return fail(ERROR_INVALID_VALUE, "cuDeviceTotalMem: null pointer");
    *bytes = mem_capacity();
    return SUCCESS;
}

CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice device) {
    REQUIRE_INIT("cuDeviceGetAttribute");
    if (device != 0) return fail(ERROR_INVALID_DEVICE, "cuDeviceGetAttribute: no such device");
    if (value == nullptr) return fail(ERROR_INVALID_VALUE, "cuDeviceGetAttribute: null pointer");
    switch (attribute) {
        case 1: *value = int(MAX_THREADS_PER_BLOCK); return SUCCESS;      // MAX_THREADS_PER_BLOCK
        case 2: *value = int(MAX_THREADS_PER_BLOCK); return SUCCESS;      // MAX_BLOCK_DIM_X
        case 3: case 4: *value = 1; return SUCCESS;                       // MAX_BLOCK_DIM_Y/Z: 1-D only
        case 5: *value = 2147483647; return SUCCESS;                      // MAX_GRID_DIM_X
        case 6: case 7: *value = 1; return SUCCESS;                       // MAX_GRID_DIM_Y/Z: 1-D only
        case 8: *value = int(MAX_SHARED_PER_BLOCK); return SUCCESS;       // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *value = 32; return SUCCESS;                             // WARP_SIZE
        case 16: *value = SM_COUNT; return SUCCESS;                       // MULTIPROCESSOR_COUNT
        case 18: *value = 0; return SUCCESS;                              // INTEGRATED
        case 39: *value = 2048; return SUCCESS;                           // MAX_THREADS_PER_MULTIPROCESSOR
        case 41: *value = 1; return SUCCESS;                              // UNIFIED_ADDRESSING
        case 75: *value = COMPUTE_MAJOR; return SUCCESS;                  // COMPUTE_CAPABILITY_MAJOR
        case 76: *value = COMPUTE_MINOR; return SUCCESS;                  // COMPUTE_CAPABILITY_MINOR
        case 83: case 89: *value = 0; return SUCCESS;                     // MANAGED_MEMORY, CONCURRENT_MANAGED_ACCESS
        case 97: *value = int(MAX_SHARED_PER_BLOCK); return SUCCESS;      // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *value = 1; return SUCCESS;                             // MEMORY_POOLS_SUPPORTED, as an H100/H200
        default:
            return fail(ERROR_NOT_SUPPORTED,
                        "cuDeviceGetAttribute: attribute " + std::to_string(attribute) + " is not emulated");
    }
}

// ---- contexts -----------------------------------------------------------------------------------

CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice device) {
    REQUIRE_INIT("cuDevicePrimaryCtxRetain");
    if (device != 0) return fail(ERROR_INVALID_DEVICE, "cuDevicePrimaryCtxRetain: no such device");
    if (ctx == nullptr) return fail(ERROR_INVALID_VALUE, "cuDevicePrimaryCtxRetain: null pointer");
    *ctx = &g_primary_ctx;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
    if (device != 0) return fail(ERROR_INVALID_DEVICE, "cuDevicePrimaryCtxRelease: no such device");
    return SUCCESS;
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
    REQUIRE_INIT("cuCtxSetCurrent");
    if (ctx != nullptr && ctx != &g_primary_ctx) return fail(ERROR_INVALID_CONTEXT, "cuCtxSetCurrent: unknown context");
    t_current_ctx = ctx;
    return SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext* ctx) {
    REQUIRE_INIT("cuCtxGetCurrent");
    if (ctx == nullptr) return fail(ERROR_INVALID_VALUE, "cuCtxGetCurrent: null pointer");
    *ctx = t_current_ctx;
    return SUCCESS;
}

CUresult cuCtxSynchronize() {
    REQUIRE_INIT("cuCtxSynchronize");
    t_counts.host_waits++;
    return SUCCESS;  // every call has finished when it returns
}

CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = 0;
    return SUCCESS;
}

// ---- streams and events -------------------------------------------------------------------------

CUresult cuStreamCreate(CUstream* stream, unsigned flags) {
    REQUIRE_INIT("cuStreamCreate");
    (void)flags;
    if (stream == nullptr) return fail(ERROR_INVALID_VALUE, "cuStreamCreate: null pointer");
    CUstream s = new CUstream_st{0};
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    h.streams.insert(s);
    *stream = s;
    return SUCCESS;
}

CUresult cuStreamCreateWithPriority(CUstream* stream, unsigned flags, int priority) {
    (void)priority;
    return cuStreamCreate(stream, flags);
}

CUresult cuStreamDestroy_v2(CUstream stream) {
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    if (h.streams.erase(stream) == 0) return fail(ERROR_INVALID_HANDLE, "cuStreamDestroy: unknown stream");
    delete stream;
    return SUCCESS;
}

CUresult cuStreamSynchronize(CUstream stream) {
    REQUIRE_INIT("cuStreamSynchronize");
    REQUIRE_STREAM("cuStreamSynchronize", stream);
    t_counts.host_waits++;
    return SUCCESS;
}

CUresult cuStreamQuery(CUstream stream) {
    REQUIRE_STREAM("cuStreamQuery", stream);
    return SUCCESS;
}

CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned flags) {
    (void)flags;
    REQUIRE_STREAM("cuStreamWaitEvent", stream);
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    if (h.events.count(event) == 0) return fail(ERROR_INVALID_HANDLE, "cuStreamWaitEvent: unknown event");
    return SUCCESS;
}

CUresult cuEventCreate(CUevent* event, unsigned flags) {
    REQUIRE_INIT("cuEventCreate");
    (void)flags;
    if (event == nullptr) return fail(ERROR_INVALID_VALUE, "cuEventCreate: null pointer");
    CUevent e = new CUevent_st();
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    h.events.insert(e);
    *event = e;
    return SUCCESS;
}

CUresult cuEventDestroy_v2(CUevent event) {
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    if (h.events.erase(event) == 0) return fail(ERROR_INVALID_HANDLE, "cuEventDestroy: unknown event");
    delete event;
    return SUCCESS;
}

CUresult cuEventRecord(CUevent event, CUstream stream) {
    REQUIRE_STREAM("cuEventRecord", stream);
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    if (h.events.count(event) == 0) return fail(ERROR_INVALID_HANDLE, "cuEventRecord: unknown event");
    event->recorded = true;
    event->time_ms = now_ms();
    return SUCCESS;
}

// An event that exists has completed (every call finishes before it returns).
static Result event_known(CUevent event, const char* call) {
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    if (h.events.count(event) == 0) return fail(ERROR_INVALID_HANDLE, std::string(call) + ": unknown event");
    return SUCCESS;
}

CUresult cuEventSynchronize(CUevent event) {
    Result r = event_known(event, "cuEventSynchronize");
    if (r == SUCCESS) t_counts.host_waits++;
    return r;
}

CUresult cuEventQuery(CUevent event) { return event_known(event, "cuEventQuery"); }

// Host milliseconds between the two records: the emulation's time, nothing about a GPU's.
CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    if (ms == nullptr) return fail(ERROR_INVALID_VALUE, "cuEventElapsedTime: null pointer");
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    if (h.events.count(start) == 0 || h.events.count(end) == 0)
        return fail(ERROR_INVALID_HANDLE, "cuEventElapsedTime: unknown event");
    if (!start->recorded || !end->recorded)
        return fail(ERROR_INVALID_HANDLE, "cuEventElapsedTime: an event was never recorded");
    *ms = float(end->time_ms - start->time_ms);
    return SUCCESS;
}

CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) { return cuEventElapsedTime(ms, start, end); }

// ---- memory -------------------------------------------------------------------------------------

CUresult cuMemAlloc_v2(CUdeviceptr* ptr, size_t bytes) {
    REQUIRE_INIT("cuMemAlloc");
    t_counts.allocations++;
    return mem_alloc(ptr, bytes, "cuMemAlloc");
}

CUresult cuMemAllocAsync(CUdeviceptr* ptr, size_t bytes, CUstream stream) {
    REQUIRE_INIT("cuMemAllocAsync");
    REQUIRE_STREAM("cuMemAllocAsync", stream);
    t_counts.allocations++;
    return mem_alloc(ptr, bytes, "cuMemAllocAsync");
}

CUresult cuMemFree_v2(CUdeviceptr ptr) {
    REQUIRE_INIT("cuMemFree");
    return mem_free(ptr, "cuMemFree");
}

CUresult cuMemFreeAsync(CUdeviceptr ptr, CUstream stream) {
    REQUIRE_INIT("cuMemFreeAsync");
    REQUIRE_STREAM("cuMemFreeAsync", stream);
    return mem_free(ptr, "cuMemFreeAsync");
}

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total_bytes) {
    REQUIRE_INIT("cuMemGetInfo");
    if (free_bytes == nullptr || total_bytes == nullptr) return fail(ERROR_INVALID_VALUE, "cuMemGetInfo: null pointer");
    mem_info(free_bytes, total_bytes);
    return SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    REQUIRE_INIT("cuMemcpyHtoD");
    t_counts.host_to_device_copies++;
    if (bytes == 0) return SUCCESS;
    if (src == nullptr) return fail(ERROR_INVALID_VALUE, "cuMemcpyHtoD: null host pointer");
    Result r = check_range(dst, bytes, "cuMemcpyHtoD", "destination");
    if (r != SUCCESS) return r;
    memcpy(reinterpret_cast<void*>(uintptr_t(dst)), src, bytes);
    return SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream stream) {
    REQUIRE_STREAM("cuMemcpyHtoDAsync", stream);
    return cuMemcpyHtoD_v2(dst, src, bytes);
}

static Result copy_device_to_host(void* dst, CUdeviceptr src, size_t bytes) {
    REQUIRE_INIT("cuMemcpyDtoH");
    t_counts.device_to_host_copies++;
    if (bytes == 0) return SUCCESS;
    if (dst == nullptr) return fail(ERROR_INVALID_VALUE, "cuMemcpyDtoH: null host pointer");
    Result r = check_range(src, bytes, "cuMemcpyDtoH", "source");
    if (r != SUCCESS) return r;
    memcpy(dst, reinterpret_cast<const void*>(uintptr_t(src)), bytes);
    return SUCCESS;
}

// Synchronous: the host waits for the copy (a round trip on a GPU).
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    t_counts.host_waits++;
    return copy_device_to_host(dst, src, bytes);
}

// Queued: the host waits only at the next synchronize.
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream stream) {
    REQUIRE_STREAM("cuMemcpyDtoHAsync", stream);
    return copy_device_to_host(dst, src, bytes);
}

CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    REQUIRE_INIT("cuMemcpyDtoD");
    if (bytes == 0) return SUCCESS;
    Result r = check_range(src, bytes, "cuMemcpyDtoD", "source");
    if (r == SUCCESS) r = check_range(dst, bytes, "cuMemcpyDtoD", "destination");
    if (r != SUCCESS) return r;
    memmove(reinterpret_cast<void*>(uintptr_t(dst)), reinterpret_cast<const void*>(uintptr_t(src)), bytes);
    return SUCCESS;
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream) {
    REQUIRE_STREAM("cuMemcpyDtoDAsync", stream);
    return cuMemcpyDtoD_v2(dst, src, bytes);
}

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t count) {
    REQUIRE_INIT("cuMemsetD8");
    if (count == 0) return SUCCESS;
    Result r = check_range(dst, count, "cuMemsetD8", "destination");
    if (r != SUCCESS) return r;
    memset(reinterpret_cast<void*>(uintptr_t(dst)), value, count);
    return SUCCESS;
}

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t count, CUstream stream) {
    REQUIRE_STREAM("cuMemsetD8Async", stream);
    return cuMemsetD8_v2(dst, value, count);
}

CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned value, size_t count, CUstream stream) {
    REQUIRE_INIT("cuMemsetD32Async");
    REQUIRE_STREAM("cuMemsetD32Async", stream);
    if (count == 0) return SUCCESS;
    if (dst % 4 != 0) return fail(ERROR_INVALID_VALUE, "cuMemsetD32Async: destination not 4-byte aligned");
    Result r = check_range(dst, count * 4, "cuMemsetD32Async", "destination");
    if (r != SUCCESS) return r;
    unsigned* p = reinterpret_cast<unsigned*>(uintptr_t(dst));
    for (size_t i = 0; i < count; i++) p[i] = value;
    return SUCCESS;
}

// ---- modules and kernels ------------------------------------------------------------------------

// The "PTX" is read only for its `.entry` names and parameter sizes: each entry must have a
// host-compiled twin (kernel_registry.cpp) whose C++ parameters have the same sizes, or the load
// fails naming the kernel. What runs is always the host build of the same kernels/*.cu source.
CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    REQUIRE_INIT("cuModuleLoadData");
    if (module == nullptr || image == nullptr) return fail(ERROR_INVALID_VALUE, "cuModuleLoadData: null pointer");
    const std::vector<PtxEntry> entries = parse_ptx_entries(static_cast<const char*>(image));
    if (entries.empty()) return fail(ERROR_INVALID_PTX, "cuModuleLoadData: the image defines no `.entry`");
    CUmodule m = new CUmod_st();
    for (const PtxEntry& e : entries) {
        const KernelEntry* k = find_kernel(e.name);
        std::string problem;
        if (k == nullptr) {
            problem = "PTX entry `" + e.name + "` has no host-compiled twin in the emulated device "
                      "(add it to kernels/emulation/kernel_registry.cpp)";
        } else if (!e.param_sizes.empty() && e.param_sizes != k->param_sizes()) {
            problem = "PTX entry `" + e.name + "` takes parameters of " + join_sizes(e.param_sizes) +
                      " bytes but its host build takes " + join_sizes(k->param_sizes()) + " (stale build?)";
        }
        if (!problem.empty()) {
            for (CUfunction f : m->functions) delete f;
            delete m;
            return fail(ERROR_NOT_FOUND, "cuModuleLoadData: " + problem);
        }
        m->functions.push_back(new CUfunc_st{e.name, k});
    }
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    h.modules.insert(m);
    *module = m;
    return SUCCESS;
}

CUresult cuModuleUnload(CUmodule module) {
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    if (h.modules.erase(module) == 0) return fail(ERROR_INVALID_HANDLE, "cuModuleUnload: unknown module");
    for (CUfunction f : module->functions) delete f;
    delete module;
    return SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction* function, CUmodule module, const char* name) {
    if (function == nullptr || name == nullptr) return fail(ERROR_INVALID_VALUE, "cuModuleGetFunction: null pointer");
    Handles& h = handles();
    std::lock_guard<std::mutex> lock(h.mutex);
    if (h.modules.count(module) == 0) return fail(ERROR_INVALID_HANDLE, "cuModuleGetFunction: unknown module");
    for (CUfunction f : module->functions) {
        if (f->name == name) {
            *function = f;
            return SUCCESS;
        }
    }
    return fail(ERROR_NOT_FOUND, std::string("cuModuleGetFunction: the module has no kernel `") + name + "`");
}

CUresult cuFuncGetAttribute(int* value, int attribute, CUfunction function) {
    (void)value;
    (void)function;
    return fail(ERROR_NOT_SUPPORTED, "cuFuncGetAttribute: attribute " + std::to_string(attribute) + " is not emulated");
}

CUresult cuLaunchKernel(CUfunction f, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x,
                        unsigned block_y, unsigned block_z, unsigned shared_bytes, CUstream stream, void** params,
                        void** extra) {
    REQUIRE_INIT("cuLaunchKernel");
    REQUIRE_STREAM("cuLaunchKernel", stream);
    if (f == nullptr) return fail(ERROR_INVALID_HANDLE, "cuLaunchKernel: null function");
    const std::string kernel = "cuLaunchKernel(`" + f->name + "`)";
    if (extra != nullptr) return fail(ERROR_NOT_SUPPORTED, kernel + ": `extra` launch parameters are not emulated");
    if (grid_x == 0 || grid_y == 0 || grid_z == 0 || block_x == 0 || block_y == 0 || block_z == 0)
        return fail(ERROR_INVALID_VALUE, kernel + ": a grid or block dimension is 0");
    if (grid_y != 1 || grid_z != 1 || block_y != 1 || block_z != 1)
        return fail(ERROR_NOT_SUPPORTED, kernel + ": only 1-D grids and blocks are emulated");
    if (block_x > MAX_THREADS_PER_BLOCK)
        return fail(ERROR_INVALID_VALUE, kernel + ": " + std::to_string(block_x) + " threads per block (max 1024)");
    if (grid_x > 2147483647u) return fail(ERROR_INVALID_VALUE, kernel + ": grid larger than 2^31 - 1 blocks");
    if (shared_bytes > MAX_SHARED_PER_BLOCK)
        return fail(ERROR_INVALID_VALUE, kernel + ": " + std::to_string(shared_bytes) +
                                             " bytes of dynamic shared memory (max 49152)");
    const size_t n_params = f->kernel->param_sizes().size();
    if (n_params > 0 && params == nullptr) return fail(ERROR_INVALID_VALUE, kernel + ": null kernelParams");
    for (size_t i = 0; i < n_params; i++)
        if (params[i] == nullptr)
            return fail(ERROR_INVALID_VALUE, kernel + ": kernelParams[" + std::to_string(i) + "] is null");
    const LaunchShape shape{grid_x, block_x, shared_bytes};
    t_counts.kernel_launches++;
    return run_trapped(f, shape, params);
}

// ---- pinned host memory (plain host memory here) ------------------------------------------------

CUresult cuMemHostAlloc(void** ptr, size_t bytes, unsigned flags) {
    (void)flags;
    if (ptr == nullptr || bytes == 0) return fail(ERROR_INVALID_VALUE, "cuMemHostAlloc: bad arguments");
    *ptr = aligned_alloc(64, (bytes + 63) / 64 * 64);
    return *ptr ? SUCCESS : fail(ERROR_OUT_OF_MEMORY, "cuMemHostAlloc: out of host memory");
}

CUresult cuMemFreeHost(void* ptr) {
    free(ptr);
    return SUCCESS;
}

}  // extern "C"
