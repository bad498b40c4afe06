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

/// Self-tests of the emulation runtime itself (conversions and warp primitives), for
/// `tests/emulated_runtime.rs`.
pub mod runtime_selftest {
    use super::ffi;

    /// `__float2bfloat16_rn` as emulated, as raw bits.
    pub fn float_to_bf16_bits(x: f32) -> u16 {
        // SAFETY: pure function.
        unsafe { ffi::halo_emu_float2bfloat16_rn(x) }
    }
    /// `__bfloat162float` as emulated.
    pub fn bf16_bits_to_float(x: u16) -> f32 {
        // SAFETY: pure function.
        unsafe { ffi::halo_emu_bfloat162float(x) }
    }
    /// `__float2half_rn` as emulated, as raw bits.
    pub fn float_to_f16_bits(x: f32) -> u16 {
        // SAFETY: pure function.
        unsafe { ffi::halo_emu_float2half_rn(x) }
    }
    /// `__half2float` as emulated.
    pub fn f16_bits_to_float(x: u16) -> f32 {
        // SAFETY: pure function.
        unsafe { ffi::halo_emu_half2float(x) }
    }
    /// Runs the warp-primitive self-test kernel: 8 ints per thread (see emulation_shims.cpp).
    pub fn warp_primitives(grid: u32, block: u32) -> Vec<i32> {
        let mut out = vec![i32::MIN; 8 * (grid * block) as usize];
        // SAFETY: `out` holds 8 ints per launched thread.
        unsafe { ffi::halo_emu_warp_selftest(grid, block, out.as_mut_ptr()) };
        out
    }
}
