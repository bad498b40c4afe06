//! GPU twin of [`crate::losses::kto_loss`] (kernel `kto_loss_f32` in `kernels/kto_loss.cu`: one
//! block, fixed-order reductions, so bitwise deterministic).
//!
//! Returns the CPU's [`KtoOutput`]; the kernel computes in f32 where the CPU uses f64, so values
//! agree to f32 rounding (not bitwise). Errors are the CPU's, in the CPU's order: shapes and
//! hyper-parameters are checked on the host; data-dependent errors (a non-finite log-prob, an empty
//! reference point) are detected from the kernel's outputs (any non-finite input makes a reward
//! sum or the KL sum non-finite) and then diagnosed exactly by running the CPU checks on a copy of
//! the (small, per-sequence) inputs — the slow path runs only when something is wrong.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, PushKernelArg};

use super::device::{cuda_err, CudaBackend};
use super::launch::{blocks_launch, check_len};
use crate::error::{HaloError, Result};
use crate::kernel_abi::{
    kto_out, HaloKtoParams, KL_FROM_PAIRS, KL_FROM_SUM, KL_ZERO, LOSS_THREADS,
};
use crate::kernel_host::{kto_loss_code, kto_metrics};
use crate::losses::validate::check_kto_lengths;
use crate::losses::{
    kto_loss, KlInput, KtoBatch, KtoConfig, KtoLossType, KtoOutput, ReferencePointPartial,
};

/// Where the reference point comes from (device twin of [`KlInput`]).
#[derive(Debug)]
pub enum CudaKlInput<'a> {
    /// This batch's KL pairs (summed policy / reference log-probs of mismatched completions),
    /// reduced in the kernel.
    LogProbs {
        /// Summed policy log-probs of the KL pairs.
        policy: CudaView<'a, f32>,
        /// Summed reference log-probs of the KL pairs.
        reference: CudaView<'a, f32>,
    },
    /// An (e.g. all-reduced) partial; `z0 = max(0, sum / count)` is formed on the host in f64.
    Partial(ReferencePointPartial),
}

impl CudaKlInput<'_> {
    /// The same input, borrowed again (views are not `Clone`).
    pub fn reborrow(&self) -> CudaKlInput<'_> {
        match self {
            CudaKlInput::LogProbs { policy, reference } => CudaKlInput::LogProbs {
                policy: policy.slice(..),
                reference: reference.slice(..),
            },
            CudaKlInput::Partial(p) => CudaKlInput::Partial(*p),
        }
    }
}

/// One KTO batch on the device (device twin of [`KtoBatch`]).
#[derive(Debug)]
pub struct CudaKtoBatch<'a> {
    /// Summed policy log-probs, one per example.
    pub policy_logps: CudaView<'a, f32>,
    /// Summed reference log-probs.
    pub reference_logps: CudaView<'a, f32>,
    /// Non-zero for a desirable example, 0 for an undesirable one.
    pub is_desirable: CudaView<'a, u8>,
    /// Required for [`KtoLossType::Kto`], ignored for `ApoZeroUnpaired`.
    pub kl: Option<CudaKlInput<'a>>,
}

/// The device buffers of a queued `kto_loss_f32`.
#[derive(Debug)]
pub(crate) struct KtoLaunched {
    /// The kernel's `out[kto_out::LEN]`.
    pub out: CudaSlice<f32>,
    /// `∂loss/∂policy_logps`, one per example.
    pub grad: CudaSlice<f32>,
}

/// How the kernel gets z0.
struct KlSetup<'a> {
    mode: i32,
    count: i32,
    sum: f32,
    total: f32,
    pairs: Option<(&'a CudaView<'a, f32>, &'a CudaView<'a, f32>)>,
}

impl CudaBackend {
    /// The KTO (or APO-zero unpaired) loss, its gradient w.r.t. each policy log-prob, z0 and the
    /// metrics, like [`crate::losses::kto_loss`]. Waits for the kernel.
    pub fn kto_loss(&self, config: &KtoConfig, batch: &CudaKtoBatch<'_>) -> Result<KtoOutput> {
        self.kto_loss_device(config, batch).map(|(out, _)| out)
    }

    /// [`CudaBackend::kto_loss`], also returning the gradient on the device (to feed
    /// [`CudaBackend::broadcast_sequence_grad`] without a host round trip).
    pub fn kto_loss_device(
        &self,
        config: &KtoConfig,
        batch: &CudaKtoBatch<'_>,
    ) -> Result<(KtoOutput, CudaSlice<f32>)> {
        let launched = self.launch_kto_loss(config, batch)?;
        let out_host = self.dtoh(&launched.out)?;
        let grad_host = self.dtoh(&launched.grad)?;
        let output = self.finish_kto_loss(config, batch, &out_host, grad_host)?;
        Ok((output, launched.grad))
    }

    /// Checks the arguments (with the CPU's errors) and queues `kto_loss_f32` without waiting.
    pub(crate) fn launch_kto_loss(
        &self,
        config: &KtoConfig,
        batch: &CudaKtoBatch<'_>,
    ) -> Result<KtoLaunched> {
        config.validate()?;
        let n = check_kto_lengths(
            batch.policy_logps.len(),
            batch.reference_logps.len(),
            batch.is_desirable.len(),
        )?;
        if n > i32::MAX as usize {
            return Err(HaloError::InvalidShape(format!(
                "KTO batch of {n} examples exceeds i32"
            )));
        }
        let kl = match kl_setup(config, batch) {
            Ok(kl) => kl,
            // The CPU checks the log-probs' finiteness before the KL input: let it order the errors.
            Err(e) => return Err(self.kto_diagnose(config, batch, e)),
        };
        let params = HaloKtoParams {
            batch: n as i32,
            kl_count: kl.count,
            loss_type: kto_loss_code(config.loss_type),
            kl_mode: kl.mode,
            beta: config.beta as f32,
            desirable_weight: config.desirable_weight as f32,
            undesirable_weight: config.undesirable_weight as f32,
            kl_sum: kl.sum,
            kl_total: kl.total,
            _pad: 0,
        };
        let mut grad = self.alloc_output::<f32>(n)?;
        let mut out = self.alloc_zeros::<f32>(kto_out::LEN)?;
        {
            let func = self.function("kto_loss_f32")?;
            let stream = self.stream();
            let (policy_ptr, _r0) = batch.policy_logps.device_ptr(stream);
            let (reference_ptr, _r1) = batch.reference_logps.device_ptr(stream);
            let (desirable_ptr, _r2) = batch.is_desirable.device_ptr(stream);
            // Modes other than FROM_PAIRS never read the KL pointers; any valid pointer will do.
            let (kl_policy, kl_reference) = kl
                .pairs
                .unwrap_or((&batch.policy_logps, &batch.policy_logps));
            let (kl_policy_ptr, _r3) = kl_policy.device_ptr(stream);
            let (kl_reference_ptr, _r4) = kl_reference.device_ptr(stream);
            let (grad_ptr, _w0) = grad.device_ptr_mut(stream);
            let (out_ptr, _w1) = out.device_ptr_mut(stream);
            let mut launch = stream.launch_builder(func);
            launch
                .arg(&policy_ptr)
                .arg(&reference_ptr)
                .arg(&desirable_ptr)
                .arg(&kl_policy_ptr)
                .arg(&kl_reference_ptr)
                .arg(&grad_ptr)
                .arg(&out_ptr)
                .arg(&params);
            // SAFETY: arguments follow `kto_loss_f32` in kernels/README.md; the per-example
            // buffers hold `batch` elements, the KL buffers `kl_count` (FROM_PAIRS) and `out`
            // `kto_out::LEN`.
            unsafe { launch.launch(blocks_launch(1, LOSS_THREADS)?) }
                .map_err(cuda_err("launch kto_loss_f32"))?;
        }
        Ok(KtoLaunched { out, grad })
    }

    /// The loss from the kernel's `out` and gradient read back after [`Self::launch_kto_loss`],
    /// or the CPU's error for this batch when an output is non-finite.
    pub(crate) fn finish_kto_loss(
        &self,
        config: &KtoConfig,
        batch: &CudaKtoBatch<'_>,
        out_host: &[f32],
        grad_host: Vec<f32>,
    ) -> Result<KtoOutput> {
        let outputs_finite = out_host[..=kto_out::REJECTED_LOGP_SUM]
            .iter()
            .chain(&grad_host)
            .all(|v| v.is_finite());
        if !outputs_finite {
            let fallback = HaloError::NonFinite {
                what: "KTO loss outputs (f32 overflow on the GPU)",
                row: 0,
            };
            return Err(self.kto_diagnose(config, batch, fallback));
        }
        let z0 = match (config.loss_type, &batch.kl) {
            (KtoLossType::ApoZeroUnpaired, _) => 0.0,
            // Formed on the host in f64 (the kernel used its f32 rounding).
            (KtoLossType::Kto, Some(CudaKlInput::Partial(p))) => p.z0()?,
            (KtoLossType::Kto, _) => out_host[kto_out::Z0] as f64,
        };
        let output = KtoOutput {
            loss: out_host[kto_out::LOSS] as f64,
            grad_policy_logps: grad_host,
            z0,
            metrics: kto_metrics(z0, out_host),
        };
        Ok(output)
    }

    /// The CPU's error for this batch (the CPU orders data checks before the KL checks), or
    /// `fallback` when the CPU finds nothing wrong.
    fn kto_diagnose(
        &self,
        config: &KtoConfig,
        batch: &CudaKtoBatch<'_>,
        fallback: HaloError,
    ) -> HaloError {
        let read = || -> Result<HaloError> {
            let policy = self.dtoh(&batch.policy_logps)?;
            let reference = self.dtoh(&batch.reference_logps)?;
            let desirable: Vec<bool> = self
                .dtoh(&batch.is_desirable)?
                .iter()
                .map(|&d| d != 0)
                .collect();
            let kl_host = match &batch.kl {
                Some(CudaKlInput::LogProbs { policy, reference }) => {
                    Some((self.dtoh(policy)?, self.dtoh(reference)?))
                }
                _ => None,
            };
            let kl = match (&batch.kl, &kl_host) {
                (None, _) => None,
                (Some(CudaKlInput::Partial(p)), _) => Some(KlInput::Partial(*p)),
                (Some(CudaKlInput::LogProbs { .. }), Some((p, r))) => Some(KlInput::LogProbs {
                    policy: p,
                    reference: r,
                }),
                (Some(CudaKlInput::LogProbs { .. }), None) => None,
            };
            let host = KtoBatch {
                policy_logps: &policy,
                reference_logps: &reference,
                is_desirable: &desirable,
                kl,
            };
            Ok(match kto_loss(config, &host) {
                Err(e) => e,
                Ok(_) => fallback.clone(),
            })
        };
        read().unwrap_or_else(|e| e)
    }
}

/// Validates the KL input on the host and picks the kernel's mode.
fn kl_setup<'a>(config: &KtoConfig, batch: &'a CudaKtoBatch<'a>) -> Result<KlSetup<'a>> {
    let none = KlSetup {
        mode: KL_ZERO,
        count: 0,
        sum: 0.0,
        total: 0.0,
        pairs: None,
    };
    if config.loss_type == KtoLossType::ApoZeroUnpaired {
        return Ok(none);
    }
    match &batch.kl {
        None => Err(HaloError::MissingKlPairs {
            loss_type: config.loss_type.name(),
        }),
        Some(CudaKlInput::Partial(p)) => {
            // z0 in f64 on the host, handed to the kernel as sum = z0, total = 1.
            let z0 = p.z0()?;
            Ok(KlSetup {
                mode: KL_FROM_SUM,
                sum: z0 as f32,
                total: 1.0,
                ..none
            })
        }
        Some(CudaKlInput::LogProbs { policy, reference }) => {
            check_len("kl_reference_logps", policy.len(), reference.len())?;
            if policy.is_empty() {
                return Err(HaloError::EmptyBatch("kl pairs"));
            }
            let count = i32::try_from(policy.len()).map_err(|_| {
                HaloError::InvalidShape(format!("{} KL pairs exceed i32", policy.len()))
            })?;
            Ok(KlSetup {
                mode: KL_FROM_PAIRS,
                count,
                pairs: Some((policy, reference)),
                ..none
            })
        }
    }
}
