//! Host emulation of the CUDA kernels: the very same `kernels/*.cu` sources, compiled for the CPU
//! under `kernels/emulation/cuda_host.h` (see `build/host_emulation.rs`), behind safe functions that
//! mirror the CPU ops' API (same validation, same errors; host slices in and out).
//!
//! This is what CI, which has no GPU, uses to test the kernel source itself — like Triton's
//! interpreter mode. It is slow (a CUDA thread is a fiber) and meant for tests only.

mod ffi;
pub mod losses;
pub mod sequence_sums;
pub mod token_logprobs;

pub use losses::{
    dpo_loss, dpo_loss_kernel, kto_loss, kto_loss_kernel, DpoKernelLoss, DpoKernelOutput, DpoPairs,
    KlSource, KtoKernelConfig, KtoKernelLoss, KtoKernelOutput,
};
pub use sequence_sums::{
    broadcast_sequence_grad, humanline_grad_mask, sequence_logratio_sums, sequence_sums,
};
pub use token_logprobs::{
    token_logprobs, token_logprobs_backward, token_logprobs_backward_inplace, token_logprobs_into,
    EmulatedElement,
};

/// The C compiler's view of the kernel ABI: `"sizeof HaloTokenParams"`, `"HaloTokenParams.vocab"`
/// (field offset) or a constant such as `"HALO_STATUS_OK"`. `None` for an unknown name.
pub fn abi_query(name: &str) -> Option<i64> {
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string that outlives the call.
    let value = unsafe { ffi::halo_emu_abi_query(c_name.as_ptr()) };
    (value >= 0).then_some(value)
}

/// `halo_token_rows_per_block(vocab)` as compiled from `kernels/halo_abi.h`.
pub fn c_token_rows_per_block(vocab: usize) -> i32 {
    // SAFETY: pure function of its argument.
    unsafe { ffi::halo_emu_token_rows_per_block(vocab as i64) }
}
