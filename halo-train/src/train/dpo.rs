//! DPO step (TRL `DPOTrainer.concatenated_forward` + `dpo_loss`): chosen and rejected completions
//! in one forward pass (rows `0..n` chosen, `n..2n` rejected), summed completion log-probs, the
//! DPO-family loss from [`dpo_loss`], its gradients broadcast back to the tokens.

use super::batching::TokenBatch;
use super::kto::sequence_logps_inference;
use super::stage::StepOutput;
use crate::autograd::Tape;
use crate::model::Gpt;
use halo_kernels::cpu::{broadcast_sequence_grad, sequence_sums, SequenceLayout};
use halo_kernels::error::Result;
use halo_kernels::losses::{dpo_loss, DpoConfig, PairBatch};
use halo_kernels::IGNORE_INDEX;

/// Loss, gradients and TRL metrics of one DPO step on a batch from
/// [`dpo_batch`](super::batching::dpo_batch).
pub fn dpo_step(
    policy: &Gpt,
    reference: &Gpt,
    batch: &TokenBatch,
    config: &DpoConfig,
) -> Result<StepOutput> {
    let n = batch.batch / 2;
    let layout = SequenceLayout::Padded {
        batch: batch.batch,
        seq: batch.seq,
    };
    let mut tape = Tape::new();
    let token_logp = policy.token_logprobs(
        &mut tape,
        &batch.input_ids,
        &batch.targets,
        batch.batch,
        batch.seq,
    )?;
    let sums = sequence_sums(tape.value(token_logp), &batch.targets, IGNORE_INDEX, layout)?;
    let reference_logps = sequence_logps_inference(reference, batch)?;
    let out = dpo_loss(
        config,
        &PairBatch {
            policy_chosen_logps: &sums.sums[..n],
            policy_rejected_logps: &sums.sums[n..],
            reference_chosen_logps: &reference_logps[..n],
            reference_rejected_logps: &reference_logps[n..],
            chosen_counts: Some(&sums.counts[..n]),
            rejected_counts: Some(&sums.counts[n..]),
        },
    )?;
    let grad_seq: Vec<f32> = out
        .grad_chosen
        .iter()
        .chain(&out.grad_rejected)
        .copied()
        .collect();
    let token_grad = broadcast_sequence_grad(&grad_seq, &batch.targets, IGNORE_INDEX, layout)?;
    let grads = tape.backward(token_logp, &token_grad)?;
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
