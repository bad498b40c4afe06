// dpo_pair_terms.cuh — the per-pair terms of the DPO family in f32, one function per loss type,
// transcribing `pair_term`, `smoothed_logistic` and `discopop` of src/losses/dpo.rs (the definition;
// its module doc gives each formula). c = π_c − ref_c and r = π_r − ref_r are a pair's (IPO:
// length-normalised) log-ratios; each term returns the loss and its derivatives in c and r.
#pragma once
#include "halo_common.cuh"
#include "stable_math.cuh"

// A loss of one variable and its derivative.
struct DpoLossSlope {
    float loss;
    float slope;
};

struct DpoPairTerm {
    float loss;
    float d_chosen;    // ∂loss/∂c
    float d_rejected;  // ∂loss/∂r
};

// σ'(x) = σ(x)σ(−x).
__device__ __forceinline__ float stable_sigmoid_derivative(float x) { return stable_sigmoid(x) * stable_sigmoid(-x); }

// cDPO's smoothed logistic loss of a margin h, −(1−ε) logσ(βh) − ε logσ(−βh), and its derivative
// in h (sigmoid, aot, aot_unpaired).
__device__ __forceinline__ DpoLossSlope dpo_smoothed_logistic(float beta, float eps, float h) {
    const float x = beta * h;
    const float loss = -(1.0f - eps) * stable_log_sigmoid(x) - eps * stable_log_sigmoid(-x);
    const float d = beta * (-(1.0f - eps) * stable_sigmoid(-x) + eps * stable_sigmoid(x));
    return {loss, d};
}

// DiscoPOP of x = βh with m = σ(x/τ): −logσ(x)(1 − m) + e^{−x}m, and its derivative in x. The
// exponential term and its derivative are taken in log space, exp(−x + logσ(x/τ)), so that for
// very negative x they are the small numbers they are (τ < 1) rather than inf · 0; with τ > 1 they
// overflow where the CPU's do (the host then reports the CPU's error).
__device__ __forceinline__ DpoLossSlope dpo_discopop(float x, float tau) {
    const float y = x / tau;
    const float log_m = stable_log_sigmoid(y), log_one_minus_m = stable_log_sigmoid(-y);
    const float one_minus_m = stable_sigmoid(-y);
    const float exp_term = expf(-x + log_m);                           // e^{−x}·m
    const float exp_term_dm = expf(-x + log_m + log_one_minus_m) / tau;  // e^{−x}·m'
    const float dm = stable_sigmoid_derivative(y) / tau;
    const float log_sig_x = stable_log_sigmoid(x);
    const float loss = -log_sig_x * one_minus_m + exp_term;
    // d/dx: −σ(−x)(1 − m) + logσ(x)·m' − e^{−x}m + e^{−x}m'.
    const float d = -stable_sigmoid(-x) * one_minus_m + log_sig_x * dm - exp_term + exp_term_dm;
    return {loss, d};
}

// The terms of the loss types that see only their own pair (every type but aot, aot_unpaired, sft).
__device__ __forceinline__ DpoPairTerm dpo_pair_term(const HaloDpoParams& p, float c, float r) {
    const float beta = p.beta, eps = p.label_smoothing;
    const float h = c - r, bh = beta * h;
    const float xc = beta * c, xr = beta * r;
    switch (p.loss_type) {
        case HALO_DPO_LOSS_ROBUST: {
            const float k = 1.0f / (1.0f - 2.0f * eps);
            const float loss = (-(1.0f - eps) * stable_log_sigmoid(bh) + eps * stable_log_sigmoid(-bh)) * k;
            const float d = beta * (-(1.0f - eps) * stable_sigmoid(-bh) - eps * stable_sigmoid(bh)) * k;
            return {loss, d, -d};
        }
        case HALO_DPO_LOSS_HINGE: {
            const float m = 1.0f - bh;
            // Gradient 0 at the kink, as PyTorch's relu.
            return m > 0.0f ? DpoPairTerm{m, -beta, beta} : DpoPairTerm{0.0f, 0.0f, 0.0f};
        }
        case HALO_DPO_LOSS_IPO: {
            const float t = h - 1.0f / (2.0f * beta);
            return {t * t, 2.0f * t, -2.0f * t};
        }
        case HALO_DPO_LOSS_APO_ZERO:
            return {stable_sigmoid(-xc) + stable_sigmoid(xr), -beta * stable_sigmoid_derivative(xc),
                    beta * stable_sigmoid_derivative(xr)};
        case HALO_DPO_LOSS_APO_DOWN: {
            // σ(βc) + 1 − σ(βh): ∂/∂c = β(σ'(βc) − σ'(βh)), ∂/∂r = βσ'(βh).
            const float sc = stable_sigmoid_derivative(xc), sh = stable_sigmoid_derivative(bh);
            return {stable_sigmoid(xc) + stable_sigmoid(-bh), beta * (sc - sh), beta * sh};
        }
        case HALO_DPO_LOSS_EXO_PAIR: {
            // f(x) = σ(x)(logσ(x) − log(1−ε)) + σ(−x)(logσ(−x) − log ε); as logσ(x) − logσ(−x) = x,
            // f'(x) = σ'(x)(x − log(1−ε) + log ε).
            const float log_keep = log1pf(-eps), log_flip = logf(eps);
            const float loss = stable_sigmoid(bh) * (stable_log_sigmoid(bh) - log_keep) +
                               stable_sigmoid(-bh) * (stable_log_sigmoid(-bh) - log_flip);
            const float d = beta * stable_sigmoid_derivative(bh) * (bh - log_keep + log_flip);
            return {loss, d, -d};
        }
        case HALO_DPO_LOSS_NCA_PAIR:
            return {-stable_log_sigmoid(xc) - 0.5f * stable_log_sigmoid(-xc) - 0.5f * stable_log_sigmoid(-xr),
                    beta * (-stable_sigmoid(-xc) + 0.5f * stable_sigmoid(xc)), beta * 0.5f * stable_sigmoid(xr)};
        case HALO_DPO_LOSS_BCO_PAIR:
            return {-stable_log_sigmoid(xc) - stable_log_sigmoid(-xr), -beta * stable_sigmoid(-xc),
                    beta * stable_sigmoid(xr)};
        case HALO_DPO_LOSS_SPPO_HARD: {
            const float half = 0.5f / beta;
            const float tc = c - half, tr = r + half;
            return {tc * tc + tr * tr, 2.0f * tc, 2.0f * tr};
        }
        case HALO_DPO_LOSS_DISCOPOP: {
            const DpoLossSlope ls = dpo_discopop(bh, p.discopop_tau);
            return {ls.loss, beta * ls.slope, -beta * ls.slope};
        }
        case HALO_DPO_LOSS_SIGMOID_NORM: {  // on length-normalised log-ratios, without smoothing
            const DpoLossSlope ls = dpo_smoothed_logistic(beta, 0.0f, h);
            return {ls.loss, ls.slope, -ls.slope};
        }
        default: {  // sigmoid
            const DpoLossSlope ls = dpo_smoothed_logistic(beta, eps, h);
            return {ls.loss, ls.slope, -ls.slope};
        }
    }
}
