// cublas_gemm.cpp — the emulated cuBLAS's GEMM (cublasGemmEx), part of the emulated driver library
// so that it reads and writes the emulated device memory under the driver's own range checks (see
// cublas_emulated.h). A plain CPU GEMM: every product accumulated in f32 in k order (deterministic,
// as the fused head's tests need), inputs f32 / f16 / bf16, output f32 or the inputs' dtype
// (rounded to nearest even), alpha and beta as cuBLAS applies them. beta == 0 never reads C (cuBLAS's
// rule: C may then hold anything, NaN included — the emulated allocations start as NaN).
#include "cublas_emulated.h"
#include "emulated_driver.h"

#include <string.h>

#include <string>
#include <vector>

using namespace halo_cublas;

namespace {

thread_local std::string t_last_error;

int refuse(int status, const std::string& detail) {
    t_last_error = "cublasGemmEx: " + detail;
    return status;
}

size_t element_size(int type) { return type == R_32F ? 4 : 2; }

float bf16_to_f32(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // canonical NaN, as cvt.rn.bf16.f32
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        const float v = float(man) * 5.9604644775390625e-8f;  // subnormal: man · 2^-24, exact
        return sign ? -v : v;
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fff;
    if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (a >= 0x38800000u) {                                 // normal half
        uint32_t r = a - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return uint16_t(sign | (r >> 13));
    }
    if (a < 0x33000000u) return sign;
    const uint32_t exp = a >> 23, man = (a & 0x7fffffu) | 0x800000u, shift = 126 - exp;
    uint32_t q = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half_ulp = 1u << (shift - 1);
    if (rem > half_ulp || (rem == half_ulp && (q & 1u))) q++;
    return uint16_t(sign | q);
}

float load(const void* base, int type, size_t i) {
    if (type == R_32F) return static_cast<const float*>(base)[i];
    const uint16_t h = static_cast<const uint16_t*>(base)[i];
    return type == R_16BF ? bf16_to_f32(h) : f16_to_f32(h);
}

void store(void* base, int type, size_t i, float v) {
    if (type == R_32F) {
        static_cast<float*>(base)[i] = v;
    } else {
        static_cast<uint16_t*>(base)[i] = type == R_16BF ? f32_to_bf16(v) : f32_to_f16(v);
    }
}

bool known_type(int t) { return t == R_32F || t == R_16F || t == R_16BF; }

const char* type_name(int t) {
    switch (t) {
        case R_32F: return "CUDA_R_32F";
        case R_16F: return "CUDA_R_16F";
        case R_16BF: return "CUDA_R_16BF";
        default: return "an unsupported cudaDataType";
    }
}

// A column-major `rows × cols` matrix with leading dimension `ld` lies inside one live allocation.
int check_matrix(uint64_t ptr, int type, int64_t rows, int64_t cols, int64_t ld, const char* what) {
    if (rows == 0 || cols == 0) return STATUS_SUCCESS;
    const size_t elements = size_t(cols - 1) * size_t(ld) + size_t(rows);
    const halo_driver::Result r =
        halo_driver::check_range(ptr, elements * element_size(type), "cublasGemmEx", what);
    if (r != halo_driver::SUCCESS) {
        // The driver recorded where the matrix runs out; cuBLAS reports a faulting kernel this way.
        std::string detail = "matrix ";
        detail += what;
        detail += " (" + std::to_string(rows) + " x " + std::to_string(cols) + ", ld " + std::to_string(ld) +
                  ") is outside the emulated device memory";
        return refuse(STATUS_EXECUTION_FAILED, detail);
    }
    return STATUS_SUCCESS;
}

bool valid_op(int op) { return op == OP_N || op == OP_T || op == OP_C; }

}  // namespace

extern "C" void halo_emu_cublas_set_last_error(const char* detail) { t_last_error = detail ? detail : ""; }

extern "C" size_t halo_emu_cublas_take_last_error(char* buf, size_t len) {
    const size_t full = t_last_error.size();
    if (buf != nullptr && len > 0) {
        const size_t n = full < len - 1 ? full : len - 1;
        memcpy(buf, t_last_error.data(), n);
        buf[n] = '\0';
    }
    t_last_error.clear();
    return full;
}

extern "C" int halo_emu_cublas_gemm_ex(int transa, int transb, int m, int n, int k, const void* alpha_ptr,
                                       uint64_t a, int a_type, int lda, uint64_t b, int b_type, int ldb,
                                       const void* beta_ptr, uint64_t c, int c_type, int ldc, int compute_type,
                                       int algo) {
    // The checks of cublasGemmEx, in its order: argument values, then the type combination.
    if (!valid_op(transa) || !valid_op(transb)) return refuse(STATUS_INVALID_VALUE, "transa/transb must be N, T or C");
    if (m < 0 || n < 0 || k < 0) {
        return refuse(STATUS_INVALID_VALUE, "m, n, k must be >= 0 (got " + std::to_string(m) + ", " +
                                                std::to_string(n) + ", " + std::to_string(k) + ")");
    }
    // op(A) is m × k: A is stored m × k (N) or k × m (T); likewise op(B) k × n.
    const int64_t a_rows = transa == OP_N ? m : k, a_cols = transa == OP_N ? k : m;
    const int64_t b_rows = transb == OP_N ? k : n, b_cols = transb == OP_N ? n : k;
    auto at_least = [](int64_t x) { return x < 1 ? int64_t(1) : x; };
    if (lda < at_least(a_rows) || ldb < at_least(b_rows) || ldc < at_least(m)) {
        return refuse(STATUS_INVALID_VALUE, "leading dimension too small: lda " + std::to_string(lda) + " (needs >= " +
                                                std::to_string(at_least(a_rows)) + "), ldb " + std::to_string(ldb) +
                                                " (needs >= " + std::to_string(at_least(b_rows)) + "), ldc " +
                                                std::to_string(ldc) + " (needs >= " + std::to_string(at_least(m)) + ")");
    }
    if (alpha_ptr == nullptr || beta_ptr == nullptr) return refuse(STATUS_INVALID_VALUE, "alpha and beta must not be null");
    const bool algo_ok = algo == -1 || algo == 99 || (algo >= 0 && algo <= 23) || (algo >= 100 && algo <= 115);
    if (!algo_ok) return refuse(STATUS_INVALID_VALUE, "unknown cublasGemmAlgo_t " + std::to_string(algo));
    const bool compute_ok = compute_type == COMPUTE_32F || compute_type == COMPUTE_32F_PEDANTIC ||
                            compute_type == COMPUTE_32F_FAST_16F || compute_type == COMPUTE_32F_FAST_16BF ||
                            compute_type == COMPUTE_32F_FAST_TF32;
    if (!compute_ok) {
        return refuse(STATUS_NOT_SUPPORTED, "compute type " + std::to_string(compute_type) +
                                                " is not emulated (only the CUBLAS_COMPUTE_32F family)");
    }
    if (!known_type(a_type) || a_type != b_type || !(c_type == R_32F || c_type == a_type)) {
        return refuse(STATUS_NOT_SUPPORTED, std::string("type combination A ") + type_name(a_type) + ", B " +
                                                type_name(b_type) + ", C " + type_name(c_type) +
                                                " is not supported with CUBLAS_COMPUTE_32F (A and B alike; C "
                                                "CUDA_R_32F or their type)");
    }
    if (m == 0 || n == 0) return STATUS_SUCCESS;

    float alpha, beta;
    memcpy(&alpha, alpha_ptr, 4);
    memcpy(&beta, beta_ptr, 4);
    const bool reads_ab = k > 0 && alpha != 0.0f;
    if (reads_ab) {
        if (int s = check_matrix(a, a_type, a_rows, a_cols, lda, "A")) return s;
        if (int s = check_matrix(b, b_type, b_rows, b_cols, ldb, "B")) return s;
    }
    if (int s = check_matrix(c, c_type, m, n, ldc, "C")) return s;

    // op(A) row by row and op(B) column by column, widened once: each C entry is then one
    // contiguous dot product (f32, k in order).
    std::vector<float> op_a, op_b;
    if (reads_ab) {
        const void* pa = reinterpret_cast<const void*>(uintptr_t(a));
        const void* pb = reinterpret_cast<const void*>(uintptr_t(b));
        op_a.resize(size_t(m) * size_t(k));
        op_b.resize(size_t(n) * size_t(k));
        for (int64_t i = 0; i < m; i++)
            for (int64_t p = 0; p < k; p++)
                op_a[i * k + p] = load(pa, a_type, transa == OP_N ? size_t(i + p * lda) : size_t(p + i * lda));
        for (int64_t j = 0; j < n; j++)
            for (int64_t p = 0; p < k; p++)
                op_b[j * k + p] = load(pb, b_type, transb == OP_N ? size_t(p + j * ldb) : size_t(j + p * ldb));
    }
    void* pc = reinterpret_cast<void*>(uintptr_t(c));
    for (int64_t j = 0; j < n; j++) {
        for (int64_t i = 0; i < m; i++) {
            float acc = 0.0f;
            if (reads_ab) {
                const float* x = &op_a[i * k];
                const float* y = &op_b[j * k];
                for (int64_t p = 0; p < k; p++) acc += x[p] * y[p];
            }
            const size_t ci = size_t(i + j * ldc);
            float v = alpha * acc;
            if (beta != 0.0f) v += beta * load(pc, c_type, ci);
            store(pc, c_type, ci, v);
        }
    }
    return STATUS_SUCCESS;
}
