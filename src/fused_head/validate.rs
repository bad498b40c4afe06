//! Argument checks of the fused head, on lengths and host slices: the CPU op defines each check
//! and its error, a CUDA twin calls the same functions (as `crate::validate` for the token ops).

use super::LmHead;
use crate::dtype::LogitElement;
use crate::error::{HaloError, Result};
use crate::validate::{check_labels, check_len};

/// Shapes of hidden `[rows, H]`, weight `[V, H]`, bias `[V]` and labels `[rows]`; returns `rows`.
pub(crate) fn check_head_args<T>(
    hidden_len: usize,
    head: &LmHead<'_, T>,
    labels: &[i32],
    ignore_index: i32,
) -> Result<usize> {
    check_head_shapes(
        hidden_len,
        HeadShape {
            vocab: head.vocab,
            hidden_size: head.hidden_size,
            weight_len: head.weight.len(),
            bias_len: head.bias.map(<[T]>::len),
        },
        labels,
        ignore_index,
    )
}

/// The lengths of an LM head's buffers, wherever they live (host slices or device buffers): what
/// [`check_head_shapes`] checks, for the CPU and the CUDA fused heads alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadShape {
    pub vocab: usize,
    pub hidden_size: usize,
    pub weight_len: usize,
    pub bias_len: Option<usize>,
}

/// [`check_head_args`] on lengths only; returns `rows`.
pub(crate) fn check_head_shapes(
    hidden_len: usize,
    head: HeadShape,
    labels: &[i32],
    ignore_index: i32,
) -> Result<usize> {
    if head.vocab == 0 {
        return Err(HaloError::InvalidShape("vocab must be at least 1".into()));
    }
    if head.hidden_size == 0 {
        return Err(HaloError::InvalidShape(
            "hidden_size must be at least 1".into(),
        ));
    }
    let product = |a: usize, b: usize, what: &str| {
        a.checked_mul(b)
            .ok_or_else(|| HaloError::InvalidShape(format!("{what} {a} * {b} overflows usize")))
    };
    let rows = labels.len();
    check_len(
        "hidden",
        product(rows, head.hidden_size, "rows * hidden_size")?,
        hidden_len,
    )?;
    check_len(
        "weight",
        product(head.vocab, head.hidden_size, "vocab * hidden_size")?,
        head.weight_len,
    )?;
    if let Some(bias_len) = head.bias_len {
        check_len("bias", head.vocab, bias_len)?;
    }
    check_labels(labels, head.vocab, ignore_index)?;
    Ok(rows)
}

/// The error for a non-finite logit at `row`: names the input that holds the non-finite value
/// (hidden row, weight row, bias entry), found only on this error path, or else the logits (finite
/// inputs whose product overflowed f32).
pub(crate) fn non_finite_error<T: LogitElement>(
    hidden: &[T],
    head: &LmHead<'_, T>,
    row: usize,
) -> HaloError {
    let h = head.hidden_size;
    let finite = |x: &T| x.to_f32().is_finite();
    if !hidden[row * h..(row + 1) * h].iter().all(finite) {
        return HaloError::NonFinite {
            what: "hidden",
            row,
        };
    }
    if let Some(i) = head.weight.iter().position(|x| !finite(x)) {
        return HaloError::NonFinite {
            what: "weight",
            row: i / h,
        };
    }
    if let Some(i) = head.bias.and_then(|b| b.iter().position(|x| !finite(x))) {
        return HaloError::NonFinite {
            what: "bias",
            row: i,
        };
    }
    HaloError::NonFinite {
        what: "logits (hidden · weightᵀ + bias)",
        row,
    }
}
