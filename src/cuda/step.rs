//! GPU twin of [`crate::step`]: one call from the policy's logits on the device to the loss, TRL's
//! metrics and `∂L/∂logits`, for KTO and for the DPO family — the chain of this backend's ops
//! (token log-probs, sequence sums, the loss kernel, the gradient broadcast, the in-place backward).
//!
//! The chain is queued without a host wait between its ops: each checking kernel writes its status
//! into its own region of one packed buffer ([`super::readback`]), the loss's outputs, gradients and
//! the sums are gathered into it on the stream, and the host reads it once (one copy, one wait,
//! counted by `tests/emulated_round_trips.rs`). The checks then run on that copy in the CPU step's
//! order (forward, sums, loss, gradient, backward); an error found on the host before the loss is
//! queued (a bad layout, a bad config) is returned only after the forward's status is read, as the
//! CPU would have stopped at the forward first. Telling the CPU's exact error costs further reads
//! only when something is wrong. Every op of the chain runs even when an earlier one failed (its
//! outputs are then garbage the host never uses; the kernels are memory-safe on any values).
//!
//! The gradient overwrites the logits (the in-place backward): in a training step the logits are
//! dead once the loss is known, and a second `[rows, vocab]` buffer is the largest allocation of
//! the step. Copy them first if they are still needed.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

use super::device::CudaBackend;
use super::dpo::CudaPairBatch;
use super::kto::{CudaKlInput, CudaKtoBatch};
use super::launch::{check_token_shape, CudaLogit};
use super::readback::{StatusRegion, StepReadback, StepValues};
use super::sequence_sums::CudaSequenceSums;
use super::token_logprobs::CudaTokenLogprobs;
use crate::cpu::SequenceLayout;
use crate::error::Result;
use crate::kernel_abi::{dpo_out, kto_out};
use crate::losses::{DpoConfig, KtoConfig, KtoOutput, PairLossOutput};
use crate::step::pair_count;
use crate::validate::check_finite;

/// The policy's logits on the device (`[rows, vocab]`), overwritten with `∂L/∂logits` by the step.
#[derive(Debug)]
pub struct CudaLogits<'a, Logits, Labels> {
    /// `[rows, vocab]`, row-major (a `CudaSlice<T>` or a view of one).
    pub logits: &'a mut Logits,
    /// `[rows]`, already shifted: row `t` predicts `labels[t]`.
    pub labels: &'a Labels,
    /// Columns of the logits.
    pub vocab: usize,
    /// The label of rows that are not counted (prompt, padding).
    pub ignore_index: i32,
    /// How the rows are grouped into sequences.
    pub layout: SequenceLayout<'a>,
}

/// Device twin of [`crate::step::KtoStepInputs`].
#[derive(Debug)]
pub struct CudaKtoStepInputs<'a> {
    /// The reference's summed log-probs, one per sequence.
    pub reference_logps: CudaView<'a, f32>,
    /// Non-zero for a desirable example.
    pub is_desirable: CudaView<'a, u8>,
    /// The KL pairs or a partial; required for the `kto` loss type.
    pub kl: Option<CudaKlInput<'a>>,
}

/// Device twin of [`crate::step::PairReference`].
#[derive(Debug)]
pub struct CudaPairReference<'a> {
    /// The reference's summed log-probs of the chosen sequences (`0..n`).
    pub chosen_logps: CudaView<'a, f32>,
    /// The reference's summed log-probs of the rejected sequences (`n..2n`).
    pub rejected_logps: CudaView<'a, f32>,
}

/// What a device step leaves besides the gradient (which is in the logits' buffer).
#[derive(Debug)]
pub struct CudaStep<L> {
    /// The loss, its per-sequence gradients and metrics, on the host.
    pub loss: L,
    /// Summed policy log-prob per sequence.
    pub policy_logps: CudaSlice<f32>,
    /// Counted tokens per sequence.
    pub token_counts: CudaSlice<u32>,
    /// `log p(y_t)` per row.
    pub token_logps: CudaSlice<f32>,
}

impl CudaBackend {
    /// [`crate::step::kto_step`] on the device; the logits are overwritten with `∂L/∂logits`.
    ///
    /// The whole chain is queued without a host wait; the kernels' status, the loss's outputs and
    /// the sums are then read back together (one copy, one wait). Errors are the CPU step's, in
    /// its order; finding which one costs extra reads, only when something is wrong.
    pub fn kto_step<T: CudaLogit>(
        &self,
        config: &KtoConfig,
        policy: CudaLogits<'_, impl DevicePtr<T> + DevicePtrMut<T>, impl DevicePtr<i32>>,
        inputs: &CudaKtoStepInputs<'_>,
    ) -> Result<CudaStep<KtoOutput>> {
        self.step_from_logits(
            policy,
            kto_out::LEN,
            |sums, _readback| {
                let launched = self.launch_kto_loss(config, &kto_batch(sums, inputs))?;
                Ok((launched.out, launched.grad))
            },
            |sums, values| {
                self.finish_kto_loss(
                    config,
                    &kto_batch(sums, inputs),
                    &values.out,
                    values.grads.clone(),
                )
            },
        )
    }

    /// [`crate::step::dpo_step`] on the device (sequences `0..n` chosen, `n..2n` rejected); the
    /// logits are overwritten with `∂L/∂logits`. One host wait, as [`CudaBackend::kto_step`].
    pub fn dpo_step<T: CudaLogit>(
        &self,
        config: &DpoConfig,
        policy: CudaLogits<'_, impl DevicePtr<T> + DevicePtrMut<T>, impl DevicePtr<i32>>,
        reference: &CudaPairReference<'_>,
    ) -> Result<CudaStep<PairLossOutput>> {
        self.step_from_logits(
            policy,
            dpo_out::LEN,
            |sums, readback| {
                let status_ptr = readback.status_ptr(self, StatusRegion::Loss);
                let launched =
                    self.launch_dpo_loss(config, &pair_batch(sums, reference)?, status_ptr)?;
                let grad_seq = launched.grads.concatenated(self)?;
                Ok((launched.out, grad_seq))
            },
            |sums, values| {
                let n = values.grads.len() / 2;
                self.finish_dpo_loss(
                    config,
                    &pair_batch(sums, reference)?,
                    values.loss,
                    &values.out,
                    values.grads[..n].to_vec(),
                    values.grads[n..].to_vec(),
                )
            },
        )
    }

    /// Forward, sums, the loss (`launch_loss` queues it and returns its `out` and one gradient per
    /// sequence; `finish_loss` forms the host output from the values read back), broadcast,
    /// backward — all queued, then one read of [`StepReadback`] and the checks in the CPU's order.
    fn step_from_logits<T: CudaLogit, L>(
        &self,
        policy: CudaLogits<'_, impl DevicePtr<T> + DevicePtrMut<T>, impl DevicePtr<i32>>,
        out_len: usize,
        launch_loss: impl FnOnce(
            &CudaSequenceSums,
            &mut StepReadback,
        ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)>,
        finish_loss: impl FnOnce(&CudaSequenceSums, &StepValues) -> Result<L>,
    ) -> Result<CudaStep<L>> {
        let CudaLogits {
            logits,
            labels,
            vocab,
            ignore_index,
            layout,
        } = policy;
        let rows = check_token_shape(logits.len(), labels.len(), vocab)?;
        // The layout's own errors come after the forward's (as on the CPU): held until then.
        let batch = layout.check_rows(rows);
        let sequences = *batch.as_ref().unwrap_or(&0);
        let mut readback = StepReadback::new(self, out_len, sequences, sequences)?;
        let mut tokens = CudaTokenLogprobs {
            logp: self.alloc_output(rows)?,
            lse: self.alloc_output(rows)?,
            lse_residual: self.alloc_output(rows)?,
        };
        let forward_status = readback.status_ptr(self, StatusRegion::Forward);
        self.launch_token_logprobs(
            &*logits,
            labels,
            vocab,
            ignore_index,
            &mut tokens.logp,
            &mut tokens.lse,
            &mut tokens.lse_residual,
            forward_status,
        )?;
        // An error found on the host from here on is the CPU's only if the ops before it pass.
        let forward_error = |readback: &StepReadback| -> Result<()> {
            let word = readback.read_forward_status(self)?;
            self.token_status_error(word, labels, vocab, ignore_index, "logits")
        };
        if let Err(e) = batch {
            forward_error(&readback)?;
            return Err(e);
        }
        let mut sums = CudaSequenceSums {
            sums: self.alloc_output(sequences)?,
            counts: self.alloc_output(sequences)?,
        };
        if let Err(e) =
            self.launch_sequence_sums(&tokens.logp, labels, ignore_index, layout, &mut sums)
        {
            forward_error(&readback)?;
            return Err(e);
        }
        let sums_error = |sums: &CudaSequenceSums| -> Result<()> {
            let host = self.dtoh(&sums.sums)?;
            self.check_sequence_sums(&tokens.logp, labels, ignore_index, layout, &host)
        };
        let (out, grad_seq) = match launch_loss(&sums, &mut readback) {
            Ok(launched) => launched,
            Err(e) => {
                forward_error(&readback)?;
                sums_error(&sums)?;
                return Err(e);
            }
        };
        let mut token_grad = self.alloc_output::<f32>(rows)?;
        self.launch_broadcast_sequence_grad(
            &grad_seq,
            labels,
            ignore_index,
            layout,
            &mut token_grad,
        )?;
        let backward_status = readback.status_ptr(self, StatusRegion::Backward);
        self.launch_token_logprobs_backward_inplace(
            logits,
            labels,
            tokens.saved_lse(),
            &token_grad,
            vocab,
            ignore_index,
            backward_status,
        )?;
        readback.gather(self, &out, &grad_seq, &sums.sums)?;
        // The step's one host wait; then the checks in the CPU chain's order.
        let values = readback.read(self)?;
        self.token_status_error(values.forward, labels, vocab, ignore_index, "logits")?;
        self.check_sequence_sums(&tokens.logp, labels, ignore_index, layout, &values.sums)?;
        let loss = finish_loss(&sums, &values)?;
        check_finite("grad_seq", &values.grads)?;
        self.token_logprobs_backward_status(
            values.backward,
            labels,
            &tokens.lse,
            vocab,
            ignore_index,
            T::DTYPE,
        )?;
        Ok(CudaStep {
            loss,
            policy_logps: sums.sums,
            token_counts: sums.counts,
            token_logps: tokens.logp,
        })
    }
}

/// The KTO loss's inputs: the step's sums and the caller's per-sequence inputs.
pub(super) fn kto_batch<'a>(
    sums: &'a CudaSequenceSums,
    inputs: &'a CudaKtoStepInputs<'_>,
) -> CudaKtoBatch<'a> {
    CudaKtoBatch {
        policy_logps: sums.sums.as_view(),
        reference_logps: inputs.reference_logps.slice(..),
        is_desirable: inputs.is_desirable.slice(..),
        kl: inputs.kl.as_ref().map(CudaKlInput::reborrow),
    }
}

/// The pair loss's inputs: sequences `0..n` of the step's sums chosen, `n..2n` rejected.
pub(super) fn pair_batch<'a>(
    sums: &'a CudaSequenceSums,
    reference: &'a CudaPairReference<'_>,
) -> Result<CudaPairBatch<'a>> {
    let n = pair_count(sums.sums.len())?;
    Ok(CudaPairBatch {
        policy_chosen_logps: sums.sums.slice(..n),
        policy_rejected_logps: sums.sums.slice(n..),
        reference_chosen_logps: reference.chosen_logps.slice(..),
        reference_rejected_logps: reference.rejected_logps.slice(..),
        chosen_counts: Some(sums.counts.slice(..n)),
        rejected_counts: Some(sums.counts.slice(n..)),
    })
}
