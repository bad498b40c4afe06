//! The sequence kernels (`kernels/sequence_sums.cu`) under host emulation against the CPU ops, for
//! padded and packed layouts, empty and all-ignored sequences, long sequences, with and without the
//! humanline clamp.

mod emulated_support;

use emulated_support::*;
use halo_kernels::cpu::{self, LogRatioClamp, SequenceLayout};
use halo_kernels::emulation as emu;
use halo_kernels::HaloError;
use rand::Rng;

/// Random packed offsets over `rows` rows: `batch` sequences, some empty.
fn random_cu_seqlens(r: &mut rand_chacha::ChaCha8Rng, rows: usize, batch: usize) -> Vec<u32> {
    let mut cuts: Vec<u32> = (0..batch - 1)
        .map(|_| r.gen_range(0..=rows as u32))
        .collect();
    cuts.sort();
    let mut cu = vec![0u32];
    cu.extend(cuts);
    cu.push(rows as u32);
    cu
}

fn check_layout(seed: u64, layout: SequenceLayout<'_>, rows: usize, ignore: f64) {
    let mut r = rng(seed);
    let policy: Vec<f32> = (0..rows).map(|_| r.gen_range(-12.0f32..0.0)).collect();
    let reference: Vec<f32> = (0..rows).map(|_| r.gen_range(-12.0f32..0.0)).collect();
    let labels = random_labels(&mut r, rows, 100, ignore);
    let ctx = format!("{layout:?} rows {rows}");

    let got = emu::sequence_sums(&policy, &labels, IGNORE, layout).unwrap();
    let want = cpu::sequence_sums(&policy, &labels, IGNORE, layout).unwrap();
    assert_eq!(got.counts, want.counts, "counts ({ctx})");
    assert_close(&format!("sums ({ctx})"), &got.sums, &want.sums, 1e-4, 1e-5);

    for clamp in [
        None,
        Some(LogRatioClamp::default()),
        Some(LogRatioClamp {
            min: -0.25,
            max: 0.5,
        }),
    ] {
        let got = emu::sequence_logratio_sums(&policy, &reference, &labels, IGNORE, layout, clamp)
            .unwrap();
        let want = cpu::sequence_logratio_sums(&policy, &reference, &labels, IGNORE, layout, clamp)
            .unwrap();
        assert_eq!(got.counts, want.counts, "ratio counts ({ctx}, {clamp:?})");
        assert_close(
            &format!("ratio sums ({ctx}, {clamp:?})"),
            &got.sums,
            &want.sums,
            1e-4,
            1e-5,
        );
    }

    let grad_seq: Vec<f32> = (0..layout.batch())
        .map(|_| r.gen_range(-1.0f32..1.0))
        .collect();
    let got = emu::broadcast_sequence_grad(&grad_seq, &labels, IGNORE, layout).unwrap();
    let want = cpu::broadcast_sequence_grad(&grad_seq, &labels, IGNORE, layout).unwrap();
    assert_eq!(got, want, "broadcast ({ctx})");
}

#[test]
fn padded_layouts() {
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
            i as u64,
            SequenceLayout::Padded { batch, seq },
            batch * seq,
            0.3,
        );
    }
}

#[test]
fn packed_layouts_with_empty_sequences() {
    let mut r = rng(77);
    for (i, &(rows, batch)) in [(1, 1), (50, 1), (100, 9), (3000, 5), (40, 60)]
        .iter()
        .enumerate()
    {
        let cu = random_cu_seqlens(&mut r, rows, batch);
        check_layout(
            100 + i as u64,
            SequenceLayout::Packed { cu_seqlens: &cu },
            rows,
            0.3,
        );
    }
    let cu = [0u32, 0, 5, 5, 12, 12];
    check_layout(200, SequenceLayout::Packed { cu_seqlens: &cu }, 12, 0.3);
}

#[test]
fn all_ignored_sequences_sum_to_zero() {
    check_layout(
        300,
        SequenceLayout::Padded { batch: 4, seq: 300 },
        1200,
        1.0,
    );
    let labels = vec![IGNORE; 10];
    let values = vec![f32::NAN; 10]; // ignored tokens are not read
    let got = emu::sequence_sums(
        &values,
        &labels,
        IGNORE,
        SequenceLayout::Padded { batch: 2, seq: 5 },
    )
    .unwrap();
    assert_eq!(got.sums, vec![0.0, 0.0]);
    assert_eq!(got.counts, vec![0, 0]);
}

#[test]
fn sums_are_bitwise_deterministic() {
    let mut r = rng(400);
    let rows = 5000;
    let values: Vec<f32> = (0..rows).map(|_| r.gen_range(-10.0f32..0.0)).collect();
    let labels = random_labels(&mut r, rows, 10, 0.1);
    let layout = SequenceLayout::Padded {
        batch: 2,
        seq: 2500,
    };
    let a = emu::sequence_sums(&values, &labels, IGNORE, layout).unwrap();
    let b = emu::sequence_sums(&values, &labels, IGNORE, layout).unwrap();
    assert_eq!(
        a.sums.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        b.sums.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn layout_errors_match_the_cpu() {
    let values = vec![-1.0f32; 10];
    let labels = vec![1; 10];
    let bad_layouts: [SequenceLayout<'_>; 4] = [
        SequenceLayout::Padded { batch: 3, seq: 4 },
        SequenceLayout::Packed {
            cu_seqlens: &[0, 4, 3, 10],
        },
        SequenceLayout::Packed {
            cu_seqlens: &[0, 4, 9],
        },
        SequenceLayout::Packed { cu_seqlens: &[0] },
    ];
    for layout in bad_layouts {
        assert_eq!(
            emu::sequence_sums(&values, &labels, IGNORE, layout).unwrap_err(),
            cpu::sequence_sums(&values, &labels, IGNORE, layout).unwrap_err()
        );
    }
    let layout = SequenceLayout::Padded { batch: 2, seq: 5 };
    assert!(matches!(
        emu::sequence_logratio_sums(
            &values,
            &values,
            &labels,
            IGNORE,
            layout,
            Some(LogRatioClamp { min: 1.0, max: 0.0 })
        ),
        Err(HaloError::InvalidHyperParameter { .. })
    ));
    assert_eq!(
        emu::broadcast_sequence_grad(&[1.0], &labels, IGNORE, layout).unwrap_err(),
        cpu::broadcast_sequence_grad(&[1.0], &labels, IGNORE, layout).unwrap_err()
    );
}

#[test]
fn humanline_grad_mask_matches_the_cpu() {
    let mut r = rng(500);
    for n in [1usize, 255, 256, 257, 3001] {
        let policy: Vec<f32> = (0..n).map(|_| r.gen_range(-8.0f32..0.0)).collect();
        let mut reference: Vec<f32> = policy
            .iter()
            .map(|p| p - r.gen_range(-3.0f32..3.0))
            .collect();
        // Ratios exactly at the bounds keep their gradient.
        reference[0] = policy[0] - 1.5;
        let clamp = LogRatioClamp::default();
        let grad: Vec<f32> = (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect();
        let mut got = grad.clone();
        let mut want = grad.clone();
        emu::humanline_grad_mask(&policy, &reference, clamp, &mut got).unwrap();
        cpu::humanline_grad_mask(&policy, &reference, clamp, &mut want).unwrap();
        assert_eq!(got, want, "n {n}");
        assert!(
            n < 100 || (got.contains(&0.0) && got.iter().any(|&g| g != 0.0)),
            "n {n}: both cases occur"
        );
    }
    let mut g = vec![0.0f32; 3];
    assert_eq!(
        emu::humanline_grad_mask(&[0.0; 3], &[0.0; 2], LogRatioClamp::default(), &mut g)
            .unwrap_err(),
        cpu::humanline_grad_mask(&[0.0; 3], &[0.0; 2], LogRatioClamp::default(), &mut g)
            .unwrap_err()
    );
}
