//! The KTO and DPO-family losses on every device (CPU; CUDA, real or emulated) against f64
//! references of TRL's formulas (`KTOTrainer.kto_loss`, `DPOTrainer.dpo_loss`): losses against
//! `losses::reference`, gradients against central finite differences of that reference, metrics
//! recomputed in f64 from their TRL definitions, and errors against the `HaloError` the CPU loss
//! documents (the CUDA wrappers report the CPU's errors in the CPU's order).

mod device_support;

use device_support::*;
use halo_kernels::losses::reference::{central_difference, dpo_loss_ref, kto_loss_ref, kto_z0_ref};
use halo_kernels::losses::{
    DpoConfig, DpoLossType, KlInput, KtoBatch, KtoConfig, KtoLossType, KtoOutput, LossMetrics,
    PairBatch, PairLossOutput, ReferencePointPartial,
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

fn trl_name(loss: DpoLossType) -> &'static str {
    loss.name()
}

struct Pairs {
    pc: Vec<f32>,
    pr: Vec<f32>,
    rc: Vec<f32>,
    rr: Vec<f32>,
    nc: Vec<u32>,
    nr: Vec<u32>,
}

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

/// One DPO-family case: loss, both gradients (every pair) by central differences, metrics.
fn check_dpo<D: Device>(d: &D, seed: u64, n: usize, config: DpoConfig, with_counts: bool) {
    let x = random_pairs(seed, n);
    let ctx = format!("{}: {config:?} n {n} counts {with_counts}", d.name());
    let got: PairLossOutput = d
        .dpo_loss(
            &config,
            &PairBatch {
                policy_chosen_logps: &x.pc,
                policy_rejected_logps: &x.pr,
                reference_chosen_logps: &x.rc,
                reference_rejected_logps: &x.rr,
                chosen_counts: with_counts.then_some(&x.nc[..]),
                rejected_counts: with_counts.then_some(&x.nr[..]),
            },
        )
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let (pc, pr, rc, rr) = (f64s(&x.pc), f64s(&x.pr), f64s(&x.rc), f64s(&x.rr));
    let loss_ref = |pc: &[f64], pr: &[f64]| {
        dpo_loss_ref(
            trl_name(config.loss_type),
            config.beta,
            config.label_smoothing,
            pc,
            pr,
            &rc,
            &rr,
            &x.nc,
            &x.nr,
        )
    };
    close(&format!("loss ({ctx})"), got.loss, loss_ref(&pc, &pr), 1e-5);

    let h = 1e-3;
    assert_eq!(got.grad_chosen.len(), n, "grad_chosen length ({ctx})");
    assert_eq!(got.grad_rejected.len(), n, "grad_rejected length ({ctx})");
    for (side, grad) in [
        ("chosen", &got.grad_chosen),
        ("rejected", &got.grad_rejected),
    ] {
        let along = |v: &[f64]| {
            if side == "chosen" {
                loss_ref(v, &pr)
            } else {
                loss_ref(&pc, v)
            }
        };
        let at = if side == "chosen" { &pc } else { &pr };
        for i in 0..n {
            let fd = central_difference(along, at, i, h);
            // Hinge has a kink: skip the rare pair within h of it (non-zero second difference).
            if config.loss_type == DpoLossType::Hinge {
                let (mut plus, mut minus) = (at.clone(), at.clone());
                plus[i] += h;
                minus[i] -= h;
                if (along(&plus) - 2.0 * along(at) + along(&minus)).abs() > 1e-12 {
                    continue;
                }
            }
            let g = grad[i] as f64;
            assert!(
                (g - fd).abs() <= 2e-5 * fd.abs() + 1e-8,
                "grad_{side}[{i}] {g} vs fd {fd} ({ctx})"
            );
        }
    }

    let want = pair_metrics_ref(config.beta, &pc, &pr, &rc, &rr);
    check_metrics(&ctx, &got.metrics, &want, 1e-5);
    // The accuracy is a count of pairs: exact, not merely close.
    let acc = got.metrics.rewards_accuracies.unwrap() * n as f64;
    let want_acc = want.rewards_accuracies.unwrap() * n as f64;
    assert!(
        (acc - want_acc).abs() < 1e-6,
        "accuracy count {acc} vs {want_acc} ({ctx})"
    );
}

fn dpo_family_matches_the_f64_reference<D: Device>(d: &D) {
    let types = [
        DpoLossType::Sigmoid,
        DpoLossType::Robust,
        DpoLossType::Hinge,
        DpoLossType::Ipo,
        DpoLossType::ApoZero,
    ];
    for (k, &loss_type) in types.iter().enumerate() {
        // (pairs, β, label smoothing, counts given): label smoothing is used by sigmoid (cDPO,
        // up to 1) and robust (below 0.5) and ignored by the others; counts are read by IPO only.
        for (j, &(n, beta, label_smoothing, with_counts)) in [
            (1, 0.1, 0.0, true),
            (33, 0.1, 0.1, loss_type == DpoLossType::Ipo),
            (1000, 0.5, 0.2, true),
            (257, 0.05, 0.0, true),
            (300, 0.25, 0.1, true),
            (64, 0.1, 0.7, true),
        ]
        .iter()
        .enumerate()
        {
            if loss_type == DpoLossType::Robust && label_smoothing >= 0.5 {
                continue;
            }
            let config = DpoConfig {
                beta,
                label_smoothing,
                loss_type,
                ..DpoConfig::default()
            };
            check_dpo(d, 1000 + (k * 10 + j) as u64, n, config, with_counts);
        }
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
        assert_eq!(dpo_err(d, &ipo, &b), want, "{dev}: {b:?}");
    }
    // The other losses do not read the counts: zeros are fine.
    let b = batch(&[3, 4, 0], &[2, 0, 1]);
    for loss_type in [
        DpoLossType::Sigmoid,
        DpoLossType::Robust,
        DpoLossType::Hinge,
        DpoLossType::ApoZero,
    ] {
        let config = DpoConfig { loss_type, ..ipo };
        let got = d
            .dpo_loss(&config, &b)
            .unwrap_or_else(|e| panic!("{dev}: {loss_type:?} with zero counts: {e}"));
        let want = dpo_loss_ref(
            trl_name(loss_type),
            config.beta,
            config.label_smoothing,
            &f64s(b.policy_chosen_logps),
            &f64s(b.policy_rejected_logps),
            &f64s(&v),
            &f64s(&v),
            &[1, 1, 1],
            &[1, 1, 1],
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
    // Label smoothing is accepted up to 1 by sigmoid (cDPO) and ignored (unvalidated) by hinge,
    // IPO and apo_zero.
    let counts = PairBatch {
        chosen_counts: Some(&[3, 2]),
        rejected_counts: Some(&[1, 4]),
        policy_rejected_logps: &[-4.0, -8.0],
        ..ok
    };
    for (loss_type, label_smoothing) in [
        (DpoLossType::Sigmoid, 1.0),
        (DpoLossType::Hinge, 0.7),
        (DpoLossType::Ipo, 3.0),
        (DpoLossType::ApoZero, -1.0),
    ] {
        let config = DpoConfig {
            beta: 0.1,
            label_smoothing,
            loss_type,
            ..DpoConfig::default()
        };
        let got = d
            .dpo_loss(&config, &counts)
            .unwrap_or_else(|e| panic!("{dev}: {config:?}: {e}"));
        let want = dpo_loss_ref(
            trl_name(loss_type),
            0.1,
            label_smoothing,
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

device_tests!(
    kto_matches_the_f64_reference,
    kto_reference_point_is_the_clamped_kl_mean,
    kto_errors_are_the_cpus,
    dpo_family_matches_the_f64_reference,
    dpo_ipo_count_faults_in_the_cpus_order,
    dpo_errors_are_the_cpus,
);
