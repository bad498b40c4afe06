//! The DPO family on preference pairs, as TRL computes it in `trl/trainer/dpo_trainer.py`,
//! `DPOTrainer.dpo_loss` (+ `concatenated_forward` for IPO's length normalisation).
//!
//! `logits = (π_c − ref_c) − (π_r − ref_r)`; per pair (β > 0, label smoothing ε):
//! - `Sigmoid` (DPO, Rafailov et al. 2023; cDPO with ε): `−(1−ε) logσ(β l) − ε logσ(−β l)`.
//! - `Robust` (rDPO, Chowdhury et al. 2024): `(−(1−ε) logσ(β l) + ε logσ(−β l)) / (1 − 2ε)`.
//! - `Hinge` (SLiC, Zhao et al. 2023): `relu(1 − β l)` (gradient 0 at the kink, as PyTorch).
//! - `Ipo` (Azar et al. 2023): `(l − 1/(2β))²` where every log-prob (policy AND reference) is first
//!   divided by its sequence's token count (TRL: `all_logps / loss_mask.sum(-1)` for "ipo").
//! - `ApoZero` (D'Oosterlinck et al. 2024): `1 − σ(β(π_c − ref_c)) + σ(β(π_r − ref_r))`.
//!
//! Loss = mean over pairs. Rewards are `β·(π − ref)` and `logps/*` the policy log-probs, always on
//! the summed log-probs — for IPO too, as TRL ≥ 1.0 logs them (it normalises inside the loss only). Label smoothing is used only by
//! `Sigmoid` (ε ∈ [0, 1]) and `Robust` (ε ∈ [0, 0.5)); the others ignore it.
//! Zero-token sequences are allowed except for `Ipo` (`EmptySequence`).

use super::metrics::pair_metrics;
use super::pairs::{PairBatch, PairLossOutput};
use super::sigmoid::{log_sigmoid, sigmoid, sigmoid_derivative};
use super::validate::{
    check_count_lengths, check_counts_positive, check_finite, check_label_smoothing, check_metrics,
    check_outputs, check_pair_lengths, check_positive, ipo_counts,
};
use crate::error::Result;

/// Which DPO-family loss (TRL `DPOConfig.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DpoLossType {
    /// `"sigmoid"` (with label smoothing: cDPO).
    #[default]
    Sigmoid,
    /// `"robust"`.
    Robust,
    /// `"hinge"`.
    Hinge,
    /// `"ipo"` (length-normalised log-probs).
    Ipo,
    /// `"apo_zero"`.
    ApoZero,
}

impl DpoLossType {
    /// TRL's name for the loss type.
    pub fn name(&self) -> &'static str {
        match self {
            DpoLossType::Sigmoid => "sigmoid",
            DpoLossType::Robust => "robust",
            DpoLossType::Hinge => "hinge",
            DpoLossType::Ipo => "ipo",
            DpoLossType::ApoZero => "apo_zero",
        }
    }
}

/// Hyper-parameters; defaults are TRL `DPOConfig`'s (β = 0.1, ε = 0, `sigmoid`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoConfig {
    /// β > 0, finite.
    pub beta: f64,
    /// ε: `[0, 1]` for `Sigmoid`, `[0, 0.5)` for `Robust`, ignored otherwise.
    pub label_smoothing: f64,
    /// Which member of the family (TRL's `loss_type`).
    pub loss_type: DpoLossType,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            beta: 0.1,
            label_smoothing: 0.0,
            loss_type: DpoLossType::Sigmoid,
        }
    }
}

impl DpoConfig {
    /// Errors: `InvalidHyperParameter` for β or ε outside their domain.
    pub fn validate(&self) -> Result<()> {
        check_positive("beta", self.beta)?;
        match self.loss_type {
            DpoLossType::Sigmoid => {
                check_label_smoothing(self.label_smoothing, 1.0, true, "must be in [0, 1]")
            }
            DpoLossType::Robust => check_label_smoothing(
                self.label_smoothing,
                0.5,
                false,
                "must be in [0, 0.5) (the robust loss divides by 1 - 2 eps)",
            ),
            _ => Ok(()),
        }
    }
}

/// The DPO-family loss, its gradients w.r.t. the summed policy chosen/rejected log-probs, and
/// metrics.
///
/// Errors: `InvalidHyperParameter`; `EmptyBatch("policy_chosen_logps")`; `LengthMismatch` naming
/// the argument; `NonFinite`; for `Ipo`: `MissingArgument` without counts, `EmptySequence` for a
/// count of 0.
pub fn dpo_loss(config: &DpoConfig, batch: &PairBatch<'_>) -> Result<PairLossOutput> {
    config.validate()?;
    let n = check_pair_batch(batch)?;

    // Per-sequence scale applied to every log-prob: 1/count for IPO, 1 otherwise.
    let (chosen_scale, rejected_scale): (Vec<f64>, Vec<f64>) =
        if config.loss_type == DpoLossType::Ipo {
            let (chosen, rejected) = ipo_checked_counts(batch)?;
            (
                chosen.iter().map(|&c| 1.0 / c as f64).collect(),
                rejected.iter().map(|&c| 1.0 / c as f64).collect(),
            )
        } else {
            (vec![1.0; n], vec![1.0; n])
        };

    let beta = config.beta;
    let eps = config.label_smoothing;
    let inv_n = 1.0 / n as f64;
    let mut loss_sum = 0.0f64;
    let mut grad_chosen = Vec::with_capacity(n);
    let mut grad_rejected = Vec::with_capacity(n);
    let mut chosen_rewards = Vec::with_capacity(n);
    let mut rejected_rewards = Vec::with_capacity(n);
    let mut chosen_logps = Vec::with_capacity(n);
    let mut rejected_logps = Vec::with_capacity(n);
    for i in 0..n {
        let (sc, sr) = (chosen_scale[i], rejected_scale[i]);
        let pc = batch.policy_chosen_logps[i] as f64 * sc;
        let pr = batch.policy_rejected_logps[i] as f64 * sr;
        let chosen_logratio = pc - batch.reference_chosen_logps[i] as f64 * sc;
        let rejected_logratio = pr - batch.reference_rejected_logps[i] as f64 * sr;
        let l = chosen_logratio - rejected_logratio;
        let bl = beta * l;
        // (loss, ∂loss/∂chosen_logratio, ∂loss/∂rejected_logratio)
        let (loss_i, d_chosen, d_rejected) = match config.loss_type {
            DpoLossType::Sigmoid => {
                let loss = -(1.0 - eps) * log_sigmoid(bl) - eps * log_sigmoid(-bl);
                let d = beta * (-(1.0 - eps) * sigmoid(-bl) + eps * sigmoid(bl));
                (loss, d, -d)
            }
            DpoLossType::Robust => {
                let k = 1.0 / (1.0 - 2.0 * eps);
                let loss = (-(1.0 - eps) * log_sigmoid(bl) + eps * log_sigmoid(-bl)) * k;
                let d = beta * (-(1.0 - eps) * sigmoid(-bl) - eps * sigmoid(bl)) * k;
                (loss, d, -d)
            }
            DpoLossType::Hinge => {
                let h = 1.0 - bl;
                if h > 0.0 {
                    (h, -beta, beta)
                } else {
                    (0.0, 0.0, 0.0)
                }
            }
            DpoLossType::Ipo => {
                let t = l - 1.0 / (2.0 * beta);
                (t * t, 2.0 * t, -2.0 * t)
            }
            DpoLossType::ApoZero => {
                let xc = beta * chosen_logratio;
                let xr = beta * rejected_logratio;
                (
                    sigmoid(-xc) + sigmoid(xr),
                    -beta * sigmoid_derivative(xc),
                    beta * sigmoid_derivative(xr),
                )
            }
        };
        loss_sum += loss_i;
        grad_chosen.push((d_chosen * sc * inv_n) as f32);
        grad_rejected.push((d_rejected * sr * inv_n) as f32);
        // Metrics on the summed log-probs for every loss type, IPO included: TRL >= 1.0 divides by
        // the length inside the IPO loss only and logs rewards/logps from the sums.
        let (raw_pc, raw_pr) = (
            batch.policy_chosen_logps[i] as f64,
            batch.policy_rejected_logps[i] as f64,
        );
        chosen_rewards.push(beta * (raw_pc - batch.reference_chosen_logps[i] as f64));
        rejected_rewards.push(beta * (raw_pr - batch.reference_rejected_logps[i] as f64));
        chosen_logps.push(raw_pc);
        rejected_logps.push(raw_pr);
    }

    let loss = loss_sum * inv_n;
    check_outputs(
        "dpo loss or gradient",
        loss,
        &[&grad_chosen, &grad_rejected],
    )?;
    let metrics = pair_metrics(
        &chosen_rewards,
        &rejected_rewards,
        &chosen_logps,
        &rejected_logps,
    );
    check_metrics(&metrics)?;
    Ok(PairLossOutput {
        loss,
        grad_chosen,
        grad_rejected,
        metrics,
    })
}

/// The batch checks of [`dpo_loss`] before any loss-type specific one, in its order (shared with
/// the CUDA loss): lengths, finite log-probs, lengths of the counts that are given. Returns
/// the number of pairs.
pub(crate) fn check_pair_batch(batch: &PairBatch<'_>) -> Result<usize> {
    let n = check_pair_lengths(
        batch.policy_chosen_logps.len(),
        batch.policy_rejected_logps.len(),
        batch.reference_chosen_logps.len(),
        batch.reference_rejected_logps.len(),
    )?;
    check_finite("policy_chosen_logps", batch.policy_chosen_logps)?;
    check_finite("policy_rejected_logps", batch.policy_rejected_logps)?;
    check_finite("reference_chosen_logps", batch.reference_chosen_logps)?;
    check_finite("reference_rejected_logps", batch.reference_rejected_logps)?;
    check_count_lengths(
        n,
        batch.chosen_counts.map(<[u32]>::len),
        batch.rejected_counts.map(<[u32]>::len),
    )?;
    Ok(n)
}

/// IPO's token counts: both given (`MissingArgument`), every count ≥ 1 (`EmptySequence`).
pub(crate) fn ipo_checked_counts<'a>(batch: &PairBatch<'a>) -> Result<(&'a [u32], &'a [u32])> {
    let (chosen, rejected) = ipo_counts(batch.chosen_counts, batch.rejected_counts)?;
    check_counts_positive("chosen_counts", chosen)?;
    check_counts_positive("rejected_counts", rejected)?;
    Ok((chosen, rejected))
}
