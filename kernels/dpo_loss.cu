// dpo_loss.cu — the DPO family on pairs in one launch of one block: loss, ∂L/∂ per-sequence policy
// log-probs of the chosen and rejected completions, metric sums.
//
// Every TRL 1.x `DPOConfig.loss_type` (`DPOTrainer._compute_loss`), defined by the CPU loss
// src/losses/dpo.rs (its module doc gives each formula). With c = pc − rc, r = pr − rr, h = c − r:
// the per-pair types (sigmoid, robust, hinge, ipo, apo_zero, apo_down, exo_pair, nca_pair, bco_pair,
// sppo_hard, discopop) in dpo_pair_terms.cuh; the batch-coupled ones here:
//   aot           sigmoid loss (with ε) on sort(pc − pr)[k] − sort(rc − rr)[k], sorted over the batch
//   aot_unpaired  the same on sort(c)[k] − sort(r)[k]
//   sft           −Σ pc / Σ chosen_counts (the chosen tokens' mean NLL; the same for every pair)
// f-DPO (f_divergence.cuh): the per-pair types compare the scores of the log-ratios, not the
// log-ratios (the host refuses a divergence other than reverse KL for the types TRL does).
// Loss = mean over pairs. Metrics on the summed log-probs for every type.
#include "halo_common.cuh"
#include "reductions.cuh"
#include "stable_math.cuh"
#include "dpo_pair_terms.cuh"
#include "batch_order.cuh"
#include "f_divergence.cuh"

// The exact f64 difference of two f32 log-probs: the AOT keys, sorted as the CPU sorts its f64 ones
// (an f32 difference could round two different keys to a tie and swap which pair gets a gradient).
__device__ __forceinline__ double exact_difference(float a, float b) { return (double)a - (double)b; }

extern "C" __global__ void __launch_bounds__(HALO_LOSS_THREADS)
    dpo_loss_f32(const float* __restrict__ policy_chosen, const float* __restrict__ policy_rejected,
                 const float* __restrict__ reference_chosen, const float* __restrict__ reference_rejected,
                 const uint32_t* __restrict__ chosen_counts, const uint32_t* __restrict__ rejected_counts,
                 float* __restrict__ grad_chosen, float* __restrict__ grad_rejected, float* __restrict__ out,
                 uint32_t* __restrict__ order, int32_t* __restrict__ status, HaloDpoParams p) {
    __shared__ float scratch[32];
    __shared__ unsigned long long chosen_token_total;
    const int n = p.pairs;
    const float beta = p.beta;
    const float inv_pairs = 1.0f / (float)n;
    const bool sft = p.loss_type == HALO_DPO_LOSS_SFT;
    const bool aot = p.loss_type == HALO_DPO_LOSS_AOT, aot_unpaired = p.loss_type == HALO_DPO_LOSS_AOT_UNPAIRED;

    // sft: the batch's chosen token count, summed exactly (integer atomics: order-independent).
    float sft_grad = 0.0f;
    if (sft) {
        if (threadIdx.x == 0) chosen_token_total = 0;
        __syncthreads();
        unsigned long long mine = 0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) mine += chosen_counts[i];
        atomicAdd(&chosen_token_total, mine);
        __syncthreads();
        // Σ_i (−pc_i) / tokens is the mean over pairs of the NLL; ∂/∂pc_i = −1/tokens. No token at
        // all: infinite gradients, which the host diagnoses as the CPU's EmptyBatch error.
        sft_grad = -1.0f / (float)chosen_token_total;
    }
    // aot, aot_unpaired: first_order sorts the first keys (pc − pr, or c), second_order the second
    // (rc − rr, or r).
    uint32_t* const first_order = order;
    uint32_t* const second_order = order + n;
    if (aot || aot_unpaired) {
        const float* second_a = aot ? reference_chosen : policy_rejected;
        const float* first_b = aot ? policy_rejected : reference_chosen;
        block_stable_order2<HALO_LOSS_THREADS>(
            n, [&](int j) { return exact_difference(policy_chosen[j], first_b[j]); },
            [&](int j) { return exact_difference(second_a[j], reference_rejected[j]); }, first_order,
            second_order);
    }

    // The loss and gradients. (The metrics get a loop of their own: fewer values live across the
    // divisions' slow-path calls, which would otherwise spill on sm_90.)
    float loss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        if (aot || aot_unpaired) {
            // Slot i of the sorted keys; its gradient goes to the pairs whose keys rank i.
            const uint32_t a = first_order[i], b = second_order[i];
            const double first = aot ? exact_difference(policy_chosen[a], policy_rejected[a])
                                     : exact_difference(policy_chosen[a], reference_chosen[a]);
            const double second = aot ? exact_difference(reference_chosen[b], reference_rejected[b])
                                      : exact_difference(policy_rejected[b], reference_rejected[b]);
            const DpoLossSlope ls = dpo_smoothed_logistic(beta, p.label_smoothing, (float)(first - second));
            loss += ls.loss;
            grad_chosen[a] = ls.slope * inv_pairs;
            // aot: the policy difference pc − pr of pair a; aot_unpaired: the rejected log-ratio of b.
            grad_rejected[aot ? a : b] = -ls.slope * inv_pairs;
            if (!isfinite(ls.slope)) atomicMin(&status[HALO_STATUS_NONFINITE], i);
        } else if (sft) {
            loss -= policy_chosen[i];
            grad_chosen[i] = sft_grad;
            grad_rejected[i] = 0.0f;
            if (!isfinite(sft_grad)) atomicMin(&status[HALO_STATUS_NONFINITE], i);
        } else {
            float scale_c = 1.0f, scale_r = 1.0f;  // ∂(normalised log-prob)/∂(sum)
            if (p.loss_type == HALO_DPO_LOSS_IPO || p.loss_type == HALO_DPO_LOSS_SIGMOID_NORM) {
                const uint32_t nc = chosen_counts[i], nr = rejected_counts[i];
                if (nc == 0 || nr == 0) {
                    atomicMin(&status[HALO_STATUS_EMPTY_SEQUENCE], i);
                    grad_chosen[i] = 0.0f;
                    grad_rejected[i] = 0.0f;
                    continue;
                }
                scale_c = 1.0f / (float)nc;
                scale_r = 1.0f / (float)nr;
            }
            // The scores: the log-ratios through the f-divergence, then length-normalised (TRL divides
            // the scores); each one's slope carries the gradient back to the summed log-prob.
            const DpoScore c = dpo_f_divergence_score(p.f_divergence, p.f_alpha, policy_chosen[i] - reference_chosen[i]);
            const DpoScore r =
                dpo_f_divergence_score(p.f_divergence, p.f_alpha, policy_rejected[i] - reference_rejected[i]);
            const DpoPairTerm t = dpo_pair_term(p, c.score * scale_c, r.score * scale_r);
            loss += t.loss;
            grad_chosen[i] = t.d_chosen * c.slope * scale_c * inv_pairs;
            grad_rejected[i] = t.d_rejected * r.slope * scale_r * inv_pairs;
            if (!isfinite(grad_chosen[i]) || !isfinite(grad_rejected[i]))
                atomicMin(&status[HALO_STATUS_NONFINITE], i);
        }
    }
    float chosen_reward = 0.0f, rejected_reward = 0.0f, accuracy = 0.0f, margin = 0.0f, chosen_logp = 0.0f,
          rejected_logp = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float sum_pc = policy_chosen[i], sum_pr = policy_rejected[i];
        const float sum_rc = reference_chosen[i], sum_rr = reference_rejected[i];
        // Metrics on the summed log-probs for every loss type (TRL >= 1.0 normalises inside IPO's loss only).
        const float reward_c = beta * (sum_pc - sum_rc), reward_r = beta * (sum_pr - sum_rr);
        chosen_reward += reward_c;
        rejected_reward += reward_r;
        accuracy += reward_c > reward_r ? 1.0f : 0.0f;
        margin += reward_c - reward_r;
        chosen_logp += sum_pc;
        rejected_logp += sum_pr;
    }
    loss = block_sum(loss, scratch);
    chosen_reward = block_sum(chosen_reward, scratch);
    rejected_reward = block_sum(rejected_reward, scratch);
    accuracy = block_sum(accuracy, scratch);
    margin = block_sum(margin, scratch);
    chosen_logp = block_sum(chosen_logp, scratch);
    rejected_logp = block_sum(rejected_logp, scratch);
    if (threadIdx.x == 0) {
        // sft: Σ(−pc) · (1/tokens), as its gradient (−sft_grad is 1/tokens).
        out[HALO_DPO_OUT_LOSS] = loss * (sft ? -sft_grad : inv_pairs);
        out[HALO_DPO_OUT_CHOSEN_REWARD_SUM] = chosen_reward;
        out[HALO_DPO_OUT_REJECTED_REWARD_SUM] = rejected_reward;
        out[HALO_DPO_OUT_ACCURACY_COUNT] = accuracy;
        out[HALO_DPO_OUT_MARGIN_SUM] = margin;
        out[HALO_DPO_OUT_CHOSEN_LOGP_SUM] = chosen_logp;
        out[HALO_DPO_OUT_REJECTED_LOGP_SUM] = rejected_logp;
        for (int k = HALO_DPO_OUT_REJECTED_LOGP_SUM + 1; k < HALO_DPO_OUT_LEN; k++) out[k] = 0.0f;
        // A non-finite output (an f32 overflow, sft without a chosen token) in the status too, so
        // that an update gated on the step's statuses skips it; the host names the CPU's error.
        bool finite = true;
        for (int k = 0; k <= HALO_DPO_OUT_REJECTED_LOGP_SUM; k++) finite = finite && isfinite(out[k]);
        if (!finite) atomicMin(&status[HALO_STATUS_NONFINITE], 0);
    }
}
