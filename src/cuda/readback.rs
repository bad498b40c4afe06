//! The one read of a device step: a packed `i32` buffer holding the kernels' status words (one
//! region per kernel that checks its input) and, gathered into it on the stream at the end of the
//! chain, the loss's outputs, its per-sequence gradients and the sequence sums (as f32 bits).
//!
//! Every kernel of the step writes its status straight into its region; the loss outputs are
//! copied in device-to-device after the last launch. The host then makes one device-to-host copy
//! and one wait, and checks the regions in the CPU chain's order. Separate regions (rather than one
//! shared status word) keep each kernel's report apart: the backward's slot 1 means a non-finite
//! lse, the forward's a non-finite logit, and the host must know which ran into what.

use cudarc::driver::{result as cu, sys, CudaSlice, DevicePtr, DevicePtrMut};

use super::device::{cuda_err, CudaBackend};
use super::launch::check_len;
use super::status::StatusWord;
use crate::error::Result;
use crate::kernel_abi::{STATUS_LEN, STATUS_OK};

/// Which kernel's status region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusRegion {
    /// `token_logprobs_forward`.
    Forward = 0,
    /// The loss kernel (`dpo_loss_f32`; `kto_loss_f32` reports none).
    Loss = 1,
    /// `token_logprobs_backward_inplace`.
    Backward = 2,
}

const STATUS_REGIONS: usize = 3;
const VALUES_START: usize = STATUS_REGIONS * STATUS_LEN;

/// The packed buffer of one step: `[status × 3 | loss out | grads | sums]`.
#[derive(Debug)]
pub(crate) struct StepReadback {
    buf: CudaSlice<i32>,
    out_len: usize,
    grads_len: usize,
    sums_len: usize,
}

/// What the host holds after [`StepReadback::read`].
#[derive(Debug)]
pub(crate) struct StepValues {
    /// The forward's status.
    pub forward: StatusWord,
    /// The loss kernel's status.
    pub loss: StatusWord,
    /// The in-place backward's status.
    pub backward: StatusWord,
    /// The loss kernel's `out` array.
    pub out: Vec<f32>,
    /// One gradient per sequence.
    pub grads: Vec<f32>,
    /// The sequence sums.
    pub sums: Vec<f32>,
}

impl StepReadback {
    /// A buffer for a loss `out` of `out_len`, `grads_len` gradients and `sums_len` sums, with
    /// every status region reset (one allocation, one host-to-device copy, queued).
    pub(crate) fn new(
        backend: &CudaBackend,
        out_len: usize,
        grads_len: usize,
        sums_len: usize,
    ) -> Result<Self> {
        let len = VALUES_START + out_len + grads_len + sums_len;
        let mut buf = backend.alloc_output::<i32>(len)?;
        let ok = [STATUS_OK; VALUES_START];
        backend
            .stream()
            .memcpy_htod(&ok, &mut buf.slice_mut(..VALUES_START))
            .map_err(cuda_err("reset step status"))?;
        Ok(StepReadback {
            buf,
            out_len,
            grads_len,
            sums_len,
        })
    }

    /// The device address of `region` (for a kernel's `int32_t* status`). The buffer lives as long
    /// as `self`, and every use is on the backend's one stream, so the raw address is ordered.
    pub(crate) fn status_ptr(&mut self, backend: &CudaBackend, region: StatusRegion) -> u64 {
        let (base, _guard) = self.buf.device_ptr_mut(backend.stream());
        base + (region as usize * STATUS_LEN * std::mem::size_of::<i32>()) as u64
    }

    /// Queues the device-to-device copies of the loss's `out`, the gradients and the sums into the
    /// buffer (after every launch of the step).
    pub(crate) fn gather(
        &mut self,
        backend: &CudaBackend,
        out: &CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        sums: &CudaSlice<f32>,
    ) -> Result<()> {
        let mut at = VALUES_START;
        for (src, len) in [
            (out, self.out_len),
            (grads, self.grads_len),
            (sums, self.sums_len),
        ] {
            check_len("step readback", len, src.len())?;
            if len > 0 {
                let stream = backend.stream();
                let (src_ptr, _r) = src.device_ptr(stream);
                let (base, _w) = self.buf.device_ptr_mut(stream);
                let dst = base + (at * std::mem::size_of::<i32>()) as sys::CUdeviceptr;
                // SAFETY: `src` holds `len` f32 and the buffer `len` i32 (4 bytes each) from `at`;
                // both are device allocations of this context, ordered on this stream.
                unsafe { cu::memcpy_dtod_async(dst, src_ptr, len * 4, stream.cu_stream()) }
                    .map_err(cuda_err("gather step outputs"))?;
            }
            at += len;
        }
        Ok(())
    }

    /// Reads the forward's status region alone (and waits): for an error found on the host
    /// mid-chain, which the CPU would report only if its forward passed.
    pub(crate) fn read_forward_status(&self, backend: &CudaBackend) -> Result<StatusWord> {
        let host = backend.dtoh(&self.buf.slice(..STATUS_LEN))?;
        let mut w = [0i32; STATUS_LEN];
        w.copy_from_slice(&host);
        Ok(StatusWord(w))
    }

    /// Copies the buffer to the host and waits: the step's one host round trip.
    pub(crate) fn read(&self, backend: &CudaBackend) -> Result<StepValues> {
        let host = backend.dtoh(&self.buf)?;
        let word = |region: usize| {
            let mut w = [0i32; STATUS_LEN];
            w.copy_from_slice(&host[region * STATUS_LEN..(region + 1) * STATUS_LEN]);
            StatusWord(w)
        };
        let floats = |from: usize, len: usize| -> Vec<f32> {
            host[from..from + len]
                .iter()
                .map(|&bits| f32::from_bits(bits as u32))
                .collect()
        };
        let grads_start = VALUES_START + self.out_len;
        let sums_start = grads_start + self.grads_len;
        Ok(StepValues {
            forward: word(StatusRegion::Forward as usize),
            loss: word(StatusRegion::Loss as usize),
            backward: word(StatusRegion::Backward as usize),
            out: floats(VALUES_START, self.out_len),
            grads: floats(grads_start, self.grads_len),
            sums: floats(sums_start, self.sums_len),
        })
    }
}
