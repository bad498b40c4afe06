//! AdamW, global gradient-norm clipping and learning-rate schedules.

use rayon::prelude::*;

use crate::autograd::Gradients;
use halo_kernels::error::{HaloError, Result};

use super::gpt::Gpt;

/// AdamW hyper-parameters, with the names and defaults of PyTorch's `torch.optim.AdamW`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Default learning rate, `1e-3`; [`AdamW::step`] takes the rate of each step as an argument,
    /// so this is only a record for callers without a schedule.
    pub lr: f32,
    /// `(β₁, β₂)`, decay rates of the first and second moment estimates; default `(0.9, 0.999)`.
    pub betas: (f32, f32),
    /// ε added to `√v̂` in the denominator for numerical stability; default `1e-8`.
    pub eps: f32,
    /// Decoupled weight decay λ (the update multiplies decaying parameters by `1 − lr·λ`);
    /// default `0.01`, as PyTorch.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Elements of a parameter per rayon task of [`AdamW::step`].
const ADAMW_CHUNK: usize = 1 << 14;

/// AdamW (Loshchilov & Hutter 2019) exactly as `torch.optim.AdamW`: with `t` the step count,
/// `p ← p − lr·λ·p` (decoupled decay), `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `p ← p − lr · (m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`.
///
/// Weight decay applies only to matrices (linear weights, `wte`, `wpe`), not to biases or
/// layer-norm parameters ([`Parameter::decays`](super::gpt::Parameter::decays); nanoGPT's rule).
/// A parameter with no gradient this step is left untouched (its moments do not decay either).
#[derive(Clone, Debug)]
pub struct AdamW {
    config: AdamWConfig,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    decays: Vec<bool>,
    step: u32,
}

impl AdamW {
    /// Zero moments for every parameter of `model`.
    pub fn new(model: &Gpt, config: AdamWConfig) -> Self {
        let params = model.parameters();
        Self {
            config,
            m: params.iter().map(|p| vec![0.0; p.data.len()]).collect(),
            v: params.iter().map(|p| vec![0.0; p.data.len()]).collect(),
            decays: params.iter().map(|p| p.decays()).collect(),
            step: 0,
        }
    }

    /// The hyper-parameters this optimizer was built with.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u32 {
        self.step
    }

    /// The first- and second-moment estimates, one vector per parameter of the model (in
    /// [`Gpt::parameters`] order): with [`steps`](Self::steps), the whole state a resumed run
    /// needs ([`AdamW::restore`]).
    pub fn moments(&self) -> (&[Vec<f32>], &[Vec<f32>]) {
        (&self.m, &self.v)
    }

    /// An optimizer for `model` continuing from a saved state: `steps` updates taken and the
    /// moments `m`, `v` ([`AdamW::moments`]). Errors if the moments do not fit the model or hold
    /// a non-finite value (or a negative second moment).
    pub fn restore(
        model: &Gpt,
        config: AdamWConfig,
        steps: u32,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    ) -> Result<Self> {
        let mut optimizer = Self::new(model, config);
        for (what, saved, fresh) in [
            ("AdamW first moments", &m, &optimizer.m),
            ("AdamW second moments", &v, &optimizer.v),
        ] {
            if saved.len() != fresh.len() {
                return Err(HaloError::LengthMismatch {
                    what,
                    expected: fresh.len(),
                    got: saved.len(),
                });
            }
            for (s, f) in saved.iter().zip(fresh) {
                if s.len() != f.len() {
                    return Err(HaloError::LengthMismatch {
                        what,
                        expected: f.len(),
                        got: s.len(),
                    });
                }
            }
        }
        if m.iter().flatten().any(|x| !x.is_finite())
            || v.iter().flatten().any(|x| !(x.is_finite() && *x >= 0.0))
        {
            return Err(HaloError::Checkpoint(
                "AdamW state holds a non-finite moment or a negative second moment".into(),
            ));
        }
        optimizer.m = m;
        optimizer.v = v;
        optimizer.step = steps;
        Ok(optimizer)
    }

    /// One update with learning rate `lr` (from a schedule; `config.lr` is only the default
    /// for callers without one). Errors if `grads` does not fit the model.
    pub fn step(&mut self, model: &mut Gpt, grads: &Gradients, lr: f32) -> Result<()> {
        if !grads.device().is_cpu() {
            return Err(HaloError::Autograd(
                "AdamW::step updates a host model from host gradients; these live on a CUDA \
                 device (use the device optimizer)"
                    .into(),
            ));
        }
        let params = model.params_mut();
        if params.len() != self.m.len() {
            return Err(HaloError::LengthMismatch {
                what: "model parameters (AdamW was built for another model)",
                expected: self.m.len(),
                got: params.len(),
            });
        }
        for (i, g) in grads.iter() {
            let expected = params.get(i).map(|p| p.data.len());
            if expected != Some(g.len()) {
                return Err(HaloError::LengthMismatch {
                    what: "gradient",
                    expected: expected.unwrap_or(0),
                    got: g.len(),
                });
            }
        }
        self.step += 1;
        let AdamWConfig {
            betas: (b1, b2),
            eps,
            weight_decay,
            ..
        } = self.config;
        let bias1 = 1.0 - b1.powi(self.step as i32);
        let bias2 = 1.0 - b2.powi(self.step as i32);
        for (i, g) in grads.iter() {
            let decay = if self.decays[i] {
                1.0 - lr * weight_decay
            } else {
                1.0
            };
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            // Element-wise, so splitting into rayon tasks changes no result.
            params[i]
                .data
                .par_chunks_mut(ADAMW_CHUNK)
                .zip(g.par_chunks(ADAMW_CHUNK))
                .zip(
                    m.par_chunks_mut(ADAMW_CHUNK)
                        .zip(v.par_chunks_mut(ADAMW_CHUNK)),
                )
                .for_each(|((p, g), (m, v))| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                        *p *= decay;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        let m_hat = *m / bias1;
                        let v_hat = *v / bias2;
                        *p -= lr * m_hat / (v_hat.sqrt() + eps);
                    }
                });
        }
        Ok(())
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping. Same rule as `torch.nn.utils.clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`
/// applied only when it is below 1. Host gradients (a CUDA tape's are clipped on the device by
/// the device optimizer; [`AdamW::step`] refuses them).
pub fn clip_grad_norm(grads: &mut Gradients, max_norm: f32) -> f32 {
    let norm = grads.global_norm();
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        grads.scale(factor);
    }
    norm
}

/// How the learning rate falls after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    /// Half a cosine from `peak_lr` to `min_lr`.
    Cosine,
    /// A straight line from `peak_lr` to `min_lr`.
    Linear,
    /// Stay at `peak_lr`.
    Constant,
}

/// Linear warmup over `warmup_steps` (step `s < warmup` gets `peak·(s+1)/warmup`), then
/// [`Decay`] until `total_steps`, then `min_lr`. Steps count from 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    /// Learning rate reached at the end of warmup (and kept by [`Decay::Constant`]).
    pub peak_lr: f32,
    /// Learning rate at `total_steps` and after; unused by [`Decay::Constant`].
    pub min_lr: f32,
    /// Steps of linear warmup; 0 starts at `peak_lr`.
    pub warmup_steps: usize,
    /// Step at which the decay reaches `min_lr`, counted from step 0 (warmup included).
    pub total_steps: usize,
    /// Shape of the fall from `peak_lr` to `min_lr` after warmup.
    pub decay: Decay,
}

impl LrSchedule {
    /// Warmup, then half a cosine from `peak_lr` to `min_lr` at `total_steps`.
    pub fn cosine(peak_lr: f32, min_lr: f32, warmup_steps: usize, total_steps: usize) -> Self {
        Self {
            peak_lr,
            min_lr,
            warmup_steps,
            total_steps,
            decay: Decay::Cosine,
        }
    }

    /// Warmup, then a straight line from `peak_lr` to `min_lr` at `total_steps`.
    pub fn linear(peak_lr: f32, min_lr: f32, warmup_steps: usize, total_steps: usize) -> Self {
        Self {
            peak_lr,
            min_lr,
            warmup_steps,
            total_steps,
            decay: Decay::Linear,
        }
    }

    /// `lr` at every step (no warmup, no decay).
    pub fn constant(lr: f32) -> Self {
        Self {
            peak_lr: lr,
            min_lr: lr,
            warmup_steps: 0,
            total_steps: 0,
            decay: Decay::Constant,
        }
    }

    /// The learning rate for step `step`.
    pub fn lr_at(&self, step: usize) -> f32 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        if self.decay == Decay::Constant {
            return self.peak_lr;
        }
        if step >= self.total_steps {
            return self.min_lr;
        }
        let span = (self.total_steps - self.warmup_steps).max(1) as f32;
        let progress = (step - self.warmup_steps) as f32 / span;
        let shape = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => 1.0,
        };
        self.min_lr + (self.peak_lr - self.min_lr) * shape
    }
}
