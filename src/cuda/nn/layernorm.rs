//! CUDA twin of halo-train's `autograd::cpu::layernorm`: layer normalization over the last
//! dimension, `y = (x − μ)·rstd·γ + β` with `rstd = 1/√(σ² + ε)` (biased variance), forward and
//! backward (kernels `nn_layernorm_forward`, `nn_layernorm_backward_dx`, `nn_ln_param_partials` in
//! `kernels/nn_layernorm.cu`, finished by `nn_column_sums_finish`).
//!
//! `dim = gamma.len()`, `rows = x.len() / dim`. An empty `x` is a no-op; an empty `gamma` (with
//! a non-empty `x`), an `x` that is not whole rows, or `eps` not finite and positive is an error.
//! Each row's statistics are block reductions in a fixed order, dγ/dβ are column sums over
//! chunks of rows added in chunk order: the same bits every run (not the CPU's bits: the sums
//! are grouped differently).

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use super::super::device::{cuda_err, CudaBackend};
use super::super::launch::{check_aligned, check_len};
use super::elementwise::{
    as_i64, column_chunks, column_partials_launch, element_ptr, row_launch, rows_of,
};
use crate::error::{HaloError, Result};

/// `eps` must be finite and positive (an `eps` of 0 makes a constant row's rstd infinite).
fn check_eps(eps: f32) -> Result<()> {
    if eps.is_finite() && eps > 0.0 {
        Ok(())
    } else {
        Err(HaloError::InvalidHyperParameter {
            name: "eps",
            value: eps as f64,
            reason: "layer norm's eps must be finite and > 0",
        })
    }
}

impl CudaBackend {
    /// Writes `y` (like `x`) and saves each row's mean and rstd (`rows` each) for the backward,
    /// like halo-train's `cpu::layernorm::layernorm_forward` (same argument order). Overwrites
    /// `y`, `mean` and `rstd`.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward(
        &self,
        x: &impl DevicePtr<f32>,
        gamma: &impl DevicePtr<f32>,
        beta: &impl DevicePtr<f32>,
        eps: f32,
        y: &mut impl DevicePtrMut<f32>,
        mean: &mut impl DevicePtrMut<f32>,
        rstd: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let dim = gamma.len();
        check_len("beta", dim, beta.len())?;
        check_len("y", x.len(), y.len())?;
        check_eps(eps)?;
        let rows = if x.len() == 0 {
            0
        } else {
            rows_of("x", x.len(), dim, "layernorm_forward")?
        };
        check_len("mean", rows, mean.len())?;
        check_len("rstd", rows, rstd.len())?;
        if rows == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (x_ptr, _r0) = x.device_ptr(stream);
        let (gamma_ptr, _r1) = gamma.device_ptr(stream);
        let (beta_ptr, _r2) = beta.device_ptr(stream);
        let (y_ptr, _w0) = y.device_ptr_mut(stream);
        let (mean_ptr, _w1) = mean.device_ptr_mut(stream);
        let (rstd_ptr, _w2) = rstd.device_ptr_mut(stream);
        for (what, ptr) in [
            ("x", x_ptr),
            ("gamma", gamma_ptr),
            ("beta", beta_ptr),
            ("y", y_ptr),
            ("mean", mean_ptr),
            ("rstd", rstd_ptr),
        ] {
            check_aligned::<f32>(what, ptr)?;
        }
        let (rows_arg, dim_arg) = (as_i64(rows), as_i64(dim));
        let mut launch = stream.launch_builder(self.function("nn_layernorm_forward")?);
        launch
            .arg(&x_ptr)
            .arg(&gamma_ptr)
            .arg(&beta_ptr)
            .arg(&rows_arg)
            .arg(&dim_arg)
            .arg(&eps)
            .arg(&y_ptr)
            .arg(&mean_ptr)
            .arg(&rstd_ptr);
        // SAFETY: `nn_layernorm_forward(const float* x, const float* gamma, const float* beta,
        // int64_t rows, int64_t dim, float eps, float* y, float* mean, float* rstd)`; x and y hold
        // rows · dim floats, gamma and beta dim, mean and rstd rows (checked); outputs are
        // borrowed mutably, so they cannot alias the inputs.
        unsafe { launch.launch(row_launch(rows, dim)) }
            .map_err(cuda_err("launch nn_layernorm_forward"))?;
        Ok(())
    }

    /// The backward of [`CudaBackend::layernorm_forward`], like halo-train's
    /// `cpu::layernorm::layernorm_backward` (same argument order): with `x̂ = (x − μ)·rstd` and
    /// `g = dy ⊙ γ`, `dx += rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂))`, `dγ += Σ_rows dy ⊙ x̂`,
    /// `dβ += Σ_rows dy`. All three accumulate; each is skipped when `None`.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        &self,
        x: &impl DevicePtr<f32>,
        gamma: &impl DevicePtr<f32>,
        mean: &impl DevicePtr<f32>,
        rstd: &impl DevicePtr<f32>,
        dy: &impl DevicePtr<f32>,
        dx: Option<&mut impl DevicePtrMut<f32>>,
        dgamma: Option<&mut impl DevicePtrMut<f32>>,
        dbeta: Option<&mut impl DevicePtrMut<f32>>,
    ) -> Result<()> {
        let dim = gamma.len();
        check_len("dy", x.len(), dy.len())?;
        let rows = if x.len() == 0 {
            0
        } else {
            rows_of("x", x.len(), dim, "layernorm_backward")?
        };
        check_len("mean", rows, mean.len())?;
        check_len("rstd", rows, rstd.len())?;
        if let Some(dx) = dx.as_ref() {
            check_len("dx", x.len(), dx.len())?;
        }
        if let Some(dgamma) = dgamma.as_ref() {
            check_len("dgamma", dim, dgamma.len())?;
        }
        if let Some(dbeta) = dbeta.as_ref() {
            check_len("dbeta", dim, dbeta.len())?;
        }
        if rows == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (x_ptr, _r0) = x.device_ptr(stream);
        let (gamma_ptr, _r1) = gamma.device_ptr(stream);
        let (mean_ptr, _r2) = mean.device_ptr(stream);
        let (rstd_ptr, _r3) = rstd.device_ptr(stream);
        let (dy_ptr, _r4) = dy.device_ptr(stream);
        for (what, ptr) in [
            ("x", x_ptr),
            ("gamma", gamma_ptr),
            ("mean", mean_ptr),
            ("rstd", rstd_ptr),
            ("dy", dy_ptr),
        ] {
            check_aligned::<f32>(what, ptr)?;
        }
        let (rows_arg, dim_arg) = (as_i64(rows), as_i64(dim));
        if let Some(dx) = dx {
            let (dx_ptr, _w) = dx.device_ptr_mut(stream);
            check_aligned::<f32>("dx", dx_ptr)?;
            let mut launch = stream.launch_builder(self.function("nn_layernorm_backward_dx")?);
            launch
                .arg(&x_ptr)
                .arg(&gamma_ptr)
                .arg(&mean_ptr)
                .arg(&rstd_ptr)
                .arg(&dy_ptr)
                .arg(&rows_arg)
                .arg(&dim_arg)
                .arg(&dx_ptr);
            // SAFETY: `nn_layernorm_backward_dx(const float* x, const float* gamma, const float*
            // mean, const float* rstd, const float* dy, int64_t rows, int64_t dim, float* dx)`;
            // x, dy and dx hold rows · dim floats, gamma dim, mean and rstd rows (checked); dx
            // is borrowed mutably.
            unsafe { launch.launch(row_launch(rows, dim)) }
                .map_err(cuda_err("launch nn_layernorm_backward_dx"))?;
        }
        if dgamma.is_none() && dbeta.is_none() {
            return Ok(());
        }
        // dγ's partials in chunks 0..chunks, dβ's in chunks..2·chunks of one scratch buffer.
        let (rows_per_chunk, chunks) = column_chunks(rows);
        let mut partials = self.alloc_output::<f32>(2 * chunks * dim)?;
        let (partials_ptr, _wp) = partials.device_ptr_mut(stream);
        let rpc_arg = as_i64(rows_per_chunk);
        let mut launch = stream.launch_builder(self.function("nn_ln_param_partials")?);
        launch
            .arg(&x_ptr)
            .arg(&mean_ptr)
            .arg(&rstd_ptr)
            .arg(&dy_ptr)
            .arg(&rows_arg)
            .arg(&dim_arg)
            .arg(&rpc_arg)
            .arg(&partials_ptr);
        // SAFETY: `nn_ln_param_partials(const float* x, const float* mean, const float* rstd,
        // const float* dy, int64_t rows, int64_t dim, int64_t rows_per_chunk, float* partials)`;
        // partials holds 2 · chunks · dim floats for chunks = ⌈rows / rows_per_chunk⌉; one block
        // per (chunk, column tile).
        unsafe { launch.launch(column_partials_launch(chunks, dim)?) }
            .map_err(cuda_err("launch nn_ln_param_partials"))?;
        if let Some(dgamma) = dgamma {
            let (out_ptr, _w) = dgamma.device_ptr_mut(stream);
            check_aligned::<f32>("dgamma", out_ptr)?;
            self.column_sums_finish(partials_ptr, chunks, dim, out_ptr)?;
        }
        if let Some(dbeta) = dbeta {
            let (out_ptr, _w) = dbeta.device_ptr_mut(stream);
            check_aligned::<f32>("dbeta", out_ptr)?;
            let beta_partials = element_ptr::<f32>(partials_ptr, chunks * dim);
            self.column_sums_finish(beta_partials, chunks, dim, out_ptr)?;
        }
        Ok(())
    }
}
