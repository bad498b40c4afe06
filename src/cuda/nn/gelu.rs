//! CUDA twin of halo-train's `autograd::cpu::gelu`: GELU, tanh approximation (GPT-2's
//! `gelu_new`), `y = ½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))`, element-wise (kernels
//! `nn_gelu_forward`, `nn_gelu_backward` in `kernels/nn_gelu.cu`). The device's `tanhf` is
//! accurate to a few ulps; the CPU twin's `1 − 2/(e^{2u} + 1)` agrees within ~1e-7 absolute.
//! Empty inputs are a no-op.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use super::super::device::{cuda_err, CudaBackend};
use super::super::launch::{check_aligned, check_len};
use super::elementwise::{as_i64, flat_launch};
use crate::error::Result;

impl CudaBackend {
    /// `y = gelu(x)` element-wise (same lengths), like halo-train's `cpu::gelu::gelu_forward`.
    /// Overwrites `y`.
    pub fn gelu_forward(
        &self,
        x: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_len("y", x.len(), y.len())?;
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (x_ptr, _r) = x.device_ptr(stream);
        let (y_ptr, _w) = y.device_ptr_mut(stream);
        check_aligned::<f32>("x", x_ptr)?;
        check_aligned::<f32>("y", y_ptr)?;
        let n_arg = as_i64(n);
        let mut launch = stream.launch_builder(self.function("nn_gelu_forward")?);
        launch.arg(&x_ptr).arg(&y_ptr).arg(&n_arg);
        // SAFETY: `nn_gelu_forward(const float* x, float* y, int64_t n)`; both hold n floats
        // (checked); y is borrowed mutably, so it cannot alias x.
        unsafe { launch.launch(flat_launch(n)) }.map_err(cuda_err("launch nn_gelu_forward"))?;
        Ok(())
    }

    /// `dx += dy · gelu'(x)` (same lengths), like halo-train's `cpu::gelu::gelu_backward`:
    /// accumulates into `dx`.
    pub fn gelu_backward(
        &self,
        x: &impl DevicePtr<f32>,
        dy: &impl DevicePtr<f32>,
        dx: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_len("dy", x.len(), dy.len())?;
        check_len("dx", x.len(), dx.len())?;
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (x_ptr, _r0) = x.device_ptr(stream);
        let (dy_ptr, _r1) = dy.device_ptr(stream);
        let (dx_ptr, _w) = dx.device_ptr_mut(stream);
        check_aligned::<f32>("x", x_ptr)?;
        check_aligned::<f32>("dy", dy_ptr)?;
        check_aligned::<f32>("dx", dx_ptr)?;
        let n_arg = as_i64(n);
        let mut launch = stream.launch_builder(self.function("nn_gelu_backward")?);
        launch.arg(&x_ptr).arg(&dy_ptr).arg(&dx_ptr).arg(&n_arg);
        // SAFETY: `nn_gelu_backward(const float* x, const float* dy, float* dx, int64_t n)`; all
        // hold n floats (checked); dx is borrowed mutably.
        unsafe { launch.launch(flat_launch(n)) }.map_err(cuda_err("launch nn_gelu_backward"))?;
        Ok(())
    }
}
