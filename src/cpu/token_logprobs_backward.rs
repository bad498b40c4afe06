//! Backward of [`token_logprobs`](super::token_logprobs): with `p = softmax(z)` recomputed from
//! the saved logsumexp, `∂L/∂z[v] = g · (1[v = y] − p[v])`. Ignored rows get a zero gradient.
//!
//! The in-place form overwrites the logits, which are dead after the backward in a training
//! step: this saves a `[rows, vocab]` buffer (the trick Liger-Kernel uses).

use rayon::prelude::*;

use super::fast_exp::fast_exp;
use super::{check_labels, check_logits_shape, min_rows_per_task};
use crate::dtype::LogitElement;
use crate::error::{HaloError, Result};

/// Writes `∂L/∂logits` into `grad_logits` (same shape and dtype as `logits`).
pub fn token_logprobs_backward<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    lse: &[f32],
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
    grad_logits: &mut [T],
) -> Result<()> {
    let rows = check_backward_args(logits.len(), labels, lse, grad_logp, vocab, ignore_index)?;
    if grad_logits.len() != rows * vocab {
        return Err(HaloError::LengthMismatch {
            what: "grad_logits",
            expected: rows * vocab,
            got: grad_logits.len(),
        });
    }
    if rows == 0 {
        return Ok(());
    }
    logits
        .par_chunks(vocab)
        .zip(grad_logits.par_chunks_mut(vocab))
        .zip(labels.par_iter().zip(lse.par_iter().zip(grad_logp.par_iter())))
        .with_min_len(min_rows_per_task(vocab))
        .for_each(|((z, dz), (&label, (&lse, &g)))| {
            if label == ignore_index {
                dz.fill(T::from_f32(0.0));
            } else {
                for (d, &x) in dz.iter_mut().zip(z) {
                    *d = T::from_f32(-g * fast_exp(x.to_f32() - lse));
                }
                let y = label as usize;
                dz[y] = T::from_f32(g * (1.0 - fast_exp(z[y].to_f32() - lse)));
            }
        });
    Ok(())
}

/// Same as [`token_logprobs_backward`] but overwrites `logits` with the gradient.
pub fn token_logprobs_backward_inplace<T: LogitElement>(
    logits: &mut [T],
    labels: &[i32],
    lse: &[f32],
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
) -> Result<()> {
    let rows = check_backward_args(logits.len(), labels, lse, grad_logp, vocab, ignore_index)?;
    if rows == 0 {
        return Ok(());
    }
    logits
        .par_chunks_mut(vocab)
        .zip(labels.par_iter().zip(lse.par_iter().zip(grad_logp.par_iter())))
        .with_min_len(min_rows_per_task(vocab))
        .for_each(|(z, (&label, (&lse, &g)))| {
            if label == ignore_index {
                z.fill(T::from_f32(0.0));
            } else {
                let y = label as usize;
                let p_y = fast_exp(z[y].to_f32() - lse);
                for x in z.iter_mut() {
                    *x = T::from_f32(-g * fast_exp(x.to_f32() - lse));
                }
                z[y] = T::from_f32(g * (1.0 - p_y));
            }
        });
    Ok(())
}

fn check_backward_args(
    logits_len: usize,
    labels: &[i32],
    lse: &[f32],
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
) -> Result<usize> {
    let rows = check_logits_shape(logits_len, labels.len(), vocab)?;
    for (what, got) in [("lse", lse.len()), ("grad_logp", grad_logp.len())] {
        if got != rows {
            return Err(HaloError::LengthMismatch { what, expected: rows, got });
        }
    }
    check_labels(labels, vocab, ignore_index)?;
    for (what, values) in [("lse", lse), ("grad_logp", grad_logp)] {
        if let Some(row) = values.iter().position(|v| !v.is_finite()) {
            return Err(HaloError::NonFinite { what, row });
        }
    }
    Ok(rows)
}
