//! Autoregressive generation: greedy or temperature + top-k sampling.
//!
//! Cost note: there is no KV cache. Each new token re-runs the forward over the whole (cropped)
//! context, so generating `n` tokens costs `O(n · ctx)` token-forwards instead of `O(n)`. For the
//! small models this crate trains (a few million parameters, contexts of tens to hundreds of
//! tokens) that is milliseconds per token and keeps the code to one forward path.

use rand::Rng;

use super::gpt::Gpt;
use crate::model::GptWeights;
use halo_kernels::error::{HaloError, Result};

/// How the next token is chosen from the last position's logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The arg-max token (lowest id on ties).
    Greedy,
    /// Sample from `softmax(logits / temperature)` restricted to the `k` most likely tokens
    /// (`k` ≥ vocab means no restriction), like Hugging Face `top_k` + `temperature`.
    TopK {
        /// Tokens kept (the `k` highest logits); must be at least 1.
        k: usize,
        /// Divides the logits before the softmax; must be finite and `> 0` (below 1 sharpens).
        temperature: f32,
    },
}

impl Gpt {
    /// Extends `prompt` by up to `max_new_tokens` tokens and returns only the new ones. Stops
    /// early right after producing `stop_token` (which is included in the output). When the
    /// sequence grows past `n_ctx`, only the last `n_ctx` tokens are fed to the model.
    ///
    /// Errors: an empty prompt, a prompt token outside the vocabulary, `k == 0`, a
    /// non-positive / non-finite temperature, or non-finite logits to sample from
    /// ([`HaloError::NonFinite`] with `what: "logits"` and the first bad context position as `row`,
    /// from [`GptWeights::logits_inference`]).
    pub fn generate<R: Rng + ?Sized>(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: Sampling,
        rng: &mut R,
        stop_token: Option<u32>,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(HaloError::EmptyBatch("prompt"));
        }
        if let Sampling::TopK { k, temperature } = sampling {
            if k == 0 {
                return Err(HaloError::InvalidHyperParameter {
                    name: "k",
                    value: 0.0,
                    reason: "top-k needs k ≥ 1",
                });
            }
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(HaloError::InvalidHyperParameter {
                    name: "temperature",
                    value: temperature as f64,
                    reason: "must be finite and > 0",
                });
            }
        }
        let vocab = self.config().vocab_size;
        let n_ctx = self.config().n_ctx;
        let mut tokens = prompt.to_vec();
        let mut generated = Vec::with_capacity(max_new_tokens);
        for _ in 0..max_new_tokens {
            let context = &tokens[tokens.len().saturating_sub(n_ctx)..];
            let logits = self.logits_inference(context, 1, context.len())?;
            // Finite: `logits_inference` refuses NaN/inf logits (arg-max and the softmax assume
            // finite values, and would sample garbage silently).
            let last = &logits[(context.len() - 1) * vocab..];
            let next = match sampling {
                Sampling::Greedy => argmax(last),
                Sampling::TopK { k, temperature } => sample_top_k(last, k, temperature, rng),
            };
            tokens.push(next);
            generated.push(next);
            if Some(next) == stop_token {
                break;
            }
        }
        Ok(generated)
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws from the temperature-scaled softmax over the `k` largest logits.
fn sample_top_k<R: Rng + ?Sized>(logits: &[f32], k: usize, temperature: f32, rng: &mut R) -> u32 {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    // Stable sort by descending logit: ties keep the lower id first, so results are reproducible.
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    order.truncate(k.min(logits.len()));
    let max = logits[order[0] as usize];
    let weights: Vec<f64> = order
        .iter()
        .map(|&t| (((logits[t as usize] - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (&t, &w) in order.iter().zip(&weights) {
        if u < w {
            return t;
        }
        u -= w;
    }
    *order.last().unwrap()
}
