//! What the backward of [`token_logprobs`](super::token_logprobs()) needs from its forward: each
//! row's logsumexp, and the rule by which the backward accepts it as belonging to its logits.
//!
//! Why a residual: the backward recomputes `p = exp(z − lse)`. Rounded to f32, an lse near 1000
//! is off by up to half an ulp (3e-5), and that error lands in every `p` of the row as a relative
//! error — 2e-5 where PyTorch's f32 softmax is 3e-7. The forward holds the row max and `ln Σ`
//! apart; it rounds their sum to the f32 `lse` users read and keeps the rounding error as
//! `lse_residual` (exact, by TwoSum), so that `lse + lse_residual` is the logsumexp to f32
//! accuracy of `ln Σ` itself, whatever the logits' magnitude.

/// The forward's saved row statistics, on the host (`L = &[f32]`) or on a device
/// (`L = &CudaSlice<f32>` or another device buffer): per row, the logsumexp rounded to f32 (`lse`,
/// 0 on ignored rows) and, optionally, the residual of that rounding.
///
/// Take it from the forward's output (`TokenLogprobs::saved_lse`, `CudaTokenLogprobs::saved_lse`)
/// for full precision, or from a bare lse computed elsewhere with [`SavedLse::bare`] (the residual
/// is then taken as 0: gradients carry the lse's rounding error, ~`|lse|`·2^-24 relative).
#[derive(Debug, Clone, Copy)]
pub struct SavedLse<L> {
    /// `logsumexp(z)` per row, rounded to f32.
    pub lse: L,
    /// `logsumexp(z) − lse` per row (the exact rounding error of `lse`); `None` reads as 0.
    pub residual: Option<L>,
}

impl<L> SavedLse<L> {
    /// An lse with its rounding residual, as the forward writes them.
    pub fn new(lse: L, residual: L) -> Self {
        Self {
            lse,
            residual: Some(residual),
        }
    }

    /// A bare lse (no residual): the backward then uses `lse` as the exact logsumexp.
    pub fn bare(lse: L) -> Self {
        Self {
            lse,
            residual: None,
        }
    }
}

/// Absolute part of the backward's tolerance on `Σ_v exp(z_v − lse − residual) = 1`: an lse is
/// accepted when the sum is within `LSE_SUM_TOLERANCE + |lse|·2^-23` of 1 (the second term covers
/// twice the rounding of a bare f32 lse). Also `HALO_LSE_SUM_TOL` in `kernels/halo_abi.h`.
pub const LSE_SUM_TOLERANCE: f32 = 1e-3;

/// Whether `prob_sum = Σ_v exp(z_v − (lse + residual))` is 1 within the stated tolerance
/// `LSE_SUM_TOLERANCE + |lse|·2^-23`: the second term is twice the rounding of a bare f32 lse
/// (half an ulp of `lse` moves every p by that much), so the forward's own lse always fits; an lse
/// below the row max (some p > 1) or far above it does not. False for a NaN sum.
#[inline]
pub(crate) fn lse_fits_row(lse: f32, prob_sum: f32) -> bool {
    (prob_sum - 1.0).abs() <= LSE_SUM_TOLERANCE + lse.abs() * f32::EPSILON
}

/// `max + ln_sum` as the f32 `lse` and the exact error of that rounding (Knuth's TwoSum, which needs
/// no ordering of the two terms).
#[inline]
pub(crate) fn split_lse(row_max: f32, ln_sum: f32) -> (f32, f32) {
    let lse = row_max + ln_sum;
    let b = lse - row_max;
    let residual = (row_max - (lse - b)) + (ln_sum - b);
    (lse, residual)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_exact() {
        // lse + residual equals max + ln_sum exactly (checked in f64, where both sums are exact).
        for &(m, s) in &[
            (1000.0f32, 6.907_755),
            (-1000.0, 3.3),
            (0.1, 9.9),
            (1.0e4, std::f32::consts::LN_2),
            (0.0, 11.78),
            (-7.5, 7.5),
        ] {
            let (lse, r) = split_lse(m, s);
            assert_eq!(lse, m + s);
            assert_eq!(lse as f64 + r as f64, m as f64 + s as f64, "{m} + {s}");
            assert!(r.abs() <= lse.abs() * f32::EPSILON / 2.0 + f32::MIN_POSITIVE);
        }
    }

    #[test]
    fn tolerance() {
        assert!(lse_fits_row(3.0, 1.0 + 0.9e-3));
        assert!(!lse_fits_row(3.0, 1.0 + 1.1e-3));
        assert!(!lse_fits_row(3.0, 1.0 - 1.1e-3));
        assert!(!lse_fits_row(3.0, f32::NAN));
        assert!(!lse_fits_row(3.0, f32::INFINITY));
        // A bare lse of 1e4 is off by up to half an ulp (4.9e-4), which the |lse| term covers.
        assert!(lse_fits_row(1.0e4, (-4.9e-4f32 - 0.9e-3).exp()));
    }
}
