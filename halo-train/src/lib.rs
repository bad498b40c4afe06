//! # halo-train
//!
//! Training on top of the [`halo_kernels`] core: a small tape [`autograd`], a GPT-2-style
//! [`model`] with Hugging Face parameter names and safetensors checkpoints, and the [`train`]
//! pipeline behind the `train_kto` example (pretrain → SFT → KTO / DPO on an arithmetic task with
//! an exact judge). The losses and the log-prob ops are the core's; nothing here copies their math.

#![warn(missing_docs)]

pub mod autograd;
pub mod model;
pub mod train;
