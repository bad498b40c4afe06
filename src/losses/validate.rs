//! Input checks shared by the losses: lengths, finiteness, hyper-parameter domains.

use crate::error::{HaloError, Result};

/// `got.len() == expected`, else `LengthMismatch` naming `what`.
pub(crate) fn check_len<T>(what: &'static str, expected: usize, got: &[T]) -> Result<()> {
    if got.len() == expected {
        Ok(())
    } else {
        Err(HaloError::LengthMismatch {
            what,
            expected,
            got: got.len(),
        })
    }
}

/// At least one element, else `EmptyBatch(what)`.
pub(crate) fn check_nonempty<T>(what: &'static str, values: &[T]) -> Result<()> {
    if values.is_empty() {
        Err(HaloError::EmptyBatch(what))
    } else {
        Ok(())
    }
}

/// Every value finite, else `NonFinite` at the first bad index.
pub(crate) fn check_finite(what: &'static str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(row) => Err(HaloError::NonFinite { what, row }),
        None => Ok(()),
    }
}

/// Every count ≥ 1 (length-normalised losses divide by it), else `EmptySequence`.
pub(crate) fn check_counts_positive(what: &'static str, counts: &[u32]) -> Result<()> {
    match counts.iter().position(|&c| c == 0) {
        Some(index) => Err(HaloError::EmptySequence { what, index }),
        None => Ok(()),
    }
}

/// `β > 0` and finite.
pub(crate) fn check_positive(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(HaloError::InvalidHyperParameter {
            name,
            value,
            reason: "must be finite and > 0",
        })
    }
}

/// A weight: finite and ≥ 0.
pub(crate) fn check_nonnegative(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(HaloError::InvalidHyperParameter {
            name,
            value,
            reason: "must be finite and >= 0",
        })
    }
}

/// Label smoothing `ε ∈ [0, max]` (`max_inclusive`) or `ε ∈ [0, max)`; `reason` names the range.
pub(crate) fn check_label_smoothing(
    value: f64,
    max: f64,
    max_inclusive: bool,
    reason: &'static str,
) -> Result<()> {
    let below_max = if max_inclusive {
        value <= max
    } else {
        value < max
    };
    if value.is_finite() && value >= 0.0 && below_max {
        Ok(())
    } else {
        Err(HaloError::InvalidHyperParameter {
            name: "label_smoothing",
            value,
            reason,
        })
    }
}

/// Last line of defence on outputs: a finite loss and finite f32 gradients, else `NonFinite`
/// naming `what` (e.g. an ORPO rejected average log-prob so close to 0 that its gradient, of
/// size ~β/|avg|, overflows f32).
pub(crate) fn check_outputs(what: &'static str, loss: f64, grads: &[&[f32]]) -> Result<()> {
    if !loss.is_finite() {
        return Err(HaloError::NonFinite { what, row: 0 });
    }
    for g in grads {
        check_finite(what, g)?;
    }
    Ok(())
}
