//! The model a stage trains and its optimizer, on the run's device: on the CPU the host [`Gpt`]
//! and [`AdamW`]; on a CUDA device a [`GptOnDevice`] and a [`DeviceAdamW`], with the host model
//! brought up to date ([`Trainee::sync_host`]) only when something on the host reads it
//! (evaluation, checkpoints, the end of the stage).

use std::borrow::Cow;

use super::step_output::{StepMetrics, StepOutput, StepValues};
use crate::autograd::Device;
use crate::model::optim::{clip_grad_norm, AdamW};
use crate::model::{DeviceAdamW, Gpt, GptOnDevice, ModelRef};
use halo_kernels::error::{HaloError, Result};

/// A stage's model and optimizer on its device (see the module docs).
#[derive(Debug)]
pub enum Trainee {
    /// The host model (passed to each call) and the host optimizer.
    Host(AdamW),
    /// Weights and optimizer state on a CUDA device.
    Device(Box<OnDevice>),
}

/// What [`Trainee::step`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The step's loss and metrics.
    pub metrics: StepMetrics,
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
}

/// The device half of [`Trainee::Device`].
#[derive(Debug)]
pub struct OnDevice {
    /// The weights the steps read and update.
    pub model: GptOnDevice,
    /// The optimizer state.
    pub optimizer: DeviceAdamW,
}

impl Trainee {
    /// `model` and `optimizer` on `device` (copies them there for a CUDA device).
    pub fn new(model: &Gpt, optimizer: AdamW, device: &Device) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Self::Host(optimizer)),
            Device::Cuda(_) => {
                let on_device = model.to_device(device)?;
                let optimizer = DeviceAdamW::from_host(&optimizer, &on_device)?;
                Ok(Self::Device(Box::new(OnDevice {
                    model: on_device,
                    optimizer,
                })))
            }
        }
    }

    /// The weights a step reads (`host` on the CPU).
    pub fn model<'m>(&'m self, host: &'m Gpt) -> ModelRef<'m> {
        match self {
            Self::Host(_) => ModelRef::Host(host),
            Self::Device(d) => ModelRef::Device(&d.model),
        }
    }

    /// Clips `out`'s gradients to global norm `max_norm`, takes one AdamW step with learning rate
    /// `lr` and returns the step's loss, metrics and norm before clipping. On a CUDA device this
    /// is the step's one host wait: the gradients' pending checks, the device loss and metrics and
    /// the norm are read together after the update was queued, gated on the checks (a failed check
    /// is the error, and the weights stay as they were).
    pub fn step(
        &mut self,
        host: &mut Gpt,
        mut out: StepOutput,
        max_norm: f32,
        lr: f32,
    ) -> Result<StepReport> {
        match (self, out.values) {
            (Self::Host(optimizer), StepValues::Host(metrics)) => {
                let grad_norm = clip_grad_norm(&mut out.grads, max_norm);
                optimizer.step(host, &out.grads, lr)?;
                Ok(StepReport { metrics, grad_norm })
            }
            (Self::Host(_), StepValues::Device(_)) => Err(HaloError::Autograd(
                "a step's loss on a CUDA device, but the model trains on the CPU".into(),
            )),
            (Self::Device(d), StepValues::Host(metrics)) => {
                let grad_norm =
                    d.optimizer
                        .clip_and_step(&mut d.model, &out.grads, max_norm, lr)?;
                Ok(StepReport { metrics, grad_norm })
            }
            (Self::Device(d), StepValues::Device(values)) => {
                let (grad_norm, read) = d.optimizer.clip_and_step_reading(
                    &mut d.model,
                    &out.grads,
                    max_norm,
                    lr,
                    &values.values(),
                )?;
                Ok(StepReport {
                    metrics: values.finish(&read)?,
                    grad_norm,
                })
            }
        }
    }

    /// Copies the device weights into `host` (nothing to do on the CPU).
    pub fn sync_host(&self, host: &mut Gpt) -> Result<()> {
        if let Self::Device(d) = self {
            *host = d.model.to_host()?;
        }
        Ok(())
    }

    /// The optimizer state as a host [`AdamW`] for `host` (its weights must be synced).
    pub fn host_optimizer(&self, host: &Gpt) -> Result<Cow<'_, AdamW>> {
        match self {
            Self::Host(optimizer) => Ok(Cow::Borrowed(optimizer)),
            Self::Device(d) => Ok(Cow::Owned(d.optimizer.to_host(host)?)),
        }
    }
}
