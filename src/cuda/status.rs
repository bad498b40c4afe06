//! The kernels' status buffer: `STATUS_LEN` ints, set to `STATUS_OK` before a launch; a kernel
//! lowers an entry (integer `atomicMin`, so the result is deterministic) to the first row that
//! failed a check. See `kernels/README.md`, "Status buffer".

use cudarc::driver::{CudaSlice, DevicePtr};

use super::device::{cuda_err, CudaBackend};
use crate::dtype::DType;
use crate::error::{HaloError, Result};
use crate::kernel_abi::{
    STATUS_BAD_LABEL, STATUS_EMPTY_SEQUENCE, STATUS_LEN, STATUS_NONFINITE, STATUS_NONFINITE_GRAD,
    STATUS_OK,
};
use crate::kernel_host::{self, status_row};

/// A device status buffer for one launch at a time (reset it before each launch).
#[derive(Debug)]
pub struct KernelStatus {
    pub(crate) buf: CudaSlice<i32>,
}

impl KernelStatus {
    /// The `STATUS_LEN` entries on the device: for gathering several statuses into one read (a
    /// training step's), or to gate a later kernel on them (`adamw_step_clipped`).
    pub fn buffer(&self) -> &CudaSlice<i32> {
        &self.buf
    }
}

/// The status entries after a launch, as host values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusWord(pub [i32; STATUS_LEN]);

impl StatusWord {
    fn row(&self, slot: usize) -> Option<usize> {
        status_row(&self.0, slot)
    }
    /// First row whose label is neither the ignore index nor in `0..vocab`.
    pub fn bad_label_row(&self) -> Option<usize> {
        self.row(STATUS_BAD_LABEL)
    }
    /// First row with non-finite logits (forward) or a non-finite lse (backward).
    pub fn nonfinite_row(&self) -> Option<usize> {
        self.row(STATUS_NONFINITE)
    }
    /// First row with a non-finite `grad_logp` (backward).
    pub fn nonfinite_grad_row(&self) -> Option<usize> {
        self.row(STATUS_NONFINITE_GRAD)
    }
    /// First pair with a zero token count (IPO).
    pub fn empty_sequence(&self) -> Option<usize> {
        self.row(STATUS_EMPTY_SEQUENCE)
    }

    /// Whether no check failed.
    pub fn is_ok(&self) -> bool {
        self.0.iter().all(|&v| v == STATUS_OK)
    }

    /// The CPU op's error (if any) for the status of a token log-prob *forward* (enqueued with
    /// [`CudaBackend::enqueue_token_logprobs`]), read later: a bad label (its value from
    /// `label_at(row)`, e.g. the host copy of the labels), then non-finite logits.
    pub fn token_forward_error(
        &self,
        label_at: impl FnOnce(usize) -> Result<i32>,
        vocab: usize,
        ignore_index: i32,
    ) -> Result<()> {
        kernel_host::token_status_error(&self.0, label_at, vocab, ignore_index, "logits")
    }

    /// The CPU op's error (if any) for the status of a token log-prob *backward* of logits of
    /// `dtype` (`enqueue_token_logprobs_backward*`), read later; `lse_at(row)` fetches a saved lse
    /// for the error's message (only on the error path).
    pub fn token_backward_error(
        &self,
        label_at: impl FnOnce(usize) -> Result<i32>,
        lse_at: impl FnOnce(usize) -> Result<f32>,
        vocab: usize,
        ignore_index: i32,
        dtype: DType,
    ) -> Result<()> {
        kernel_host::backward_status_error(&self.0, label_at, lse_at, vocab, ignore_index, dtype)
    }

    /// The error (if any) for the status of a fused head forward read later
    /// ([`CudaBackend::enqueue_fused_linear_token_logprobs`], same `labels`). Unlike the waiting
    /// call, which copies the inputs back to name the one that is not finite (as the CPU does),
    /// this reports the logits of the row: the inputs may be gone by the time it is read.
    pub fn fused_forward_error(&self, labels: &[i32], ignore_index: i32) -> Result<()> {
        match self.nonfinite_row() {
            Some(counted) => Err(HaloError::NonFinite {
                what: "logits (hidden · weightᵀ + bias)",
                row: counted_row(labels, ignore_index, counted).unwrap_or(counted),
            }),
            None => Ok(()),
        }
    }

    /// The error (if any) for the `tiles` status of a fused head backward read later
    /// ([`CudaBackend::enqueue_fused_linear_token_logprobs_backward`], same `labels`): non-finite
    /// saved values or upstream gradient, then non-finite logits, naming the row rather than the
    /// input (see [`StatusWord::fused_forward_error`]). Its `grads` status comes next:
    /// [`StatusWord::fused_gradient_sums_error`].
    pub fn fused_backward_tiles_error(&self, labels: &[i32], ignore_index: i32) -> Result<()> {
        let row = |counted| counted_row(labels, ignore_index, counted).unwrap_or(counted);
        if let Some(r) = self.nonfinite_grad_row() {
            return Err(HaloError::NonFinite {
                what: "grad_logp, row_max or ln_sum",
                row: row(r),
            });
        }
        if let Some(r) = self.nonfinite_row() {
            return Err(HaloError::NonFinite {
                what: "logits (hidden · weightᵀ + bias)",
                row: row(r),
            });
        }
        Ok(())
    }

    /// The error (if any) for the `grads` status of a fused head backward: a gradient (of
    /// `hidden` or of the weight) that overflowed although its inputs were finite.
    pub fn fused_gradient_sums_error(&self) -> Result<()> {
        if let Some(row) = self.nonfinite_row() {
            return Err(HaloError::NonFinite {
                what: "grad_hidden",
                row,
            });
        }
        if let Some(row) = self.nonfinite_grad_row() {
            return Err(HaloError::NonFinite {
                what: "grad_weight",
                row,
            });
        }
        Ok(())
    }
}

/// The row of `labels` that is the `counted`-th one not ignored (the fused head's kernels number
/// the counted rows only); `None` past the last counted row.
pub(crate) fn counted_row(labels: &[i32], ignore_index: i32, counted: usize) -> Option<usize> {
    labels
        .iter()
        .enumerate()
        .filter(|(_, &y)| y != ignore_index)
        .nth(counted)
        .map(|(r, _)| r)
}

impl CudaBackend {
    /// A new status buffer, already reset.
    pub fn new_status(&self) -> Result<KernelStatus> {
        let mut status = KernelStatus {
            buf: self.alloc_output::<i32>(STATUS_LEN)?,
        };
        self.reset_status(&mut status)?;
        Ok(status)
    }

    /// Sets every entry to "no error" (queued on the stream, before the next launch).
    pub fn reset_status(&self, status: &mut KernelStatus) -> Result<()> {
        let ok = [STATUS_OK; STATUS_LEN];
        self.stream()
            .memcpy_htod(&ok, &mut status.buf)
            .map_err(cuda_err("reset status"))
    }

    /// Waits for the stream and reads the status entries.
    pub fn read_status(&self, status: &KernelStatus) -> Result<StatusWord> {
        let mut word = [0i32; STATUS_LEN];
        self.stream()
            .memcpy_dtoh(&status.buf, &mut word)
            .map_err(cuda_err("read status"))?;
        self.synchronize()?;
        Ok(StatusWord(word))
    }

    /// The CPU op's error for a token kernel's status (see
    /// [`crate::kernel_host::token_status_error`]); a bad label's value is read back from `labels`.
    pub(crate) fn token_status_error(
        &self,
        word: StatusWord,
        labels: &impl DevicePtr<i32>,
        vocab: usize,
        ignore_index: i32,
        nonfinite_what: &'static str,
    ) -> Result<()> {
        kernel_host::token_status_error(
            &word.0,
            |row| self.read_element(labels, row),
            vocab,
            ignore_index,
            nonfinite_what,
        )
    }
}
