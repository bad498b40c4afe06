//! [`DeviceAdamW`]: [`AdamW`] and torch's global-norm clipping for a [`GptOnDevice`], on the
//! device: the moments live there, the norm and the clip factor are computed there
//! (`halo_kernels::cuda::CudaBackend::grad_norm_clip`) and the update reads the factor there
//! (`adamw_step_clipped_gated`), so a step makes one device→host read: the norm (for the log),
//! the gradients' pending checks and any values the caller adds (the loss), together. Same
//! arithmetic, in the same order, as the host [`AdamW::step`] after [`clip_grad_norm`](super::optim::clip_grad_norm):
//! bitwise the CPU's update for the same gradients.

use std::sync::Arc;

use super::device_model::GptOnDevice;
use super::gpt::Gpt;
use super::optim::{AdamW, AdamWConfig};
use crate::autograd::{Device, Gradients, Storage, StorageRef};
use halo_kernels::cuda::nn::{AdamWScalars, CudaGradNorm, GRAD_NORM_OUT_LEN, GRAD_NORM_OUT_NORM};
use halo_kernels::cuda::{CudaBackend, CudaSlice, CudaView};
use halo_kernels::error::{HaloError, Result};

/// AdamW with its moments on a CUDA device (see the module docs).
#[derive(Debug)]
pub struct DeviceAdamW {
    config: AdamWConfig,
    m: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    decays: Vec<bool>,
    step: u32,
    gpu: Arc<CudaBackend>,
    norm_plan: CudaGradNorm,
    /// `[norm, clip factor]` of the last step, on the device.
    readout: CudaSlice<f32>,
}

impl DeviceAdamW {
    /// The host optimizer's state (moments and step count) on `model`'s device.
    pub fn from_host(optimizer: &AdamW, model: &GptOnDevice) -> Result<Self> {
        let Device::Cuda(gpu) = model.device() else {
            return Err(HaloError::Autograd(
                "DeviceAdamW is for a model on a CUDA device; use AdamW on the CPU".into(),
            ));
        };
        let (m, v) = optimizer.moments();
        let lens = model.parameter_lens();
        if m.len() != lens.len() {
            return Err(HaloError::LengthMismatch {
                what: "AdamW moments (built for another model)",
                expected: lens.len(),
                got: m.len(),
            });
        }
        let upload = |moments: &[Vec<f32>]| -> Result<Vec<CudaSlice<f32>>> {
            moments.iter().map(|x| gpu.htod(x)).collect()
        };
        Ok(Self {
            config: *optimizer.config(),
            m: upload(m)?,
            v: upload(v)?,
            decays: model.parameter_decays(),
            step: optimizer.steps(),
            norm_plan: gpu.grad_norm_plan(&lens)?,
            readout: gpu.alloc_zeros(GRAD_NORM_OUT_LEN)?,
            gpu: gpu.clone(),
        })
    }

    /// The state as a host [`AdamW`] for `model` (checkpoints; waits for the device).
    pub fn to_host(&self, model: &Gpt) -> Result<AdamW> {
        let download = |moments: &[CudaSlice<f32>]| -> Result<Vec<Vec<f32>>> {
            moments.iter().map(|x| self.gpu.dtoh(x)).collect()
        };
        AdamW::restore(
            model,
            self.config,
            self.step,
            download(&self.m)?,
            download(&self.v)?,
        )
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u32 {
        self.step
    }

    /// Clips `grads` to global norm `max_norm` (torch's rule) and takes one AdamW step of
    /// `model` with learning rate `lr`; returns the norm before clipping. One host wait: the
    /// gradients' [`checks`](Gradients::checks) and the norm are read together, after the update
    /// was queued gated on the checks (a failed one is the error, and the weights and moments are
    /// left as they were). Parameters without a gradient are left untouched, their moments too.
    pub fn clip_and_step(
        &mut self,
        model: &mut GptOnDevice,
        grads: &Gradients,
        max_norm: f32,
        lr: f32,
    ) -> Result<f32> {
        Ok(self
            .clip_and_step_reading(model, grads, max_norm, lr, &[])?
            .0)
    }

    /// [`DeviceAdamW::clip_and_step`] that also reads `values` (e.g. the step's loss, still on the
    /// device) in the same wait: returns the norm and their host copies, in order.
    pub fn clip_and_step_reading(
        &mut self,
        model: &mut GptOnDevice,
        grads: &Gradients,
        max_norm: f32,
        lr: f32,
        values: &[CudaView<'_, f32>],
    ) -> Result<(f32, Vec<Vec<f32>>)> {
        let n = self.m.len();
        if model.num_tensors() != n {
            return Err(HaloError::LengthMismatch {
                what: "model parameters (DeviceAdamW was built for another model)",
                expected: n,
                got: model.num_tensors(),
            });
        }
        let mut device_grads: Vec<Option<&CudaSlice<f32>>> = vec![None; n];
        for (i, g) in grads.storages() {
            let StorageRef::Cuda(g) = g else {
                return Err(HaloError::Autograd(
                    "DeviceAdamW needs gradients on its device; these are host gradients".into(),
                ));
            };
            match device_grads.get_mut(i) {
                Some(slot) => *slot = Some(g),
                None => {
                    return Err(HaloError::LengthMismatch {
                        what: "gradient index (parameters)",
                        expected: n,
                        got: i + 1,
                    })
                }
            }
        }
        // The checks' statuses and `values` gathered on the device now; the norm after it is
        // computed; the update gated on the statuses.
        let mut readout = grads
            .checks()
            .gather(&self.gpu, values, &[GRAD_NORM_OUT_LEN])?;
        self.gpu.grad_norm_clip(
            &mut self.norm_plan,
            &device_grads,
            Some(max_norm),
            &mut self.readout,
        )?;
        let AdamWConfig {
            betas,
            eps,
            weight_decay,
            ..
        } = self.config;
        let step = self.step + 1;
        let factor = self.readout.slice(1..2);
        for (i, weight) in model.weights_mut().iter_mut().enumerate() {
            let Some(g) = device_grads[i] else { continue };
            let scalars = AdamWScalars::new(lr, betas, eps, weight_decay, self.decays[i], step)?;
            let Storage::Cuda(param) = weight else {
                return Err(HaloError::Autograd(
                    "a host weight in a device model".into(),
                ));
            };
            self.gpu.adamw_step_clipped_gated(
                param,
                g,
                &mut self.m[i],
                &mut self.v[i],
                &factor,
                &readout.gate(),
                &scalars,
            )?;
        }
        readout.write_later(0, &self.readout.as_view())?;
        // The step's one wait; a failed check, or a status shut without one (the loss's, whose
        // error its finish names), means the gated update wrote nothing: the step count stays too.
        let (mut read, updated) = readout.read_with_gate()?;
        if updated {
            self.step = step;
        }
        let norm_and_factor = read.pop().unwrap_or_default();
        Ok((norm_and_factor[GRAD_NORM_OUT_NORM], read))
    }
}
