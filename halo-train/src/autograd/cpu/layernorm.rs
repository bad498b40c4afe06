//! Layer normalization over the last dimension:
//! `y = (x − μ) · rstd · γ + β` with `rstd = 1/√(σ² + ε)` (biased variance, as `torch.nn.LayerNorm`).

use rayon::prelude::*;

use super::rows_per_task;

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
        .for_each(|((yr, xr), (mu, rs))| {
            let m = xr.iter().sum::<f32>() / dim as f32;
            let var = xr.iter().map(|&v| (v - m) * (v - m)).sum::<f32>() / dim as f32;
            let r = 1.0 / (var + eps).sqrt();
            for (((o, &v), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                *o = (v - m) * r * g + b;
            }
            *mu = m;
            *rs = r;
        });
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
            .for_each(|((dxr, (xr, dyr)), (&m, &r))| {
                let mut mean_g = 0.0f32;
                let mut mean_gx = 0.0f32;
                for ((&v, &d), &g) in xr.iter().zip(dyr).zip(gamma) {
                    let gi = d * g;
                    mean_g += gi;
                    mean_gx += gi * (v - m) * r;
                }
                mean_g /= dim as f32;
                mean_gx /= dim as f32;
                for (((o, &v), &d), &g) in dxr.iter_mut().zip(xr).zip(dyr).zip(gamma) {
                    let xhat = (v - m) * r;
                    *o += r * (d * g - mean_g - xhat * mean_gx);
                }
            });
    }
    if let Some(dgamma) = dgamma {
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
    if let Some(dbeta) = dbeta {
        for dyr in dy.chunks_exact(dim) {
            super::elementwise::accumulate(dbeta, dyr);
        }
    }
}
