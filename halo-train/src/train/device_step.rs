//! What the KTO and DPO steps share: the policy's per-token log-probs through the fused LM head
//! on a training tape, and — on a CUDA device — the loss queued from them
//! ([`halo_kernels::cuda::CudaTokenStep`]) whose token gradient the tape backpropagates at once,
//! with the loss itself read later, in the update's one wait ([`QueuedLoss`]).

use std::sync::Arc;

use super::batching::TokenBatch;
use super::step_output::{DeviceValues, PendingMetrics, StepMetrics, StepOutput, StepValues};
use crate::autograd::{DeviceChecks, StorageRef, Tape, Var};
use crate::model::{forward, GptWeights};
use halo_kernels::cuda::{CudaBackend, CudaTokenStep, CudaView};
use halo_kernels::error::Result;

/// A training tape on the policy's device with the policy's fused-head log-probs of `batch`
/// recorded (one per row, 0 where the target is ignored).
pub(crate) fn policy_token_logps<'a, W: GptWeights>(
    policy: &'a W,
    batch: &TokenBatch,
) -> Result<(Tape<'a>, Var)> {
    let mut tape = Tape::new().on(policy.device());
    let token_logp = forward::token_logprobs_fused_head(
        policy,
        &mut tape,
        &batch.input_ids,
        &batch.targets,
        batch.batch,
        batch.seq,
    )?;
    Ok((tape, token_logp))
}

/// Turns the host copies of a queued loss's values into the step's metrics (or its error).
type FinishLoss<I> = fn(&CudaBackend, &I, &CudaTokenStep, &[Vec<f32>]) -> Result<StepMetrics>;

/// A loss queued on the device, the device inputs it reads (kept: its error diagnosis reads them)
/// and how to finish it.
struct QueuedLoss<I> {
    gpu: Arc<CudaBackend>,
    inputs: I,
    queued: CudaTokenStep,
    finish: FinishLoss<I>,
}

impl<I> PendingMetrics for QueuedLoss<I> {
    fn values(&self) -> Vec<CudaView<'_, f32>> {
        self.queued.values().into_iter().collect()
    }

    fn finish(self: Box<Self>, read: &[Vec<f32>]) -> Result<StepMetrics> {
        (self.finish)(&self.gpu, &self.inputs, &self.queued, read)
    }
}

/// Backpropagates `queued`'s token gradient from `token_logp` through `tape` and packs the step:
/// the gradients (with their pending checks) and the loss left on the device.
pub(crate) fn queued_step_output<I: 'static>(
    mut tape: Tape<'_>,
    token_logp: Var,
    gpu: &Arc<CudaBackend>,
    inputs: I,
    queued: CudaTokenStep,
    finish: FinishLoss<I>,
) -> Result<StepOutput> {
    // The loss kernel's status joins the step's checks, so that the update is gated on it too: a
    // batch the loss refuses (DPO's zero-token sequence, an output that overflowed) leaves the
    // weights and the step count as they were. Its error is `finish`'s (the CPU's), read after.
    let mut loss_checks = DeviceChecks::new();
    loss_checks.push(queued.loss_status_copy(gpu)?, |_| Ok(()));
    tape.extend_checks(&loss_checks);
    let grads = tape.backward_from(&[(token_logp, StorageRef::Cuda(&queued.token_grad))])?;
    Ok(StepOutput {
        grads,
        values: StepValues::Device(DeviceValues::new(QueuedLoss {
            gpu: gpu.clone(),
            inputs,
            queued,
            finish,
        })),
    })
}
