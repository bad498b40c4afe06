//! GPU twin of [`crate::losses::dpo_loss`] — every [`DpoLossType`] (kernel `dpo_loss_f32` in
//! `kernels/dpo_loss.cu`: one block, fixed-order reductions, deterministic; AOT's batch sorts are
//! stable, ties by index, as the CPU's).
//!
//! Returns the CPU's [`PairLossOutput`]; values agree with the CPU's f64 to f32 rounding. Errors
//! are the CPU's, in the CPU's order: shapes and hyper-parameters on the host; data-dependent ones
//! (non-finite log-probs, an IPO sequence with no token, SFT's batch without a chosen token, an
//! output that overflows) are detected from the kernel's outputs and status, then diagnosed exactly
//! by running the CPU loss on a copy of the (per-pair) inputs.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, PushKernelArg};

use super::device::{cuda_err, CudaBackend};
use super::launch::blocks_launch;
use super::status::StatusWord;
use crate::error::{HaloError, Result};
use crate::kernel_abi::{dpo_out, LOSS_THREADS};
use crate::kernel_host::{dpo_metrics, dpo_params};
use crate::losses::validate::{
    check_count_lengths, check_pair_lengths, ipo_counts, sft_counts, sigmoid_norm_counts,
};
use crate::losses::{dpo_loss, DpoConfig, DpoLossType, PairBatch, PairLossOutput};

/// The device buffers of a queued `dpo_loss_f32`.
#[derive(Debug)]
pub(crate) struct DpoLaunched {
    /// The kernel's `out[dpo_out::LEN]`.
    pub out: CudaSlice<f32>,
    /// The gradients w.r.t. the policy's chosen and rejected log-probs.
    pub grads: CudaPairGrads,
}

/// One batch of preference pairs on the device (device twin of [`PairBatch`]); every buffer has
/// one entry per pair.
#[derive(Debug)]
pub struct CudaPairBatch<'a> {
    /// Summed policy log-probs of the chosen completions.
    pub policy_chosen_logps: CudaView<'a, f32>,
    /// Summed policy log-probs of the rejected completions.
    pub policy_rejected_logps: CudaView<'a, f32>,
    /// Summed reference log-probs of the chosen completions.
    pub reference_chosen_logps: CudaView<'a, f32>,
    /// Summed reference log-probs of the rejected completions.
    pub reference_rejected_logps: CudaView<'a, f32>,
    /// Token counts of the chosen completions; required by IPO, sigmoid_norm and SFT.
    pub chosen_counts: Option<CudaView<'a, u32>>,
    /// Token counts of the rejected completions; required by IPO and sigmoid_norm.
    pub rejected_counts: Option<CudaView<'a, u32>>,
}

/// The device gradients of a pair loss w.r.t. the summed policy log-probs.
#[derive(Debug)]
pub struct CudaPairGrads {
    /// `∂loss/∂policy_chosen_logps[i]`.
    pub grad_chosen: CudaSlice<f32>,
    /// `∂loss/∂policy_rejected_logps[i]`.
    pub grad_rejected: CudaSlice<f32>,
}

impl CudaPairGrads {
    /// One gradient per sequence, chosen then rejected, as a DPO batch's layout orders the
    /// sequences (queued device copies).
    pub(crate) fn concatenated(&self, backend: &CudaBackend) -> Result<CudaSlice<f32>> {
        let n = self.grad_chosen.len();
        let mut grad_seq = backend.alloc_output::<f32>(2 * n)?;
        if n > 0 {
            let stream = backend.stream();
            stream
                .memcpy_dtod(&self.grad_chosen, &mut grad_seq.slice_mut(..n))
                .map_err(cuda_err("copy chosen gradients"))?;
            stream
                .memcpy_dtod(&self.grad_rejected, &mut grad_seq.slice_mut(n..))
                .map_err(cuda_err("copy rejected gradients"))?;
        }
        Ok(grad_seq)
    }
}

impl CudaBackend {
    /// The DPO-family loss, its gradients and metrics, like [`crate::losses::dpo_loss`]. Waits for
    /// the kernel.
    pub fn dpo_loss(
        &self,
        config: &DpoConfig,
        batch: &CudaPairBatch<'_>,
    ) -> Result<PairLossOutput> {
        self.dpo_loss_device(config, batch).map(|(out, _)| out)
    }

    /// [`CudaBackend::dpo_loss`], also returning the gradients on the device.
    pub fn dpo_loss_device(
        &self,
        config: &DpoConfig,
        batch: &CudaPairBatch<'_>,
    ) -> Result<(PairLossOutput, CudaPairGrads)> {
        let mut status = self.new_status()?;
        let (status_ptr, guard) = status.buf.device_ptr_mut(self.stream());
        let launched = self.launch_dpo_loss(config, batch, status_ptr);
        drop(guard);
        let launched = launched?;
        let word = self.read_status(&status)?;
        let out_host = self.dtoh(&launched.out)?;
        let grad_chosen = self.dtoh(&launched.grads.grad_chosen)?;
        let grad_rejected = self.dtoh(&launched.grads.grad_rejected)?;
        let output =
            self.finish_dpo_loss(config, batch, word, &out_host, grad_chosen, grad_rejected)?;
        Ok((output, launched.grads))
    }

    /// Checks the arguments (with the CPU's errors) and queues `dpo_loss_f32` without waiting,
    /// reporting into the `STATUS_LEN` entries at the device address `status_ptr` (reset).
    pub(crate) fn launch_dpo_loss(
        &self,
        config: &DpoConfig,
        batch: &CudaPairBatch<'_>,
        status_ptr: u64,
    ) -> Result<DpoLaunched> {
        config.validate()?;
        let n = check_pair_lengths(
            batch.policy_chosen_logps.len(),
            batch.policy_rejected_logps.len(),
            batch.reference_chosen_logps.len(),
            batch.reference_rejected_logps.len(),
        )?;
        if n > i32::MAX as usize {
            return Err(HaloError::InvalidShape(format!(
                "DPO batch of {n} pairs exceeds i32"
            )));
        }
        // The CPU checks finiteness before the counts: let it order these errors.
        let counts = match check_counts(config, batch, n) {
            Ok(c) => c,
            Err(e) => return Err(self.dpo_diagnose(config, batch, e)),
        };
        let params = dpo_params(config, n as i32);
        let mut grads = CudaPairGrads {
            grad_chosen: self.alloc_output(n)?,
            grad_rejected: self.alloc_output(n)?,
        };
        let mut out = self.alloc_zeros::<f32>(dpo_out::LEN)?;
        // The AOT losses' two batch orders (written whole by the kernel before it reads them);
        // freed, stream-ordered, when this returns.
        let mut order = if sorts_the_batch(config.loss_type) {
            Some(self.alloc_output::<u32>(2 * n)?)
        } else {
            None
        };
        {
            let func = self.function("dpo_loss_f32")?;
            let stream = self.stream();
            let (pc_ptr, _r0) = batch.policy_chosen_logps.device_ptr(stream);
            let (pr_ptr, _r1) = batch.policy_rejected_logps.device_ptr(stream);
            let (rc_ptr, _r2) = batch.reference_chosen_logps.device_ptr(stream);
            let (rr_ptr, _r3) = batch.reference_rejected_logps.device_ptr(stream);
            // Counts are read only by IPO and sigmoid_norm (both, checked above) and SFT (the
            // chosen); `order` only by the AOT losses; otherwise any valid pointer will do.
            let chosen_counts = counts.chosen.map(|c| c.device_ptr(stream));
            let rejected_counts = counts.rejected.map(|r| r.device_ptr(stream));
            let chosen_counts_ptr = chosen_counts.as_ref().map_or(pc_ptr, |(p, _)| *p);
            let rejected_counts_ptr = rejected_counts.as_ref().map_or(pc_ptr, |(p, _)| *p);
            let (grad_chosen_ptr, _w0) = grads.grad_chosen.device_ptr_mut(stream);
            let (grad_rejected_ptr, _w1) = grads.grad_rejected.device_ptr_mut(stream);
            let (out_ptr, _w2) = out.device_ptr_mut(stream);
            let order = order.as_mut().map(|o| o.device_ptr_mut(stream));
            let order_ptr = order.as_ref().map_or(pc_ptr, |(p, _)| *p);
            let mut launch = stream.launch_builder(func);
            launch
                .arg(&pc_ptr)
                .arg(&pr_ptr)
                .arg(&rc_ptr)
                .arg(&rr_ptr)
                .arg(&chosen_counts_ptr)
                .arg(&rejected_counts_ptr)
                .arg(&grad_chosen_ptr)
                .arg(&grad_rejected_ptr)
                .arg(&out_ptr)
                .arg(&order_ptr)
                .arg(&status_ptr)
                .arg(&params);
            // SAFETY: arguments follow `dpo_loss_f32` in kernels/README.md; every per-pair buffer
            // holds `pairs` elements (counts too, when IPO or SFT read them); `order` holds
            // `2 * pairs` when AOT writes it; `out` holds `dpo_out::LEN` and `status`
            // `STATUS_LEN`.
            unsafe { launch.launch(blocks_launch(1, LOSS_THREADS)?) }
                .map_err(cuda_err("launch dpo_loss_f32"))?;
        }
        Ok(DpoLaunched { out, grads })
    }

    /// The loss from the status, `out` and gradients read back after [`Self::launch_dpo_loss`],
    /// or the CPU's error for this batch when the kernel reported one or an output is non-finite.
    pub(crate) fn finish_dpo_loss(
        &self,
        config: &DpoConfig,
        batch: &CudaPairBatch<'_>,
        word: StatusWord,
        out_host: &[f32],
        grad_chosen: Vec<f32>,
        grad_rejected: Vec<f32>,
    ) -> Result<PairLossOutput> {
        let n = grad_chosen.len();
        let outputs_finite = out_host[..=dpo_out::REJECTED_LOGP_SUM]
            .iter()
            .chain(&grad_chosen)
            .chain(&grad_rejected)
            .all(|v| v.is_finite());
        if let Some(index) = word.empty_sequence() {
            let fallback = HaloError::EmptySequence {
                what: "chosen_counts or rejected_counts",
                index,
            };
            return Err(self.dpo_diagnose(config, batch, fallback));
        }
        if !outputs_finite {
            let fallback = HaloError::NonFinite {
                what: "DPO loss outputs (f32 overflow on the GPU)",
                row: 0,
            };
            return Err(self.dpo_diagnose(config, batch, fallback));
        }
        let output = PairLossOutput {
            loss: out_host[dpo_out::LOSS] as f64,
            grad_chosen,
            grad_rejected,
            metrics: dpo_metrics(n, out_host),
        };
        Ok(output)
    }

    /// The CPU's error for this batch, or `fallback` when the CPU finds nothing wrong.
    fn dpo_diagnose(
        &self,
        config: &DpoConfig,
        batch: &CudaPairBatch<'_>,
        fallback: HaloError,
    ) -> HaloError {
        let read = || -> Result<HaloError> {
            let pc = self.dtoh(&batch.policy_chosen_logps)?;
            let pr = self.dtoh(&batch.policy_rejected_logps)?;
            let rc = self.dtoh(&batch.reference_chosen_logps)?;
            let rr = self.dtoh(&batch.reference_rejected_logps)?;
            let chosen_counts = batch
                .chosen_counts
                .as_ref()
                .map(|c| self.dtoh(c))
                .transpose()?;
            let rejected_counts = batch
                .rejected_counts
                .as_ref()
                .map(|c| self.dtoh(c))
                .transpose()?;
            let host = PairBatch {
                policy_chosen_logps: &pc,
                policy_rejected_logps: &pr,
                reference_chosen_logps: &rc,
                reference_rejected_logps: &rr,
                chosen_counts: chosen_counts.as_deref(),
                rejected_counts: rejected_counts.as_deref(),
            };
            Ok(match dpo_loss(config, &host) {
                Err(e) => e,
                Ok(_) => fallback.clone(),
            })
        };
        read().unwrap_or_else(|e| e)
    }
}

/// Whether the loss type sorts the batch (and so needs the kernel's `order` scratch).
fn sorts_the_batch(loss_type: DpoLossType) -> bool {
    matches!(loss_type, DpoLossType::Aot | DpoLossType::AotUnpaired)
}

/// The token counts the kernel reads (IPO, sigmoid_norm: both; SFT: the chosen).
struct KernelCounts<'b, 'a> {
    chosen: Option<&'b CudaView<'a, u32>>,
    rejected: Option<&'b CudaView<'a, u32>>,
}

/// Count lengths (when given) and the presence of those the loss type needs — as the CPU checks
/// them (IPO, sigmoid_norm: both, chosen first; SFT: the chosen, with the CPU's own error).
fn check_counts<'b, 'a>(
    config: &DpoConfig,
    batch: &'b CudaPairBatch<'a>,
    n: usize,
) -> Result<KernelCounts<'b, 'a>> {
    check_count_lengths(
        n,
        batch.chosen_counts.as_ref().map(|c| c.len()),
        batch.rejected_counts.as_ref().map(|c| c.len()),
    )?;
    match config.loss_type {
        DpoLossType::Ipo | DpoLossType::SigmoidNorm => {
            let (chosen, rejected) = if config.loss_type == DpoLossType::Ipo {
                ipo_counts(batch.chosen_counts.as_ref(), batch.rejected_counts.as_ref())?
            } else {
                sigmoid_norm_counts(batch.chosen_counts.as_ref(), batch.rejected_counts.as_ref())?
            };
            Ok(KernelCounts {
                chosen: Some(chosen),
                rejected: Some(rejected),
            })
        }
        DpoLossType::Sft => Ok(KernelCounts {
            chosen: Some(sft_counts(batch.chosen_counts.as_ref())?),
            rejected: None,
        }),
        _ => Ok(KernelCounts {
            chosen: None,
            rejected: None,
        }),
    }
}
