//! Pretraining and SFT step: mean token negative log-likelihood (PyTorch
//! `cross_entropy(reduction="mean", ignore_index=-100)`, what TRL's `SFTTrainer` minimises) over
//! the batch's counted targets — every token for pretraining, completion tokens for SFT.

use super::batching::TokenBatch;
use super::stage::StepOutput;
use crate::autograd::Tape;
use crate::model::{forward, GptWeights};
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
    let value = tape.to_host(loss)?[0] as f64;
    let grads = tape.backward_scalar(loss)?;
    Ok(StepOutput {
        loss: value,
        grads,
        metrics: Vec::new(),
    })
}
