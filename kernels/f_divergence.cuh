// f_divergence.cuh — f-DPO's score of a sequence log-ratio u = π − ref in f32, transcribing
// `FDivergence::score` of src/losses/f_divergence.rs (the definition; TRL 1.16's
// `f_divergence_type`): reverse KL u; forward KL 1 − e^{−u}; Jensen-Shannon log 2 + logσ(u);
// α (e^{(α−1)u} − 1)/(α − 1) with the exponent clamped at 80, whose slope is 0 beyond it.
#pragma once
#include "halo_common.cuh"
#include "stable_math.cuh"

struct DpoScore {
    float score;
    float slope;  // d score / du
};

__device__ __forceinline__ DpoScore dpo_f_divergence_score(int32_t f_divergence, float alpha, float u) {
    switch (f_divergence) {
        case HALO_DPO_F_FORWARD_KL: {
            const float e = expf(-u);
            return {1.0f - e, e};
        }
        case HALO_DPO_F_JS_DIVERGENCE:
            return {0.693147180559945309f + stable_log_sigmoid(u), stable_sigmoid(-u)};
        case HALO_DPO_F_ALPHA: {
            const float a = alpha - 1.0f, t = a * u;
            // (e^t − 1)/a with expm1: exact near u = 0, where e^t − 1 cancels.
            return t <= 80.0f ? DpoScore{expm1f(t) / a, expf(t)} : DpoScore{expm1f(80.0f) / a, 0.0f};
        }
        default:  // reverse KL
            return {u, 1.0f};
    }
}
