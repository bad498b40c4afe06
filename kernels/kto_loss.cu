// kto_loss.cu — the whole KTO loss in one launch of one block: reference point, per-example loss,
// ∂L/∂logp_policy per sequence and metric sums.
//
// TRL `KTOTrainer.kto_loss` (trl/trainer/kto_trainer.py), Ethayarajh et al. 2024 eq. (7):
//   z0 = max(0, mean_j (logp_policy − logp_ref)(KL pair j))          (detached)
//   r  = logp_policy − logp_ref
//   kto:               desirable λ_D (1 − σ(β (r − z0))),  undesirable λ_U (1 − σ(β (z0 − r)))
//   apo_zero_unpaired: desirable λ_D (1 − σ(β r)),         undesirable λ_U σ(β r)  (= kto with z0 = 0)
//   loss = mean over the batch (TRL: `losses.nanmean()`).
// With 1 − σ(x) = σ(−x) and σ'(x) = σ(x) σ(−x):
//   ∂L/∂r = −λ_D β σ(x) σ(−x) / B  (x = β (r − z0)),   +λ_U β σ(x) σ(−x) / B  (x = β (z0 − r)).
// Every reduction is a fixed-order block sum: bitwise identical run to run.
#include "halo_common.cuh"
#include "reductions.cuh"
#include "stable_math.cuh"

extern "C" __global__ void __launch_bounds__(HALO_LOSS_THREADS)
    kto_loss_f32(const float* __restrict__ policy_logp, const float* __restrict__ reference_logp,
                 const uint8_t* __restrict__ desirable, const float* __restrict__ kl_policy,
                 const float* __restrict__ kl_reference, float* __restrict__ grad_policy, float* __restrict__ out,
                 HaloKtoParams p) {
    __shared__ float scratch[32];

    // 1. reference point z0
    float kl_sum = 0.0f, kl_count = 0.0f;
    if (p.kl_mode == HALO_KL_FROM_PAIRS) {
        float partial = 0.0f;
        for (int j = threadIdx.x; j < p.kl_count; j += blockDim.x) partial += kl_policy[j] - kl_reference[j];
        kl_sum = block_sum(partial, scratch);
        kl_count = (float)p.kl_count;
    } else if (p.kl_mode == HALO_KL_FROM_SUM) {
        kl_sum = p.kl_sum;
        kl_count = p.kl_total;
    }
    float z0 = 0.0f;
    if (p.kl_mode != HALO_KL_ZERO && p.loss_type == HALO_KTO_LOSS_KTO) {
        // Not fmaxf alone: it maps a NaN mean (a NaN KL pair) to 0, hiding it. NaN flows on into
        // the loss and the gradient, where the wrapper's finiteness check turns it into the CPU's error.
        const float mean = kl_sum / kl_count;
        z0 = isnan(mean) ? mean : fmaxf(mean, 0.0f);
    }

    // 2. per example: loss, gradient, metrics
    const float inv_batch = 1.0f / (float)p.batch;
    float loss = 0.0f, chosen_reward = 0.0f, rejected_reward = 0.0f, chosen_count = 0.0f, rejected_count = 0.0f,
          chosen_logp = 0.0f, rejected_logp = 0.0f;
    for (int i = threadIdx.x; i < p.batch; i += blockDim.x) {
        const float policy = policy_logp[i];
        const float ratio = policy - reference_logp[i];
        const float reward = p.beta * ratio;
        float x, weight, sign;
        if (desirable[i]) {
            x = p.beta * (ratio - z0);
            weight = p.desirable_weight;
            sign = -1.0f;
            chosen_reward += reward;
            chosen_count += 1.0f;
            chosen_logp += policy;
        } else {
            x = p.beta * (z0 - ratio);
            weight = p.undesirable_weight;
            sign = 1.0f;
            rejected_reward += reward;
            rejected_count += 1.0f;
            rejected_logp += policy;
        }
        const float s_pos = stable_sigmoid(x), s_neg = stable_sigmoid(-x);
        loss += weight * s_neg;  // λ (1 − σ(x))
        grad_policy[i] = sign * weight * p.beta * s_pos * s_neg * inv_batch;
    }
    loss = block_sum(loss, scratch);
    chosen_reward = block_sum(chosen_reward, scratch);
    rejected_reward = block_sum(rejected_reward, scratch);
    chosen_count = block_sum(chosen_count, scratch);
    rejected_count = block_sum(rejected_count, scratch);
    chosen_logp = block_sum(chosen_logp, scratch);
    rejected_logp = block_sum(rejected_logp, scratch);
    if (threadIdx.x == 0) {
        out[HALO_KTO_OUT_LOSS] = loss * inv_batch;
        out[HALO_KTO_OUT_Z0] = z0;
        out[HALO_KTO_OUT_KL_SUM] = kl_sum;
        out[HALO_KTO_OUT_KL_COUNT] = kl_count;
        out[HALO_KTO_OUT_CHOSEN_REWARD_SUM] = chosen_reward;
        out[HALO_KTO_OUT_REJECTED_REWARD_SUM] = rejected_reward;
        out[HALO_KTO_OUT_CHOSEN_COUNT] = chosen_count;
        out[HALO_KTO_OUT_REJECTED_COUNT] = rejected_count;
        out[HALO_KTO_OUT_CHOSEN_LOGP_SUM] = chosen_logp;
        out[HALO_KTO_OUT_REJECTED_LOGP_SUM] = rejected_logp;
        for (int k = HALO_KTO_OUT_REJECTED_LOGP_SUM + 1; k < HALO_KTO_OUT_LEN; k++) out[k] = 0.0f;
    }
}
