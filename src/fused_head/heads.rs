//! Loss heads from hidden states: one call per training step for KTO and the DPO family, from the
//! policy's hidden states and LM-head weight to the loss, the metrics, the log-probs and
//! `∂hidden` / `∂weight` — the logits of neither the policy, the reference nor the KL pairs are
//! ever materialized. The loss math is [`crate::step`]'s token-level steps (sequence sums, the
//! [`crate::losses`] function, the broadcast back to tokens), not a copy:
//!
//! ```text
//! hidden ──fused forward──▶ logp ──step::{kto,dpo}_step_tokens──▶ loss, ∂L/∂logp ──fused backward──▶ ∂hidden, ∂W
//! ```

use super::backward::{fused_linear_token_logprobs_backward, FusedHeadGrads};
use super::chunks::FusedChunks;
use super::forward::fused_linear_token_logprobs;
use super::LmHead;
use crate::cpu::{sequence_sums, SequenceLayout};
use crate::dtype::LogitElement;
use crate::error::Result;
use crate::losses::{DpoConfig, KlInput, KtoConfig, KtoOutput, PairLossOutput};
use crate::step::{
    dpo_step_tokens, kto_step_tokens, pair_count, KtoStepInputs, PairReference, TokenLogps,
};

/// A batch's hidden states (the inputs of the LM head) and where its tokens and sequences are.
#[derive(Debug, Clone, Copy)]
pub struct HiddenBatch<'a, T> {
    /// `[rows, H]`, row-major; rows whose label is ignored are not read.
    pub hidden: &'a [T],
    /// Labels per row, already shifted: row `t` predicts `labels[t]`.
    pub labels: &'a [i32],
    /// The label of rows that are not counted (prompt, padding).
    pub ignore_index: i32,
    /// How the rows are grouped into sequences (padded or packed `cu_seqlens`).
    pub layout: SequenceLayout<'a>,
}

/// Where the frozen reference model's summed log-probs of a batch come from.
#[derive(Debug, Clone, Copy)]
pub enum ReferenceSource<'a, T> {
    /// Precomputed (e.g. cached before training): one sum per sequence.
    Sums(&'a [f32]),
    /// Computed here, forward only, from the reference model's hidden states of the same tokens
    /// (`[rows, H]`, the batch's labels and layout) and its LM head.
    Hidden {
        /// The reference model's hidden states, `[rows, H]`.
        hidden: &'a [T],
        /// The reference model's LM head.
        head: LmHead<'a, T>,
    },
}

/// Where KTO's KL pairs (the mismatched completions of the reference point) come from.
#[derive(Debug, Clone, Copy)]
pub enum KlSource<'a, T> {
    /// Summed log-probs, or an all-reduced partial, computed elsewhere.
    Given(KlInput<'a>),
    /// The KL pairs' hidden states under the policy (through the policy's head) and their reference
    /// log-probs: forward only, no gradient, no logits.
    Hidden {
        /// The policy's hidden states of the KL pairs, their labels and layout.
        policy: HiddenBatch<'a, T>,
        /// The reference's summed log-probs of the KL pairs (same labels and layout).
        reference: ReferenceSource<'a, T>,
    },
}

/// What a KTO head step needs besides the policy batch and head.
#[derive(Debug, Clone, Copy)]
pub struct KtoHeadInputs<'a, T> {
    /// The reference's summed log-probs of the batch's sequences.
    pub reference: ReferenceSource<'a, T>,
    /// One per sequence.
    pub is_desirable: &'a [bool],
    /// Required for [`crate::losses::KtoLossType::Kto`].
    pub kl: Option<KlSource<'a, T>>,
}

/// A step from hidden states: the loss, the log-probs, and the gradients of the head's inputs.
#[derive(Debug, Clone)]
pub struct HeadStep<L> {
    /// The loss's output: the mean loss, its per-sequence gradients, the metrics.
    pub loss: L,
    /// Summed policy log-prob per sequence.
    pub policy_logps: Vec<f32>,
    /// Summed reference log-prob per sequence (as given, or computed).
    pub reference_logps: Vec<f32>,
    /// Counted tokens per sequence.
    pub token_counts: Vec<u32>,
    /// The policy's `log p(y_t)` per row (0 on ignored rows).
    pub token_logps: Vec<f32>,
    /// `∂L/∂logp` per row (0 on ignored rows).
    pub token_grad: Vec<f32>,
    /// `∂L/∂hidden`, `∂L/∂weight`, `∂L/∂bias` of the policy's head (f32).
    pub grads: FusedHeadGrads,
}

/// KTO (or APO-zero unpaired) from the policy's hidden states and LM head, down to `∂hidden` and
/// `∂weight`. `chunks`: the fused head's tiling ([`FusedChunks::auto`] when `None`).
///
/// Errors: those of [`fused_linear_token_logprobs`], [`sequence_sums()`] and
/// [`crate::losses::kto_loss`] (a reference or KL source of the wrong length included).
pub fn kto_head_step<T: LogitElement>(
    config: &KtoConfig,
    policy: &HiddenBatch<'_, T>,
    head: &LmHead<'_, T>,
    inputs: &KtoHeadInputs<'_, T>,
    chunks: Option<FusedChunks>,
) -> Result<HeadStep<KtoOutput>> {
    config.validate()?;
    // The KL pairs first (forward only): their sums must outlive the borrowing `KlInput`.
    let kl_sums = match inputs.kl {
        Some(KlSource::Hidden {
            policy: kl_policy,
            reference,
        }) => Some((
            sequence_logps(&kl_policy, head, chunks)?,
            reference_logps(&kl_policy, &reference, chunks)?,
        )),
        _ => None,
    };
    let kl = match (&inputs.kl, &kl_sums) {
        (Some(KlSource::Given(kl)), _) => Some(*kl),
        (_, Some((policy, reference))) => Some(KlInput::LogProbs { policy, reference }),
        _ => None,
    };
    let reference = reference_logps(policy, &inputs.reference, chunks)?;
    head_step(policy, head, chunks, reference, |tokens, reference| {
        let step = kto_step_tokens(
            config,
            tokens,
            &KtoStepInputs {
                reference_logps: reference,
                is_desirable: inputs.is_desirable,
                kl,
            },
        )?;
        Ok((
            step.loss,
            step.policy_logps,
            step.token_counts,
            step.token_grad,
        ))
    })
}

/// A DPO-family loss from the policy's hidden states and LM head (sequences `0..n` chosen, `n..2n`
/// rejected, as [`crate::step::dpo_step`]), down to `∂hidden` and `∂weight`. The reference holds
/// one sum per sequence in the same order.
///
/// Errors: those of [`fused_linear_token_logprobs`], [`sequence_sums()`] and
/// [`crate::losses::dpo_loss`]; `InvalidShape` for an odd number of sequences.
pub fn dpo_head_step<T: LogitElement>(
    config: &DpoConfig,
    policy: &HiddenBatch<'_, T>,
    head: &LmHead<'_, T>,
    reference: &ReferenceSource<'_, T>,
    chunks: Option<FusedChunks>,
) -> Result<HeadStep<PairLossOutput>> {
    // Bad hyper-parameters or batch shapes fail before any GEMM runs.
    config.validate()?;
    let n = pair_count(policy.layout.batch())?;
    let reference = reference_logps(policy, reference, chunks)?;
    if reference.len() != 2 * n {
        return Err(crate::HaloError::LengthMismatch {
            what: "reference log-probs",
            expected: 2 * n,
            got: reference.len(),
        });
    }
    head_step(policy, head, chunks, reference, |tokens, reference| {
        let pair = PairReference {
            chosen_logps: &reference[..n],
            rejected_logps: &reference[n..],
        };
        let step = dpo_step_tokens(config, tokens, &pair)?;
        Ok((
            step.loss,
            step.policy_logps,
            step.token_counts,
            step.token_grad,
        ))
    })
}

/// What a token-level step returns: the loss, Σ logp and counts per sequence, `∂L/∂logp` per row.
type TokenStepParts<L> = (L, Vec<f32>, Vec<u32>, Vec<f32>);

/// Fused forward of the policy, the token-level step, fused backward.
fn head_step<T: LogitElement, L>(
    policy: &HiddenBatch<'_, T>,
    head: &LmHead<'_, T>,
    chunks: Option<FusedChunks>,
    reference: Vec<f32>,
    token_step: impl FnOnce(&TokenLogps<'_>, &[f32]) -> Result<TokenStepParts<L>>,
) -> Result<HeadStep<L>> {
    let forward = fused_linear_token_logprobs(
        policy.hidden,
        head,
        policy.labels,
        policy.ignore_index,
        chunks,
    )?;
    let tokens = TokenLogps {
        logps: &forward.logp,
        labels: policy.labels,
        ignore_index: policy.ignore_index,
        layout: policy.layout,
    };
    let (loss, policy_logps, token_counts, token_grad) = token_step(&tokens, &reference)?;
    let grads = fused_linear_token_logprobs_backward(
        policy.hidden,
        head,
        policy.labels,
        policy.ignore_index,
        &forward.row_max,
        &forward.ln_sum,
        &token_grad,
        chunks,
    )?;
    Ok(HeadStep {
        loss,
        policy_logps,
        reference_logps: reference,
        token_counts,
        token_logps: forward.logp,
        token_grad,
        grads,
    })
}

/// Summed log-probs per sequence of `batch` under `head`, forward only.
fn sequence_logps<T: LogitElement>(
    batch: &HiddenBatch<'_, T>,
    head: &LmHead<'_, T>,
    chunks: Option<FusedChunks>,
) -> Result<Vec<f32>> {
    let out =
        fused_linear_token_logprobs(batch.hidden, head, batch.labels, batch.ignore_index, chunks)?;
    Ok(sequence_sums(&out.logp, batch.labels, batch.ignore_index, batch.layout)?.sums)
}

/// The reference's sums of `batch`'s sequences: as given, or from its hidden states.
fn reference_logps<T: LogitElement>(
    batch: &HiddenBatch<'_, T>,
    source: &ReferenceSource<'_, T>,
    chunks: Option<FusedChunks>,
) -> Result<Vec<f32>> {
    match *source {
        ReferenceSource::Sums(sums) => Ok(sums.to_vec()),
        ReferenceSource::Hidden { hidden, ref head } => {
            sequence_logps(&HiddenBatch { hidden, ..*batch }, head, chunks)
        }
    }
}
