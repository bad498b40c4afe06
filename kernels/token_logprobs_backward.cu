// token_logprobs_backward.cu — backward of the log-prob gather, from the saved logsumexp:
//   ∂L/∂z[r, v] = g_r · (1[v = y_r] − exp(z[r, v] − lse_r)),   whole row 0 where y_r is ignored.
// CPU twin and definition: src/cpu/token_logprobs_backward.rs. Read once, write once, in the logits'
// dtype; the in-place form overwrites the logits (dead after the backward), saving a [rows, vocab]
// buffer. Launch geometry as the forward: kernels/README.md.
#include "halo_common.cuh"

// exp(z − lse) = 2^((z − lse)·log2e): z − lse first, so the exponent is exact for z near lse.
__device__ __forceinline__ float grad_element(float z, int64_t col, int64_t label, float g, float row_lse) {
    const float prob = exp2f((z - row_lse) * HALO_LOG2E);
    return col == label ? g * (1.0f - prob) : -g * prob;
}

template <typename T, bool InPlace>
__device__ __forceinline__ uint4 load_vec(const uint4* p) {
    // In place the buffer is written by this kernel: plain loads, not the read-only cache path.
    if (InPlace) return load16(p);
    return __ldg(p);
}

// One 16-byte vector of logits starting at column col0 -> its gradient vector.
template <typename T>
__device__ __forceinline__ uint4 grad_vec(const uint4& v, int64_t col0, int64_t label, float g, float row_lse) {
    float x[Elem<T>::VEC];
    unpack_vec<T>(v, x);
#pragma unroll
    for (int k = 0; k < Elem<T>::VEC; k++) x[k] = grad_element(x[k], col0 + k, label, g, row_lse);
    return pack_vec<T>(x);
}

template <typename T, bool InPlace>
__device__ __forceinline__ void token_logprobs_backward(const T* logits, const int32_t* __restrict__ labels,
                                                        const float* __restrict__ lse,
                                                        const float* __restrict__ grad_logp, T* grad_logits,
                                                        int32_t* __restrict__ status, HaloTokenParams p) {
    constexpr int VEC = Elem<T>::VEC;
    const int threads_per_row = HALO_TOKEN_THREADS / p.rows_per_block;
    const int local_row = threadIdx.x / threads_per_row;
    const int lane = threadIdx.x % threads_per_row;
    const int64_t row = (int64_t)blockIdx.x * p.rows_per_block + local_row;
    if (row >= p.rows) return;  // no barrier or shuffle below: early exit is safe

    const int32_t label = labels[row];
    const bool ignored = label == p.ignore_index;
    const bool bad_label = !ignored && (label < 0 || (int64_t)label >= p.vocab);
    const float row_lse = lse[row];
    const float g = grad_logp[row];
    if (lane == 0) {
        if (bad_label) atomicMin(&status[HALO_STATUS_BAD_LABEL], (int32_t)row);
        // As the CPU op: ignored rows are not read, so only counted rows must hold finite values.
        if (!ignored && !isfinite(row_lse)) atomicMin(&status[HALO_STATUS_NONFINITE], (int32_t)row);
        if (!ignored && !isfinite(g)) atomicMin(&status[HALO_STATUS_NONFINITE_GRAD], (int32_t)row);
    }
    const bool zero_row = ignored || bad_label;
    const int64_t y = label;

    const T* in = logits + row * p.vocab;
    T* out = grad_logits + row * p.vocab;
    const int64_t vocab = p.vocab;
    const bool same_misalignment =
        ((reinterpret_cast<uintptr_t>(in) ^ reinterpret_cast<uintptr_t>(out)) & 15u) == 0;
    // Vectors only when input and output reach a 16-byte boundary together; else all scalar.
    const int64_t head = same_misalignment ? head_to_alignment(in, vocab) : vocab;
    const int64_t n_vecs = (vocab - head) / VEC;

    for (int64_t j = lane; j < head; j += threads_per_row) {
        const float z = zero_row ? 0.0f : Elem<T>::to_f32(in[j]);
        out[j] = Elem<T>::from_f32(zero_row ? 0.0f : grad_element(z, j, y, g, row_lse));
    }
    const uint4* in_vecs = reinterpret_cast<const uint4*>(in + head);
    uint4* out_vecs = reinterpret_cast<uint4*>(out + head);
    if (zero_row) {
        const uint4 zero = {0u, 0u, 0u, 0u};  // +0.0 in every dtype
        for (int64_t i = lane; i < n_vecs; i += threads_per_row) store16(out_vecs + i, zero);
    } else {
        // Two 16-byte loads in flight per thread before either is consumed.
        int64_t i = lane;
        for (; i + threads_per_row < n_vecs; i += 2 * (int64_t)threads_per_row) {
            const uint4 a = load_vec<T, InPlace>(in_vecs + i);
            const uint4 b = load_vec<T, InPlace>(in_vecs + i + threads_per_row);
            store16(out_vecs + i, grad_vec<T>(a, head + i * VEC, y, g, row_lse));
            store16(out_vecs + i + threads_per_row, grad_vec<T>(b, head + (i + threads_per_row) * VEC, y, g, row_lse));
        }
        if (i < n_vecs) store16(out_vecs + i, grad_vec<T>(load_vec<T, InPlace>(in_vecs + i), head + i * VEC, y, g, row_lse));
    }
    for (int64_t j = head + n_vecs * VEC + lane; j < vocab; j += threads_per_row) {
        const float z = zero_row ? 0.0f : Elem<T>::to_f32(in[j]);
        out[j] = Elem<T>::from_f32(zero_row ? 0.0f : grad_element(z, j, y, g, row_lse));
    }
}

#define HALO_TOKEN_BACKWARD(SUFFIX, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(HALO_TOKEN_THREADS) token_logprobs_backward_##SUFFIX(           \
        const T* __restrict__ logits, const int32_t* __restrict__ labels, const float* __restrict__ lse,         \
        const float* __restrict__ grad_logp, T* __restrict__ grad_logits, int32_t* __restrict__ status,          \
        HaloTokenParams p) {                                                                                      \
        token_logprobs_backward<T, false>(logits, labels, lse, grad_logp, grad_logits, status, p);               \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(HALO_TOKEN_THREADS) token_logprobs_backward_inplace_##SUFFIX(   \
        T* logits, const int32_t* __restrict__ labels, const float* __restrict__ lse,                            \
        const float* __restrict__ grad_logp, int32_t* __restrict__ status, HaloTokenParams p) {                  \
        token_logprobs_backward<T, true>(logits, labels, lse, grad_logp, logits, status, p);                     \
    }

HALO_TOKEN_BACKWARD(f32, float)
HALO_TOKEN_BACKWARD(bf16, __nv_bfloat16)
HALO_TOKEN_BACKWARD(f16, __half)
