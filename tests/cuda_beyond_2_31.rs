//! A batch of more than 2^31 logits (16745 rows × vocab 128256 in bf16, 4.3 GB) through the CUDA
//! forward and the in-place backward, checked row by row against the CPU ops at sampled rows: the
//! first, the middle, the row whose logits straddle element 2^31, and the last. Every index past
//! 2^31 must be 64-bit for these rows to come out right (a 32-bit `row * vocab` wraps there).
//!
//! Runs on the real GPU when there is one, else on the emulated device (host memory: ~9 GB).

mod device_support;

use half::bf16;
use halo_kernels::{cpu, IGNORE_INDEX};
use rayon::prelude::*;

const ROWS: usize = 16745;
const VOCAB: usize = 128256;

/// A cheap, well-mixed value in [-1, 1) for element `i` (splitmix64), so the 4.3 GB of logits are
/// generated in parallel in a few seconds and every row differs from every other.
fn unit(i: u64) -> f32 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

#[test]
fn forward_and_in_place_backward_beyond_2_31_logits() {
    const { assert!(ROWS * VOCAB > 1usize << 31) };
    let gpu = device_support::cuda();
    let mut logits = vec![bf16::ZERO; ROWS * VOCAB];
    logits
        .par_chunks_mut(VOCAB)
        .enumerate()
        .for_each(|(r, row)| {
            // A per-row offset, so a row read from the wrong place gives another lse.
            let offset = 8.0 * unit(r as u64 ^ 0x5555);
            for (v, x) in row.iter_mut().enumerate() {
                *x = bf16::from_f32(offset + 6.0 * unit((r * VOCAB + v) as u64));
            }
        });
    let labels: Vec<i32> = (0..ROWS)
        .map(|r| {
            if r % 7 == 3 {
                IGNORE_INDEX
            } else {
                ((unit(r as u64 + 17) + 1.0) * 0.5 * VOCAB as f32) as i32 % VOCAB as i32
            }
        })
        .collect();
    let grad_logp: Vec<f32> = (0..ROWS).map(|r| unit(r as u64 + 99)).collect();
    let straddling = (1usize << 31) / VOCAB; // its logits run across element 2^31
    let sampled = [0, 1, ROWS / 2, straddling, straddling + 1, ROWS - 1];
    for &r in &sampled {
        assert_ne!(labels[r], IGNORE_INDEX, "sampled row {r} is counted");
    }

    let d_labels = gpu.htod(&labels).unwrap();
    let d_grad = gpu.htod(&grad_logp).unwrap();
    let mut d_logits = gpu.htod(&logits).unwrap();
    let out = gpu
        .token_logprobs(&d_logits, &d_labels, VOCAB, IGNORE_INDEX)
        .expect("GPU forward");
    let (logp, lse) = (gpu.dtoh(&out.logp).unwrap(), gpu.dtoh(&out.lse).unwrap());
    gpu.token_logprobs_backward_inplace(
        &mut d_logits,
        &d_labels,
        out.saved_lse(),
        &d_grad,
        VOCAB,
        IGNORE_INDEX,
    )
    .expect("GPU backward in place");

    for &r in &sampled {
        let row = &logits[r * VOCAB..(r + 1) * VOCAB];
        let label = [labels[r]];
        let want = cpu::token_logprobs(row, &label, VOCAB, IGNORE_INDEX).unwrap();
        assert!(
            (logp[r] - want.logp[0]).abs() <= 1e-4 * (1.0 + want.logp[0].abs())
                && (lse[r] - want.lse[0]).abs() <= 1e-4 * (1.0 + want.lse[0].abs()),
            "row {r}: GPU logp {} lse {} vs CPU {} {}",
            logp[r],
            lse[r],
            want.logp[0],
            want.lse[0]
        );
        let mut want_grad = row.to_vec();
        cpu::token_logprobs_backward_inplace(
            &mut want_grad,
            &label,
            want.saved_lse(),
            &grad_logp[r..=r],
            VOCAB,
            IGNORE_INDEX,
        )
        .unwrap();
        let got_grad = gpu
            .dtoh(&d_logits.slice(r * VOCAB..(r + 1) * VOCAB))
            .unwrap();
        for (v, (g, w)) in got_grad.iter().zip(&want_grad).enumerate() {
            let (g, w) = (g.to_f32(), w.to_f32());
            // One bf16 rounding of the stored gradient apart (the lse agrees to f32 rounding).
            assert!(
                (g - w).abs() <= 1e-6 + w.abs() / 128.0,
                "row {r} column {v}: GPU gradient {g} vs CPU {w}"
            );
        }
    }
    // The ignored rows' gradient is exactly 0 on the device too.
    let ignored = 3;
    let zeros = gpu
        .dtoh(&d_logits.slice(ignored * VOCAB..(ignored + 1) * VOCAB))
        .unwrap();
    assert!(
        zeros.iter().all(|z| z.to_f32() == 0.0),
        "ignored row {ignored}"
    );
}
