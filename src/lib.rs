//! # halo-kernels
//!
//! Handwritten CUDA kernels, with a CPU twin for every one, for *human-aware losses* (HALOs) used
//! to align language models: KTO first, DPO and its relatives beside it.
//!
//! Data path (each arrow is one op, same name on CPU and GPU):
//! logits + labels → [`cpu::token_logprobs()`] → per-token log-probs →
//! [`cpu::sequence_sums()`] → per-sequence log-probs → [`losses`] → loss, ∂L/∂logp_seq →
//! [`cpu::broadcast_sequence_grad`] → [`cpu::token_logprobs_backward()`] → ∂L/∂logits.
//!
//! From hidden states instead of logits, without ever building the `[rows, vocab]` logits:
//! [`fused_head`] (the fused LM head's forward and backward, and one-call KTO / DPO steps).
//!
//! The same ops run on a GPU through [`cuda::CudaBackend`] (or, with the `emulation` feature, on
//! the emulated CUDA device: [`cuda::CudaBackend::emulated`]). The autograd, the model and the
//! training example live in the `halo-train` crate of this workspace.

#![warn(missing_docs)]

pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod emulation;
pub mod error;
pub mod fused_head;
pub mod kernel_abi;
mod kernel_host;
pub mod losses;
pub mod step;
mod validate;

pub use dtype::{DType, LogitElement};
pub use error::{HaloError, Result};

/// The label value that marks a token as not counted (PyTorch / Hugging Face convention).
pub const IGNORE_INDEX: i32 = -100;

/// README's code blocks are compiled and run as doctests, so the documented API cannot drift.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
