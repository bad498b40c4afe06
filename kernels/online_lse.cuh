// online_lse.cuh — the running (max, sum of exp(x - max)) state of a one-pass logsumexp
// (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"). Each element costs
// one subtract, one multiply and one ex2: exp(x − max) = 2^((x − max)·log2e). (The one-FMA form
// 2^(x·log2e − max·log2e) loses |max|·2^-24 in the exponent: 1e-3 relative at logits of 1e4.)
#pragma once
#include "halo_common.cuh"

struct OnlineLse {
    float max;    // running max of x (natural units), -inf when empty
    float sum;    // Σ exp(x - max)
    float probe;  // Σ (x - x): 0 while every x is finite, NaN once a NaN or ±inf was seen
};

__device__ __forceinline__ OnlineLse online_lse_empty() {
    OnlineLse s;
    s.max = -INFINITY;
    s.sum = 0.0f;
    s.probe = 0.0f;
    return s;
}

// exp(a - b) that is exactly 1 when a == b (also for a == b == -inf, where a - b is NaN).
__device__ __forceinline__ float rescale_factor(float a, float b) {
    return a == b ? 1.0f : exp2f((a - b) * HALO_LOG2E);
}

// Adds n values (n a compile-time constant: one vector, or 1 for scalars).
template <int N>
__device__ __forceinline__ void online_lse_add(OnlineLse& s, const float (&x)[N]) {
    float chunk_max = x[0];
#pragma unroll
    for (int k = 1; k < N; k++) chunk_max = fmaxf(chunk_max, x[k]);
    if (chunk_max > s.max) {
        s.sum *= rescale_factor(s.max, chunk_max);
        s.max = chunk_max;
    }
    float add = 0.0f, probe = 0.0f;
#pragma unroll
    for (int k = 0; k < N; k++) {
        add += exp2f((x[k] - s.max) * HALO_LOG2E);
        probe += x[k] - x[k];
    }
    s.sum += add;
    s.probe += probe;
}

// Combines two states; symmetric, so a butterfly leaves every lane with identical bits.
__device__ __forceinline__ OnlineLse online_lse_merge(const OnlineLse& a, const OnlineLse& b) {
    OnlineLse r;
    r.max = fmaxf(a.max, b.max);
    r.sum = a.sum * rescale_factor(a.max, r.max) + b.sum * rescale_factor(b.max, r.max);
    r.probe = a.probe + b.probe;
    return r;
}

// Butterfly over aligned groups of `width` lanes (power of two <= 32); convergent.
__device__ __forceinline__ OnlineLse online_lse_group_reduce(OnlineLse s, int width) {
    for (int offset = width / 2; offset > 0; offset /= 2) {
        OnlineLse o;
        o.max = __shfl_xor_sync(HALO_FULL_MASK, s.max, offset);
        o.sum = __shfl_xor_sync(HALO_FULL_MASK, s.sum, offset);
        o.probe = __shfl_xor_sync(HALO_FULL_MASK, s.probe, offset);
        s = online_lse_merge(s, o);
    }
    return s;
}

__device__ __forceinline__ bool online_lse_finite(const OnlineLse& s) { return s.probe == 0.0f; }

// max + ln_sum as the f32 lse and the exact error of that rounding (Knuth's TwoSum; as
// `split_lse` in src/cpu/saved_lse.rs). The backward uses lse + residual: an f32 lse near 1000 alone
// is off by up to 3e-5, which would be a 3e-5 relative error in every recomputed probability.
__device__ __forceinline__ void split_lse(float row_max, float ln_sum, float& lse, float& residual) {
    lse = row_max + ln_sum;
    const float b = lse - row_max;
    residual = (row_max - (lse - b)) + (ln_sum - b);
}
