//! f-DPO's divergences (Wang et al. 2023, "Beyond Reverse KL"; TRL `DPOConfig.f_divergence_type`):
//! the function `f'` that turns a sequence's log-ratio `u = log π/π_ref` into the score the
//! DPO-family loss compares, `score(u) = f'(e^u)` up to a constant that cancels in chosen − rejected.
//!
//! As TRL 1.16 `DPOTrainer._compute_loss` computes them:
//! - reverse KL (DPO itself): `u`;
//! - forward KL: `1 − e^{−u}`;
//! - Jensen-Shannon: `log 2 + logσ(u)`;
//! - α-divergence: `(e^{(α−1)u} − 1) / (α − 1)` with `(α−1)u` clamped at 80 (TRL's guard against
//!   overflow, whose gradient is 0 beyond it), and reverse KL when `|α − 1| < 1e-6`.
//!
//! Only the loss types whose reward difference makes the partition function cancel have an f-DPO
//! form (TRL refuses the others): `sigmoid`, `sigmoid_norm`, `hinge`, `ipo`, `exo_pair`, `robust`,
//! `discopop`, `sft` (which has no log-ratio).

use super::dpo::DpoLossType;
use super::sigmoid::{log_sigmoid, sigmoid};
use crate::error::{HaloError, Result};

/// Where `(α − 1)u` is clamped for the α-divergence (TRL's value for f32 and bf16 log-probs).
pub const ALPHA_EXPONENT_CLAMP: f64 = 80.0;

/// Below this `|α − 1|` the α-divergence is reverse KL (its limit), as in TRL.
pub const ALPHA_REVERSE_KL_WITHIN: f64 = 1e-6;

/// The f-divergence of f-DPO (TRL `f_divergence_type`, with `f_alpha_divergence_coef`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum FDivergence {
    /// `"reverse_kl"`: standard DPO.
    #[default]
    ReverseKl,
    /// `"forward_kl"`.
    ForwardKl,
    /// `"js_divergence"`.
    JsDivergence,
    /// `"alpha_divergence"` with coefficient α (TRL's default 0.5), finite.
    Alpha {
        /// α (TRL `f_alpha_divergence_coef`).
        coef: f64,
    },
}

impl FDivergence {
    /// TRL's name.
    pub fn name(&self) -> &'static str {
        match self {
            FDivergence::ReverseKl => "reverse_kl",
            FDivergence::ForwardKl => "forward_kl",
            FDivergence::JsDivergence => "js_divergence",
            FDivergence::Alpha { .. } => "alpha_divergence",
        }
    }

    /// Whether `loss_type` has an f-DPO form (TRL's list); every loss type takes reverse KL.
    pub fn supports(&self, loss_type: DpoLossType) -> bool {
        *self == FDivergence::ReverseKl
            || matches!(
                loss_type,
                DpoLossType::Sigmoid
                    | DpoLossType::SigmoidNorm
                    | DpoLossType::Hinge
                    | DpoLossType::Ipo
                    | DpoLossType::ExoPair
                    | DpoLossType::Robust
                    | DpoLossType::Discopop
                    | DpoLossType::Sft
            )
    }

    /// Errors: `InvalidHyperParameter` for a non-finite α; `Unsupported` for a loss type without
    /// an f-DPO form.
    pub fn validate(&self, loss_type: DpoLossType) -> Result<()> {
        if let FDivergence::Alpha { coef } = *self {
            if !coef.is_finite() {
                return Err(HaloError::InvalidHyperParameter {
                    name: "f_alpha_divergence_coef",
                    value: coef,
                    reason: "must be finite",
                });
            }
        }
        if !self.supports(loss_type) {
            return Err(HaloError::Unsupported(format!(
                "f_divergence `{}` with DPO loss type `{}`: only sigmoid, sigmoid_norm, hinge, \
                 ipo, exo_pair, robust, discopop and sft have an f-DPO form (the partition \
                 function cancels only in a chosen - rejected reward difference); use reverse_kl",
                self.name(),
                loss_type.name()
            )));
        }
        Ok(())
    }

    /// `(score(u), d score/du)` of a log-ratio `u`.
    pub fn score(&self, u: f64) -> (f64, f64) {
        match *self {
            FDivergence::ReverseKl => (u, 1.0),
            FDivergence::ForwardKl => {
                let e = (-u).exp();
                (1.0 - e, e)
            }
            FDivergence::JsDivergence => (std::f64::consts::LN_2 + log_sigmoid(u), sigmoid(-u)),
            FDivergence::Alpha { coef } => {
                if (coef - 1.0).abs() < ALPHA_REVERSE_KL_WITHIN {
                    return (u, 1.0);
                }
                let a = coef - 1.0;
                let t = a * u;
                if t <= ALPHA_EXPONENT_CLAMP {
                    // (e^t − 1)/a with expm1: exact near u = 0, where e^t − 1 cancels.
                    (t.exp_m1() / a, t.exp())
                } else {
                    (ALPHA_EXPONENT_CLAMP.exp_m1() / a, 0.0)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_have_their_derivatives() {
        for f in [
            FDivergence::ReverseKl,
            FDivergence::ForwardKl,
            FDivergence::JsDivergence,
            FDivergence::Alpha { coef: 0.5 },
            FDivergence::Alpha { coef: 2.0 },
            FDivergence::Alpha { coef: -1.5 },
        ] {
            for u in [-30.0, -3.1, -0.2, 0.0, 0.7, 4.0, 25.0] {
                let h = 1e-6;
                let fd = (f.score(u + h).0 - f.score(u - h).0) / (2.0 * h);
                let (_, d) = f.score(u);
                assert!(
                    (fd - d).abs() <= 1e-6 * d.abs().max(1.0),
                    "{f:?} at {u}: {fd} vs {d}"
                );
            }
        }
    }

    #[test]
    fn every_score_is_zero_for_equal_models_except_js() {
        // f'(1): 0 for the KLs and α (the constant dropped), log 2 − log 2 = 0 for JS too.
        for f in [
            FDivergence::ReverseKl,
            FDivergence::ForwardKl,
            FDivergence::JsDivergence,
            FDivergence::Alpha { coef: 0.3 },
        ] {
            assert!(f.score(0.0).0.abs() < 1e-15, "{f:?}");
        }
    }

    #[test]
    fn alpha_near_one_is_reverse_kl_and_the_clamp_is_flat() {
        let f = FDivergence::Alpha { coef: 1.0 + 1e-7 };
        assert_eq!(f.score(-3.0), (-3.0, 1.0));
        let g = FDivergence::Alpha { coef: 2.0 };
        assert_eq!(g.score(81.0).1, 0.0);
        assert_eq!(g.score(81.0).0, g.score(1e6).0);
        assert!(g.score(79.0).1 > 0.0);
    }
}
