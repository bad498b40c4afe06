//! KTO step (TRL `KTOTrainer`, HALOs `KTOTrainer`): the policy's per-token log-probs through
//! the fused LM head (`GptWeights::token_logprobs_fused_head`: no `[rows, vocab]` logits); the core's [`kto_step_tokens`] sums them per completion, computes the loss and its
//! gradient and broadcasts it back to the tokens, which the tape backpropagates.
//!
//! The reference model is a frozen copy of the starting model. The KL pairs (each prompt with
//! the completion of the previous example in the batch) are scored by the policy and the
//! reference without gradient, as TRL and the HALOs repo do: the reference point `z0` is a
//! constant in the loss.

use super::batching::{token_batch, KtoBatch, TargetSpan, TokenBatch};
use std::sync::Arc;

use super::device_step::{policy_token_logps, queued_step_output};
use super::step_output::{StepMetrics, StepOutput};
use super::tokenizer::TextTokenizer;
use crate::autograd::{Device, DeviceChecks};
use crate::model::{forward, GptWeights};
use halo_kernels::cpu::{sequence_sums, SequenceLayout};
use halo_kernels::cuda::{CudaBackend, CudaKlInput, CudaKtoStepInputs, CudaSlice};
use halo_kernels::error::{HaloError, Result};
use halo_kernels::losses::{KlInput, KtoConfig, KtoOutput};
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
/// the policy's weights (the reference's may live elsewhere: only its log-probs are read). On the
/// CPU the loss is the core's host step (`kto_step_tokens`); on a CUDA device its queued twin
/// (`enqueue_kto_step_tokens`), so that the step's one host wait is the update's.
pub fn kto_step<P: GptWeights, R: GptWeights>(
    policy: &P,
    reference: &R,
    batch: &KtoBatch,
    config: &KtoConfig,
) -> Result<StepOutput> {
    check_precomputed(batch)?;
    match policy.device() {
        Device::Cuda(gpu) => kto_step_on_device(&gpu, policy, reference, batch, config),
        Device::Cpu => kto_step_on_host(policy, reference, batch, config),
    }
}

/// Precomputed reference log-probs must be one per example.
fn check_precomputed(batch: &KtoBatch) -> Result<()> {
    match &batch.reference_logps {
        Some(precomputed) if precomputed.len() != batch.examples.batch => {
            Err(HaloError::InvalidShape(format!(
                "{} precomputed reference log-probs for a batch of {} examples",
                precomputed.len(),
                batch.examples.batch
            )))
        }
        _ => Ok(()),
    }
}

/// TRL's metric names, and `kl` = z0 when the loss reports none.
fn named_metrics(out: &KtoOutput) -> Vec<(String, f64)> {
    let mut metrics: Vec<(String, f64)> = out
        .metrics
        .to_named()
        .into_iter()
        .map(|(name, v)| (name.to_string(), v))
        .collect();
    if !metrics.iter().any(|(n, _)| n == "kl") {
        metrics.push(("kl".into(), out.z0));
    }
    metrics
}

/// Summed completion log-probs of `batch` under `model` on `gpu`, queued, with the checks of the
/// kernels that computed them; a model on the host is scored there and its sums uploaded.
pub(crate) fn sequence_logps_queued<W: GptWeights>(
    gpu: &Arc<CudaBackend>,
    model: &W,
    batch: &TokenBatch,
) -> Result<(CudaSlice<f32>, DeviceChecks)> {
    if model.device().is_cpu() {
        return Ok((
            gpu.htod(&sequence_logps_inference(model, batch)?)?,
            DeviceChecks::new(),
        ));
    }
    let (tokens, checks) = forward::token_logprobs_inference_queued(
        model,
        &batch.input_ids,
        &batch.targets,
        batch.batch,
        batch.seq,
    )?;
    let labels = gpu.htod(&batch.targets)?;
    let sums = gpu.enqueue_sequence_sums(
        tokens.as_ref().cuda_or_err()?,
        &labels,
        IGNORE_INDEX,
        layout(batch),
    )?;
    Ok((sums.sums, checks))
}

/// The CUDA arm of [`kto_step`]: everything queued; the loss read with the update.
fn kto_step_on_device<P: GptWeights, R: GptWeights>(
    gpu: &Arc<CudaBackend>,
    policy: &P,
    reference: &R,
    batch: &KtoBatch,
    config: &KtoConfig,
) -> Result<StepOutput> {
    let examples = &batch.examples;
    let (mut tape, token_logp) = policy_token_logps(policy, examples)?;
    // Checked after the policy's forward and before its backward, as the CPU step orders them.
    let reference_logps = match &batch.reference_logps {
        Some(precomputed) => gpu.htod(precomputed)?,
        None => {
            let (sums, checks) = sequence_logps_queued(gpu, reference, examples)?;
            tape.extend_checks(&checks);
            sums
        }
    };
    let (kl_policy, checks) = sequence_logps_queued(gpu, policy, &batch.kl_pairs)?;
    tape.extend_checks(&checks);
    let (kl_reference, checks) = sequence_logps_queued(gpu, reference, &batch.kl_pairs)?;
    tape.extend_checks(&checks);
    let desirable: Vec<u8> = batch.desirable.iter().map(|&d| u8::from(d)).collect();
    let inputs = KtoDeviceInputs {
        config: *config,
        labels: gpu.htod(&examples.targets)?,
        reference_logps,
        desirable: gpu.htod(&desirable)?,
        kl_policy,
        kl_reference,
    };
    let queued = gpu.enqueue_kto_step_tokens(
        config,
        tape.storage(token_logp).cuda_or_err()?,
        &inputs.labels,
        IGNORE_INDEX,
        layout(examples),
        &inputs.step_inputs(),
    )?;
    queued_step_output(
        tape,
        token_logp,
        gpu,
        inputs,
        queued,
        |gpu, inputs, queued, read| {
            let out = queued.finish_kto(gpu, &inputs.config, &inputs.step_inputs(), read)?;
            Ok(StepMetrics {
                loss: out.loss,
                metrics: named_metrics(&out),
            })
        },
    )
}

/// The device inputs of a queued KTO loss.
struct KtoDeviceInputs {
    config: KtoConfig,
    labels: CudaSlice<i32>,
    reference_logps: CudaSlice<f32>,
    desirable: CudaSlice<u8>,
    kl_policy: CudaSlice<f32>,
    kl_reference: CudaSlice<f32>,
}

impl KtoDeviceInputs {
    fn step_inputs(&self) -> CudaKtoStepInputs<'_> {
        CudaKtoStepInputs {
            reference_logps: self.reference_logps.as_view(),
            is_desirable: self.desirable.as_view(),
            kl: Some(CudaKlInput::LogProbs {
                policy: self.kl_policy.as_view(),
                reference: self.kl_reference.as_view(),
            }),
        }
    }
}

/// The CPU arm of [`kto_step`].
fn kto_step_on_host<P: GptWeights, R: GptWeights>(
    policy: &P,
    reference: &R,
    batch: &KtoBatch,
    config: &KtoConfig,
) -> Result<StepOutput> {
    let examples = &batch.examples;
    let (mut tape, token_logp) = policy_token_logps(policy, examples)?;
    let reference_logps = match &batch.reference_logps {
        Some(precomputed) => precomputed.clone(),
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
    Ok(StepOutput::host(out.loss, grads, named_metrics(&out)))
}
