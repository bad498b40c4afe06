//! Per-token log-prob gathering: `logp[r] = z[r, y_r] − logsumexp(z[r, :])`, in one pass per row.
//!
//! The row's logsumexp is kept: the backward recomputes softmax from it instead of storing a
//! `[rows, vocab]` probability matrix. Rows whose label is the ignore index are not read at all;
//! their `logp` and `lse` are 0 (PyTorch's `cross_entropy(ignore_index=-100)` likewise contributes 0).

use rayon::prelude::*;

use super::fast_exp::fast_exp;
use super::{check_labels, check_logits_shape, min_rows_per_task};
use crate::dtype::LogitElement;
use crate::error::{HaloError, Result};

/// Output of [`token_logprobs`]: one entry per row.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// `log softmax(z)[y]`, 0 where the label is ignored. Always ≤ 0.
    pub logp: Vec<f32>,
    /// `logsumexp(z)` per row (0 where ignored), saved for the backward.
    pub lse: Vec<f32>,
}

/// Lanes of the vectorized inner loops.
const LANES: usize = 8;
/// Elements converted to f32 and reduced together; the running max is updated once per chunk.
const CHUNK: usize = 512;

/// Gathers per-token log-probs from `logits` (`[rows, vocab]`, row-major) at `labels` (`[rows]`).
///
/// Errors: a length mismatch, `vocab == 0`, a label outside `0..vocab` that is not
/// `ignore_index`, or a non-ignored row holding NaN or ±inf.
pub fn token_logprobs<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
) -> Result<TokenLogprobs> {
    let rows = labels.len();
    let mut out = TokenLogprobs {
        logp: vec![0.0; rows],
        lse: vec![0.0; rows],
    };
    token_logprobs_into(logits, labels, vocab, ignore_index, &mut out.logp, &mut out.lse)?;
    Ok(out)
}

/// [`token_logprobs`] writing into caller buffers of length `rows`.
pub fn token_logprobs_into<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
    logp: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let rows = check_logits_shape(logits.len(), labels.len(), vocab)?;
    for (what, got) in [("logp", logp.len()), ("lse", lse.len())] {
        if got != rows {
            return Err(HaloError::LengthMismatch { what, expected: rows, got });
        }
    }
    check_labels(labels, vocab, ignore_index)?;
    if rows == 0 {
        return Ok(());
    }

    let first_bad_row = logits
        .par_chunks(vocab)
        .zip(labels.par_iter())
        .zip(logp.par_iter_mut().zip(lse.par_iter_mut()))
        .with_min_len(min_rows_per_task(vocab))
        .enumerate()
        .filter_map(|(row, ((z, &label), (logp, lse)))| {
            if label == ignore_index {
                *logp = 0.0;
                *lse = 0.0;
                return None;
            }
            let (row_lse, finite) = row_logsumexp(z);
            if !finite {
                return Some(row);
            }
            *lse = row_lse;
            // Clamp: rounding can put z[y] a hair above lse when one entry dominates.
            *logp = (z[label as usize].to_f32() - row_lse).min(0.0);
            None
        })
        .min();
    match first_bad_row {
        Some(row) => Err(HaloError::NonFinite { what: "logits", row }),
        None => Ok(()),
    }
}

/// Online logsumexp over one row: per chunk, take the chunk max, rescale the running sum if the
/// max grew, then add `exp(z − max)`. Returns `(lse, row_is_finite)`.
#[inline]
pub(crate) fn row_logsumexp<T: LogitElement>(z: &[T]) -> (f32, bool) {
    let mut running_max = f32::NEG_INFINITY;
    let mut running_sum = 0.0f32;
    // `x − x` is 0 for finite x and NaN for ±inf or NaN: one add per element detects both.
    let mut nan_probe = [0.0f32; LANES];
    let mut buf = [0.0f32; CHUNK];
    for chunk in z.chunks(CHUNK) {
        let buf = &mut buf[..chunk.len()];
        for (b, &x) in buf.iter_mut().zip(chunk) {
            *b = x.to_f32();
        }
        let mut lane_max = [f32::NEG_INFINITY; LANES];
        let mut lanes = buf.chunks_exact(LANES);
        for group in &mut lanes {
            for k in 0..LANES {
                let x = group[k];
                lane_max[k] = if x > lane_max[k] { x } else { lane_max[k] };
                nan_probe[k] += x - x;
            }
        }
        let mut chunk_max = lane_max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &x in lanes.remainder() {
            chunk_max = chunk_max.max(x);
            nan_probe[0] += x - x;
        }
        if chunk_max > running_max {
            // exp(−inf) = 0 handles the first chunk (running_sum is 0 then anyway).
            running_sum *= fast_exp(running_max - chunk_max);
            running_max = chunk_max;
        }
        let mut lane_sum = [0.0f32; LANES];
        let mut lanes = buf.chunks_exact(LANES);
        for group in &mut lanes {
            for k in 0..LANES {
                lane_sum[k] += fast_exp(group[k] - running_max);
            }
        }
        for &x in lanes.remainder() {
            lane_sum[0] += fast_exp(x - running_max);
        }
        running_sum += lane_sum.iter().sum::<f32>();
    }
    let finite = nan_probe.iter().all(|p| *p == 0.0) && running_max.is_finite();
    (running_max + running_sum.ln(), finite)
}
