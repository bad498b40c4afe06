//! Regression tests of issue 15 ("nothing aborts, no silent NaN") for the core outside the token
//! backward, and of what the fuzz targets (`tests/fuzz_core.rs`) found. Each test names the case it
//! guards. (Already guarded elsewhere: `Padded { batch: 2^34 | usize::MAX, seq: 0 }` in the
//! sequence ops — `device_sequence_sums::absurd_padded_batches_are_errors_not_aborts`, on every
//! device; the `ReferencePointPartial::merge` count overflow —
//! `losses_kto::merging_partials_refuses_a_count_overflow`.)

use halo_kernels::cpu::{sequence_logratio_sums, sequence_sums, SequenceLayout};
use halo_kernels::losses::{
    dpo_loss, kto_loss, orpo_loss, simpo_loss, DpoConfig, DpoLossType, KlInput, KtoBatch,
    KtoConfig, KtoLossType, OrpoConfig, PairBatch, ReferenceFreePairBatch, ReferencePointPartial,
    SimpoConfig,
};
use halo_kernels::step::{self, KtoStepInputs, Logits, PairReference, TokenLogps};
use halo_kernels::{HaloError, IGNORE_INDEX};

/// Every output of an accepted call must be finite: the value, or the error it gave.
fn assert_non_finite_error<T: std::fmt::Debug>(result: halo_kernels::Result<T>, what: &str) {
    match result {
        Err(HaloError::NonFinite { what: got, .. }) => {
            assert!(
                got.contains(what),
                "expected `{what}` in the error, got `{got}`"
            )
        }
        other => panic!("expected NonFinite naming {what}, got {other:?}"),
    }
}

// ---- sequence sums beyond f32 (found by fuzz_sequence_ops_cpu) ----

/// Two finite log-probs of −2e38 sum to −4e38, beyond f32: the sum was stored as −inf.
#[test]
fn sequence_sum_beyond_f32_is_an_error_not_inf() {
    let labels = [1, 2, IGNORE_INDEX, 3];
    let layout = SequenceLayout::Padded { batch: 2, seq: 2 };
    let values = [-2e38f32, -2e38, 5.0, -1.0];
    assert_non_finite_error(
        sequence_sums(&values, &labels, IGNORE_INDEX, layout),
        "overflows f32",
    );
    // The error names the sequence (0), not a token.
    match sequence_sums(&values, &labels, IGNORE_INDEX, layout) {
        Err(HaloError::NonFinite { row, .. }) => assert_eq!(row, 0),
        other => panic!("{other:?}"),
    }
    // Large sums that fit are exact to one f32 rounding of the f64 sum.
    let fits = [-1.5e38f32, -1.5e38, 5.0, -1.0];
    let out = sequence_sums(&fits, &labels, IGNORE_INDEX, layout).unwrap();
    assert_eq!(out.sums, vec![(-3e38f64) as f32, -1.0]);
    assert_eq!(out.counts, vec![2, 1]);
}

/// The log-ratio `policy − reference` of finite values can exceed f32 once summed (or even per
/// token: 3e38 − (−3e38)); without a clamp the sum was stored as +inf.
#[test]
fn sequence_logratio_sum_beyond_f32_is_an_error_not_inf() {
    let labels = [0, 0];
    let layout = SequenceLayout::Packed {
        cu_seqlens: &[0, 2],
    };
    let out = sequence_logratio_sums(
        &[3e38, 1.0],
        &[-3e38, 0.0],
        &labels,
        IGNORE_INDEX,
        layout,
        None,
    );
    assert_non_finite_error(out, "overflows f32");
    // With the humanline clamp the per-token ratios are bounded and the sum is finite.
    let clamped = sequence_logratio_sums(
        &[3e38, 1.0],
        &[-3e38, 0.0],
        &labels,
        IGNORE_INDEX,
        layout,
        Some(Default::default()),
    )
    .unwrap();
    assert_eq!(clamped.sums, vec![1.5 + 1.0]);
}

// ---- loss metrics that overflow (found by fuzz_kto_loss, fuzz_dpo_loss, fuzz_orpo_simpo_loss) ----

/// β = f64::MAX passes `β > 0, finite`, the saturated losses stay finite, but the logged rewards
/// β·r were ±inf (and their margin NaN).
#[test]
fn huge_beta_gives_an_error_not_infinite_rewards() {
    let policy = [-5.0f32, -7.0];
    let reference = [-6.0f32, -6.5];
    for loss_type in [KtoLossType::Kto, KtoLossType::ApoZeroUnpaired] {
        let batch = KtoBatch {
            policy_logps: &policy,
            reference_logps: &reference,
            is_desirable: &[true, false],
            kl: Some(KlInput::LogProbs {
                policy: &[-6.0, -6.0],
                reference: &[-6.0, -6.0],
            }),
        };
        let config = KtoConfig {
            beta: f64::MAX,
            loss_type,
            ..KtoConfig::default()
        };
        assert_non_finite_error(kto_loss(&config, &batch), "rewards/");
        // An ordinary β on the same batch is fine.
        let ok = kto_loss(
            &KtoConfig {
                beta: 0.1,
                ..config
            },
            &batch,
        )
        .unwrap();
        assert!(ok.metrics.rewards_chosen.unwrap().is_finite());
    }
    let pair = PairBatch {
        policy_chosen_logps: &[-5.0],
        policy_rejected_logps: &[-7.0],
        reference_chosen_logps: &[-6.0],
        reference_rejected_logps: &[-6.5],
        chosen_counts: Some(&[3]),
        rejected_counts: Some(&[4]),
    };
    for loss_type in [
        DpoLossType::Sigmoid,
        DpoLossType::Robust,
        DpoLossType::Hinge,
        DpoLossType::Ipo,
        DpoLossType::ApoZero,
    ] {
        let config = DpoConfig {
            beta: f64::MAX,
            label_smoothing: 0.0,
            loss_type,
            ..DpoConfig::default()
        };
        // IPO's and hinge's loss (β², or 1/β terms) overflow first: any NonFinite will do.
        assert_non_finite_error(dpo_loss(&config, &pair), "");
    }
    let free = ReferenceFreePairBatch {
        policy_chosen_logps: &[-5.0],
        policy_rejected_logps: &[-7.0],
        chosen_counts: &[3],
        rejected_counts: &[4],
    };
    let simpo = SimpoConfig {
        beta: f64::MAX,
        ..SimpoConfig::default()
    };
    assert_non_finite_error(simpo_loss(&simpo, &free), "rewards/");
}

/// ORPO with an average chosen log-prob of exactly 0 (probability 1): loss and gradients are
/// finite limits (`losses_simpo_orpo::orpo_chosen_certain_is_finite_with_limit_gradient`), but the
/// chosen log-odds `log(p / (1 − p))` are +inf; the metric was returned as +inf, now `None`.
#[test]
fn orpo_chosen_log_odds_at_probability_one_is_none_not_inf() {
    let free = ReferenceFreePairBatch {
        policy_chosen_logps: &[0.0],
        policy_rejected_logps: &[-7.0],
        chosen_counts: &[3],
        rejected_counts: &[4],
    };
    let out = orpo_loss(&OrpoConfig::default(), &free).unwrap();
    assert_eq!(out.metrics.log_odds_chosen, None);
    assert!(out.metrics.to_named().iter().all(|(_, v)| v.is_finite()));
    // Slightly below 0 the log-odds are large but finite: the mean of
    // `log(p/(1−p)) = a − log(1 − e^a)` of chosen minus rejected averages.
    let near = ReferenceFreePairBatch {
        policy_chosen_logps: &[-1e-7],
        ..free
    };
    let out = orpo_loss(&OrpoConfig::default(), &near).unwrap();
    let log_odds = |a: f64| a - (-a.exp_m1()).ln();
    let want = log_odds(-1e-7f32 as f64 / 3.0) - log_odds(-7.0 / 4.0);
    let got = out.metrics.log_odds_chosen.unwrap();
    assert!((got - want).abs() < 1e-9 * want.abs(), "{got} vs {want}");
}

/// A partial whose sum overflows f64 when merged (f64::MAX + f64::MAX = inf) gives an error from
/// `z0`, not an infinite reference point.
#[test]
fn merged_partial_sum_overflow_is_an_error() {
    let big = ReferencePointPartial {
        sum: f64::MAX,
        count: 1,
    };
    let merged = big.merge(big).unwrap();
    assert_non_finite_error(merged.z0(), "reference point");
}

// ---- absurd layouts through the step helpers (issue 15: Padded { 2^34, 0 } aborted) ----

/// The step helpers pass the layout to the sequence ops: zero rows in 2^34 or usize::MAX empty
/// sequences must be an `InvalidShape` error there too, not an allocation abort or a panic.
#[test]
fn step_helpers_refuse_absurd_padded_batches() {
    for batch in [1usize << 34, usize::MAX, usize::MAX / 2 + 1] {
        let layout = SequenceLayout::Padded { batch, seq: 0 };
        let logits = Logits::<f32> {
            logits: &[],
            labels: &[],
            vocab: 5,
            ignore_index: IGNORE_INDEX,
            layout,
        };
        let inputs = KtoStepInputs {
            reference_logps: &[],
            is_desirable: &[],
            kl: Some(KlInput::Partial(ReferencePointPartial {
                sum: 0.0,
                count: 1,
            })),
        };
        let kto = step::kto_step(&KtoConfig::default(), &logits, &inputs);
        assert!(
            matches!(kto, Err(HaloError::InvalidShape(_))),
            "kto_step, batch {batch}: {kto:?}"
        );
        let reference = PairReference {
            chosen_logps: &[],
            rejected_logps: &[],
        };
        let dpo = step::dpo_step(&DpoConfig::default(), &logits, &reference);
        assert!(
            matches!(dpo, Err(HaloError::InvalidShape(_))),
            "dpo_step, batch {batch}: {dpo:?}"
        );
        let tokens = TokenLogps {
            logps: &[],
            labels: &[],
            ignore_index: IGNORE_INDEX,
            layout,
        };
        let kto = step::kto_step_tokens(&KtoConfig::default(), &tokens, &inputs);
        assert!(
            matches!(kto, Err(HaloError::InvalidShape(_))),
            "kto_step_tokens, batch {batch}: {kto:?}"
        );
    }
}
