//! Choosing KTO's class weights λ_D, λ_U for an imbalanced data set.
//!
//! The KTO paper (Ethayarajh et al. 2024, §4.2 / eq. 9; TRL `KTOConfig` docs) recommends
//! `λ_D n_D / (λ_U n_U) ∈ [1, 4/3]`, where `n_D`, `n_U` count desirable and undesirable examples.

use crate::error::{HaloError, Result};

/// Lower end of the recommended range of `λ_D n_D / (λ_U n_U)`.
pub const KTO_WEIGHT_RATIO_MIN: f64 = 1.0;
/// Upper end of the recommended range of `λ_D n_D / (λ_U n_U)`.
pub const KTO_WEIGHT_RATIO_MAX: f64 = 4.0 / 3.0;
/// Relative slack allowed by [`check_kto_weights`] at both ends (rounding of the suggestion).
pub const KTO_WEIGHT_RATIO_TOLERANCE: f64 = 1e-9;

/// A pair of KTO class weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoWeights {
    /// λ_D.
    pub desirable_weight: f64,
    /// λ_U.
    pub undesirable_weight: f64,
}

/// Where a setting's ratio `λ_D n_D / (λ_U n_U)` falls against `[1, 4/3]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KtoWeightCheck {
    /// Inside the recommended range (within [`KTO_WEIGHT_RATIO_TOLERANCE`]).
    InRange {
        /// `λ_D n_D / (λ_U n_U)`.
        ratio: f64,
    },
    /// Below 1: desirable examples are under-weighted.
    TooLow {
        /// `λ_D n_D / (λ_U n_U)`.
        ratio: f64,
    },
    /// Above 4/3: desirable examples are over-weighted.
    TooHigh {
        /// `λ_D n_D / (λ_U n_U)`.
        ratio: f64,
    },
}

impl KtoWeightCheck {
    /// `true` for [`KtoWeightCheck::InRange`].
    pub fn is_in_range(&self) -> bool {
        matches!(self, KtoWeightCheck::InRange { .. })
    }

    /// The ratio `λ_D n_D / (λ_U n_U)`.
    pub fn ratio(&self) -> f64 {
        match *self {
            KtoWeightCheck::InRange { ratio }
            | KtoWeightCheck::TooLow { ratio }
            | KtoWeightCheck::TooHigh { ratio } => ratio,
        }
    }
}

fn check_counts(n_desirable: u64, n_undesirable: u64) -> Result<()> {
    if n_desirable == 0 {
        return Err(HaloError::EmptyBatch("n_desirable"));
    }
    if n_undesirable == 0 {
        return Err(HaloError::EmptyBatch("n_undesirable"));
    }
    Ok(())
}

/// Suggested weights for `n_desirable` desirable and `n_undesirable` undesirable examples.
///
/// Exactly what is returned (ratio `q = n_D / n_U` with both weights 1):
/// - `1 ≤ q ≤ 4/3`: `λ_D = λ_U = 1` (already in range).
/// - `q < 1` (desirable is the smaller class): `λ_U = 1`, `λ_D = n_U / n_D` (ratio lands on 1, the
///   nearest end; the paper's 1:10 example gives `λ_D = 10`).
/// - `q > 4/3` (undesirable is the smaller class): `λ_D = 1`, `λ_U = 3 n_D / (4 n_U)` (ratio
///   lands on 4/3, the nearest end).
///
/// The larger class keeps weight 1 and only the smaller one is raised (never lowered below 1).
/// Errors: `EmptyBatch("n_desirable" | "n_undesirable")` when a count is 0.
pub fn suggest_kto_weights(n_desirable: u64, n_undesirable: u64) -> Result<KtoWeights> {
    check_counts(n_desirable, n_undesirable)?;
    let (nd, nu) = (n_desirable as f64, n_undesirable as f64);
    let q = nd / nu;
    Ok(if q < KTO_WEIGHT_RATIO_MIN {
        KtoWeights {
            desirable_weight: nu / nd * KTO_WEIGHT_RATIO_MIN,
            undesirable_weight: 1.0,
        }
    } else if q > KTO_WEIGHT_RATIO_MAX {
        KtoWeights {
            desirable_weight: 1.0,
            undesirable_weight: q / KTO_WEIGHT_RATIO_MAX,
        }
    } else {
        KtoWeights {
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    })
}

/// Where `λ_D n_D / (λ_U n_U)` falls against `[1, 4/3]` (each end widened by the relative
/// [`KTO_WEIGHT_RATIO_TOLERANCE`]).
///
/// Errors: `EmptyBatch` for a zero count; `InvalidHyperParameter` for a weight that is negative or
/// non-finite, or `λ_U = 0` (the ratio is undefined).
pub fn check_kto_weights(
    n_desirable: u64,
    n_undesirable: u64,
    weights: KtoWeights,
) -> Result<KtoWeightCheck> {
    check_counts(n_desirable, n_undesirable)?;
    super::validate::check_nonnegative("desirable_weight", weights.desirable_weight)?;
    super::validate::check_positive("undesirable_weight", weights.undesirable_weight)?;
    let ratio = weights.desirable_weight * n_desirable as f64
        / (weights.undesirable_weight * n_undesirable as f64);
    Ok(
        if ratio < KTO_WEIGHT_RATIO_MIN * (1.0 - KTO_WEIGHT_RATIO_TOLERANCE) {
            KtoWeightCheck::TooLow { ratio }
        } else if ratio > KTO_WEIGHT_RATIO_MAX * (1.0 + KTO_WEIGHT_RATIO_TOLERANCE) {
            KtoWeightCheck::TooHigh { ratio }
        } else {
            KtoWeightCheck::InRange { ratio }
        },
    )
}
