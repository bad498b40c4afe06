//! Element-wise ops: sums, bias broadcast, scaling, dropout.

use super::simd::{avx2_twin, reduce};

avx2_twin! {
    /// `dst += src`.
    pub fn accumulate(dst: &mut [f32], src: &[f32]) {
        debug_assert_eq!(dst.len(), src.len());
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

avx2_twin! {
    /// `dst += factor · src`.
    pub fn accumulate_scaled(dst: &mut [f32], src: &[f32], factor: f32) {
        debug_assert_eq!(dst.len(), src.len());
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += factor * s;
        }
    }
}

avx2_twin! {
    /// `y[r, c] = x[r, c] + b[c]`.
    pub fn add_bias_forward(x: &[f32], b: &[f32], y: &mut [f32]) {
        let cols = b.len();
        for (yr, xr) in y.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            for ((o, &xi), &bi) in yr.iter_mut().zip(xr).zip(b) {
                *o = xi + bi;
            }
        }
    }
}

avx2_twin! {
    /// `db[c] += Σ_r dy[r, c]`.
    pub fn bias_backward(dy: &[f32], db: &mut [f32]) {
        let cols = db.len();
        for row in dy.chunks_exact(cols) {
            for (d, &s) in db.iter_mut().zip(row) {
                *d += s;
            }
        }
    }
}

/// Fills `mask` with 0 (dropped, probability `p`) or `1/(1−p)` (kept, rescaled so the
/// expectation of `x · mask` is `x`: "inverted dropout", as `torch.nn.functional.dropout`).
pub fn dropout_mask(mask: &mut [f32], p: f32, rng: &mut impl rand::Rng) {
    let keep_scale = 1.0 / (1.0 - p);
    for m in mask.iter_mut() {
        *m = if rng.gen::<f32>() < p {
            0.0
        } else {
            keep_scale
        };
    }
}

avx2_twin! {
    /// `y = x ⊙ m`; also the backward `dx += dy ⊙ m` with `accumulate_product`.
    pub fn multiply(x: &[f32], m: &[f32], y: &mut [f32]) {
        for ((o, &a), &b) in y.iter_mut().zip(x).zip(m) {
            *o = a * b;
        }
    }
}

avx2_twin! {
    /// `dst += a ⊙ b`.
    pub fn accumulate_product(dst: &mut [f32], a: &[f32], b: &[f32]) {
        for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
            *d += x * y;
        }
    }
}

/// Partial sums of [`sum_of_squares`]: enough independent f64 additions in flight to hide their
/// latency (one running sum waited 4 cycles an element: 3.5 ms for the 4×256 model's 3.2M
/// gradients, serial, every step).
const SQUARE_LANES: usize = 8;

avx2_twin! {
    /// `Σ x²` accumulated in f64, element `i` into partial sum `i mod 8`, the partial sums
    /// added pairwise at the end: the same value whichever build runs.
    pub fn sum_of_squares(x: &[f32]) -> f64 {
        let mut acc = [0.0f64; SQUARE_LANES];
        let mut chunks = x.chunks_exact(SQUARE_LANES);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v as f64 * v as f64;
            }
        }
        for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
            *a += v as f64 * v as f64;
        }
        reduce(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_of_squares_matches_f64_at_awkward_lengths() {
        for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 100, 1001] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
                .collect();
            let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let got = sum_of_squares(&x);
            assert!(
                (got - want).abs() <= 1e-12 * (1.0 + want),
                "{len}: {got} vs {want}"
            );
        }
        assert_eq!(sum_of_squares(&[3.0, 4.0]), 25.0);
    }
}
