//! Shared helpers of the emulated-kernel tests: seeded random inputs and tolerant comparisons.
#![allow(dead_code)]

use halo_kernels::LogitElement;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const IGNORE: i32 = halo_kernels::IGNORE_INDEX;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Logits in [-scale, scale] (never all zero), stored in `T`.
pub fn random_logits<T: LogitElement>(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.gen_range(-scale..scale)))
        .collect()
}

/// Labels in 0..vocab with about `ignore_fraction` of them the ignore index.
pub fn random_labels(
    rng: &mut ChaCha8Rng,
    rows: usize,
    vocab: usize,
    ignore_fraction: f64,
) -> Vec<i32> {
    (0..rows)
        .map(|_| {
            if rng.gen_bool(ignore_fraction) {
                IGNORE
            } else {
                rng.gen_range(0..vocab as i32)
            }
        })
        .collect()
}

/// |a − b| ≤ abs + rel · max(|a|, |b|), element by element, with a useful message.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = abs + rel * g.abs().max(w.abs());
        assert!(
            (g - w).abs() <= tol || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: got {g}, want {w} (|diff| {} > tol {tol})",
            (g - w).abs()
        );
    }
}

pub fn to_f32<T: LogitElement>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}
