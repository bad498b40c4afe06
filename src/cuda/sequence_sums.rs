//! GPU twins of [`crate::cpu::sequence_sums`], [`crate::cpu::sequence_logratio_sums`],
//! [`crate::cpu::broadcast_sequence_grad`] and [`crate::cpu::humanline_grad_mask`] (kernels
//! `sequence_sums_*`, `sequence_logratio_sums_*`, `broadcast_sequence_grad_*` — one block per
//! sequence — and `humanline_grad_mask_f32` in `kernels/sequence_sums.cu`).
//!
//! The layout is the CPU's [`SequenceLayout`] (host data): it is validated on the host exactly as
//! the CPU op validates it, and packed offsets are uploaded for the launch. The CPU ops also refuse
//! a NaN/±inf in a counted token (and in `grad_seq`); the kernels have no status word, so these
//! wrappers read back the (per-sequence) sums and, only when one is non-finite, the inputs, to
//! return the CPU's error — they wait for the kernel. With a humanline clamp (which maps NaN and
//! ±inf to a bound on the device) the per-token inputs are always checked; `broadcast_sequence_grad`
//! checks the `batch` entries of `grad_seq` before launching. Each sum is a fixed-order
//! tree reduction: bitwise identical run to run, but not bitwise equal to the CPU's sequential sum.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::device::{cuda_err, CudaBackend};
use super::launch::{blocks_launch, check_aligned, check_len, check_rows_fit_status};
use crate::cpu::{self, LogRatioClamp, SequenceLayout};
use crate::error::{HaloError, Result};
use crate::kernel_abi::{HaloSeqParams, SEQ_THREADS};
use crate::kernel_host;
use crate::validate::{check_finite, check_humanline_args, check_logratio_args};

/// Output of the sequence sums on the device: one entry per sequence.
#[derive(Debug)]
pub struct CudaSequenceSums {
    /// Sum over each sequence's counted tokens.
    pub sums: CudaSlice<f32>,
    /// Counted tokens per sequence.
    pub counts: CudaSlice<u32>,
}

/// A validated layout ready to launch: the parameters, the grid, and the uploaded offsets of a
/// packed layout.
struct SeqLaunch {
    params: HaloSeqParams,
    cfg: LaunchConfig,
    cu_seqlens: Option<CudaSlice<u32>>,
    batch: usize,
}

impl SeqLaunch {
    /// The entry point `<op>_{padded,packed}_f32`.
    fn entry(&self, op: &str) -> String {
        let layout = if self.cu_seqlens.is_some() {
            "packed"
        } else {
            "padded"
        };
        format!("{op}_{layout}_f32")
    }
}

impl CudaBackend {
    /// Masked per-sequence sums of `token_values` and token counts, like
    /// [`crate::cpu::sequence_sums()`], with its errors (see the module docs). Waits for the kernel.
    pub fn sequence_sums(
        &self,
        token_values: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<CudaSequenceSums> {
        let out = self.enqueue_sequence_sums(token_values, labels, ignore_index, layout)?;
        if !out.sums.is_empty() {
            let sums = self.dtoh(&out.sums)?;
            self.check_sequence_sums(token_values, labels, ignore_index, layout, &sums)?;
        }
        Ok(out)
    }

    /// Masked per-sequence sums of `token_values` and token counts ([`CudaBackend::sequence_sums`])
    /// queued without a wait: the shapes and the layout are checked now; a non-finite sum (a
    /// non-finite token value, or an f32 overflow) is the caller's to look for in what it reads.
    pub fn enqueue_sequence_sums(
        &self,
        token_values: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<CudaSequenceSums> {
        check_len("labels", token_values.len(), labels.len())?;
        let mut out = self.alloc_sums(validate_layout(token_values.len(), layout)?)?;
        self.launch_sequence_sums(token_values, labels, ignore_index, layout, &mut out)?;
        Ok(out)
    }

    /// [`CudaBackend::sequence_sums`] into caller buffers of `batch` elements.
    pub fn sequence_sums_into(
        &self,
        token_values: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        out: &mut CudaSequenceSums,
    ) -> Result<()> {
        if !self.launch_sequence_sums(token_values, labels, ignore_index, layout, out)? {
            return Ok(());
        }
        self.check_sequence_sums(
            token_values,
            labels,
            ignore_index,
            layout,
            &self.dtoh(&out.sums)?,
        )
    }

    /// Checks the arguments and queues the sums without waiting; `Ok(false)` when there is no
    /// sequence (nothing queued). Pair with [`CudaBackend::check_sequence_sums`] on the sums.
    pub(crate) fn launch_sequence_sums(
        &self,
        token_values: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        out: &mut CudaSequenceSums,
    ) -> Result<bool> {
        check_len("labels", token_values.len(), labels.len())?;
        let seq = self.seq_launch(token_values.len(), ignore_index, layout, None)?;
        check_sums_len(&seq, out)?;
        if seq.batch == 0 {
            return Ok(false);
        }
        {
            let func = self.function(&seq.entry("sequence_sums"))?;
            let stream = self.stream();
            let cu_ptr = seq.cu_seqlens.as_ref().map(|c| c.device_ptr(stream));
            let (values_ptr, _r0) = token_values.device_ptr(stream);
            let (labels_ptr, _r1) = labels.device_ptr(stream);
            let (sums_ptr, _w0) = out.sums.device_ptr_mut(stream);
            let (counts_ptr, _w1) = out.counts.device_ptr_mut(stream);
            check_aligned::<f32>("token_values", values_ptr)?;
            check_aligned::<i32>("labels", labels_ptr)?;
            let mut launch = stream.launch_builder(func);
            launch.arg(&values_ptr).arg(&labels_ptr);
            if let Some((ptr, _)) = &cu_ptr {
                launch.arg(ptr);
            }
            launch.arg(&sums_ptr).arg(&counts_ptr).arg(&seq.params);
            // SAFETY: arguments follow `sequence_sums_{padded,packed}_f32` in kernels/README.md
            // (cu_seqlens only for packed); the layout was validated against the row count, so every
            // sequence's rows lie inside `token_values` and `labels`; `sums`/`counts` hold `batch`.
            unsafe { launch.launch(seq.cfg) }.map_err(cuda_err("launch sequence_sums"))?;
        }
        Ok(true)
    }

    /// The CPU op's error for sums read back from a [`CudaBackend::launch_sequence_sums`], if any.
    pub(crate) fn check_sequence_sums(
        &self,
        token_values: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        sums: &[f32],
    ) -> Result<()> {
        // A NaN/±inf in a counted token (or an f32 overflow) makes its sequence's sum non-finite:
        // only then are the inputs copied back, and the CPU op names the first bad token (or the
        // overflowing sequence) as it would have.
        if sums.iter().any(|s| !s.is_finite()) {
            let values = self.dtoh(token_values)?;
            let labels = self.dtoh(labels)?;
            cpu::sequence_sums(&values, &labels, ignore_index, layout)?;
        }
        Ok(())
    }

    /// Per-sequence sums of the per-token log-ratio `policy − reference`, optionally clamped per
    /// token (humanline), like [`crate::cpu::sequence_logratio_sums`].
    pub fn sequence_logratio_sums(
        &self,
        policy_logp: &impl DevicePtr<f32>,
        reference_logp: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        clamp: Option<LogRatioClamp>,
    ) -> Result<CudaSequenceSums> {
        check_logratio_args(policy_logp.len(), reference_logp.len(), labels.len(), clamp)?;
        let mut out = self.alloc_sums(validate_layout(policy_logp.len(), layout)?)?;
        self.sequence_logratio_sums_into(
            policy_logp,
            reference_logp,
            labels,
            ignore_index,
            layout,
            clamp,
            &mut out,
        )?;
        Ok(out)
    }

    /// [`CudaBackend::sequence_logratio_sums`] into caller buffers of `batch` elements.
    #[allow(clippy::too_many_arguments)]
    pub fn sequence_logratio_sums_into(
        &self,
        policy_logp: &impl DevicePtr<f32>,
        reference_logp: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        clamp: Option<LogRatioClamp>,
        out: &mut CudaSequenceSums,
    ) -> Result<()> {
        check_logratio_args(policy_logp.len(), reference_logp.len(), labels.len(), clamp)?;
        let seq = self.seq_launch(policy_logp.len(), ignore_index, layout, clamp)?;
        check_sums_len(&seq, out)?;
        if seq.batch == 0 {
            return Ok(());
        }
        if clamp.is_some() {
            // The clamp maps NaN and ±inf to a bound on the device, hiding them: check the counted
            // tokens as the CPU op does (one copy of the per-token inputs).
            self.check_logratio_inputs(
                policy_logp,
                reference_logp,
                labels,
                ignore_index,
                layout,
                clamp,
            )?;
        }
        {
            let func = self.function(&seq.entry("sequence_logratio_sums"))?;
            let stream = self.stream();
            let cu_ptr = seq.cu_seqlens.as_ref().map(|c| c.device_ptr(stream));
            let (policy_ptr, _r0) = policy_logp.device_ptr(stream);
            let (reference_ptr, _r1) = reference_logp.device_ptr(stream);
            let (labels_ptr, _r2) = labels.device_ptr(stream);
            let (sums_ptr, _w0) = out.sums.device_ptr_mut(stream);
            let (counts_ptr, _w1) = out.counts.device_ptr_mut(stream);
            check_aligned::<f32>("policy_logp", policy_ptr)?;
            check_aligned::<f32>("reference_logp", reference_ptr)?;
            check_aligned::<i32>("labels", labels_ptr)?;
            let mut launch = stream.launch_builder(func);
            launch.arg(&policy_ptr).arg(&reference_ptr).arg(&labels_ptr);
            if let Some((ptr, _)) = &cu_ptr {
                launch.arg(ptr);
            }
            launch.arg(&sums_ptr).arg(&counts_ptr).arg(&seq.params);
            // SAFETY: as in `sequence_sums`, for `sequence_logratio_sums_{padded,packed}_f32`.
            unsafe { launch.launch(seq.cfg) }.map_err(cuda_err("launch sequence_logratio_sums"))?;
        }
        if clamp.is_none() && self.dtoh(&out.sums)?.iter().any(|s| !s.is_finite()) {
            self.check_logratio_inputs(
                policy_logp,
                reference_logp,
                labels,
                ignore_index,
                layout,
                clamp,
            )?;
        }
        Ok(())
    }

    /// The CPU op's error (first non-finite counted token) for these inputs, if any.
    fn check_logratio_inputs(
        &self,
        policy_logp: &impl DevicePtr<f32>,
        reference_logp: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        clamp: Option<LogRatioClamp>,
    ) -> Result<()> {
        let policy = self.dtoh(policy_logp)?;
        let reference = self.dtoh(reference_logp)?;
        let labels = self.dtoh(labels)?;
        cpu::sequence_logratio_sums(&policy, &reference, &labels, ignore_index, layout, clamp)
            .map(|_| ())
    }

    /// Backward of the sums: each counted token of sequence `i` receives `grad_seq[i]`, ignored
    /// tokens 0, like [`crate::cpu::broadcast_sequence_grad`]. Every row of the output is written.
    pub fn broadcast_sequence_grad(
        &self,
        grad_seq: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<CudaSlice<f32>> {
        let batch = validate_layout(labels.len(), layout)?;
        check_len("grad_seq", batch, grad_seq.len())?;
        let mut token_grad = self.alloc_output::<f32>(labels.len())?;
        self.broadcast_sequence_grad_into(grad_seq, labels, ignore_index, layout, &mut token_grad)?;
        Ok(token_grad)
    }

    /// [`CudaBackend::broadcast_sequence_grad`] into a caller buffer of `rows` elements.
    pub fn broadcast_sequence_grad_into(
        &self,
        grad_seq: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        token_grad: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let Some(seq) = self.broadcast_setup(grad_seq, labels, ignore_index, layout, token_grad)?
        else {
            return Ok(());
        };
        // As the CPU op: every grad_seq entry finite, also of sequences with no counted token
        // (one small copy of `batch` values).
        check_finite("grad_seq", &self.dtoh(grad_seq)?)?;
        self.launch_broadcast(&seq, grad_seq, labels, token_grad)
    }

    /// [`CudaBackend::broadcast_sequence_grad_into`] without the check of `grad_seq` (the caller
    /// checks it on a copy it reads anyway) and without waiting.
    pub(crate) fn launch_broadcast_sequence_grad(
        &self,
        grad_seq: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        token_grad: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        match self.broadcast_setup(grad_seq, labels, ignore_index, layout, token_grad)? {
            Some(seq) => self.launch_broadcast(&seq, grad_seq, labels, token_grad),
            None => Ok(()),
        }
    }

    /// The broadcast's shape checks and launch geometry; `None` for a batch of no sequences.
    fn broadcast_setup(
        &self,
        grad_seq: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        token_grad: &impl DevicePtrMut<f32>,
    ) -> Result<Option<SeqLaunch>> {
        let rows = labels.len();
        let seq = self.seq_launch(rows, ignore_index, layout, None)?;
        check_len("grad_seq", seq.batch, grad_seq.len())?;
        check_len("token_grad", rows, token_grad.len())?;
        Ok((seq.batch > 0).then_some(seq))
    }

    /// Queues `broadcast_sequence_grad_*` (arguments checked by the caller).
    fn launch_broadcast(
        &self,
        seq: &SeqLaunch,
        grad_seq: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        token_grad: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        {
            let func = self.function(&seq.entry("broadcast_sequence_grad"))?;
            let stream = self.stream();
            let cu_ptr = seq.cu_seqlens.as_ref().map(|c| c.device_ptr(stream));
            let (grad_seq_ptr, _r0) = grad_seq.device_ptr(stream);
            let (labels_ptr, _r1) = labels.device_ptr(stream);
            let (token_grad_ptr, _w0) = token_grad.device_ptr_mut(stream);
            check_aligned::<f32>("grad_seq", grad_seq_ptr)?;
            check_aligned::<i32>("labels", labels_ptr)?;
            let mut launch = stream.launch_builder(func);
            launch.arg(&grad_seq_ptr).arg(&labels_ptr);
            if let Some((ptr, _)) = &cu_ptr {
                launch.arg(ptr);
            }
            launch.arg(&token_grad_ptr).arg(&seq.params);
            // SAFETY: arguments follow `broadcast_sequence_grad_{padded,packed}_f32`; the layout
            // covers exactly `rows` rows (validated), so every output row is written once.
            unsafe { launch.launch(seq.cfg) }
                .map_err(cuda_err("launch broadcast_sequence_grad"))?;
        }
        Ok(())
    }

    /// Backward through the humanline clamp: zeroes `token_grad` where the clamp was active
    /// (`policy − reference` outside `[min, max]`), like [`crate::cpu::humanline_grad_mask`]
    /// (kernel `humanline_grad_mask_f32`, one thread per token). Queued on the stream.
    pub fn humanline_grad_mask(
        &self,
        policy_logp: &impl DevicePtr<f32>,
        reference_logp: &impl DevicePtr<f32>,
        clamp: LogRatioClamp,
        token_grad: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = policy_logp.len();
        check_humanline_args(n, reference_logp.len(), token_grad.len(), clamp)?;
        if n == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(SEQ_THREADS as usize);
        let cfg = blocks_launch(blocks, SEQ_THREADS)?;
        let params = kernel_host::clamp_params(n, clamp);
        let func = self.function("humanline_grad_mask_f32")?;
        let stream = self.stream();
        let (policy_ptr, _r0) = policy_logp.device_ptr(stream);
        let (reference_ptr, _r1) = reference_logp.device_ptr(stream);
        let (grad_ptr, _w0) = token_grad.device_ptr_mut(stream);
        check_aligned::<f32>("policy_logp", policy_ptr)?;
        check_aligned::<f32>("reference_logp", reference_ptr)?;
        check_aligned::<f32>("token_grad", grad_ptr)?;
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&policy_ptr)
            .arg(&reference_ptr)
            .arg(&grad_ptr)
            .arg(&params);
        // SAFETY: arguments follow `humanline_grad_mask_f32` in kernels/README.md; all three
        // buffers hold `n` elements; grid = ceil(n / SEQ_THREADS), the kernel bounds-checks `t < n`.
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launch humanline_grad_mask"))?;
        Ok(())
    }

    /// Validates `layout` against `rows` (as the CPU does) and prepares the launch.
    fn seq_launch(
        &self,
        rows: usize,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        clamp: Option<LogRatioClamp>,
    ) -> Result<SeqLaunch> {
        let batch = validate_layout(rows, layout)?;
        let cu_seqlens = match layout {
            SequenceLayout::Padded { .. } => None,
            SequenceLayout::Packed { cu_seqlens } => Some(self.htod(cu_seqlens)?),
        };
        let params = kernel_host::seq_params(batch, &layout, ignore_index, clamp);
        Ok(SeqLaunch {
            params,
            cfg: blocks_launch(batch.max(1), SEQ_THREADS)?,
            cu_seqlens,
            batch,
        })
    }

    fn alloc_sums(&self, batch: usize) -> Result<CudaSequenceSums> {
        Ok(CudaSequenceSums {
            sums: self.alloc_output(batch)?,
            counts: self.alloc_output(batch)?,
        })
    }
}

/// Validates `layout` against `rows` with the CPU's errors; returns the number of sequences.
fn validate_layout(rows: usize, layout: SequenceLayout<'_>) -> Result<usize> {
    check_rows_fit_status(rows)?;
    // The CPU's own check, without building the `batch`-long list of ranges.
    let batch = layout.check_rows(rows)?;
    if batch > i32::MAX as usize {
        return Err(HaloError::InvalidShape(format!(
            "{batch} sequences exceed the CUDA grid limit"
        )));
    }
    Ok(batch)
}

fn check_sums_len(seq: &SeqLaunch, out: &CudaSequenceSums) -> Result<()> {
    check_len("sums", seq.batch, out.sums.len())?;
    check_len("counts", seq.batch, out.counts.len())
}
