//! Helpers shared by the `losses_*` and `end_to_end_gradcheck` tests.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Random summed log-probs in `[lo, hi]` (never zero).
pub fn logps(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// `base + noise` with noise in `[-spread, spread]`.
pub fn perturbed(rng: &mut ChaCha8Rng, base: &[f32], spread: f32) -> Vec<f32> {
    base.iter()
        .map(|&b| b + rng.gen_range(-spread..spread))
        .collect()
}

pub fn counts(rng: &mut ChaCha8Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.gen_range(1..300)).collect()
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `|got − want| ≤ rel·|want| + abs`.
pub fn assert_close(what: &str, got: f64, want: f64, rel: f64, abs: f64) {
    assert!(
        (got - want).abs() <= rel * want.abs() + abs,
        "{what}: got {got}, want {want} (diff {})",
        (got - want).abs()
    );
}

/// Gradient check: every element within `rel · max_j |want_j|` (+ a tiny absolute floor), and
/// the sign agrees wherever `want` is not negligible.
pub fn assert_grad_close(what: &str, got: &[f32], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rel * scale + 1e-12;
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}[{i}]: analytic {g}, finite difference {w} (tol {tol}, scale {scale})"
        );
    }
}

pub fn mean(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.into_iter().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

pub fn assert_opt_close(what: &str, got: Option<f64>, want: Option<f64>) {
    match (got, want) {
        (Some(g), Some(w)) => assert_close(what, g, w, 1e-9, 1e-12),
        (None, None) => {}
        _ => panic!("{what}: got {got:?}, want {want:?}"),
    }
}
