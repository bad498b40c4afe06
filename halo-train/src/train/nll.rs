//! Pretraining and SFT step: mean token negative log-likelihood (PyTorch
//! `cross_entropy(reduction="mean", ignore_index=-100)`, what TRL's `SFTTrainer` minimises) over
//! the batch's counted targets — every token for pretraining, completion tokens for SFT.

use super::batching::TokenBatch;
use super::step_output::{DeviceValues, PendingMetrics, StepMetrics, StepOutput, StepValues};
use crate::autograd::{Storage, Tape};
use crate::model::{forward, GptWeights};
use halo_kernels::cuda::{CudaSlice, CudaView};
use halo_kernels::error::Result;

/// Loss and gradients of one NLL step, on the device of `model`'s weights.
pub fn nll_step<W: GptWeights>(model: &W, batch: &TokenBatch) -> Result<StepOutput> {
    let mut tape = Tape::new().on(model.device());
    let loss = forward::nll(
        model,
        &mut tape,
        &batch.input_ids,
        &batch.targets,
        batch.batch,
        batch.seq,
    )?;
    let grads = tape.backward_scalar(loss)?;
    // On a device the loss stays there: it is read with the update's one wait.
    Ok(match tape.take_storage(loss)? {
        Storage::Host(value) => StepOutput::host(value[0] as f64, grads, Vec::new()),
        Storage::Cuda(value) => StepOutput {
            grads,
            values: StepValues::Device(DeviceValues::new(DeviceLoss(value))),
        },
    })
}

/// The NLL step's loss, still on the device.
struct DeviceLoss(CudaSlice<f32>);

impl PendingMetrics for DeviceLoss {
    fn values(&self) -> Vec<CudaView<'_, f32>> {
        vec![self.0.as_view()]
    }

    fn finish(self: Box<Self>, read: &[Vec<f32>]) -> Result<StepMetrics> {
        let loss = read
            .first()
            .and_then(|v| v.first())
            .copied()
            .ok_or_else(|| {
                halo_kernels::error::HaloError::Autograd("the NLL loss was not read back".into())
            })?;
        Ok(StepMetrics {
            loss: loss as f64,
            metrics: Vec::new(),
        })
    }
}
