//! Shared test helpers: seeded random inputs and plain f64 references for the CPU token ops.
//!
//! The references are written from the math alone (see `BRIEF.md`), never from the crate's code:
//! `logp = z[y] − logsumexp(z)`, `∂/∂z[v] = g · (1[v = y] − softmax(z)[v])`, masked per-sequence
//! sums. They take logits already converted to f64 from the *stored* values (after rounding to
//! bf16/f16), so the only difference left between reference and implementation is the op's own
//! arithmetic. Use from a test file with `mod common;`.

#![allow(dead_code)]

use std::ops::Range;

use halo_kernels::cpu::SequenceLayout;
use halo_kernels::LogitElement;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deterministic generator for a test; different seeds give independent streams.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A standard normal sample (Box–Muller; `rand_distr` is not a dependency).
pub fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `rows × vocab` logits, normal with standard deviation `scale`, never exactly zero.
pub fn random_logits(rows: usize, vocab: usize, scale: f64, rng: &mut impl Rng) -> Vec<f32> {
    (0..rows * vocab)
        .map(|_| loop {
            let x = (normal(rng) * scale) as f32;
            if x != 0.0 {
                break x;
            }
        })
        .collect()
}

/// Labels in `0..vocab`, each replaced by `ignore_index` with probability `ignored_fraction`.
pub fn random_labels(
    rows: usize,
    vocab: usize,
    ignored_fraction: f64,
    ignore_index: i32,
    rng: &mut impl Rng,
) -> Vec<i32> {
    (0..rows)
        .map(|_| {
            if rng.gen_bool(ignored_fraction) {
                ignore_index
            } else {
                rng.gen_range(0..vocab as i32)
            }
        })
        .collect()
}

/// Values in `[lo, hi)` that are never exactly zero (per-token log-probs, upstream gradients...).
pub fn random_values(n: usize, lo: f32, hi: f32, rng: &mut impl Rng) -> Vec<f32> {
    (0..n)
        .map(|_| loop {
            let x: f32 = rng.gen_range(lo..hi);
            if x != 0.0 {
                break x;
            }
        })
        .collect()
}

/// Rounds f32 values into the storage type `T`.
pub fn to_elements<T: LogitElement>(values: &[f32]) -> Vec<T> {
    values.iter().map(|&x| T::from_f32(x)).collect()
}

/// The stored values of a `T` buffer, exactly, as f64.
pub fn to_f64<T: LogitElement>(values: &[T]) -> Vec<f64> {
    values.iter().map(|x| x.to_f32() as f64).collect()
}

/// f64 logsumexp of one row (max-shifted, so ±1e4 logits are fine).
pub fn ref_logsumexp(row: &[f64]) -> f64 {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + row.iter().map(|&z| (z - max).exp()).sum::<f64>().ln()
}

/// Reference per-token log-probs and logsumexps: `(logp, lse)`, both 0 on ignored rows.
pub fn ref_token_logprobs(
    logits: &[f64],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(logits.len(), labels.len() * vocab);
    let mut logp = vec![0.0; labels.len()];
    let mut lse = vec![0.0; labels.len()];
    for (r, &y) in labels.iter().enumerate() {
        if y == ignore_index {
            continue;
        }
        let row = &logits[r * vocab..(r + 1) * vocab];
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let ln_sum = row.iter().map(|&z| (z - max).exp()).sum::<f64>().ln();
        lse[r] = max + ln_sum;
        logp[r] = (row[y as usize] - max) - ln_sum;
    }
    (logp, lse)
}

/// Reference gradient of `Σ_r grad_logp[r] · logp[r]` w.r.t. the logits:
/// `g · (1[v = y] − softmax(z)[v])`, zero rows where ignored. Softmax is computed from the logits
/// in f64, not from any saved logsumexp.
pub fn ref_backward(
    logits: &[f64],
    labels: &[i32],
    grad_logp: &[f64],
    vocab: usize,
    ignore_index: i32,
) -> Vec<f64> {
    assert_eq!(logits.len(), labels.len() * vocab);
    let mut grad = vec![0.0; logits.len()];
    for (r, &y) in labels.iter().enumerate() {
        if y == ignore_index {
            continue;
        }
        let row = &logits[r * vocab..(r + 1) * vocab];
        let lse = ref_logsumexp(row);
        for (v, (&z, d)) in row.iter().zip(&mut grad[r * vocab..]).enumerate() {
            let one_hot = if v == y as usize { 1.0 } else { 0.0 };
            *d = grad_logp[r] * (one_hot - (z - lse).exp());
        }
    }
    grad
}

/// The row ranges of a layout, computed here independently of the crate (panics if invalid).
pub fn ref_ranges(layout: &SequenceLayout<'_>, rows: usize) -> Vec<Range<usize>> {
    let ranges: Vec<Range<usize>> = match *layout {
        SequenceLayout::Padded { batch, seq } => {
            (0..batch).map(|b| b * seq..b * seq + seq).collect()
        }
        SequenceLayout::Packed { cu_seqlens } => cu_seqlens
            .windows(2)
            .map(|w| w[0] as usize..w[1] as usize)
            .collect(),
    };
    assert_eq!(
        ranges.last().map_or(0, |r| r.end),
        rows,
        "reference layout does not cover rows"
    );
    ranges
}

/// Reference masked per-sequence sums and counts: `(sums, counts)`.
pub fn ref_sequence_sums(
    values: &[f64],
    labels: &[i32],
    ignore_index: i32,
    layout: &SequenceLayout<'_>,
) -> (Vec<f64>, Vec<u32>) {
    ref_ranges(layout, labels.len())
        .into_iter()
        .map(|range| {
            range
                .filter(|&t| labels[t] != ignore_index)
                .fold((0.0, 0u32), |(s, c), t| (s + values[t], c + 1))
        })
        .unzip()
}

/// Reference per-sequence sums of `policy − reference`, each token clamped to `[min, max]` when
/// `clamp` is given (the humanline clamp).
pub fn ref_logratio_sums(
    policy: &[f64],
    reference: &[f64],
    labels: &[i32],
    ignore_index: i32,
    layout: &SequenceLayout<'_>,
    clamp: Option<(f64, f64)>,
) -> (Vec<f64>, Vec<u32>) {
    let ratios: Vec<f64> = policy
        .iter()
        .zip(reference)
        .map(|(&p, &r)| match clamp {
            Some((lo, hi)) => (p - r).clamp(lo, hi),
            None => p - r,
        })
        .collect();
    ref_sequence_sums(&ratios, labels, ignore_index, layout)
}

/// Reference backward of the (optionally clamped) sums w.r.t. the policy log-probs: each counted
/// token gets its sequence's gradient, times 0 where the clamp is active (strictly outside).
pub fn ref_sequence_grad(
    grad_seq: &[f64],
    policy: &[f64],
    reference: &[f64],
    labels: &[i32],
    ignore_index: i32,
    layout: &SequenceLayout<'_>,
    clamp: Option<(f64, f64)>,
) -> Vec<f64> {
    let mut out = vec![0.0; labels.len()];
    for (range, &g) in ref_ranges(layout, labels.len()).into_iter().zip(grad_seq) {
        for t in range {
            let active = match clamp {
                Some((lo, hi)) => {
                    let ratio = policy[t] - reference[t];
                    ratio < lo || ratio > hi
                }
                None => false,
            };
            if labels[t] != ignore_index && !active {
                out[t] = g;
            }
        }
    }
    out
}

/// Asserts `|got − want| ≤ rel · |want| + abs` element-wise, naming the first failure.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs() + abs;
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w}, |diff| {} > tol {tol}",
            (g - w).abs()
        );
    }
}

/// f32 slice to f64, for comparisons.
pub fn f32s_to_f64(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&x| x as f64).collect()
}
