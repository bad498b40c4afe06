//! The kernels' status buffer: `STATUS_LEN` ints, set to `STATUS_OK` before a launch; a kernel
//! lowers an entry (integer `atomicMin`, so the result is deterministic) to the first row that
//! failed a check. See `kernels/README.md`, "Status buffer".

use cudarc::driver::{CudaSlice, DevicePtr};

use super::device::{cuda_err, CudaBackend};
use crate::error::Result;
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
