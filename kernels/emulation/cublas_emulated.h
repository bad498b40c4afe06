// cublas_emulated.h — the emulated cuBLAS (issue 12): the ABI shared by its two halves.
//
//  * cublas_gemm.cpp, linked into the emulated driver (libhalo_cuda_emulated.so), holds the GEMM
//    itself: it works on the emulated device memory, so every matrix is range-checked against the
//    live allocations exactly as the driver checks a copy (device_memory.cpp's check_range).
//  * cublas_api.cpp is the second library, libhalo_cublas_emulated.so (soname libcublas.so, so that
//    cudarc's own dlopen("libcublas.so") resolves to it once src/emulation has loaded it by path):
//    the cuBLAS entry points cudarc 0.19 calls for this crate (cublasCreate_v2, cublasDestroy_v2,
//    cublasSetStream_v2, cublasGetStream_v2, cublasGemmEx), handles kept here, the GEMM forwarded
//    to the driver library through dlsym (the driver is loaded RTLD_LOCAL, so it is looked up by
//    its soname with RTLD_NOLOAD: never loaded from here).
//
// Values are cublas_api.h's (cudarc reads them as its enums, so only those values are returned).
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace halo_cublas {

enum Status : int {
    STATUS_SUCCESS = 0,
    STATUS_NOT_INITIALIZED = 1,
    STATUS_ALLOC_FAILED = 3,
    STATUS_INVALID_VALUE = 7,
    STATUS_ARCH_MISMATCH = 8,
    STATUS_MAPPING_ERROR = 11,
    STATUS_EXECUTION_FAILED = 13,
    STATUS_INTERNAL_ERROR = 14,
    STATUS_NOT_SUPPORTED = 15,
};

// cudaDataType_t
enum DataType : int { R_32F = 0, R_16F = 2, R_16BF = 14 };
// cublasOperation_t
enum Operation : int { OP_N = 0, OP_T = 1, OP_C = 2 };
// cublasComputeType_t: the f32-accumulating ones this emulation implements (all as plain f32).
enum ComputeType : int {
    COMPUTE_32F = 68,
    COMPUTE_32F_PEDANTIC = 69,
    COMPUTE_32F_FAST_16F = 74,
    COMPUTE_32F_FAST_16BF = 75,
    COMPUTE_32F_FAST_TF32 = 77,
};

}  // namespace halo_cublas

// The GEMM of cublasGemmEx (column-major, as cuBLAS): C = alpha·op(A)·op(B) + beta·C, with host
// pointers alpha and beta (f32: the compute types above), validated as cuBLAS validates. Exported
// by the driver library; `halo_emu_cublas_take_last_error` returns the detail of the last failure
// of this thread (as halo_emu_take_last_error for the driver).
extern "C" int halo_emu_cublas_gemm_ex(int transa, int transb, int m, int n, int k, const void* alpha,
                                       uint64_t a, int a_type, int lda, uint64_t b, int b_type, int ldb,
                                       const void* beta, uint64_t c, int c_type, int ldc, int compute_type,
                                       int algo);
extern "C" size_t halo_emu_cublas_take_last_error(char* buf, size_t len);
// Records `detail` as this thread's last cuBLAS error (the shim's own refusals use it too).
extern "C" void halo_emu_cublas_set_last_error(const char* detail);
