// naive_baseline.cu — the unfused two-kernel path the fused forward is measured against (benches
// only, owned by the CUDA backend work): what `torch.log_softmax(logits, -1).gather(-1, labels)`
// does, i.e. materialise the whole `[rows, vocab]` log-softmax in the logits' dtype, then gather
// one entry per row.
//
//   naive_log_softmax_T(const T* logits, T* out, int64_t rows, int64_t vocab)
//       grid = rows, block = NAIVE_THREADS; three passes over the row (max, sum of exp, write),
//       like PyTorch's non-persistent softmax kernel: 3 reads + 1 write of the row.
//   naive_gather_T(const T* log_probs, const int32_t* labels, float* logp, int64_t rows,
//                  int64_t vocab, int32_t ignore_index)
//       grid = ceil(rows / NAIVE_THREADS), block = NAIVE_THREADS; one thread per row; 0 where the
//       label is ignored, NaN for a label outside 0..vocab (no other error reporting).
#include "halo_common.cuh"

#define NAIVE_THREADS 256

__device__ __forceinline__ float naive_warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(HALO_FULL_MASK, v, offset));
    return v;
}

__device__ __forceinline__ float naive_warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(HALO_FULL_MASK, v, offset);
    return v;
}

// Block-wide max / sum over NAIVE_THREADS threads; every thread gets the result.
__device__ __forceinline__ float naive_block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = naive_warp_max(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (NAIVE_THREADS / 32) ? scratch[lane] : -INFINITY;
    return naive_warp_max(v);
}

__device__ __forceinline__ float naive_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = naive_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (NAIVE_THREADS / 32) ? scratch[lane] : 0.0f;
    return naive_warp_sum(v);
}

template <typename T>
__device__ __forceinline__ void naive_log_softmax(const T* __restrict__ logits, T* __restrict__ out, int64_t rows,
                                                  int64_t vocab) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    if (row >= rows) return;
    const T* z = logits + row * vocab;
    T* o = out + row * vocab;
    float m = -INFINITY;
    for (int64_t v = threadIdx.x; v < vocab; v += NAIVE_THREADS) m = fmaxf(m, Elem<T>::to_f32(z[v]));
    m = naive_block_max(m, scratch);
    float s = 0.0f;
    for (int64_t v = threadIdx.x; v < vocab; v += NAIVE_THREADS) s += expf(Elem<T>::to_f32(z[v]) - m);
    const float lse = m + logf(naive_block_sum(s, scratch));
    for (int64_t v = threadIdx.x; v < vocab; v += NAIVE_THREADS) o[v] = Elem<T>::from_f32(Elem<T>::to_f32(z[v]) - lse);
}

template <typename T>
__device__ __forceinline__ void naive_gather(const T* __restrict__ log_probs, const int32_t* __restrict__ labels,
                                             float* __restrict__ logp, int64_t rows, int64_t vocab,
                                             int32_t ignore_index) {
    const int64_t row = (int64_t)blockIdx.x * NAIVE_THREADS + threadIdx.x;
    if (row >= rows) return;
    const int32_t y = labels[row];
    if (y == ignore_index) {
        logp[row] = 0.0f;
    } else if (y < 0 || (int64_t)y >= vocab) {
        logp[row] = __int_as_float(0x7fffffff);  // NaN: never read outside the row
    } else {
        logp[row] = Elem<T>::to_f32(log_probs[row * vocab + y]);
    }
}

#define HALO_NAIVE(SUFFIX, T)                                                                                     \
    extern "C" __global__ void __launch_bounds__(NAIVE_THREADS)                                                   \
        naive_log_softmax_##SUFFIX(const T* __restrict__ logits, T* __restrict__ out, int64_t rows, int64_t vocab) { \
        naive_log_softmax<T>(logits, out, rows, vocab);                                                           \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(NAIVE_THREADS)                                                   \
        naive_gather_##SUFFIX(const T* __restrict__ log_probs, const int32_t* __restrict__ labels,                \
                              float* __restrict__ logp, int64_t rows, int64_t vocab, int32_t ignore_index) {      \
        naive_gather<T>(log_probs, labels, logp, rows, vocab, ignore_index);                                      \
    }

HALO_NAIVE(f32, float)
HALO_NAIVE(bf16, __nv_bfloat16)
HALO_NAIVE(f16, __half)
