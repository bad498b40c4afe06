//! The DPO family on preference pairs, as TRL computes it in `trl/trainer/dpo_trainer.py`
//! (`DPOTrainer._compute_loss`, TRL 1.x, `f_divergence_type="reverse_kl"`).
//!
//! With the log-ratios `c = π_c − ref_c`, `r = π_r − ref_r` and `h = c − r`, per pair (β > 0,
//! label smoothing ε):
//! - `Sigmoid` (DPO, Rafailov et al. 2023; cDPO with ε): `−(1−ε) logσ(βh) − ε logσ(−βh)`.
//! - `Robust` (rDPO, Chowdhury et al. 2024): `(−(1−ε) logσ(βh) + ε logσ(−βh)) / (1 − 2ε)`.
//! - `Hinge` (SLiC, Zhao et al. 2023): `relu(1 − βh)` (gradient 0 at the kink, as PyTorch).
//! - `Ipo` (Azar et al. 2023): `(h − 1/(2β))²` where every log-prob (policy AND reference) is first
//!   divided by its sequence's token count (TRL: `all_logps / loss_mask.sum(-1)` for "ipo").
//! - `ApoZero` (D'Oosterlinck et al. 2024, eq. 7): `1 − σ(βc) + σ(βr)`.
//! - `ApoDown` (same paper, eq. 8): `σ(βc) + 1 − σ(βh)`.
//! - `ExoPair` (EXO, Ji et al. 2024, eq. 16): `σ(βh)(logσ(βh) − log(1−ε)) + σ(−βh)(logσ(−βh) − log ε)`,
//!   ε ∈ (0, 1).
//! - `NcaPair` (NCA, Chen et al. 2024): `−logσ(βc) − ½ logσ(−βc) − ½ logσ(−βr)`.
//! - `BcoPair` (BCO without its reward shift): `−logσ(βc) − logσ(−βr)`.
//! - `SppoHard` (SPPO, Wu et al. 2024, hard labels): `(c − 1/(2β))² + (r + 1/(2β))²`.
//! - `Aot` (AOT, Melnyk et al. 2024): the sigmoid loss (with ε) on `sort(π_c − π_r)[k] −
//!   sort(ref_c − ref_r)[k]`, both sorted ascending over the batch.
//! - `AotUnpaired`: the same on `sort(c)[k] − sort(r)[k]`.
//! - `Discopop` (DiscoPOP, Chris Lu et al. 2024, eq. 5), with `x = βh`, `m = σ(x/τ)`:
//!   `−logσ(x)(1 − m) + e^{−x} m`.
//! - `Sft`: the token-mean NLL of the chosen completions, `−Σ π_c / Σ count_c` (TRL's mean over
//!   every chosen token's log-prob; the same value for each pair).
//! - `SigmoidNorm`: `−logσ(β(c/count_c − r/count_r))`, DPO on length-normalised log-ratios.
//!
//! Loss = mean over pairs. Rewards are `β·(π − ref)` and `logps/*` the policy log-probs, always on
//! the summed log-probs — for IPO too, as TRL ≥ 1.0 logs them (it normalises inside the loss only).
//! Label smoothing is used by `Sigmoid` and `Aot`/`AotUnpaired` (ε ∈ [0, 1]), `Robust` (ε ∈ [0, 0.5))
//! and `ExoPair` (ε ∈ (0, 1), as TRL requires); the others ignore it. Zero-token sequences are
//! allowed except for the length-normalised `Ipo` and `SigmoidNorm` (`EmptySequence`); `Sft` needs
//! at least one chosen token in the batch.
//!
//! Where we differ from TRL 1.x on purpose (README): `Sigmoid` applies ε (TRL ≥ 1.0 ignores it;
//! TRL < 1.0 applied it); `Ipo`/`SigmoidNorm` refuse a zero-token sequence (TRL divides by
//! `clamp(count, min=1)`); `Sft` refuses a batch without chosen tokens (TRL's mean is NaN);
//! `Discopop` evaluates `e^{−x}·σ(x/τ)` as `exp(−x + logσ(x/τ))`, finite where TRL's product is
//! `inf · 0 = NaN` (βh below about −88 in f32).

use super::f_divergence::FDivergence;
use super::metrics::pair_metrics;
use super::pairs::{PairBatch, PairLossOutput};
use super::sigmoid::{log_sigmoid, sigmoid, sigmoid_derivative};
use super::validate::{
    check_count_lengths, check_counts_positive, check_finite, check_label_smoothing, check_metrics,
    check_outputs, check_pair_lengths, check_positive, ipo_counts, sft_counts, sigmoid_norm_counts,
};
use crate::error::{HaloError, Result};

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
    /// `"apo_down"`.
    ApoDown,
    /// `"exo_pair"` (needs label smoothing ε ∈ (0, 1)).
    ExoPair,
    /// `"nca_pair"`.
    NcaPair,
    /// `"bco_pair"`.
    BcoPair,
    /// `"sppo_hard"`.
    SppoHard,
    /// `"aot"` (sorts the batch's policy and reference log-ratios).
    Aot,
    /// `"aot_unpaired"` (sorts the batch's chosen and rejected log-ratios).
    AotUnpaired,
    /// `"discopop"` (with [`DpoConfig::discopop_tau`]).
    Discopop,
    /// `"sft"`: the chosen completions' token-mean NLL (needs the chosen token counts).
    Sft,
    /// `"sigmoid_norm"`: DPO's logistic loss on length-normalised log-ratios (needs the counts).
    SigmoidNorm,
}

impl DpoLossType {
    /// Every loss type, in TRL's order of `DPOTrainer._compute_loss` (`sigmoid` first).
    pub const ALL: [DpoLossType; 15] = [
        DpoLossType::Sigmoid,
        DpoLossType::Hinge,
        DpoLossType::Ipo,
        DpoLossType::ExoPair,
        DpoLossType::NcaPair,
        DpoLossType::Robust,
        DpoLossType::BcoPair,
        DpoLossType::SppoHard,
        DpoLossType::Aot,
        DpoLossType::AotUnpaired,
        DpoLossType::ApoZero,
        DpoLossType::ApoDown,
        DpoLossType::Discopop,
        DpoLossType::Sft,
        DpoLossType::SigmoidNorm,
    ];

    /// TRL's name for the loss type.
    pub fn name(&self) -> &'static str {
        match self {
            DpoLossType::Sigmoid => "sigmoid",
            DpoLossType::Robust => "robust",
            DpoLossType::Hinge => "hinge",
            DpoLossType::Ipo => "ipo",
            DpoLossType::ApoZero => "apo_zero",
            DpoLossType::ApoDown => "apo_down",
            DpoLossType::ExoPair => "exo_pair",
            DpoLossType::NcaPair => "nca_pair",
            DpoLossType::BcoPair => "bco_pair",
            DpoLossType::SppoHard => "sppo_hard",
            DpoLossType::Aot => "aot",
            DpoLossType::AotUnpaired => "aot_unpaired",
            DpoLossType::Discopop => "discopop",
            DpoLossType::Sft => "sft",
            DpoLossType::SigmoidNorm => "sigmoid_norm",
        }
    }

    /// The loss type TRL calls `name` (`None` for a name TRL does not have).
    pub fn from_name(name: &str) -> Option<DpoLossType> {
        DpoLossType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the loss needs the token counts of the sequences (`Ipo`, `SigmoidNorm`: both;
    /// `Sft`: the chosen).
    pub fn needs_counts(&self) -> bool {
        self.length_normalised() || *self == DpoLossType::Sft
    }

    /// Whether every log-ratio is divided by its sequence's token count first (`Ipo`,
    /// `SigmoidNorm`).
    pub fn length_normalised(&self) -> bool {
        matches!(self, DpoLossType::Ipo | DpoLossType::SigmoidNorm)
    }

    /// Whether the loss of one pair depends on the other pairs of the batch (`Aot`,
    /// `AotUnpaired`: sorted over the batch; `Sft`: a token mean over the batch).
    pub fn couples_pairs(&self) -> bool {
        matches!(
            self,
            DpoLossType::Aot | DpoLossType::AotUnpaired | DpoLossType::Sft
        )
    }
}

/// Hyper-parameters; defaults are TRL `DPOConfig`'s (β = 0.1, ε = 0, `sigmoid`, τ = 0.05).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoConfig {
    /// β > 0, finite.
    pub beta: f64,
    /// ε: `[0, 1]` for `Sigmoid`, `Aot` and `AotUnpaired`, `[0, 0.5)` for `Robust`, `(0, 1)` for
    /// `ExoPair`, ignored otherwise.
    pub label_smoothing: f64,
    /// Which member of the family (TRL's `loss_type`).
    pub loss_type: DpoLossType,
    /// DiscoPOP's temperature τ > 0 (TRL `discopop_tau`, default 0.05); used by `Discopop` only.
    pub discopop_tau: f64,
    /// f-DPO's divergence (TRL `f_divergence_type`, default reverse KL = DPO): the scores the loss
    /// compares are `score(π − ref)` instead of the log-ratios (see [`FDivergence`]).
    pub f_divergence: FDivergence,
}

/// TRL's `DPOConfig.discopop_tau` default (the DiscoPOP paper's recommendation).
pub const DEFAULT_DISCOPOP_TAU: f64 = 0.05;

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            beta: 0.1,
            label_smoothing: 0.0,
            loss_type: DpoLossType::Sigmoid,
            discopop_tau: DEFAULT_DISCOPOP_TAU,
            f_divergence: FDivergence::ReverseKl,
        }
    }
}

impl DpoConfig {
    /// Errors: `InvalidHyperParameter` for β, ε, τ or α outside their domain; `Unsupported` for
    /// an f-divergence other than reverse KL with a loss type that has no f-DPO form.
    pub fn validate(&self) -> Result<()> {
        check_positive("beta", self.beta)?;
        self.f_divergence.validate(self.loss_type)?;
        match self.loss_type {
            DpoLossType::Sigmoid | DpoLossType::Aot | DpoLossType::AotUnpaired => {
                check_label_smoothing(self.label_smoothing, 1.0, true, "must be in [0, 1]")
            }
            DpoLossType::Robust => check_label_smoothing(
                self.label_smoothing,
                0.5,
                false,
                "must be in [0, 0.5) (the robust loss divides by 1 - 2 eps)",
            ),
            DpoLossType::ExoPair => {
                let eps = self.label_smoothing;
                if eps > 0.0 && eps < 1.0 {
                    Ok(())
                } else {
                    Err(HaloError::InvalidHyperParameter {
                        name: "label_smoothing",
                        value: eps,
                        reason: "must be in (0, 1) for exo_pair (its loss takes log(eps) and \
                                 log(1 - eps); TRL < 1.0 substituted 1e-3 for 0)",
                    })
                }
            }
            DpoLossType::Discopop => check_positive("discopop_tau", self.discopop_tau),
            _ => Ok(()),
        }
    }
}

/// The DPO-family loss, its gradients w.r.t. the summed policy chosen/rejected log-probs, and
/// metrics.
///
/// Errors: `InvalidHyperParameter`; `EmptyBatch("policy_chosen_logps")`; `LengthMismatch` naming
/// the argument; `NonFinite`; for `Ipo`: `MissingArgument` without counts, `EmptySequence` for a
/// count of 0; for `Sft`: `MissingArgument` without chosen counts, `EmptyBatch` when they sum to 0.
pub fn dpo_loss(config: &DpoConfig, batch: &PairBatch<'_>) -> Result<PairLossOutput> {
    config.validate()?;
    let n = check_pair_batch(batch)?;

    // Per-sequence scale applied to every log-prob: 1/count for IPO and sigmoid_norm, 1 otherwise.
    let (chosen_scale, rejected_scale): (Vec<f64>, Vec<f64>) =
        if config.loss_type.length_normalised() {
            let (chosen, rejected) = normalised_checked_counts(config.loss_type, batch)?;
            (
                chosen.iter().map(|&c| 1.0 / c as f64).collect(),
                rejected.iter().map(|&c| 1.0 / c as f64).collect(),
            )
        } else {
            (vec![1.0; n], vec![1.0; n])
        };
    let chosen_tokens = if config.loss_type == DpoLossType::Sft {
        sft_chosen_tokens(batch)?
    } else {
        0
    };

    let beta = config.beta;
    let inv_n = 1.0 / n as f64;
    // The scores the loss compares: the log-ratios through the f-divergence (the log-ratios
    // themselves for reverse KL), divided by the token count when length-normalised (TRL divides
    // the scores, after the f-divergence). `*_chain` is d score / d π (f' times the scale).
    let mut chosen_scores = Vec::with_capacity(n);
    let mut rejected_scores = Vec::with_capacity(n);
    let mut chosen_chain = Vec::with_capacity(n);
    let mut rejected_chain = Vec::with_capacity(n);
    for i in 0..n {
        let (sc, sr) = (chosen_scale[i], rejected_scale[i]);
        let (c, dc) = config
            .f_divergence
            .score(batch.policy_chosen_logps[i] as f64 - batch.reference_chosen_logps[i] as f64);
        let (r, dr) = config.f_divergence.score(
            batch.policy_rejected_logps[i] as f64 - batch.reference_rejected_logps[i] as f64,
        );
        chosen_scores.push(c * sc);
        rejected_scores.push(r * sr);
        // Sft's gradient below is w.r.t. π itself (its loss has no log-ratio).
        let sft = config.loss_type == DpoLossType::Sft;
        chosen_chain.push(if sft { 1.0 } else { dc * sc });
        rejected_chain.push(if sft { 1.0 } else { dr * sr });
    }
    // (Σ loss, ∂Σloss/∂c_i, ∂Σloss/∂r_i) over the batch, per loss type.
    let (loss_sum, d_chosen, d_rejected) = match config.loss_type {
        DpoLossType::Aot => {
            // The policy's log-ratio differences against the reference's, both sorted; the
            // reference has no gradient, and the policy difference's goes to both completions.
            let policy: Vec<f64> = (0..n)
                .map(|i| {
                    batch.policy_chosen_logps[i] as f64 - batch.policy_rejected_logps[i] as f64
                })
                .collect();
            let reference: Vec<f64> = (0..n)
                .map(|i| {
                    batch.reference_chosen_logps[i] as f64
                        - batch.reference_rejected_logps[i] as f64
                })
                .collect();
            let (total, d_policy, _) =
                sorted_logistic(beta, config.label_smoothing, &policy, &reference);
            let d_rejected = d_policy.iter().map(|d| -d).collect();
            (total, d_policy, d_rejected)
        }
        DpoLossType::AotUnpaired => sorted_logistic(
            beta,
            config.label_smoothing,
            &chosen_scores,
            &rejected_scores,
        ),
        DpoLossType::Sft => {
            // Every pair carries the batch's NLL: the mean over pairs is that NLL, whose
            // derivative w.r.t. π_c[i] is −1/Σcount (times n here, as the mean divides by n).
            let tokens = chosen_tokens as f64;
            let total_logp: f64 = batch.policy_chosen_logps.iter().map(|&x| x as f64).sum();
            let nll = -total_logp / tokens;
            (nll * n as f64, vec![-(n as f64) / tokens; n], vec![0.0; n])
        }
        _ => {
            let (mut total, mut dc, mut dr) = (0.0, Vec::with_capacity(n), Vec::with_capacity(n));
            for i in 0..n {
                let (l, c, r) = pair_term(config, chosen_scores[i], rejected_scores[i]);
                total += l;
                dc.push(c);
                dr.push(r);
            }
            (total, dc, dr)
        }
    };

    let mut grad_chosen = Vec::with_capacity(n);
    let mut grad_rejected = Vec::with_capacity(n);
    let mut chosen_rewards = Vec::with_capacity(n);
    let mut rejected_rewards = Vec::with_capacity(n);
    let mut chosen_logps = Vec::with_capacity(n);
    let mut rejected_logps = Vec::with_capacity(n);
    for i in 0..n {
        grad_chosen.push((d_chosen[i] * chosen_chain[i] * inv_n) as f32);
        grad_rejected.push((d_rejected[i] * rejected_chain[i] * inv_n) as f32);
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

/// `(loss, ∂loss/∂c, ∂loss/∂r)` of one pair for the loss types that see only their own pair,
/// from its scores `c` and `r`: the log-ratios, through the f-divergence (reverse KL for every
/// type but those with an f-DPO form) and, for IPO and sigmoid_norm, divided by the token counts.
fn pair_term(config: &DpoConfig, c: f64, r: f64) -> (f64, f64, f64) {
    let beta = config.beta;
    let eps = config.label_smoothing;
    let h = c - r;
    let bh = beta * h;
    match config.loss_type {
        DpoLossType::Sigmoid => {
            let (l, d) = smoothed_logistic(beta, eps, h);
            (l, d, -d)
        }
        DpoLossType::SigmoidNorm => {
            let (l, d) = smoothed_logistic(beta, 0.0, h);
            (l, d, -d)
        }
        DpoLossType::Robust => {
            let k = 1.0 / (1.0 - 2.0 * eps);
            let loss = (-(1.0 - eps) * log_sigmoid(bh) + eps * log_sigmoid(-bh)) * k;
            let d = beta * (-(1.0 - eps) * sigmoid(-bh) - eps * sigmoid(bh)) * k;
            (loss, d, -d)
        }
        DpoLossType::Hinge => {
            let m = 1.0 - bh;
            if m > 0.0 {
                (m, -beta, beta)
            } else {
                (0.0, 0.0, 0.0)
            }
        }
        DpoLossType::Ipo => {
            let t = h - 1.0 / (2.0 * beta);
            (t * t, 2.0 * t, -2.0 * t)
        }
        DpoLossType::ApoZero => {
            let (xc, xr) = (beta * c, beta * r);
            (
                sigmoid(-xc) + sigmoid(xr),
                -beta * sigmoid_derivative(xc),
                beta * sigmoid_derivative(xr),
            )
        }
        DpoLossType::ApoDown => {
            // σ(βc) + 1 − σ(βh), h = c − r: ∂/∂c = β(σ'(βc) − σ'(βh)), ∂/∂r = βσ'(βh).
            let (sc, sh) = (sigmoid_derivative(beta * c), sigmoid_derivative(bh));
            (
                sigmoid(beta * c) + sigmoid(-bh),
                beta * (sc - sh),
                beta * sh,
            )
        }
        DpoLossType::ExoPair => {
            // f(x) = σ(x)(logσ(x) − log(1−ε)) + σ(−x)(logσ(−x) − log ε); since
            // logσ(x) − logσ(−x) = x, f'(x) = σ'(x)·(x − log(1−ε) + log ε).
            let (log_keep, log_flip) = ((-eps).ln_1p(), eps.ln());
            let loss = sigmoid(bh) * (log_sigmoid(bh) - log_keep)
                + sigmoid(-bh) * (log_sigmoid(-bh) - log_flip);
            let d = beta * sigmoid_derivative(bh) * (bh - log_keep + log_flip);
            (loss, d, -d)
        }
        DpoLossType::NcaPair => {
            let (xc, xr) = (beta * c, beta * r);
            (
                -log_sigmoid(xc) - 0.5 * log_sigmoid(-xc) - 0.5 * log_sigmoid(-xr),
                beta * (-sigmoid(-xc) + 0.5 * sigmoid(xc)),
                beta * 0.5 * sigmoid(xr),
            )
        }
        DpoLossType::BcoPair => {
            let (xc, xr) = (beta * c, beta * r);
            (
                -log_sigmoid(xc) - log_sigmoid(-xr),
                -beta * sigmoid(-xc),
                beta * sigmoid(xr),
            )
        }
        DpoLossType::SppoHard => {
            let half = 0.5 / beta;
            let (tc, tr) = (c - half, r + half);
            (tc * tc + tr * tr, 2.0 * tc, 2.0 * tr)
        }
        DpoLossType::Discopop => {
            let (l, d) = discopop(bh, config.discopop_tau);
            (l, beta * d, -beta * d)
        }
        DpoLossType::Aot | DpoLossType::AotUnpaired | DpoLossType::Sft => {
            unreachable!("batch-coupled loss types are computed over the whole batch")
        }
    }
}

/// cDPO's smoothed logistic loss of a margin `h`: `−(1−ε) logσ(βh) − ε logσ(−βh)` and its
/// derivative in `h` (DPO `sigmoid`, AOT).
fn smoothed_logistic(beta: f64, eps: f64, h: f64) -> (f64, f64) {
    let x = beta * h;
    let loss = -(1.0 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x);
    let d = beta * (-(1.0 - eps) * sigmoid(-x) + eps * sigmoid(x));
    (loss, d)
}

/// DiscoPOP's loss of `x = βh` and its derivative in `x`:
/// `−logσ(x)(1 − m) + e^{−x}m` with `m = σ(x/τ)`. The exponential term and its derivative are
/// evaluated in log space (`exp(−x + logσ(x/τ))`), so that for very negative `x` they are the
/// small (τ < 1) numbers they are rather than `inf · 0`.
fn discopop(x: f64, tau: f64) -> (f64, f64) {
    let y = x / tau;
    let one_minus_m = sigmoid(-y);
    let exp_term = (-x + log_sigmoid(y)).exp(); // e^{−x}·m
    let exp_term_dm = (-x + log_sigmoid(y) + log_sigmoid(-y)).exp() / tau; // e^{−x}·m'
    let dm = sigmoid_derivative(y) / tau;
    let loss = -log_sigmoid(x) * one_minus_m + exp_term;
    // d/dx: −σ(−x)(1 − m) + logσ(x)·m' − e^{−x}m + e^{−x}m'.
    let d = -sigmoid(-x) * one_minus_m + log_sigmoid(x) * dm - exp_term + exp_term_dm;
    (loss, d)
}

/// AOT's loss: cDPO's smoothed logistic of `sort(a)[k] − sort(b)[k]` summed over k, with its
/// gradients w.r.t. each `a[i]` and `b[j]`: slot k's goes to the element of rank k (ties by index;
/// torch.sort leaves their order open), as autograd through `torch.sort` sends it.
fn sorted_logistic(beta: f64, eps: f64, a: &[f64], b: &[f64]) -> (f64, Vec<f64>, Vec<f64>) {
    let (a_order, b_order) = (ascending_order(a), ascending_order(b));
    let (mut total, mut da, mut db) = (0.0, vec![0.0; a.len()], vec![0.0; b.len()]);
    for (&i, &j) in a_order.iter().zip(&b_order) {
        let (l, d) = smoothed_logistic(beta, eps, a[i] - b[j]);
        total += l;
        da[i] = d;
        db[j] = -d;
    }
    (total, da, db)
}

/// Indices of `values` in ascending order (ties by index: a stable sort), as `torch.sort`
/// orders them.
fn ascending_order(values: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    order
}

/// `Sft`'s token total: chosen counts given (`MissingArgument`), summing to at least 1.
pub(crate) fn sft_chosen_tokens(batch: &PairBatch<'_>) -> Result<u64> {
    let counts = sft_counts(batch.chosen_counts)?;
    let tokens: u64 = counts.iter().map(|&c| c as u64).sum();
    if tokens == 0 {
        return Err(HaloError::EmptyBatch(
            "chosen_counts (DPO loss type `sft` needs at least one chosen token)",
        ));
    }
    Ok(tokens)
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

/// The token counts of a length-normalised loss type (`Ipo`, `SigmoidNorm`): both given
/// (`MissingArgument` naming the loss), every count ≥ 1 (`EmptySequence`).
pub(crate) fn normalised_checked_counts<'a>(
    loss_type: DpoLossType,
    batch: &PairBatch<'a>,
) -> Result<(&'a [u32], &'a [u32])> {
    let (chosen, rejected) = match loss_type {
        DpoLossType::SigmoidNorm => {
            sigmoid_norm_counts(batch.chosen_counts, batch.rejected_counts)?
        }
        _ => ipo_counts(batch.chosen_counts, batch.rejected_counts)?,
    };
    check_counts_positive("chosen_counts", chosen)?;
    check_counts_positive("rejected_counts", rejected)?;
    Ok((chosen, rejected))
}
