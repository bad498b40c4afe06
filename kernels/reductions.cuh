// reductions.cuh — deterministic warp / block reductions (fixed butterfly order: every lane ends with
// the bit-identical result, run after run; no float atomics anywhere).
#pragma once
#include "halo_common.cuh"

// Sum over aligned groups of `width` lanes (width a power of two <= 32). Convergent: every lane of
// the warp must call it with the same width.
__device__ __forceinline__ float group_sum(float v, int width) {
    for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(HALO_FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ unsigned group_sum_u32(unsigned v, int width) {
    for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(HALO_FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return group_sum(v, 32); }

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). Every thread gets the total,
// summed warp by warp in index order. `scratch` is a __shared__ float[32]; it is reusable on return.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; w++) total += scratch[w];
    __syncthreads();
    return total;
}

__device__ __forceinline__ unsigned block_sum_u32(unsigned v, unsigned* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = group_sum_u32(v, 32);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    unsigned total = 0;
    for (int w = 0; w < warps; w++) total += scratch[w];
    __syncthreads();
    return total;
}
