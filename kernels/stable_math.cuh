// stable_math.cuh — overflow-free sigmoid and log-sigmoid for the loss kernels.
#pragma once
#include "halo_common.cuh"

// σ(x) = 1 / (1 + e^-x), evaluated through e^-|x| so the exponential never overflows.
__device__ __forceinline__ float stable_sigmoid(float x) {
    const float e = expf(-fabsf(x));
    return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

// log σ(x) = min(x, 0) − log1p(e^-|x|) (as torch.nn.functional.logsigmoid).
__device__ __forceinline__ float stable_log_sigmoid(float x) { return fminf(x, 0.0f) - log1pf(expf(-fabsf(x))); }
