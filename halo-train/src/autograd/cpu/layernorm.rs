//! Layer normalization over the last dimension:
//! `y = (x − μ) · rstd · γ + β` with `rstd = 1/√(σ² + ε)` (biased variance, as `torch.nn.LayerNorm`).

use rayon::prelude::*;

use super::rows_per_task;
use super::simd::{avx2_twin, sum, sum_zip};

/// Writes `y` and saves each row's mean and rstd for the backward.
pub fn layernorm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let dim = gamma.len();
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(rows_per_task(dim))
        .for_each(|((yr, xr), (mu, rs))| (*mu, *rs) = forward_row(xr, gamma, beta, eps, yr));
}

avx2_twin! {
    /// One row of [`layernorm_forward`]; returns its mean and rstd.
    fn forward_row(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) -> (f32, f32) {
        let dim = x.len() as f32;
        let m = sum(x) / dim;
        let var = sum_zip(x, x, |v, _| (v - m) * (v - m)) / dim;
        let r = 1.0 / (var + eps).sqrt();
        for (((o, &v), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
            *o = (v - m) * r * g + b;
        }
        (m, r)
    }
}

/// With `x̂ = (x − μ)·rstd` and `g = dy ⊙ γ`: `dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂))`,
/// `dγ += Σ_rows dy ⊙ x̂`, `dβ += Σ_rows dy`. All three accumulate.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
) {
    let dim = gamma.len();
    if let Some(dx) = dx {
        dx.par_chunks_mut(dim)
            .zip(x.par_chunks(dim).zip(dy.par_chunks(dim)))
            .zip(mean.par_iter().zip(rstd.par_iter()))
            .with_min_len(rows_per_task(dim))
            .for_each(|((dxr, (xr, dyr)), (&m, &r))| backward_row(xr, dyr, gamma, m, r, dxr));
    }
    if let Some(dgamma) = dgamma {
        gamma_backward(x, dy, mean, rstd, dgamma);
    }
    if let Some(dbeta) = dbeta {
        super::elementwise::bias_backward(dy, dbeta);
    }
}

avx2_twin! {
    /// One row of the `dx` of [`layernorm_backward`].
    fn backward_row(x: &[f32], dy: &[f32], gamma: &[f32], m: f32, r: f32, dx: &mut [f32]) {
        let dim = x.len() as f32;
        let mean_g = sum_zip(dy, gamma, |d, g| d * g) / dim;
        // Σ g·x̂ = rstd · Σ g·(x − μ): rstd taken out of the sum.
        let mean_gx = with_gamma(x, dy, gamma, |v, d, g| d * g * (v - m)) * r / dim;
        for (((o, &v), &d), &g) in dx.iter_mut().zip(x).zip(dy).zip(gamma) {
            let xhat = (v - m) * r;
            *o += r * (d * g - mean_g - xhat * mean_gx);
        }
    }
}

avx2_twin! {
    /// `dγ += Σ_rows dy ⊙ x̂`.
    fn gamma_backward(x: &[f32], dy: &[f32], mean: &[f32], rstd: &[f32], dgamma: &mut [f32]) {
        let dim = dgamma.len();
        for ((xr, dyr), (&m, &r)) in x
            .chunks_exact(dim)
            .zip(dy.chunks_exact(dim))
            .zip(mean.iter().zip(rstd))
        {
            for ((o, &v), &d) in dgamma.iter_mut().zip(xr).zip(dyr) {
                *o += d * (v - m) * r;
            }
        }
    }
}

/// `Σ f(x_i, dy_i, γ_i)` with the partial sums of [`sum`].
#[inline(always)]
fn with_gamma(x: &[f32], dy: &[f32], gamma: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut cx = x.chunks_exact(16);
    let mut cd = dy.chunks_exact(16);
    let mut cg = gamma.chunks_exact(16);
    for ((xs, ds), gs) in (&mut cx).zip(&mut cd).zip(&mut cg) {
        for (((s, &v), &d), &g) in acc.iter_mut().zip(xs).zip(ds).zip(gs) {
            *s += f(v, d, g);
        }
    }
    let tail: f32 = cx
        .remainder()
        .iter()
        .zip(cd.remainder())
        .zip(cg.remainder())
        .map(|((&v, &d), &g)| f(v, d, g))
        .sum();
    sum(&acc) + tail
}
