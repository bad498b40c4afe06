//! One AdamW step of one parameter buffer on the device (kernels `nn_adamw_step_f32`,
//! `nn_adamw_step_clipped_f32` and `nn_adamw_step_clipped_write_back_f32` in
//! `kernels/nn_adamw.cu`): the CUDA twin of halo-train's `model::optim::AdamW::step` for one
//! parameter, element-wise and in the CPU's order (decay the parameter, update `m` and `v`,
//! bias-correct, update). Every operation is rounded on its own, so a step gives the CPU's bits.
//!
//! The step's host scalars — learning rate, betas, ε, the decay factor and the bias corrections —
//! are computed on the host exactly as the CPU computes them ([`AdamWScalars::new`]). The clipped
//! variants multiply each gradient element by the device clip factor of
//! [`CudaBackend::grad_norm_clip`] first: the same f32 product the CPU's `clip_grad_norm` stores
//! before its step, so clipping on the device and then stepping gives the CPU's result without a
//! host read. [`CudaBackend::adamw_step_clipped_write_back`] also leaves the gradient scaled, as
//! the CPU's `clip_grad_norm` does.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use super::super::device::{cuda_err, CudaBackend};
use super::super::launch::{blocks_launch, check_aligned};
use crate::error::{HaloError, Result};
use crate::validate::check_len;

/// The clipped variants' device pointers and lengths: the clip factor `[1]` and the gate (status
/// entries; `(0, 0)` for none).
struct Clip {
    factor: (u64, usize),
    gate: (u64, usize),
}

/// Threads per block (`HALO_ADAMW_THREADS` in the kernel).
const ADAMW_THREADS: u32 = 256;

/// At most this many blocks per launch; larger buffers are covered by a grid-stride loop.
const ADAMW_MAX_BLOCKS: usize = 4096;

/// The host scalars of one AdamW step of one parameter, computed as halo-train's `AdamW::step`
/// computes them (f32 throughout).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// Learning rate of this step.
    pub lr: f32,
    /// β₁, decay rate of the first moment.
    pub beta1: f32,
    /// β₂, decay rate of the second moment.
    pub beta2: f32,
    /// ε added to `√v̂`.
    pub eps: f32,
    /// The parameter's decoupled-decay factor: `1 − lr·λ` for a decaying parameter, else 1.
    pub decay: f32,
    /// `1 − β₁ᵗ` with `t` the step count (from 1).
    pub bias_correction1: f32,
    /// `1 − β₂ᵗ`.
    pub bias_correction2: f32,
}

impl AdamWScalars {
    /// The scalars of step `step` (counted from 1: the CPU's count after its increment) for a
    /// parameter that `decays` (weight decay `weight_decay`) or not, as `AdamW::step` computes
    /// them: `decay = 1 − lr·λ` (or 1), `bias_correctionₖ = 1 − βₖ.powi(step)`.
    ///
    /// Errors (`InvalidHyperParameter`): a NaN or ±inf `lr`, `eps` or `weight_decay`; a beta
    /// outside `[0, 1)` (β = 1 makes a bias correction 0); `step` 0 or above `i32::MAX`. The CPU
    /// optimizer checks none of these and would produce NaN or ±inf parameters instead.
    pub fn new(
        lr: f32,
        betas: (f32, f32),
        eps: f32,
        weight_decay: f32,
        decays: bool,
        step: u32,
    ) -> Result<Self> {
        for (name, value) in [("lr", lr), ("eps", eps), ("weight_decay", weight_decay)] {
            if !value.is_finite() {
                return Err(HaloError::InvalidHyperParameter {
                    name,
                    value: value as f64,
                    reason: "must be finite",
                });
            }
        }
        for (name, value) in [("beta1", betas.0), ("beta2", betas.1)] {
            if !(0.0..1.0).contains(&value) {
                return Err(HaloError::InvalidHyperParameter {
                    name,
                    value: value as f64,
                    reason: "must lie in [0, 1)",
                });
            }
        }
        let step = i32::try_from(step).ok().filter(|&s| s >= 1).ok_or(
            HaloError::InvalidHyperParameter {
                name: "step",
                value: step as f64,
                reason: "must lie in 1..=i32::MAX (the count after the step's increment)",
            },
        )?;
        Ok(Self {
            lr,
            beta1: betas.0,
            beta2: betas.1,
            eps,
            decay: if decays { 1.0 - lr * weight_decay } else { 1.0 },
            bias_correction1: 1.0 - betas.0.powi(step),
            bias_correction2: 1.0 - betas.1.powi(step),
        })
    }
}

/// Which entry point of `kernels/nn_adamw.cu` a step launches.
#[derive(Clone, Copy)]
enum Variant {
    Plain,
    Clipped,
    ClippedWriteBack,
}

impl CudaBackend {
    /// One AdamW step of one parameter: `param`, its first and second moments `m`, `v` updated
    /// in place from `grad` (the CPU's `AdamW::step` for this parameter). Queued, not waited for.
    /// Errors: `grad`, `m` or `v` not of `param`'s length (`LengthMismatch`). Zero elements: nothing
    /// is queued.
    pub fn adamw_step(
        &self,
        param: &mut impl DevicePtrMut<f32>,
        grad: &impl DevicePtr<f32>,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        scalars: &AdamWScalars,
    ) -> Result<()> {
        let n = param.len();
        check_len("gradient", n, grad.len())?;
        let stream = self.stream();
        let (grad_ptr, _r0) = grad.device_ptr(stream);
        self.launch_adamw(Variant::Plain, param, grad_ptr, m, v, None, scalars)
    }

    /// [`CudaBackend::adamw_step`] with the gradient multiplied by the device clip factor first
    /// (`clip_factor`: one element, e.g. the factor slot of [`CudaBackend::grad_norm_clip`]'s
    /// output). `grad` itself is left as it was. Errors: as `adamw_step`, and `clip_factor` not of
    /// one element.
    pub fn adamw_step_clipped(
        &self,
        param: &mut impl DevicePtrMut<f32>,
        grad: &impl DevicePtr<f32>,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        clip_factor: &impl DevicePtr<f32>,
        scalars: &AdamWScalars,
    ) -> Result<()> {
        self.adamw_clipped(param, grad, m, v, clip_factor, (0, 0), scalars)
    }

    /// [`CudaBackend::adamw_step_clipped`] *gated* on `gate`: status entries on the device (the
    /// checks of the kernels that computed `grad`, e.g. gathered from their `KernelStatus`
    /// buffers). Unless every entry is `STATUS_OK`, the step writes nothing: the parameters and
    /// moments stay as they were, so a step whose checks the host reads only afterwards (with the
    /// loss, in one read) never applies a gradient computed from bad input.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step_clipped_gated(
        &self,
        param: &mut impl DevicePtrMut<f32>,
        grad: &impl DevicePtr<f32>,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        clip_factor: &impl DevicePtr<f32>,
        gate: &impl DevicePtr<i32>,
        scalars: &AdamWScalars,
    ) -> Result<()> {
        let (gate_ptr, _r) = gate.device_ptr(self.stream());
        check_aligned::<i32>("gate", gate_ptr)?;
        let gate = (gate_ptr, gate.len());
        self.adamw_clipped(param, grad, m, v, clip_factor, gate, scalars)
    }

    /// The clipped step, gated on the `gate.1` status entries at device address `gate.0` (none
    /// when 0; the caller holds the gate's guard until the launch is queued).
    #[allow(clippy::too_many_arguments)]
    fn adamw_clipped(
        &self,
        param: &mut impl DevicePtrMut<f32>,
        grad: &impl DevicePtr<f32>,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        clip_factor: &impl DevicePtr<f32>,
        gate: (u64, usize),
        scalars: &AdamWScalars,
    ) -> Result<()> {
        let n = param.len();
        check_len("gradient", n, grad.len())?;
        let stream = self.stream();
        let (grad_ptr, _r0) = grad.device_ptr(stream);
        let (clip_ptr, _r1) = clip_factor.device_ptr(stream);
        let clip = Clip {
            factor: (clip_ptr, clip_factor.len()),
            gate,
        };
        self.launch_adamw(Variant::Clipped, param, grad_ptr, m, v, Some(clip), scalars)
    }

    /// [`CudaBackend::adamw_step_clipped`] that also stores the scaled gradient into `grad` (the
    /// gradients the CPU's `clip_grad_norm` leaves behind).
    pub fn adamw_step_clipped_write_back(
        &self,
        param: &mut impl DevicePtrMut<f32>,
        grad: &mut impl DevicePtrMut<f32>,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        clip_factor: &impl DevicePtr<f32>,
        scalars: &AdamWScalars,
    ) -> Result<()> {
        let n = param.len();
        check_len("gradient", n, grad.len())?;
        let stream = self.stream();
        let (grad_ptr, _w0) = grad.device_ptr_mut(stream);
        let (clip_ptr, _r1) = clip_factor.device_ptr(stream);
        let clip = Clip {
            factor: (clip_ptr, clip_factor.len()),
            gate: (0, 0),
        };
        self.launch_adamw(
            Variant::ClippedWriteBack,
            param,
            grad_ptr,
            m,
            v,
            Some(clip),
            scalars,
        )
    }

    /// Checks the other lengths and queues `variant` (the gradient's length already checked).
    #[allow(clippy::too_many_arguments)]
    fn launch_adamw(
        &self,
        variant: Variant,
        param: &mut impl DevicePtrMut<f32>,
        grad_ptr: u64,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        clip: Option<Clip>,
        s: &AdamWScalars,
    ) -> Result<()> {
        let n = param.len();
        check_len("first moment `m`", n, m.len())?;
        check_len("second moment `v`", n, v.len())?;
        if let Some(c) = &clip {
            check_len("clip_factor", 1, c.factor.1)?;
        }
        if n == 0 {
            return Ok(());
        }
        let len = i64::try_from(n)
            .map_err(|_| HaloError::InvalidShape(format!("{n} parameters exceed i64")))?;
        let cfg = blocks_launch(
            n.div_ceil(ADAMW_THREADS as usize).min(ADAMW_MAX_BLOCKS),
            ADAMW_THREADS,
        )?;
        let (name, what) = match variant {
            Variant::Plain => ("nn_adamw_step_f32", "launch nn_adamw_step_f32"),
            Variant::Clipped => (
                "nn_adamw_step_clipped_f32",
                "launch nn_adamw_step_clipped_f32",
            ),
            Variant::ClippedWriteBack => (
                "nn_adamw_step_clipped_write_back_f32",
                "launch nn_adamw_step_clipped_write_back_f32",
            ),
        };
        let func = self.function(name)?;
        let stream = self.stream();
        let (param_ptr, _w0) = param.device_ptr_mut(stream);
        let (m_ptr, _w1) = m.device_ptr_mut(stream);
        let (v_ptr, _w2) = v.device_ptr_mut(stream);
        check_aligned::<f32>("param", param_ptr)?;
        check_aligned::<f32>("gradient", grad_ptr)?;
        check_aligned::<f32>("first moment `m`", m_ptr)?;
        check_aligned::<f32>("second moment `v`", v_ptr)?;
        let (one_minus_beta1, one_minus_beta2) = (1.0 - s.beta1, 1.0 - s.beta2);
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&param_ptr)
            .arg(&grad_ptr)
            .arg(&m_ptr)
            .arg(&v_ptr);
        let gate_len = clip.as_ref().map_or(0, |c| c.gate.1 as i64);
        if let Some(c) = &clip {
            check_aligned::<f32>("clip_factor", c.factor.0)?;
            launch.arg(&c.factor.0).arg(&c.gate.0).arg(&gate_len);
        }
        launch
            .arg(&len)
            .arg(&s.lr)
            .arg(&s.beta1)
            .arg(&s.beta2)
            .arg(&one_minus_beta1)
            .arg(&one_minus_beta2)
            .arg(&s.bias_correction1)
            .arg(&s.bias_correction2)
            .arg(&s.eps)
            .arg(&s.decay);
        // SAFETY: arguments follow the entry point's signature in kernels/README.md (the clip
        // factor and the gate only for the clipped ones); `param`, `grad`, `m`, `v` hold `n`
        // elements, `clip_factor` one (checked) and the gate `gate_len` (0: not read); the kernel
        // touches indices below `n` only. The callers hold the guards of the clip and gate
        // pointers until the launch is queued.
        unsafe { launch.launch(cfg) }.map_err(cuda_err(what))?;
        Ok(())
    }
}
