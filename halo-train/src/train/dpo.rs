//! DPO step (TRL `DPOTrainer.concatenated_forward` + `dpo_loss`): chosen and rejected completions
//! in one forward pass (rows `0..n` chosen, `n..2n` rejected), the policy's log-probs through the
//! fused LM head (no `[rows, vocab]` logits); the core's [`dpo_step_tokens`]
//! sums the completion log-probs, computes the DPO-family loss and broadcasts its gradients back
//! to the tokens, which the tape backpropagates.

use super::batching::TokenBatch;
use super::kto::sequence_logps_inference;
use super::stage::StepOutput;
use crate::autograd::Tape;
use crate::model::{forward, GptWeights};
use halo_kernels::cpu::SequenceLayout;
use halo_kernels::error::Result;
use halo_kernels::losses::DpoConfig;
use halo_kernels::step::{dpo_step_tokens, PairReference, TokenLogps};
use halo_kernels::IGNORE_INDEX;

/// Loss, gradients and TRL metrics of one DPO step on a batch from
/// [`dpo_batch`](super::batching::dpo_batch).
pub fn dpo_step<P: GptWeights, R: GptWeights>(
    policy: &P,
    reference: &R,
    batch: &TokenBatch,
    config: &DpoConfig,
) -> Result<StepOutput> {
    let n = batch.batch / 2;
    let layout = SequenceLayout::Padded {
        batch: batch.batch,
        seq: batch.seq,
    };
    let mut tape = Tape::new().on(policy.device());
    let token_logp = forward::token_logprobs_fused_head(
        policy,
        &mut tape,
        &batch.input_ids,
        &batch.targets,
        batch.batch,
        batch.seq,
    )?;
    let reference_logps = sequence_logps_inference(reference, batch)?;
    let token_logps = tape.to_host(token_logp)?;
    let step = dpo_step_tokens(
        config,
        &TokenLogps {
            logps: &token_logps,
            labels: &batch.targets,
            ignore_index: IGNORE_INDEX,
            layout,
        },
        &PairReference {
            chosen_logps: &reference_logps[..n],
            rejected_logps: &reference_logps[n..],
        },
    )?;
    let grads = tape.backward(token_logp, &step.token_grad)?;
    let out = step.loss;
    Ok(StepOutput {
        loss: out.loss,
        grads,
        metrics: out
            .metrics
            .to_named()
            .into_iter()
            .map(|(name, v)| (name.to_string(), v))
            .collect(),
    })
}
