//! `cpu::sequence_sums`, `sequence_logratio_sums` (with and without the humanline clamp),
//! `broadcast_sequence_grad` and `humanline_grad_mask` against f64 references, for padded and
//! packed layouts, and their errors.

mod common;

use common::*;
use halo_kernels::cpu::{
    broadcast_sequence_grad, humanline_grad_mask, sequence_logratio_sums, sequence_sums,
    LogRatioClamp, SequenceLayout,
};
use halo_kernels::{HaloError, IGNORE_INDEX};

/// f64 accumulation rounded once to f32: half an f32 ulp of the result, plus a margin.
const REL: f64 = 1e-6;
const ABS: f64 = 1e-6;

/// Layouts exercised everywhere: padded, packed with an empty sequence, a batch of one.
fn layouts(cu_seqlens: &[u32]) -> Vec<(&'static str, SequenceLayout<'_>)> {
    vec![
        ("padded 4x9", SequenceLayout::Padded { batch: 4, seq: 9 }),
        ("padded 1x36", SequenceLayout::Padded { batch: 1, seq: 36 }),
        ("packed", SequenceLayout::Packed { cu_seqlens }),
        (
            "packed one",
            SequenceLayout::Packed {
                cu_seqlens: &[0, 36],
            },
        ),
    ]
}

/// 36 token rows: sequence 1 of the padded layout (rows 9..18) is all ignored, others mixed.
fn inputs(seed: u64) -> (Vec<f32>, Vec<f32>, Vec<i32>) {
    let mut rng = rng(seed);
    let policy = random_values(36, -12.0, -0.01, &mut rng);
    let reference = random_values(36, -12.0, -0.01, &mut rng);
    let mut labels = random_labels(36, 1000, 0.3, IGNORE_INDEX, &mut rng);
    labels[9..18].fill(IGNORE_INDEX);
    (policy, reference, labels)
}

// Packed: [0,5) [5,5) empty [5,18) [18,35) [35,36) one token.
const CU_SEQLENS: [u32; 6] = [0, 5, 5, 18, 35, 36];

#[test]
fn sums_and_counts_match_reference() {
    let (values, _, labels) = inputs(201);
    for (name, layout) in layouts(&CU_SEQLENS) {
        let got = sequence_sums(&values, &labels, IGNORE_INDEX, layout).unwrap();
        let (want, counts) =
            ref_sequence_sums(&f32s_to_f64(&values), &labels, IGNORE_INDEX, &layout);
        assert_close(name, &f32s_to_f64(&got.sums), &want, REL, ABS);
        assert_eq!(got.counts, counts, "{name}");
    }
    // Spot checks the reference cannot share a bug with: empty / all-ignored sequences.
    let padded = sequence_sums(&values, &labels, IGNORE_INDEX, layouts(&CU_SEQLENS)[0].1).unwrap();
    assert_eq!((padded.sums[1], padded.counts[1]), (0.0, 0));
    let packed = sequence_sums(&values, &labels, IGNORE_INDEX, layouts(&CU_SEQLENS)[2].1).unwrap();
    assert_eq!((packed.sums[1], packed.counts[1]), (0.0, 0));
    assert_eq!(packed.sums.len(), 5);
}

#[test]
fn long_sequences_are_accurate() {
    // 8192 tokens of log-probs around −10: a naive f32 running sum drifts by ~1e-5 relative.
    let mut rng = rng(202);
    let n = 8192;
    let values = random_values(n, -20.0, -0.001, &mut rng);
    let labels = random_labels(n, 50, 0.1, IGNORE_INDEX, &mut rng);
    let layout = SequenceLayout::Padded {
        batch: 2,
        seq: n / 2,
    };
    let got = sequence_sums(&values, &labels, IGNORE_INDEX, layout).unwrap();
    let (want, counts) = ref_sequence_sums(&f32s_to_f64(&values), &labels, IGNORE_INDEX, &layout);
    assert_close("long", &f32s_to_f64(&got.sums), &want, 2f64.powi(-23), 0.0);
    assert_eq!(got.counts, counts);
}

#[test]
fn all_ignored_gives_zero_sums_and_counts() {
    let values = [-1.5f32, f32::NAN, -2.0, f32::INFINITY]; // ignored tokens are not read
    let labels = [IGNORE_INDEX; 4];
    for layout in [
        SequenceLayout::Padded { batch: 2, seq: 2 },
        SequenceLayout::Packed {
            cu_seqlens: &[0, 1, 4],
        },
    ] {
        let got = sequence_sums(&values, &labels, IGNORE_INDEX, layout).unwrap();
        assert_eq!(got.sums, vec![0.0, 0.0]);
        assert_eq!(got.counts, vec![0, 0]);
    }
}

#[test]
fn custom_ignore_index_is_respected() {
    let values = [-1.0f32, -2.0, -4.0];
    let got = sequence_sums(
        &values,
        &[-1, IGNORE_INDEX, 3],
        -1,
        SequenceLayout::Padded { batch: 1, seq: 3 },
    )
    .unwrap();
    // −100 is an ordinary label when the ignore index is −1.
    assert_eq!((got.sums[0], got.counts[0]), (-6.0, 2));
}

#[test]
fn logratio_sums_with_and_without_clamp_match_reference() {
    let (policy, reference, labels) = inputs(203);
    let (p64, r64) = (f32s_to_f64(&policy), f32s_to_f64(&reference));
    for (name, layout) in layouts(&CU_SEQLENS) {
        for clamp in [
            None,
            Some(LogRatioClamp::default()),
            Some(LogRatioClamp {
                min: -3.0,
                max: 0.25,
            }),
        ] {
            let got =
                sequence_logratio_sums(&policy, &reference, &labels, IGNORE_INDEX, layout, clamp)
                    .unwrap();
            let ref_clamp = clamp.map(|c| (c.min as f64, c.max as f64));
            let (want, counts) =
                ref_logratio_sums(&p64, &r64, &labels, IGNORE_INDEX, &layout, ref_clamp);
            assert_close(
                &format!("{name} {clamp:?}"),
                &f32s_to_f64(&got.sums),
                &want,
                REL,
                ABS,
            );
            assert_eq!(got.counts, counts);
        }
    }
}

#[test]
fn default_clamp_is_humanline_minus_one_to_one_and_a_half() {
    assert_eq!(
        LogRatioClamp::default(),
        LogRatioClamp {
            min: -1.0,
            max: 1.5
        }
    );
    // Ratios −5, +5, 0.5 clamp to −1, 1.5, 0.5.
    let got = sequence_logratio_sums(
        &[-6.0, -1.0, -1.0],
        &[-1.0, -6.0, -1.5],
        &[1, 2, 3],
        IGNORE_INDEX,
        SequenceLayout::Padded { batch: 3, seq: 1 },
        Some(LogRatioClamp::default()),
    )
    .unwrap();
    assert_eq!(got.sums, vec![-1.0, 1.5, 0.5]);
}

#[test]
fn broadcast_grad_matches_reference_and_is_the_adjoint_of_the_sums() {
    let (values, _, labels) = inputs(204);
    let mut rng = rng(205);
    for (name, layout) in layouts(&CU_SEQLENS) {
        let grad_seq = random_values(layout.batch(), -3.0, 3.0, &mut rng);
        let got = broadcast_sequence_grad(&grad_seq, &labels, IGNORE_INDEX, layout).unwrap();
        let want = ref_sequence_grad(
            &f32s_to_f64(&grad_seq),
            &values_zero(36),
            &values_zero(36),
            &labels,
            IGNORE_INDEX,
            &layout,
            None,
        );
        assert_eq!(f32s_to_f64(&got), want, "{name}");
        // ⟨broadcast(g), v⟩ = ⟨g, sums(v)⟩: the two ops are adjoint.
        let sums = sequence_sums(&values, &labels, IGNORE_INDEX, layout).unwrap();
        let lhs: f64 = got
            .iter()
            .zip(&values)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        let rhs: f64 = grad_seq
            .iter()
            .zip(&sums.sums)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        assert!(
            (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
            "{name}: {lhs} vs {rhs}"
        );
    }
}

fn values_zero(n: usize) -> Vec<f64> {
    vec![0.0; n]
}

#[test]
fn humanline_mask_matches_reference_and_finite_differences() {
    let (policy, reference, labels) = inputs(206);
    let clamp = LogRatioClamp::default();
    let layout = SequenceLayout::Packed {
        cu_seqlens: &CU_SEQLENS,
    };
    let grad_seq = [0.5f32, -1.0, 2.0, -0.25, 1.5];
    let mut token_grad = broadcast_sequence_grad(&grad_seq, &labels, IGNORE_INDEX, layout).unwrap();
    humanline_grad_mask(&policy, &reference, clamp, &mut token_grad).unwrap();
    let (p64, r64) = (f32s_to_f64(&policy), f32s_to_f64(&reference));
    let want = ref_sequence_grad(
        &f32s_to_f64(&grad_seq),
        &p64,
        &r64,
        &labels,
        IGNORE_INDEX,
        &layout,
        Some((clamp.min as f64, clamp.max as f64)),
    );
    assert_eq!(f32s_to_f64(&token_grad), want);
    assert!(want.contains(&0.0) && want.iter().any(|&g| g != 0.0));

    // Finite differences of Σ_i g_i · clampedsum_i w.r.t. each policy log-prob (away from the
    // clamp's kinks, which random inputs hit with probability 0).
    let objective = |p: &[f64]| -> f64 {
        let (sums, _) =
            ref_logratio_sums(p, &r64, &labels, IGNORE_INDEX, &layout, Some((-1.0, 1.5)));
        sums.iter().zip(&grad_seq).map(|(s, &g)| s * g as f64).sum()
    };
    let h = 1e-6;
    let mut p = p64.clone();
    for t in 0..p.len() {
        let p0 = p[t];
        p[t] = p0 + h;
        let up = objective(&p);
        p[t] = p0 - h;
        let down = objective(&p);
        p[t] = p0;
        let fd = (up - down) / (2.0 * h);
        assert!(
            (fd - token_grad[t] as f64).abs() <= 1e-6,
            "token {t}: fd {fd} vs {}",
            token_grad[t]
        );
    }
}

#[test]
fn humanline_mask_passes_gradient_at_the_bounds() {
    // Ratios exactly −1 and 1.5 (exact in f32): torch.clamp's backward passes the gradient there.
    let policy = [-1.5f32, 1.0, -3.0, 2.0];
    let reference = [-0.5f32, -0.5, 0.0, 0.0];
    let mut grad = [1.0f32, 2.0, 3.0, 4.0];
    humanline_grad_mask(&policy, &reference, LogRatioClamp::default(), &mut grad).unwrap();
    assert_eq!(grad, [1.0, 2.0, 0.0, 0.0]);
}

// ---- errors ----

#[test]
fn invalid_packed_offsets_are_errors() {
    let values = [-1.0f32; 6];
    let labels = [1; 6];
    for (why, cu) in [
        ("decreasing", &[0u32, 4, 2, 6][..]),
        ("not starting at 0", &[1, 3, 6]),
        ("not ending at rows", &[0, 3, 5]),
        ("past the rows", &[0, 3, 7]),
        ("too short", &[0]),
        ("empty", &[]),
    ] {
        let layout = SequenceLayout::Packed { cu_seqlens: cu };
        let err = sequence_sums(&values, &labels, IGNORE_INDEX, layout).unwrap_err();
        assert!(
            matches!(err, HaloError::InvalidOffsets(_)),
            "{why}: {err:?}"
        );
        let err = sequence_logratio_sums(&values, &values, &labels, IGNORE_INDEX, layout, None)
            .unwrap_err();
        assert!(
            matches!(err, HaloError::InvalidOffsets(_)),
            "{why}: {err:?}"
        );
        let err = broadcast_sequence_grad(&[1.0; 3], &labels, IGNORE_INDEX, layout).unwrap_err();
        assert!(
            matches!(err, HaloError::InvalidOffsets(_)),
            "{why}: {err:?}"
        );
    }
}

#[test]
fn padded_shape_errors() {
    let values = [-1.0f32; 6];
    let labels = [1; 6];
    let err = sequence_sums(
        &values,
        &labels,
        IGNORE_INDEX,
        SequenceLayout::Padded { batch: 4, seq: 2 },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            HaloError::LengthMismatch {
                expected: 8,
                got: 6,
                ..
            }
        ),
        "{err:?}"
    );
    // batch · seq wrapping around usize must not pass for 0 rows.
    let huge = SequenceLayout::Padded {
        batch: usize::MAX / 2 + 1,
        seq: 2,
    };
    let err = sequence_sums(&[], &[], IGNORE_INDEX, huge).unwrap_err();
    assert!(matches!(err, HaloError::InvalidShape(_)), "{err:?}");
}

#[test]
fn length_mismatches_are_errors() {
    let layout = SequenceLayout::Padded { batch: 2, seq: 2 };
    let err = sequence_sums(&[-1.0; 4], &[1; 3], IGNORE_INDEX, layout).unwrap_err();
    assert!(
        matches!(err, HaloError::LengthMismatch { what: "labels", .. }),
        "{err:?}"
    );
    let err = sequence_logratio_sums(&[-1.0; 4], &[-1.0; 3], &[1; 4], IGNORE_INDEX, layout, None)
        .unwrap_err();
    assert!(
        matches!(
            err,
            HaloError::LengthMismatch {
                what: "reference_logp",
                ..
            }
        ),
        "{err:?}"
    );
    let err = broadcast_sequence_grad(&[1.0; 3], &[1; 4], IGNORE_INDEX, layout).unwrap_err();
    assert!(
        matches!(
            err,
            HaloError::LengthMismatch {
                what: "grad_seq",
                ..
            }
        ),
        "{err:?}"
    );
    let err = humanline_grad_mask(
        &[-1.0; 4],
        &[-1.0; 4],
        LogRatioClamp::default(),
        &mut [1.0; 3],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            HaloError::LengthMismatch {
                what: "token_grad",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn invalid_clamps_are_errors() {
    let layout = SequenceLayout::Padded { batch: 1, seq: 2 };
    for clamp in [
        LogRatioClamp {
            min: 1.0,
            max: -1.0,
        },
        LogRatioClamp {
            min: f32::NAN,
            max: 1.0,
        },
        LogRatioClamp {
            min: -1.0,
            max: f32::INFINITY,
        },
    ] {
        let err = sequence_logratio_sums(
            &[-1.0; 2],
            &[-2.0; 2],
            &[1; 2],
            IGNORE_INDEX,
            layout,
            Some(clamp),
        )
        .unwrap_err();
        assert!(
            matches!(err, HaloError::InvalidHyperParameter { .. }),
            "{clamp:?}: {err:?}"
        );
        let err = humanline_grad_mask(&[-1.0; 2], &[-2.0; 2], clamp, &mut [1.0; 2]).unwrap_err();
        assert!(
            matches!(err, HaloError::InvalidHyperParameter { .. }),
            "{clamp:?}: {err:?}"
        );
    }
}

#[test]
fn non_finite_counted_values_are_errors_but_ignored_ones_are_not_read() {
    let layout = SequenceLayout::Padded { batch: 2, seq: 2 };
    let labels = [1, IGNORE_INDEX, 2, 3];
    let good = sequence_sums(&[-1.0, f32::NAN, -2.0, -3.0], &labels, IGNORE_INDEX, layout).unwrap();
    assert_eq!(good.sums, vec![-1.0, -5.0]);
    let err =
        sequence_sums(&[-1.0, -1.0, -2.0, f32::NAN], &labels, IGNORE_INDEX, layout).unwrap_err();
    assert_eq!(
        err,
        HaloError::NonFinite {
            what: "token_values",
            row: 3
        }
    );
    let err = sequence_logratio_sums(
        &[-1.0, 0.0, f32::NEG_INFINITY, -3.0],
        &[-1.0; 4],
        &labels,
        IGNORE_INDEX,
        layout,
        Some(LogRatioClamp::default()),
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::NonFinite {
            what: "policy_logp",
            row: 2
        }
    );
    let err = sequence_logratio_sums(
        &[-1.0; 4],
        &[f32::INFINITY; 4],
        &labels,
        IGNORE_INDEX,
        layout,
        None,
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::NonFinite {
            what: "reference_logp",
            row: 0
        }
    );
    let err = broadcast_sequence_grad(&[1.0, f32::NAN], &labels, IGNORE_INDEX, layout).unwrap_err();
    assert_eq!(
        err,
        HaloError::NonFinite {
            what: "grad_seq",
            row: 1
        }
    );
}
