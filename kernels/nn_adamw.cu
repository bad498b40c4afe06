// nn_adamw.cu — one AdamW step of one parameter buffer, element-wise (the CUDA twin of halo-train's
// `model::optim::AdamW::step`, in its order):
//   g ← g · clip            (clip: the device factor of nn_grad_norm_finish_f32, clipped variants)
//   p ← p · decay           (decay = 1 − lr·λ for decaying parameters, else 1; host scalar)
//   m ← β₁·m + (1−β₁)·g
//   v ← β₂·v + ((1−β₂)·g)·g
//   p ← p − (lr · (m / bc₁)) / (√(v / bc₂) + ε)      (bc = 1 − βᵗ, computed on the host)
// Every operation is rounded on its own (__fmul_rn & co.: nvcc would otherwise contract a·b + c into
// one FMA), so the result is bitwise the CPU's, which Rust never contracts. The host compiler of the
// emulated device has no FMA at its default target, and IEEE `/` and sqrtf are correctly rounded on
// both (nvcc's defaults -prec-div/-prec-sqrt=true; never --use_fast_math for this file's sake).
#include "halo_common.cuh"

#define HALO_ADAMW_THREADS 256

#ifdef HALO_HOST_EMULATION
static inline float adamw_mul(float a, float b) { return a * b; }
static inline float adamw_add(float a, float b) { return a + b; }
static inline float adamw_sub(float a, float b) { return a - b; }
static inline float adamw_div(float a, float b) { return a / b; }
static inline float adamw_sqrt(float a) { return sqrtf(a); }
#else
__device__ __forceinline__ float adamw_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float adamw_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float adamw_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float adamw_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float adamw_sqrt(float a) { return __fsqrt_rn(a); }
#endif

// `gate` (clipped variants; null when `gate_len` is 0): status entries of the kernels that computed
// the gradients (a training step's, gathered on the device). Any entry that is not HALO_STATUS_OK
// means the gradients are garbage (a failed check the host reads later, with the step's loss), so the
// step leaves the parameters and moments as they are: no host wait is needed before the update.
// Thread 0 of each block reads the entries once; the block then agrees through shared memory.
__device__ __forceinline__ bool adamw_gate_open(const int32_t* __restrict__ gate, int64_t gate_len) {
    __shared__ int open;
    if (threadIdx.x == 0) {
        int ok = 1;
        for (int64_t i = 0; i < gate_len; ++i) ok &= (gate[i] == HALO_STATUS_OK);
        open = ok;
    }
    __syncthreads();
    return open != 0;
}

// CLIP: multiply the gradient by *clip_factor first; WRITE_BACK: also store the scaled gradient
// (the CPU's clip_grad_norm leaves the gradients scaled). `grad_out` is `grad` itself (read, then
// overwritten by the same thread), hence no __restrict__ on either.
template <bool CLIP, bool WRITE_BACK>
__device__ __forceinline__ void adamw_step(float* __restrict__ param, const float* grad, float* grad_out,
                                           float* __restrict__ m, float* __restrict__ v,
                                           const float* __restrict__ clip_factor,
                                           const int32_t* __restrict__ gate, int64_t gate_len,
                                           int64_t n, float lr,
                                           float beta1, float beta2, float one_minus_beta1,
                                           float one_minus_beta2, float bias_correction1,
                                           float bias_correction2, float eps, float decay) {
    if (CLIP && gate_len > 0 && !adamw_gate_open(gate, gate_len)) return;
    const float clip = CLIP ? clip_factor[0] : 1.0f;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    // Not unrolled: the three IEEE divisions' slow-path calls of an unrolled body spill on sm_90
    // (the loop is bound by memory; a grid of up to 4096 blocks leaves few iterations per thread).
#pragma unroll 1
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float g = grad[i];
        if (CLIP) {
            g = adamw_mul(g, clip);
            if (WRITE_BACK) grad_out[i] = g;
        }
        float p = adamw_mul(param[i], decay);
        const float mi = adamw_add(adamw_mul(beta1, m[i]), adamw_mul(one_minus_beta1, g));
        const float vi = adamw_add(adamw_mul(beta2, v[i]), adamw_mul(adamw_mul(one_minus_beta2, g), g));
        m[i] = mi;
        v[i] = vi;
        const float m_hat = adamw_div(mi, bias_correction1);
        const float v_hat = adamw_div(vi, bias_correction2);
        p = adamw_sub(p, adamw_div(adamw_mul(lr, m_hat), adamw_add(adamw_sqrt(v_hat), eps)));
        param[i] = p;
    }
}

extern "C" __global__ void __launch_bounds__(HALO_ADAMW_THREADS)
    nn_adamw_step_f32(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
                      float* __restrict__ v, int64_t n, float lr, float beta1, float beta2,
                      float one_minus_beta1, float one_minus_beta2, float bias_correction1,
                      float bias_correction2, float eps, float decay) {
    adamw_step<false, false>(param, grad, nullptr, m, v, nullptr, nullptr, 0, n, lr, beta1, beta2, one_minus_beta1,
                             one_minus_beta2, bias_correction1, bias_correction2, eps, decay);
}

extern "C" __global__ void __launch_bounds__(HALO_ADAMW_THREADS)
    nn_adamw_step_clipped_f32(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
                              float* __restrict__ v, const float* __restrict__ clip_factor,
                              const int32_t* __restrict__ gate, int64_t gate_len, int64_t n,
                              float lr, float beta1, float beta2, float one_minus_beta1,
                              float one_minus_beta2, float bias_correction1, float bias_correction2, float eps,
                              float decay) {
    adamw_step<true, false>(param, grad, nullptr, m, v, clip_factor, gate, gate_len, n, lr, beta1, beta2, one_minus_beta1,
                            one_minus_beta2, bias_correction1, bias_correction2, eps, decay);
}

extern "C" __global__ void __launch_bounds__(HALO_ADAMW_THREADS)
    nn_adamw_step_clipped_write_back_f32(float* __restrict__ param, float* grad, float* __restrict__ m,
                                         float* __restrict__ v, const float* __restrict__ clip_factor,
                                         const int32_t* __restrict__ gate, int64_t gate_len, int64_t n,
                                         float lr, float beta1, float beta2, float one_minus_beta1,
                                         float one_minus_beta2, float bias_correction1,
                                         float bias_correction2, float eps, float decay) {
    adamw_step<true, true>(param, grad, grad, m, v, clip_factor, gate, gate_len, n, lr, beta1, beta2, one_minus_beta1,
                           one_minus_beta2, bias_correction1, bias_correction2, eps, decay);
}
