//! DPO step (TRL `DPOTrainer.concatenated_forward` + `dpo_loss`): chosen and rejected completions
//! in one forward pass (rows `0..n` chosen, `n..2n` rejected), the policy's log-probs through the
//! fused LM head (no `[rows, vocab]` logits); the core's [`dpo_step_tokens`]
//! sums the completion log-probs, computes the DPO-family loss and broadcasts its gradients back
//! to the tokens, which the tape backpropagates.

use std::sync::Arc;

use super::batching::TokenBatch;
use super::kto::{sequence_logps_inference, sequence_logps_queued};
use super::step_output::{DeviceValues, PendingMetrics, StepMetrics, StepOutput, StepValues};
use crate::autograd::{Device, StorageRef, Tape};
use crate::model::{forward, GptWeights};
use halo_kernels::cpu::SequenceLayout;
use halo_kernels::cuda::{CudaBackend, CudaPairReference, CudaSlice, CudaTokenStep, CudaView};
use halo_kernels::error::{HaloError, Result};
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
    let mut tape = Tape::new().on(policy.device());
    let token_logp = forward::token_logprobs_fused_head(
        policy,
        &mut tape,
        &batch.input_ids,
        &batch.targets,
        batch.batch,
        batch.seq,
    )?;
    let (reference_logps, checks) = sequence_logps_queued(gpu, reference, batch)?;
    tape.extend_checks(&checks);
    let pending = PendingDpo {
        gpu: gpu.clone(),
        config: *config,
        labels: gpu.htod(&batch.targets)?,
        reference_logps,
        queued: None,
    };
    let layout = SequenceLayout::Padded {
        batch: batch.batch,
        seq: batch.seq,
    };
    let queued = gpu.enqueue_dpo_step_tokens(
        config,
        tape.storage(token_logp).cuda_or_err()?,
        &pending.labels,
        IGNORE_INDEX,
        layout,
        &pending.reference()?,
    )?;
    let grads = tape.backward_from(&[(token_logp, StorageRef::Cuda(&queued.token_grad))])?;
    Ok(StepOutput {
        grads,
        values: StepValues::Device(DeviceValues::new(PendingDpo {
            queued: Some(queued),
            ..pending
        })),
    })
}

/// A queued DPO-family loss and the device inputs it reads (kept for its error diagnosis).
struct PendingDpo {
    gpu: Arc<CudaBackend>,
    config: DpoConfig,
    labels: CudaSlice<i32>,
    /// Chosen sequences' sums then rejected ones'.
    reference_logps: CudaSlice<f32>,
    queued: Option<CudaTokenStep>,
}

impl PendingDpo {
    fn reference(&self) -> Result<CudaPairReference<'_>> {
        let n = pair_count(self.reference_logps.len())?;
        Ok(CudaPairReference {
            chosen_logps: self.reference_logps.slice(..n),
            rejected_logps: self.reference_logps.slice(n..),
        })
    }
}

impl PendingMetrics for PendingDpo {
    fn values(&self) -> Vec<CudaView<'_, f32>> {
        self.queued.iter().flat_map(|q| q.values()).collect()
    }

    fn finish(self: Box<Self>, read: &[Vec<f32>]) -> Result<StepMetrics> {
        let queued = self
            .queued
            .as_ref()
            .ok_or_else(|| HaloError::Autograd("the DPO loss was never queued".into()))?;
        let out = queued.finish_dpo(&self.gpu, &self.config, &self.reference()?, read)?;
        Ok(StepMetrics {
            loss: out.loss,
            metrics: named_metrics(&out),
        })
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
    Ok(StepOutput::host(out.loss, grads, named_metrics(&out)))
}
