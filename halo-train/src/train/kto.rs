//! KTO step (TRL `KTOTrainer`, HALOs `KTOTrainer`): the policy's per-token log-probs through
//! the fused LM head (`Gpt::token_logprobs_fused_head`: no `[rows, vocab]` logits); the core's [`kto_step_tokens`] sums them per completion, computes the loss and its
//! gradient and broadcasts it back to the tokens, which the tape backpropagates.
//!
//! The reference model is a frozen copy of the starting model. The KL pairs (each prompt with
//! the completion of the previous example in the batch) are scored by the policy and the
//! reference without gradient, as TRL and the HALOs repo do: the reference point `z0` is a
//! constant in the loss.

use super::batching::{token_batch, KtoBatch, TargetSpan, TokenBatch};
use super::stage::StepOutput;
use super::tokenizer::TextTokenizer;
use crate::autograd::Tape;
use crate::model::{forward, GptWeights};
use halo_kernels::cpu::{sequence_sums, SequenceLayout};
use halo_kernels::error::{HaloError, Result};
use halo_kernels::losses::{KlInput, KtoConfig};
use halo_kernels::step::{kto_step_tokens, KtoStepInputs, TokenLogps};
use halo_kernels::IGNORE_INDEX;

fn layout(batch: &TokenBatch) -> SequenceLayout<'static> {
    SequenceLayout::Padded {
        batch: batch.batch,
        seq: batch.seq,
    }
}

/// Summed completion log-probs of `batch` under `model`, without gradient.
pub fn sequence_logps_inference<W: GptWeights>(model: &W, batch: &TokenBatch) -> Result<Vec<f32>> {
    let tokens = forward::token_logprobs_inference(
        model,
        &batch.input_ids,
        &batch.targets,
        batch.batch,
        batch.seq,
    )?;
    Ok(sequence_sums(&tokens, &batch.targets, IGNORE_INDEX, layout(batch))?.sums)
}

/// Examples scored per forward pass by [`precompute_reference_logps`].
const PRECOMPUTE_CHUNK: usize = 256;

/// Summed completion log-probs of every `(prompt, completion)` under the frozen `reference`, in
/// one pass before training (TRL's `precompute_ref_log_probs`): the reference forward then drops
/// out of every step. The KL pairs are still scored per step, because their completions are
/// rotated inside each batch and so change with the batch order.
pub fn precompute_reference_logps<W: GptWeights>(
    reference: &W,
    tok: &TextTokenizer,
    rows: &[(&str, &str)],
    max_len: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(PRECOMPUTE_CHUNK) {
        let batch = token_batch(tok, chunk, TargetSpan::CompletionOnly, max_len)?;
        out.extend(sequence_logps_inference(reference, &batch)?);
    }
    Ok(out)
}

/// Loss, gradients and TRL metrics of one KTO (or APO-zero unpaired) step, on the device of
/// the policy's weights (the reference's may live elsewhere: only its log-probs are read). The
/// loss itself is the core's host step (`kto_step_tokens`) on the token log-probs read back.
pub fn kto_step<P: GptWeights, R: GptWeights>(
    policy: &P,
    reference: &R,
    batch: &KtoBatch,
    config: &KtoConfig,
) -> Result<StepOutput> {
    let examples = &batch.examples;
    let mut tape = Tape::new().on(policy.device());
    let token_logp = forward::token_logprobs_fused_head(
        policy,
        &mut tape,
        &examples.input_ids,
        &examples.targets,
        examples.batch,
        examples.seq,
    )?;
    let reference_logps = match &batch.reference_logps {
        Some(precomputed) if precomputed.len() == examples.batch => precomputed.clone(),
        Some(precomputed) => {
            return Err(HaloError::InvalidShape(format!(
                "{} precomputed reference log-probs for a batch of {} examples",
                precomputed.len(),
                examples.batch
            )))
        }
        None => sequence_logps_inference(reference, examples)?,
    };
    // Reference point inputs: no gradient flows through them.
    let kl_policy = sequence_logps_inference(policy, &batch.kl_pairs)?;
    let kl_reference = sequence_logps_inference(reference, &batch.kl_pairs)?;

    let token_logps = tape.to_host(token_logp)?;
    let step = kto_step_tokens(
        config,
        &TokenLogps {
            logps: &token_logps,
            labels: &examples.targets,
            ignore_index: IGNORE_INDEX,
            layout: layout(examples),
        },
        &KtoStepInputs {
            reference_logps: &reference_logps,
            is_desirable: &batch.desirable,
            kl: Some(KlInput::LogProbs {
                policy: &kl_policy,
                reference: &kl_reference,
            }),
        },
    )?;
    let grads = tape.backward(token_logp, &step.token_grad)?;
    let out = step.loss;
    let mut metrics: Vec<(String, f64)> = out
        .metrics
        .to_named()
        .into_iter()
        .map(|(name, v)| (name.to_string(), v))
        .collect();
    if !metrics.iter().any(|(n, _)| n == "kl") {
        metrics.push(("kl".into(), out.z0));
    }
    Ok(StepOutput {
        loss: out.loss,
        grads,
        metrics,
    })
}
