//! GPU twin of [`crate::cpu::token_logprobs`]: `logp[r] = z[r, y_r] − logsumexp(z[r, :])` and the
//! row's logsumexp (the f32 `lse` and its rounding residual), one pass over the logits (kernel `token_logprobs_forward_{f32,bf16,f16}` in
//! `kernels/token_logprobs.cu`).

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::device::{cuda_err, CudaBackend};
use super::launch::{
    check_aligned, check_token_shape, entry_name, token_launch, token_split_launch, CudaLogit,
};
use super::split_rows::{RowSplit, SplitScratch};
use super::status::KernelStatus;
use super::status::StatusWord;
use crate::cpu::SavedLse;
use crate::error::Result;
use crate::validate::check_forward_outputs;

/// Output of [`CudaBackend::token_logprobs`]: one entry per row, on the device.
#[derive(Debug)]
pub struct CudaTokenLogprobs {
    /// `log softmax(z)[y]`, 0 where the label is ignored.
    pub logp: CudaSlice<f32>,
    /// `logsumexp(z)` per row rounded to f32 (0 where ignored), for the backward.
    pub lse: CudaSlice<f32>,
    /// `logsumexp(z) − lse` per row: the exact rounding error of `lse` (0 where ignored).
    pub lse_residual: CudaSlice<f32>,
}

impl CudaTokenLogprobs {
    /// What the backward needs: `lse` with its residual.
    pub fn saved_lse(&self) -> SavedLse<&CudaSlice<f32>> {
        SavedLse::new(&self.lse, &self.lse_residual)
    }
}

impl CudaBackend {
    /// Per-token log-probs of `labels` under `logits` (`[rows, vocab]`, row-major), like
    /// [`crate::cpu::token_logprobs()`], with the same errors: length mismatch, `vocab == 0`,
    /// a label outside `0..vocab` that is not `ignore_index` (`LabelOutOfRange`, first such row),
    /// NaN/±inf in a non-ignored row (`NonFinite { what: "logits" }`, first such row).
    pub fn token_logprobs<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        vocab: usize,
        ignore_index: i32,
    ) -> Result<CudaTokenLogprobs> {
        self.token_logprobs_with_split(logits, labels, vocab, ignore_index, RowSplit::Auto)
    }

    /// [`CudaBackend::token_logprobs`] with the rows split `split` ways (see [`RowSplit`]; the
    /// other forms choose [`RowSplit::Auto`]). A fixed split outside `1..=MAX_ROW_SPLITS` is an
    /// `InvalidShape` error.
    pub fn token_logprobs_with_split<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        vocab: usize,
        ignore_index: i32,
        split: RowSplit,
    ) -> Result<CudaTokenLogprobs> {
        let rows = check_token_shape(logits.len(), labels.len(), vocab)?;
        let mut out = CudaTokenLogprobs {
            logp: self.alloc_output(rows)?,
            lse: self.alloc_output(rows)?,
            lse_residual: self.alloc_output(rows)?,
        };
        if rows > 0 {
            let mut status = self.new_status()?;
            self.enqueue_token_logprobs_with_split(
                logits,
                labels,
                vocab,
                ignore_index,
                split,
                &mut out.logp,
                &mut out.lse,
                &mut out.lse_residual,
                &mut status,
            )?;
            let word = self.read_status(&status)?;
            self.token_status_error(word, labels, vocab, ignore_index, "logits")?;
        }
        Ok(out)
    }

    /// [`CudaBackend::token_logprobs`] writing into caller buffers of `rows` elements (the fields
    /// of [`CudaTokenLogprobs`]). Waits for the kernel (to read its status).
    #[allow(clippy::too_many_arguments)]
    pub fn token_logprobs_into<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        vocab: usize,
        ignore_index: i32,
        logp: &mut impl DevicePtrMut<f32>,
        lse: &mut impl DevicePtrMut<f32>,
        lse_residual: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let rows = check_token_shape(logits.len(), labels.len(), vocab)?;
        if rows == 0 {
            return check_forward_outputs(0, logp.len(), lse.len(), lse_residual.len());
        }
        let mut status = self.new_status()?;
        self.enqueue_token_logprobs(
            logits,
            labels,
            vocab,
            ignore_index,
            logp,
            lse,
            lse_residual,
            &mut status,
        )?;
        let word = self.read_status(&status)?;
        self.token_status_error(word, labels, vocab, ignore_index, "logits")
    }

    /// Checks the arguments and queues the kernel without waiting; errors found by the kernel land
    /// in `status` (reset it first; read it with [`CudaBackend::read_status`] and
    /// [`CudaBackend::token_logprobs_status`]). For pipelines and benchmarks.
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_token_logprobs<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        vocab: usize,
        ignore_index: i32,
        logp: &mut impl DevicePtrMut<f32>,
        lse: &mut impl DevicePtrMut<f32>,
        lse_residual: &mut impl DevicePtrMut<f32>,
        status: &mut KernelStatus,
    ) -> Result<()> {
        self.enqueue_token_logprobs_with_split(
            logits,
            labels,
            vocab,
            ignore_index,
            RowSplit::Auto,
            logp,
            lse,
            lse_residual,
            status,
        )
    }

    /// [`CudaBackend::enqueue_token_logprobs`] with the rows split `split` ways (see [`RowSplit`]).
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_token_logprobs_with_split<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        vocab: usize,
        ignore_index: i32,
        split: RowSplit,
        logp: &mut impl DevicePtrMut<f32>,
        lse: &mut impl DevicePtrMut<f32>,
        lse_residual: &mut impl DevicePtrMut<f32>,
        status: &mut KernelStatus,
    ) -> Result<()> {
        let (status_ptr, _w) = status.buf.device_ptr_mut(self.stream());
        self.launch_token_logprobs_split(
            logits,
            labels,
            vocab,
            ignore_index,
            split,
            logp,
            lse,
            lse_residual,
            status_ptr,
        )
    }

    /// [`CudaBackend::enqueue_token_logprobs`] reporting into the `STATUS_LEN` entries at the
    /// device address `status_ptr` (reset, used on this backend's stream only).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_token_logprobs<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        vocab: usize,
        ignore_index: i32,
        logp: &mut impl DevicePtrMut<f32>,
        lse: &mut impl DevicePtrMut<f32>,
        lse_residual: &mut impl DevicePtrMut<f32>,
        status_ptr: u64,
    ) -> Result<()> {
        self.launch_token_logprobs_split(
            logits,
            labels,
            vocab,
            ignore_index,
            RowSplit::Auto,
            logp,
            lse,
            lse_residual,
            status_ptr,
        )
    }

    /// [`CudaBackend::launch_token_logprobs`] with the rows split `split` ways.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_token_logprobs_split<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        vocab: usize,
        ignore_index: i32,
        split: RowSplit,
        logp: &mut impl DevicePtrMut<f32>,
        lse: &mut impl DevicePtrMut<f32>,
        lse_residual: &mut impl DevicePtrMut<f32>,
        status_ptr: u64,
    ) -> Result<()> {
        let rows = check_token_shape(logits.len(), labels.len(), vocab)?;
        check_forward_outputs(rows, logp.len(), lse.len(), lse_residual.len())?;
        let splits = self.row_splits(split, rows, vocab)?;
        if rows == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (logits_ptr, _r0) = logits.device_ptr(stream);
        let (labels_ptr, _r1) = labels.device_ptr(stream);
        check_aligned::<T>("logits", logits_ptr)?;
        check_aligned::<i32>("labels", labels_ptr)?;
        let (logp_ptr, _w0) = logp.device_ptr_mut(stream);
        let (lse_ptr, _w1) = lse.device_ptr_mut(stream);
        let (residual_ptr, _w2) = lse_residual.device_ptr_mut(stream);
        check_aligned::<f32>("logp", logp_ptr)?;
        check_aligned::<f32>("lse", lse_ptr)?;
        check_aligned::<f32>("lse_residual", residual_ptr)?;
        if splits == 1 {
            let func = self.function(&entry_name::<T>("token_logprobs_forward"))?;
            let (params, cfg) = token_launch(rows, vocab, ignore_index);
            let mut launch = stream.launch_builder(func);
            launch
                .arg(&logits_ptr)
                .arg(&labels_ptr)
                .arg(&logp_ptr)
                .arg(&lse_ptr)
                .arg(&residual_ptr)
                .arg(&status_ptr)
                .arg(&params);
            // SAFETY: argument order and types follow `token_logprobs_forward_T` in
            // kernels/README.md; every buffer was checked to hold `rows` (or `rows * vocab`)
            // elements of the kernel's element type; the guards above order the launch after
            // earlier writes and are dropped after it is queued.
            unsafe { launch.launch(cfg) }.map_err(cuda_err("launch token_logprobs_forward"))?;
            return Ok(());
        }
        let func = self.function(&entry_name::<T>("token_logprobs_forward_split"))?;
        let (params, cfg) = token_split_launch(rows, vocab, ignore_index, splits)?;
        let mut scratch = SplitScratch::new(self, rows, splits)?;
        let (partials_ptr, arrivals_ptr, _w3) = scratch.pointers(stream);
        let splits_arg = splits as i32;
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&logits_ptr)
            .arg(&labels_ptr)
            .arg(&logp_ptr)
            .arg(&lse_ptr)
            .arg(&residual_ptr)
            .arg(&status_ptr)
            .arg(&partials_ptr)
            .arg(&arrivals_ptr)
            .arg(&splits_arg)
            .arg(&params);
        // SAFETY: as above, for `token_logprobs_forward_split_T`; the scratch holds 4 floats per
        // slice of every row and one zeroed counter per row (`splits` ≤ MAX_ROW_SPLITS, the grid
        // `rows · splits` checked by `row_splits`); it is freed stream-ordered after the kernel.
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launch token_logprobs_forward_split"))?;
        Ok(())
    }

    /// The forward's error (if any) for a status read after [`CudaBackend::enqueue_token_logprobs`].
    pub fn token_logprobs_status(
        &self,
        word: StatusWord,
        labels: &impl DevicePtr<i32>,
        vocab: usize,
        ignore_index: i32,
    ) -> Result<()> {
        self.token_status_error(word, labels, vocab, ignore_index, "logits")
    }
}
