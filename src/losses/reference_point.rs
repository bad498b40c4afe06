//! The KTO reference point `z0` (Ethayarajh et al. 2024, eq. 8; TRL `KTOTrainer.kto_loss`):
//!
//! `z0 = max(0, mean_j (logp_policy(y'_j|x_j) − logp_ref(y'_j|x_j)))` over the batch's KL pairs
//! (mismatched completions), detached from the graph.
//!
//! Across devices the mean must be over every device's KL pairs, so it is built from an
//! all-reducible [`ReferencePointPartial`] `(sum, count)`: compute one per device with
//! [`ReferencePointPartial::from_kl_logps`], all-reduce `sum` and `count` (or [`merge`] them), then
//! take [`ReferencePointPartial::z0`] and pass the merged partial to the loss.
//!
//! Deliberate difference from TRL: TRL takes each device's mean, gathers the means and averages
//! them before clamping (`gather_for_metrics(kl).mean().clamp(min=0)`), a mean of means. The
//! partial gives the exact global mean over all KL pairs, clamped once; both agree whenever every
//! device holds the same number of KL pairs (and on a single device always).
//!
//! [`merge`]: ReferencePointPartial::merge

use super::validate::{check_finite, check_len};
use crate::error::{HaloError, Result};

/// An all-reducible partial of the reference point: `sum` of the per-pair log-ratios
/// `policy − reference` and how many pairs (`count`) went into it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReferencePointPartial {
    /// `Σ_j (logp_policy_j − logp_ref_j)`, accumulated in f64.
    pub sum: f64,
    /// Number of KL pairs in `sum`.
    pub count: u64,
}

impl ReferencePointPartial {
    /// The empty partial (`sum = 0, count = 0`), the identity of [`merge`](Self::merge).
    pub fn empty() -> Self {
        Self::default()
    }

    /// The partial of one device's KL pairs from their summed policy and reference log-probs.
    ///
    /// Errors: `LengthMismatch("kl_reference_logps")`, `NonFinite`. An empty slice gives the
    /// empty partial (valid for merging; [`z0`](Self::z0) refuses it).
    pub fn from_kl_logps(policy_kl_logps: &[f32], reference_kl_logps: &[f32]) -> Result<Self> {
        check_len(
            "kl_reference_logps",
            policy_kl_logps.len(),
            reference_kl_logps,
        )?;
        check_finite("kl_policy_logps", policy_kl_logps)?;
        check_finite("kl_reference_logps", reference_kl_logps)?;
        let sum = policy_kl_logps
            .iter()
            .zip(reference_kl_logps)
            .map(|(&p, &r)| p as f64 - r as f64)
            .sum();
        Ok(Self {
            sum,
            count: policy_kl_logps.len() as u64,
        })
    }

    /// The partial of already-formed per-pair log-ratios (e.g. the humanline-clamped sums of
    /// [`crate::cpu::sequence_logratio_sums`]). Errors: `NonFinite`.
    pub fn from_kl_logratios(kl_logratios: &[f32]) -> Result<Self> {
        check_finite("kl_logratios", kl_logratios)?;
        Ok(Self {
            sum: kl_logratios.iter().map(|&x| x as f64).sum(),
            count: kl_logratios.len() as u64,
        })
    }

    /// The partial of the union of both sets of KL pairs (what an all-reduce-sum computes).
    ///
    /// Errors: `InvalidShape` when the counts overflow `u64` (it would wrap to an "empty" batch).
    pub fn merge(self, other: Self) -> Result<Self> {
        let count = self.count.checked_add(other.count).ok_or_else(|| {
            HaloError::InvalidShape(format!(
                "merging KL partials of {} and {} pairs overflows u64",
                self.count, other.count
            ))
        })?;
        Ok(Self {
            sum: self.sum + other.sum,
            count,
        })
    }

    /// In-place [`merge`](Self::merge) (unchanged on error).
    pub fn add(&mut self, other: Self) -> Result<()> {
        *self = self.merge(other)?;
        Ok(())
    }

    /// The unclamped mean log-ratio, `None` when `count == 0`.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// `z0 = max(0, sum / count)`.
    ///
    /// Errors: `EmptyBatch("kl pairs")` when `count == 0`, `NonFinite` when `sum` is not finite.
    pub fn z0(&self) -> Result<f64> {
        if !self.sum.is_finite() {
            return Err(HaloError::NonFinite {
                what: "reference point partial sum",
                row: 0,
            });
        }
        match self.mean() {
            Some(mean) => Ok(mean.max(0.0)),
            None => Err(HaloError::EmptyBatch("kl pairs")),
        }
    }
}
