//! Property tests (proptest) of the CPU token ops: invariants that hold for every input, checked
//! on random shapes, scales and ignore patterns.

mod common;

use common::*;
use halo_kernels::cpu::{
    sequence_logratio_sums, sequence_sums, token_logprobs, token_logprobs_backward, LogRatioClamp,
    SequenceLayout,
};
use halo_kernels::IGNORE_INDEX;
use proptest::prelude::*;

/// A random batch of logits: shape, scale (up to ±1e4-ish magnitudes), ignored fraction, seed.
#[derive(Debug, Clone)]
struct Batch {
    rows: usize,
    vocab: usize,
    logits: Vec<f32>,
    labels: Vec<i32>,
}

fn batch() -> impl Strategy<Value = Batch> {
    (
        1usize..9,
        1usize..300,
        0.01f64..3000.0,
        0.0f64..0.6,
        any::<u64>(),
    )
        .prop_map(|(rows, vocab, scale, ignored, seed)| {
            let mut rng = rng(seed);
            Batch {
                rows,
                vocab,
                logits: random_logits(rows, vocab, scale, &mut rng),
                labels: random_labels(rows, vocab, ignored, IGNORE_INDEX, &mut rng),
            }
        })
}

/// Per-token log-probs of a few packed sequences (some empty) with random ignored tokens.
#[derive(Debug, Clone)]
struct Tokens {
    policy: Vec<f32>,
    reference: Vec<f32>,
    labels: Vec<i32>,
    cu_seqlens: Vec<u32>,
}

fn tokens() -> impl Strategy<Value = Tokens> {
    (
        prop::collection::vec(0u32..20, 1..8),
        0.0f64..1.0,
        any::<u64>(),
    )
        .prop_map(|(lengths, ignored, seed)| {
            let mut rng = rng(seed);
            let mut cu_seqlens = vec![0u32];
            for len in lengths {
                cu_seqlens.push(cu_seqlens.last().unwrap() + len);
            }
            let n = *cu_seqlens.last().unwrap() as usize;
            Tokens {
                policy: random_values(n, -30.0, -1e-4, &mut rng),
                reference: random_values(n, -30.0, -1e-4, &mut rng),
                labels: random_labels(n, 100, ignored, IGNORE_INDEX, &mut rng),
                cu_seqlens,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn logprobs_are_finite_and_not_positive(b in batch()) {
        let out = token_logprobs(&b.logits, &b.labels, b.vocab, IGNORE_INDEX).unwrap();
        for r in 0..b.rows {
            prop_assert!(out.logp[r].is_finite() && out.logp[r] <= 0.0, "row {r}: {}", out.logp[r]);
            prop_assert!(out.lse[r].is_finite());
            if b.labels[r] != IGNORE_INDEX {
                // logsumexp ≥ max and ≥ the label's logit.
                let row = &b.logits[r * b.vocab..(r + 1) * b.vocab];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(out.lse[r] >= max);
            }
        }
    }

    #[test]
    fn softmax_from_lse_sums_to_one(b in batch()) {
        let out = token_logprobs(&b.logits, &b.labels, b.vocab, IGNORE_INDEX).unwrap();
        for r in (0..b.rows).filter(|&r| b.labels[r] != IGNORE_INDEX) {
            let row = &b.logits[r * b.vocab..(r + 1) * b.vocab];
            let lse = out.lse[r] as f64;
            let total: f64 = row.iter().map(|&z| (z as f64 - lse).exp()).sum();
            // lse is an f32: its rounding (half an ulp of |lse|) scales every probability.
            let tol = 1e-5 + lse.abs() * 2f64.powi(-23);
            prop_assert!((total - 1.0).abs() <= tol, "row {r}: Σ softmax = {total}, tol {tol}");
        }
    }

    #[test]
    fn backward_rows_sum_to_zero(b in batch(), g in -4.0f32..4.0) {
        let out = token_logprobs(&b.logits, &b.labels, b.vocab, IGNORE_INDEX).unwrap();
        let grad_logp = vec![g; b.rows];
        let mut grad = vec![f32::NAN; b.logits.len()];
        token_logprobs_backward(&b.logits, &b.labels, out.saved_lse(), &grad_logp, b.vocab, IGNORE_INDEX, &mut grad)
            .unwrap();
        for r in 0..b.rows {
            let row = &grad[r * b.vocab..(r + 1) * b.vocab];
            prop_assert!(row.iter().all(|d| d.is_finite()));
            if b.labels[r] == IGNORE_INDEX {
                prop_assert!(row.iter().all(|&d| d == 0.0));
                continue;
            }
            // Σ_v g(1[v=y] − p_v) = g(1 − Σ p) = 0, up to the lse rounding and f32 terms.
            let sum: f64 = row.iter().map(|&d| d as f64).sum();
            let tol = g.abs() as f64
                * (1e-5 + (out.lse[r] as f64).abs() * 2f64.powi(-23) + b.vocab as f64 * 1e-7);
            prop_assert!(sum.abs() <= tol, "row {r}: Σ grad = {sum}, tol {tol}");
        }
    }

    #[test]
    fn unclamped_logratio_sums_are_the_difference_of_sums(t in tokens()) {
        let layout = SequenceLayout::Packed { cu_seqlens: &t.cu_seqlens };
        let ratio = sequence_logratio_sums(&t.policy, &t.reference, &t.labels, IGNORE_INDEX, layout, None)
            .unwrap();
        let policy = sequence_sums(&t.policy, &t.labels, IGNORE_INDEX, layout).unwrap();
        let reference = sequence_sums(&t.reference, &t.labels, IGNORE_INDEX, layout).unwrap();
        prop_assert_eq!(&ratio.counts, &policy.counts);
        for i in 0..ratio.sums.len() {
            let diff = policy.sums[i] as f64 - reference.sums[i] as f64;
            // Each of the three sums is rounded once from f64: half an ulp of each.
            let tol = 2f64.powi(-23) * (policy.sums[i].abs() + reference.sums[i].abs() + ratio.sums[i].abs()) as f64;
            prop_assert!((ratio.sums[i] as f64 - diff).abs() <= tol, "seq {i}: {} vs {diff}", ratio.sums[i]);
        }
    }

    #[test]
    fn clamped_logratio_sums_stay_within_count_times_bounds(t in tokens(), lo in -3.0f32..0.0, width in 0.0f32..3.0) {
        let clamp = LogRatioClamp { min: lo, max: lo + width };
        let layout = SequenceLayout::Packed { cu_seqlens: &t.cu_seqlens };
        let out = sequence_logratio_sums(&t.policy, &t.reference, &t.labels, IGNORE_INDEX, layout, Some(clamp))
            .unwrap();
        for (i, (&s, &c)) in out.sums.iter().zip(&out.counts).enumerate() {
            let (lo, hi) = (c as f32 * clamp.min, c as f32 * clamp.max);
            let slack = 1e-5 * (lo.abs() + hi.abs());
            prop_assert!(s >= lo - slack && s <= hi + slack, "seq {i}: {s} not in [{lo}, {hi}]");
        }
    }
}
