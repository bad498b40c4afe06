//! Argument checks shared by the two backends (CPU, CUDA — real or emulated) of the token and sequence
//! ops: the CPU op defines each check and its error; the CUDA twins call the same
//! function (on lengths, where their buffers live on the device), so their errors cannot drift.
//! The checks that read values (labels, finiteness) run on host slices.

use crate::cpu::LogRatioClamp;
use crate::error::{HaloError, Result};

/// `got == expected`, else `LengthMismatch` naming `what`.
/// An empty vector with room for `len` elements, or an error naming `what` when that much memory
/// cannot be had: sizes that come from arguments (a padded layout of 2^40 empty sequences) must
/// not abort the process.
pub(crate) fn try_with_capacity<T>(len: usize, what: &'static str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        HaloError::InvalidShape(format!(
            "cannot allocate {len} elements of {} bytes for `{what}`",
            std::mem::size_of::<T>()
        ))
    })?;
    Ok(v)
}

pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(HaloError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

/// Every value finite, else `NonFinite` naming `what` at the first bad index.
pub(crate) fn check_finite(what: &'static str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(row) => Err(HaloError::NonFinite { what, row }),
        None => Ok(()),
    }
}

/// Values of counted tokens (label not `ignore_index`) must be finite; ignored tokens are not
/// read. `NonFinite` names `what` and the first bad row.
pub(crate) fn check_counted_finite(
    what: &'static str,
    values: &[f32],
    labels: &[i32],
    ignore_index: i32,
) -> Result<()> {
    match values
        .iter()
        .zip(labels)
        .position(|(v, &y)| y != ignore_index && !v.is_finite())
    {
        Some(row) => Err(HaloError::NonFinite { what, row }),
        None => Ok(()),
    }
}

// ---- token ops: `[rows, vocab]` logits and `[rows]` labels --------------------------------------

/// Checks `logits.len() == rows * vocab` and `labels.len() == rows`; returns `rows`.
pub(crate) fn check_logits_shape(
    logits_len: usize,
    labels_len: usize,
    vocab: usize,
) -> Result<usize> {
    if vocab == 0 {
        return Err(HaloError::InvalidShape("vocab must be at least 1".into()));
    }
    let rows = labels_len;
    // Checked: a wrapped product could match a short `logits` and silently skip rows.
    let expected = rows.checked_mul(vocab).ok_or_else(|| {
        HaloError::InvalidShape(format!("rows {rows} * vocab {vocab} overflows usize"))
    })?;
    if logits_len != expected {
        return Err(HaloError::LengthMismatch {
            what: "logits",
            expected,
            got: logits_len,
        });
    }
    Ok(rows)
}

/// Every label must be the ignore index or a valid vocabulary id.
pub(crate) fn check_labels(labels: &[i32], vocab: usize, ignore_index: i32) -> Result<()> {
    match labels
        .iter()
        .position(|&y| y != ignore_index && (y < 0 || y as usize >= vocab))
    {
        Some(row) => Err(label_out_of_range(row, labels[row], vocab, ignore_index)),
        None => Ok(()),
    }
}

/// The error for the bad label `label` at `row`.
pub(crate) fn label_out_of_range(
    row: usize,
    label: i32,
    vocab: usize,
    ignore_index: i32,
) -> HaloError {
    HaloError::LabelOutOfRange {
        row,
        label: label as i64,
        vocab,
        ignore_index: ignore_index as i64,
    }
}

/// The forward's outputs `logp`, `lse` and `lse_residual` hold one entry per row.
pub(crate) fn check_forward_outputs(
    rows: usize,
    logp_len: usize,
    lse_len: usize,
    residual_len: usize,
) -> Result<()> {
    check_len("logp", rows, logp_len)?;
    check_len("lse", rows, lse_len)?;
    check_len("lse_residual", rows, residual_len)
}

/// The backward's per-row inputs `lse` (and its residual, if given) and `grad_logp` hold one entry
/// per row.
pub(crate) fn check_backward_inputs(
    rows: usize,
    lse_len: usize,
    residual_len: Option<usize>,
    grad_logp_len: usize,
) -> Result<()> {
    check_len("lse", rows, lse_len)?;
    if let Some(len) = residual_len {
        check_len("lse_residual", rows, len)?;
    }
    check_len("grad_logp", rows, grad_logp_len)
}

/// The saved lse of counted rows must be finite, its residual too (if given): `NonFinite` names
/// `"lse"` and the first row where either is not.
pub(crate) fn check_counted_lse(
    lse: &[f32],
    residual: Option<&[f32]>,
    labels: &[i32],
    ignore_index: i32,
) -> Result<()> {
    let bad = |row: usize| {
        labels[row] != ignore_index
            && !(lse[row].is_finite() && residual.is_none_or(|r| r[row].is_finite()))
    };
    match (0..labels.len()).find(|&row| bad(row)) {
        Some(row) => Err(HaloError::NonFinite { what: "lse", row }),
        None => Ok(()),
    }
}

/// The backward's output `grad_logits` has the logits' shape, `rows * vocab`.
pub(crate) fn check_grad_logits(rows: usize, vocab: usize, grad_logits_len: usize) -> Result<()> {
    check_len("grad_logits", rows * vocab, grad_logits_len)
}

// ---- sequence ops ------------------------------------------------------------------------------

/// A humanline clamp needs finite `min <= max`.
pub(crate) fn check_clamp(clamp: Option<LogRatioClamp>) -> Result<()> {
    match clamp {
        Some(c) if !c.min.is_finite() || !c.max.is_finite() || c.min > c.max => {
            Err(HaloError::InvalidHyperParameter {
                name: "LogRatioClamp",
                value: c.min as f64,
                reason: "needs finite min <= max",
            })
        }
        _ => Ok(()),
    }
}

/// `sequence_logratio_sums`: both log-prob lists and the labels have one entry per token, and the
/// clamp (if any) is valid — in this order.
pub(crate) fn check_logratio_args(
    policy_len: usize,
    reference_len: usize,
    labels_len: usize,
    clamp: Option<LogRatioClamp>,
) -> Result<()> {
    check_len("reference_logp", policy_len, reference_len)?;
    check_len("labels", policy_len, labels_len)?;
    check_clamp(clamp)
}

/// `humanline_grad_mask`: the three per-token lists agree in length and the clamp is valid.
pub(crate) fn check_humanline_args(
    policy_len: usize,
    reference_len: usize,
    token_grad_len: usize,
    clamp: LogRatioClamp,
) -> Result<()> {
    check_len("reference_logp", policy_len, reference_len)?;
    check_len("token_grad", policy_len, token_grad_len)?;
    check_clamp(Some(clamp))
}
