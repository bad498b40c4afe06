//! DPO step (TRL `DPOTrainer.concatenated_forward` + `dpo_loss`): chosen and rejected completions
//! in one forward pass (rows `0..n` chosen, `n..2n` rejected), the policy's log-probs through the
//! fused LM head (no `[rows, vocab]` logits); the core's [`dpo_step_tokens`]
//! sums the completion log-probs, computes the DPO-family loss and broadcasts its gradients back
//! to the tokens, which the tape backpropagates.

use std::sync::Arc;

use super::batching::TokenBatch;
use super::device_step::{policy_token_logps, queued_step_output};
use super::kto::{sequence_logps_inference, sequence_logps_queued};
use super::step_output::{StepMetrics, StepOutput};
use crate::autograd::Device;
use crate::model::GptWeights;
use halo_kernels::cpu::SequenceLayout;
use halo_kernels::cuda::{CudaBackend, CudaPairReference, CudaSlice};
use halo_kernels::error::Result;
use halo_kernels::losses::{DpoConfig, PairLossOutput};
use halo_kernels::step::{dpo_step_tokens, pair_count, PairReference, TokenLogps};
use halo_kernels::IGNORE_INDEX;

/// Loss, gradients and TRL metrics of one DPO step on a batch from
/// [`dpo_batch`](super::batching::dpo_batch). On the CPU the loss is the core's host step
/// (`dpo_step_tokens`); on a CUDA device its queued twin (`enqueue_dpo_step_tokens`), read with
/// the update's one host wait.
pub fn dpo_step<P: GptWeights, R: GptWeights>(
    policy: &P,
    reference: &R,
    batch: &TokenBatch,
    config: &DpoConfig,
) -> Result<StepOutput> {
    match policy.device() {
        Device::Cuda(gpu) => dpo_step_on_device(&gpu, policy, reference, batch, config),
        Device::Cpu => dpo_step_on_host(policy, reference, batch, config),
    }
}

/// TRL's metric names.
fn named_metrics(out: &PairLossOutput) -> Vec<(String, f64)> {
    out.metrics
        .to_named()
        .into_iter()
        .map(|(name, v)| (name.to_string(), v))
        .collect()
}

/// The CUDA arm of [`dpo_step`]: everything queued; the loss read with the update.
fn dpo_step_on_device<P: GptWeights, R: GptWeights>(
    gpu: &Arc<CudaBackend>,
    policy: &P,
    reference: &R,
    batch: &TokenBatch,
    config: &DpoConfig,
) -> Result<StepOutput> {
    let (mut tape, token_logp) = policy_token_logps(policy, batch)?;
    let (reference_logps, checks) = sequence_logps_queued(gpu, reference, batch)?;
    tape.extend_checks(&checks);
    let inputs = DpoDeviceInputs {
        config: *config,
        labels: gpu.htod(&batch.targets)?,
        reference_logps,
    };
    let queued = gpu.enqueue_dpo_step_tokens(
        config,
        tape.storage(token_logp).cuda_or_err()?,
        &inputs.labels,
        IGNORE_INDEX,
        padded(batch),
        &inputs.reference()?,
    )?;
    queued_step_output(
        tape,
        token_logp,
        gpu,
        inputs,
        queued,
        |gpu, inputs, queued, read| {
            let out = queued.finish_dpo(gpu, &inputs.config, &inputs.reference()?, read)?;
            Ok(StepMetrics {
                loss: out.loss,
                metrics: named_metrics(&out),
            })
        },
    )
}

/// The device inputs of a queued DPO-family loss.
struct DpoDeviceInputs {
    config: DpoConfig,
    labels: CudaSlice<i32>,
    /// Chosen sequences' sums then rejected ones'.
    reference_logps: CudaSlice<f32>,
}

impl DpoDeviceInputs {
    fn reference(&self) -> Result<CudaPairReference<'_>> {
        let n = pair_count(self.reference_logps.len())?;
        Ok(CudaPairReference {
            chosen_logps: self.reference_logps.slice(..n),
            rejected_logps: self.reference_logps.slice(n..),
        })
    }
}

fn padded(batch: &TokenBatch) -> SequenceLayout<'static> {
    SequenceLayout::Padded {
        batch: batch.batch,
        seq: batch.seq,
    }
}

/// The CPU arm of [`dpo_step`].
fn dpo_step_on_host<P: GptWeights, R: GptWeights>(
    policy: &P,
    reference: &R,
    batch: &TokenBatch,
    config: &DpoConfig,
) -> Result<StepOutput> {
    let n = batch.batch / 2;
    let layout = padded(batch);
    let (mut tape, token_logp) = policy_token_logps(policy, batch)?;
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
    Ok(StepOutput::host(out.loss, grads, named_metrics(&out)))
}
