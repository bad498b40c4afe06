//! GPU twin of [`crate::cpu::token_logprobs_backward`] and its in-place form:
//! `∂L/∂z[v] = g · (1[v = y] − exp(z_v − lse − residual))`, zero rows where the label is ignored
//! (kernels `token_logprobs_backward{,_inplace}_{f32,bf16,f16}` in
//! `kernels/token_logprobs_backward.cu`), with the CPU op's checks and errors.
//!
//! As on the CPU, the checks on the logits (non-finite values, an lse that does not fit them, an
//! overflowing gradient) run in the same pass as the write; the kernel also checks labels, `lse`
//! and `grad_logp` while it writes. On an error the same `HaloError` is returned (the same first
//! failing row), and the output (for the in-place form: the logits) is unspecified.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use super::device::{cuda_err, CudaBackend};
use super::launch::{
    check_aligned, check_token_shape, entry_name, token_launch, token_split_launch, CudaLogit,
};
use super::split_rows::{RowSplit, SplitScratch};
use super::status::{KernelStatus, StatusWord};
use crate::cpu::SavedLse;
use crate::dtype::DType;
use crate::error::Result;
use crate::kernel_host;
use crate::validate::{check_backward_inputs, check_grad_logits};

impl CudaBackend {
    /// Writes `∂L/∂logits` into `grad_logits` (same shape and dtype as `logits`), like
    /// [`crate::cpu::token_logprobs_backward()`], with the same errors in the same order (first
    /// bad label, then first non-finite `lse` / residual, then first non-finite `grad_logp`, then
    /// the first row whose logits are non-finite, do not fit its lse, or whose gradient overflows
    /// the dtype). `saved` is [`super::CudaTokenLogprobs::saved_lse`], or [`SavedLse::bare`] of an
    /// lse alone. Waits for the kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn token_logprobs_backward<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        saved: SavedLse<&impl DevicePtr<f32>>,
        grad_logp: &impl DevicePtr<f32>,
        vocab: usize,
        ignore_index: i32,
        grad_logits: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.token_logprobs_backward_with_split(
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
            RowSplit::Auto,
            grad_logits,
        )
    }

    /// [`CudaBackend::token_logprobs_backward`] with the rows split `split` ways (see
    /// [`RowSplit`]; the other forms choose [`RowSplit::Auto`]): the same values and errors.
    #[allow(clippy::too_many_arguments)]
    pub fn token_logprobs_backward_with_split<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        saved: SavedLse<&impl DevicePtr<f32>>,
        grad_logp: &impl DevicePtr<f32>,
        vocab: usize,
        ignore_index: i32,
        split: RowSplit,
        grad_logits: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let rows = check_token_shape(logits.len(), labels.len(), vocab)?;
        if rows == 0 {
            return check_backward_lengths(0, vocab, saved, grad_logp.len(), grad_logits.len());
        }
        let mut status = self.new_status()?;
        self.enqueue_token_logprobs_backward_with_split(
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
            split,
            grad_logits,
            &mut status,
        )?;
        let word = self.read_status(&status)?;
        self.token_logprobs_backward_status(word, labels, saved.lse, vocab, ignore_index, T::DTYPE)
    }

    /// Same as [`CudaBackend::token_logprobs_backward`] but overwrites `logits` with the gradient
    /// (saves a `[rows, vocab]` buffer; the logits are dead after the backward in a training step).
    pub fn token_logprobs_backward_inplace<T: CudaLogit>(
        &self,
        logits: &mut impl DevicePtrMut<T>,
        labels: &impl DevicePtr<i32>,
        saved: SavedLse<&impl DevicePtr<f32>>,
        grad_logp: &impl DevicePtr<f32>,
        vocab: usize,
        ignore_index: i32,
    ) -> Result<()> {
        self.token_logprobs_backward_inplace_with_split(
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
            RowSplit::Auto,
        )
    }

    /// [`CudaBackend::token_logprobs_backward_inplace`] with the rows split `split` ways (see
    /// [`RowSplit`]).
    #[allow(clippy::too_many_arguments)]
    pub fn token_logprobs_backward_inplace_with_split<T: CudaLogit>(
        &self,
        logits: &mut impl DevicePtrMut<T>,
        labels: &impl DevicePtr<i32>,
        saved: SavedLse<&impl DevicePtr<f32>>,
        grad_logp: &impl DevicePtr<f32>,
        vocab: usize,
        ignore_index: i32,
        split: RowSplit,
    ) -> Result<()> {
        let rows = check_token_shape(logits.len(), labels.len(), vocab)?;
        if rows == 0 {
            return check_backward_lengths(0, vocab, saved, grad_logp.len(), 0);
        }
        let mut status = self.new_status()?;
        self.enqueue_token_logprobs_backward_inplace_with_split(
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
            split,
            &mut status,
        )?;
        let word = self.read_status(&status)?;
        self.token_logprobs_backward_status(word, labels, saved.lse, vocab, ignore_index, T::DTYPE)
    }

    /// Checks the arguments and queues the out-of-place backward without waiting (see
    /// [`CudaBackend::enqueue_token_logprobs`] for the status protocol).
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_token_logprobs_backward<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        saved: SavedLse<&impl DevicePtr<f32>>,
        grad_logp: &impl DevicePtr<f32>,
        vocab: usize,
        ignore_index: i32,
        grad_logits: &mut impl DevicePtrMut<T>,
        status: &mut KernelStatus,
    ) -> Result<()> {
        self.enqueue_token_logprobs_backward_with_split(
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
            RowSplit::Auto,
            grad_logits,
            status,
        )
    }

    /// [`CudaBackend::enqueue_token_logprobs_backward`] with the rows split `split` ways (see
    /// [`RowSplit`]).
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_token_logprobs_backward_with_split<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        saved: SavedLse<&impl DevicePtr<f32>>,
        grad_logp: &impl DevicePtr<f32>,
        vocab: usize,
        ignore_index: i32,
        split: RowSplit,
        grad_logits: &mut impl DevicePtrMut<T>,
        status: &mut KernelStatus,
    ) -> Result<()> {
        let rows = check_token_shape(logits.len(), labels.len(), vocab)?;
        check_backward_lengths(rows, vocab, saved, grad_logp.len(), grad_logits.len())?;
        let splits = self.row_splits(split, rows, vocab)?;
        if rows == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (logits_ptr, _r0) = logits.device_ptr(stream);
        let (labels_ptr, _r1) = labels.device_ptr(stream);
        let (lse_ptr, _r2) = saved.lse.device_ptr(stream);
        // A bare lse: the kernel reads a null residual as 0.
        let residual = saved.residual.map(|r| r.device_ptr(stream));
        let residual_ptr = residual.as_ref().map_or(0, |(ptr, _)| *ptr);
        let (grad_logp_ptr, _r3) = grad_logp.device_ptr(stream);
        let (grad_logits_ptr, _w0) = grad_logits.device_ptr_mut(stream);
        let (status_ptr, _w1) = status.buf.device_ptr_mut(stream);
        check_aligned::<T>("logits", logits_ptr)?;
        check_aligned::<i32>("labels", labels_ptr)?;
        check_aligned::<f32>("lse", lse_ptr)?;
        check_aligned::<f32>("lse_residual", residual_ptr)?;
        check_aligned::<f32>("grad_logp", grad_logp_ptr)?;
        check_aligned::<T>("grad_logits", grad_logits_ptr)?;
        if splits == 1 {
            let func = self.function(&entry_name::<T>("token_logprobs_backward"))?;
            let (params, cfg) = token_launch(rows, vocab, ignore_index);
            let mut launch = stream.launch_builder(func);
            launch
                .arg(&logits_ptr)
                .arg(&labels_ptr)
                .arg(&lse_ptr)
                .arg(&residual_ptr)
                .arg(&grad_logp_ptr)
                .arg(&grad_logits_ptr)
                .arg(&status_ptr)
                .arg(&params);
            // SAFETY: arguments follow `token_logprobs_backward_T` in kernels/README.md; lengths
            // were checked (`rows * vocab` for logits and grad_logits, `rows` for the rest, the
            // residual null or `rows`); `grad_logits` is borrowed mutably, so it cannot alias the
            // inputs.
            unsafe { launch.launch(cfg) }.map_err(cuda_err("launch token_logprobs_backward"))?;
            return Ok(());
        }
        let func = self.function(&entry_name::<T>("token_logprobs_backward_split"))?;
        let (params, cfg) = token_split_launch(rows, vocab, ignore_index, splits)?;
        let mut scratch = SplitScratch::new(self, rows, splits)?;
        let (partials_ptr, arrivals_ptr, _w2) = scratch.pointers(stream);
        let splits_arg = splits as i32;
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&logits_ptr)
            .arg(&labels_ptr)
            .arg(&lse_ptr)
            .arg(&residual_ptr)
            .arg(&grad_logp_ptr)
            .arg(&grad_logits_ptr)
            .arg(&status_ptr)
            .arg(&partials_ptr)
            .arg(&arrivals_ptr)
            .arg(&splits_arg)
            .arg(&params);
        // SAFETY: as above, for `token_logprobs_backward_split_T`; the scratch holds 4 floats per
        // slice of every row and one zeroed counter per row, and is freed stream-ordered.
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launch token_logprobs_backward_split"))?;
        Ok(())
    }

    /// Checks the arguments and queues the in-place backward without waiting.
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_token_logprobs_backward_inplace<T: CudaLogit>(
        &self,
        logits: &mut impl DevicePtrMut<T>,
        labels: &impl DevicePtr<i32>,
        saved: SavedLse<&impl DevicePtr<f32>>,
        grad_logp: &impl DevicePtr<f32>,
        vocab: usize,
        ignore_index: i32,
        status: &mut KernelStatus,
    ) -> Result<()> {
        self.enqueue_token_logprobs_backward_inplace_with_split(
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
            RowSplit::Auto,
            status,
        )
    }

    /// [`CudaBackend::enqueue_token_logprobs_backward_inplace`] with the rows split `split` ways
    /// (see [`RowSplit`]).
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_token_logprobs_backward_inplace_with_split<T: CudaLogit>(
        &self,
        logits: &mut impl DevicePtrMut<T>,
        labels: &impl DevicePtr<i32>,
        saved: SavedLse<&impl DevicePtr<f32>>,
        grad_logp: &impl DevicePtr<f32>,
        vocab: usize,
        ignore_index: i32,
        split: RowSplit,
        status: &mut KernelStatus,
    ) -> Result<()> {
        let (status_ptr, _w) = status.buf.device_ptr_mut(self.stream());
        self.launch_token_logprobs_backward_inplace_split(
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
            split,
            status_ptr,
        )
    }

    /// [`CudaBackend::enqueue_token_logprobs_backward_inplace`] reporting into the `STATUS_LEN`
    /// entries at the device address `status_ptr` (reset, used on this backend's stream only).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_token_logprobs_backward_inplace<T: CudaLogit>(
        &self,
        logits: &mut impl DevicePtrMut<T>,
        labels: &impl DevicePtr<i32>,
        saved: SavedLse<&impl DevicePtr<f32>>,
        grad_logp: &impl DevicePtr<f32>,
        vocab: usize,
        ignore_index: i32,
        status_ptr: u64,
    ) -> Result<()> {
        self.launch_token_logprobs_backward_inplace_split(
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
            RowSplit::Auto,
            status_ptr,
        )
    }

    /// [`CudaBackend::launch_token_logprobs_backward_inplace`] with the rows split `split` ways.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_token_logprobs_backward_inplace_split<T: CudaLogit>(
        &self,
        logits: &mut impl DevicePtrMut<T>,
        labels: &impl DevicePtr<i32>,
        saved: SavedLse<&impl DevicePtr<f32>>,
        grad_logp: &impl DevicePtr<f32>,
        vocab: usize,
        ignore_index: i32,
        split: RowSplit,
        status_ptr: u64,
    ) -> Result<()> {
        let rows = check_token_shape(logits.len(), labels.len(), vocab)?;
        check_backward_lengths(rows, vocab, saved, grad_logp.len(), rows * vocab)?;
        let splits = self.row_splits(split, rows, vocab)?;
        if rows == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (labels_ptr, _r1) = labels.device_ptr(stream);
        let (lse_ptr, _r2) = saved.lse.device_ptr(stream);
        let residual = saved.residual.map(|r| r.device_ptr(stream));
        let residual_ptr = residual.as_ref().map_or(0, |(ptr, _)| *ptr);
        let (grad_logp_ptr, _r3) = grad_logp.device_ptr(stream);
        let (logits_ptr, _w0) = logits.device_ptr_mut(stream);
        check_aligned::<T>("logits", logits_ptr)?;
        check_aligned::<i32>("labels", labels_ptr)?;
        check_aligned::<f32>("lse", lse_ptr)?;
        check_aligned::<f32>("lse_residual", residual_ptr)?;
        check_aligned::<f32>("grad_logp", grad_logp_ptr)?;
        if splits == 1 {
            let func = self.function(&entry_name::<T>("token_logprobs_backward_inplace"))?;
            let (params, cfg) = token_launch(rows, vocab, ignore_index);
            let mut launch = stream.launch_builder(func);
            launch
                .arg(&logits_ptr)
                .arg(&labels_ptr)
                .arg(&lse_ptr)
                .arg(&residual_ptr)
                .arg(&grad_logp_ptr)
                .arg(&status_ptr)
                .arg(&params);
            // SAFETY: arguments follow `token_logprobs_backward_inplace_T` in kernels/README.md;
            // lengths were checked.
            unsafe { launch.launch(cfg) }
                .map_err(cuda_err("launch token_logprobs_backward_inplace"))?;
            return Ok(());
        }
        let func = self.function(&entry_name::<T>("token_logprobs_backward_inplace_split"))?;
        let (params, cfg) = token_split_launch(rows, vocab, ignore_index, splits)?;
        let mut scratch = SplitScratch::new(self, rows, splits)?;
        let (partials_ptr, arrivals_ptr, _w1) = scratch.pointers(stream);
        let splits_arg = splits as i32;
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&logits_ptr)
            .arg(&labels_ptr)
            .arg(&lse_ptr)
            .arg(&residual_ptr)
            .arg(&grad_logp_ptr)
            .arg(&status_ptr)
            .arg(&partials_ptr)
            .arg(&arrivals_ptr)
            .arg(&splits_arg)
            .arg(&params);
        // SAFETY: as above, for `token_logprobs_backward_inplace_split_T`; the scratch holds 4
        // floats per slice of every row and one zeroed counter per row, and is freed
        // stream-ordered.
        unsafe { launch.launch(cfg) }
            .map_err(cuda_err("launch token_logprobs_backward_inplace_split"))?;
        Ok(())
    }

    /// The backward's error (if any) for a status read after an `enqueue_token_logprobs_backward*`
    /// of logits of `dtype` (an inconsistent lse's value is read back from `lse`).
    pub fn token_logprobs_backward_status(
        &self,
        word: StatusWord,
        labels: &impl DevicePtr<i32>,
        lse: &impl DevicePtr<f32>,
        vocab: usize,
        ignore_index: i32,
        dtype: DType,
    ) -> Result<()> {
        kernel_host::backward_status_error(
            &word.0,
            |row| self.read_element(labels, row),
            |row| self.read_element(lse, row),
            vocab,
            ignore_index,
            dtype,
        )
    }
}

/// `lse`, its residual (if given) and `grad_logp` hold `rows` elements, `grad_logits`
/// `rows * vocab`, as on the CPU.
fn check_backward_lengths(
    rows: usize,
    vocab: usize,
    saved: SavedLse<&impl DevicePtr<f32>>,
    grad_logp_len: usize,
    grad_logits_len: usize,
) -> Result<()> {
    check_backward_inputs(
        rows,
        saved.lse.len(),
        saved.residual.map(|r| r.len()),
        grad_logp_len,
    )?;
    check_grad_logits(rows, vocab, grad_logits_len)
}
