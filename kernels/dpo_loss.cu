// dpo_loss.cu — the DPO family on pairs in one launch of one block: loss, ∂L/∂ per-sequence policy
// log-probs of the chosen and rejected completions, metric sums.
//
// TRL `DPOTrainer.dpo_loss` (trl/trainer/dpo_trainer.py), with h = (pc − pr) − (rc − rr), ε = label
// smoothing:
//   sigmoid  −(1−ε) logσ(βh) − ε logσ(−βh)                   (Rafailov et al. 2023; cDPO smoothing)
//   robust   (−(1−ε) logσ(βh) + ε logσ(−βh)) / (1 − 2ε)       (Chowdhury et al. 2024)
//   hinge    relu(1 − βh)                                     (SLiC, Zhao et al. 2023)
//   ipo      (h − 1/(2β))², every log-prob divided by its token count first (TRL averages for IPO)
//   apo_zero 1 − σ(β(pc − rc)) + σ(β(pr − rr))                (D'Oosterlinck et al. 2024)
//   loss = mean over pairs. Gradients with σ'(x) = σ(x)σ(−x), d logσ(x)/dx = σ(−x).
#include "halo_common.cuh"
#include "reductions.cuh"
#include "stable_math.cuh"

extern "C" __global__ void __launch_bounds__(HALO_LOSS_THREADS)
    dpo_loss_f32(const float* __restrict__ policy_chosen, const float* __restrict__ policy_rejected,
                 const float* __restrict__ reference_chosen, const float* __restrict__ reference_rejected,
                 const uint32_t* __restrict__ chosen_counts, const uint32_t* __restrict__ rejected_counts,
                 float* __restrict__ grad_chosen, float* __restrict__ grad_rejected, float* __restrict__ out,
                 int32_t* __restrict__ status, HaloDpoParams p) {
    __shared__ float scratch[32];
    const float beta = p.beta, eps = p.label_smoothing;
    const float inv_pairs = 1.0f / (float)p.pairs;
    float loss = 0.0f, chosen_reward = 0.0f, rejected_reward = 0.0f, accuracy = 0.0f, margin = 0.0f,
          chosen_logp = 0.0f, rejected_logp = 0.0f;
    for (int i = threadIdx.x; i < p.pairs; i += blockDim.x) {
        const float sum_pc = policy_chosen[i], sum_pr = policy_rejected[i];
        const float sum_rc = reference_chosen[i], sum_rr = reference_rejected[i];
        float pc = sum_pc, pr = sum_pr, rc = sum_rc, rr = sum_rr;
        float scale_c = 1.0f, scale_r = 1.0f;  // ∂(normalised log-prob)/∂(sum)
        if (p.loss_type == HALO_DPO_LOSS_IPO) {
            const uint32_t nc = chosen_counts[i], nr = rejected_counts[i];
            if (nc == 0 || nr == 0) {
                atomicMin(&status[HALO_STATUS_EMPTY_SEQUENCE], i);
                grad_chosen[i] = 0.0f;
                grad_rejected[i] = 0.0f;
                continue;
            }
            scale_c = 1.0f / (float)nc;
            scale_r = 1.0f / (float)nr;
            pc *= scale_c;
            rc *= scale_c;
            pr *= scale_r;
            rr *= scale_r;
        }
        const float h = (pc - pr) - (rc - rr);
        float l, dl_dh = 0.0f, dl_dc = 0.0f, dl_dr = 0.0f;
        switch (p.loss_type) {
            case HALO_DPO_LOSS_ROBUST: {
                l = (-(1.0f - eps) * stable_log_sigmoid(beta * h) + eps * stable_log_sigmoid(-beta * h)) /
                    (1.0f - 2.0f * eps);
                dl_dh = (-(1.0f - eps) * beta * stable_sigmoid(-beta * h) - eps * beta * stable_sigmoid(beta * h)) /
                        (1.0f - 2.0f * eps);
                break;
            }
            case HALO_DPO_LOSS_HINGE: {
                const float m = 1.0f - beta * h;
                l = fmaxf(m, 0.0f);
                dl_dh = m > 0.0f ? -beta : 0.0f;
                break;
            }
            case HALO_DPO_LOSS_IPO: {
                const float d = h - 1.0f / (2.0f * beta);
                l = d * d;
                dl_dh = 2.0f * d;
                break;
            }
            case HALO_DPO_LOSS_APO_ZERO: {
                const float xc = beta * (pc - rc), xr = beta * (pr - rr);
                l = stable_sigmoid(-xc) + stable_sigmoid(xr);
                dl_dc = -beta * stable_sigmoid(xc) * stable_sigmoid(-xc);
                dl_dr = beta * stable_sigmoid(xr) * stable_sigmoid(-xr);
                break;
            }
            default: {  // sigmoid
                l = -(1.0f - eps) * stable_log_sigmoid(beta * h) - eps * stable_log_sigmoid(-beta * h);
                dl_dh = -(1.0f - eps) * beta * stable_sigmoid(-beta * h) + eps * beta * stable_sigmoid(beta * h);
                break;
            }
        }
        // h = (pc − pr) − (rc − rr): ∂h/∂pc = 1, ∂h/∂pr = −1.
        dl_dc += dl_dh;
        dl_dr -= dl_dh;
        grad_chosen[i] = dl_dc * scale_c * inv_pairs;
        grad_rejected[i] = dl_dr * scale_r * inv_pairs;
        // Metrics on the summed log-probs for every loss type (TRL >= 1.0 normalises inside IPO's loss only).
        const float reward_c = beta * (sum_pc - sum_rc), reward_r = beta * (sum_pr - sum_rr);
        loss += l;
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
        out[HALO_DPO_OUT_LOSS] = loss * inv_pairs;
        out[HALO_DPO_OUT_CHOSEN_REWARD_SUM] = chosen_reward;
        out[HALO_DPO_OUT_REJECTED_REWARD_SUM] = rejected_reward;
        out[HALO_DPO_OUT_ACCURACY_COUNT] = accuracy;
        out[HALO_DPO_OUT_MARGIN_SUM] = margin;
        out[HALO_DPO_OUT_CHOSEN_LOGP_SUM] = chosen_logp;
        out[HALO_DPO_OUT_REJECTED_LOGP_SUM] = rejected_logp;
        for (int k = HALO_DPO_OUT_REJECTED_LOGP_SUM + 1; k < HALO_DPO_OUT_LEN; k++) out[k] = 0.0f;
    }
}
