//! The KTO and DPO-family losses on every device (CPU; CUDA, real or emulated) against f64
//! references of TRL's formulas (`KTOTrainer.kto_loss`, `DPOTrainer.dpo_loss`): losses against
//! `losses::reference`, gradients against central finite differences of that reference, metrics
//! recomputed in f64 from their TRL definitions, and errors against the `HaloError` the CPU loss
//! documents (the CUDA wrappers report the CPU's errors in the CPU's order).

mod device_support;

use device_support::*;
use halo_kernels::losses::reference::{
    central_difference, chosen_nll_ref, dpo_loss_ref_f_divergence, kto_loss_ref, kto_z0_ref,
};
use halo_kernels::losses::{
    DpoConfig, DpoLossType, FDivergence, KlInput, KtoBatch, KtoConfig, KtoLossType, KtoOutput,
    LossMetrics, PairBatch, PairLossOutput, ReferencePointPartial,
};
use halo_kernels::HaloError;
use rand::Rng;

// ---- shared helpers ---------------------------------------------------------------------------

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `|got − want| ≤ rel · (1 + |want|)`.
fn close(what: &str, got: f64, want: f64, rel: f64) {
    assert!(
        (got - want).abs() <= rel * (1.0 + want.abs()),
        "{what}: got {got}, want {want} (|diff| {})",
        (got - want).abs()
    );
}

/// Mean in f64, `None` for no value (TRL logs nothing for an absent class).
fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0u64), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Same counts, the same TRL names present, values within `rel`.
fn check_metrics(ctx: &str, got: &LossMetrics, want: &LossMetrics, rel: f64) {
    assert_eq!(got.chosen_count, want.chosen_count, "chosen_count ({ctx})");
    assert_eq!(
        got.rejected_count, want.rejected_count,
        "rejected_count ({ctx})"
    );
    let (g, w) = (got.to_named(), want.to_named());
    assert_eq!(
        g.iter().map(|m| m.0).collect::<Vec<_>>(),
        w.iter().map(|m| m.0).collect::<Vec<_>>(),
        "metric names ({ctx})"
    );
    for ((name, a), (_, b)) in g.iter().zip(&w) {
        close(&format!("{name} ({ctx})"), *a, *b, rel);
    }
}

fn kto_err<D: Device>(d: &D, config: &KtoConfig, batch: &KtoBatch<'_>) -> HaloError {
    match d.kto_loss(config, batch) {
        Ok(out) => panic!(
            "{}: expected an error for {config:?} {batch:?}, got loss {}",
            d.name(),
            out.loss
        ),
        Err(e) => e,
    }
}

fn dpo_err<D: Device>(d: &D, config: &DpoConfig, batch: &PairBatch<'_>) -> HaloError {
    match d.dpo_loss(config, batch) {
        Ok(out) => panic!(
            "{}: expected an error for {config:?} {batch:?}, got loss {}",
            d.name(),
            out.loss
        ),
        Err(e) => e,
    }
}

// ---- KTO --------------------------------------------------------------------------------------

/// The f64 KTO loss of `config` at a fixed (detached) z0.
fn kto_ref(
    config: &KtoConfig,
    policy: &[f64],
    reference: &[f64],
    desirable: &[bool],
    z0: f64,
) -> f64 {
    kto_loss_ref(
        policy,
        reference,
        desirable,
        z0,
        config.beta,
        config.desirable_weight,
        config.undesirable_weight,
        config.loss_type == KtoLossType::ApoZeroUnpaired,
    )
}

/// TRL's KTO metrics in f64: rewards `β (π − ref)` and policy log-probs averaged per class,
/// `kl = z0`.
fn kto_metrics_ref(
    beta: f64,
    policy: &[f64],
    reference: &[f64],
    desirable: &[bool],
    z0: f64,
) -> LossMetrics {
    let class = |want: bool| (0..policy.len()).filter(move |&i| desirable[i] == want);
    let reward = |i: usize| beta * (policy[i] - reference[i]);
    let rewards_chosen = mean(class(true).map(reward));
    let rewards_rejected = mean(class(false).map(reward));
    LossMetrics {
        rewards_chosen,
        rewards_rejected,
        rewards_margins: rewards_chosen.zip(rewards_rejected).map(|(c, r)| c - r),
        logps_chosen: mean(class(true).map(|i| policy[i])),
        logps_rejected: mean(class(false).map(|i| policy[i])),
        kl: Some(z0),
        chosen_count: class(true).count() as u64,
        rejected_count: class(false).count() as u64,
        ..LossMetrics::default()
    }
}

/// Checks one KTO output against the f64 reference at `z0` (loss, z0, every gradient by central
/// differences with z0 held fixed, metrics).
#[allow(clippy::too_many_arguments)]
fn check_kto_output(
    ctx: &str,
    got: &KtoOutput,
    config: &KtoConfig,
    policy: &[f64],
    reference: &[f64],
    desirable: &[bool],
    z0: f64,
    want_grad: &[f64],
) {
    close(&format!("z0 ({ctx})"), got.z0, z0, 1e-5);
    let want = kto_ref(config, policy, reference, desirable, z0);
    close(&format!("loss ({ctx})"), got.loss, want, 2e-6);
    assert_eq!(
        got.grad_policy_logps.len(),
        policy.len(),
        "grad length ({ctx})"
    );
    for (i, (&g, &fd)) in got.grad_policy_logps.iter().zip(want_grad).enumerate() {
        let g = g as f64;
        assert!(
            (g - fd).abs() <= 1e-6 * fd.abs() + 1e-9,
            "grad[{i}] {g} vs fd {fd} ({ctx})"
        );
    }
    let metrics = kto_metrics_ref(config.beta, policy, reference, desirable, z0);
    check_metrics(ctx, &got.metrics, &metrics, 1e-5);
}

/// What a KTO case exercised, so the test can insist every branch was reached.
#[derive(Default)]
struct KtoCoverage {
    z0_positive: bool,
    z0_clamped: bool,
    all_desirable: bool,
    all_undesirable: bool,
}

/// One random KTO batch under `config`, through every KL input the loss type accepts: the KL pairs
/// as log-probs, as a hand-built `ReferencePointPartial`, and (APO-zero unpaired only) none.
fn check_kto<D: Device>(
    d: &D,
    seed: u64,
    batch: usize,
    desirable_fraction: f64,
    kl_pairs: usize,
    config: KtoConfig,
    seen: &mut KtoCoverage,
) {
    let mut r = rng(seed);
    let policy: Vec<f32> = (0..batch).map(|_| r.gen_range(-80.0f32..-5.0)).collect();
    let reference: Vec<f32> = policy
        .iter()
        .map(|p| p + r.gen_range(-6.0f32..6.0))
        .collect();
    let desirable: Vec<bool> = (0..batch).map(|_| r.gen_bool(desirable_fraction)).collect();
    let kl_policy: Vec<f32> = (0..kl_pairs).map(|_| r.gen_range(-80.0f32..-5.0)).collect();
    // Bias the KL pairs so z0 > 0 for even seeds and the mean is negative (z0 clamped to 0) for
    // odd ones.
    let bias = if seed.is_multiple_of(2) { 2.0 } else { -2.0 };
    let kl_reference: Vec<f32> = kl_policy
        .iter()
        .map(|p| p - bias + r.gen_range(-3.0f32..3.0))
        .collect();

    let (p64, r64) = (f64s(&policy), f64s(&reference));
    let (klp64, klr64) = (f64s(&kl_policy), f64s(&kl_reference));
    let kl_sum: f64 = klp64.iter().zip(&klr64).map(|(p, q)| p - q).sum();
    let apo = config.loss_type == KtoLossType::ApoZeroUnpaired;
    let z0 = if apo { 0.0 } else { kto_z0_ref(&klp64, &klr64) };
    if !apo {
        if kl_sum > 0.0 {
            seen.z0_positive = true;
        } else {
            seen.z0_clamped = true;
        }
    }
    seen.all_desirable |= desirable.iter().all(|&x| x);
    seen.all_undesirable |= desirable.iter().all(|&x| !x);

    // ∂L/∂policy_i by central differences of the f64 reference, z0 detached.
    let want_grad: Vec<f64> = (0..batch)
        .map(|i| central_difference(|p| kto_ref(&config, p, &r64, &desirable, z0), &p64, i, 1e-3))
        .collect();

    let partial = ReferencePointPartial {
        sum: kl_sum,
        count: kl_pairs as u64,
    };
    let mut kls = vec![
        Some(KlInput::LogProbs {
            policy: &kl_policy,
            reference: &kl_reference,
        }),
        Some(KlInput::Partial(partial)),
    ];
    if apo {
        kls.push(None); // apo_zero_unpaired has no reference point
    }
    for kl in kls {
        let ctx = format!(
            "{}: seed {seed} batch {batch} kl {kl_pairs} {config:?} {}",
            d.name(),
            match kl {
                Some(KlInput::LogProbs { .. }) => "log-probs",
                Some(KlInput::Partial(_)) => "partial",
                None => "none",
            }
        );
        let got = d
            .kto_loss(
                &config,
                &KtoBatch {
                    policy_logps: &policy,
                    reference_logps: &reference,
                    is_desirable: &desirable,
                    kl,
                },
            )
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        check_kto_output(&ctx, &got, &config, &p64, &r64, &desirable, z0, &want_grad);
    }
}

fn kto_matches_the_f64_reference<D: Device>(d: &D) {
    let kto = KtoConfig::default();
    let weighted = |beta: f64, desirable_weight: f64, undesirable_weight: f64| KtoConfig {
        beta,
        desirable_weight,
        undesirable_weight,
        ..kto
    };
    let apo = KtoConfig {
        loss_type: KtoLossType::ApoZeroUnpaired,
        ..kto
    };
    let mut seen = KtoCoverage::default();
    for &(seed, batch, desirable_fraction, kl_pairs, config) in &[
        (1, 1, 1.0, 1, kto), // batch of one, desirable
        (2, 1, 0.0, 3, kto), // batch of one, undesirable
        (3, 37, 0.5, 37, kto),
        (4, 3000, 0.3, 3000, kto),
        (5, 64, 1.0, 64, kto), // all desirable
        (6, 64, 0.0, 64, kto), // all undesirable
        (7, 300, 0.6, 1, weighted(0.5, 1.33, 0.7)),
        (10, 257, 0.4, 257, weighted(0.3, 1.5, 1.0)),
        (11, 1000, 1.0, 1000, kto),
        (13, 200, 0.5, 50, weighted(0.1, 0.0, 2.0)), // λ_D = 0: desirable examples give nothing
        (8, 500, 0.5, 20, apo),
        (9, 1, 0.0, 1, apo),
        (
            12,
            300,
            0.5,
            300,
            KtoConfig {
                beta: 0.3,
                undesirable_weight: 1.5,
                ..apo
            },
        ),
    ] {
        check_kto(
            d,
            seed,
            batch,
            desirable_fraction,
            kl_pairs,
            config,
            &mut seen,
        );
    }
    assert!(
        seen.z0_positive && seen.z0_clamped,
        "z0 both positive and clamped at 0"
    );
    assert!(
        seen.all_desirable && seen.all_undesirable,
        "single-class batches covered"
    );
}

/// z0 = max(0, mean KL log-ratio) from both KL inputs, on values whose mean is exact in f32.
fn kto_reference_point_is_the_clamped_kl_mean<D: Device>(d: &D) {
    let mut r = rng(20);
    let n = 50;
    let policy: Vec<f32> = (0..n).map(|_| r.gen_range(-50.0f32..-5.0)).collect();
    let reference: Vec<f32> = policy
        .iter()
        .map(|p| p + r.gen_range(-4.0f32..4.0))
        .collect();
    let desirable: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
    let (p64, r64) = (f64s(&policy), f64s(&reference));
    let config = KtoConfig::default();
    let kl_p = [-10.0f32, -12.0, -9.0, -20.0];
    let kl_r = [-11.0f32, -12.5, -11.0, -20.5]; // ratios 1, 0.5, 2, 0.5: mean exactly 1
    let kl_r_high = [-9.0f32, -11.0, -9.0, -19.0]; // ratios −1, −1, 0, −1: clamped to 0
    for (what, kl, z0) in [
        (
            "pairs, mean 1",
            KlInput::LogProbs {
                policy: &kl_p,
                reference: &kl_r,
            },
            1.0,
        ),
        (
            "partial 4 / 4",
            KlInput::Partial(ReferencePointPartial { sum: 4.0, count: 4 }),
            1.0,
        ),
        (
            "pairs, mean −0.75",
            KlInput::LogProbs {
                policy: &kl_p,
                reference: &kl_r_high,
            },
            0.0,
        ),
        (
            "partial −3 / 2",
            KlInput::Partial(ReferencePointPartial {
                sum: -3.0,
                count: 2,
            }),
            0.0,
        ),
    ] {
        let ctx = format!("{}: {what}", d.name());
        let got = d
            .kto_loss(
                &config,
                &KtoBatch {
                    policy_logps: &policy,
                    reference_logps: &reference,
                    is_desirable: &desirable,
                    kl: Some(kl),
                },
            )
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(got.z0, z0, "z0 ({ctx})");
        assert_eq!(got.metrics.kl, Some(z0), "kl metric ({ctx})");
        let want = kto_ref(&config, &p64, &r64, &desirable, z0);
        close(&format!("loss ({ctx})"), got.loss, want, 2e-6);
    }
}

fn kto_errors_are_the_cpus<D: Device>(d: &D) {
    let c = KtoConfig::default();
    let apo = KtoConfig {
        loss_type: KtoLossType::ApoZeroUnpaired,
        ..c
    };
    let p = [-3.0f32, -4.0];
    let pairs = KlInput::LogProbs {
        policy: &p,
        reference: &p,
    };
    let ok = KtoBatch {
        policy_logps: &p,
        reference_logps: &p,
        is_desirable: &[true, false],
        kl: Some(pairs),
    };
    let empty = KtoBatch {
        policy_logps: &[],
        reference_logps: &[],
        is_desirable: &[],
        kl: None,
    };
    let dev = d.name();
    let expect = |config: &KtoConfig, batch: KtoBatch<'_>, want: HaloError| {
        assert_eq!(
            kto_err(d, config, &batch),
            want,
            "{dev}: {config:?} {batch:?}"
        );
    };
    let non_finite = |what, row| HaloError::NonFinite { what, row };
    let length = |what, expected, got| HaloError::LengthMismatch {
        what,
        expected,
        got,
    };

    expect(&c, empty, HaloError::EmptyBatch("policy_logps"));
    expect(
        &c,
        KtoBatch {
            reference_logps: &p[..1],
            ..ok
        },
        length("reference_logps", 2, 1),
    );
    expect(
        &c,
        KtoBatch {
            is_desirable: &[true],
            ..ok
        },
        length("is_desirable", 2, 1),
    );
    // NaN / infinite log-probs, also where the KL input is missing or empty: the log-probs are
    // checked first.
    expect(
        &c,
        KtoBatch {
            reference_logps: &[f32::NAN, -1.0],
            ..ok
        },
        non_finite("reference_logps", 0),
    );
    expect(
        &c,
        KtoBatch {
            policy_logps: &[-1.0, f32::INFINITY],
            kl: None,
            ..ok
        },
        non_finite("policy_logps", 1),
    );
    expect(
        &c,
        KtoBatch {
            policy_logps: &[f32::NAN, -1.0],
            kl: Some(KlInput::LogProbs {
                policy: &[],
                reference: &[],
            }),
            ..ok
        },
        non_finite("policy_logps", 0),
    );
    expect(
        &c,
        KtoBatch {
            reference_logps: &[-1.0, f32::NEG_INFINITY],
            kl: Some(KlInput::Partial(ReferencePointPartial::empty())),
            ..ok
        },
        non_finite("reference_logps", 1),
    );
    expect(
        &apo,
        KtoBatch {
            policy_logps: &[f32::NAN, -1.0],
            kl: None,
            ..ok
        },
        non_finite("policy_logps", 0),
    );
    // Missing or empty KL pairs (kto only).
    expect(
        &c,
        KtoBatch { kl: None, ..ok },
        HaloError::MissingKlPairs { loss_type: "kto" },
    );
    expect(
        &c,
        KtoBatch {
            kl: Some(KlInput::LogProbs {
                policy: &[],
                reference: &[],
            }),
            ..ok
        },
        HaloError::EmptyBatch("kl pairs"),
    );
    expect(
        &c,
        KtoBatch {
            kl: Some(KlInput::Partial(ReferencePointPartial::empty())),
            ..ok
        },
        HaloError::EmptyBatch("kl pairs"),
    );
    expect(
        &c,
        KtoBatch {
            kl: Some(KlInput::LogProbs {
                policy: &p,
                reference: &p[..1],
            }),
            ..ok
        },
        length("kl_reference_logps", 2, 1),
    );
    expect(
        &c,
        KtoBatch {
            kl: Some(KlInput::LogProbs {
                policy: &[-1.0, f32::NAN],
                reference: &p,
            }),
            ..ok
        },
        non_finite("kl_policy_logps", 1),
    );
    expect(
        &c,
        KtoBatch {
            kl: Some(KlInput::LogProbs {
                policy: &p,
                reference: &[f32::INFINITY, -1.0],
            }),
            ..ok
        },
        non_finite("kl_reference_logps", 0),
    );
    expect(
        &c,
        KtoBatch {
            kl: Some(KlInput::Partial(ReferencePointPartial {
                sum: f64::NAN,
                count: 2,
            })),
            ..ok
        },
        non_finite("reference point partial sum", 0),
    );
    // Hyper-parameters are checked before anything else (here: an empty batch).
    for (config, param, bad) in [
        (KtoConfig { beta: 0.0, ..c }, "beta", 0.0),
        (KtoConfig { beta: -1.0, ..c }, "beta", -1.0),
        (
            KtoConfig {
                beta: f64::NAN,
                ..apo
            },
            "beta",
            f64::NAN,
        ),
        (
            KtoConfig {
                desirable_weight: -1.0,
                ..c
            },
            "desirable_weight",
            -1.0,
        ),
        (
            KtoConfig {
                undesirable_weight: f64::INFINITY,
                ..apo
            },
            "undesirable_weight",
            f64::INFINITY,
        ),
    ] {
        for batch in [ok, empty] {
            let e = kto_err(d, &config, &batch);
            assert!(
                matches!(e, HaloError::InvalidHyperParameter { name, value, .. }
                    if name == param && (value == bad || (value.is_nan() && bad.is_nan()))),
                "{dev}: {config:?} {batch:?}: {e:?}"
            );
        }
    }
    // apo_zero_unpaired ignores the KL input, even an empty one.
    for kl in [
        None,
        Some(KlInput::LogProbs {
            policy: &[],
            reference: &[],
        }),
        Some(KlInput::Partial(ReferencePointPartial::empty())),
    ] {
        let got = d
            .kto_loss(&apo, &KtoBatch { kl, ..ok })
            .unwrap_or_else(|e| panic!("{dev}: apo with {kl:?}: {e}"));
        let want = kto_ref(&apo, &f64s(&p), &f64s(&p), &[true, false], 0.0);
        close(
            &format!("{dev}: apo loss with {kl:?}"),
            got.loss,
            want,
            1e-6,
        );
        assert_eq!(got.z0, 0.0, "{dev}: apo z0");
    }
}

// ---- DPO family -------------------------------------------------------------------------------

struct Pairs {
    pc: Vec<f32>,
    pr: Vec<f32>,
    rc: Vec<f32>,
    rr: Vec<f32>,
    nc: Vec<u32>,
    nr: Vec<u32>,
}

impl Pairs {
    fn batch(&self, with_counts: bool) -> PairBatch<'_> {
        PairBatch {
            policy_chosen_logps: &self.pc,
            policy_rejected_logps: &self.pr,
            reference_chosen_logps: &self.rc,
            reference_rejected_logps: &self.rr,
            chosen_counts: with_counts.then_some(&self.nc[..]),
            rejected_counts: with_counts.then_some(&self.nr[..]),
        }
    }
}

/// Random pairs: log-probs in [−90, −5] (the reference within ±8 of the policy), counts in
/// 1..400 — never a zero.
fn random_pairs(seed: u64, n: usize) -> Pairs {
    let mut r = rng(seed);
    let pc: Vec<f32> = (0..n).map(|_| r.gen_range(-90.0f32..-5.0)).collect();
    let pr: Vec<f32> = (0..n).map(|_| r.gen_range(-90.0f32..-5.0)).collect();
    let rc = pc.iter().map(|p| p + r.gen_range(-8.0f32..8.0)).collect();
    let rr = pr.iter().map(|p| p + r.gen_range(-8.0f32..8.0)).collect();
    let nc = (0..n).map(|_| r.gen_range(1..400)).collect();
    let nr = (0..n).map(|_| r.gen_range(1..400)).collect();
    Pairs {
        pc,
        pr,
        rc,
        rr,
        nc,
        nr,
    }
}

/// TRL's pair metrics in f64: rewards `β (π − ref)` on the summed log-probs (IPO included),
/// margins, accuracies (chosen reward strictly above rejected), policy log-probs; no `kl`.
fn pair_metrics_ref(beta: f64, pc: &[f64], pr: &[f64], rc: &[f64], rr: &[f64]) -> LossMetrics {
    let n = pc.len();
    let chosen: Vec<f64> = (0..n).map(|i| beta * (pc[i] - rc[i])).collect();
    let rejected: Vec<f64> = (0..n).map(|i| beta * (pr[i] - rr[i])).collect();
    LossMetrics {
        rewards_chosen: mean(chosen.iter().copied()),
        rewards_rejected: mean(rejected.iter().copied()),
        rewards_margins: mean((0..n).map(|i| chosen[i] - rejected[i])),
        rewards_accuracies: mean((0..n).map(|i| (chosen[i] > rejected[i]) as u8 as f64)),
        logps_chosen: mean(pc.iter().copied()),
        logps_rejected: mean(pr.iter().copied()),
        chosen_count: n as u64,
        rejected_count: n as u64,
        ..LossMetrics::default()
    }
}

/// The f64 reference loss (TRL's formula, literally) of `config` at these log-probs.
fn dpo_ref(config: &DpoConfig, pc: &[f64], pr: &[f64], rc: &[f64], rr: &[f64], x: &Pairs) -> f64 {
    dpo_ref_counts(config, pc, pr, rc, rr, &x.nc, &x.nr)
}

/// The f64 reference loss of `config` (its loss type, β, ε, τ and f-divergence).
fn dpo_ref_counts(
    config: &DpoConfig,
    pc: &[f64],
    pr: &[f64],
    rc: &[f64],
    rr: &[f64],
    nc: &[u32],
    nr: &[u32],
) -> f64 {
    let alpha = match config.f_divergence {
        FDivergence::Alpha { coef } => coef,
        _ => 0.5,
    };
    dpo_loss_ref_f_divergence(
        config.loss_type.name(),
        config.beta,
        config.label_smoothing,
        config.discopop_tau,
        config.f_divergence.name(),
        alpha,
        pc,
        pr,
        rc,
        rr,
        nc,
        nr,
    )
}

/// `|got − want| ≤ 2e-5·|want| + 1e-8` for every gradient entry (f32 against f64).
fn check_grads(ctx: &str, side: &str, got: &[f32], want: &[f64], skip: impl Fn(usize) -> bool) {
    assert_eq!(got.len(), want.len(), "grad_{side} length ({ctx})");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if skip(i) {
            continue;
        }
        let g = g as f64;
        assert!(
            (g - w).abs() <= 2e-5 * w.abs() + 1e-8,
            "grad_{side}[{i}] {g} vs {w} ({ctx})"
        );
    }
}

/// Whether `keys[i]` lies within `gap` of another key: there a central difference of a sorted
/// (AOT) loss straddles a change of order.
fn near_another(keys: &[f64], i: usize, gap: f64) -> bool {
    keys.iter()
        .enumerate()
        .any(|(j, &k)| j != i && (k - keys[i]).abs() <= gap)
}

/// One DPO-family case: against the CPU loss (the definition: loss, both gradients, metrics), the
/// f64 reference of TRL's formula (loss), central differences of that reference (both
/// gradients, at up to 48 pairs per side) and TRL's metrics in f64.
fn check_dpo<D: Device>(d: &D, ctx: &str, x: &Pairs, config: DpoConfig, with_counts: bool) {
    let n = x.pc.len();
    let ctx = format!("{}: {config:?} n {n} counts {with_counts} {ctx}", d.name());
    let got: PairLossOutput = d
        .dpo_loss(&config, &x.batch(with_counts))
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let cpu = halo_kernels::losses::dpo_loss(&config, &x.batch(with_counts))
        .unwrap_or_else(|e| panic!("cpu: {ctx}: {e}"));
    let (pc, pr, rc, rr) = (f64s(&x.pc), f64s(&x.pr), f64s(&x.rc), f64s(&x.rr));
    let loss_ref = |pc: &[f64], pr: &[f64]| dpo_ref(&config, pc, pr, &rc, &rr, x);
    close(&format!("loss ({ctx})"), got.loss, loss_ref(&pc, &pr), 1e-5);
    close(&format!("loss vs cpu ({ctx})"), got.loss, cpu.loss, 1e-5);

    // Hinge's kink: a pair within rounding of it may fall on either side.
    let beta = config.beta;
    let at_kink = |i: usize| {
        config.loss_type == DpoLossType::Hinge
            && (1.0 - beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))).abs() < 1e-3
    };
    check_grads(
        &ctx,
        "chosen vs cpu",
        &got.grad_chosen,
        &f64s(&cpu.grad_chosen),
        at_kink,
    );
    check_grads(
        &ctx,
        "rejected vs cpu",
        &got.grad_rejected,
        &f64s(&cpu.grad_rejected),
        at_kink,
    );

    let h = 1e-3;
    // The key each side's log-prob moves in the AOT sorts (a difference near another key's is
    // skipped: there the sorted loss has a kink).
    let (chosen_keys, rejected_keys): (Vec<f64>, Vec<f64>) = match config.loss_type {
        DpoLossType::Aot => {
            let k: Vec<f64> = (0..n).map(|i| pc[i] - pr[i]).collect();
            (k.clone(), k)
        }
        DpoLossType::AotUnpaired => (
            (0..n).map(|i| pc[i] - rc[i]).collect(),
            (0..n).map(|i| pr[i] - rr[i]).collect(),
        ),
        _ => (Vec::new(), Vec::new()),
    };
    let step = n.div_ceil(48).max(1);
    for (side, grad, keys) in [
        ("chosen", &got.grad_chosen, &chosen_keys),
        ("rejected", &got.grad_rejected, &rejected_keys),
    ] {
        let along = |v: &[f64]| {
            if side == "chosen" {
                loss_ref(v, &pr)
            } else {
                loss_ref(&pc, v)
            }
        };
        let at = if side == "chosen" { &pc } else { &pr };
        for i in (0..n).step_by(step) {
            if at_kink(i) || (!keys.is_empty() && near_another(keys, i, 4.0 * h)) {
                continue;
            }
            let fd = central_difference(along, at, i, h);
            let g = grad[i] as f64;
            assert!(
                (g - fd).abs() <= 2e-5 * fd.abs() + 1e-8,
                "grad_{side}[{i}] {g} vs fd {fd} ({ctx})"
            );
        }
    }

    let want = pair_metrics_ref(beta, &pc, &pr, &rc, &rr);
    check_metrics(&ctx, &got.metrics, &want, 1e-5);
    check_metrics(&format!("vs cpu {ctx}"), &got.metrics, &cpu.metrics, 1e-5);
    // The accuracy is a count of pairs: exact, not merely close.
    let acc = got.metrics.rewards_accuracies.unwrap() * n as f64;
    let want_acc = want.rewards_accuracies.unwrap() * n as f64;
    assert!(
        (acc - want_acc).abs() < 1e-6,
        "accuracy count {acc} vs {want_acc} ({ctx})"
    );
}

/// A label smoothing in the domain of `loss_type`, the `k`-th of five (the types that ignore it
/// get one anyway: it must not matter).
fn label_smoothing_for(loss_type: DpoLossType, k: usize) -> f64 {
    match loss_type {
        DpoLossType::Robust => [0.0, 0.1, 0.2, 0.3, 0.45][k],
        // Small ε included: log ε is large, the loss and gradient stay finite.
        DpoLossType::ExoPair => [1e-3, 0.1, 1e-6, 0.5, 0.9][k],
        _ => [0.0, 0.1, 0.3, 0.7, 1.0][k],
    }
}

/// Every loss type at awkward sizes (one pair, a partial warp, past a block of 256 threads, past
/// a block's tile of the AOT sort several times), several β, ε and DiscoPOP τ.
fn dpo_family_matches_the_cpu_and_the_f64_reference<D: Device>(d: &D) {
    for (k, &loss_type) in DpoLossType::ALL.iter().enumerate() {
        for (j, &(n, beta, tau)) in [
            (1, 0.1, 0.05),
            (7, 0.5, 0.5),
            (129, 0.05, 1.0),
            (1500, 0.25, 2.0),
            (3000, 0.1, 0.05),
        ]
        .iter()
        .enumerate()
        {
            let config = DpoConfig {
                beta,
                label_smoothing: label_smoothing_for(loss_type, j),
                loss_type,
                discopop_tau: tau,
                ..DpoConfig::default()
            };
            let x = random_pairs(1000 + (k * 10 + j) as u64, n);
            check_dpo(d, "random", &x, config, true);
            if !loss_type.needs_counts() {
                check_dpo(d, "random", &x, config, false);
            }
        }
    }
}

/// AOT sorts with exact ties (log-probs on a coarse grid, ties across the sort's tiles of 256):
/// ties are broken by index as the CPU's stable sort, so each gradient lands on the CPU's pair;
/// and keys that tie only once rounded to f32 are told apart as the CPU's f64 keys are.
fn dpo_aot_ties_follow_the_cpus_order<D: Device>(d: &D) {
    // Five pairs by hand: policy differences 1, 1, 1, 1, 2 against reference ones 2, 2, −1, 4, 2;
    // chosen log-ratios 0, 0, 1, 0, −1 against rejected ones 1, 1, −1, 3, −1.
    let by_hand = Pairs {
        pc: vec![-40.0, -38.0, -40.0, -39.0, -38.0],
        pr: vec![-41.0, -39.0, -41.0, -40.0, -40.0],
        rc: vec![-40.0, -38.0, -41.0, -39.0, -37.0],
        rr: vec![-42.0, -40.0, -40.0, -43.0, -39.0],
        nc: vec![1; 5],
        nr: vec![1; 5],
    };
    let on_a_grid = |seed: u64, n: usize, grid: f32| {
        let mut r = rng(7000 + seed);
        let mut draw = |lo: i32, hi: i32| r.gen_range(lo..hi) as f32 * grid - 40.0;
        Pairs {
            pc: (0..n).map(|_| draw(-3, 3)).collect(),
            pr: (0..n).map(|_| draw(-3, 3)).collect(),
            rc: (0..n).map(|_| draw(-4, 4)).collect(),
            rr: (0..n).map(|_| draw(-4, 4)).collect(),
            nc: vec![1; n],
            nr: vec![1; n],
        }
    };
    // Two policy differences that tie in f32 (both round to −99.7) but not exactly: pair 1's
    // (−100 + 0.3f32) is below pair 0's (−100 + the next f32 above 0.3f32), so it sorts first;
    // the reference differences −98.7 / −101.7 give the two slots different gradients.
    let near_tie = Pairs {
        pc: vec![-100.0, -100.0],
        pr: vec![-f32::from_bits(0.3f32.to_bits() + 1), -0.3],
        rc: vec![-110.0, -110.0],
        rr: vec![-11.3, -8.3],
        nc: vec![1; 2],
        nr: vec![1; 2],
    };
    assert_eq!(
        near_tie.pc[0] - near_tie.pr[0],
        near_tie.pc[1] - near_tie.pr[1]
    );
    for (x, exact_ties) in [
        (by_hand, true),
        (on_a_grid(2, 40, 1.0), true),
        (on_a_grid(3, 600, 2.0), true),
        (on_a_grid(4, 1500, 4.0), true),
        (near_tie, false),
    ] {
        let n = x.pc.len();
        let has_ties =
            |key: &dyn Fn(usize) -> f32| (0..n).any(|i| (0..i).any(|j| key(i) == key(j)));
        if exact_ties {
            assert!(has_ties(&|i| x.pc[i] - x.pr[i]), "policy differences tie");
            assert!(has_ties(&|i| x.pc[i] - x.rc[i]), "chosen log-ratios tie");
            assert!(has_ties(&|i| x.pr[i] - x.rr[i]), "rejected log-ratios tie");
        }
        for loss_type in [DpoLossType::Aot, DpoLossType::AotUnpaired] {
            for label_smoothing in [0.0, 0.25] {
                let config = DpoConfig {
                    beta: 0.5,
                    label_smoothing,
                    loss_type,
                    ..DpoConfig::default()
                };
                let ctx = format!("{}: ties {config:?} n {n}", d.name());
                let got = d
                    .dpo_loss(&config, &x.batch(false))
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let cpu = halo_kernels::losses::dpo_loss(&config, &x.batch(false)).unwrap();
                close(&format!("loss ({ctx})"), got.loss, cpu.loss, 1e-5);
                let (pc, pr, rc, rr) = (f64s(&x.pc), f64s(&x.pr), f64s(&x.rc), f64s(&x.rr));
                close(
                    &format!("loss vs reference ({ctx})"),
                    got.loss,
                    dpo_ref(&config, &pc, &pr, &rc, &rr, &x),
                    1e-5,
                );
                let none = |_| false;
                check_grads(
                    &ctx,
                    "chosen",
                    &got.grad_chosen,
                    &f64s(&cpu.grad_chosen),
                    none,
                );
                check_grads(
                    &ctx,
                    "rejected",
                    &got.grad_rejected,
                    &f64s(&cpu.grad_rejected),
                    none,
                );
            }
        }
    }
}

/// SFT's token mean with zero-token chosen sequences (they count no token but their log-prob, 0
/// or not, still enters the sum), rejected counts optional.
fn dpo_sft_token_mean_with_empty_sequences<D: Device>(d: &D) {
    for (seed, n) in [(1u64, 1usize), (2, 7), (3, 300), (4, 3000)] {
        let mut x = random_pairs(8000 + seed, n);
        for i in (0..n).step_by(3) {
            x.nc[i] = 0;
        }
        if n == 1 {
            x.nc[0] = 5;
        }
        let config = DpoConfig {
            loss_type: DpoLossType::Sft,
            ..DpoConfig::default()
        };
        let want = chosen_nll_ref(&f64s(&x.pc), &x.nc);
        for rejected in [Some(&x.nr[..]), None] {
            let batch = PairBatch {
                rejected_counts: rejected,
                ..x.batch(true)
            };
            let ctx = format!("{}: sft n {n} rejected {}", d.name(), rejected.is_some());
            let got = d
                .dpo_loss(&config, &batch)
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            close(&format!("loss ({ctx})"), got.loss, want, 1e-5);
            let tokens: u64 = x.nc.iter().map(|&c| c as u64).sum();
            let grad = -1.0 / tokens as f64;
            check_grads(&ctx, "chosen", &got.grad_chosen, &vec![grad; n], |_| false);
            assert!(
                got.grad_rejected.iter().all(|&g| g == 0.0),
                "grad_rejected 0 ({ctx})"
            );
        }
    }
}

/// DiscoPOP far from 0: at βh ≈ −1000 with τ < 1 the loss is finite (≈ −logσ(βh) = 1000 per pair;
/// TRL's literal `e^{−x}·σ(x/τ)` would be inf · 0); with τ = 2 it truly overflows — the CPU's
/// error, also where only the f32 gradient overflows.
fn dpo_discopop_far_from_zero<D: Device>(d: &D) {
    let pairs = |h: f32| Pairs {
        // Pair 0: c = −h/2, r = h/2, so βh = −β·h; pair 1 an ordinary one.
        pc: vec![-100.0 - h / 2.0, -10.0],
        pr: vec![-100.0 + h / 2.0, -12.0],
        rc: vec![-100.0, -11.0],
        rr: vec![-100.0, -11.0],
        nc: vec![1, 1],
        nr: vec![1, 1],
    };
    let dev = d.name();
    for (tau, h, beta) in [
        (0.05, 1000.0f32, 1.0),
        (0.5, 1000.0, 1.0),
        (0.05, 6000.0, 0.2),
    ] {
        let config = DpoConfig {
            beta,
            loss_type: DpoLossType::Discopop,
            discopop_tau: tau,
            ..DpoConfig::default()
        };
        let x = pairs(h);
        let ctx = format!("{dev}: discopop {config:?} h −{h}");
        let got = d
            .dpo_loss(&config, &x.batch(false))
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let cpu = halo_kernels::losses::dpo_loss(&config, &x.batch(false)).unwrap();
        assert!(
            got.loss.is_finite() && got.loss > 400.0,
            "loss {} ({ctx})",
            got.loss
        );
        close(&format!("loss ({ctx})"), got.loss, cpu.loss, 1e-5);
        let none = |_| false;
        check_grads(
            &ctx,
            "chosen",
            &got.grad_chosen,
            &f64s(&cpu.grad_chosen),
            none,
        );
        check_grads(
            &ctx,
            "rejected",
            &got.grad_rejected,
            &f64s(&cpu.grad_rejected),
            none,
        );
    }
    // τ = 2: e^{−x}σ(x/τ) ≈ e^{−x/2}: e^{1000} overflows f64 (x = −2000), e^{150} only the f32
    // gradient (x = −300).
    for h in [2000.0f32, 300.0] {
        let config = DpoConfig {
            beta: 1.0,
            loss_type: DpoLossType::Discopop,
            discopop_tau: 2.0,
            ..DpoConfig::default()
        };
        let x = pairs(h);
        let want = halo_kernels::losses::dpo_loss(&config, &x.batch(false))
            .expect_err("the CPU overflows");
        assert!(matches!(want, HaloError::NonFinite { .. }), "cpu: {want:?}");
        assert_eq!(
            dpo_err(d, &config, &x.batch(false)),
            want,
            "{dev}: τ 2 h −{h}"
        );
    }
}

/// IPO's count faults, reported as the CPU checks them: every chosen count before any rejected
/// one (so a later chosen zero wins over an earlier rejected zero), and only for IPO.
fn dpo_ipo_count_faults_in_the_cpus_order<D: Device>(d: &D) {
    let v = [-5.0f32, -6.0, -7.0];
    let batch = |chosen: &'static [u32], rejected: &'static [u32]| PairBatch {
        policy_chosen_logps: &[-5.0, -6.0, -7.0],
        policy_rejected_logps: &[-5.5, -6.5, -9.0],
        reference_chosen_logps: &[-5.0, -6.0, -7.0],
        reference_rejected_logps: &[-5.0, -6.0, -7.0],
        chosen_counts: Some(chosen),
        rejected_counts: Some(rejected),
    };
    let ipo = DpoConfig {
        loss_type: DpoLossType::Ipo,
        ..DpoConfig::default()
    };
    let dev = d.name();
    let empty = |what, index| HaloError::EmptySequence { what, index };
    for (b, want) in [
        (batch(&[3, 4, 0], &[2, 0, 1]), empty("chosen_counts", 2)),
        (batch(&[0, 4, 0], &[0, 0, 1]), empty("chosen_counts", 0)),
        (batch(&[3, 4, 5], &[2, 0, 0]), empty("rejected_counts", 1)),
    ] {
        // IPO and sigmoid_norm both length-normalise.
        for loss_type in [DpoLossType::Ipo, DpoLossType::SigmoidNorm] {
            let config = DpoConfig { loss_type, ..ipo };
            assert_eq!(dpo_err(d, &config, &b), want, "{dev}: {loss_type:?} {b:?}");
        }
    }
    // The other losses do not read the counts (SFT only the chosen, summing them): zeros are
    // fine.
    let b = batch(&[3, 4, 0], &[2, 0, 1]);
    for loss_type in DpoLossType::ALL {
        if loss_type.length_normalised() {
            continue;
        }
        let config = DpoConfig {
            loss_type,
            label_smoothing: 0.1,
            ..ipo
        };
        let got = d
            .dpo_loss(&config, &b)
            .unwrap_or_else(|e| panic!("{dev}: {loss_type:?} with zero counts: {e}"));
        let unread = [1, 1, 1];
        let want = dpo_ref_counts(
            &config,
            &f64s(b.policy_chosen_logps),
            &f64s(b.policy_rejected_logps),
            &f64s(&v),
            &f64s(&v),
            if loss_type == DpoLossType::Sft {
                b.chosen_counts.unwrap()
            } else {
                &unread
            },
            &unread,
        );
        close(&format!("{dev}: {loss_type:?} loss"), got.loss, want, 1e-6);
    }
}

fn dpo_errors_are_the_cpus<D: Device>(d: &D) {
    let v = [-5.0f32, -6.0];
    let ok = PairBatch {
        policy_chosen_logps: &v,
        policy_rejected_logps: &v,
        reference_chosen_logps: &v,
        reference_rejected_logps: &v,
        chosen_counts: Some(&[3, 0]),
        rejected_counts: Some(&[0, 1]),
    };
    let sigmoid = DpoConfig::default();
    let ipo = DpoConfig {
        loss_type: DpoLossType::Ipo,
        ..sigmoid
    };
    let dev = d.name();
    let expect = |config: &DpoConfig, batch: PairBatch<'_>, want: HaloError| {
        assert_eq!(
            dpo_err(d, config, &batch),
            want,
            "{dev}: {config:?} {batch:?}"
        );
    };
    let non_finite = |what, row| HaloError::NonFinite { what, row };
    let length = |what, expected, got| HaloError::LengthMismatch {
        what,
        expected,
        got,
    };
    let missing = |e: HaloError, want: &str| {
        assert!(
            matches!(e, HaloError::MissingArgument { what, .. } if what == want),
            "{dev}: want MissingArgument({want}), got {e:?}"
        );
    };

    expect(
        &sigmoid,
        PairBatch {
            policy_chosen_logps: &[],
            policy_rejected_logps: &[],
            reference_chosen_logps: &[],
            reference_rejected_logps: &[],
            chosen_counts: None,
            rejected_counts: None,
        },
        HaloError::EmptyBatch("policy_chosen_logps"),
    );
    expect(
        &sigmoid,
        PairBatch {
            policy_rejected_logps: &v[..1],
            ..ok
        },
        length("policy_rejected_logps", 2, 1),
    );
    expect(
        &ipo,
        PairBatch {
            reference_rejected_logps: &[-1.0, -2.0, -3.0],
            ..ok
        },
        length("reference_rejected_logps", 2, 3),
    );
    expect(
        &sigmoid,
        PairBatch {
            chosen_counts: Some(&[1]),
            ..ok
        },
        length("chosen_counts", 2, 1),
    );
    // NaN / infinite log-probs come before every count check, IPO's included.
    expect(
        &sigmoid,
        PairBatch {
            policy_chosen_logps: &[f32::NAN, -1.0],
            ..ok
        },
        non_finite("policy_chosen_logps", 0),
    );
    expect(
        &ipo,
        PairBatch {
            reference_chosen_logps: &[-1.0, f32::INFINITY],
            ..ok
        },
        non_finite("reference_chosen_logps", 1),
    );
    expect(
        &ipo,
        PairBatch {
            policy_rejected_logps: &[-1.0, f32::NAN],
            chosen_counts: None,
            rejected_counts: None,
            ..ok
        },
        non_finite("policy_rejected_logps", 1),
    );
    expect(
        &sigmoid,
        PairBatch {
            reference_rejected_logps: &[f32::NEG_INFINITY, -1.0],
            rejected_counts: Some(&[1, 2, 3]),
            ..ok
        },
        non_finite("reference_rejected_logps", 0),
    );
    // IPO without counts, chosen reported first; then a zero count.
    missing(
        dpo_err(
            d,
            &ipo,
            &PairBatch {
                chosen_counts: None,
                ..ok
            },
        ),
        "chosen_counts",
    );
    missing(
        dpo_err(
            d,
            &ipo,
            &PairBatch {
                chosen_counts: None,
                rejected_counts: None,
                ..ok
            },
        ),
        "chosen_counts",
    );
    missing(
        dpo_err(
            d,
            &ipo,
            &PairBatch {
                chosen_counts: Some(&[1, 1]),
                rejected_counts: None,
                ..ok
            },
        ),
        "rejected_counts",
    );
    expect(
        &ipo,
        ok,
        HaloError::EmptySequence {
            what: "chosen_counts",
            index: 1,
        },
    );
    // Hyper-parameters, checked before the batch.
    for (config, param, bad) in [
        (
            DpoConfig {
                beta: 0.0,
                ..sigmoid
            },
            "beta",
            0.0,
        ),
        (
            DpoConfig {
                beta: f64::INFINITY,
                ..ipo
            },
            "beta",
            f64::INFINITY,
        ),
        (
            DpoConfig {
                label_smoothing: 0.5,
                loss_type: DpoLossType::Robust,
                ..sigmoid
            },
            "label_smoothing",
            0.5,
        ),
        (
            DpoConfig {
                label_smoothing: 1.01,
                ..sigmoid
            },
            "label_smoothing",
            1.01,
        ),
        (
            DpoConfig {
                label_smoothing: -0.1,
                ..sigmoid
            },
            "label_smoothing",
            -0.1,
        ),
    ] {
        let e = dpo_err(
            d,
            &config,
            &PairBatch {
                policy_chosen_logps: &[],
                ..ok
            },
        );
        assert!(
            matches!(e, HaloError::InvalidHyperParameter { name, value, .. }
                if name == param && value == bad),
            "{dev}: {config:?}: {e:?}"
        );
    }
    // Label smoothing is accepted up to 1 by sigmoid (cDPO) and AOT and ignored (unvalidated) by
    // the types that do not use it.
    let counts = PairBatch {
        chosen_counts: Some(&[3, 2]),
        rejected_counts: Some(&[1, 4]),
        policy_rejected_logps: &[-4.0, -8.0],
        ..ok
    };
    // So is DiscoPOP's τ by every other type (even a NaN).
    for (loss_type, label_smoothing, discopop_tau) in [
        (DpoLossType::Sigmoid, 1.0, f64::NAN),
        (DpoLossType::Aot, 1.0, -1.0),
        (DpoLossType::AotUnpaired, 0.0, 0.0),
        (DpoLossType::ExoPair, 0.2, f64::NAN),
        (DpoLossType::Hinge, 0.7, 0.05),
        (DpoLossType::Ipo, 3.0, 0.05),
        (DpoLossType::ApoZero, -1.0, 0.05),
        (DpoLossType::ApoDown, 5.0, 0.0),
        (DpoLossType::NcaPair, -2.0, 0.05),
        (DpoLossType::BcoPair, f64::NAN, 0.05),
        (DpoLossType::SppoHard, 7.0, -3.0),
        (DpoLossType::Discopop, -4.0, 0.3),
        (DpoLossType::Sft, 9.0, f64::INFINITY),
    ] {
        let config = DpoConfig {
            beta: 0.1,
            label_smoothing,
            loss_type,
            discopop_tau,
            ..DpoConfig::default()
        };
        let got = d
            .dpo_loss(&config, &counts)
            .unwrap_or_else(|e| panic!("{dev}: {config:?}: {e}"));
        let want = dpo_ref_counts(
            &config,
            &f64s(counts.policy_chosen_logps),
            &f64s(counts.policy_rejected_logps),
            &f64s(counts.reference_chosen_logps),
            &f64s(counts.reference_rejected_logps),
            &[3, 2],
            &[1, 4],
        );
        close(&format!("{dev}: {config:?} loss"), got.loss, want, 1e-6);
    }
}

/// Every loss type, every bad input: the device's error is the CPU loss's, exactly.
fn dpo_every_loss_types_errors_are_the_cpus<D: Device>(d: &D) {
    let dev = d.name();
    let v = [-5.0f32, -6.0];
    let w = [-4.0f32, -9.0];
    let ok = PairBatch {
        policy_chosen_logps: &v,
        policy_rejected_logps: &w,
        reference_chosen_logps: &w,
        reference_rejected_logps: &v,
        chosen_counts: Some(&[3, 1]),
        rejected_counts: Some(&[2, 4]),
    };
    let nan = [-1.0, f32::NAN];
    let inf = [f32::NEG_INFINITY, -1.0];
    let bad_batches = [
        PairBatch {
            policy_chosen_logps: &[],
            policy_rejected_logps: &[],
            reference_chosen_logps: &[],
            reference_rejected_logps: &[],
            chosen_counts: None,
            rejected_counts: None,
        },
        PairBatch {
            reference_chosen_logps: &v[..1],
            ..ok
        },
        PairBatch {
            rejected_counts: Some(&[1, 2, 3]),
            ..ok
        },
        PairBatch {
            policy_chosen_logps: &nan,
            ..ok
        },
        PairBatch {
            policy_rejected_logps: &inf,
            ..ok
        },
        PairBatch {
            reference_chosen_logps: &nan,
            ..ok
        },
        PairBatch {
            reference_rejected_logps: &nan,
            chosen_counts: None,
            ..ok
        },
        // Missing or empty counts (IPO, SFT), alone and behind a non-finite log-prob.
        PairBatch {
            chosen_counts: None,
            ..ok
        },
        PairBatch {
            rejected_counts: None,
            ..ok
        },
        PairBatch {
            chosen_counts: Some(&[0, 0]),
            ..ok
        },
        PairBatch {
            chosen_counts: Some(&[0, 0]),
            rejected_counts: None,
            policy_rejected_logps: &nan,
            ..ok
        },
        PairBatch {
            chosen_counts: Some(&[0, 0]),
            rejected_counts: Some(&[0, 0]),
            ..ok
        },
    ];
    for loss_type in DpoLossType::ALL {
        let base = DpoConfig {
            loss_type,
            label_smoothing: 0.1,
            ..DpoConfig::default()
        };
        let mut configs = vec![base];
        // Hyper-parameters outside their domain, each checked before the batch.
        configs.extend([0.0, -1.0, f64::NAN, f64::INFINITY].map(|beta| DpoConfig { beta, ..base }));
        configs.extend(
            [-0.1, 0.5, 1.0, 1.01, f64::NAN, 0.0].map(|label_smoothing| DpoConfig {
                label_smoothing,
                ..base
            }),
        );
        configs.extend(
            [0.0, -1.0, f64::NAN, f64::INFINITY].map(|discopop_tau| DpoConfig {
                discopop_tau,
                ..base
            }),
        );
        for config in &configs {
            for batch in bad_batches.iter().chain([&ok]) {
                let cpu = halo_kernels::losses::dpo_loss(config, batch);
                let got = d.dpo_loss(config, batch);
                match (cpu, got) {
                    // Compared as text: an error naming a NaN value is not `==` itself.
                    (Err(want), Err(e)) => assert_eq!(
                        format!("{e:?}"),
                        format!("{want:?}"),
                        "{dev}: {config:?} {batch:?}"
                    ),
                    (Ok(_), Ok(_)) => {}
                    (cpu, got) => panic!(
                        "{dev}: {config:?} {batch:?}: cpu {:?}, device {:?}",
                        cpu.map(|o| o.loss),
                        got.map(|o| o.loss)
                    ),
                }
            }
        }
    }
}

/// f-DPO: every loss type with an f-DPO form under each divergence (α on both sides of 1, and
/// within 1e-6 of it) matches the CPU and the f64 reference; the types without one are refused
/// with the CPU's error; α's clamped exponent (slope 0) agrees.
fn dpo_f_divergences_match_the_cpu<D: Device>(d: &D) {
    let divergences = [
        FDivergence::ForwardKl,
        FDivergence::JsDivergence,
        FDivergence::Alpha { coef: 0.5 },
        FDivergence::Alpha { coef: 1.7 },
        FDivergence::Alpha { coef: -0.4 },
        FDivergence::Alpha { coef: 1.0 + 1e-7 },
    ];
    for (k, &loss_type) in DpoLossType::ALL.iter().enumerate() {
        for (j, &f_divergence) in divergences.iter().enumerate() {
            let config = DpoConfig {
                beta: [0.1, 0.5, 0.05][j % 3],
                label_smoothing: label_smoothing_for(loss_type, j % 5),
                loss_type,
                f_divergence,
                ..DpoConfig::default()
            };
            for n in [1usize, 7, 300] {
                // Log-ratios within ±2: the f64 reference is literal, and e^{−u} or
                // e^{(α−1)u} of ±8 times β would overflow its exp.
                let mut x = random_pairs(5000 + (k * 100 + j * 10) as u64 + n as u64, n);
                for (r, p) in x.rc.iter_mut().zip(&x.pc).chain(x.rr.iter_mut().zip(&x.pr)) {
                    *r = p + (*r - p) * 0.25;
                }
                if f_divergence.supports(loss_type) {
                    check_dpo(d, "f-divergence", &x, config, true);
                } else {
                    let cpu = halo_kernels::losses::dpo_loss(&config, &x.batch(true)).unwrap_err();
                    assert!(matches!(cpu, HaloError::Unsupported(_)), "{cpu:?}");
                    let got = d.dpo_loss(&config, &x.batch(true)).unwrap_err();
                    assert_eq!(got, cpu, "{}: {config:?}", d.name());
                }
            }
        }
    }
    // α = 3 with log-ratios of ±50: (α − 1)u = 100 passes the clamp at 80 for the chosen side.
    let x = Pairs {
        pc: vec![-10.0, -20.0],
        pr: vec![-30.0, -25.0],
        rc: vec![-60.0, -21.0],
        rr: vec![-29.0, -24.0],
        nc: vec![3, 4],
        nr: vec![5, 6],
    };
    for loss_type in [
        DpoLossType::Sigmoid,
        DpoLossType::SigmoidNorm,
        DpoLossType::Hinge,
    ] {
        let config = DpoConfig {
            beta: 1e-34,
            loss_type,
            f_divergence: FDivergence::Alpha { coef: 3.0 },
            ..DpoConfig::default()
        };
        let got = d.dpo_loss(&config, &x.batch(true)).unwrap();
        let cpu = halo_kernels::losses::dpo_loss(&config, &x.batch(true)).unwrap();
        assert_eq!(
            got.grad_chosen[0],
            0.0,
            "{}: {loss_type:?}: clamped slope",
            d.name()
        );
        assert_eq!(cpu.grad_chosen[0], 0.0, "cpu {loss_type:?}: clamped slope");
        close(
            &format!("{}: {loss_type:?} clamp loss", d.name()),
            got.loss,
            cpu.loss,
            1e-5,
        );
        check_grads(
            &format!("{}: {loss_type:?} clamp", d.name()),
            "rejected vs cpu",
            &got.grad_rejected,
            &f64s(&cpu.grad_rejected),
            |_| false,
        );
    }
}

device_tests!(
    dpo_f_divergences_match_the_cpu,
    kto_matches_the_f64_reference,
    kto_reference_point_is_the_clamped_kl_mean,
    kto_errors_are_the_cpus,
    dpo_family_matches_the_cpu_and_the_f64_reference,
    dpo_aot_ties_follow_the_cpus_order,
    dpo_sft_token_mean_with_empty_sequences,
    dpo_discopop_far_from_zero,
    dpo_ipo_count_faults_in_the_cpus_order,
    dpo_errors_are_the_cpus,
    dpo_every_loss_types_errors_are_the_cpus,
);
