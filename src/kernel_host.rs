//! The host side of the kernel ABI of the CUDA backend (on a real or the emulated device): building
//! the parameter structs of [`crate::kernel_abi`] from the CPU ops' and losses' arguments, and
//! turning what a kernel wrote (status word, loss output slots) into the CPU op's error or output.
//! Both backends call these, so they cannot drift from each other.

use crate::cpu::token_logprobs_backward::RowFault;
use crate::cpu::{LogRatioClamp, SequenceLayout};
use crate::dtype::DType;
use crate::error::Result;
use crate::kernel_abi::{
    dpo_out, kto_out, token_rows_per_block, HaloClampParams, HaloDpoParams, HaloSeqParams,
    HaloTokenParams, DPO_F_ALPHA, DPO_F_FORWARD_KL, DPO_F_JS_DIVERGENCE, DPO_F_REVERSE_KL,
    DPO_LOSS_AOT, DPO_LOSS_AOT_UNPAIRED, DPO_LOSS_APO_DOWN, DPO_LOSS_APO_ZERO, DPO_LOSS_BCO_PAIR,
    DPO_LOSS_DISCOPOP, DPO_LOSS_EXO_PAIR, DPO_LOSS_HINGE, DPO_LOSS_IPO, DPO_LOSS_NCA_PAIR,
    DPO_LOSS_ROBUST, DPO_LOSS_SFT, DPO_LOSS_SIGMOID, DPO_LOSS_SIGMOID_NORM, DPO_LOSS_SPPO_HARD,
    KTO_LOSS_APO_ZERO_UNPAIRED, KTO_LOSS_KTO, STATUS_BAD_LABEL, STATUS_BWD_INCONSISTENT_LSE,
    STATUS_BWD_NONFINITE_LOGITS, STATUS_BWD_OVERFLOW, STATUS_LEN, STATUS_NONFINITE,
    STATUS_NONFINITE_GRAD, STATUS_OK,
};
use crate::losses::f_divergence::ALPHA_REVERSE_KL_WITHIN;
use crate::losses::{DpoConfig, DpoLossType, FDivergence, KtoLossType, LossMetrics};
use crate::validate::label_out_of_range;
use crate::HaloError;

/// The row a kernel reported in status slot `slot`, or `None` for "no error".
pub(crate) fn status_row(status: &[i32; STATUS_LEN], slot: usize) -> Option<usize> {
    let v = status[slot];
    (v != STATUS_OK).then_some(v.max(0) as usize)
}

/// The CPU op's error for a token kernel's status, in the CPU op's order of checks: a bad label
/// first (its value fetched by `label_at(row)`), then `nonfinite_what` (`"logits"` in the forward,
/// `"lse"` in the backward), then `grad_logp`.
pub(crate) fn token_status_error(
    status: &[i32; STATUS_LEN],
    label_at: impl FnOnce(usize) -> Result<i32>,
    vocab: usize,
    ignore_index: i32,
    nonfinite_what: &'static str,
) -> Result<()> {
    if let Some(row) = status_row(status, STATUS_BAD_LABEL) {
        let label = label_at(row)?;
        return Err(label_out_of_range(row, label, vocab, ignore_index));
    }
    if let Some(row) = status_row(status, STATUS_NONFINITE) {
        return Err(HaloError::NonFinite {
            what: nonfinite_what,
            row,
        });
    }
    if let Some(row) = status_row(status, STATUS_NONFINITE_GRAD) {
        return Err(HaloError::NonFinite {
            what: "grad_logp",
            row,
        });
    }
    Ok(())
}

/// The CPU backward's error for the backward kernel's status: [`token_status_error`] (labels, then
/// a non-finite lse, then grad_logp), then the faults found while writing — the smallest row over
/// their three slots, ties in [`RowFault`] order (a kernel row reports only its first fault, as a
/// CPU row does), so both backends name the same row and fault. `lse_at(row)` fetches the lse.
pub(crate) fn backward_status_error(
    status: &[i32; STATUS_LEN],
    label_at: impl FnOnce(usize) -> Result<i32>,
    lse_at: impl FnOnce(usize) -> Result<f32>,
    vocab: usize,
    ignore_index: i32,
    dtype: DType,
) -> Result<()> {
    token_status_error(status, label_at, vocab, ignore_index, "lse")?;
    let first = [
        (STATUS_BWD_NONFINITE_LOGITS, RowFault::NonFiniteLogits),
        (STATUS_BWD_INCONSISTENT_LSE, RowFault::InconsistentLse),
        (STATUS_BWD_OVERFLOW, RowFault::Overflow),
    ]
    .into_iter()
    .filter_map(|(slot, fault)| status_row(status, slot).map(|row| (row, fault)))
    .min();
    match first {
        Some((row, fault)) => Err(fault.error(row, lse_at(row)?, dtype)),
        None => Ok(()),
    }
}

/// Parameters of the token kernels for a validated `[rows, vocab]` shape.
pub(crate) fn token_params(rows: usize, vocab: usize, ignore_index: i32) -> HaloTokenParams {
    HaloTokenParams {
        rows: rows as i64,
        vocab: vocab as i64,
        ignore_index,
        rows_per_block: token_rows_per_block(vocab),
    }
}

/// Parameters of `humanline_grad_mask_f32` over `n` tokens.
pub(crate) fn clamp_params(n: usize, clamp: LogRatioClamp) -> HaloClampParams {
    HaloClampParams {
        n: n as i64,
        clamp_min: clamp.min,
        clamp_max: clamp.max,
    }
}

/// Parameters of the sequence kernels for a validated `layout` of `batch` sequences (`seq` is
/// read only by the padded entry points; clamp bounds only when `use_clamp`).
pub(crate) fn seq_params(
    batch: usize,
    layout: &SequenceLayout<'_>,
    ignore_index: i32,
    clamp: Option<LogRatioClamp>,
) -> HaloSeqParams {
    let seq = match *layout {
        SequenceLayout::Padded { seq, .. } => seq as i64,
        SequenceLayout::Packed { .. } => 0,
    };
    HaloSeqParams {
        batch: batch as i64,
        seq,
        ignore_index,
        use_clamp: clamp.is_some() as i32,
        clamp_min: clamp.map_or(0.0, |c| c.min),
        clamp_max: clamp.map_or(0.0, |c| c.max),
    }
}

/// `HaloKtoParams.loss_type` for a KTO loss type.
pub(crate) fn kto_loss_code(loss_type: KtoLossType) -> i32 {
    match loss_type {
        KtoLossType::Kto => KTO_LOSS_KTO,
        KtoLossType::ApoZeroUnpaired => KTO_LOSS_APO_ZERO_UNPAIRED,
    }
}

/// `HaloDpoParams.loss_type` for a DPO-family loss type.
pub(crate) fn dpo_loss_code(loss_type: DpoLossType) -> i32 {
    match loss_type {
        DpoLossType::Sigmoid => DPO_LOSS_SIGMOID,
        DpoLossType::Robust => DPO_LOSS_ROBUST,
        DpoLossType::Hinge => DPO_LOSS_HINGE,
        DpoLossType::Ipo => DPO_LOSS_IPO,
        DpoLossType::ApoZero => DPO_LOSS_APO_ZERO,
        DpoLossType::ApoDown => DPO_LOSS_APO_DOWN,
        DpoLossType::ExoPair => DPO_LOSS_EXO_PAIR,
        DpoLossType::NcaPair => DPO_LOSS_NCA_PAIR,
        DpoLossType::BcoPair => DPO_LOSS_BCO_PAIR,
        DpoLossType::SppoHard => DPO_LOSS_SPPO_HARD,
        DpoLossType::Aot => DPO_LOSS_AOT,
        DpoLossType::AotUnpaired => DPO_LOSS_AOT_UNPAIRED,
        DpoLossType::Discopop => DPO_LOSS_DISCOPOP,
        DpoLossType::Sft => DPO_LOSS_SFT,
        DpoLossType::SigmoidNorm => DPO_LOSS_SIGMOID_NORM,
    }
}

/// `dpo_loss_f32`'s parameters for `pairs` pairs under a validated `config`: ε only for the loss
/// types that use it and τ only for DiscoPOP (the CPU ignores both, unvalidated, elsewhere).
pub(crate) fn dpo_params(config: &DpoConfig, pairs: i32) -> HaloDpoParams {
    HaloDpoParams {
        pairs,
        loss_type: dpo_loss_code(config.loss_type),
        beta: config.beta as f32,
        label_smoothing: match config.loss_type {
            DpoLossType::Sigmoid
            | DpoLossType::Robust
            | DpoLossType::ExoPair
            | DpoLossType::Aot
            | DpoLossType::AotUnpaired => config.label_smoothing as f32,
            _ => 0.0,
        },
        discopop_tau: match config.loss_type {
            DpoLossType::Discopop => config.discopop_tau as f32,
            _ => 0.0,
        },
        f_divergence: match config.f_divergence {
            FDivergence::ReverseKl => DPO_F_REVERSE_KL,
            FDivergence::ForwardKl => DPO_F_FORWARD_KL,
            FDivergence::JsDivergence => DPO_F_JS_DIVERGENCE,
            // The CPU's limit test, in f64: α within 1e-6 of 1 is reverse KL.
            FDivergence::Alpha { coef } if (coef - 1.0).abs() < ALPHA_REVERSE_KL_WITHIN => {
                DPO_F_REVERSE_KL
            }
            FDivergence::Alpha { .. } => DPO_F_ALPHA,
        },
        f_alpha: match config.f_divergence {
            FDivergence::Alpha { coef } => coef as f32,
            _ => 0.0,
        },
        _pad: 0,
    }
}

/// TRL's KTO metrics from the kernel's output slots (means per class, `None` for an absent
/// class), with `z0` the reference point reported as `kl`.
pub(crate) fn kto_metrics(z0: f64, out: &[f32]) -> LossMetrics {
    let chosen = out[kto_out::CHOSEN_COUNT] as f64;
    let rejected = out[kto_out::REJECTED_COUNT] as f64;
    let mean = |sum: usize, count: f64| (count > 0.0).then(|| out[sum] as f64 / count);
    let rewards_chosen = mean(kto_out::CHOSEN_REWARD_SUM, chosen);
    let rewards_rejected = mean(kto_out::REJECTED_REWARD_SUM, rejected);
    LossMetrics {
        rewards_chosen,
        rewards_rejected,
        rewards_margins: rewards_chosen.zip(rewards_rejected).map(|(c, r)| c - r),
        logps_chosen: mean(kto_out::CHOSEN_LOGP_SUM, chosen),
        logps_rejected: mean(kto_out::REJECTED_LOGP_SUM, rejected),
        kl: Some(z0),
        chosen_count: chosen as u64,
        rejected_count: rejected as u64,
        ..LossMetrics::default()
    }
}

/// TRL's pair metrics (means over the `n` pairs) from the DPO kernel's output slots.
pub(crate) fn dpo_metrics(n: usize, out: &[f32]) -> LossMetrics {
    let n_f = n as f64;
    let mean = |slot: usize| Some(out[slot] as f64 / n_f);
    LossMetrics {
        rewards_chosen: mean(dpo_out::CHOSEN_REWARD_SUM),
        rewards_rejected: mean(dpo_out::REJECTED_REWARD_SUM),
        rewards_margins: mean(dpo_out::MARGIN_SUM),
        rewards_accuracies: mean(dpo_out::ACCURACY_COUNT),
        logps_chosen: mean(dpo_out::CHOSEN_LOGP_SUM),
        logps_rejected: mean(dpo_out::REJECTED_LOGP_SUM),
        chosen_count: n as u64,
        rejected_count: n as u64,
        ..LossMetrics::default()
    }
}
