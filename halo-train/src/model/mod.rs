//! A GPT-2-style language model on the [`autograd`](crate::autograd) tape, small enough to read in
//! one sitting and fast enough to train a few million parameters on a laptop CPU.
//!
//! Architecture (Radford et al. 2019; Hugging Face `modeling_gpt2.py`): token embedding `wte` plus
//! learned positions `wpe`; `n_layer` pre-layernorm blocks
//! `x += c_proj(attn(c_attn(ln_1(x))))`, `x += mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))`; a final
//! `ln_f`; logits `= h·wteᵀ` (tied unembedding). Parameter names and layouts are Hugging Face's
//! (`transformer.h.{i}.attn.c_attn.weight` in Conv1D `[in, out]` layout, ...), so GPT-2
//! safetensors checkpoints load directly and ours load in `transformers`.
//!
//! Files: `gpt` ([`Gpt`]: parameters, per-token log-probs with and without a tape), `forward`
//! (the forward pass, written once over [`GptWeights`]), `device_model` ([`GptOnDevice`]: the
//! parameters resident on a CUDA device),
//! `config` ([`GptConfig`]), `generate` (greedy / top-k [`Sampling`]), `checkpoint`
//! (safetensors save/load, [`DTypeOnDisk`]), `optim` (AdamW, gradient clipping, LR schedules), `atomic_file` (temp file, fsync,
//! rename), `safetensors_bytes` (a deterministic safetensors writer).

pub mod atomic_file;
pub mod checkpoint;
pub mod config;
pub mod device_model;
pub mod device_optim;
pub mod forward;
pub mod generate;
pub mod gpt;
pub mod optim;
pub mod safetensors_bytes;

pub use checkpoint::DTypeOnDisk;
pub use config::GptConfig;
pub use device_model::{GptOnDevice, ModelRef};
pub use device_optim::DeviceAdamW;
pub use forward::GptWeights;
pub use generate::Sampling;
pub use gpt::Gpt;
