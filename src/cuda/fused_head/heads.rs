//! Loss heads from hidden states on CUDA: [`CudaBackend::kto_head_step`] and
//! [`CudaBackend::dpo_head_step`], the twins of [`crate::fused_head::kto_head_step`] /
//! [`crate::fused_head::dpo_head_step`]. The chain is this backend's own ops, not a copy of the
//! loss math:
//!
//! ```text
//! hidden ──fused forward──▶ logp ──sequence_sums──▶ Σ logp ──kto_loss / dpo_loss kernel──▶ ∂L/∂Σ
//!        ──broadcast_sequence_grad──▶ ∂L/∂logp ──fused backward──▶ ∂hidden, ∂weight (, ∂bias)
//! ```
//!
//! The reference's and the KL pairs' log-probs come from given sums or from their own hidden
//! states through the fused forward (no gradient, no logits).

use cudarc::driver::CudaSlice;

use super::{CudaFusedHeadGrads, CudaFusedSaved, CudaLmHead};
use crate::cpu::SequenceLayout;
use crate::cuda::device::{cuda_err, CudaBackend};
use crate::cuda::launch::CudaLogit;
use crate::cuda::{CudaKlInput, CudaKtoBatch, CudaPairBatch, CudaSequenceSums};
use crate::error::{HaloError, Result};
use crate::fused_head::FusedChunks;
use crate::losses::{DpoConfig, KlInput, KtoConfig, KtoOutput, PairLossOutput};
use crate::step::pair_count;

/// A batch's hidden states on the device and where its tokens and sequences are (device twin of
/// [`crate::fused_head::HiddenBatch`]; the labels stay on the host, which picks the counted rows).
#[derive(Debug, Clone, Copy)]
pub struct CudaHiddenBatch<'a, T> {
    /// `[rows, H]`, row-major; rows whose label is ignored are not read.
    pub hidden: &'a CudaSlice<T>,
    /// Labels per row, already shifted.
    pub labels: &'a [i32],
    /// The label of rows that are not counted.
    pub ignore_index: i32,
    /// How the rows are grouped into sequences.
    pub layout: SequenceLayout<'a>,
}

/// Where the reference model's summed log-probs come from (twin of
/// [`crate::fused_head::ReferenceSource`]).
#[derive(Debug, Clone, Copy)]
pub enum CudaReferenceSource<'a, T> {
    /// Precomputed: one sum per sequence, on the host.
    Sums(&'a [f32]),
    /// From the reference model's hidden states of the same tokens and its head, forward only.
    Hidden {
        /// The reference model's hidden states, `[rows, H]`.
        hidden: &'a CudaSlice<T>,
        /// The reference model's LM head.
        head: CudaLmHead<'a, T>,
    },
}

/// Where KTO's KL pairs come from (twin of [`crate::fused_head::KlSource`]).
#[derive(Debug, Clone, Copy)]
pub enum CudaKlSource<'a, T> {
    /// Summed log-probs or a partial, on the host.
    Given(KlInput<'a>),
    /// The KL pairs' hidden states under the policy's head, and their reference sums.
    Hidden {
        /// The policy's hidden states of the KL pairs.
        policy: CudaHiddenBatch<'a, T>,
        /// The reference's summed log-probs of the KL pairs.
        reference: CudaReferenceSource<'a, T>,
    },
}

/// What a KTO head step needs besides the policy batch and head.
#[derive(Debug, Clone, Copy)]
pub struct CudaKtoHeadInputs<'a, T> {
    /// The reference's summed log-probs of the batch's sequences.
    pub reference: CudaReferenceSource<'a, T>,
    /// One per sequence.
    pub is_desirable: &'a [bool],
    /// Required for [`crate::losses::KtoLossType::Kto`].
    pub kl: Option<CudaKlSource<'a, T>>,
}

/// A head step on the device (twin of [`crate::fused_head::HeadStep`]): per-sequence values on
/// the host, per-token values and gradients on the device.
#[derive(Debug)]
pub struct CudaHeadStep<L> {
    /// The loss's output (mean loss, per-sequence gradients, metrics).
    pub loss: L,
    /// Summed policy log-prob per sequence.
    pub policy_logps: Vec<f32>,
    /// Summed reference log-prob per sequence.
    pub reference_logps: Vec<f32>,
    /// Counted tokens per sequence.
    pub token_counts: Vec<u32>,
    /// The policy's `log p(y_t)` per row (0 on ignored rows).
    pub token_logps: CudaSlice<f32>,
    /// `∂L/∂logp` per row (0 on ignored rows).
    pub token_grad: CudaSlice<f32>,
    /// `∂L/∂hidden`, `∂L/∂weight`, `∂L/∂bias` of the policy's head.
    pub grads: CudaFusedHeadGrads,
}

impl CudaBackend {
    /// [`crate::fused_head::kto_head_step`] on the device, with its errors.
    pub fn kto_head_step<T: CudaLogit>(
        &self,
        config: &KtoConfig,
        policy: &CudaHiddenBatch<'_, T>,
        head: &CudaLmHead<'_, T>,
        inputs: &CudaKtoHeadInputs<'_, T>,
        chunks: Option<FusedChunks>,
    ) -> Result<CudaHeadStep<KtoOutput>> {
        config.validate()?;
        let kl_sums = match inputs.kl {
            Some(CudaKlSource::Hidden {
                policy: kl_policy,
                reference,
            }) => Some((
                self.head_sequence_logps(&kl_policy, head, chunks)?,
                self.reference_logps(&kl_policy, &reference, chunks)?,
            )),
            Some(CudaKlSource::Given(KlInput::LogProbs { policy, reference })) => {
                Some((self.htod(policy)?, self.htod(reference)?))
            }
            _ => None,
        };
        let kl = match (&inputs.kl, &kl_sums) {
            (Some(CudaKlSource::Given(KlInput::Partial(p))), _) => Some(CudaKlInput::Partial(*p)),
            (_, Some((policy, reference))) => Some(CudaKlInput::LogProbs {
                policy: policy.as_view(),
                reference: reference.as_view(),
            }),
            _ => None,
        };
        let reference = self.reference_logps(policy, &inputs.reference, chunks)?;
        let desirable: Vec<u8> = inputs.is_desirable.iter().map(|&d| u8::from(d)).collect();
        let desirable = self.htod(&desirable)?;
        self.head_step(policy, head, chunks, reference, |sums, reference| {
            let batch = CudaKtoBatch {
                policy_logps: sums.sums.as_view(),
                reference_logps: reference.as_view(),
                is_desirable: desirable.as_view(),
                kl: kl.as_ref().map(CudaKlInput::reborrow),
            };
            self.kto_loss_device(config, &batch)
        })
    }

    /// [`crate::fused_head::dpo_head_step`] on the device (sequences `0..n` chosen, `n..2n`
    /// rejected), with its errors.
    pub fn dpo_head_step<T: CudaLogit>(
        &self,
        config: &DpoConfig,
        policy: &CudaHiddenBatch<'_, T>,
        head: &CudaLmHead<'_, T>,
        reference: &CudaReferenceSource<'_, T>,
        chunks: Option<FusedChunks>,
    ) -> Result<CudaHeadStep<PairLossOutput>> {
        config.validate()?;
        let n = pair_count(policy.layout.batch())?;
        let reference = self.reference_logps(policy, reference, chunks)?;
        if reference.len() != 2 * n {
            return Err(HaloError::LengthMismatch {
                what: "reference log-probs",
                expected: 2 * n,
                got: reference.len(),
            });
        }
        self.head_step(policy, head, chunks, reference, |sums, reference| {
            let batch = CudaPairBatch {
                policy_chosen_logps: sums.sums.slice(..n),
                policy_rejected_logps: sums.sums.slice(n..),
                reference_chosen_logps: reference.slice(..n),
                reference_rejected_logps: reference.slice(n..),
                // IPO's length normalization (as the logits step passes them).
                chosen_counts: Some(sums.counts.slice(..n)),
                rejected_counts: Some(sums.counts.slice(n..)),
            };
            let (out, grads) = self.dpo_loss_device(config, &batch)?;
            // One gradient per sequence, chosen then rejected, as the layout orders them.
            let mut grad_seq = self.alloc_output::<f32>(2 * n)?;
            let stream = self.stream();
            stream
                .memcpy_dtod(&grads.grad_chosen, &mut grad_seq.slice_mut(..n))
                .map_err(cuda_err("copy chosen gradients"))?;
            stream
                .memcpy_dtod(&grads.grad_rejected, &mut grad_seq.slice_mut(n..))
                .map_err(cuda_err("copy rejected gradients"))?;
            Ok((out, grad_seq))
        })
    }

    /// Fused forward of the policy, its sequence sums, the loss (`loss` returns its output and
    /// `∂L/∂Σ logp` per sequence on the device), the broadcast to tokens, the fused backward.
    fn head_step<T: CudaLogit, L>(
        &self,
        policy: &CudaHiddenBatch<'_, T>,
        head: &CudaLmHead<'_, T>,
        chunks: Option<FusedChunks>,
        reference: CudaSlice<f32>,
        loss: impl FnOnce(&CudaSequenceSums, &CudaSlice<f32>) -> Result<(L, CudaSlice<f32>)>,
    ) -> Result<CudaHeadStep<L>> {
        let forward = self.fused_linear_token_logprobs(
            policy.hidden,
            head,
            policy.labels,
            policy.ignore_index,
            chunks,
        )?;
        let labels = self.htod(policy.labels)?;
        let sums =
            self.sequence_sums(&forward.logp, &labels, policy.ignore_index, policy.layout)?;
        let (loss, grad_seq) = loss(&sums, &reference)?;
        let token_grad =
            self.broadcast_sequence_grad(&grad_seq, &labels, policy.ignore_index, policy.layout)?;
        let grads = self.fused_linear_token_logprobs_backward(
            policy.hidden,
            head,
            policy.labels,
            policy.ignore_index,
            CudaFusedSaved {
                row_max: &forward.row_max,
                ln_sum: &forward.ln_sum,
                grad_logp: &token_grad,
            },
            chunks,
        )?;
        Ok(CudaHeadStep {
            loss,
            policy_logps: self.dtoh(&sums.sums)?,
            reference_logps: self.dtoh(&reference)?,
            token_counts: self.dtoh(&sums.counts)?,
            token_logps: forward.logp,
            token_grad,
            grads,
        })
    }

    /// Summed log-probs per sequence of `batch` under `head`, forward only, on the device.
    fn head_sequence_logps<T: CudaLogit>(
        &self,
        batch: &CudaHiddenBatch<'_, T>,
        head: &CudaLmHead<'_, T>,
        chunks: Option<FusedChunks>,
    ) -> Result<CudaSlice<f32>> {
        let out = self.fused_linear_token_logprobs(
            batch.hidden,
            head,
            batch.labels,
            batch.ignore_index,
            chunks,
        )?;
        let labels = self.htod(batch.labels)?;
        Ok(self
            .sequence_sums(&out.logp, &labels, batch.ignore_index, batch.layout)?
            .sums)
    }

    /// The reference's sums of `batch`'s sequences: as given (uploaded), or from its hidden states.
    fn reference_logps<T: CudaLogit>(
        &self,
        batch: &CudaHiddenBatch<'_, T>,
        source: &CudaReferenceSource<'_, T>,
        chunks: Option<FusedChunks>,
    ) -> Result<CudaSlice<f32>> {
        match *source {
            CudaReferenceSource::Sums(sums) => self.htod(sums),
            CudaReferenceSource::Hidden { hidden, ref head } => {
                self.head_sequence_logps(&CudaHiddenBatch { hidden, ..*batch }, head, chunks)
            }
        }
    }
}
