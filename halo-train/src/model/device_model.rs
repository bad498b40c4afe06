//! [`GptOnDevice`]: a [`Gpt`]'s parameters resident on a [`Device`] (a CUDA GPU, or the emulated
//! one in tests), read in place by every forward on a tape of that device and updated there by
//! [`DeviceAdamW`](super::DeviceAdamW). Checkpoints, generation and evaluation use
//! the host [`Gpt`]: [`GptOnDevice::to_host`] copies the weights back (the same files whichever
//! device trained them). The forward pass is [`GptWeights`]' (`nll`, `token_logprobs`, …).

use super::config::GptConfig;
use super::forward::GptWeights;
use super::gpt::{Gpt, Parameter};
use crate::autograd::{Device, Storage, Tape, Var};
use halo_kernels::error::{HaloError, Result};

/// The shape and the decay rule of one parameter; its values live on the device.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ParamInfo {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
}

/// A GPT-2 model whose parameters live on a device (see the module docs).
#[derive(Debug)]
pub struct GptOnDevice {
    config: GptConfig,
    info: Vec<ParamInfo>,
    weights: Vec<Storage>,
    device: Device,
}

impl Gpt {
    /// A copy of this model's parameters on `device` (one host→device copy per parameter).
    pub fn to_device(&self, device: &Device) -> Result<GptOnDevice> {
        let mut info = Vec::with_capacity(self.parameters().len());
        let mut weights = Vec::with_capacity(self.parameters().len());
        for p in self.parameters() {
            info.push(ParamInfo {
                name: p.name.clone(),
                shape: p.shape.clone(),
            });
            weights.push(device.upload(&p.data)?);
        }
        Ok(GptOnDevice {
            config: *self.config(),
            info,
            weights,
            device: device.clone(),
        })
    }
}

impl GptWeights for GptOnDevice {
    fn config(&self) -> &GptConfig {
        &self.config
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn record<'a>(&'a self, tape: &mut Tape<'a>, index: usize) -> Result<Var> {
        let (Some(info), Some(w)) = (self.info.get(index), self.weights.get(index)) else {
            return Err(HaloError::Autograd(format!(
                "parameter {index} of a model with {} parameters",
                self.weights.len()
            )));
        };
        tape.param_storage(index, w.as_ref(), &info.shape)
    }
}

impl GptOnDevice {
    /// The hyper-parameters.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of parameter tensors.
    pub fn num_tensors(&self) -> usize {
        self.weights.len()
    }

    /// Elements of each parameter, in index order.
    pub fn parameter_lens(&self) -> Vec<usize> {
        self.weights.iter().map(|w| w.len()).collect()
    }

    /// Whether AdamW decays each parameter (matrices yes, vectors no: [`Parameter::decays`]).
    pub fn parameter_decays(&self) -> Vec<bool> {
        self.info.iter().map(|i| i.shape.len() >= 2).collect()
    }

    /// The weights, for the device optimizer.
    pub(crate) fn weights_mut(&mut self) -> &mut [Storage] {
        &mut self.weights
    }

    /// A host [`Gpt`] with these weights (waits for the device): what checkpoints, generation and
    /// evaluation read.
    pub fn to_host(&self) -> Result<Gpt> {
        let params = self
            .info
            .iter()
            .zip(&self.weights)
            .map(|(info, w)| {
                Ok(Parameter {
                    name: info.name.clone(),
                    shape: info.shape.clone(),
                    data: self.device.to_host(w.as_ref())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Gpt::from_parts(self.config, params))
    }
}

/// A model wherever its weights live, for code that runs on either (the training steps).
#[derive(Clone, Copy, Debug)]
pub enum ModelRef<'m> {
    /// Host weights (the CPU).
    Host(&'m Gpt),
    /// Weights resident on a device.
    Device(&'m GptOnDevice),
}

impl GptWeights for ModelRef<'_> {
    fn config(&self) -> &GptConfig {
        match self {
            Self::Host(m) => m.config(),
            Self::Device(m) => m.config(),
        }
    }

    fn device(&self) -> Device {
        match self {
            Self::Host(m) => GptWeights::device(*m),
            Self::Device(m) => GptWeights::device(*m),
        }
    }

    fn record<'a>(&'a self, tape: &mut Tape<'a>, index: usize) -> Result<Var> {
        match self {
            Self::Host(m) => m.record(tape, index),
            Self::Device(m) => m.record(tape, index),
        }
    }
}
