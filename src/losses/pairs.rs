//! Inputs and outputs shared by the pairwise losses (DPO family, SimPO, ORPO).

use super::metrics::LossMetrics;

/// One batch of preference pairs with a frozen reference model (DPO family). All slices have one
/// entry per pair; log-probs are summed over each completion's tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairBatch<'a> {
    /// Summed policy log-probs of the chosen completions.
    pub policy_chosen_logps: &'a [f32],
    /// Summed policy log-probs of the rejected completions.
    pub policy_rejected_logps: &'a [f32],
    /// Summed reference log-probs of the chosen completions.
    pub reference_chosen_logps: &'a [f32],
    /// Summed reference log-probs of the rejected completions.
    pub reference_rejected_logps: &'a [f32],
    /// Token counts of the chosen completions; required by length-normalised losses (IPO).
    pub chosen_counts: Option<&'a [u32]>,
    /// Token counts of the rejected completions; required by length-normalised losses (IPO).
    pub rejected_counts: Option<&'a [u32]>,
}

/// One batch of preference pairs without a reference model (SimPO, ORPO): summed policy
/// log-probs and token counts (both losses length-normalise, so counts are required, ≥ 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReferenceFreePairBatch<'a> {
    /// Summed policy log-probs of the chosen completions.
    pub policy_chosen_logps: &'a [f32],
    /// Summed policy log-probs of the rejected completions.
    pub policy_rejected_logps: &'a [f32],
    /// Token counts of the chosen completions (≥ 1).
    pub chosen_counts: &'a [u32],
    /// Token counts of the rejected completions (≥ 1).
    pub rejected_counts: &'a [u32],
}

/// Result of a pairwise loss.
#[derive(Debug, Clone, PartialEq)]
pub struct PairLossOutput {
    /// Mean batch loss (f64).
    pub loss: f64,
    /// `∂loss/∂policy_chosen_logps[i]` w.r.t. the SUMMED log-prob (any `1/count` of a
    /// length-normalised loss is already folded in).
    pub grad_chosen: Vec<f32>,
    /// `∂loss/∂policy_rejected_logps[i]`, likewise.
    pub grad_rejected: Vec<f32>,
    /// TRL's logged metrics of the batch.
    pub metrics: LossMetrics,
}
