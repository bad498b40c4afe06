//! Emulated loss kernels (`kernels/kto_loss.cu`, `kernels/dpo_loss.cu`): the whole loss, its
//! gradient per sequence and metric sums from one launch of one block.

use super::ffi;
use crate::error::{HaloError, Result};
use crate::kernel_abi::{
    dpo_out, kto_out, HaloDpoParams, HaloKtoParams, KL_FROM_PAIRS, KL_FROM_SUM, KL_ZERO,
    LOSS_THREADS, STATUS_EMPTY_SEQUENCE, STATUS_LEN, STATUS_OK,
};
use crate::kernel_host::{dpo_loss_code, kto_loss_code, status_row};
use crate::losses::validate::{self, check_finite};
use crate::losses::{DpoLossType, KtoLossType};
use crate::validate::check_len;

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

/// The losses' own hyper-parameter check, on the kernel's f32 value (exact in f64).
fn check_positive(name: &'static str, value: f32) -> Result<()> {
    validate::check_positive(name, value as f64)
}

/// Emulated `kto_loss_f32` at the kernel's level (f32 in and out, raw output slots).
pub fn kto_loss_kernel(
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
        validate::check_nonnegative(name, w as f64)?;
    }
    if batch > i32::MAX as usize {
        return Err(HaloError::InvalidShape(format!(
            "batch {batch} exceeds int32"
        )));
    }
    let loss_type = kto_loss_code(match config.loss {
        KtoKernelLoss::Kto => KtoLossType::Kto,
        KtoKernelLoss::ApoZeroUnpaired => KtoLossType::ApoZeroUnpaired,
    });
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

/// Emulated `dpo_loss_f32` at the kernel's level (f32 in and out, raw output slots). The kernel
/// itself reports IPO pairs with a zero count (status buffer).
pub fn dpo_loss_kernel(
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
    // TRL: ε ∈ [0, 1] for sigmoid; robust divides by 1 − 2ε.
    let max_smoothing = if loss == DpoKernelLoss::Robust {
        0.5
    } else {
        1.0
    };
    let smoothing_ok = label_smoothing >= 0.0
        && (label_smoothing < max_smoothing || (label_smoothing == 1.0 && max_smoothing == 1.0));
    if !smoothing_ok {
        return Err(HaloError::InvalidHyperParameter {
            name: "label_smoothing",
            value: label_smoothing as f64,
            reason: "must be in [0, 1] (sigmoid) or [0, 0.5) (robust)",
        });
    }
    if n > i32::MAX as usize {
        return Err(HaloError::InvalidShape(format!("{n} pairs exceed int32")));
    }
    let loss_type = dpo_loss_code(match loss {
        DpoKernelLoss::Sigmoid => DpoLossType::Sigmoid,
        DpoKernelLoss::Robust => DpoLossType::Robust,
        DpoKernelLoss::Hinge => DpoLossType::Hinge,
        DpoKernelLoss::Ipo => DpoLossType::Ipo,
        DpoKernelLoss::ApoZero => DpoLossType::ApoZero,
    });
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
    if let Some(index) = status_row(&status, STATUS_EMPTY_SEQUENCE) {
        return Err(HaloError::EmptySequence {
            what: "dpo pairs (chosen or rejected completion)",
            index,
        });
    }
    Ok(DpoKernelOutput {
        loss: out[dpo_out::LOSS],
        grad_chosen,
        grad_rejected,
        out,
    })
}

// ---- the losses module's API (`crate::losses`), computed by the kernels ----------------------

use crate::kernel_host::{dpo_metrics, kto_metrics};
use crate::losses::dpo::{check_pair_batch, ipo_checked_counts};
use crate::losses::kto::check_kto_batch;
use crate::losses::{
    DpoConfig, KlInput, KtoBatch, KtoConfig, KtoOutput, PairBatch, PairLossOutput,
};

/// Emulated [`crate::losses::kto_loss`]: same arguments, validation and output type. Deliberate
/// difference: the kernel computes in f32 (the CPU loss in f64), and an all-reduced
/// `ReferencePointPartial` enters the kernel as an f32 sum and count.
pub fn kto_loss(config: &KtoConfig, batch: &KtoBatch<'_>) -> Result<KtoOutput> {
    config.validate()?;
    check_kto_batch(batch)?;
    let kl = match config.loss_type {
        KtoLossType::ApoZeroUnpaired => KlSource::Zero,
        KtoLossType::Kto => match batch.kl {
            None => return Err(HaloError::MissingKlPairs { loss_type: "kto" }),
            Some(KlInput::LogProbs { policy, reference }) => {
                check_len("kl_reference_logps", policy.len(), reference.len())?;
                check_finite("kl_policy_logps", policy)?;
                check_finite("kl_reference_logps", reference)?;
                if policy.is_empty() {
                    return Err(HaloError::EmptyBatch("kl pairs"));
                }
                KlSource::Pairs { policy, reference }
            }
            Some(KlInput::Partial(partial)) => {
                partial.z0()?; // the CPU op's errors: empty or non-finite partial
                KlSource::Sum {
                    sum: partial.sum as f32,
                    count: partial.count as f32,
                }
            }
        },
    };
    let loss = match config.loss_type {
        KtoLossType::Kto => KtoKernelLoss::Kto,
        KtoLossType::ApoZeroUnpaired => KtoKernelLoss::ApoZeroUnpaired,
    };
    let kernel_config = KtoKernelConfig {
        loss,
        beta: config.beta as f32,
        desirable_weight: config.desirable_weight as f32,
        undesirable_weight: config.undesirable_weight as f32,
    };
    let raw = kto_loss_kernel(
        batch.policy_logps,
        batch.reference_logps,
        batch.is_desirable,
        kl,
        kernel_config,
    )?;
    if !raw.loss.is_finite() || raw.grad_policy.iter().any(|g| !g.is_finite()) {
        return Err(HaloError::NonFinite {
            what: "kto loss or gradient",
            row: 0,
        });
    }
    Ok(KtoOutput {
        loss: raw.loss as f64,
        metrics: kto_metrics(raw.z0 as f64, &raw.out),
        grad_policy_logps: raw.grad_policy,
        z0: raw.z0 as f64,
    })
}

/// Emulated [`crate::losses::dpo_loss`]: same arguments, validation and output type (the kernel
/// computes in f32, the CPU loss in f64).
pub fn dpo_loss(config: &DpoConfig, batch: &PairBatch<'_>) -> Result<PairLossOutput> {
    config.validate()?;
    let n = check_pair_batch(batch)?;
    let loss = match config.loss_type {
        DpoLossType::Sigmoid => DpoKernelLoss::Sigmoid,
        DpoLossType::Robust => DpoKernelLoss::Robust,
        DpoLossType::Hinge => DpoKernelLoss::Hinge,
        DpoLossType::Ipo => DpoKernelLoss::Ipo,
        DpoLossType::ApoZero => DpoKernelLoss::ApoZero,
    };
    let counts = match (batch.chosen_counts, batch.rejected_counts) {
        (Some(c), Some(r)) => Some((c, r)),
        _ => None,
    };
    if loss == DpoKernelLoss::Ipo {
        ipo_checked_counts(batch)?;
    }
    let pairs = DpoPairs {
        policy_chosen: batch.policy_chosen_logps,
        policy_rejected: batch.policy_rejected_logps,
        reference_chosen: batch.reference_chosen_logps,
        reference_rejected: batch.reference_rejected_logps,
        counts,
    };
    let raw = dpo_loss_kernel(
        pairs,
        loss,
        config.beta as f32,
        config.label_smoothing as f32,
    )?;
    if !raw.loss.is_finite()
        || raw
            .grad_chosen
            .iter()
            .chain(&raw.grad_rejected)
            .any(|g| !g.is_finite())
    {
        return Err(HaloError::NonFinite {
            what: "dpo loss or gradient",
            row: 0,
        });
    }
    Ok(PairLossOutput {
        loss: raw.loss as f64,
        metrics: dpo_metrics(n, &raw.out),
        grad_chosen: raw.grad_chosen,
        grad_rejected: raw.grad_rejected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::{dpo_loss as cpu_dpo_loss, DpoLossType};

    /// The emulated loss runs the CPU loss's own batch checks, so even combined faults give the
    /// CPU's error: IPO with a zero chosen count AND no rejected counts is `MissingArgument`
    /// (presence of both lists is checked before their values).
    #[test]
    fn ipo_count_errors_come_in_the_cpu_order() {
        let v = [-5.0f32, -6.0];
        let config = DpoConfig {
            loss_type: DpoLossType::Ipo,
            ..DpoConfig::default()
        };
        let batch = PairBatch {
            policy_chosen_logps: &v,
            policy_rejected_logps: &v,
            reference_chosen_logps: &v,
            reference_rejected_logps: &v,
            chosen_counts: Some(&[3, 0]),
            rejected_counts: None,
        };
        let want = cpu_dpo_loss(&config, &batch).unwrap_err();
        assert!(
            matches!(
                want,
                HaloError::MissingArgument {
                    what: "rejected_counts",
                    ..
                }
            ),
            "{want:?}"
        );
        assert_eq!(dpo_loss(&config, &batch).unwrap_err(), want);
    }
}
