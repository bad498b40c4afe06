//! SimPO (Meng et al. 2024), reference-free, as TRL computes it in `trl/trainer/cpo_trainer.py`,
//! `CPOTrainer.cpo_loss` with `loss_type="simpo"` (+ `get_batch_loss_metrics` for the NLL term).
//!
//! With average log-probs `a = Σ_t logp_t / count`: `l = (a_c − a_r) − γ/β`,
//! per pair `−(1−ε) logσ(β l) − ε logσ(−β l)`, loss = mean over pairs `+ nll_weight · NLL`, where
//! NLL is the token-mean cross-entropy over all chosen tokens of the batch
//! (`−Σ_i sum_c_i / Σ_i count_c_i`). Rewards are `β·a`.
//!
//! Deliberate difference from TRL: TRL's `CPOConfig.cpo_alpha` defaults to 1.0 (CPO adds the NLL
//! term); pure SimPO has none, so [`SimpoConfig::nll_weight`] defaults to 0. Set it to 1.0 to match
//! `CPOTrainer` with its default config. β and γ default to TRL `CPOConfig` (β = 0.1,
//! `simpo_gamma` = 0.5); the SimPO paper uses larger β (2.0–10).
//! A sequence with no tokens is an error (`EmptySequence`): its average log-prob is undefined.

use super::pairs::{PairLossOutput, ReferenceFreePairBatch};
use super::reference_free::{average_logps, chosen_nll, reference_free_metrics};
use super::sigmoid::{log_sigmoid, sigmoid};
use super::validate::{
    check_label_smoothing, check_metrics, check_nonnegative, check_outputs, check_positive,
};
use crate::error::{HaloError, Result};

/// Hyper-parameters (defaults: β = 0.1, γ = 0.5, ε = 0, `nll_weight` = 0; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimpoConfig {
    /// β > 0, finite.
    pub beta: f64,
    /// γ (TRL `simpo_gamma`), the target reward margin; finite.
    pub gamma: f64,
    /// ε ∈ [0, 1].
    pub label_smoothing: f64,
    /// Weight of the chosen NLL term (TRL `cpo_alpha`), finite ≥ 0.
    pub nll_weight: f64,
}

impl Default for SimpoConfig {
    fn default() -> Self {
        SimpoConfig {
            beta: 0.1,
            gamma: 0.5,
            label_smoothing: 0.0,
            nll_weight: 0.0,
        }
    }
}

impl SimpoConfig {
    /// Errors: `InvalidHyperParameter` for a value outside its domain.
    pub fn validate(&self) -> Result<()> {
        check_positive("beta", self.beta)?;
        if !self.gamma.is_finite() {
            return Err(HaloError::InvalidHyperParameter {
                name: "gamma",
                value: self.gamma,
                reason: "must be finite",
            });
        }
        check_label_smoothing(self.label_smoothing, 1.0, true, "must be in [0, 1]")?;
        check_nonnegative("nll_weight", self.nll_weight)
    }
}

/// The SimPO loss, its gradients w.r.t. the summed policy chosen/rejected log-probs, and metrics
/// (`nll_loss` is always reported, whatever `nll_weight`).
///
/// Errors: `InvalidHyperParameter`; `EmptyBatch`; `LengthMismatch`; `NonFinite`;
/// `EmptySequence` for a zero count.
pub fn simpo_loss(
    config: &SimpoConfig,
    batch: &ReferenceFreePairBatch<'_>,
) -> Result<PairLossOutput> {
    config.validate()?;
    let (avg_c, avg_r) = average_logps(batch)?;
    let n = avg_c.len();
    let (beta, eps) = (config.beta, config.label_smoothing);
    let inv_n = 1.0 / n as f64;
    let (nll, nll_grad) = chosen_nll(batch);

    let mut loss_sum = 0.0f64;
    let mut grad_chosen = Vec::with_capacity(n);
    let mut grad_rejected = Vec::with_capacity(n);
    for i in 0..n {
        let bl = beta * ((avg_c[i] - avg_r[i]) - config.gamma / beta);
        loss_sum += -(1.0 - eps) * log_sigmoid(bl) - eps * log_sigmoid(-bl);
        // ∂/∂l; then ∂l/∂sum_c = 1/count_c, ∂l/∂sum_r = −1/count_r.
        let d = beta * (-(1.0 - eps) * sigmoid(-bl) + eps * sigmoid(bl)) * inv_n;
        let gc = d / batch.chosen_counts[i] as f64 + config.nll_weight * nll_grad;
        let gr = -d / batch.rejected_counts[i] as f64;
        grad_chosen.push(gc as f32);
        grad_rejected.push(gr as f32);
    }

    let metrics = reference_free_metrics(beta, &avg_c, &avg_r, nll);
    let loss = loss_sum * inv_n + config.nll_weight * nll;
    check_outputs(
        "simpo loss or gradient",
        loss,
        &[&grad_chosen, &grad_rejected],
    )?;
    check_metrics(&metrics)?;
    Ok(PairLossOutput {
        loss,
        grad_chosen,
        grad_rejected,
        metrics,
    })
}
