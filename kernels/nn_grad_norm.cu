// nn_grad_norm.cu — the global L2 norm of many gradient buffers and torch's clip factor, on the
// device with no host read (the CUDA twin of halo-train's `Gradients::global_norm` and
// `model::optim::clip_grad_norm`).
//
// Two kernels, in f64 as the CPU sums (each square of an f32 is exact in f64, so only the additions
// round; the result matches the CPU's sequential f64 sum to ~1e-16 relative before the cast to f32):
//   nn_grad_sum_squares_f32: one launch per buffer; block b writes Σ g² over its grid-stride share to
//     partials[b] (the caller points `partials` at that buffer's slots of one scratch).
//   nn_grad_norm_finish_f32: one block sums every partial (thread t takes t, t+T, ... in order, then a
//     fixed-order block reduction) and writes out[0] = norm = (float)sqrt(total) and
//     out[1] = clip factor: max_norm / (norm + 1e-6) when `clip` and that is < 1, else 1.
// No atomics: a rerun gives the same bits.
#include "halo_common.cuh"

#define HALO_GRAD_NORM_THREADS 256

#ifdef HALO_HOST_EMULATION
static inline float grad_norm_add(float a, float b) { return a + b; }
static inline float grad_norm_div(float a, float b) { return a / b; }
#else
__device__ __forceinline__ float grad_norm_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float grad_norm_div(float a, float b) { return __fdiv_rn(a, b); }
#endif

// Sum over the block in a fixed order (butterfly within each warp, then warps in index order); every
// thread gets the total. `scratch` is a __shared__ double[32], reusable on return.
__device__ __forceinline__ double grad_norm_block_sum(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(HALO_FULL_MASK, v, offset);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < warps; w++) total += scratch[w];
    __syncthreads();
    return total;
}

extern "C" __global__ void __launch_bounds__(HALO_GRAD_NORM_THREADS)
    nn_grad_sum_squares_f32(const float* __restrict__ grad, int64_t n, double* __restrict__ partials) {
    __shared__ double scratch[32];
    double sum = 0.0;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double g = (double)grad[i];
        sum += g * g;
    }
    sum = grad_norm_block_sum(sum, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

extern "C" __global__ void __launch_bounds__(HALO_GRAD_NORM_THREADS)
    nn_grad_norm_finish_f32(const double* __restrict__ partials, int64_t count, float max_norm, int32_t clip,
                            float* __restrict__ out) {
    __shared__ double scratch[32];
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) sum += partials[i];
    sum = grad_norm_block_sum(sum, scratch);
    if (threadIdx.x == 0) {
        const float norm = (float)sqrt(sum);
        // The CPU's f32 arithmetic: factor = max_norm / (norm + 1e-6), applied only when < 1 (so a NaN
        // norm, whose factor is NaN, clips nothing, as on the CPU).
        const float factor = grad_norm_div(max_norm, grad_norm_add(norm, 1e-6f));
        out[0] = norm;
        out[1] = (clip && factor < 1.0f) ? factor : 1.0f;
    }
}
