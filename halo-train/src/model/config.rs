//! The model's hyper-parameters.

use serde::{Deserialize, Serialize};

use halo_kernels::error::{HaloError, Result};

/// GPT-2 hyper-parameters (names as in Hugging Face `GPT2Config`). GPT-2 small is
/// `{ n_layer: 12, n_head: 12, n_embd: 768, vocab_size: 50257, n_ctx: 1024, dropout: 0.1 }`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub vocab_size: usize,
    /// Longest sequence (rows of the position table).
    pub n_ctx: usize,
    /// Drop probability after the embeddings and on each residual branch while training
    /// (Hugging Face's `embd_pdrop` / `resid_pdrop`; attention-probability dropout is not
    /// implemented). 0 turns dropout off.
    pub dropout: f32,
}

impl GptConfig {
    /// Checks every field; `n_embd` must be divisible by `n_head`.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("vocab_size", self.vocab_size),
            ("n_ctx", self.n_ctx),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(HaloError::InvalidHyperParameter {
                    name,
                    value: 0.0,
                    reason: "must be at least 1",
                });
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(HaloError::InvalidHyperParameter {
                name: "n_embd",
                value: self.n_embd as f64,
                reason: "must be divisible by n_head",
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(HaloError::InvalidHyperParameter {
                name: "dropout",
                value: self.dropout as f64,
                reason: "must be in [0, 1)",
            });
        }
        Ok(())
    }
}
