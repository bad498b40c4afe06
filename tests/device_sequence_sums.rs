//! The sequence ops — `sequence_sums`, `sequence_logratio_sums` (with and without the humanline
//! clamp), `broadcast_sequence_grad`, `humanline_grad_mask` — on every device (CPU; CUDA, real or
//! emulated), against f64 references computed here from the definitions: padded and packed
//! layouts, empty and all-ignored sequences, a batch of one, sequences longer than a block, and
//! the errors (the same `HaloError` on every device).

mod device_support;

use std::ops::Range;

use device_support::*;
use halo_kernels::cpu::{LogRatioClamp, SequenceLayout};
use halo_kernels::HaloError;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

// ---- f64 references ------------------------------------------------------------------------

/// Each sequence's rows, straight from the layout's definition (no validation: inputs are valid).
fn ref_ranges(layout: &SequenceLayout<'_>) -> Vec<Range<usize>> {
    match *layout {
        SequenceLayout::Padded { batch, seq } => {
            (0..batch).map(|b| b * seq..(b + 1) * seq).collect()
        }
        SequenceLayout::Packed { cu_seqlens } => cu_seqlens
            .windows(2)
            .map(|w| w[0] as usize..w[1] as usize)
            .collect(),
    }
}

/// Per sequence: the f64 sum of `value(t)` over its counted tokens, Σ|value(t)| over them (the
/// scale of an f32 summation's rounding error), and the count.
struct RefSums {
    sums: Vec<f64>,
    abs_sums: Vec<f64>,
    counts: Vec<u32>,
}

fn ref_sums(layout: &SequenceLayout<'_>, labels: &[i32], value: impl Fn(usize) -> f64) -> RefSums {
    let mut out = RefSums {
        sums: vec![],
        abs_sums: vec![],
        counts: vec![],
    };
    for range in ref_ranges(layout) {
        let counted: Vec<usize> = range.filter(|&t| labels[t] != IGNORE).collect();
        out.sums.push(counted.iter().map(|&t| value(t)).sum());
        out.abs_sums
            .push(counted.iter().map(|&t| value(t).abs()).sum());
        out.counts.push(counted.len() as u32);
    }
    out
}

/// The per-token log-ratio in f64 (exact for f32 inputs), clamped to `[min, max]` if given.
fn ref_logratio(policy: f32, reference: f32, clamp: Option<LogRatioClamp>) -> f64 {
    let ratio = policy as f64 - reference as f64;
    match clamp {
        Some(c) => ratio.max(c.min as f64).min(c.max as f64),
        None => ratio,
    }
}

/// Every counted token of sequence `i` gets `grad_seq[i]`, every other row 0.
fn ref_broadcast(grad_seq: &[f32], labels: &[i32], layout: &SequenceLayout<'_>) -> Vec<f32> {
    let mut out = vec![0.0f32; labels.len()];
    for (range, &g) in ref_ranges(layout).into_iter().zip(grad_seq) {
        for t in range {
            if labels[t] != IGNORE {
                out[t] = g;
            }
        }
    }
    out
}

/// The gradient passes where `min <= policy − reference <= max` (f64), else it is 0.
fn ref_humanline_mask(
    policy: &[f32],
    reference: &[f32],
    clamp: LogRatioClamp,
    grad: &[f32],
) -> Vec<f32> {
    (0..grad.len())
        .map(|t| {
            let ratio = policy[t] as f64 - reference[t] as f64;
            if (clamp.min as f64..=clamp.max as f64).contains(&ratio) {
                grad[t]
            } else {
                0.0
            }
        })
        .collect()
}

// ---- comparisons ---------------------------------------------------------------------------

fn assert_finite(what: &str, v: &[f32]) {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        panic!("{what}[{i}] = {} is not finite", v[i]);
    }
}

/// Device sums against the f64 reference: counts exactly; sums within an f32 summation's error,
/// 2e-6 · Σ|x| (≈ 16 ulps of the absolute sum: enough for a 256-thread tree over a few thousand
/// tokens), plus 1e-6.
fn assert_sums(what: &str, got: &halo_kernels::cpu::SequenceSums, want: &RefSums) {
    assert_eq!(got.counts, want.counts, "{what}: counts");
    assert_eq!(got.sums.len(), want.sums.len(), "{what}: sums length");
    assert_finite(&format!("{what}: sums"), &got.sums);
    for (i, ((&g, &w), &abs)) in got
        .sums
        .iter()
        .zip(&want.sums)
        .zip(&want.abs_sums)
        .enumerate()
    {
        let tol = 1e-6 + 2e-6 * abs;
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}: sums[{i}] = {g}, f64 reference {w} (|diff| {} > tol {tol})",
            (g as f64 - w).abs()
        );
    }
}

// ---- inputs --------------------------------------------------------------------------------

/// Random packed offsets over `rows` rows: `batch` sequences, some empty.
fn random_cu_seqlens(r: &mut ChaCha8Rng, rows: usize, batch: usize) -> Vec<u32> {
    let mut cuts: Vec<u32> = (0..batch - 1)
        .map(|_| r.gen_range(0..=rows as u32))
        .collect();
    cuts.sort();
    let mut cu = vec![0u32];
    cu.extend(cuts);
    cu.push(rows as u32);
    cu
}

/// The clamps every layout is checked with: none, humanline's default, a narrow one.
const CLAMPS: [Option<LogRatioClamp>; 3] = [
    None,
    Some(LogRatioClamp {
        min: -1.0,
        max: 1.5,
    }),
    Some(LogRatioClamp {
        min: -0.25,
        max: 0.5,
    }),
];

/// Every op on `layout` over `rows` random rows (about `ignore` of them ignored) against the f64
/// references.
fn check_layout<D: Device>(d: &D, seed: u64, layout: SequenceLayout<'_>, rows: usize, ignore: f64) {
    let mut r = rng(seed);
    let policy: Vec<f32> = (0..rows).map(|_| r.gen_range(-12.0f32..0.0)).collect();
    let reference: Vec<f32> = (0..rows).map(|_| r.gen_range(-12.0f32..0.0)).collect();
    let labels = random_labels(&mut r, rows, 100, ignore);
    let ctx = format!("{}: {layout:?} rows {rows}", d.name());

    let got = d.sequence_sums(&policy, &labels, IGNORE, layout).unwrap();
    let want = ref_sums(&layout, &labels, |t| policy[t] as f64);
    assert_sums(&format!("sums ({ctx})"), &got, &want);

    for clamp in CLAMPS {
        let got = d
            .sequence_logratio_sums(&policy, &reference, &labels, IGNORE, layout, clamp)
            .unwrap();
        let want = ref_sums(&layout, &labels, |t| {
            ref_logratio(policy[t], reference[t], clamp)
        });
        assert_sums(&format!("ratio sums ({ctx}, {clamp:?})"), &got, &want);
    }

    let grad_seq: Vec<f32> = (0..layout.batch())
        .map(|_| r.gen_range(-1.0f32..1.0))
        .collect();
    let got = d
        .broadcast_sequence_grad(&grad_seq, &labels, IGNORE, layout)
        .unwrap();
    assert_finite(&format!("broadcast ({ctx})"), &got);
    assert_eq!(
        got,
        ref_broadcast(&grad_seq, &labels, &layout),
        "broadcast ({ctx})"
    );
}

// ---- tests ---------------------------------------------------------------------------------

/// Padded layouts: a batch of one (short, and longer than a block), single-token sequences, odd
/// lengths, sequences of 2049 rows (8 per thread), many sequences, and empty sequences (seq 0).
fn padded_layouts<D: Device>(d: &D) {
    for (i, &(batch, seq)) in [
        (1, 1),
        (1, 700),
        (5, 1),
        (7, 33),
        (3, 2049),
        (64, 17),
        (2, 0),
    ]
    .iter()
    .enumerate()
    {
        check_layout(
            d,
            i as u64,
            SequenceLayout::Padded { batch, seq },
            batch * seq,
            0.3,
        );
    }
}

/// Packed layouts with random offsets (some sequences empty, more sequences than rows, a batch of
/// one, sequences longer than a block), and one with empty sequences first, in the middle and last.
fn packed_layouts_with_empty_sequences<D: Device>(d: &D) {
    let mut r = rng(77);
    for (i, &(rows, batch)) in [(1, 1), (50, 1), (100, 9), (3000, 5), (40, 60)]
        .iter()
        .enumerate()
    {
        let cu = random_cu_seqlens(&mut r, rows, batch);
        check_layout(
            d,
            100 + i as u64,
            SequenceLayout::Packed { cu_seqlens: &cu },
            rows,
            0.3,
        );
    }
    let cu = [0u32, 0, 5, 5, 12, 12];
    check_layout(d, 200, SequenceLayout::Packed { cu_seqlens: &cu }, 12, 0.3);
    // Spot check the reference cannot share a bug with: empty sequences sum to 0 with count 0.
    let values: Vec<f32> = (0..12).map(|t| -1.0 - t as f32).collect();
    let got = d
        .sequence_sums(
            &values,
            &[1; 12],
            IGNORE,
            SequenceLayout::Packed { cu_seqlens: &cu },
        )
        .unwrap();
    assert_eq!(got.counts, vec![0, 5, 0, 7, 0], "{}", d.name());
    assert_eq!(got.sums, vec![0.0, -15.0, 0.0, -63.0, 0.0], "{}", d.name());
}

/// Sequences whose every token is ignored sum to 0 with count 0, and their (NaN) values are not
/// read.
fn all_ignored_sequences_sum_to_zero<D: Device>(d: &D) {
    check_layout(
        d,
        300,
        SequenceLayout::Padded { batch: 4, seq: 300 },
        1200,
        1.0,
    );
    let labels = vec![IGNORE; 10];
    let values = vec![f32::NAN; 10]; // ignored tokens are not read
    for layout in [
        SequenceLayout::Padded { batch: 2, seq: 5 },
        SequenceLayout::Packed {
            cu_seqlens: &[0, 3, 10],
        },
    ] {
        let got = d.sequence_sums(&values, &labels, IGNORE, layout).unwrap();
        assert_eq!(got.sums, vec![0.0, 0.0], "{}: {layout:?}", d.name());
        assert_eq!(got.counts, vec![0, 0], "{}: {layout:?}", d.name());
        for clamp in CLAMPS {
            let got = d
                .sequence_logratio_sums(&values, &values, &labels, IGNORE, layout, clamp)
                .unwrap();
            assert_eq!(
                got.sums,
                vec![0.0, 0.0],
                "{}: {layout:?} {clamp:?}",
                d.name()
            );
            assert_eq!(got.counts, vec![0, 0], "{}: {layout:?} {clamp:?}", d.name());
        }
        let grad = d
            .broadcast_sequence_grad(&[1.0, -2.0], &labels, IGNORE, layout)
            .unwrap();
        assert_eq!(grad, vec![0.0; 10], "{}: {layout:?}", d.name());
    }
}

/// Long sequences (2500 rows, ~10 per thread) are accurate and bitwise identical run to run.
fn sums_are_accurate_and_bitwise_deterministic<D: Device>(d: &D) {
    let mut r = rng(400);
    let rows = 5000;
    let values: Vec<f32> = (0..rows).map(|_| r.gen_range(-10.0f32..0.0)).collect();
    let labels = random_labels(&mut r, rows, 10, 0.1);
    let layout = SequenceLayout::Padded {
        batch: 2,
        seq: 2500,
    };
    let a = d.sequence_sums(&values, &labels, IGNORE, layout).unwrap();
    assert_sums(
        &format!("long sums ({})", d.name()),
        &a,
        &ref_sums(&layout, &labels, |t| values[t] as f64),
    );
    let b = d.sequence_sums(&values, &labels, IGNORE, layout).unwrap();
    assert_eq!(
        a.sums.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        b.sums.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        "{}: two runs",
        d.name()
    );
}

/// The humanline mask against the f64 mask, around the block size (255/256/257 tokens) and over
/// many blocks, with ratios exactly at the bounds keeping their gradient.
fn humanline_grad_mask_matches_the_f64_mask<D: Device>(d: &D) {
    let mut r = rng(500);
    let clamp = LogRatioClamp::default();
    for n in [1usize, 255, 256, 257, 3001] {
        let mut policy: Vec<f32> = (0..n).map(|_| r.gen_range(-8.0f32..0.0)).collect();
        let mut reference: Vec<f32> = policy
            .iter()
            .map(|p| p - r.gen_range(-3.0f32..3.0))
            .collect();
        // Ratios exactly at the bounds (exact in f32): 1.5 = max, and −1 = min.
        (policy[0], reference[0]) = (-2.5, -4.0);
        if n > 1 {
            (policy[1], reference[1]) = (-3.0, -2.0);
        }
        let grad: Vec<f32> = (0..n).map(|_| r.gen_range(0.5f32..1.0)).collect();
        let mut got = grad.clone();
        d.humanline_grad_mask(&policy, &reference, clamp, &mut got)
            .unwrap();
        let ctx = format!("{}: n {n}", d.name());
        assert_finite(&ctx, &got);
        assert_eq!(
            got,
            ref_humanline_mask(&policy, &reference, clamp, &grad),
            "{ctx}"
        );
        assert_eq!(
            got[..n.min(2)],
            grad[..n.min(2)],
            "{ctx}: at the bounds the gradient passes"
        );
        assert!(
            n < 100 || (got.contains(&0.0) && got.iter().any(|&g| g != 0.0)),
            "{ctx}: both cases occur"
        );
    }
}

/// Invalid layouts and lengths, invalid clamps, and NaN/±inf in counted tokens: the same
/// `HaloError` on every device, checked to the fields.
fn errors_are_the_same_on_every_device<D: Device>(d: &D) {
    let name = d.name();
    let values = vec![-1.0f32; 10];
    let labels = vec![1; 10];
    let offsets = |msg: &str| HaloError::InvalidOffsets(msg.into());
    let bad_layouts: [(SequenceLayout<'_>, HaloError); 7] = [
        (
            SequenceLayout::Padded { batch: 3, seq: 4 },
            HaloError::LengthMismatch {
                what: "token rows (padded batch * seq)",
                expected: 12,
                got: 10,
            },
        ),
        (
            SequenceLayout::Padded {
                batch: 1 << 30,
                seq: usize::MAX / 4,
            },
            HaloError::InvalidShape(format!(
                "padded batch {} * seq {} overflows usize",
                1usize << 30,
                usize::MAX / 4
            )),
        ),
        (
            SequenceLayout::Padded {
                batch: usize::MAX / 2 + 1,
                seq: 2,
            },
            HaloError::InvalidShape(format!(
                "{} sequences exceed the limit of {}",
                usize::MAX / 2 + 1,
                halo_kernels::cpu::MAX_SEQUENCES
            )),
        ),
        (
            SequenceLayout::Packed {
                cu_seqlens: &[0, 4, 3, 10],
            },
            offsets("cu_seqlens decreases at index 2: 4 > 3"),
        ),
        (
            SequenceLayout::Packed {
                cu_seqlens: &[0, 4, 9],
            },
            offsets("cu_seqlens must start at 0 and end at the row count 10, got 0..9"),
        ),
        (
            SequenceLayout::Packed {
                cu_seqlens: &[1, 4, 10],
            },
            offsets("cu_seqlens must start at 0 and end at the row count 10, got 1..10"),
        ),
        (
            SequenceLayout::Packed { cu_seqlens: &[0] },
            offsets("cu_seqlens needs at least 2 entries (one sequence), got 1"),
        ),
    ];
    for (layout, want) in &bad_layouts {
        let ctx = format!("{name}: {layout:?}");
        let layout = *layout;
        let err = d
            .sequence_sums(&values, &labels, IGNORE, layout)
            .unwrap_err();
        assert_eq!(&err, want, "sequence_sums ({ctx})");
        for clamp in CLAMPS {
            let err = d
                .sequence_logratio_sums(&values, &values, &labels, IGNORE, layout, clamp)
                .unwrap_err();
            assert_eq!(&err, want, "sequence_logratio_sums ({ctx}, {clamp:?})");
        }
        let grad_seq = vec![1.0f32; layout.batch().min(4)];
        let err = d
            .broadcast_sequence_grad(&grad_seq, &labels, IGNORE, layout)
            .unwrap_err();
        assert_eq!(&err, want, "broadcast_sequence_grad ({ctx})");
    }

    // Wrong lengths.
    let layout = SequenceLayout::Padded { batch: 2, seq: 5 };
    let mismatch = |what, expected, got| HaloError::LengthMismatch {
        what,
        expected,
        got,
    };
    assert_eq!(
        d.sequence_sums(&values, &labels[..9], IGNORE, layout)
            .unwrap_err(),
        mismatch("labels", 10, 9),
        "{name}"
    );
    assert_eq!(
        d.sequence_logratio_sums(&values, &values[..8], &labels, IGNORE, layout, None)
            .unwrap_err(),
        mismatch("reference_logp", 10, 8),
        "{name}"
    );
    assert_eq!(
        d.sequence_logratio_sums(&values, &values, &labels[..7], IGNORE, layout, None)
            .unwrap_err(),
        mismatch("labels", 10, 7),
        "{name}"
    );
    assert_eq!(
        d.broadcast_sequence_grad(&[1.0], &labels, IGNORE, layout)
            .unwrap_err(),
        mismatch("grad_seq", 2, 1),
        "{name}"
    );
    let clamp = LogRatioClamp::default();
    assert_eq!(
        d.humanline_grad_mask(&[0.0; 3], &[0.0; 2], clamp, &mut [0.0; 3])
            .unwrap_err(),
        mismatch("reference_logp", 3, 2),
        "{name}"
    );
    assert_eq!(
        d.humanline_grad_mask(&[0.0; 3], &[0.0; 3], clamp, &mut [0.0; 4])
            .unwrap_err(),
        mismatch("token_grad", 3, 4),
        "{name}"
    );

    // Invalid clamps.
    for bad in [
        LogRatioClamp { min: 1.0, max: 0.0 },
        LogRatioClamp {
            min: f32::NAN,
            max: 1.0,
        },
        LogRatioClamp {
            min: -1.0,
            max: f32::INFINITY,
        },
    ] {
        let check = |err: HaloError| match err {
            HaloError::InvalidHyperParameter {
                name: "LogRatioClamp",
                value,
                reason: "needs finite min <= max",
            } if value.to_bits() == (bad.min as f64).to_bits() => {}
            other => panic!("{name}: {bad:?}: {other:?}"),
        };
        check(
            d.sequence_logratio_sums(&values, &values, &labels, IGNORE, layout, Some(bad))
                .unwrap_err(),
        );
        check(
            d.humanline_grad_mask(&values, &values, bad, &mut [0.0; 10])
                .unwrap_err(),
        );
    }

    // NaN/±inf in a counted token is an error naming the first bad row; in an ignored one it is
    // not read.
    let layout = SequenceLayout::Padded { batch: 2, seq: 2 };
    let labels = [1, IGNORE, 2, 3];
    let nonfinite = |what, row| HaloError::NonFinite { what, row };
    let good = d
        .sequence_sums(&[-1.0, f32::NAN, -2.0, -3.0], &labels, IGNORE, layout)
        .unwrap();
    assert_eq!(
        (good.sums, good.counts),
        (vec![-1.0, -5.0], vec![1, 2]),
        "{name}"
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert_eq!(
            d.sequence_sums(&[-1.0, -1.0, -2.0, bad], &labels, IGNORE, layout)
                .unwrap_err(),
            nonfinite("token_values", 3),
            "{name}: {bad}"
        );
        for clamp in CLAMPS {
            let ctx = format!("{name}: {bad} {clamp:?}");
            assert_eq!(
                d.sequence_logratio_sums(
                    &[-1.0, 0.0, bad, -3.0],
                    &[-1.0; 4],
                    &labels,
                    IGNORE,
                    layout,
                    clamp
                )
                .unwrap_err(),
                nonfinite("policy_logp", 2),
                "{ctx}"
            );
            assert_eq!(
                d.sequence_logratio_sums(&[-1.0; 4], &[bad; 4], &labels, IGNORE, layout, clamp)
                    .unwrap_err(),
                nonfinite("reference_logp", 0),
                "{ctx}"
            );
            // Ignored rows are not read, with or without the clamp.
            let got = d
                .sequence_logratio_sums(
                    &[-1.0, bad, -1.0, -1.0],
                    &[-1.5, bad, -1.5, -1.5],
                    &labels,
                    IGNORE,
                    layout,
                    clamp,
                )
                .unwrap();
            assert_eq!(
                (got.sums, got.counts),
                (vec![0.5, 1.0], vec![1, 2]),
                "{ctx}"
            );
        }
    }
    // Every grad_seq entry must be finite, also that of an empty sequence.
    let packed = SequenceLayout::Packed {
        cu_seqlens: &[0, 2, 2, 4],
    };
    assert_eq!(
        d.broadcast_sequence_grad(&[1.0, f32::NAN, 1.0], &labels, IGNORE, packed)
            .unwrap_err(),
        nonfinite("grad_seq", 1),
        "{name}"
    );
}

/// A padded layout of zero-length sequences passes the `batch * seq == rows` check for any batch:
/// an absurd one (2^34 sequences, or `usize::MAX`) must be a clear error, not an allocation abort or
/// a capacity-overflow panic, on every device.
fn absurd_padded_batches_are_errors_not_aborts<D: Device>(d: &D) {
    for batch in [1usize << 34, usize::MAX] {
        let layout = SequenceLayout::Padded { batch, seq: 0 };
        let sums = d.sequence_sums(&[], &[], IGNORE, layout);
        assert!(
            matches!(sums, Err(halo_kernels::HaloError::InvalidShape(_))),
            "{}: sequence_sums of {batch} empty sequences: {sums:?}",
            d.name()
        );
        let ratios = d.sequence_logratio_sums(&[], &[], &[], IGNORE, layout, None);
        assert!(
            matches!(ratios, Err(halo_kernels::HaloError::InvalidShape(_))),
            "{ratios:?}"
        );
        let grad = d.broadcast_sequence_grad(&[], &[], IGNORE, layout);
        assert!(
            matches!(grad, Err(halo_kernels::HaloError::InvalidShape(_))),
            "{grad:?}"
        );
    }
}

device_tests!(
    absurd_padded_batches_are_errors_not_aborts,
    padded_layouts,
    packed_layouts_with_empty_sequences,
    all_ignored_sequences_sum_to_zero,
    sums_are_accurate_and_bitwise_deterministic,
    humanline_grad_mask_matches_the_f64_mask,
    errors_are_the_same_on_every_device,
);
