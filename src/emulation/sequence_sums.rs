//! Emulated sequence kernels (`kernels/sequence_sums.cu`) with the CPU ops' API:
//! [`crate::cpu::sequence_sums`], [`crate::cpu::sequence_logratio_sums`],
//! [`crate::cpu::broadcast_sequence_grad`], [`crate::cpu::humanline_grad_mask`]. The layout is validated on the host (as the CUDA
//! backend does before uploading `cu_seqlens`).

use super::ffi;
use crate::cpu::{LogRatioClamp, SequenceLayout, SequenceSums};
use crate::error::{HaloError, Result};
use crate::kernel_abi::{HaloSeqParams, SEQ_THREADS};
use crate::kernel_host;
use crate::validate::{check_clamp, check_humanline_args, check_len};

fn seq_params(
    layout: &SequenceLayout<'_>,
    rows: usize,
    ignore_index: i32,
    clamp: Option<LogRatioClamp>,
) -> Result<HaloSeqParams> {
    let batch = layout.check_rows(rows)?;
    if batch > u32::MAX as usize || rows > u32::MAX as usize {
        return Err(HaloError::InvalidShape(format!(
            "{batch} sequences of {rows} rows: the kernels take 32-bit offsets"
        )));
    }
    check_clamp(clamp)?;
    Ok(kernel_host::seq_params(batch, layout, ignore_index, clamp))
}

/// Poisoned outputs: NaN sums and `u32::MAX` counts, so an unwritten element cannot pass.
fn poisoned(batch: usize) -> SequenceSums {
    SequenceSums {
        sums: vec![f32::NAN; batch],
        counts: vec![u32::MAX; batch],
    }
}

/// Emulated [`crate::cpu::sequence_sums`].
pub fn sequence_sums(
    token_values: &[f32],
    labels: &[i32],
    ignore_index: i32,
    layout: SequenceLayout<'_>,
) -> Result<SequenceSums> {
    check_len("labels", token_values.len(), labels.len())?;
    let p = seq_params(&layout, token_values.len(), ignore_index, None)?;
    let mut out = poisoned(layout.batch());
    if out.sums.is_empty() {
        return Ok(out);
    }
    let (grid, sums, counts) = (
        p.batch as u32,
        out.sums.as_mut_ptr(),
        out.counts.as_mut_ptr(),
    );
    // SAFETY: layout validated against the row count; outputs hold `batch` entries.
    unsafe {
        match layout {
            SequenceLayout::Padded { .. } => ffi::halo_emu_sequence_sums_padded_f32(
                grid,
                SEQ_THREADS,
                token_values.as_ptr(),
                labels.as_ptr(),
                sums,
                counts,
                p,
            ),
            SequenceLayout::Packed { cu_seqlens } => ffi::halo_emu_sequence_sums_packed_f32(
                grid,
                SEQ_THREADS,
                token_values.as_ptr(),
                labels.as_ptr(),
                cu_seqlens.as_ptr(),
                sums,
                counts,
                p,
            ),
        }
    }
    Ok(out)
}

/// Emulated [`crate::cpu::sequence_logratio_sums`].
pub fn sequence_logratio_sums(
    policy_logp: &[f32],
    reference_logp: &[f32],
    labels: &[i32],
    ignore_index: i32,
    layout: SequenceLayout<'_>,
    clamp: Option<LogRatioClamp>,
) -> Result<SequenceSums> {
    check_len("reference_logp", policy_logp.len(), reference_logp.len())?;
    check_len("labels", policy_logp.len(), labels.len())?;
    let p = seq_params(&layout, policy_logp.len(), ignore_index, clamp)?;
    let mut out = poisoned(layout.batch());
    if out.sums.is_empty() {
        return Ok(out);
    }
    let (grid, sums, counts) = (
        p.batch as u32,
        out.sums.as_mut_ptr(),
        out.counts.as_mut_ptr(),
    );
    // SAFETY: layout validated against the row count; outputs hold `batch` entries.
    unsafe {
        match layout {
            SequenceLayout::Padded { .. } => ffi::halo_emu_sequence_logratio_sums_padded_f32(
                grid,
                SEQ_THREADS,
                policy_logp.as_ptr(),
                reference_logp.as_ptr(),
                labels.as_ptr(),
                sums,
                counts,
                p,
            ),
            SequenceLayout::Packed { cu_seqlens } => {
                ffi::halo_emu_sequence_logratio_sums_packed_f32(
                    grid,
                    SEQ_THREADS,
                    policy_logp.as_ptr(),
                    reference_logp.as_ptr(),
                    labels.as_ptr(),
                    cu_seqlens.as_ptr(),
                    sums,
                    counts,
                    p,
                )
            }
        }
    }
    Ok(out)
}

/// Emulated [`crate::cpu::broadcast_sequence_grad`].
pub fn broadcast_sequence_grad(
    grad_seq: &[f32],
    labels: &[i32],
    ignore_index: i32,
    layout: SequenceLayout<'_>,
) -> Result<Vec<f32>> {
    let p = seq_params(&layout, labels.len(), ignore_index, None)?;
    check_len("grad_seq", layout.batch(), grad_seq.len())?;
    let mut token_grad = vec![f32::NAN; labels.len()];
    if grad_seq.is_empty() {
        return Ok(token_grad);
    }
    let grid = p.batch as u32;
    // SAFETY: layout validated against labels.len(); grad_seq holds `batch` entries.
    unsafe {
        match layout {
            SequenceLayout::Padded { .. } => ffi::halo_emu_broadcast_sequence_grad_padded_f32(
                grid,
                SEQ_THREADS,
                grad_seq.as_ptr(),
                labels.as_ptr(),
                token_grad.as_mut_ptr(),
                p,
            ),
            SequenceLayout::Packed { cu_seqlens } => {
                ffi::halo_emu_broadcast_sequence_grad_packed_f32(
                    grid,
                    SEQ_THREADS,
                    grad_seq.as_ptr(),
                    labels.as_ptr(),
                    cu_seqlens.as_ptr(),
                    token_grad.as_mut_ptr(),
                    p,
                )
            }
        }
    }
    Ok(token_grad)
}

/// Emulated [`crate::cpu::humanline_grad_mask`].
pub fn humanline_grad_mask(
    policy_logp: &[f32],
    reference_logp: &[f32],
    clamp: LogRatioClamp,
    token_grad: &mut [f32],
) -> Result<()> {
    check_humanline_args(
        policy_logp.len(),
        reference_logp.len(),
        token_grad.len(),
        clamp,
    )?;
    let n = policy_logp.len();
    if n == 0 {
        return Ok(());
    }
    let grid = u32::try_from(n.div_ceil(SEQ_THREADS as usize))
        .map_err(|_| HaloError::InvalidShape(format!("{n} tokens exceed the 1-D grid")))?;
    let p = kernel_host::clamp_params(n, clamp);
    // SAFETY: all three slices hold n elements.
    unsafe {
        ffi::halo_emu_humanline_grad_mask_f32(
            grid,
            SEQ_THREADS,
            policy_logp.as_ptr(),
            reference_logp.as_ptr(),
            token_grad.as_mut_ptr(),
            p,
        );
    }
    Ok(())
}
