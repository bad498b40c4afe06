//! Input checks shared by the losses: lengths, finiteness, hyper-parameter domains. The CUDA
//! losses call the same checks (on their buffers' lengths) so their errors match.

use super::metrics::LossMetrics;
use crate::error::{HaloError, Result};

/// `got.len() == expected`, else `LengthMismatch` naming `what`.
pub(crate) fn check_len<T>(what: &'static str, expected: usize, got: &[T]) -> Result<()> {
    crate::validate::check_len(what, expected, got.len())
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
pub(crate) use crate::validate::check_finite;

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

/// The logged metrics must be finite too: a β near `f64::MAX` passes [`check_positive`] but makes
/// the rewards `β·r` overflow to ±inf (or NaN as `inf − inf` in a margin) while the loss, a
/// saturated sigmoid, stays finite. `NonFinite` names the metric (e.g. `rewards/chosen`).
pub(crate) fn check_metrics(metrics: &LossMetrics) -> Result<()> {
    match metrics.to_named().into_iter().find(|(_, v)| !v.is_finite()) {
        Some((what, _)) => Err(HaloError::NonFinite { what, row: 0 }),
        None => Ok(()),
    }
}

/// The per-example lists of a KTO batch: at least one example (`EmptyBatch("policy_logps")`), then
/// `reference_logps` and `is_desirable` of the same length. Returns the batch size.
pub(crate) fn check_kto_lengths(
    policy_len: usize,
    reference_len: usize,
    desirable_len: usize,
) -> Result<usize> {
    if policy_len == 0 {
        return Err(HaloError::EmptyBatch("policy_logps"));
    }
    crate::validate::check_len("reference_logps", policy_len, reference_len)?;
    crate::validate::check_len("is_desirable", policy_len, desirable_len)?;
    Ok(policy_len)
}

/// The per-pair log-prob lists of a DPO batch: at least one pair
/// (`EmptyBatch("policy_chosen_logps")`), then the other three of the same length. Returns the
/// number of pairs.
pub(crate) fn check_pair_lengths(
    policy_chosen_len: usize,
    policy_rejected_len: usize,
    reference_chosen_len: usize,
    reference_rejected_len: usize,
) -> Result<usize> {
    let n = policy_chosen_len;
    if n == 0 {
        return Err(HaloError::EmptyBatch("policy_chosen_logps"));
    }
    crate::validate::check_len("policy_rejected_logps", n, policy_rejected_len)?;
    crate::validate::check_len("reference_chosen_logps", n, reference_chosen_len)?;
    crate::validate::check_len("reference_rejected_logps", n, reference_rejected_len)?;
    Ok(n)
}

/// Token-count lists, where given, hold one entry per pair.
pub(crate) fn check_count_lengths(
    n: usize,
    chosen_len: Option<usize>,
    rejected_len: Option<usize>,
) -> Result<()> {
    if let Some(len) = chosen_len {
        crate::validate::check_len("chosen_counts", n, len)?;
    }
    if let Some(len) = rejected_len {
        crate::validate::check_len("rejected_counts", n, len)?;
    }
    Ok(())
}

/// IPO length-normalises: both token-count lists must be given (`MissingArgument`, chosen first).
pub(crate) fn ipo_counts<C>(chosen: Option<C>, rejected: Option<C>) -> Result<(C, C)> {
    both_counts(
        chosen,
        rejected,
        "DPO loss type `ipo` (length-normalised log-probs)",
    )
}

/// `sigmoid_norm`'s token counts, both required (`MissingArgument` otherwise).
pub(crate) fn sigmoid_norm_counts<C>(chosen: Option<C>, rejected: Option<C>) -> Result<(C, C)> {
    both_counts(
        chosen,
        rejected,
        "DPO loss type `sigmoid_norm` (length-normalised log-ratios)",
    )
}

/// `sft`'s chosen token counts, required (`MissingArgument` otherwise; the rejected ones are not).
pub(crate) fn sft_counts<C>(chosen: Option<C>) -> Result<C> {
    chosen.ok_or(HaloError::MissingArgument {
        what: "chosen_counts",
        needed_by: "DPO loss type `sft` (the token-mean NLL of the chosen completions)",
    })
}

fn both_counts<C>(
    chosen: Option<C>,
    rejected: Option<C>,
    needed_by: &'static str,
) -> Result<(C, C)> {
    let chosen = chosen.ok_or(HaloError::MissingArgument {
        what: "chosen_counts",
        needed_by,
    })?;
    let rejected = rejected.ok_or(HaloError::MissingArgument {
        what: "rejected_counts",
        needed_by,
    })?;
    Ok((chosen, rejected))
}
