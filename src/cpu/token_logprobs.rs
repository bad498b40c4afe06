//! Per-token log-prob gathering: `logp[r] = z[r, y_r] − logsumexp(z[r, :])`, in one pass per row.
//!
//! The row's logsumexp is kept (as the f32 `lse` and its rounding residual, see [`SavedLse`]): the
//! backward recomputes softmax from it instead of storing a `[rows, vocab]` probability matrix. Rows whose label is the ignore index are not read at all;
//! their `logp` and `lse` are 0 (PyTorch's `cross_entropy(ignore_index=-100)` likewise contributes 0).

use rayon::prelude::*;

use super::fast_exp::fast_exp;
use super::saved_lse::{split_lse, SavedLse};
// CHUNK: elements converted to f32 and reduced together; the running max is updated once per chunk.
use super::{check_labels, check_logits_shape, has_avx2, load_f32, min_rows_per_task, CHUNK};
use crate::dtype::LogitElement;
use crate::error::{HaloError, Result};
use crate::validate::check_forward_outputs;

/// Output of [`token_logprobs`]: one entry per row.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// `log softmax(z)[y]`, 0 where the label is ignored. Always ≤ 0.
    pub logp: Vec<f32>,
    /// `logsumexp(z)` per row rounded to f32 (0 where ignored), saved for the backward.
    pub lse: Vec<f32>,
    /// `logsumexp(z) − lse` per row: the exact rounding error of `lse` (0 where ignored).
    pub lse_residual: Vec<f32>,
}

impl TokenLogprobs {
    /// What the backward needs: `lse` with its residual.
    pub fn saved_lse(&self) -> SavedLse<&[f32]> {
        SavedLse::new(&self.lse, &self.lse_residual)
    }
}

/// Lanes of the vectorized inner loops.
const LANES: usize = 8;

/// Gathers per-token log-probs from `logits` (`[rows, vocab]`, row-major) at `labels` (`[rows]`).
///
/// Errors: a length mismatch, `vocab == 0`, a label outside `0..vocab` that is not
/// `ignore_index`, or a non-ignored row holding NaN or ±inf (`NonFinite { what: "logits" }`; also
/// for finite logits spread wider than f32, whose log-prob f32 cannot hold).
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
        lse_residual: vec![0.0; rows],
    };
    token_logprobs_into(
        logits,
        labels,
        vocab,
        ignore_index,
        &mut out.logp,
        &mut out.lse,
        &mut out.lse_residual,
    )?;
    Ok(out)
}

/// [`token_logprobs`] writing into caller buffers of length `rows` (the fields of
/// [`TokenLogprobs`]). On error their contents are unspecified (rows before the failing one may
/// have been written).
pub fn token_logprobs_into<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
    logp: &mut [f32],
    lse: &mut [f32],
    lse_residual: &mut [f32],
) -> Result<()> {
    let rows = check_logits_shape(logits.len(), labels.len(), vocab)?;
    check_forward_outputs(rows, logp.len(), lse.len(), lse_residual.len())?;
    check_labels(labels, vocab, ignore_index)?;
    if rows == 0 {
        return Ok(());
    }

    let first_bad_row = logits
        .par_chunks(vocab)
        .zip(labels.par_iter())
        .zip(
            logp.par_iter_mut()
                .zip(lse.par_iter_mut().zip(lse_residual.par_iter_mut())),
        )
        .with_min_len(min_rows_per_task(vocab))
        .enumerate()
        .filter_map(|(row, ((z, &label), (logp, (lse, residual))))| {
            if label == ignore_index {
                *logp = 0.0;
                *lse = 0.0;
                *residual = 0.0;
                return None;
            }
            let (row_max, ln_sum, finite) = row_logsumexp(z);
            if !finite {
                return Some(row);
            }
            (*lse, *residual) = split_lse(row_max, ln_sum);
            // `(z[y] − max) − ln Σ` (PyTorch's log_softmax order), not `z[y] − lse`: with large
            // logits lse rounds to ulp(max) (≈1e-3 at 1e4), which would swamp a small log-prob.
            // `z[y] − max` is exact (Sterbenz) whenever it is small. The clamp guards rounding.
            *logp = ((z[label as usize].to_f32() - row_max) - ln_sum).min(0.0);
            // Finite logits whose spread exceeds f32 (z[y] = -3e38 beside a max of 3e38) give a
            // log-prob beyond f32: refused as non-finite logits rather than stored as -inf.
            if !logp.is_finite() {
                return Some(row);
            }
            None
        })
        .min();
    match first_bad_row {
        Some(row) => Err(HaloError::NonFinite {
            what: "logits",
            row,
        }),
        None => Ok(()),
    }
}

/// Online logsumexp over one row: per chunk, take the chunk max, rescale the running sum if the
/// max grew, then add `exp(z − max)`. Returns `(max, ln Σ exp(z − max), row_is_finite)`;
/// the logsumexp is their sum. Runs the AVX2 build when the CPU has it (same results).
#[inline]
pub(crate) fn row_logsumexp<T: LogitElement>(z: &[T]) -> (f32, f32, bool) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time just above).
        return unsafe { row_logsumexp_avx2(z) };
    }
    row_logsumexp_portable(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_logsumexp_avx2<T: LogitElement>(z: &[T]) -> (f32, f32, bool) {
    row_logsumexp_portable(z)
}

#[inline(always)]
pub(crate) fn row_logsumexp_portable<T: LogitElement>(z: &[T]) -> (f32, f32, bool) {
    let mut running_max = f32::NEG_INFINITY;
    let mut running_sum = 0.0f32;
    // `x · 0` is 0 for finite x and NaN for ±inf or NaN: one multiply-add per element detects both.
    let mut nan_probe = [0.0f32; LANES];
    let mut buf = [0.0f32; CHUNK];
    for chunk in z.chunks(CHUNK) {
        let buf = &mut buf[..chunk.len()];
        load_f32(chunk, buf);
        let mut lane_max = [f32::NEG_INFINITY; LANES];
        let mut lanes = buf.chunks_exact(LANES);
        for group in &mut lanes {
            for k in 0..LANES {
                let x = group[k];
                lane_max[k] = if x > lane_max[k] { x } else { lane_max[k] };
                nan_probe[k] += x * 0.0;
            }
        }
        let mut chunk_max = lane_max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &x in lanes.remainder() {
            chunk_max = chunk_max.max(x);
            nan_probe[0] += x * 0.0;
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
    (running_max, running_sum.ln(), finite)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn values(n: usize) -> Vec<f32> {
        // Deterministic, irregular, never 0: a cheap LCG in [-20, 20).
        let mut s = 0x2545_F491u32;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 40.0 - 20.0 + 1e-3
            })
            .collect()
    }

    fn same_as_portable<T: LogitElement>() {
        // The dispatched build (AVX2 where available) must equal the portable one bit for bit;
        // on an AVX2 machine this is the only test that runs the portable loops.
        for n in [1, 7, 8, 9, 511, 512, 513, 5000] {
            let z: Vec<T> = values(n).into_iter().map(T::from_f32).collect();
            let (m1, s1, f1) = row_logsumexp(&z);
            let (m2, s2, f2) = row_logsumexp_portable(&z);
            assert_eq!(
                (m1.to_bits(), s1.to_bits(), f1),
                (m2.to_bits(), s2.to_bits(), f2)
            );
        }
    }

    #[test]
    fn dispatched_logsumexp_equals_portable() {
        same_as_portable::<f32>();
        same_as_portable::<bf16>();
        same_as_portable::<f16>();
    }
}
