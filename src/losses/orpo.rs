//! ORPO (Hong et al. 2024), reference-free, as TRL computes it in `trl/trainer/orpo_trainer.py`,
//! `ORPOTrainer.odds_ratio_loss` + `get_batch_loss_metrics`.
//!
//! With average log-probs `c, r` (sum / count):
//! `log_odds = (c − r) − (log(1 − e^c) − log(1 − e^r))`,
//! loss = NLL − β·mean_i logσ(log_odds_i), NLL = token-mean cross-entropy over all chosen tokens
//! (`−Σ_i sum_c_i / Σ_i count_c_i`). Rewards are `β·c`, `β·r`. Default β = 0.1 (TRL `ORPOConfig`).
//!
//! Numerics: `log(1 − e^x)` is evaluated as `log(−expm1(x))` near 0⁻, and the gradient of
//! `−logσ(log_odds)` uses the closed forms (with `a = 1 − e^c`, `b = 1 − e^r`)
//! `∂/∂c = −1 / (a + b·e^{c−r})`, `∂/∂r = a / (b·(a + b·e^{c−r}))`, finite wherever the loss is.
//!
//! Edge cases (documented, TRL would give inf/NaN there):
//! - average chosen log-prob exactly 0 (p = 1): `log_odds = +inf`, the odds term is 0 and its
//!   gradient the finite limit above; the `log_odds_chosen` metric (a mean that would be `+inf`)
//!   is then `None`.
//! - average rejected log-prob exactly 0: the loss is `+inf` → `NonFinite("orpo log_odds ...")`.
//! - a positive average log-prob is not a log-probability → `InvalidLogProb`.
//! - a sequence with no tokens → `EmptySequence`.
//! - the rejected gradient grows like `β / |r|` as `r → 0⁻`; where it would overflow f32
//!   (`|r| ≲ 1e-38 β`) the call returns `NonFinite` rather than an infinite gradient.

use super::pairs::{PairLossOutput, ReferenceFreePairBatch};
use super::reference_free::{average_logps, chosen_nll, reference_free_metrics};
use super::sigmoid::{log1m_exp, log_sigmoid};
use super::validate::{check_metrics, check_outputs, check_positive};
use crate::error::{HaloError, Result};

/// Hyper-parameters (TRL `ORPOConfig`: β = 0.1, the weight of the odds-ratio term).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrpoConfig {
    /// β > 0, finite.
    pub beta: f64,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        OrpoConfig { beta: 0.1 }
    }
}

impl OrpoConfig {
    /// Errors: `InvalidHyperParameter` for β ≤ 0 or non-finite.
    pub fn validate(&self) -> Result<()> {
        check_positive("beta", self.beta)
    }
}

/// The ORPO loss, its gradients w.r.t. the summed policy chosen/rejected log-probs, and metrics
/// (`nll_loss`, `log_odds_ratio` = mean logσ(log_odds), `log_odds_chosen` = mean log_odds).
///
/// Errors: `InvalidHyperParameter`; `EmptyBatch`; `LengthMismatch`; `NonFinite`;
/// `EmptySequence`; `InvalidLogProb`; see the module docs for the edge cases.
pub fn orpo_loss(
    config: &OrpoConfig,
    batch: &ReferenceFreePairBatch<'_>,
) -> Result<PairLossOutput> {
    config.validate()?;
    let (avg_c, avg_r) = average_logps(batch)?;
    for (what, avg) in [
        ("policy_chosen_logps / count", &avg_c),
        ("policy_rejected_logps / count", &avg_r),
    ] {
        if let Some(index) = avg.iter().position(|&a| a > 0.0) {
            return Err(HaloError::InvalidLogProb {
                what,
                index,
                value: avg[index],
            });
        }
    }
    if let Some(row) = avg_r.iter().position(|&r| r == 0.0) {
        return Err(HaloError::NonFinite {
            what: "orpo log_odds (average rejected log-prob is 0, the loss is +inf)",
            row,
        });
    }

    let n = avg_c.len();
    let beta = config.beta;
    let inv_n = 1.0 / n as f64;
    let (nll, nll_grad) = chosen_nll(batch);
    let mut ratio_sum = 0.0f64;
    let mut log_odds_sum = 0.0f64;
    let mut grad_chosen = Vec::with_capacity(n);
    let mut grad_rejected = Vec::with_capacity(n);
    for i in 0..n {
        let (c, r) = (avg_c[i], avg_r[i]);
        let log_odds = (c - r) - (log1m_exp(c) - log1m_exp(r));
        ratio_sum += log_sigmoid(log_odds);
        log_odds_sum += log_odds;
        let a = -c.exp_m1();
        let b = -r.exp_m1();
        let denom = a + b * (c - r).exp();
        // ∂(−β logσ(log_odds))/∂c and /∂r, then /n (mean) and /count (average log-prob).
        let d_c = -beta / denom;
        let d_r = beta * a / (b * denom);
        grad_chosen.push((d_c * inv_n / batch.chosen_counts[i] as f64 + nll_grad) as f32);
        grad_rejected.push((d_r * inv_n / batch.rejected_counts[i] as f64) as f32);
    }

    let mut metrics = reference_free_metrics(beta, &avg_c, &avg_r, nll);
    metrics.log_odds_ratio = Some(ratio_sum * inv_n);
    // A chosen completion of probability 1 (average log-prob exactly 0, a legitimate input whose
    // loss and gradient are finite limits) has log-odds +inf: the mean is then undefined.
    metrics.log_odds_chosen = Some(log_odds_sum * inv_n).filter(|v| v.is_finite());
    let loss = nll - beta * ratio_sum * inv_n;
    check_outputs(
        "orpo loss or gradient (an average log-prob too close to 0?)",
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
