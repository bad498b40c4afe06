//! Emulated loss kernels (`kernels/kto_loss.cu`, `kernels/dpo_loss.cu`): the whole loss, its
//! gradient per sequence and metric sums from one launch of one block.

use super::ffi;
use crate::error::{HaloError, Result};
use crate::kernel_abi::{
    dpo_out, kto_out, HaloDpoParams, HaloKtoParams, DPO_LOSS_APO_ZERO, DPO_LOSS_HINGE,
    DPO_LOSS_IPO, DPO_LOSS_ROBUST, DPO_LOSS_SIGMOID, KL_FROM_PAIRS, KL_FROM_SUM, KL_ZERO,
    KTO_LOSS_APO_ZERO_UNPAIRED, KTO_LOSS_KTO, LOSS_THREADS, STATUS_EMPTY_SEQUENCE, STATUS_LEN,
    STATUS_OK,
};

/// KTO loss variants (TRL `KTOConfig.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtoKernelLoss {
    Kto,
    ApoZeroUnpaired,
}

/// Where the KTO reference point comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KlSource<'a> {
    /// Per-sequence log-probs of the mismatched (KL) completions under policy and reference.
    Pairs {
        policy: &'a [f32],
        reference: &'a [f32],
    },
    /// An all-reduced sum of KL log-ratios and their count (multi-device).
    Sum { sum: f32, count: f32 },
    /// z0 = 0 (TRL `calculate_KL = False`).
    Zero,
}

/// Hyper-parameters of the KTO kernel. Defaults: β = 0.1, λ_D = λ_U = 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoKernelConfig {
    pub loss: KtoKernelLoss,
    pub beta: f32,
    pub desirable_weight: f32,
    pub undesirable_weight: f32,
}

impl Default for KtoKernelConfig {
    fn default() -> Self {
        KtoKernelConfig {
            loss: KtoKernelLoss::Kto,
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

/// Everything one KTO launch produces.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoKernelOutput {
    pub loss: f32,
    /// ∂loss/∂(per-sequence policy log-prob).
    pub grad_policy: Vec<f32>,
    /// The reference point used.
    pub z0: f32,
    /// The raw `out[kto_out::LEN]` array (slots in [`kto_out`]).
    pub out: Vec<f32>,
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(HaloError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

fn check_positive(name: &'static str, value: f32) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(HaloError::InvalidHyperParameter {
            name,
            value: value as f64,
            reason: "must be finite and > 0",
        })
    }
}

/// Emulated `kto_loss_f32`.
pub fn kto_loss(
    policy_logp: &[f32],
    reference_logp: &[f32],
    desirable: &[bool],
    kl: KlSource<'_>,
    config: KtoKernelConfig,
) -> Result<KtoKernelOutput> {
    let batch = policy_logp.len();
    if batch == 0 {
        return Err(HaloError::EmptyBatch("policy_logp"));
    }
    check_len("reference_logp", batch, reference_logp.len())?;
    check_len("desirable", batch, desirable.len())?;
    check_positive("beta", config.beta)?;
    for (name, w) in [
        ("desirable_weight", config.desirable_weight),
        ("undesirable_weight", config.undesirable_weight),
    ] {
        if !(w.is_finite() && w >= 0.0) {
            return Err(HaloError::InvalidHyperParameter {
                name,
                value: w as f64,
                reason: "must be finite and >= 0",
            });
        }
    }
    if batch > i32::MAX as usize {
        return Err(HaloError::InvalidShape(format!(
            "batch {batch} exceeds int32"
        )));
    }
    let loss_type = match config.loss {
        KtoKernelLoss::Kto => KTO_LOSS_KTO,
        KtoKernelLoss::ApoZeroUnpaired => KTO_LOSS_APO_ZERO_UNPAIRED,
    };
    let mut p = HaloKtoParams {
        batch: batch as i32,
        loss_type,
        beta: config.beta,
        desirable_weight: config.desirable_weight,
        undesirable_weight: config.undesirable_weight,
        ..Default::default()
    };
    // Unread pointers still have to be valid: point them at the policy log-probs.
    let (mut kl_policy, mut kl_reference) = (policy_logp.as_ptr(), policy_logp.as_ptr());
    match kl {
        KlSource::Pairs { policy, reference } => {
            if policy.is_empty() {
                return Err(HaloError::MissingKlPairs { loss_type: "kto" });
            }
            check_len("kl reference_logp", policy.len(), reference.len())?;
            p.kl_mode = KL_FROM_PAIRS;
            p.kl_count = i32::try_from(policy.len())
                .map_err(|_| HaloError::InvalidShape("too many KL pairs".into()))?;
            kl_policy = policy.as_ptr();
            kl_reference = reference.as_ptr();
        }
        KlSource::Sum { sum, count } => {
            check_positive("kl count", count)?;
            p.kl_mode = KL_FROM_SUM;
            p.kl_sum = sum;
            p.kl_total = count;
        }
        KlSource::Zero => p.kl_mode = KL_ZERO,
    }
    let desirable: Vec<u8> = desirable.iter().map(|&d| d as u8).collect();
    let mut grad_policy = vec![f32::NAN; batch];
    let mut out = vec![f32::NAN; kto_out::LEN];
    // SAFETY: every array holds the length the ABI requires for `p`.
    unsafe {
        ffi::halo_emu_kto_loss_f32(
            1,
            LOSS_THREADS,
            policy_logp.as_ptr(),
            reference_logp.as_ptr(),
            desirable.as_ptr(),
            kl_policy,
            kl_reference,
            grad_policy.as_mut_ptr(),
            out.as_mut_ptr(),
            p,
        );
    }
    Ok(KtoKernelOutput {
        loss: out[kto_out::LOSS],
        grad_policy,
        z0: out[kto_out::Z0],
        out,
    })
}

/// DPO-family loss variants (TRL `DPOConfig.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoKernelLoss {
    Sigmoid,
    Robust,
    Hinge,
    Ipo,
    ApoZero,
}

/// Per-sequence inputs of the DPO kernel.
#[derive(Debug, Clone, Copy)]
pub struct DpoPairs<'a> {
    pub policy_chosen: &'a [f32],
    pub policy_rejected: &'a [f32],
    pub reference_chosen: &'a [f32],
    pub reference_rejected: &'a [f32],
    /// Token counts of the completions; required by IPO (length normalisation).
    pub counts: Option<(&'a [u32], &'a [u32])>,
}

/// Everything one DPO launch produces.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoKernelOutput {
    pub loss: f32,
    pub grad_chosen: Vec<f32>,
    pub grad_rejected: Vec<f32>,
    /// The raw `out[dpo_out::LEN]` array (slots in [`dpo_out`]).
    pub out: Vec<f32>,
}

/// Emulated `dpo_loss_f32`.
pub fn dpo_loss(
    pairs: DpoPairs<'_>,
    loss: DpoKernelLoss,
    beta: f32,
    label_smoothing: f32,
) -> Result<DpoKernelOutput> {
    let n = pairs.policy_chosen.len();
    if n == 0 {
        return Err(HaloError::EmptyBatch("policy_chosen"));
    }
    check_len("policy_rejected", n, pairs.policy_rejected.len())?;
    check_len("reference_chosen", n, pairs.reference_chosen.len())?;
    check_len("reference_rejected", n, pairs.reference_rejected.len())?;
    check_positive("beta", beta)?;
    if !(0.0..0.5).contains(&label_smoothing) {
        return Err(HaloError::InvalidHyperParameter {
            name: "label_smoothing",
            value: label_smoothing as f64,
            reason: "must be in [0, 0.5)",
        });
    }
    if n > i32::MAX as usize {
        return Err(HaloError::InvalidShape(format!("{n} pairs exceed int32")));
    }
    let loss_type = match loss {
        DpoKernelLoss::Sigmoid => DPO_LOSS_SIGMOID,
        DpoKernelLoss::Robust => DPO_LOSS_ROBUST,
        DpoKernelLoss::Hinge => DPO_LOSS_HINGE,
        DpoKernelLoss::Ipo => DPO_LOSS_IPO,
        DpoKernelLoss::ApoZero => DPO_LOSS_APO_ZERO,
    };
    let dummy = [0u32; 1];
    let (chosen_counts, rejected_counts) = match pairs.counts {
        Some((c, r)) => {
            check_len("chosen_counts", n, c.len())?;
            check_len("rejected_counts", n, r.len())?;
            (c.as_ptr(), r.as_ptr())
        }
        None if loss == DpoKernelLoss::Ipo => {
            return Err(HaloError::InvalidShape(
                "IPO is length-normalised: token counts are required".into(),
            ))
        }
        None => (dummy.as_ptr(), dummy.as_ptr()),
    };
    let p = HaloDpoParams {
        pairs: n as i32,
        loss_type,
        beta,
        label_smoothing,
    };
    let mut grad_chosen = vec![f32::NAN; n];
    let mut grad_rejected = vec![f32::NAN; n];
    let mut out = vec![f32::NAN; dpo_out::LEN];
    let mut status = [STATUS_OK; STATUS_LEN];
    // SAFETY: every array holds the length the ABI requires for `p` (counts read only for IPO).
    unsafe {
        ffi::halo_emu_dpo_loss_f32(
            1,
            LOSS_THREADS,
            pairs.policy_chosen.as_ptr(),
            pairs.policy_rejected.as_ptr(),
            pairs.reference_chosen.as_ptr(),
            pairs.reference_rejected.as_ptr(),
            chosen_counts,
            rejected_counts,
            grad_chosen.as_mut_ptr(),
            grad_rejected.as_mut_ptr(),
            out.as_mut_ptr(),
            status.as_mut_ptr(),
            p,
        );
    }
    if status[STATUS_EMPTY_SEQUENCE] != STATUS_OK {
        return Err(HaloError::EmptySequence {
            what: "dpo pairs (chosen or rejected completion)",
            index: status[STATUS_EMPTY_SEQUENCE] as usize,
        });
    }
    Ok(DpoKernelOutput {
        loss: out[dpo_out::LOSS],
        grad_chosen,
        grad_rejected,
        out,
    })
}
