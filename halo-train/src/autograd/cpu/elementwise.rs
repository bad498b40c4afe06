//! Element-wise ops: sums, bias broadcast, scaling, dropout.

use super::simd::avx2_twin;

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
