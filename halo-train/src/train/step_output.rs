//! What a training step hands to the optimizer: its gradients, and its loss and metrics, either
//! already on the host or still on the device. Device values are read in the update's one wait
//! ([`Trainee::step`](super::trainee::Trainee::step)), together with the gradients' pending
//! checks and the norm: a step on a CUDA device then makes one host round trip.

use std::fmt;

use crate::autograd::{Device, Gradients};
use halo_kernels::cuda::CudaView;
use halo_kernels::error::Result;

/// A step's loss and extra metrics, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    /// The step's loss (mean over the batch), before the update.
    pub loss: f64,
    /// Extra metrics, TRL names (`kl`, `rewards/chosen`, ...).
    pub metrics: Vec<(String, f64)>,
}

/// A step's loss and metrics still on the device: the buffers to read, and how their host copies
/// become [`StepMetrics`] (a step's own type: the NLL step's loss, the KTO step's queued loss
/// kernel and its inputs, …).
pub trait PendingMetrics {
    /// The device buffers to read, in the order [`finish`](Self::finish) expects their copies.
    fn values(&self) -> Vec<CudaView<'_, f32>>;
    /// The metrics from the host copies of [`values`](Self::values), or the step's error.
    fn finish(self: Box<Self>, read: &[Vec<f32>]) -> Result<StepMetrics>;
}

/// A step's [`PendingMetrics`].
pub struct DeviceValues(Box<dyn PendingMetrics>);

impl fmt::Debug for DeviceValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceValues({} buffers)", self.0.values().len())
    }
}

impl DeviceValues {
    /// Wraps a step's pending metrics.
    pub fn new(pending: impl PendingMetrics + 'static) -> Self {
        Self(Box::new(pending))
    }

    /// The device buffers to read.
    pub fn values(&self) -> Vec<CudaView<'_, f32>> {
        self.0.values()
    }

    /// The metrics from the host copies of [`values`](Self::values), in order.
    pub fn finish(self, read: &[Vec<f32>]) -> Result<StepMetrics> {
        self.0.finish(read)
    }
}

/// Where a step's loss and metrics are.
#[derive(Debug)]
pub enum StepValues {
    /// Already on the host (CPU steps, and steps whose loss ran on the host).
    Host(StepMetrics),
    /// On the device, read with the update.
    Device(DeviceValues),
}

/// What one step computed.
#[derive(Debug)]
pub struct StepOutput {
    /// Gradients of the loss with respect to the model parameters, before clipping (device ones
    /// with their pending [`checks`](Gradients::checks)).
    pub grads: Gradients,
    /// The loss and metrics.
    pub values: StepValues,
}

impl StepOutput {
    /// A step whose loss and metrics are on the host.
    pub fn host(loss: f64, grads: Gradients, metrics: Vec<(String, f64)>) -> Self {
        Self {
            grads,
            values: StepValues::Host(StepMetrics { loss, metrics }),
        }
    }

    /// The loss and metrics when they are on the host (always, for a step on the CPU).
    pub fn host_metrics(&self) -> Option<&StepMetrics> {
        match &self.values {
            StepValues::Host(m) => Some(m),
            StepValues::Device(_) => None,
        }
    }

    /// The metrics and gradients without an update (evaluation, tests): on a device, the
    /// gradients' checks and the values are read in one wait, and a failed check is the error.
    pub fn read(self) -> Result<(StepMetrics, Gradients)> {
        let Self { grads, values } = self;
        let metrics = match (values, grads.device()) {
            (StepValues::Host(m), Device::Cpu) => m,
            (StepValues::Host(m), Device::Cuda(gpu)) => {
                grads.checks().verify(gpu)?;
                m
            }
            (StepValues::Device(d), Device::Cuda(gpu)) => {
                let read = grads.checks().gather(gpu, &d.values(), &[])?.read()?;
                d.finish(&read)?
            }
            (StepValues::Device(_), Device::Cpu) => {
                return Err(halo_kernels::error::HaloError::Autograd(
                    "a step's values on a device but its gradients on the host".into(),
                ))
            }
        };
        Ok((metrics, grads))
    }
}
