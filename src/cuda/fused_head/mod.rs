//! The fused LM head on CUDA (issue 12, CUDA half): [`CudaBackend::fused_linear_token_logprobs`]
//! and its backward, the twins of [`crate::fused_head`]'s CPU ops, with the same checks and errors.
//!
//! Per (row tile × vocab tile), one cuBLAS GEMM ([`super::CudaGemm`], f32 accumulation) writes one
//! f32 logits tile; the crate's kernels (`kernels/fused_head_tiles.cu`) merge it into each row's
//! online-logsumexp state (forward) or turn it into `∂L/∂z` in place (backward), after which two
//! GEMMs with `β = 1` accumulate `∂hidden += ∂z · W_tile` and `∂W_tile += ∂zᵀ · hidden_tile`.
//! Every sum has a fixed order (vocab tiles in order for a row's state and `∂hidden`, row tiles in
//! order for `∂weight` and `∂bias`; no float atomics), so two runs give the same bits.
//!
//! Peak extra device memory: one `row_tile × vocab_tile` f32 tile, plus O(rows): the counted rows
//! (label not ignored) of `hidden` gathered once (in `T` for the forward's GEMMs, widened to f32 for
//! the backward's), their per-row state; for a bf16 / f16 head also the bias widened to f32 and, in
//! the backward, one `vocab_tile × H` f32 copy of the tile's weight rows. The gradients are f32.
//!
//! Labels are a host slice: the host picks the counted rows (as the CPU op does), uploads their
//! indices and labels (O(rows)) and never reads an ignored row of `hidden`.

mod backward;
mod forward;
mod heads;

pub use backward::{CudaFusedHeadGrads, CudaFusedSaved, FusedBackwardStatus};
pub use forward::CudaFusedTokenLogprobs;
pub use heads::{
    CudaHeadStep, CudaHiddenBatch, CudaKlSource, CudaKtoHeadInputs, CudaReferenceSource,
};

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::device::{cuda_err, CudaBackend};
use super::launch::CudaLogit;
use crate::dtype::DType;
use crate::error::{HaloError, Result};
use crate::fused_head::{check_head_shapes, FusedChunks, HeadShape};

/// An LM head on the device: `logits = hidden · weightᵀ + bias` (PyTorch's `nn.Linear(H, V)`).
#[derive(Debug, Clone, Copy)]
pub struct CudaLmHead<'a, T> {
    /// `[vocab, hidden_size]`, row-major.
    pub weight: &'a CudaSlice<T>,
    /// `[vocab]`, if the head has a bias.
    pub bias: Option<&'a CudaSlice<T>>,
    /// Rows of the weight: the vocabulary size.
    pub vocab: usize,
    /// Columns of the weight: the model's hidden size.
    pub hidden_size: usize,
}

/// Threads of the per-row tile kernels (`FUSED_THREADS` in the .cu file).
const TILE_THREADS: u32 = 128;
/// Threads of the elementwise kernels.
const ELEMENTWISE_THREADS: u32 = 256;
/// Blocks of a grid-stride elementwise kernel at most (enough to fill any GPU).
const MAX_ELEMENTWISE_BLOCKS: usize = 4096;

/// Default tiles on a GPU: 2048 × 8192 f32 = 64 MiB of logits, large enough for cuBLAS to run near
/// its peak at H ≥ 1024, a small fraction of what the materialized `[rows, V]` logits would take.
const CUDA_ROW_TILE: usize = 2048;
const CUDA_VOCAB_TILE: usize = 8192;

/// The counted rows of a batch, on both sides: indices and labels on the host, the same on the
/// device for the kernels.
pub(crate) struct DeviceCountedRows {
    pub n: usize,
    pub index: CudaSlice<i32>,
    pub labels: CudaSlice<i32>,
}

/// The chunks the ops use: the given ones (validated) or the CUDA defaults for these shapes. The
/// CPU's `vocab_groups` has no meaning here (the tiles run in order on one stream).
pub(crate) fn resolve_chunks(
    chunks: Option<FusedChunks>,
    rows: usize,
    vocab: usize,
) -> Result<FusedChunks> {
    match chunks {
        Some(c) => c.validate().map(|()| c),
        None => Ok(FusedChunks {
            row_tile: CUDA_ROW_TILE.min(rows.max(1)),
            vocab_tile: CUDA_VOCAB_TILE.min(vocab.max(1)),
            vocab_groups: 1,
        }),
    }
}

/// `0..n` in tiles of `tile`.
pub(crate) fn tiles(n: usize, tile: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..n.div_ceil(tile)).map(move |i| i * tile..((i + 1) * tile).min(n))
}

/// Byte address of element `index` of a buffer of `E` starting at `base`.
pub(crate) fn offset<E>(base: u64, index: usize) -> u64 {
    base + (index * std::mem::size_of::<E>()) as u64
}

impl CudaBackend {
    /// The fused head's shape checks (the CPU op's) plus the kernels' limits; returns `rows`.
    pub(crate) fn check_fused_head<T: CudaLogit>(
        &self,
        hidden_len: usize,
        head: &CudaLmHead<'_, T>,
        labels: &[i32],
        ignore_index: i32,
    ) -> Result<usize> {
        let rows = check_head_shapes(
            hidden_len,
            HeadShape {
                vocab: head.vocab,
                hidden_size: head.hidden_size,
                weight_len: head.weight.len(),
                bias_len: head.bias.map(|b| b.len()),
            },
            labels,
            ignore_index,
        )?;
        if rows >= i32::MAX as usize || head.vocab >= i32::MAX as usize {
            return Err(HaloError::InvalidShape(format!(
                "the fused head handles fewer than 2^31 rows and vocabulary entries (got {rows} \
                 rows, vocab {})",
                head.vocab
            )));
        }
        Ok(rows)
    }

    /// Picks the counted rows and uploads their indices and labels.
    pub(crate) fn upload_counted_rows(
        &self,
        labels: &[i32],
        ignore_index: i32,
    ) -> Result<DeviceCountedRows> {
        let index: Vec<i32> = (0..labels.len() as i32)
            .filter(|&r| labels[r as usize] != ignore_index)
            .collect();
        let counted_labels: Vec<i32> = index.iter().map(|&r| labels[r as usize]).collect();
        Ok(DeviceCountedRows {
            n: index.len(),
            index: self.htod(&index)?,
            labels: self.htod(&counted_labels)?,
        })
    }

    /// The head's bias as f32 on the device: `None` without a bias; an f32 bias is copied (O(V),
    /// once per call) so that every kernel reads one dtype.
    pub(crate) fn bias_f32<T: CudaLogit>(
        &self,
        head: &CudaLmHead<'_, T>,
    ) -> Result<Option<CudaSlice<f32>>> {
        let Some(bias) = head.bias else {
            return Ok(None);
        };
        let mut out = self.alloc_output::<f32>(head.vocab)?;
        self.widen_into(bias, 0, head.vocab, &mut out)?;
        Ok(Some(out))
    }

    /// `out[..count] = f32(src[start..start + count])` on the device.
    pub(crate) fn widen_into<T: CudaLogit>(
        &self,
        src: &CudaSlice<T>,
        start: usize,
        count: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        debug_assert!(start + count <= src.len() && count <= out.len());
        if count == 0 {
            return Ok(());
        }
        if T::DTYPE == DType::F32 {
            // Same bytes: a device-to-device copy.
            let view = src.slice(start..start + count);
            // SAFETY: `T` is f32 here (checked by its DTYPE), so the view's bytes are f32s.
            let view = unsafe { view.transmute::<f32>(count) }
                .ok_or_else(|| HaloError::Cuda("widen: f32 view".into()))?;
            let mut dst = out.slice_mut(0..count);
            return self
                .stream()
                .memcpy_dtod(&view, &mut dst)
                .map_err(cuda_err("copy device to device"));
        }
        let name = match T::DTYPE {
            DType::BF16 => "fused_head_widen_bf16",
            _ => "fused_head_widen_f16",
        };
        let func = self.function(name)?;
        let stream = self.stream();
        let (src_ptr, _r) = src.device_ptr(stream);
        let (out_ptr, _w) = cudarc::driver::DevicePtrMut::device_ptr_mut(out, stream);
        let src_ptr = offset::<T>(src_ptr, start);
        let count_arg = count as i64;
        let mut launch = stream.launch_builder(func);
        launch.arg(&src_ptr).arg(&count_arg).arg(&out_ptr);
        // SAFETY: `fused_head_widen_T(const T*, int64_t, float*)`; both ranges hold `count`
        // elements (the caller's bounds).
        unsafe { launch.launch(elementwise_config(count)) }
            .map_err(cuda_err("launch fused_head_widen"))?;
        Ok(())
    }
}

/// A grid-stride launch over `total` elements.
pub(crate) fn elementwise_config(total: usize) -> LaunchConfig {
    let blocks = total
        .div_ceil(ELEMENTWISE_THREADS as usize)
        .clamp(1, MAX_ELEMENTWISE_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of [`TILE_THREADS`] per tile row.
pub(crate) fn tile_rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (TILE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The gather entry point for storage dtype `T` (`wide`: to f32).
pub(crate) fn gather_name<T: CudaLogit>(wide: bool) -> &'static str {
    match (T::DTYPE, wide) {
        (DType::F32, _) => "fused_head_gather_f32",
        (DType::BF16, false) => "fused_head_gather_bf16",
        (DType::F16, false) => "fused_head_gather_f16",
        (DType::BF16, true) => "fused_head_gather_wide_bf16",
        (DType::F16, true) => "fused_head_gather_wide_f16",
    }
}
