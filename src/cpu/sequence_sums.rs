//! Per-sequence masked sums of token values (log-probs or log-ratios) and token counts, for the
//! padded `[batch, seq]` layout and for packed sequences described by `cu_seqlens` offsets.
//!
//! A token counts when its label is not the ignore index. A sequence with no counted token gets
//! sum 0 and count 0; the losses decide whether that is an error (length-normalised ones refuse it).

use crate::error::{HaloError, Result};
use crate::validate::{
    check_counted_finite, check_finite, check_humanline_args, check_len, check_logratio_args,
    try_with_capacity,
};

/// The most sequences one call takes (`2^31 − 1`, as a CUDA grid).
pub const MAX_SEQUENCES: usize = i32::MAX as usize;

/// How the token rows are grouped into sequences (at most [`MAX_SEQUENCES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceLayout<'a> {
    /// `batch` sequences of exactly `seq` rows each, back to back.
    Padded {
        /// Number of sequences.
        batch: usize,
        /// Rows per sequence (prompt and padding rows carry the ignore index).
        seq: usize,
    },
    /// Sequence `i` is rows `cu_seqlens[i]..cu_seqlens[i + 1]` (FlashAttention's varlen convention).
    Packed {
        /// `batch + 1` non-decreasing row offsets, starting at 0 and ending at the row count.
        cu_seqlens: &'a [u32],
    },
}

impl SequenceLayout<'_> {
    /// Number of sequences.
    pub fn batch(&self) -> usize {
        match *self {
            SequenceLayout::Padded { batch, .. } => batch,
            SequenceLayout::Packed { cu_seqlens } => cu_seqlens.len().saturating_sub(1),
        }
    }

    /// Validates the layout against `rows` token rows; returns each sequence's row range.
    pub fn ranges(&self, rows: usize) -> Result<Vec<std::ops::Range<usize>>> {
        self.check_rows(rows)?;
        // `batch * seq` was checked to equal `rows`, but with `seq == 0` `batch` is unbounded.
        let mut ranges = try_with_capacity(self.batch(), "sequences")?;
        match *self {
            SequenceLayout::Padded { batch, seq } => {
                ranges.extend((0..batch).map(|b| b * seq..(b + 1) * seq))
            }
            SequenceLayout::Packed { cu_seqlens } => {
                ranges.extend(cu_seqlens.windows(2).map(|w| w[0] as usize..w[1] as usize))
            }
        }
        Ok(ranges)
    }

    /// Validates the layout against `rows` token rows with the errors of [`Self::ranges`], without
    /// building the ranges (the GPU backend only needs the check); returns the number of sequences.
    pub(crate) fn check_rows(&self, rows: usize) -> Result<usize> {
        // One bound for every backend (the kernels' grid and status words are 32-bit); it also
        // keeps a padded layout of zero-length sequences from asking for an absurd allocation.
        if self.batch() > MAX_SEQUENCES {
            return Err(HaloError::InvalidShape(format!(
                "{} sequences exceed the limit of {MAX_SEQUENCES}",
                self.batch()
            )));
        }
        match *self {
            SequenceLayout::Padded { batch, seq } => {
                // Checked: a wrapped product could match `rows` and then allocate `batch` ranges.
                let expected = batch.checked_mul(seq).ok_or_else(|| {
                    HaloError::InvalidShape(format!(
                        "padded batch {batch} * seq {seq} overflows usize"
                    ))
                })?;
                if expected != rows {
                    return Err(HaloError::LengthMismatch {
                        what: "token rows (padded batch * seq)",
                        expected,
                        got: rows,
                    });
                }
            }
            SequenceLayout::Packed { cu_seqlens } => {
                if cu_seqlens.len() < 2 {
                    return Err(HaloError::InvalidOffsets(format!(
                        "cu_seqlens needs at least 2 entries (one sequence), got {}",
                        cu_seqlens.len()
                    )));
                }
                if cu_seqlens[0] != 0 || *cu_seqlens.last().unwrap() as usize != rows {
                    return Err(HaloError::InvalidOffsets(format!(
                        "cu_seqlens must start at 0 and end at the row count {rows}, got {}..{}",
                        cu_seqlens[0],
                        cu_seqlens.last().unwrap()
                    )));
                }
                if let Some(i) = cu_seqlens.windows(2).position(|w| w[1] < w[0]) {
                    return Err(HaloError::InvalidOffsets(format!(
                        "cu_seqlens decreases at index {}: {} > {}",
                        i + 1,
                        cu_seqlens[i],
                        cu_seqlens[i + 1]
                    )));
                }
            }
        }
        Ok(self.batch())
    }
}

/// Per-sequence sums and token counts.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceSums {
    /// Sum over each sequence's counted tokens (0 for a sequence without any).
    pub sums: Vec<f32>,
    /// Number of counted tokens (labels other than the ignore index) per sequence.
    pub counts: Vec<u32>,
}

/// The "humanline" per-token clamp of the log-ratio (ContextualAI/HALOs): each token's
/// `logp_policy − logp_ref` is clamped to `[min, max]` before summing. Default `[-1, 1.5]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogRatioClamp {
    /// Lower bound of each token's log-ratio (finite, ≤ `max`).
    pub min: f32,
    /// Upper bound of each token's log-ratio (finite).
    pub max: f32,
}

impl Default for LogRatioClamp {
    fn default() -> Self {
        LogRatioClamp {
            min: -1.0,
            max: 1.5,
        }
    }
}

/// Masked per-sequence sums of `token_values` (e.g. per-token log-probs) and token counts.
///
/// Sums accumulate in f64 and round once, so the result does not depend on sequence length or
/// order. Errors: length mismatch, invalid layout, a NaN/±inf value in a counted token
/// (`NonFinite` naming the token row; ignored tokens are not read), or a sum beyond the f32 range
/// (`NonFinite` naming the sequence).
pub fn sequence_sums(
    token_values: &[f32],
    labels: &[i32],
    ignore_index: i32,
    layout: SequenceLayout<'_>,
) -> Result<SequenceSums> {
    check_len("labels", token_values.len(), labels.len())?;
    let ranges = layout.ranges(token_values.len())?;
    check_counted_finite("token_values", token_values, labels, ignore_index)?;
    masked_sums(&ranges, labels, ignore_index, |t| token_values[t] as f64)
}

/// Per-sequence sums of the per-token log-ratio `policy − reference`, optionally clamped per token
/// (humanline). Without a clamp this equals `sequence_sums(policy) − sequence_sums(reference)`.
/// The per-token difference is taken in f64 (exact for f32 inputs), then clamped, then summed.
pub fn sequence_logratio_sums(
    policy_logp: &[f32],
    reference_logp: &[f32],
    labels: &[i32],
    ignore_index: i32,
    layout: SequenceLayout<'_>,
    clamp: Option<LogRatioClamp>,
) -> Result<SequenceSums> {
    check_logratio_args(policy_logp.len(), reference_logp.len(), labels.len(), clamp)?;
    let ranges = layout.ranges(policy_logp.len())?;
    check_counted_finite("policy_logp", policy_logp, labels, ignore_index)?;
    check_counted_finite("reference_logp", reference_logp, labels, ignore_index)?;
    masked_sums(&ranges, labels, ignore_index, |t| {
        let ratio = log_ratio(policy_logp[t], reference_logp[t]);
        match clamp {
            Some(c) => ratio.clamp(c.min as f64, c.max as f64),
            None => ratio,
        }
    })
}

/// Backward of the sums: each counted token of sequence `i` receives `grad_seq[i]`, ignored
/// tokens receive 0. For a length-normalised loss, scale `grad_seq` by `1 / count` first.
pub fn broadcast_sequence_grad(
    grad_seq: &[f32],
    labels: &[i32],
    ignore_index: i32,
    layout: SequenceLayout<'_>,
) -> Result<Vec<f32>> {
    let ranges = layout.ranges(labels.len())?;
    check_len("grad_seq", ranges.len(), grad_seq.len())?;
    check_finite("grad_seq", grad_seq)?;
    let mut token_grad = vec![0.0f32; labels.len()];
    for (range, &g) in ranges.into_iter().zip(grad_seq) {
        for t in range {
            if labels[t] != ignore_index {
                token_grad[t] = g;
            }
        }
    }
    Ok(token_grad)
}

/// Backward through the humanline clamp: zeroes `token_grad` where the clamp was active
/// (the clamped value does not depend on the policy there).
pub fn humanline_grad_mask(
    policy_logp: &[f32],
    reference_logp: &[f32],
    clamp: LogRatioClamp,
    token_grad: &mut [f32],
) -> Result<()> {
    check_humanline_args(
        policy_logp.len(),
        reference_logp.len(),
        token_grad.len(),
        clamp,
    )?;
    for ((g, &p), &r) in token_grad.iter_mut().zip(policy_logp).zip(reference_logp) {
        // Same ratio and comparison as `sequence_logratio_sums`; at the bounds the gradient
        // passes, as in `torch.clamp`'s backward.
        let ratio = log_ratio(p, r);
        if ratio < clamp.min as f64 || ratio > clamp.max as f64 {
            *g = 0.0;
        }
    }
    Ok(())
}

fn masked_sums(
    ranges: &[std::ops::Range<usize>],
    labels: &[i32],
    ignore_index: i32,
    value: impl Fn(usize) -> f64,
) -> Result<SequenceSums> {
    let mut out = SequenceSums {
        sums: try_with_capacity(ranges.len(), "sums")?,
        counts: try_with_capacity(ranges.len(), "counts")?,
    };
    for (index, range) in ranges.iter().enumerate() {
        let (mut sum, mut count) = (0.0f64, 0u32);
        for t in range.clone() {
            if labels[t] != ignore_index {
                sum += value(t);
                count += 1;
            }
        }
        // Finite f32 values can still sum beyond f32::MAX (two of -2e38): refuse, do not store inf.
        let rounded = sum as f32;
        if !rounded.is_finite() {
            return Err(HaloError::NonFinite {
                what: "sequence sum (overflows f32)",
                row: index,
            });
        }
        out.sums.push(rounded);
        out.counts.push(count);
    }
    Ok(out)
}

/// The per-token log-ratio, exact in f64 for f32 inputs.
#[inline]
fn log_ratio(policy: f32, reference: f32) -> f64 {
    policy as f64 - reference as f64
}
