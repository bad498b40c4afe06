//! Host-side checks and launch geometry shared by the op wrappers.

use cudarc::driver::{DeviceRepr, LaunchConfig};

use crate::dtype::{DType, LogitElement};
use crate::error::{HaloError, Result};
use crate::kernel_abi::{token_grid, HaloTokenParams, TOKEN_THREADS};
use crate::kernel_host;
use crate::validate::check_logits_shape;

/// A logits element the kernels exist for (`f32`, `bf16`, `f16`), storable in device memory.
pub trait CudaLogit: LogitElement + DeviceRepr {}
impl<T: LogitElement + DeviceRepr> CudaLogit for T {}

/// `<op>_<dtype>`: the entry point of `op` for element type `T`.
pub(crate) fn entry_name<T: LogitElement>(op: &str) -> String {
    let suffix = match T::DTYPE {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
    };
    format!("{op}_{suffix}")
}

pub(crate) use crate::validate::check_len;

/// The status buffer reports rows as `i32` (and `i32::MAX` means "no error").
pub(crate) fn check_rows_fit_status(rows: usize) -> Result<()> {
    if rows >= i32::MAX as usize {
        return Err(HaloError::InvalidShape(format!(
            "{rows} rows: the CUDA kernels handle at most {} rows per launch",
            i32::MAX - 1
        )));
    }
    Ok(())
}

/// Validates a `[rows, vocab]` logits buffer against `labels` with the CPU op's own check (same
/// errors), plus the kernels' limits; returns `rows`.
pub(crate) fn check_token_shape(
    logits_len: usize,
    labels_len: usize,
    vocab: usize,
) -> Result<usize> {
    let rows = check_logits_shape(logits_len, labels_len, vocab)?;
    check_rows_fit_status(rows)?;
    if vocab > i64::MAX as usize {
        return Err(HaloError::InvalidShape(format!(
            "vocab {vocab} does not fit in i64"
        )));
    }
    Ok(rows)
}

/// Parameters and launch geometry of a token kernel (`rows > 0`), from `kernels/README.md`:
/// `block = TOKEN_THREADS`, `grid = ceil(rows / rows_per_block)`.
pub(crate) fn token_launch(
    rows: usize,
    vocab: usize,
    ignore_index: i32,
) -> (HaloTokenParams, LaunchConfig) {
    let params = kernel_host::token_params(rows, vocab, ignore_index);
    let cfg = LaunchConfig {
        grid_dim: (token_grid(rows, params.rows_per_block), 1, 1),
        block_dim: (TOKEN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    (params, cfg)
}

/// Parameters and launch geometry of a split token kernel (`kernels/split_rows.cuh`; `rows > 0`,
/// `splits` from [`super::RowSplit::resolve`]): one row per block, `grid = rows · splits`.
pub(crate) fn token_split_launch(
    rows: usize,
    vocab: usize,
    ignore_index: i32,
    splits: usize,
) -> Result<(HaloTokenParams, LaunchConfig)> {
    let params = HaloTokenParams {
        rows_per_block: 1,
        ..kernel_host::token_params(rows, vocab, ignore_index)
    };
    Ok((params, blocks_launch(rows * splits, TOKEN_THREADS)?))
}

/// One block per sequence / a single block: `block = threads`, `grid = blocks`.
pub(crate) fn blocks_launch(blocks: usize, threads: u32) -> Result<LaunchConfig> {
    let grid = u32::try_from(blocks)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| {
            HaloError::InvalidShape(format!("{blocks} blocks exceed the CUDA grid limit"))
        })?;
    Ok(LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Device pointers must be aligned to their element type (the kernels' only alignment need).
pub(crate) fn check_aligned<T>(what: &'static str, ptr: u64) -> Result<()> {
    let align = std::mem::align_of::<T>() as u64;
    if !ptr.is_multiple_of(align) {
        return Err(HaloError::InvalidShape(format!(
            "`{what}` device pointer {ptr:#x} is not aligned to its element size ({align} bytes)"
        )));
    }
    Ok(())
}
