//! One call per training step: from the policy's per-token log-probs, or from its logits, to the
//! loss, TRL's metrics and the gradient that goes back into the model — for KTO and for the DPO
//! family. Each is the chain of the crate's ops (no math of its own):
//!
//! ```text
//! logits ──token_logprobs──▶ logp, lse ──sequence_sums──▶ Σ logp ──kto_loss / dpo_loss──▶ loss, ∂L/∂Σ
//!        ◀──token_logprobs_backward── ∂L/∂logp ◀──broadcast_sequence_grad──┘
//! ```
//!
//! [`kto_step_tokens`] / [`dpo_step_tokens`] start from per-token log-probs (a model that owns
//! its log-softmax, such as an autograd tape, backpropagates the returned `token_grad`);
//! [`kto_step`] / [`dpo_step`] start from materialised logits and return `∂L/∂logits`. The same
//! steps on a GPU: [`crate::cuda::CudaBackend::kto_step`] and
//! [`crate::cuda::CudaBackend::dpo_step`].
//!
//! DPO batches follow TRL's `concatenated_forward`: the layout's sequences `0..n` are the chosen
//! completions and `n..2n` the rejected ones, pair `i` being sequences `i` and `n + i`. Token
//! counts (for IPO's length normalisation) come from the labels.
//!
//! ```
//! use halo_kernels::cpu::SequenceLayout;
//! use halo_kernels::losses::{KlInput, KtoConfig};
//! use halo_kernels::step::{kto_step, KtoStepInputs, Logits};
//! use halo_kernels::IGNORE_INDEX;
//!
//! // 2 sequences of 3 tokens over a vocabulary of 4; the first token of each is prompt.
//! let logits: Vec<f32> = (0..24).map(|i| ((i * 7) % 5) as f32 * 0.5 - 1.0).collect();
//! let labels = [IGNORE_INDEX, 1, 3, IGNORE_INDEX, 0, 2];
//! let step = kto_step(
//!     &KtoConfig::default(),
//!     &Logits { logits: &logits, labels: &labels, vocab: 4, ignore_index: IGNORE_INDEX,
//!               layout: SequenceLayout::Padded { batch: 2, seq: 3 } },
//!     &KtoStepInputs {
//!         reference_logps: &[-3.1, -2.9],
//!         is_desirable: &[true, false],
//!         kl: Some(KlInput::LogProbs { policy: &[-3.0, -3.3], reference: &[-3.2, -3.1] }),
//!     },
//! )?;
//! assert!(step.loss.loss > 0.0);
//! assert_eq!(step.grad_logits.len(), logits.len());
//! assert!(step.grad_logits[..4].iter().all(|&g| g == 0.0)); // prompt rows get no gradient
//! # Ok::<(), halo_kernels::HaloError>(())
//! ```

use crate::cpu::{
    broadcast_sequence_grad, sequence_sums, token_logprobs, token_logprobs_backward,
    SequenceLayout, SequenceSums,
};
use crate::dtype::LogitElement;
use crate::error::{HaloError, Result};
use crate::losses::{
    dpo_loss, kto_loss, DpoConfig, KlInput, KtoBatch, KtoConfig, KtoOutput, PairBatch,
    PairLossOutput,
};

/// The policy's per-token log-probs of a batch and where its sequences are.
#[derive(Debug, Clone, Copy)]
pub struct TokenLogps<'a> {
    /// `log p(y_t)` per row, 0 (or anything) where the label is ignored.
    pub logps: &'a [f32],
    /// Labels per row (`ignore_index` for prompt and padding rows).
    pub labels: &'a [i32],
    /// The label of rows that are not counted (prompt, padding).
    pub ignore_index: i32,
    /// How the rows are grouped into sequences.
    pub layout: SequenceLayout<'a>,
}

/// The policy's logits of a batch (`[rows, vocab]`, row-major) and where its sequences are.
#[derive(Debug, Clone, Copy)]
pub struct Logits<'a, T> {
    /// `[rows, vocab]`, row-major, in any [`LogitElement`] dtype.
    pub logits: &'a [T],
    /// Labels per row, already shifted: row `t` predicts `labels[t]`.
    pub labels: &'a [i32],
    /// Columns of the logits.
    pub vocab: usize,
    /// The label of rows that are not counted (prompt, padding).
    pub ignore_index: i32,
    /// How the rows are grouped into sequences.
    pub layout: SequenceLayout<'a>,
}

impl<'a, T> Logits<'a, T> {
    fn token_logps(&self, logps: &'a [f32]) -> TokenLogps<'a> {
        TokenLogps {
            logps,
            labels: self.labels,
            ignore_index: self.ignore_index,
            layout: self.layout,
        }
    }
}

/// What a KTO step needs besides the policy: the reference's summed log-probs (computed without
/// gradient, or precomputed), the binary feedback, and the KL pairs (or an all-reduced partial).
#[derive(Debug, Clone, Copy)]
pub struct KtoStepInputs<'a> {
    /// One per sequence.
    pub reference_logps: &'a [f32],
    /// One per sequence.
    pub is_desirable: &'a [bool],
    /// Required for [`crate::losses::KtoLossType::Kto`].
    pub kl: Option<KlInput<'a>>,
}

/// The reference's summed log-probs of a DPO batch's chosen and rejected sequences.
#[derive(Debug, Clone, Copy)]
pub struct PairReference<'a> {
    /// Summed log-probs of the chosen sequences (`0..n`).
    pub chosen_logps: &'a [f32],
    /// Summed log-probs of the rejected sequences (`n..2n`).
    pub rejected_logps: &'a [f32],
}

/// A step from per-token log-probs: the loss (with its per-sequence gradients and metrics), the
/// policy's summed log-probs and token counts, and `∂L/∂logp` per token.
#[derive(Debug, Clone)]
pub struct TokenStep<L> {
    /// The loss's output: the mean loss, its per-sequence gradients, the metrics.
    pub loss: L,
    /// Summed policy log-prob per sequence.
    pub policy_logps: Vec<f32>,
    /// Counted tokens per sequence.
    pub token_counts: Vec<u32>,
    /// `∂L/∂logp` per row (0 on ignored rows): what the model backpropagates.
    pub token_grad: Vec<f32>,
}

/// A step from logits: [`TokenStep`]'s outputs, the per-token log-probs, and `∂L/∂logits`.
#[derive(Debug, Clone)]
pub struct LogitsStep<L, T> {
    /// The loss's output: the mean loss, its per-sequence gradients, the metrics.
    pub loss: L,
    /// Summed policy log-prob per sequence.
    pub policy_logps: Vec<f32>,
    /// Counted tokens per sequence.
    pub token_counts: Vec<u32>,
    /// `log p(y_t)` per row (0 on ignored rows).
    pub token_logps: Vec<f32>,
    /// `∂L/∂logits`, `[rows, vocab]` in the logits' dtype (zero rows where ignored).
    pub grad_logits: Vec<T>,
}

/// KTO (or APO-zero unpaired) from the policy's per-token log-probs.
pub fn kto_step_tokens(
    config: &KtoConfig,
    policy: &TokenLogps<'_>,
    inputs: &KtoStepInputs<'_>,
) -> Result<TokenStep<KtoOutput>> {
    token_step(policy, |sums| {
        let loss = kto_loss(
            config,
            &KtoBatch {
                policy_logps: &sums.sums,
                reference_logps: inputs.reference_logps,
                is_desirable: inputs.is_desirable,
                kl: inputs.kl,
            },
        )?;
        let grad_seq = loss.grad_policy_logps.clone();
        Ok((loss, grad_seq))
    })
}

/// A DPO-family loss from the policy's per-token log-probs (sequences `0..n` chosen, `n..2n`
/// rejected).
pub fn dpo_step_tokens(
    config: &DpoConfig,
    policy: &TokenLogps<'_>,
    reference: &PairReference<'_>,
) -> Result<TokenStep<PairLossOutput>> {
    token_step(policy, |sums| {
        let n = pair_count(sums.sums.len())?;
        let loss = dpo_loss(
            config,
            &PairBatch {
                policy_chosen_logps: &sums.sums[..n],
                policy_rejected_logps: &sums.sums[n..],
                reference_chosen_logps: reference.chosen_logps,
                reference_rejected_logps: reference.rejected_logps,
                chosen_counts: Some(&sums.counts[..n]),
                rejected_counts: Some(&sums.counts[n..]),
            },
        )?;
        // One gradient per sequence, chosen then rejected, as the layout orders them.
        let grad_seq = loss
            .grad_chosen
            .iter()
            .chain(&loss.grad_rejected)
            .copied()
            .collect();
        Ok((loss, grad_seq))
    })
}

/// Sums per sequence, `loss` (→ the loss and one gradient per sequence), broadcast to tokens.
fn token_step<L>(
    policy: &TokenLogps<'_>,
    loss: impl FnOnce(&SequenceSums) -> Result<(L, Vec<f32>)>,
) -> Result<TokenStep<L>> {
    let sums = sequence_sums(
        policy.logps,
        policy.labels,
        policy.ignore_index,
        policy.layout,
    )?;
    let (loss, grad_seq) = loss(&sums)?;
    let token_grad =
        broadcast_sequence_grad(&grad_seq, policy.labels, policy.ignore_index, policy.layout)?;
    Ok(TokenStep {
        loss,
        policy_logps: sums.sums,
        token_counts: sums.counts,
        token_grad,
    })
}

/// KTO (or APO-zero unpaired) from the policy's logits, down to `∂L/∂logits`.
pub fn kto_step<T: LogitElement>(
    config: &KtoConfig,
    policy: &Logits<'_, T>,
    inputs: &KtoStepInputs<'_>,
) -> Result<LogitsStep<KtoOutput, T>> {
    from_logits(policy, |tokens| kto_step_tokens(config, tokens, inputs))
}

/// A DPO-family loss from the policy's logits (sequences `0..n` chosen, `n..2n` rejected), down to
/// `∂L/∂logits`.
pub fn dpo_step<T: LogitElement>(
    config: &DpoConfig,
    policy: &Logits<'_, T>,
    reference: &PairReference<'_>,
) -> Result<LogitsStep<PairLossOutput, T>> {
    from_logits(policy, |tokens| dpo_step_tokens(config, tokens, reference))
}

/// Forward to per-token log-probs, the token-level step, backward into the logits.
fn from_logits<T: LogitElement, L>(
    policy: &Logits<'_, T>,
    token_step: impl FnOnce(&TokenLogps<'_>) -> Result<TokenStep<L>>,
) -> Result<LogitsStep<L, T>> {
    let tokens = token_logprobs(
        policy.logits,
        policy.labels,
        policy.vocab,
        policy.ignore_index,
    )?;
    let step = token_step(&policy.token_logps(&tokens.logp))?;
    let mut grad_logits = vec![T::from_f32(0.0); policy.logits.len()];
    token_logprobs_backward(
        policy.logits,
        policy.labels,
        tokens.saved_lse(),
        &step.token_grad,
        policy.vocab,
        policy.ignore_index,
        &mut grad_logits,
    )?;
    Ok(LogitsStep {
        loss: step.loss,
        policy_logps: step.policy_logps,
        token_counts: step.token_counts,
        token_logps: tokens.logp,
        grad_logits,
    })
}

/// The `n` of a DPO batch of `sequences` sequences: `n` chosen then `n` rejected (an odd count is
/// an error).
pub fn pair_count(sequences: usize) -> Result<usize> {
    if !sequences.is_multiple_of(2) {
        return Err(HaloError::InvalidShape(format!(
            "a DPO batch holds 2n sequences (n chosen, then n rejected), got {sequences}"
        )));
    }
    Ok(sequences / 2)
}
