//! [`CudaBackend::fused_linear_token_logprobs`]: the GPU twin of
//! [`crate::fused_head::fused_linear_token_logprobs`].

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::{
    elementwise_config, gather_name, offset, resolve_chunks, tile_rows_config, tiles, CudaLmHead,
};
use crate::cuda::device::{cuda_err, CudaBackend};
use crate::cuda::launch::CudaLogit;
use crate::cuda::status::{self, KernelStatus};
use crate::cuda::GemmShape;
use crate::error::{HaloError, Result};
use crate::fused_head::{non_finite_error, FusedChunks, LmHead};

/// Output of [`CudaBackend::fused_linear_token_logprobs`], on the device: one entry per row, 0
/// where the label is ignored (the fields of [`crate::fused_head::FusedTokenLogprobs`]).
#[derive(Debug)]
pub struct CudaFusedTokenLogprobs {
    /// `log softmax(z)[y]` (≤ 0).
    pub logp: CudaSlice<f32>,
    /// `logsumexp(z)` per row (`row_max + ln_sum`).
    pub lse: CudaSlice<f32>,
    /// The row's largest logit: saved for the backward, apart from `ln_sum`.
    pub row_max: CudaSlice<f32>,
    /// `ln Σ_v exp(z_v − row_max)`: saved for the backward.
    pub ln_sum: CudaSlice<f32>,
}

impl CudaBackend {
    /// Per-token log-probs and logsumexp of the logits `hidden · weightᵀ + bias`, never
    /// materialized: the CUDA twin of [`crate::fused_head::fused_linear_token_logprobs`], with the
    /// same arguments (device buffers for `hidden` and the head; `labels` on the host) and the same
    /// errors. `chunks`: the tiling (a GPU default when `None`; `vocab_groups` is not used).
    /// Waits for the device (to read the status).
    pub fn fused_linear_token_logprobs<T: CudaLogit>(
        &self,
        hidden: &CudaSlice<T>,
        head: &CudaLmHead<'_, T>,
        labels: &[i32],
        ignore_index: i32,
        chunks: Option<FusedChunks>,
    ) -> Result<CudaFusedTokenLogprobs> {
        let mut status = self.new_status()?;
        let out = self.enqueue_fused_linear_token_logprobs(
            hidden,
            head,
            labels,
            ignore_index,
            chunks,
            &mut status,
        )?;
        let word = self.read_status(&status)?;
        if let Some(r) = word.nonfinite_row() {
            return Err(self.fused_non_finite_error(hidden, head, labels, ignore_index, r)?);
        }
        Ok(out)
    }

    /// [`CudaBackend::fused_linear_token_logprobs`] queued without a wait: the shapes and labels
    /// are checked now, the finiteness of the logits lands in `status` (reset; read it whenever
    /// convenient, e.g. with a training step's other values, and turn it into the error with
    /// [`StatusWord::fused_forward_error`](crate::cuda::StatusWord::fused_forward_error)).
    pub fn enqueue_fused_linear_token_logprobs<T: CudaLogit>(
        &self,
        hidden: &CudaSlice<T>,
        head: &CudaLmHead<'_, T>,
        labels: &[i32],
        ignore_index: i32,
        chunks: Option<FusedChunks>,
        status: &mut KernelStatus,
    ) -> Result<CudaFusedTokenLogprobs> {
        let rows = self.check_fused_head(hidden.len(), head, labels, ignore_index)?;
        let counted = self.upload_counted_rows(labels, ignore_index)?;
        let n = counted.n;
        let chunks = resolve_chunks(chunks, n, head.vocab)?;
        let mut out = CudaFusedTokenLogprobs {
            logp: self.alloc_zeros(rows)?,
            lse: self.alloc_zeros(rows)?,
            row_max: self.alloc_zeros(rows)?,
            ln_sum: self.alloc_zeros(rows)?,
        };
        if n == 0 {
            return Ok(out);
        }
        let h = head.hidden_size;
        let gemm = self.gemm()?;
        let bias = self.bias_f32(head)?;
        // The counted rows of hidden, in T: the forward's GEMMs take the storage dtype (bf16 / f16
        // tensor cores on a GPU) and accumulate in f32.
        let mut gathered = self.alloc_output::<T>(n * h)?;
        self.gather_rows(hidden, &counted.index, n, h, false, &mut gathered)?;
        let mut state: [CudaSlice<f32>; 4] = [
            self.alloc_output(n)?,
            self.alloc_output(n)?,
            self.alloc_output(n)?,
            self.alloc_output(n)?,
        ];
        self.reset_row_state(&mut state, n)?;
        let mut tile = self.alloc_output::<f32>(chunks.row_tile.min(n) * chunks.vocab_tile)?;
        for rt in tiles(n, chunks.row_tile) {
            let hid = gathered.slice(rt.start * h..rt.end * h);
            for vt in tiles(head.vocab, chunks.vocab_tile) {
                let width = vt.len();
                let w = head.weight.slice(vt.start * h..vt.end * h);
                let mut z = tile.slice_mut(..rt.len() * width);
                // z[rt, vt] = hidden[rt] · W[vt]ᵀ
                let shape = GemmShape::packed(rt.len(), width, h, false, true);
                gemm.gemm(&shape, 1.0, &hid, &w, 0.0, &mut z)?;
                self.tile_forward(
                    &tile,
                    width,
                    bias.as_ref(),
                    &counted.labels,
                    &mut state,
                    rt.clone(),
                    vt,
                )?;
            }
        }
        self.finalize_rows(&state, &counted.index, n, &mut out, status)?;
        Ok(out)
    }

    /// The CPU op's error for a non-finite logit in counted row `counted_row`: which input holds
    /// the non-finite value, found on the host (this error path only copies the inputs back).
    pub(crate) fn fused_non_finite_error<T: CudaLogit>(
        &self,
        hidden: &CudaSlice<T>,
        head: &CudaLmHead<'_, T>,
        labels: &[i32],
        ignore_index: i32,
        counted_row: usize,
    ) -> Result<HaloError> {
        let row = status::counted_row(labels, ignore_index, counted_row).unwrap_or(0);
        let (hidden, weight) = (self.dtoh(hidden)?, self.dtoh(head.weight)?);
        let bias = head.bias.map(|b| self.dtoh(b)).transpose()?;
        let host = LmHead {
            weight: &weight,
            bias: bias.as_deref(),
            vocab: head.vocab,
            hidden_size: head.hidden_size,
        };
        Ok(non_finite_error(&hidden, &host, row))
    }

    /// `out[r, :] = hidden[index[r], :]` for the `n` counted rows (`wide`: widened to f32, else in
    /// `T`; `O` must be that dtype).
    pub(crate) fn gather_rows<T: CudaLogit, O: CudaLogit>(
        &self,
        hidden: &CudaSlice<T>,
        index: &CudaSlice<i32>,
        n: usize,
        h: usize,
        wide: bool,
        out: &mut CudaSlice<O>,
    ) -> Result<()> {
        let func = self.function(gather_name::<T>(wide))?;
        let stream = self.stream();
        let (hidden_ptr, _r0) = hidden.device_ptr(stream);
        let (index_ptr, _r1) = index.device_ptr(stream);
        let (out_ptr, _w) = out.device_ptr_mut(stream);
        let (n_arg, h_arg) = (n as i64, h as i64);
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&hidden_ptr)
            .arg(&index_ptr)
            .arg(&n_arg)
            .arg(&h_arg)
            .arg(&out_ptr);
        // SAFETY: `fused_head_gather_*(const T*, const int32_t*, int64_t, int64_t, O*)`; every
        // index is a row of `hidden` (< rows, chosen on the host), `out` holds n · h elements of
        // the entry point's output dtype (the callers pass `wide` with O = f32, else O = T).
        unsafe { launch.launch(elementwise_config(n * h)) }
            .map_err(cuda_err("launch fused_head_gather"))?;
        Ok(())
    }

    /// The empty online-logsumexp state of `n` rows (max, sum, probe, label logit).
    fn reset_row_state(&self, state: &mut [CudaSlice<f32>; 4], n: usize) -> Result<()> {
        let func = self.function("fused_head_state_reset")?;
        let stream = self.stream();
        let [a, b, c, d] = state;
        let (pa, _wa) = a.device_ptr_mut(stream);
        let (pb, _wb) = b.device_ptr_mut(stream);
        let (pc, _wc) = c.device_ptr_mut(stream);
        let (pd, _wd) = d.device_ptr_mut(stream);
        let n_arg = n as i64;
        let mut launch = stream.launch_builder(func);
        launch.arg(&pa).arg(&pb).arg(&pc).arg(&pd).arg(&n_arg);
        // SAFETY: `fused_head_state_reset(float*, float*, float*, float*, int64_t)`; each buffer
        // holds `n` f32s.
        unsafe { launch.launch(elementwise_config(n)) }
            .map_err(cuda_err("launch fused_head_state_reset"))?;
        Ok(())
    }

    /// Merges the tile `z[rt, vt]` (rows `rt` of the counted rows, packed `[rt.len(), vt.len()]`
    /// at the start of `tile`) into the rows' state.
    #[allow(clippy::too_many_arguments)]
    fn tile_forward(
        &self,
        tile: &CudaSlice<f32>,
        width: usize,
        bias: Option<&CudaSlice<f32>>,
        labels: &CudaSlice<i32>,
        state: &mut [CudaSlice<f32>; 4],
        rt: std::ops::Range<usize>,
        vt: std::ops::Range<usize>,
    ) -> Result<()> {
        let func = self.function("fused_head_tile_forward")?;
        let stream = self.stream();
        let (tile_ptr, _r0) = tile.device_ptr(stream);
        let bias_guard = bias.map(|b| b.device_ptr(stream));
        let bias_ptr = bias_guard
            .as_ref()
            .map_or(0, |(p, _)| offset::<f32>(*p, vt.start));
        let (labels_ptr, _r1) = labels.device_ptr(stream);
        let labels_ptr = offset::<i32>(labels_ptr, rt.start);
        let [a, b, c, d] = state;
        let (pa, _wa) = a.device_ptr_mut(stream);
        let (pb, _wb) = b.device_ptr_mut(stream);
        let (pc, _wc) = c.device_ptr_mut(stream);
        let (pd, _wd) = d.device_ptr_mut(stream);
        let [pa, pb, pc, pd] = [pa, pb, pc, pd].map(|p| offset::<f32>(p, rt.start));
        let (width_arg, start_arg) = (width as i64, vt.start as i64);
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
            .arg(&pd);
        // SAFETY: the signature of `fused_head_tile_forward`; the tile holds rt.len() · width
        // f32s (just written by the GEMM), the bias (when given) vt.end ≤ vocab f32s, the labels
        // and states rt.end ≤ n entries; one block per tile row.
        unsafe { launch.launch(tile_rows_config(rt.len())) }
            .map_err(cuda_err("launch fused_head_tile_forward"))?;
        Ok(())
    }

    /// Per counted row: logp, lse, row max, ln Σ at its original row; non-finite rows in status.
    fn finalize_rows(
        &self,
        state: &[CudaSlice<f32>; 4],
        index: &CudaSlice<i32>,
        n: usize,
        out: &mut CudaFusedTokenLogprobs,
        status: &mut crate::cuda::KernelStatus,
    ) -> Result<()> {
        let func = self.function("fused_head_finalize")?;
        let stream = self.stream();
        let [a, b, c, d] = state;
        let (pa, _ra) = a.device_ptr(stream);
        let (pb, _rb) = b.device_ptr(stream);
        let (pc, _rc) = c.device_ptr(stream);
        let (pd, _rd) = d.device_ptr(stream);
        let (index_ptr, _ri) = index.device_ptr(stream);
        let (logp, _w0) = out.logp.device_ptr_mut(stream);
        let (lse, _w1) = out.lse.device_ptr_mut(stream);
        let (row_max, _w2) = out.row_max.device_ptr_mut(stream);
        let (ln_sum, _w3) = out.ln_sum.device_ptr_mut(stream);
        let (status_ptr, _w4) = status.buf.device_ptr_mut(stream);
        let n_arg = n as i64;
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&pa)
            .arg(&pb)
            .arg(&pc)
            .arg(&pd)
            .arg(&index_ptr)
            .arg(&n_arg)
            .arg(&logp)
            .arg(&lse)
            .arg(&row_max)
            .arg(&ln_sum)
            .arg(&status_ptr);
        // SAFETY: the signature of `fused_head_finalize`; the states and index hold n entries,
        // every index is < rows, the length of each output.
        unsafe { launch.launch(elementwise_config(n)) }
            .map_err(cuda_err("launch fused_head_finalize"))?;
        Ok(())
    }
}
