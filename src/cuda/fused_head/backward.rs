//! [`CudaBackend::fused_linear_token_logprobs_backward`]: the GPU twin of
//! [`crate::fused_head::fused_linear_token_logprobs_backward`].
//!
//! Loop order (fixed, so the bits are too): vocab tiles outer, row tiles inner. `∂W_tile` (and
//! `∂bias`) accumulate over the row tiles in order; each counted row's `∂hidden` over the vocab
//! tiles in order. The GEMMs run in f32 (the tile's weight rows and the counted hidden rows widened
//! once): `∂z` is f32 and is never rounded to the storage dtype.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::{
    elementwise_config, offset, resolve_chunks, tile_rows_config, tiles, CudaLmHead,
    DeviceCountedRows,
};
use crate::cuda::device::{cuda_err, CudaBackend};
use crate::cuda::launch::CudaLogit;
use crate::cuda::{GemmShape, KernelStatus};
use crate::dtype::DType;
use crate::error::{HaloError, Result};
use crate::fused_head::FusedChunks;
use crate::kernel_abi::{STATUS_NONFINITE, STATUS_NONFINITE_GRAD};
use crate::validate::{check_counted_finite, check_len};

/// Gradients of the fused head on the device, f32 whatever the inputs' dtype (the fields of
/// [`crate::fused_head::FusedHeadGrads`]).
#[derive(Debug)]
pub struct CudaFusedHeadGrads {
    /// `∂L/∂hidden`, `[rows, H]` (zero rows where the label is ignored).
    pub hidden: CudaSlice<f32>,
    /// `∂L/∂weight`, `[V, H]`.
    pub weight: CudaSlice<f32>,
    /// `∂L/∂bias`, `[V]`, when the head has a bias.
    pub bias: Option<CudaSlice<f32>>,
}

/// The two status buffers of a fused head backward: the tiles' (non-finite logits or saved
/// values) and the gradients' (a sum of finite products that overflowed).
#[derive(Debug)]
pub struct FusedBackwardStatus {
    /// `fused_head_tile_backward`'s checks.
    pub tiles: KernelStatus,
    /// `fused_head_first_nonfinite` over `∂hidden` (slot `STATUS_NONFINITE`) and `∂weight`
    /// (`STATUS_NONFINITE_GRAD`).
    pub grads: KernelStatus,
}

/// The forward's saved values and `∂L/∂logp` per row, on the device.
#[derive(Debug, Clone, Copy)]
pub struct CudaFusedSaved<'a> {
    /// [`super::CudaFusedTokenLogprobs::row_max`].
    pub row_max: &'a CudaSlice<f32>,
    /// [`super::CudaFusedTokenLogprobs::ln_sum`].
    pub ln_sum: &'a CudaSlice<f32>,
    /// `∂L/∂logp` per row.
    pub grad_logp: &'a CudaSlice<f32>,
}

impl<'a> CudaFusedSaved<'a> {
    /// The per-row inputs with the names the errors give them.
    fn named(&self) -> [(&'static str, &'a CudaSlice<f32>); 3] {
        [
            ("row_max", self.row_max),
            ("ln_sum", self.ln_sum),
            ("grad_logp", self.grad_logp),
        ]
    }
}

impl CudaBackend {
    /// Gradients of `L` w.r.t. the head's inputs: the CUDA twin of
    /// [`crate::fused_head::fused_linear_token_logprobs_backward`], with the same errors. `chunks`
    /// need not equal the forward's. Ignored rows are not read. Waits for the device (once).
    pub fn fused_linear_token_logprobs_backward<T: CudaLogit>(
        &self,
        hidden: &CudaSlice<T>,
        head: &CudaLmHead<'_, T>,
        labels: &[i32],
        ignore_index: i32,
        saved: CudaFusedSaved<'_>,
        chunks: Option<FusedChunks>,
    ) -> Result<CudaFusedHeadGrads> {
        let mut status = self.new_fused_backward_status()?;
        let grads = self.enqueue_fused_linear_token_logprobs_backward(
            hidden,
            head,
            labels,
            ignore_index,
            saved,
            chunks,
            &mut status,
        )?;
        let (tiles, sums) = (
            self.read_status(&status.tiles)?,
            self.read_status(&status.grads)?,
        );
        if let Some(r) = tiles.nonfinite_grad_row() {
            // Name the input as the CPU op does, from host copies (this error path only).
            for (what, values) in saved.named() {
                check_counted_finite(what, &self.dtoh(values)?, labels, ignore_index)?;
            }
            return Err(HaloError::NonFinite {
                what: "grad_logp",
                row: r,
            });
        }
        if let Some(r) = tiles.nonfinite_row() {
            return Err(self.fused_non_finite_error(hidden, head, labels, ignore_index, r)?);
        }
        sums.fused_gradient_sums_error()?;
        Ok(grads)
    }

    /// Two reset status buffers for [`CudaBackend::enqueue_fused_linear_token_logprobs_backward`].
    pub fn new_fused_backward_status(&self) -> Result<FusedBackwardStatus> {
        Ok(FusedBackwardStatus {
            tiles: self.new_status()?,
            grads: self.new_status()?,
        })
    }

    /// [`CudaBackend::fused_linear_token_logprobs_backward`] queued without a wait: shapes and
    /// labels are checked now; the finiteness checks land in `status` (read both whenever
    /// convenient and turn them into the error with
    /// [`StatusWord::fused_backward_tiles_error`](crate::cuda::StatusWord::fused_backward_tiles_error)
    /// and [`StatusWord::fused_gradient_sums_error`](crate::cuda::StatusWord::fused_gradient_sums_error)). With a
    /// failed check the gradients hold garbage (non-finite values), never out-of-bounds writes.
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_fused_linear_token_logprobs_backward<T: CudaLogit>(
        &self,
        hidden: &CudaSlice<T>,
        head: &CudaLmHead<'_, T>,
        labels: &[i32],
        ignore_index: i32,
        saved: CudaFusedSaved<'_>,
        chunks: Option<FusedChunks>,
        status: &mut FusedBackwardStatus,
    ) -> Result<CudaFusedHeadGrads> {
        let rows = self.check_fused_head(hidden.len(), head, labels, ignore_index)?;
        let named = saved.named();
        for (what, values) in named {
            check_len(what, rows, values.len())?;
        }
        let (h, vocab) = (head.hidden_size, head.vocab);
        let counted = self.upload_counted_rows(labels, ignore_index)?;
        let n = counted.n;
        let chunks = resolve_chunks(chunks, n, vocab)?;
        let mut grads = CudaFusedHeadGrads {
            hidden: self.alloc_zeros(rows * h)?,
            weight: self.alloc_zeros(vocab * h)?,
            bias: head.bias.map(|_| self.alloc_zeros(vocab)).transpose()?,
        };
        if n == 0 {
            return Ok(grads);
        }
        let gemm = self.gemm()?;
        let bias = self.bias_f32(head)?;
        // The counted rows, widened to f32 once; their saved values and upstream gradient.
        let mut hid = self.alloc_output::<f32>(n * h)?;
        self.gather_rows(hidden, &counted.index, n, h, true, &mut hid)?;
        let mut per_row = [
            self.alloc_output::<f32>(n)?,
            self.alloc_output::<f32>(n)?,
            self.alloc_output::<f32>(n)?,
        ];
        for ((_, values), out) in named.iter().zip(per_row.iter_mut()) {
            self.gather_rows(*values, &counted.index, n, 1, true, out)?;
        }
        let mut grad_counted = self.alloc_zeros::<f32>(n * h)?;
        let mut tile = self.alloc_output::<f32>(chunks.row_tile.min(n) * chunks.vocab_tile)?;
        let mut wide_weight = match T::DTYPE {
            DType::F32 => None,
            _ => Some(self.alloc_output::<f32>(chunks.vocab_tile.min(vocab) * h)?),
        };
        for vt in tiles(vocab, chunks.vocab_tile) {
            let width = vt.len();
            if let Some(wide) = wide_weight.as_mut() {
                self.widen_into(head.weight, vt.start * h, width * h, wide)?;
            }
            for rt in tiles(n, chunks.row_tile) {
                let hid_rows = hid.slice(rt.start * h..rt.end * h);
                let shape = GemmShape::packed(rt.len(), width, h, false, true);
                {
                    let mut z = tile.slice_mut(..rt.len() * width);
                    match wide_weight.as_ref() {
                        Some(wide) => {
                            let w = wide.slice(..width * h);
                            gemm.gemm(&shape, 1.0, &hid_rows, &w, 0.0, &mut z)?;
                        }
                        None => {
                            // SAFETY: T is f32 here (no widened copy), so the bytes are f32s.
                            let w = unsafe { head.weight.transmute::<f32>(vocab * h) }
                                .ok_or_else(|| HaloError::Cuda("weight as f32".into()))?;
                            let w = w.slice(vt.start * h..vt.end * h);
                            gemm.gemm(&shape, 1.0, &hid_rows, &w, 0.0, &mut z)?;
                        }
                    }
                }
                self.tile_backward(
                    &mut tile,
                    width,
                    bias.as_ref(),
                    &counted,
                    &per_row,
                    rt.clone(),
                    vt.clone(),
                    &mut status.tiles,
                )?;
                let dz = tile.slice(..rt.len() * width);
                // ∂hidden[rt] += ∂z · W_tile   ([rt, width] · [width, H])
                let dh_shape = GemmShape::packed(rt.len(), h, width, false, false);
                let mut dh = grad_counted.slice_mut(rt.start * h..rt.end * h);
                // ∂W_tile += ∂zᵀ · hidden[rt]   ([width, rt] · [rt, H])
                let dw_shape = GemmShape::packed(width, h, rt.len(), true, false);
                let mut dw = grads.weight.slice_mut(vt.start * h..vt.end * h);
                match wide_weight.as_ref() {
                    Some(wide) => {
                        let w = wide.slice(..width * h);
                        gemm.gemm(&dh_shape, 1.0, &dz, &w, 1.0, &mut dh)?;
                    }
                    None => {
                        // SAFETY: as above.
                        let w = unsafe { head.weight.transmute::<f32>(vocab * h) }
                            .ok_or_else(|| HaloError::Cuda("weight as f32".into()))?;
                        let w = w.slice(vt.start * h..vt.end * h);
                        gemm.gemm(&dh_shape, 1.0, &dz, &w, 1.0, &mut dh)?;
                    }
                }
                gemm.gemm(&dw_shape, 1.0, &dz, &hid_rows, 1.0, &mut dw)?;
                if let Some(db) = grads.bias.as_mut() {
                    self.bias_grad(&tile, rt.len(), width, db, vt.start)?;
                }
            }
        }
        self.scatter_rows(&grad_counted, &counted.index, n, h, &mut grads.hidden)?;
        // Finite inputs can still overflow a sum of f32 products: report it rather than return inf.
        self.first_nonfinite(&grads.hidden, h, &mut status.grads, STATUS_NONFINITE)?;
        self.first_nonfinite(&grads.weight, h, &mut status.grads, STATUS_NONFINITE_GRAD)?;
        Ok(grads)
    }

    /// Turns the tile `z[rt, vt]` (packed at the start of `tile`) into `∂L/∂z` in place.
    #[allow(clippy::too_many_arguments)]
    fn tile_backward(
        &self,
        tile: &mut CudaSlice<f32>,
        width: usize,
        bias: Option<&CudaSlice<f32>>,
        counted: &DeviceCountedRows,
        per_row: &[CudaSlice<f32>; 3],
        rt: std::ops::Range<usize>,
        vt: std::ops::Range<usize>,
        status: &mut KernelStatus,
    ) -> Result<()> {
        let func = self.function("fused_head_tile_backward")?;
        let stream = self.stream();
        let (tile_ptr, _w0) = tile.device_ptr_mut(stream);
        let bias_guard = bias.map(|b| b.device_ptr(stream));
        let bias_ptr = bias_guard
            .as_ref()
            .map_or(0, |(p, _)| offset::<f32>(*p, vt.start));
        let (labels_ptr, _r0) = counted.labels.device_ptr(stream);
        let labels_ptr = offset::<i32>(labels_ptr, rt.start);
        let [a, b, c] = per_row;
        let (pa, _ra) = a.device_ptr(stream);
        let (pb, _rb) = b.device_ptr(stream);
        let (pc, _rc) = c.device_ptr(stream);
        let [pa, pb, pc] = [pa, pb, pc].map(|p| offset::<f32>(p, rt.start));
        let (status_ptr, _w1) = status.buf.device_ptr_mut(stream);
        let (width_arg, start_arg, base_arg) = (width as i64, vt.start as i64, rt.start as i64);
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&tile_ptr)
            .arg(&width_arg)
            .arg(&bias_ptr)
            .arg(&labels_ptr)
            .arg(&start_arg)
            .arg(&pa)
            .arg(&pb)
            .arg(&pc)
            .arg(&base_arg)
            .arg(&status_ptr);
        // SAFETY: the signature of `fused_head_tile_backward`; the tile holds rt.len() · width
        // f32s, the bias vt.end ≤ vocab, the labels and per-row values rt.end ≤ n entries.
        unsafe { launch.launch(tile_rows_config(rt.len())) }
            .map_err(cuda_err("launch fused_head_tile_backward"))?;
        Ok(())
    }

    /// `∂bias[vocab_start..][..width] += Σ_rows ∂z` of the tile's `rows` rows.
    fn bias_grad(
        &self,
        tile: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        grad_bias: &mut CudaSlice<f32>,
        vocab_start: usize,
    ) -> Result<()> {
        let func = self.function("fused_head_bias_grad")?;
        let stream = self.stream();
        let (tile_ptr, _r) = tile.device_ptr(stream);
        let (db_ptr, _w) = grad_bias.device_ptr_mut(stream);
        let db_ptr = offset::<f32>(db_ptr, vocab_start);
        let (rows_arg, width_arg) = (rows as i64, width as i64);
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&tile_ptr)
            .arg(&rows_arg)
            .arg(&width_arg)
            .arg(&db_ptr);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (width.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `fused_head_bias_grad(const float*, int64_t, int64_t, float*)`; the tile holds
        // rows · width f32s, ∂bias vocab_start + width ≤ vocab; one thread per column.
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launch fused_head_bias_grad"))?;
        Ok(())
    }

    /// `dst[index[r], :] = src[r, :]` for the `n` counted rows.
    fn scatter_rows(
        &self,
        src: &CudaSlice<f32>,
        index: &CudaSlice<i32>,
        n: usize,
        h: usize,
        dst: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let func = self.function("fused_head_scatter_rows")?;
        let stream = self.stream();
        let (src_ptr, _r0) = src.device_ptr(stream);
        let (index_ptr, _r1) = index.device_ptr(stream);
        let (dst_ptr, _w) = dst.device_ptr_mut(stream);
        let (n_arg, h_arg) = (n as i64, h as i64);
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&src_ptr)
            .arg(&index_ptr)
            .arg(&n_arg)
            .arg(&h_arg)
            .arg(&dst_ptr);
        // SAFETY: `fused_head_scatter_rows(const float*, const int32_t*, int64_t, int64_t,
        // float*)`; src holds n · h, every index is < rows and dst holds rows · h.
        unsafe { launch.launch(elementwise_config(n * h)) }
            .map_err(cuda_err("launch fused_head_scatter_rows"))?;
        Ok(())
    }

    /// `status[slot]` = the first row (of `row_len` values) of `x` holding a non-finite value.
    fn first_nonfinite(
        &self,
        x: &CudaSlice<f32>,
        row_len: usize,
        status: &mut KernelStatus,
        slot: usize,
    ) -> Result<()> {
        let func = self.function("fused_head_first_nonfinite")?;
        let stream = self.stream();
        let (x_ptr, _r) = x.device_ptr(stream);
        let (status_ptr, _w) = status.buf.device_ptr_mut(stream);
        let (count, row_len_arg, slot_arg) = (x.len() as i64, row_len as i64, slot as i32);
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&x_ptr)
            .arg(&count)
            .arg(&row_len_arg)
            .arg(&status_ptr)
            .arg(&slot_arg);
        // SAFETY: `fused_head_first_nonfinite(const float*, int64_t, int64_t, int32_t*, int32_t)`;
        // x holds `count` f32s, the status STATUS_LEN > slot entries.
        unsafe { launch.launch(elementwise_config(x.len())) }
            .map_err(cuda_err("launch fused_head_first_nonfinite"))?;
        Ok(())
    }
}
