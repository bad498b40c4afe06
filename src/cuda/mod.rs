//! The CUDA backend: the kernels of `kernels/*.cu` (compiled to PTX by `build/ptx.rs`, loaded at
//! run time through the driver API with cudarc), wrapped in safe methods of [`CudaBackend`] that
//! mirror the CPU ops of [`crate::cpu`] and the losses of [`crate::losses`].
//!
//! Every wrapper validates lengths, shapes and hyper-parameters on the host before launching,
//! and reads back the kernel's status word to return the same [`crate::HaloError`] the CPU op
//! returns for the same input (bad label, non-finite logits, ...). The `enqueue_*` forms queue the
//! kernel without waiting and leave the status to the caller (pipelines, benchmarks, a training
//! step that reads every status with its loss in one wait: [`StatusWord`]'s `*_error` methods turn
//! a word read later into the op's error; [`CudaBackend::enqueue_kto_step_tokens`] and
//! [`CudaBackend::enqueue_dpo_step_tokens`] queue a loss from per-token log-probs already on the
//! device).
//!
//! Without a GPU (or without nvcc at build time) [`CudaBackend::new`] returns
//! [`crate::HaloError::CudaUnavailable`]; nothing here panics.
//!
//! ```
//! use halo_kernels::cuda::CudaBackend;
//! use halo_kernels::IGNORE_INDEX;
//!
//! // A GPU if there is one, else the emulated device (feature `emulation`), else nothing to do.
//! let Ok(gpu) = CudaBackend::new().or_else(|_| CudaBackend::emulated()) else { return Ok(()) };
//! let logits = gpu.htod(&[0.0f32, 1.0, 2.0, 3.0, 0.5, 0.25])?; // 2 rows × vocab 3
//! let labels = gpu.htod(&[2i32, IGNORE_INDEX])?;
//! let out = gpu.token_logprobs(&logits, &labels, 3, IGNORE_INDEX)?;
//! let logp = gpu.dtoh(&out.logp)?;
//! let lse = (1f32 + 1f32.exp() + 2f32.exp()).ln();
//! assert!((logp[0] - (2.0 - lse)).abs() < 1e-5 && logp[1] == 0.0);
//! # Ok::<(), halo_kernels::HaloError>(())
//! ```
//!
//! # Building the kernels
//! `build/ptx.rs` compiles `kernels/*.cu` with nvcc when it finds one (`HALO_NVCC`, `$CUDA_HOME`,
//! `PATH`, or the project-local install of `scripts/install_nvcc.sh`, which needs no GPU);
//! `HALO_NVCC=none` builds without kernels. `HALO_CUDA_ARCH` picks the PTX target (default
//! `compute_80`). `scripts/check_kernels.sh` reports registers and spills per kernel.
//!
//! # Testing on a GPU
//! `tests/cuda_kernels.rs` compares every kernel with its CPU op; without a GPU each test is
//! reported as ignored. On a machine with a GPU and cargo: `cargo test --release --test
//! cuda_kernels` and `cargo bench --bench cuda_ops`. For a lent GPU machine without a toolchain:
//! `bash scripts/gpu_check.sh prepare` here, then `bash scripts/gpu_check.sh run` there with
//! `.tools/gpu_bin` carried along (steps `tests`, `sanitize` — compute-sanitizer memcheck and
//! racecheck — and `bench`, one command each under the device's 10-minute limit).

mod device;
mod dpo;
mod fused_head;
mod gemm;
mod kto;
mod launch;
mod naive_baseline;
pub mod nn;
pub mod ptx;
mod readback;
mod sequence_sums;
mod split_rows;
mod status;
mod step;
mod token_logprobs;
mod token_logprobs_backward;
mod token_step;

pub use device::{check_available, CudaBackend, HOW_TO_COMPILE_KERNELS};
pub use dpo::{CudaPairBatch, CudaPairGrads};
pub use fused_head::{
    CudaFusedHeadGrads, CudaFusedSaved, CudaFusedTokenLogprobs, CudaHeadStep, CudaHiddenBatch,
    CudaKlSource, CudaKtoHeadInputs, CudaLmHead, CudaReferenceSource, FusedBackwardStatus,
};
pub use gemm::{CudaGemm, GemmShape};
pub use kto::{CudaKlInput, CudaKtoBatch};
pub use launch::CudaLogit;
pub use sequence_sums::CudaSequenceSums;
pub use split_rows::{
    auto_row_splits, row_slice, RowSplit, BLOCKS_PER_MULTIPROCESSOR, MAX_ROW_SPLITS,
    MIN_SLICE_ELEMENTS,
};
pub use status::{KernelStatus, StatusWord};
pub use step::{CudaKtoStepInputs, CudaLogits, CudaPairReference, CudaStep};
pub use token_logprobs::CudaTokenLogprobs;
pub use token_step::{CudaTokenStep, TOKEN_STEP_VALUES};

/// Re-exported so callers name device buffers without depending on cudarc directly.
pub use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
};
