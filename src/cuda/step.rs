//! GPU twin of [`crate::step`]: one call from the policy's logits on the device to the loss, TRL's
//! metrics and `∂L/∂logits`, for KTO and for the DPO family — the chain of this backend's ops
//! (token log-probs, sequence sums, the loss kernel, the gradient broadcast, the in-place backward).
//!
//! The gradient overwrites the logits (the in-place backward): in a training step the logits are
//! dead once the loss is known, and a second `[rows, vocab]` buffer is the largest allocation of
//! the step. Copy them first if they are still needed.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

use super::device::{cuda_err, CudaBackend};
use super::dpo::CudaPairBatch;
use super::kto::{CudaKlInput, CudaKtoBatch};
use super::launch::CudaLogit;
use crate::cpu::SequenceLayout;
use crate::error::Result;
use crate::losses::{DpoConfig, KtoConfig, KtoOutput, PairLossOutput};
use crate::step::pair_count;

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
    pub fn kto_step<T: CudaLogit>(
        &self,
        config: &KtoConfig,
        policy: CudaLogits<'_, impl DevicePtr<T> + DevicePtrMut<T>, impl DevicePtr<i32>>,
        inputs: &CudaKtoStepInputs<'_>,
    ) -> Result<CudaStep<KtoOutput>> {
        self.step_from_logits(policy, |sums, _counts| {
            self.kto_loss_device(
                config,
                &CudaKtoBatch {
                    policy_logps: sums.as_view(),
                    reference_logps: inputs.reference_logps.slice(..),
                    is_desirable: inputs.is_desirable.slice(..),
                    kl: inputs.kl.as_ref().map(CudaKlInput::reborrow),
                },
            )
        })
    }

    /// [`crate::step::dpo_step`] on the device (sequences `0..n` chosen, `n..2n` rejected); the
    /// logits are overwritten with `∂L/∂logits`.
    pub fn dpo_step<T: CudaLogit>(
        &self,
        config: &DpoConfig,
        policy: CudaLogits<'_, impl DevicePtr<T> + DevicePtrMut<T>, impl DevicePtr<i32>>,
        reference: &CudaPairReference<'_>,
    ) -> Result<CudaStep<PairLossOutput>> {
        self.step_from_logits(policy, |sums, counts| {
            let n = pair_count(sums.len())?;
            let (loss, grads) = self.dpo_loss_device(
                config,
                &CudaPairBatch {
                    policy_chosen_logps: sums.slice(..n),
                    policy_rejected_logps: sums.slice(n..),
                    reference_chosen_logps: reference.chosen_logps.slice(..),
                    reference_rejected_logps: reference.rejected_logps.slice(..),
                    chosen_counts: Some(counts.slice(..n)),
                    rejected_counts: Some(counts.slice(n..)),
                },
            )?;
            // One gradient per sequence, chosen then rejected, as the layout orders them.
            let mut grad_seq = self.alloc_output::<f32>(2 * n)?;
            if n > 0 {
                let stream = self.stream();
                stream
                    .memcpy_dtod(&grads.grad_chosen, &mut grad_seq.slice_mut(..n))
                    .map_err(cuda_err("copy chosen gradients"))?;
                stream
                    .memcpy_dtod(&grads.grad_rejected, &mut grad_seq.slice_mut(n..))
                    .map_err(cuda_err("copy rejected gradients"))?;
            }
            Ok((loss, grad_seq))
        })
    }

    /// Forward, sums, `loss` (→ the loss and one gradient per sequence), broadcast, backward.
    fn step_from_logits<T: CudaLogit, L>(
        &self,
        policy: CudaLogits<'_, impl DevicePtr<T> + DevicePtrMut<T>, impl DevicePtr<i32>>,
        loss: impl FnOnce(&CudaSlice<f32>, &CudaSlice<u32>) -> Result<(L, CudaSlice<f32>)>,
    ) -> Result<CudaStep<L>> {
        let CudaLogits {
            logits,
            labels,
            vocab,
            ignore_index,
            layout,
        } = policy;
        let tokens = self.token_logprobs(&*logits, labels, vocab, ignore_index)?;
        let sums = self.sequence_sums(&tokens.logp, labels, ignore_index, layout)?;
        let (loss, grad_seq) = loss(&sums.sums, &sums.counts)?;
        let token_grad = self.broadcast_sequence_grad(&grad_seq, labels, ignore_index, layout)?;
        self.token_logprobs_backward_inplace(
            logits,
            labels,
            tokens.saved_lse(),
            &token_grad,
            vocab,
            ignore_index,
        )?;
        Ok(CudaStep {
            loss,
            policy_logps: sums.sums,
            token_counts: sums.counts,
            token_logps: tokens.logp,
        })
    }
}
