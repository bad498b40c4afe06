//! Golden fixtures from TRL's own loss code (`tests/fixtures/trl_losses.json`, written by
//! `scripts/conformance/make_fixtures.py`; TRL version in the fixture's `versions`):
//! - KTO: `KTOTrainer._compute_loss` (TRL ≥ 1.0 has no separate `kto_loss`), called with a fake
//!   `self` and a table "model" whose per-token log-probs sum to the given sequence log-probs;
//! - DPO family: `DPOTrainer._compute_loss`, likewise (sigmoid, robust, hinge, ipo, apo_zero);
//! - SimPO: `CPOTrainer.cpo_loss(loss_type="simpo")` + `cpo_alpha`·NLL;
//! - ORPO: `ORPOTrainer.odds_ratio_loss` + NLL (TRL computes it in float32; the fixture also holds
//!   the same formula in float64).
//!
//! Loss, per-example gradients (autograd w.r.t. the summed policy log-probs) and logged metrics
//! are compared. Our losses compute in f64 from the same f32 inputs, so losses agree to ~1e-12
//! relative; gradients are returned as f32 (relative 1e-6 = a few f32 ulps).
//!
//! Documented differences, checked as relationships rather than equality (see each test):
//! - KTO over several devices: TRL averages per-device KL means; ours takes the global mean of
//!   all KL pairs (`ReferencePointPartial`). Equal when every device holds as many pairs.
//! - DPO `sigmoid` with label smoothing: TRL ≥ 1.0 ignores `label_smoothing` for `sigmoid`;
//!   ours applies it (cDPO, as TRL < 1.0 did). Equal at ε = 0.
//! - DPO `ipo` metrics (an open mismatch): TRL ≥ 1.0 logs rewards and `logps/*` on the summed
//!   log-probs (the length normalisation is inside the loss only); ours, like TRL < 1.0 and like
//!   the DPO kernel pinned to the CPU loss by `tests/device_losses.rs`, reports the normalised
//!   values the loss saw. Loss and gradients agree.
//! - ORPO: TRL casts to float32 inside `odds_ratio_loss`; ours matches the float64 formula tightly
//!   and TRL's float32 result to float32 precision.

mod conformance_common;

use std::collections::BTreeMap;

use conformance_common::*;
use halo_kernels::cpu::{sequence_sums, token_logprobs, SequenceLayout};
use halo_kernels::losses::{
    dpo_loss, kto_loss, orpo_loss, simpo_loss, DpoConfig, DpoLossType, FDivergence, KlInput,
    KtoBatch, KtoConfig, KtoLossType, LossMetrics, OrpoConfig, PairBatch, PairLossOutput,
    ReferenceFreePairBatch, ReferencePointPartial, SimpoConfig,
};
use halo_kernels::step::{dpo_step, kto_step, KtoStepInputs, Logits, PairReference};
use halo_kernels::IGNORE_INDEX;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    versions: BTreeMap<String, Option<String>>,
    kto: Vec<KtoCase>,
    dpo: Vec<DpoCase>,
    simpo: Vec<SimpoCase>,
    orpo: Vec<OrpoCase>,
    end_to_end_cases: Vec<EndToEndCase>,
}

/// Logits → per-token log-probs → TRL loss → autograd gradient into the logits. Rows `0..n` are
/// the completions (KTO) or chosen (DPO); rows `n..2n` the KL completions or rejected.
#[derive(Deserialize)]
struct EndToEndCase {
    name: String,
    loss_type: String,
    beta: f64,
    n: usize,
    vocab: usize,
    positions: usize,
    #[serde(default)]
    is_desirable: Option<Vec<bool>>,
    logits: Vec<f64>,
    labels: Vec<i32>,
    reference_logps: Vec<f64>,
    loss: f64,
    grad_logits: Vec<f64>,
    metrics: BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct KtoCase {
    name: String,
    loss_type: String,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
    policy_logps: Vec<f64>,
    reference_logps: Vec<f64>,
    is_desirable: Vec<bool>,
    #[serde(default)]
    kl_policy_logps: Option<Vec<f64>>,
    #[serde(default)]
    kl_reference_logps: Option<Vec<f64>>,
    #[serde(default)]
    other_device_kl_mean: Option<f64>,
    loss: f64,
    grad_policy_logps: Vec<f64>,
    metrics: BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct DpoCase {
    name: String,
    loss_type: String,
    beta: f64,
    label_smoothing: f64,
    discopop_tau: f64,
    f_divergence: String,
    f_alpha_divergence_coef: f64,
    /// The dtype TRL computed in: "float64", or "float32" (its alpha-divergence has no float64
    /// branch), where its loss is a float32 value.
    dtype: String,
    policy_chosen_logps: Vec<f64>,
    policy_rejected_logps: Vec<f64>,
    reference_chosen_logps: Vec<f64>,
    reference_rejected_logps: Vec<f64>,
    chosen_counts: Vec<u32>,
    rejected_counts: Vec<u32>,
    loss: f64,
    grad_chosen: Vec<f64>,
    grad_rejected: Vec<f64>,
    metrics: BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct SimpoCase {
    name: String,
    beta: f64,
    simpo_gamma: f64,
    label_smoothing: f64,
    cpo_alpha: f64,
    policy_chosen_logps: Vec<f64>,
    policy_rejected_logps: Vec<f64>,
    chosen_counts: Vec<u32>,
    rejected_counts: Vec<u32>,
    loss: f64,
    grad_chosen: Vec<f64>,
    grad_rejected: Vec<f64>,
    nll_loss: f64,
    nll_loss_cross_entropy_f64_logits: Option<f64>,
    metrics: BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct OrpoCase {
    name: String,
    beta: f64,
    policy_chosen_logps: Vec<f64>,
    policy_rejected_logps: Vec<f64>,
    chosen_counts: Vec<u32>,
    rejected_counts: Vec<u32>,
    loss: f64,
    grad_chosen: Vec<f64>,
    grad_rejected: Vec<f64>,
    loss_f64: f64,
    grad_chosen_f64: Vec<f64>,
    grad_rejected_f64: Vec<f64>,
    nll_loss: f64,
    nll_loss_cross_entropy_f64_logits: Option<f64>,
    metrics: BTreeMap<String, f64>,
}

fn fixture() -> Fixture {
    let f: Fixture = load_fixture("trl_losses.json");
    assert!(
        f.versions.get("trl").and_then(|v| v.as_deref()).is_some(),
        "fixture does not record the TRL version"
    );
    f
}

/// f64 losses from the same f32 inputs: only summation order and libm differ.
const LOSS_RTOL: f64 = 1e-12;
/// f32 gradients: a few f32 ulps.
const GRAD_RTOL: f64 = 1e-6;
/// exo_pair's loss: TRL's ε is a float32 tensor (see `dpo_family_matches_trl_compute_loss`).
const EXO_LOSS_RTOL: f64 = 1e-6;
/// Cases TRL computed in float32 (loss and gradients).
const F32_RTOL: f64 = 2e-5;
/// Below f32's smallest normal a gradient may flush to 0 (TRL keeps e.g. 1e-100 in f64).
const GRAD_ATOL: f64 = 1e-37;
/// TRL computes some metrics in float32 (`.float()` before `.mean()` of accuracies).
const METRIC_RTOL: f64 = 1e-7;

fn grads(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&g| g as f64).collect()
}

/// Every metric TRL logged (that we define) must be present in ours and agree; metrics ours
/// reports must not be missing from TRL's log (metric presence is TRL's: e.g. no
/// `rewards/margins` in a one-class KTO batch).
fn check_metrics(
    what: &str,
    ours: &LossMetrics,
    theirs: &BTreeMap<String, f64>,
    rtol: f64,
    atol: f64,
) {
    let ours_named: BTreeMap<&str, f64> = ours.to_named().into_iter().collect();
    for (name, &value) in theirs {
        if name.ends_with("_trl_f32") {
            continue;
        }
        let ours_value = ours_named
            .get(name.as_str())
            .unwrap_or_else(|| panic!("{what}: TRL logs `{name}` = {value}, ours has none"));
        assert_scalar_close(
            &format!("{what} metric {name}"),
            *ours_value,
            value,
            rtol,
            atol,
        );
    }
    for name in ours_named.keys() {
        // nll_loss: ours always reports it; the fixture keeps TRL's NLL as a separate field.
        if *name != "nll_loss" {
            assert!(
                theirs.contains_key(*name),
                "{what}: ours reports `{name}`, TRL logs no such metric here"
            );
        }
    }
}

fn kto_config(case: &KtoCase) -> KtoConfig {
    KtoConfig {
        beta: case.beta,
        desirable_weight: case.desirable_weight,
        undesirable_weight: case.undesirable_weight,
        loss_type: match case.loss_type.as_str() {
            "kto" => KtoLossType::Kto,
            "apo_zero_unpaired" => KtoLossType::ApoZeroUnpaired,
            other => panic!("unknown KTO loss type {other}"),
        },
    }
}

#[test]
fn kto_matches_trl_compute_loss() {
    let f = fixture();
    let mut checked = 0;
    for case in f.kto.iter().filter(|c| c.other_device_kl_mean.is_none()) {
        let policy = to_f32(&case.policy_logps);
        let reference = to_f32(&case.reference_logps);
        let kl_policy = case.kl_policy_logps.as_deref().map(to_f32);
        let kl_reference = case.kl_reference_logps.as_deref().map(to_f32);
        let kl = match (&kl_policy, &kl_reference) {
            (Some(p), Some(r)) => Some(KlInput::LogProbs {
                policy: p,
                reference: r,
            }),
            _ => None,
        };
        let out = kto_loss(
            &kto_config(case),
            &KtoBatch {
                policy_logps: &policy,
                reference_logps: &reference,
                is_desirable: &case.is_desirable,
                kl,
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let name = &case.name;
        let e = assert_scalar_close(&format!("{name} loss"), out.loss, case.loss, LOSS_RTOL, 0.0);
        let g = assert_close(
            &format!("{name} grad"),
            &grads(&out.grad_policy_logps),
            &case.grad_policy_logps,
            GRAD_RTOL,
            |_| GRAD_ATOL,
        );
        assert_scalar_close(
            &format!("{name} z0"),
            out.z0,
            case.metrics["kl"],
            LOSS_RTOL,
            1e-12,
        );
        check_metrics(name, &out.metrics, &case.metrics, METRIC_RTOL, 1e-12);
        eprintln!(
            "kto {name}: loss rel err {:.1e}, grad max rel err {:.1e}",
            e.rel, g.rel
        );
        checked += 1;
    }
    assert!(checked >= 8);
}

/// TRL on two processes: `gather_for_metrics(kl).mean().clamp(min=0)`, the mean of the
/// per-process mean log-ratios. Ours all-reduces `(sum, count)`: the same number when both
/// processes hold equally many KL pairs, the exact global mean otherwise.
#[test]
fn kto_multi_device_reference_point_relationship() {
    let f = fixture();
    let case = f
        .kto
        .iter()
        .find(|c| c.other_device_kl_mean.is_some())
        .expect("fixture has a two-device KTO case");
    let other_mean = case.other_device_kl_mean.unwrap();
    let policy = to_f32(&case.policy_logps);
    let reference = to_f32(&case.reference_logps);
    let local = ReferencePointPartial::from_kl_logps(
        &to_f32(case.kl_policy_logps.as_ref().unwrap()),
        &to_f32(case.kl_reference_logps.as_ref().unwrap()),
    )
    .unwrap();
    let run = |partial: ReferencePointPartial| {
        kto_loss(
            &kto_config(case),
            &KtoBatch {
                policy_logps: &policy,
                reference_logps: &reference,
                is_desirable: &case.is_desirable,
                kl: Some(KlInput::Partial(partial)),
            },
        )
        .unwrap()
    };
    // The other process holds as many pairs as this one: all-reduced partial == TRL.
    let same_count = ReferencePointPartial {
        sum: other_mean * local.count as f64,
        count: local.count,
    };
    let out = run(local.merge(same_count).unwrap());
    assert_scalar_close("two devices z0", out.z0, case.metrics["kl"], 1e-12, 1e-12);
    assert_scalar_close("two devices loss", out.loss, case.loss, LOSS_RTOL, 0.0);
    assert_close(
        "two devices grad",
        &grads(&out.grad_policy_logps),
        &case.grad_policy_logps,
        GRAD_RTOL,
        |_| GRAD_ATOL,
    );
    // Twice as many pairs there: TRL's mean of means is unchanged; ours is the global mean.
    let double_count = ReferencePointPartial {
        sum: other_mean * 2.0 * local.count as f64,
        count: 2 * local.count,
    };
    let out = run(local.merge(double_count).unwrap());
    let global = (local.sum + 2.0 * local.count as f64 * other_mean) / (3 * local.count) as f64;
    assert_scalar_close("global mean z0", out.z0, global.max(0.0), 1e-12, 1e-12);
    assert!(
        (out.z0 - case.metrics["kl"]).abs() > 1e-3,
        "unequal pair counts: ours (global mean) should differ from TRL's mean of means"
    );
}

fn f_divergence(case: &DpoCase) -> FDivergence {
    match case.f_divergence.as_str() {
        "reverse_kl" => FDivergence::ReverseKl,
        "forward_kl" => FDivergence::ForwardKl,
        "js_divergence" => FDivergence::JsDivergence,
        "alpha_divergence" => FDivergence::Alpha {
            coef: case.f_alpha_divergence_coef,
        },
        other => panic!("unknown f-divergence {other}"),
    }
}

fn dpo_type(name: &str) -> DpoLossType {
    DpoLossType::from_name(name).unwrap_or_else(|| panic!("unknown DPO loss type {name}"))
}

fn run_dpo(case: &DpoCase, label_smoothing: f64) -> PairLossOutput {
    let pc = to_f32(&case.policy_chosen_logps);
    let pr = to_f32(&case.policy_rejected_logps);
    let rc = to_f32(&case.reference_chosen_logps);
    let rr = to_f32(&case.reference_rejected_logps);
    dpo_loss(
        &DpoConfig {
            beta: case.beta,
            label_smoothing,
            loss_type: dpo_type(&case.loss_type),
            discopop_tau: case.discopop_tau,
            f_divergence: f_divergence(case),
        },
        &PairBatch {
            policy_chosen_logps: &pc,
            policy_rejected_logps: &pr,
            reference_chosen_logps: &rc,
            reference_rejected_logps: &rr,
            chosen_counts: Some(&case.chosen_counts),
            rejected_counts: Some(&case.rejected_counts),
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

fn check_pair_output(
    what: &str,
    out: &PairLossOutput,
    loss: f64,
    grad_chosen: &[f64],
    grad_rejected: &[f64],
    loss_rtol: f64,
    grad_rtol: f64,
) -> (MaxError, MaxError) {
    let e = assert_scalar_close(&format!("{what} loss"), out.loss, loss, loss_rtol, 0.0);
    let gc = assert_close(
        &format!("{what} grad_chosen"),
        &grads(&out.grad_chosen),
        grad_chosen,
        grad_rtol,
        |_| GRAD_ATOL,
    );
    let gr = assert_close(
        &format!("{what} grad_rejected"),
        &grads(&out.grad_rejected),
        grad_rejected,
        grad_rtol,
        |_| GRAD_ATOL,
    );
    let g = MaxError {
        abs: gc.abs.max(gr.abs),
        rel: gc.rel.max(gr.rel),
    };
    (e, g)
}

#[test]
fn dpo_family_matches_trl_compute_loss() {
    let f = fixture();
    let mut checked = 0;
    for case in &f.dpo {
        let name = &case.name;
        // TRL ≥ 1.0 ignores label_smoothing for "sigmoid": compare at ε = 0 (see below).
        let eps = if case.loss_type == "sigmoid" {
            0.0
        } else {
            case.label_smoothing
        };
        let out = run_dpo(case, eps);
        // TRL builds exo_pair's ε as a float32 tensor, so its log ε and log(1 − ε) carry f32
        // rounding (log 1e-3 to ~2e-7): the loss agrees to that, not to f64 precision.
        // The float32 cases are TRL's own float32 arithmetic against our float64.
        let loss_rtol = if case.dtype == "float32" {
            F32_RTOL
        } else if case.loss_type == "exo_pair" {
            EXO_LOSS_RTOL
        } else {
            LOSS_RTOL
        };
        let grad_rtol = if case.dtype == "float32" {
            F32_RTOL
        } else {
            GRAD_RTOL
        };
        let (e, g) = check_pair_output(
            name,
            &out,
            case.loss,
            &case.grad_chosen,
            &case.grad_rejected,
            loss_rtol,
            grad_rtol,
        );
        let metric_rtol = if case.dtype == "float32" {
            F32_RTOL
        } else {
            METRIC_RTOL
        };
        check_metrics(name, &out.metrics, &case.metrics, metric_rtol, 1e-12);
        eprintln!(
            "dpo {name}: loss rel err {:.1e}, grad max rel err {:.1e}",
            e.rel, g.rel
        );
        checked += 1;
    }
    assert!(checked >= 8);
    // Every loss type TRL has is in the fixture, and every f-divergence.
    for loss_type in DpoLossType::ALL {
        assert!(
            f.dpo.iter().any(|c| c.loss_type == loss_type.name()),
            "no TRL case for {}",
            loss_type.name()
        );
    }
    for name in ["forward_kl", "js_divergence", "alpha_divergence"] {
        assert!(f.dpo.iter().any(|c| c.f_divergence == name), "{name}");
    }
}

/// TRL ≥ 1.0's `sigmoid` loss is `−logσ(βΔ)` whatever `label_smoothing` is; ours applies the
/// conservative-DPO term (TRL < 1.0's behaviour) when ε > 0.
#[test]
fn dpo_sigmoid_label_smoothing_relationship() {
    let f = fixture();
    let case = f
        .dpo
        .iter()
        .find(|c| c.loss_type == "sigmoid" && c.label_smoothing > 0.0)
        .expect("fixture has a smoothed sigmoid case");
    let plain = run_dpo(case, 0.0);
    assert_scalar_close("eps=0 vs TRL", plain.loss, case.loss, LOSS_RTOL, 0.0);
    let smoothed = run_dpo(case, case.label_smoothing);
    assert!(
        (smoothed.loss - case.loss).abs() > 1e-3,
        "ours applies cDPO smoothing; TRL 1.x ignores it for sigmoid"
    );
}

#[test]
fn simpo_matches_trl_cpo_loss() {
    let f = fixture();
    assert!(f.simpo.len() >= 4);
    for case in &f.simpo {
        let pc = to_f32(&case.policy_chosen_logps);
        let pr = to_f32(&case.policy_rejected_logps);
        let out = simpo_loss(
            &SimpoConfig {
                beta: case.beta,
                gamma: case.simpo_gamma,
                label_smoothing: case.label_smoothing,
                nll_weight: case.cpo_alpha,
            },
            &ReferenceFreePairBatch {
                policy_chosen_logps: &pc,
                policy_rejected_logps: &pr,
                chosen_counts: &case.chosen_counts,
                rejected_counts: &case.rejected_counts,
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let name = &case.name;
        let (e, g) = check_pair_output(
            name,
            &out,
            case.loss,
            &case.grad_chosen,
            &case.grad_rejected,
            LOSS_RTOL,
            GRAD_RTOL,
        );
        let nll = out.metrics.nll_loss.expect("simpo reports nll_loss");
        assert_scalar_close(&format!("{name} nll"), nll, case.nll_loss, LOSS_RTOL, 0.0);
        if let Some(ce) = case.nll_loss_cross_entropy_f64_logits {
            // nn.CrossEntropyLoss on the f64 logits, before our inputs were rounded to f32.
            assert_scalar_close(
                &format!("{name} nll vs CrossEntropyLoss"),
                nll,
                ce,
                1e-6,
                0.0,
            );
        }
        check_metrics(name, &out.metrics, &case.metrics, METRIC_RTOL, 1e-12);
        eprintln!(
            "simpo {name}: loss rel err {:.1e}, grad max rel err {:.1e}",
            e.rel, g.rel
        );
    }
}

#[test]
fn orpo_matches_trl_odds_ratio_loss() {
    let f = fixture();
    assert!(f.orpo.len() >= 3);
    for case in &f.orpo {
        let pc = to_f32(&case.policy_chosen_logps);
        let pr = to_f32(&case.policy_rejected_logps);
        let out = orpo_loss(
            &OrpoConfig { beta: case.beta },
            &ReferenceFreePairBatch {
                policy_chosen_logps: &pc,
                policy_rejected_logps: &pr,
                chosen_counts: &case.chosen_counts,
                rejected_counts: &case.rejected_counts,
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let name = &case.name;
        // TRL's formula in float64: tight.
        let (e, g) = check_pair_output(
            &format!("{name} (f64 formula)"),
            &out,
            case.loss_f64,
            &case.grad_chosen_f64,
            &case.grad_rejected_f64,
            LOSS_RTOL,
            GRAD_RTOL,
        );
        // TRL as shipped (float32 inside odds_ratio_loss): float32 precision.
        let (e32, g32) = check_pair_output(
            &format!("{name} (TRL f32)"),
            &out,
            case.loss,
            &case.grad_chosen,
            &case.grad_rejected,
            1e-6,
            2e-5,
        );
        assert_scalar_close(
            &format!("{name} nll"),
            out.metrics.nll_loss.unwrap(),
            case.nll_loss,
            LOSS_RTOL,
            0.0,
        );
        if let Some(ce) = case.nll_loss_cross_entropy_f64_logits {
            assert_scalar_close(
                &format!("{name} nll vs CrossEntropyLoss"),
                out.metrics.nll_loss.unwrap(),
                ce,
                1e-6,
                0.0,
            );
        }
        // TRL computes ORPO rewards (and so margins) in float32 (`.float()` in
        // odds_ratio_loss): a margin of two ~1e0 rewards carries ~1e-7 absolute error.
        check_metrics(name, &out.metrics, &case.metrics, 1e-6, 1e-6);
        eprintln!(
            "orpo {name}: f64 loss rel {:.1e} grad rel {:.1e}; vs TRL f32 loss rel {:.1e} grad rel {:.1e}",
            e.rel, g.rel, e32.rel, g32.rel
        );
    }
}

/// The whole CPU step from logits (`step::kto_step` / `step::dpo_step`: token_logprobs →
/// sequence_sums → loss → broadcast_sequence_grad → token_logprobs_backward) against TRL's
/// `_compute_loss` on real logits with autograd into the logits. The sums are f32 here (TRL's are
/// f64), so the loss agrees to ~1e-7 relative.
#[test]
fn end_to_end_logit_gradients_match_trl() {
    let f = fixture();
    assert!(f.end_to_end_cases.len() >= 3);
    for case in &f.end_to_end_cases {
        let name = &case.name;
        let (n, vocab) = (case.n, case.vocab);
        let logits = to_f32(&case.logits);
        let reference = to_f32(&case.reference_logps);
        let (loss, metrics, grad) = if case.loss_type == "kto" {
            // Sequences 0..n are the examples, n..2n their KL pairs: the pairs' log-probs come
            // from a forward without gradient (detached, as in TRL), the step runs on 0..n.
            let half = n * case.positions;
            let (examples, kl_pairs) = logits.split_at(half * vocab);
            let (labels, kl_labels) = case.labels.split_at(half);
            let kl_layout = SequenceLayout::Padded {
                batch: n,
                seq: case.positions,
            };
            let kl_tokens = token_logprobs(kl_pairs, kl_labels, vocab, IGNORE_INDEX).unwrap();
            let kl_policy = sequence_sums(&kl_tokens.logp, kl_labels, IGNORE_INDEX, kl_layout)
                .unwrap()
                .sums;
            let out = kto_step(
                &KtoConfig {
                    beta: case.beta,
                    ..KtoConfig::default()
                },
                &Logits {
                    logits: examples,
                    labels,
                    vocab,
                    ignore_index: IGNORE_INDEX,
                    layout: SequenceLayout::Padded {
                        batch: n,
                        seq: case.positions,
                    },
                },
                &KtoStepInputs {
                    reference_logps: &reference[..n],
                    is_desirable: case.is_desirable.as_ref().unwrap(),
                    kl: Some(KlInput::LogProbs {
                        policy: &kl_policy,
                        reference: &reference[n..],
                    }),
                },
            )
            .unwrap();
            let mut grad = out.grad_logits;
            grad.extend(std::iter::repeat_n(0.0, kl_pairs.len()));
            (out.loss.loss, out.loss.metrics, grad)
        } else {
            let out = dpo_step(
                &DpoConfig {
                    beta: case.beta,
                    label_smoothing: 0.0,
                    loss_type: dpo_type(&case.loss_type),
                    ..DpoConfig::default()
                },
                &Logits {
                    logits: &logits,
                    labels: &case.labels,
                    vocab,
                    ignore_index: IGNORE_INDEX,
                    layout: SequenceLayout::Padded {
                        batch: 2 * n,
                        seq: case.positions,
                    },
                },
                &PairReference {
                    chosen_logps: &reference[..n],
                    rejected_logps: &reference[n..],
                },
            )
            .unwrap();
            (out.loss.loss, out.loss.metrics, out.grad_logits)
        };
        let e = assert_scalar_close(&format!("{name} loss"), loss, case.loss, 1e-6, 0.0);
        let scale = case.grad_logits.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        assert!(scale > 0.0, "{name}: zero gradient in the fixture");
        let g = assert_close(
            &format!("{name} grad_logits"),
            &grads(&grad),
            &case.grad_logits,
            1e-5,
            |_| 1e-6 * scale,
        );
        // Metrics from f32 sums: f32 precision. IPO metrics: see dpo_ipo_metrics_relationship.
        if case.loss_type != "ipo" {
            check_metrics(name, &metrics, &case.metrics, 1e-6, 1e-6);
        }
        eprintln!(
            "end-to-end {name}: loss rel err {:.1e}, max |Δ grad_logits| {:.1e} (max |g| {scale:.1e})",
            e.rel, g.abs
        );
    }
}
