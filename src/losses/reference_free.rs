//! Validation and per-pair averaging shared by the reference-free losses (SimPO, ORPO).

use super::pairs::ReferenceFreePairBatch;
use super::validate::{check_counts_positive, check_finite, check_len, check_nonempty};
use crate::error::Result;

/// Checks a [`ReferenceFreePairBatch`]; returns the average (per-token) log-probs
/// `(chosen, rejected)` in f64.
pub(crate) fn average_logps(batch: &ReferenceFreePairBatch<'_>) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = batch.policy_chosen_logps.len();
    check_nonempty("policy_chosen_logps", batch.policy_chosen_logps)?;
    check_len("policy_rejected_logps", n, batch.policy_rejected_logps)?;
    check_len("chosen_counts", n, batch.chosen_counts)?;
    check_len("rejected_counts", n, batch.rejected_counts)?;
    check_finite("policy_chosen_logps", batch.policy_chosen_logps)?;
    check_finite("policy_rejected_logps", batch.policy_rejected_logps)?;
    check_counts_positive("chosen_counts", batch.chosen_counts)?;
    check_counts_positive("rejected_counts", batch.rejected_counts)?;
    let average = |sums: &[f32], counts: &[u32]| -> Vec<f64> {
        sums.iter()
            .zip(counts)
            .map(|(&s, &c)| s as f64 / c as f64)
            .collect()
    };
    Ok((
        average(batch.policy_chosen_logps, batch.chosen_counts),
        average(batch.policy_rejected_logps, batch.rejected_counts),
    ))
}

/// Token-mean negative log-likelihood of the chosen completions over the whole batch,
/// `−Σ_i sum_c_i / Σ_i count_c_i` (TRL's `cross_entropy_loss` on the chosen half, which averages
/// over every non-ignored token), and its gradient `−1 / Σ_i count_c_i` w.r.t. each summed
/// chosen log-prob.
pub(crate) fn chosen_nll(batch: &ReferenceFreePairBatch<'_>) -> (f64, f64) {
    let tokens: f64 = batch.chosen_counts.iter().map(|&c| c as f64).sum();
    let sum: f64 = batch.policy_chosen_logps.iter().map(|&s| s as f64).sum();
    (-sum / tokens, -1.0 / tokens)
}
