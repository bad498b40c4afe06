//! The per-batch metrics every loss reports, named as TRL logs them.
//!
//! A metric is `None` when the batch holds no example of its kind (e.g. `rewards_chosen` in an
//! all-undesirable KTO batch), or when the loss does not define it (e.g. `kl` for DPO). Values are
//! f64 means over the examples of this batch. For an all-reduce across devices, weight each mean
//! by [`LossMetrics::chosen_count`] / [`LossMetrics::rejected_count`] (TRL's KTO logs sums and
//! counts for the same reason).

/// Metrics of one loss call. See the module documentation for `None`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossMetrics {
    /// `rewards/chosen`: mean of the chosen (desirable) rewards, e.g. `β·(π − ref)`.
    pub rewards_chosen: Option<f64>,
    /// `rewards/rejected`: mean of the rejected (undesirable) rewards.
    pub rewards_rejected: Option<f64>,
    /// `rewards/margins`: `rewards_chosen − rewards_rejected` (for pairs, the mean per-pair margin,
    /// which is the same number).
    pub rewards_margins: Option<f64>,
    /// `rewards/accuracies`: fraction of pairs whose chosen reward is strictly above the rejected
    /// one (pairwise losses only).
    pub rewards_accuracies: Option<f64>,
    /// `logps/chosen`: mean policy log-prob of the chosen sequences (summed over tokens, or
    /// averaged per token where the loss length-normalises).
    pub logps_chosen: Option<f64>,
    /// `logps/rejected`: the same over rejected sequences.
    pub logps_rejected: Option<f64>,
    /// `kl`: the KTO reference point `z0` actually used (0 for `apo_zero_unpaired`).
    pub kl: Option<f64>,
    /// `nll_loss`: the token-mean negative log-likelihood of the chosen sequences (ORPO; SimPO
    /// when its `nll_weight` is non-zero).
    pub nll_loss: Option<f64>,
    /// `log_odds_ratio`: ORPO's mean `log σ(log_odds)`.
    pub log_odds_ratio: Option<f64>,
    /// `log_odds_chosen`: ORPO's mean `log_odds`; `None` when a chosen completion has probability 1
    /// (its log-odds are +inf).
    pub log_odds_chosen: Option<f64>,
    /// Number of chosen (desirable) examples the chosen means are over.
    pub chosen_count: u64,
    /// Number of rejected (undesirable) examples the rejected means are over.
    pub rejected_count: u64,
}

impl LossMetrics {
    /// The metrics that are present, as `(TRL name, value)` pairs, in a fixed order.
    pub fn to_named(&self) -> Vec<(&'static str, f64)> {
        [
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/margins", self.rewards_margins),
            ("rewards/accuracies", self.rewards_accuracies),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
            ("kl", self.kl),
            ("nll_loss", self.nll_loss),
            ("log_odds_ratio", self.log_odds_ratio),
            ("log_odds_chosen", self.log_odds_chosen),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| (name, v)))
        .collect()
    }
}

/// Mean of `values`, `None` when empty.
pub(crate) fn mean_of(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .fold((0.0f64, 0u64), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Pairwise metrics shared by DPO, SimPO and ORPO: per-pair rewards and policy log-probs.
pub(crate) fn pair_metrics(
    chosen_rewards: &[f64],
    rejected_rewards: &[f64],
    chosen_logps: &[f64],
    rejected_logps: &[f64],
) -> LossMetrics {
    let n = chosen_rewards.len() as u64;
    LossMetrics {
        rewards_chosen: mean_of(chosen_rewards.iter().copied()),
        rewards_rejected: mean_of(rejected_rewards.iter().copied()),
        rewards_margins: mean_of(
            chosen_rewards
                .iter()
                .zip(rejected_rewards)
                .map(|(c, r)| c - r),
        ),
        rewards_accuracies: mean_of(chosen_rewards.iter().zip(rejected_rewards).map(|(c, r)| {
            if c > r {
                1.0
            } else {
                0.0
            }
        })),
        logps_chosen: mean_of(chosen_logps.iter().copied()),
        logps_rejected: mean_of(rejected_logps.iter().copied()),
        chosen_count: n,
        rejected_count: n,
        ..LossMetrics::default()
    }
}
