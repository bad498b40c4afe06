//! CUDA kernels of the GPT model that `halo-train` trains (layer norm, GELU, element-wise ops,
//! embedding, causal attention, the global gradient norm and AdamW), as enqueue-only methods of
//! [`super::CudaBackend`]: each checks its lengths on the host and queues its kernel without
//! waiting, so a training step makes no host round trip of its own.
//!
//! They live in the core because every CUDA kernel of the workspace is built here (PTX by
//! `build/ptx.rs`, the emulated device by `build/host_emulation.rs`); their definitions, the CPU
//! twins every test compares them with, are `halo-train`'s `autograd::cpu` and `model::optim`.

mod adamw;
mod attention;
mod elementwise;
mod embedding;
mod gelu;
mod grad_norm;
mod layernorm;

pub use adamw::AdamWScalars;
pub use attention::AttentionDims;
pub use embedding::CudaTokenIds;
pub use grad_norm::{
    CudaGradNorm, GRAD_NORM_OUT_CLIP_FACTOR, GRAD_NORM_OUT_LEN, GRAD_NORM_OUT_NORM,
};
