//! Emulated token-level kernels with the CPU ops' API: [`crate::cpu::token_logprobs`] and its
//! backward, computed by the CUDA source in `kernels/token_logprobs*.cu` running on the host.
//!
//! Shapes are validated on the host as the CUDA backend would; labels and non-finite values are
//! checked by the kernels themselves (status buffer), so the tests exercise the kernels' reporting.

use half::{bf16, f16};

use super::ffi;
use crate::cpu::TokenLogprobs;
use crate::dtype::LogitElement;
use crate::error::{HaloError, Result};
use crate::kernel_abi::{token_grid, HaloTokenParams, STATUS_LEN, STATUS_OK, TOKEN_THREADS};
use crate::kernel_host::{self, token_status_error};
use crate::validate::{
    check_backward_inputs, check_forward_outputs, check_grad_logits, check_logits_shape,
};

/// A logits dtype with emulated kernels.
pub trait EmulatedElement: LogitElement {
    /// # Safety
    /// Buffers sized as the kernel ABI requires for `p`.
    unsafe fn launch_forward(
        grid: u32,
        logits: *const Self,
        labels: *const i32,
        logp: *mut f32,
        lse: *mut f32,
        status: *mut i32,
        p: HaloTokenParams,
    );
    /// # Safety
    /// Buffers sized as the kernel ABI requires for `p`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_backward(
        grid: u32,
        logits: *const Self,
        labels: *const i32,
        lse: *const f32,
        grad_logp: *const f32,
        grad_logits: *mut Self,
        status: *mut i32,
        p: HaloTokenParams,
    );
    /// # Safety
    /// Buffers sized as the kernel ABI requires for `p`.
    unsafe fn launch_backward_inplace(
        grid: u32,
        logits: *mut Self,
        labels: *const i32,
        lse: *const f32,
        grad_logp: *const f32,
        status: *mut i32,
        p: HaloTokenParams,
    );
}

macro_rules! emulated_element {
    ($t:ty, $fwd:ident, $bwd:ident, $inplace:ident) => {
        impl EmulatedElement for $t {
            unsafe fn launch_forward(
                grid: u32,
                logits: *const Self,
                labels: *const i32,
                logp: *mut f32,
                lse: *mut f32,
                status: *mut i32,
                p: HaloTokenParams,
            ) {
                ffi::$fwd(grid, TOKEN_THREADS, logits, labels, logp, lse, status, p)
            }
            unsafe fn launch_backward(
                grid: u32,
                logits: *const Self,
                labels: *const i32,
                lse: *const f32,
                grad_logp: *const f32,
                grad_logits: *mut Self,
                status: *mut i32,
                p: HaloTokenParams,
            ) {
                ffi::$bwd(
                    grid,
                    TOKEN_THREADS,
                    logits,
                    labels,
                    lse,
                    grad_logp,
                    grad_logits,
                    status,
                    p,
                )
            }
            unsafe fn launch_backward_inplace(
                grid: u32,
                logits: *mut Self,
                labels: *const i32,
                lse: *const f32,
                grad_logp: *const f32,
                status: *mut i32,
                p: HaloTokenParams,
            ) {
                ffi::$inplace(
                    grid,
                    TOKEN_THREADS,
                    logits,
                    labels,
                    lse,
                    grad_logp,
                    status,
                    p,
                )
            }
        }
    };
}

emulated_element!(
    f32,
    halo_emu_token_logprobs_forward_f32,
    halo_emu_token_logprobs_backward_f32,
    halo_emu_token_logprobs_backward_inplace_f32
);
emulated_element!(
    bf16,
    halo_emu_token_logprobs_forward_bf16,
    halo_emu_token_logprobs_backward_bf16,
    halo_emu_token_logprobs_backward_inplace_bf16
);
emulated_element!(
    f16,
    halo_emu_token_logprobs_forward_f16,
    halo_emu_token_logprobs_backward_f16,
    halo_emu_token_logprobs_backward_inplace_f16
);

/// Validates the `[rows, vocab]` shape and returns the kernel parameters.
pub(crate) fn token_params(
    logits_len: usize,
    labels_len: usize,
    vocab: usize,
    ignore_index: i32,
) -> Result<HaloTokenParams> {
    let rows = check_logits_shape(logits_len, labels_len, vocab)?;
    if rows >= i32::MAX as usize {
        return Err(HaloError::InvalidShape(format!(
            "{rows} rows: the kernels index rows with int32 (at most {})",
            i32::MAX - 1
        )));
    }
    Ok(kernel_host::token_params(rows, vocab, ignore_index))
}

/// Emulated [`crate::cpu::token_logprobs`].
pub fn token_logprobs<T: EmulatedElement>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
) -> Result<TokenLogprobs> {
    // NaN-filled, so an element the kernel failed to write cannot pass for a result.
    let rows = labels.len();
    let mut out = TokenLogprobs {
        logp: vec![f32::NAN; rows],
        lse: vec![f32::NAN; rows],
    };
    token_logprobs_into(
        logits,
        labels,
        vocab,
        ignore_index,
        &mut out.logp,
        &mut out.lse,
    )?;
    Ok(out)
}

/// Emulated [`crate::cpu::token_logprobs_into`].
pub fn token_logprobs_into<T: EmulatedElement>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
    logp: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let p = token_params(logits.len(), labels.len(), vocab, ignore_index)?;
    let rows = labels.len();
    check_forward_outputs(rows, logp.len(), lse.len())?;
    if rows == 0 {
        return Ok(());
    }
    let mut status = [STATUS_OK; STATUS_LEN];
    // SAFETY: lengths checked above match the ABI: logits rows*vocab, labels/logp/lse rows.
    unsafe {
        T::launch_forward(
            token_grid(rows, p.rows_per_block),
            logits.as_ptr(),
            labels.as_ptr(),
            logp.as_mut_ptr(),
            lse.as_mut_ptr(),
            status.as_mut_ptr(),
            p,
        );
    }
    token_status_error(
        &status,
        |row| Ok(labels[row]),
        vocab,
        ignore_index,
        "logits",
    )
}

/// Emulated [`crate::cpu::token_logprobs_backward`]. On error the contents of `grad_logits` are
/// unspecified (the kernel reports errors after writing, as on the GPU).
#[allow(clippy::too_many_arguments)]
pub fn token_logprobs_backward<T: EmulatedElement>(
    logits: &[T],
    labels: &[i32],
    lse: &[f32],
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
    grad_logits: &mut [T],
) -> Result<()> {
    let p = token_params(logits.len(), labels.len(), vocab, ignore_index)?;
    let rows = labels.len();
    check_backward_inputs(rows, lse.len(), grad_logp.len())?;
    check_grad_logits(rows, vocab, grad_logits.len())?;
    if rows == 0 {
        return Ok(());
    }
    let mut status = [STATUS_OK; STATUS_LEN];
    // SAFETY: every length checked against rows / rows*vocab above.
    unsafe {
        T::launch_backward(
            token_grid(rows, p.rows_per_block),
            logits.as_ptr(),
            labels.as_ptr(),
            lse.as_ptr(),
            grad_logp.as_ptr(),
            grad_logits.as_mut_ptr(),
            status.as_mut_ptr(),
            p,
        );
    }
    token_status_error(&status, |row| Ok(labels[row]), vocab, ignore_index, "lse")
}

/// Emulated [`crate::cpu::token_logprobs_backward_inplace`]. On error the logits are unspecified.
pub fn token_logprobs_backward_inplace<T: EmulatedElement>(
    logits: &mut [T],
    labels: &[i32],
    lse: &[f32],
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
) -> Result<()> {
    let p = token_params(logits.len(), labels.len(), vocab, ignore_index)?;
    let rows = labels.len();
    check_backward_inputs(rows, lse.len(), grad_logp.len())?;
    if rows == 0 {
        return Ok(());
    }
    let mut status = [STATUS_OK; STATUS_LEN];
    // SAFETY: every length checked against rows / rows*vocab above.
    unsafe {
        T::launch_backward_inplace(
            token_grid(rows, p.rows_per_block),
            logits.as_mut_ptr(),
            labels.as_ptr(),
            lse.as_ptr(),
            grad_logp.as_ptr(),
            status.as_mut_ptr(),
            p,
        );
    }
    token_status_error(&status, |row| Ok(labels[row]), vocab, ignore_index, "lse")
}
