//! Token-level ops on host slices: the CPU twin of every kernel in `kernels/`.
//! Rows run in parallel with rayon; inner loops work on fixed 8-wide lanes so LLVM vectorizes them.

pub mod fast_exp;
pub mod sequence_sums;
pub mod token_logprobs;
pub mod token_logprobs_backward;

pub use sequence_sums::{
    broadcast_sequence_grad, humanline_grad_mask, sequence_logratio_sums, sequence_sums,
    LogRatioClamp, SequenceLayout, SequenceSums,
};
pub use token_logprobs::{token_logprobs, token_logprobs_into, TokenLogprobs};
pub use token_logprobs_backward::{token_logprobs_backward, token_logprobs_backward_inplace};

use crate::error::{HaloError, Result};

/// Rows below this many logits are grouped so rayon's per-task overhead stays small.
pub(crate) fn min_rows_per_task(vocab: usize) -> usize {
    (16 * 1024 / vocab.max(1)).max(1)
}

/// Checks `logits.len() == rows * vocab` and `labels.len() == rows`; returns `rows`.
pub(crate) fn check_logits_shape(logits_len: usize, labels_len: usize, vocab: usize) -> Result<usize> {
    if vocab == 0 {
        return Err(HaloError::InvalidShape("vocab must be at least 1".into()));
    }
    let rows = labels_len;
    if logits_len != rows * vocab {
        return Err(HaloError::LengthMismatch {
            what: "logits",
            expected: rows * vocab,
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
        Some(row) => Err(HaloError::LabelOutOfRange {
            row,
            label: labels[row] as i64,
            vocab,
            ignore_index: ignore_index as i64,
        }),
        None => Ok(()),
    }
}
