//! Checks of CUDA kernels that the host reads later, all at once: issue 13's "one status read and
//! one loss read per step at most".
//!
//! A token op on a CUDA tape (the token log-probs, the fused LM head, their backwards) only queues
//! its kernels; what the kernels found (a label outside the vocabulary, non-finite logits, a
//! gradient that overflowed) lands in a status buffer on the device. [`DeviceChecks`] keeps each
//! buffer with the function that turns its word into the op's error. At the end of a step
//! [`DeviceChecks::gather`] copies every status, and any device values the host wants (the loss,
//! the norm), into one buffer on the device — queued, no wait — and [`StepReadout::read`] makes the
//! step's one device→host copy and wait, then runs the checks in the order the ops ran, so the
//! first failure is the error the CPU would have returned. The optimizer's update is gated on the
//! gathered statuses ([`StepReadout::gate`]): a step whose checks fail leaves the weights as they
//! were, although the host learns it only after the update was queued.

use std::fmt;
use std::sync::Arc;

use halo_kernels::cuda::{CudaBackend, CudaSlice, CudaView, KernelStatus, StatusWord};
use halo_kernels::error::{HaloError, Result};
use halo_kernels::kernel_abi::STATUS_LEN;

/// Turns a status word into the op's error (`Ok` when its checks passed).
type CheckFn = dyn Fn(&StatusWord) -> Result<()> + Send + Sync;

/// Status buffers of queued kernels whose checks the host has not read, in the order the kernels
/// were queued (see the module docs). Cloning shares the buffers.
#[derive(Clone, Default)]
pub struct DeviceChecks {
    pending: Vec<Arc<(KernelStatus, Box<CheckFn>)>>,
}

impl fmt::Debug for DeviceChecks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceChecks({} pending)", self.pending.len())
    }
}

impl DeviceChecks {
    /// No checks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of status buffers held.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Adds the status of a queued kernel and the function that turns its word into the error.
    pub(crate) fn push(
        &mut self,
        status: KernelStatus,
        check: impl Fn(&StatusWord) -> Result<()> + Send + Sync + 'static,
    ) {
        self.pending.push(Arc::new((status, Box::new(check))));
    }

    /// Appends `other`'s checks after these.
    pub fn extend(&mut self, other: &DeviceChecks) {
        self.pending.extend(other.pending.iter().cloned());
    }

    /// Queues the copies of every status and of `values` into one device buffer, with room for
    /// values produced later (`later`: their lengths, written with [`StepReadout::write_later`]).
    /// Nothing waits.
    pub fn gather<'c>(
        &'c self,
        gpu: &Arc<CudaBackend>,
        values: &[CudaView<'_, f32>],
        later: &[usize],
    ) -> Result<StepReadout<'c>> {
        let statuses = self.pending.len() * STATUS_LEN;
        let mut ranges = Vec::with_capacity(values.len() + later.len());
        let mut at = statuses;
        for len in values.iter().map(|v| v.len()).chain(later.iter().copied()) {
            ranges.push(at..at + len);
            at += len;
        }
        let mut buf = gpu.alloc_zeros::<i32>(at)?;
        for (i, entry) in self.pending.iter().enumerate() {
            let mut dst = buf.slice_mut(i * STATUS_LEN..(i + 1) * STATUS_LEN);
            gpu.copy_dtod(entry.0.buffer(), &mut dst)?;
        }
        let mut readout = StepReadout {
            gpu: gpu.clone(),
            buf,
            checks: self,
            ranges,
            gathered: values.len(),
            statuses,
        };
        for (i, v) in values.iter().enumerate() {
            readout.write(i, v)?;
        }
        Ok(readout)
    }

    /// Reads every status (one wait) and runs the checks: the first failure is the error.
    pub fn verify(&self, gpu: &Arc<CudaBackend>) -> Result<()> {
        self.gather(gpu, &[], &[])?.read().map(|_| ())
    }
}

/// The statuses and values of a step gathered on the device by [`DeviceChecks::gather`], read
/// with one copy and one wait by [`StepReadout::read`].
pub struct StepReadout<'c> {
    gpu: Arc<CudaBackend>,
    /// `[status words | values]`, the values as f32 bits.
    buf: CudaSlice<i32>,
    checks: &'c DeviceChecks,
    /// Where each value lives in `buf` (the gathered ones, then the later ones).
    ranges: Vec<std::ops::Range<usize>>,
    /// How many of `ranges` were gathered at once (the rest are written later).
    gathered: usize,
    statuses: usize,
}

impl StepReadout<'_> {
    /// Every gathered status entry, on the device: a kernel gated on it (AdamW) writes nothing
    /// unless all of them say "no error".
    pub fn gate(&self) -> CudaView<'_, i32> {
        self.buf.slice(..self.statuses)
    }

    /// Queues the copy of `src` into the `i`-th value produced later (after the gathered values).
    pub fn write_later(&mut self, i: usize, src: &CudaView<'_, f32>) -> Result<()> {
        let slot = self.gathered + i;
        if slot >= self.ranges.len() {
            return Err(HaloError::Autograd(format!(
                "no later value {i} in this step readout"
            )));
        }
        self.write(slot, src)
    }

    fn write(&mut self, slot: usize, src: &CudaView<'_, f32>) -> Result<()> {
        let range = self.ranges[slot].clone();
        let mut dst = self.buf.slice_mut(range);
        // SAFETY: i32 and f32 have the same size and alignment, and any bits are a valid i32; the
        // host reads them back as f32 bits.
        let mut dst = unsafe { dst.transmute_mut::<f32>(src.len()) }.ok_or_else(|| {
            HaloError::LengthMismatch {
                what: "step readout value",
                expected: src.len(),
                got: self.ranges[slot].len(),
            }
        })?;
        self.gpu.copy_dtod(src, &mut dst)
    }

    /// The step's one device→host copy and wait; then the checks in order (the first failure is
    /// the error); then every value, gathered ones first.
    pub fn read(self) -> Result<Vec<Vec<f32>>> {
        self.read_with_gate().map(|(values, _)| values)
    }

    /// [`read`](Self::read), and whether the [`gate`](Self::gate) was open: every gathered status
    /// "no error". It can be shut with every check passing — a status whose check leaves the error
    /// to a later reader (a loss that diagnoses its own refusal from the values): then a gated
    /// update wrote nothing, which its caller must know.
    pub fn read_with_gate(self) -> Result<(Vec<Vec<f32>>, bool)> {
        let host = self.gpu.dtoh(&self.buf)?;
        let mut open = true;
        for (i, entry) in self.checks.pending.iter().enumerate() {
            let mut word = [0i32; STATUS_LEN];
            word.copy_from_slice(&host[i * STATUS_LEN..(i + 1) * STATUS_LEN]);
            let word = StatusWord(word);
            (entry.1)(&word)?;
            open &= word.is_ok();
        }
        let values = self
            .ranges
            .iter()
            .map(|r| {
                host[r.clone()]
                    .iter()
                    .map(|&b| f32::from_bits(b as u32))
                    .collect()
            })
            .collect();
        Ok((values, open))
    }
}
