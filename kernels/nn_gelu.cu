// nn_gelu.cu — GELU, tanh approximation (GPT-2's `gelu_new`, PyTorch `gelu(approximate="tanh")`):
// y = ½ x (1 + tanh(√(2/π) (x + 0.044715 x³))), forward and backward, element-wise over n floats.
// CPU twin and definition: halo-train/src/autograd/cpu/gelu.rs. Host side: src/cuda/nn/gelu.rs.
// Grid-stride over the elements with 64-bit indices (any grid works).
#include "halo_common.cuh"

#define NN_GELU_THREADS 256
#define NN_GELU_SQRT_2_OVER_PI 0.7978846f
#define NN_GELU_CUBIC 0.044715f

// tanhf is the accurate libdevice function (the kernels are built without --use_fast_math); the
// CPU twin's `1 − 2/(e^{2u} + 1)` with its own exp agrees within ~1e-7 absolute.
__device__ __forceinline__ float nn_gelu_tanh_term(float v) {
    return tanhf(NN_GELU_SQRT_2_OVER_PI * (v + NN_GELU_CUBIC * v * v * v));
}

// y = gelu(x) (overwrites y).
extern "C" __global__ void __launch_bounds__(NN_GELU_THREADS)
    nn_gelu_forward(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.0f + nn_gelu_tanh_term(v));
    }
}

// dx += dy · y'(x), y'(x) = ½(1 + t) + ½ x (1 − t²) √(2/π) (1 + 3·0.044715 x²), t the tanh term.
extern "C" __global__ void __launch_bounds__(NN_GELU_THREADS)
    nn_gelu_backward(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dx, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float v = x[i];
        const float t = nn_gelu_tanh_term(v);
        const float inner_grad = NN_GELU_SQRT_2_OVER_PI * (1.0f + 3.0f * NN_GELU_CUBIC * v * v);
        dx[i] += dy[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * inner_grad);
    }
}
