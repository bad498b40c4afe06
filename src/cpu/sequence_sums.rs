//! Per-sequence masked sums of token values (log-probs or log-ratios) and token counts, for the
//! padded `[batch, seq]` layout and for packed sequences described by `cu_seqlens` offsets.
//!
//! A token counts when its label is not the ignore index. A sequence with no counted token gets
//! sum 0 and count 0; the losses decide whether that is an error (length-normalised ones refuse it).

use crate::error::{HaloError, Result};

/// How the token rows are grouped into sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceLayout<'a> {
    /// `batch` sequences of exactly `seq` rows each, back to back.
    Padded { batch: usize, seq: usize },
    /// Sequence `i` is rows `cu_seqlens[i]..cu_seqlens[i + 1]` (FlashAttention's varlen convention).
    Packed { cu_seqlens: &'a [u32] },
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
        match *self {
            SequenceLayout::Padded { batch, seq } => {
                if batch * seq != rows {
                    return Err(HaloError::LengthMismatch {
                        what: "token rows (padded batch * seq)",
                        expected: batch * seq,
                        got: rows,
                    });
                }
                Ok((0..batch).map(|b| b * seq..(b + 1) * seq).collect())
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
                Ok(cu_seqlens
                    .windows(2)
                    .map(|w| w[0] as usize..w[1] as usize)
                    .collect())
            }
        }
    }
}

/// Per-sequence sums and token counts.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceSums {
    pub sums: Vec<f32>,
    pub counts: Vec<u32>,
}

/// The "humanline" per-token clamp of the log-ratio (ContextualAI/HALOs): each token's
/// `logp_policy − logp_ref` is clamped to `[min, max]` before summing. Default `[-1, 1.5]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogRatioClamp {
    pub min: f32,
    pub max: f32,
}

impl Default for LogRatioClamp {
    fn default() -> Self {
        LogRatioClamp { min: -1.0, max: 1.5 }
    }
}

/// Masked per-sequence sums of `token_values` (e.g. per-token log-probs) and token counts.
pub fn sequence_sums(
    token_values: &[f32],
    labels: &[i32],
    ignore_index: i32,
    layout: SequenceLayout<'_>,
) -> Result<SequenceSums> {
    check_len("labels", token_values.len(), labels.len())?;
    let ranges = layout.ranges(token_values.len())?;
    Ok(masked_sums(&ranges, labels, ignore_index, |t| token_values[t]))
}

/// Per-sequence sums of the per-token log-ratio `policy − reference`, optionally clamped per token
/// (humanline). Without a clamp this equals `sequence_sums(policy) − sequence_sums(reference)`.
pub fn sequence_logratio_sums(
    policy_logp: &[f32],
    reference_logp: &[f32],
    labels: &[i32],
    ignore_index: i32,
    layout: SequenceLayout<'_>,
    clamp: Option<LogRatioClamp>,
) -> Result<SequenceSums> {
    check_len("reference_logp", policy_logp.len(), reference_logp.len())?;
    check_len("labels", policy_logp.len(), labels.len())?;
    check_clamp(clamp)?;
    let ranges = layout.ranges(policy_logp.len())?;
    Ok(masked_sums(&ranges, labels, ignore_index, |t| {
        let ratio = policy_logp[t] - reference_logp[t];
        match clamp {
            Some(c) => ratio.clamp(c.min, c.max),
            None => ratio,
        }
    }))
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
    check_len("reference_logp", policy_logp.len(), reference_logp.len())?;
    check_len("token_grad", policy_logp.len(), token_grad.len())?;
    check_clamp(Some(clamp))?;
    for ((g, &p), &r) in token_grad.iter_mut().zip(policy_logp).zip(reference_logp) {
        let ratio = p - r;
        if ratio < clamp.min || ratio > clamp.max {
            *g = 0.0;
        }
    }
    Ok(())
}

fn masked_sums(
    ranges: &[std::ops::Range<usize>],
    labels: &[i32],
    ignore_index: i32,
    value: impl Fn(usize) -> f32,
) -> SequenceSums {
    let mut out = SequenceSums {
        sums: Vec::with_capacity(ranges.len()),
        counts: Vec::with_capacity(ranges.len()),
    };
    for range in ranges {
        let (mut sum, mut count) = (0.0f32, 0u32);
        for t in range.clone() {
            if labels[t] != ignore_index {
                sum += value(t);
                count += 1;
            }
        }
        out.sums.push(sum);
        out.counts.push(count);
    }
    out
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(HaloError::LengthMismatch { what, expected, got })
    }
}

fn check_clamp(clamp: Option<LogRatioClamp>) -> Result<()> {
    match clamp {
        Some(c) if !(c.min <= c.max) || !c.min.is_finite() || !c.max.is_finite() => {
            Err(HaloError::InvalidHyperParameter {
                name: "LogRatioClamp",
                value: c.min as f64,
                reason: "needs finite min <= max",
            })
        }
        _ => Ok(()),
    }
}
