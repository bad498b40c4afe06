// cublas_api.cpp — the emulated cuBLAS library (libhalo_cublas_emulated.so, soname libcublas.so):
// the entry points cudarc 0.19 calls for this crate's GEMM wrapper (src/cuda/gemm.rs). cudarc
// resolves each symbol on its first call, so only these need exist. Handles live here; the GEMM runs
// in the emulated driver library (cublas_gemm.cpp), on its device memory (see cublas_emulated.h).
//
// A handle can only be created while the emulated driver is loaded in the process (cuBLAS needs a
// CUDA context too): otherwise cublasCreate_v2 returns CUBLAS_STATUS_NOT_INITIALIZED.
#include "cublas_emulated.h"

#include <dlfcn.h>

#include <mutex>
#include <set>
#include <string>

struct cublasContext {
    void* stream = nullptr;  // CUstream of the emulated driver (its calls are synchronous anyway)
};
typedef cublasContext* cublasHandle_t;

using namespace halo_cublas;

namespace {

typedef int (*GemmFn)(int, int, int, int, int, const void*, uint64_t, int, int, uint64_t, int, int, const void*,
                      uint64_t, int, int, int, int);
typedef void (*SetErrorFn)(const char*);

struct Driver {
    GemmFn gemm = nullptr;
    SetErrorFn set_error = nullptr;
};

// The emulated driver's entry points, looked up by its soname among the loaded libraries only.
Driver driver() {
    Driver d;
    void* lib = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) return d;
    if (dlsym(lib, "halo_emu_is_emulated_driver") != nullptr) {
        d.gemm = reinterpret_cast<GemmFn>(dlsym(lib, "halo_emu_cublas_gemm_ex"));
        d.set_error = reinterpret_cast<SetErrorFn>(dlsym(lib, "halo_emu_cublas_set_last_error"));
    }
    dlclose(lib);  // drops only the reference RTLD_NOLOAD took; the library stays loaded
    return d;
}

struct Handles {
    std::mutex mutex;
    std::set<cublasHandle_t> live;
};
Handles& handles() {
    static Handles h;
    return h;
}

bool live(cublasHandle_t h) {
    Handles& all = handles();
    std::lock_guard<std::mutex> lock(all.mutex);
    return all.live.count(h) != 0;
}

int refuse(int status, const std::string& detail) {
    const Driver d = driver();
    if (d.set_error) d.set_error(detail.c_str());
    return status;
}

}  // namespace

extern "C" {

// Marks this library as the crate's emulated cuBLAS (src/emulation checks it after loading).
int halo_emu_is_emulated_cublas() { return 1; }

int cublasCreate_v2(cublasHandle_t* handle) {
    if (handle == nullptr) return STATUS_INVALID_VALUE;
    if (driver().gemm == nullptr) return STATUS_NOT_INITIALIZED;  // no emulated driver (no context)
    cublasHandle_t h = new cublasContext();
    Handles& all = handles();
    std::lock_guard<std::mutex> lock(all.mutex);
    all.live.insert(h);
    *handle = h;
    return STATUS_SUCCESS;
}

int cublasDestroy_v2(cublasHandle_t handle) {
    Handles& all = handles();
    std::lock_guard<std::mutex> lock(all.mutex);
    if (all.live.erase(handle) == 0) return STATUS_NOT_INITIALIZED;
    delete handle;
    return STATUS_SUCCESS;
}

int cublasSetStream_v2(cublasHandle_t handle, void* stream) {
    if (!live(handle)) return refuse(STATUS_NOT_INITIALIZED, "cublasSetStream_v2: unknown handle");
    handle->stream = stream;
    return STATUS_SUCCESS;
}

int cublasGetStream_v2(cublasHandle_t handle, void** stream) {
    if (!live(handle)) return refuse(STATUS_NOT_INITIALIZED, "cublasGetStream_v2: unknown handle");
    if (stream == nullptr) return STATUS_INVALID_VALUE;
    *stream = handle->stream;
    return STATUS_SUCCESS;
}

int cublasGemmEx(cublasHandle_t handle, int transa, int transb, int m, int n, int k, const void* alpha,
                 const void* a, int a_type, int lda, const void* b, int b_type, int ldb, const void* beta, void* c,
                 int c_type, int ldc, int compute_type, int algo) {
    if (!live(handle)) return refuse(STATUS_NOT_INITIALIZED, "cublasGemmEx: unknown or destroyed handle");
    const Driver d = driver();
    if (d.gemm == nullptr) return STATUS_NOT_INITIALIZED;
    return d.gemm(transa, transb, m, n, k, alpha, uint64_t(uintptr_t(a)), a_type, lda, uint64_t(uintptr_t(b)), b_type,
                  ldb, beta, uint64_t(uintptr_t(c)), c_type, ldc, compute_type, algo);
}

}  // extern "C"
