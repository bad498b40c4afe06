//! KTO loss (Ethayarajh et al. 2024, arXiv 2402.01306, eq. 8) as TRL computes it in
//! `trl/trainer/kto_trainer.py`, `KTOTrainer.kto_loss` + `get_batch_loss_metrics`.
//!
//! Per example with log-ratio `r = logp_policy − logp_ref` (summed over completion tokens) and the
//! detached reference point `z0` (see [`super::reference_point`]):
//! - `Kto`: desirable `λ_D (1 − σ(β (r − z0)))`, undesirable `λ_U (1 − σ(β (z0 − r)))`.
//! - `ApoZeroUnpaired`: desirable `λ_D (1 − σ(β r))`, undesirable `λ_U σ(β r)`; no reference point.
//!
//! Batch loss = sum over all examples / (n_D + n_U) (TRL: `torch.cat(...).nanmean()`).
//! A sequence with no tokens has log-prob 0 and is allowed (the loss only sees sums).

use super::metrics::{mean_of, LossMetrics};
use super::reference_point::ReferencePointPartial;
use super::sigmoid::{sigmoid, sigmoid_derivative};
use super::validate::{
    check_finite, check_kto_lengths, check_metrics, check_nonnegative, check_outputs,
    check_positive,
};
use crate::error::{HaloError, Result};

/// Which unpaired loss (TRL `KTOConfig.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KtoLossType {
    /// `"kto"`: the prospect-theory loss against the reference point `z0`.
    #[default]
    Kto,
    /// `"apo_zero_unpaired"` (D'Oosterlinck et al. 2024): no reference point.
    ApoZeroUnpaired,
}

impl KtoLossType {
    /// TRL's name for the loss type.
    pub fn name(&self) -> &'static str {
        match self {
            KtoLossType::Kto => "kto",
            KtoLossType::ApoZeroUnpaired => "apo_zero_unpaired",
        }
    }
}

/// Hyper-parameters; defaults are TRL `KTOConfig`'s (β = 0.1, λ_D = λ_U = 1, `kto`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoConfig {
    /// β > 0, finite.
    pub beta: f64,
    /// λ_D ≥ 0, finite (weight of desirable examples).
    pub desirable_weight: f64,
    /// λ_U ≥ 0, finite (weight of undesirable examples).
    pub undesirable_weight: f64,
    /// `kto` (with the reference point) or `apo_zero_unpaired`.
    pub loss_type: KtoLossType,
}

impl Default for KtoConfig {
    fn default() -> Self {
        KtoConfig {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            loss_type: KtoLossType::Kto,
        }
    }
}

impl KtoConfig {
    /// Errors: `InvalidHyperParameter` for β ≤ 0 or non-finite, a negative or non-finite weight.
    pub fn validate(&self) -> Result<()> {
        check_positive("beta", self.beta)?;
        check_nonnegative("desirable_weight", self.desirable_weight)?;
        check_nonnegative("undesirable_weight", self.undesirable_weight)
    }
}

/// Where the reference point comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KlInput<'a> {
    /// This batch's KL pairs: summed policy and reference log-probs of the mismatched completions.
    LogProbs {
        /// Summed policy log-probs of the KL pairs.
        policy: &'a [f32],
        /// Summed reference log-probs of the KL pairs.
        reference: &'a [f32],
    },
    /// An (e.g. all-reduced across devices) partial; `z0 = max(0, sum / count)`.
    Partial(ReferencePointPartial),
}

/// One KTO batch. All slices are per example (length n) except the KL pairs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoBatch<'a> {
    /// Summed policy log-probs `logp_policy(y_i|x_i)`.
    pub policy_logps: &'a [f32],
    /// Summed reference log-probs `logp_ref(y_i|x_i)`. For the humanline variant pass the clamped
    /// log-ratio sums of [`crate::cpu::sequence_logratio_sums`] as `policy_logps` and zeros here
    /// (the `logps/*` metrics then report log-ratios).
    pub reference_logps: &'a [f32],
    /// `true` for a desirable example, `false` for an undesirable one.
    pub is_desirable: &'a [bool],
    /// Required for [`KtoLossType::Kto`], ignored for `ApoZeroUnpaired`.
    pub kl: Option<KlInput<'a>>,
}

/// Result of [`kto_loss`].
#[derive(Debug, Clone, PartialEq)]
pub struct KtoOutput {
    /// Mean batch loss (f64).
    pub loss: f64,
    /// `∂loss/∂policy_logps[i]` (the reference point is detached: no gradient flows to KL pairs).
    pub grad_policy_logps: Vec<f32>,
    /// The reference point used (0 for `ApoZeroUnpaired`).
    pub z0: f64,
    /// TRL's logged metrics of the batch.
    pub metrics: LossMetrics,
}

/// The KTO (or APO-zero unpaired) loss, its gradient w.r.t. each policy log-prob, and metrics.
///
/// Gradient per example (N = batch size, `σ'(x) = σ(x)σ(−x)`), `Kto`:
/// desirable `−λ_D β σ'(β(r − z0)) / N`, undesirable `+λ_U β σ'(β(z0 − r)) / N`;
/// `ApoZeroUnpaired`: `∓λ β σ'(β r) / N`. `σ'` is evaluated in a form that is exactly 0 (never
/// NaN) once `|β(r − z0)|` exceeds ~745 and below 1e-26 beyond 60.
///
/// Errors: `InvalidHyperParameter`; `EmptyBatch("policy_logps")`; `LengthMismatch` naming
/// `reference_logps` / `is_desirable` / `kl_reference_logps`; `NonFinite`; `MissingKlPairs` when
/// `loss_type` is `Kto` and `kl` is `None`; `EmptyBatch("kl pairs")` when the KL input holds no
/// pair.
pub fn kto_loss(config: &KtoConfig, batch: &KtoBatch<'_>) -> Result<KtoOutput> {
    config.validate()?;
    let n = check_kto_batch(batch)?;

    let z0 = match config.loss_type {
        KtoLossType::ApoZeroUnpaired => 0.0,
        KtoLossType::Kto => {
            let partial = match batch.kl {
                None => {
                    return Err(HaloError::MissingKlPairs {
                        loss_type: config.loss_type.name(),
                    })
                }
                Some(KlInput::LogProbs { policy, reference }) => {
                    ReferencePointPartial::from_kl_logps(policy, reference)?
                }
                Some(KlInput::Partial(p)) => p,
            };
            partial.z0()?
        }
    };

    let beta = config.beta;
    let inv_n = 1.0 / n as f64;
    let mut loss_sum = 0.0f64;
    let mut grad = Vec::with_capacity(n);
    for i in 0..n {
        let r = batch.policy_logps[i] as f64 - batch.reference_logps[i] as f64;
        // x = β (r − z0); for apo_zero_unpaired z0 = 0. Desirable: loss σ(−x), d/dr = −β σ'(x).
        // Undesirable: loss 1 − σ(β(z0 − r)) = σ(x) (kto) and σ(β r) = σ(x) (apo): d/dr = +β σ'(x).
        let x = beta * (r - z0);
        let (loss_i, grad_i) = if batch.is_desirable[i] {
            let w = config.desirable_weight;
            (w * sigmoid(-x), -w * beta * sigmoid_derivative(x))
        } else {
            let w = config.undesirable_weight;
            (w * sigmoid(x), w * beta * sigmoid_derivative(x))
        };
        loss_sum += loss_i;
        grad.push((grad_i * inv_n) as f32);
    }

    let loss = loss_sum * inv_n;
    check_outputs("kto loss or gradient", loss, &[&grad])?;
    let metrics = kto_metrics(batch, beta, z0);
    check_metrics(&metrics)?;
    Ok(KtoOutput {
        loss,
        grad_policy_logps: grad,
        z0,
        metrics,
    })
}

/// The per-example checks of [`kto_loss`], in its order (shared with the CUDA loss): lengths,
/// then finite log-probs. Returns the batch size.
pub(crate) fn check_kto_batch(batch: &KtoBatch<'_>) -> Result<usize> {
    let n = check_kto_lengths(
        batch.policy_logps.len(),
        batch.reference_logps.len(),
        batch.is_desirable.len(),
    )?;
    check_finite("policy_logps", batch.policy_logps)?;
    check_finite("reference_logps", batch.reference_logps)?;
    Ok(n)
}

/// TRL's KTO metrics: rewards `β r` and policy log-probs averaged per class, `kl = z0`.
fn kto_metrics(batch: &KtoBatch<'_>, beta: f64, z0: f64) -> LossMetrics {
    let class = |desirable: bool| {
        (0..batch.policy_logps.len()).filter(move |&i| batch.is_desirable[i] == desirable)
    };
    let reward = |i: usize| beta * (batch.policy_logps[i] as f64 - batch.reference_logps[i] as f64);
    let logp = |i: usize| batch.policy_logps[i] as f64;
    let rewards_chosen = mean_of(class(true).map(reward));
    let rewards_rejected = mean_of(class(false).map(reward));
    LossMetrics {
        rewards_chosen,
        rewards_rejected,
        rewards_margins: rewards_chosen.zip(rewards_rejected).map(|(c, r)| c - r),
        logps_chosen: mean_of(class(true).map(logp)),
        logps_rejected: mean_of(class(false).map(logp)),
        kl: Some(z0),
        chosen_count: class(true).count() as u64,
        rejected_count: class(false).count() as u64,
        ..LossMetrics::default()
    }
}
