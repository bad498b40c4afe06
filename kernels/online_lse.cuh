// online_lse.cuh — the running (max, sum of exp(x - max)) state of a one-pass logsumexp
// (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"), in two forms:
//  * `FastLse`, the hot loop's: sums 2^(x·log2e − max_l2) with the row constant max_l2 =
//    round(max·log2e) applied once, so an element costs one FFMA and one flush-to-zero EX2. The
//    rounding of max_l2 is the same for every element of the state: `fast_to_natural` takes it out
//    exactly (err = max·log2e − max_l2 by one FMA), so nothing is lost at logits of 1e4, where the
//    plain one-FMA form would be 1e-3 off. It needs |max| ≤ 2^24 (HALO_EX2_FMA_LIMIT: the rounding
//    of max_l2 stays ≤ 1, so no term overflows): rows beyond are scanned again in the exact form.
//  * `OnlineLse`, the natural form Σ exp(x − max) that threads merge, and the exact two-step form
//    exp(x − max) = 2^((x − max)·log2e) for rows beyond that range.
// Both carry the NaN/inf probe max |x| (NaN-propagating): finite while every x is finite.
#pragma once
#include "halo_common.cuh"

struct OnlineLse {
    float max;    // running max of x (natural units), -inf when empty
    float sum;    // Σ exp(x - max)
    float probe;  // max |x|, NaN once a NaN was seen: < inf while every x is finite
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

// Adds n values in the exact two-step form (n a compile-time constant).
template <int N>
__device__ __forceinline__ void online_lse_add(OnlineLse& s, const float (&x)[N]) {
    float chunk_max = x[0];
#pragma unroll
    for (int k = 1; k < N; k++) chunk_max = fmaxf(chunk_max, x[k]);
    if (chunk_max > s.max) {
        s.sum *= rescale_factor(s.max, chunk_max);
        s.max = chunk_max;
    }
    float add = 0.0f;
#pragma unroll
    for (int k = 0; k < N; k++) {
        add += exp2f((x[k] - s.max) * HALO_LOG2E);
        s.probe = halo_max_abs_nan(s.probe, x[k]);
    }
    s.sum += add;
}

// The hot loop's state (see the top of this file).
struct FastLse {
    float max;     // running max of x, -inf when empty
    float max_l2;  // round(max·log2e)
    float sum;     // Σ 2^(x·log2e − max_l2)
    float probe;   // as OnlineLse::probe
};

__device__ __forceinline__ FastLse fast_lse_empty() {
    FastLse f;
    f.max = -INFINITY;
    f.max_l2 = -INFINITY;
    f.sum = 0.0f;
    f.probe = 0.0f;
    return f;
}

// Raises the state's max to `chunk_max` when it is larger. Beyond HALO_EX2_FMA_LIMIT in magnitude
// the terms are garbage (up to inf: the row constant's rounding is too coarse; below −2.36e38 it is
// also clamped to −f32 max). A final max out there sends the share to the exact form
// (`fast_lse_exact_needed`); a max that comes back within range (a huge negative logit first, then
// ordinary ones: the fuzzer found it) must not carry the garbage along: when the old terms'
// rescale is 0 they are dropped, not multiplied (inf · 0 would be NaN).
__device__ __forceinline__ void fast_lse_raise(FastLse& f, float chunk_max) {
    if (chunk_max > f.max) {  // rare after the first chunks
        const float max_l2 = fmaxf(chunk_max * HALO_LOG2E, -3.4028234663852886e38f);
        // 0 from the empty state too (-inf − finite = -inf)
        const float rescale = halo_ex2_ftz(f.max_l2 - max_l2);
        f.sum = rescale == 0.0f ? 0.0f : f.sum * rescale;
        f.max = chunk_max;
        f.max_l2 = max_l2;
    }
}

// The state's max is beyond the fast form's range: the row must be scanned in the exact form.
__device__ __forceinline__ bool fast_lse_exact_needed(const FastLse& f) {
    return f.max != -INFINITY && !(fabsf(f.max) <= HALO_EX2_FMA_LIMIT);
}

// Σ 2^(x·log2e − max_l2) of n values (their max already raised into the state), and their probe.
template <int N>
__device__ __forceinline__ float fast_lse_terms(FastLse& f, const float (&x)[N]) {
    float add = 0.0f;
#pragma unroll
    for (int k = 0; k < N; k++) {
        f.probe = halo_max_abs_nan(f.probe, x[k]);
        add += halo_ex2_ftz(fmaf(x[k], HALO_LOG2E, -f.max_l2));
    }
    return add;
}

// Adds n values.
template <int N>
__device__ __forceinline__ void fast_lse_add(FastLse& f, const float (&x)[N]) {
    float chunk_max = x[0];
#pragma unroll
    for (int k = 1; k < N; k++) chunk_max = fmaxf(chunk_max, x[k]);
    fast_lse_raise(f, chunk_max);
    f.sum += fast_lse_terms<N>(f, x);
}

// Σ 2^(x·log2e − max_l2) = Σ 2^((x − max)·log2e) · 2^(−err), err = max·log2e − max_l2 exactly.
__device__ __forceinline__ OnlineLse fast_to_natural(const FastLse& f) {
    OnlineLse s;
    s.max = f.max;
    s.probe = f.probe;
    s.sum = f.max == -INFINITY ? f.sum : f.sum * exp2f(-fmaf(f.max, HALO_LOG2E, -f.max_l2));
    return s;
}

// Combines two states; symmetric, so a butterfly leaves every lane with identical bits.
__device__ __forceinline__ OnlineLse online_lse_merge(const OnlineLse& a, const OnlineLse& b) {
    OnlineLse r;
    r.max = fmaxf(a.max, b.max);
    r.sum = a.sum * rescale_factor(a.max, r.max) + b.sum * rescale_factor(b.max, r.max);
    r.probe = halo_max_abs_nan(a.probe, b.probe);
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

// Every x finite. (A NaN or +inf x also makes the sum NaN; a −inf one only shows in the probe.)
__device__ __forceinline__ bool online_lse_finite(const OnlineLse& s) { return s.probe < INFINITY; }

// max + ln_sum as the f32 lse and the exact error of that rounding (Knuth's TwoSum; as
// `split_lse` in src/cpu/saved_lse.rs). The backward uses lse + residual: an f32 lse near 1000 alone
// is off by up to 3e-5, which would be a 3e-5 relative error in every recomputed probability.
__device__ __forceinline__ void split_lse(float row_max, float ln_sum, float& lse, float& residual) {
    lse = row_max + ln_sum;
    const float b = lse - row_max;
    residual = (row_max - (lse - b)) + (ln_sum - b);
}
