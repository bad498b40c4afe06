//! The loss kernels (`kernels/kto_loss.cu`, `kernels/dpo_loss.cu`) under host emulation against f64
//! references of TRL's formulas (`KTOTrainer.kto_loss`, `DPOTrainer.dpo_loss`), with gradients
//! checked by central finite differences of the f64 reference.

mod emulated_support;

use emulated_support::*;
use halo_kernels::emulation::{
    self as emu, DpoKernelLoss, DpoPairs, KlSource, KtoKernelConfig, KtoKernelLoss,
};
use halo_kernels::kernel_abi::{dpo_out, kto_out};
use halo_kernels::HaloError;
use rand::Rng;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}
fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// f64 KTO loss (mean over the batch) for a given z0.
fn kto_reference(
    policy: &[f64],
    reference: &[f64],
    desirable: &[bool],
    z0: f64,
    c: &KtoKernelConfig,
) -> f64 {
    let beta = c.beta as f64;
    let z0 = if c.loss == KtoKernelLoss::Kto {
        z0
    } else {
        0.0
    };
    let total: f64 = (0..policy.len())
        .map(|i| {
            let r = policy[i] - reference[i];
            if desirable[i] {
                c.desirable_weight as f64 * (1.0 - sigmoid(beta * (r - z0)))
            } else {
                c.undesirable_weight as f64 * (1.0 - sigmoid(beta * (z0 - r)))
            }
        })
        .sum();
    total / policy.len() as f64
}

fn check_kto(
    seed: u64,
    batch: usize,
    desirable_fraction: f64,
    kl_pairs: usize,
    config: KtoKernelConfig,
) {
    let mut r = rng(seed);
    let policy: Vec<f32> = (0..batch).map(|_| r.gen_range(-80.0f32..-5.0)).collect();
    let reference: Vec<f32> = policy
        .iter()
        .map(|p| p + r.gen_range(-6.0f32..6.0))
        .collect();
    let desirable: Vec<bool> = (0..batch).map(|_| r.gen_bool(desirable_fraction)).collect();
    let kl_policy: Vec<f32> = (0..kl_pairs).map(|_| r.gen_range(-80.0f32..-5.0)).collect();
    // Bias the KL pairs upward so z0 > 0 in some cases and is clamped to 0 in others.
    let bias = if seed.is_multiple_of(2) { 2.0 } else { -2.0 };
    let kl_reference: Vec<f32> = kl_policy
        .iter()
        .map(|p| p - bias + r.gen_range(-3.0f32..3.0))
        .collect();
    let ctx = format!("batch {batch} kl {kl_pairs} {config:?}");

    let got = emu::kto_loss_kernel(
        &policy,
        &reference,
        &desirable,
        KlSource::Pairs {
            policy: &kl_policy,
            reference: &kl_reference,
        },
        config,
    )
    .unwrap();

    let kl_mean = kl_policy
        .iter()
        .zip(&kl_reference)
        .map(|(p, q)| (p - q) as f64)
        .sum::<f64>()
        / kl_pairs as f64;
    let z0 = if config.loss == KtoKernelLoss::Kto {
        kl_mean.max(0.0)
    } else {
        0.0
    };
    assert!(
        (got.z0 as f64 - z0).abs() <= 1e-5 * (1.0 + z0.abs()),
        "z0 {} vs {z0} ({ctx})",
        got.z0
    );

    let p64: Vec<f64> = policy.iter().map(|&x| x as f64).collect();
    let r64: Vec<f64> = reference.iter().map(|&x| x as f64).collect();
    let want = kto_reference(&p64, &r64, &desirable, z0, &config);
    assert!(
        (got.loss as f64 - want).abs() <= 2e-6 * (1.0 + want.abs()),
        "loss {} vs {want} ({ctx})",
        got.loss
    );

    // Gradients by central differences (z0 is detached: held fixed).
    for i in (0..batch).step_by((batch / 40).max(1)) {
        let h = 1e-3;
        let mut plus = p64.clone();
        plus[i] += h;
        let mut minus = p64.clone();
        minus[i] -= h;
        let fd = (kto_reference(&plus, &r64, &desirable, z0, &config)
            - kto_reference(&minus, &r64, &desirable, z0, &config))
            / (2.0 * h);
        let g = got.grad_policy[i] as f64;
        assert!(
            (g - fd).abs() <= 1e-6 * fd.abs() + 1e-9,
            "grad[{i}] {g} vs fd {fd} ({ctx})"
        );
    }
    assert!(
        got.grad_policy.iter().all(|g| g.is_finite()),
        "every gradient written ({ctx})"
    );

    // Metrics.
    let beta = config.beta as f64;
    let (mut cr, mut rr, mut cc, mut rc) = (0.0f64, 0.0f64, 0.0, 0.0);
    for i in 0..batch {
        let reward = beta * (p64[i] - r64[i]);
        if desirable[i] {
            cr += reward;
            cc += 1.0;
        } else {
            rr += reward;
            rc += 1.0;
        }
    }
    let out = &got.out;
    assert_eq!(out[kto_out::CHOSEN_COUNT] as f64, cc);
    assert_eq!(out[kto_out::REJECTED_COUNT] as f64, rc);
    assert!((out[kto_out::CHOSEN_REWARD_SUM] as f64 - cr).abs() < 1e-4 * (1.0 + cr.abs()));
    assert!((out[kto_out::REJECTED_REWARD_SUM] as f64 - rr).abs() < 1e-4 * (1.0 + rr.abs()));
    assert_eq!(out[kto_out::KL_COUNT] as usize, kl_pairs);
    assert!(
        out.iter().all(|x| x.is_finite()),
        "every output slot written ({ctx})"
    );
}

#[test]
fn kto_matches_the_f64_reference() {
    let kto = KtoKernelConfig::default();
    check_kto(1, 1, 1.0, 1, kto);
    check_kto(2, 1, 0.0, 3, kto);
    check_kto(3, 37, 0.5, 37, kto);
    check_kto(4, 3000, 0.3, 3000, kto);
    check_kto(5, 64, 1.0, 64, kto); // all desirable
    check_kto(6, 64, 0.0, 64, kto); // all undesirable
    check_kto(
        7,
        300,
        0.6,
        1,
        KtoKernelConfig {
            beta: 0.5,
            desirable_weight: 1.33,
            undesirable_weight: 0.7,
            ..kto
        },
    );
    let apo = KtoKernelConfig {
        loss: KtoKernelLoss::ApoZeroUnpaired,
        ..kto
    };
    check_kto(8, 500, 0.5, 20, apo);
    check_kto(9, 1, 0.0, 1, apo);
}

#[test]
fn kto_reference_point_sources_agree() {
    let mut r = rng(20);
    let batch = 50;
    let policy: Vec<f32> = (0..batch).map(|_| r.gen_range(-50.0f32..-5.0)).collect();
    let reference: Vec<f32> = policy
        .iter()
        .map(|p| p + r.gen_range(-4.0f32..4.0))
        .collect();
    let desirable: Vec<bool> = (0..batch).map(|i| i % 3 == 0).collect();
    let kl_p = vec![-10.0f32, -12.0, -9.0, -20.0];
    let kl_r = vec![-11.0f32, -12.5, -11.0, -20.5]; // mean ratio 1.0
    let c = KtoKernelConfig::default();
    let pairs = emu::kto_loss_kernel(
        &policy,
        &reference,
        &desirable,
        KlSource::Pairs {
            policy: &kl_p,
            reference: &kl_r,
        },
        c,
    )
    .unwrap();
    let sum = emu::kto_loss_kernel(
        &policy,
        &reference,
        &desirable,
        KlSource::Sum {
            sum: 4.0,
            count: 4.0,
        },
        c,
    )
    .unwrap();
    assert_eq!(pairs.z0, 1.0);
    assert_eq!(sum.z0, 1.0);
    assert_eq!(pairs.loss, sum.loss);
    assert_eq!(pairs.grad_policy, sum.grad_policy);
    // A negative mean is clamped to 0, which equals KlSource::Zero.
    let neg = emu::kto_loss_kernel(
        &policy,
        &reference,
        &desirable,
        KlSource::Sum {
            sum: -3.0,
            count: 2.0,
        },
        c,
    )
    .unwrap();
    let zero = emu::kto_loss_kernel(&policy, &reference, &desirable, KlSource::Zero, c).unwrap();
    assert_eq!(neg.z0, 0.0);
    assert_eq!(neg.loss, zero.loss);
    assert_eq!(neg.out[kto_out::KL_SUM], -3.0);
}

#[test]
fn kto_rejects_bad_arguments() {
    let c = KtoKernelConfig::default();
    let empty: [f32; 0] = [];
    assert_eq!(
        emu::kto_loss_kernel(&empty, &empty, &[], KlSource::Zero, c).unwrap_err(),
        HaloError::EmptyBatch("policy_logp")
    );
    assert!(matches!(
        emu::kto_loss_kernel(
            &[-1.0],
            &[-1.0],
            &[true],
            KlSource::Pairs {
                policy: &empty,
                reference: &empty
            },
            c
        ),
        Err(HaloError::MissingKlPairs { .. })
    ));
    assert!(matches!(
        emu::kto_loss_kernel(
            &[-1.0],
            &[-1.0],
            &[true],
            KlSource::Zero,
            KtoKernelConfig { beta: 0.0, ..c }
        ),
        Err(HaloError::InvalidHyperParameter { name: "beta", .. })
    ));
    assert!(matches!(
        emu::kto_loss_kernel(&[-1.0, -2.0], &[-1.0], &[true, false], KlSource::Zero, c),
        Err(HaloError::LengthMismatch { .. })
    ));
}

/// f64 DPO-family loss (mean over pairs), TRL `DPOTrainer.dpo_loss`.
#[allow(clippy::too_many_arguments)]
fn dpo_reference(
    pc: &[f64],
    pr: &[f64],
    rc: &[f64],
    rr: &[f64],
    counts: Option<(&[u32], &[u32])>,
    loss: DpoKernelLoss,
    beta: f64,
    eps: f64,
) -> f64 {
    let n = pc.len();
    let total: f64 = (0..n)
        .map(|i| {
            let (mut a, mut b, mut c, mut d) = (pc[i], pr[i], rc[i], rr[i]);
            if loss == DpoKernelLoss::Ipo {
                let (nc, nr) = counts.unwrap();
                a /= nc[i] as f64;
                c /= nc[i] as f64;
                b /= nr[i] as f64;
                d /= nr[i] as f64;
            }
            let h = (a - b) - (c - d);
            match loss {
                DpoKernelLoss::Sigmoid => {
                    -(1.0 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
                }
                DpoKernelLoss::Robust => {
                    (-(1.0 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h))
                        / (1.0 - 2.0 * eps)
                }
                DpoKernelLoss::Hinge => (1.0 - beta * h).max(0.0),
                DpoKernelLoss::Ipo => (h - 1.0 / (2.0 * beta)).powi(2),
                DpoKernelLoss::ApoZero => 1.0 - sigmoid(beta * (a - c)) + sigmoid(beta * (b - d)),
            }
        })
        .sum();
    total / n as f64
}

fn check_dpo(seed: u64, n: usize, loss: DpoKernelLoss, beta: f32, eps: f32) {
    let mut r = rng(seed);
    let pc: Vec<f32> = (0..n).map(|_| r.gen_range(-90.0f32..-5.0)).collect();
    let pr: Vec<f32> = (0..n).map(|_| r.gen_range(-90.0f32..-5.0)).collect();
    let rc: Vec<f32> = pc.iter().map(|p| p + r.gen_range(-8.0f32..8.0)).collect();
    let rr: Vec<f32> = pr.iter().map(|p| p + r.gen_range(-8.0f32..8.0)).collect();
    let nc: Vec<u32> = (0..n).map(|_| r.gen_range(1..400)).collect();
    let nr: Vec<u32> = (0..n).map(|_| r.gen_range(1..400)).collect();
    let ctx = format!("{loss:?} n {n} beta {beta} eps {eps}");
    let pairs = DpoPairs {
        policy_chosen: &pc,
        policy_rejected: &pr,
        reference_chosen: &rc,
        reference_rejected: &rr,
        counts: Some((&nc, &nr)),
    };
    let got = emu::dpo_loss_kernel(pairs, loss, beta, eps).unwrap();
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (pc64, pr64, rc64, rr64) = (f(&pc), f(&pr), f(&rc), f(&rr));
    let counts = Some((&nc[..], &nr[..]));
    let (b, e) = (beta as f64, eps as f64);
    let want = dpo_reference(&pc64, &pr64, &rc64, &rr64, counts, loss, b, e);
    assert!(
        (got.loss as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
        "loss {} vs {want} ({ctx})",
        got.loss
    );
    for i in (0..n).step_by((n / 30).max(1)) {
        let h = 1e-3;
        for (side, grad) in [(0, &got.grad_chosen), (1, &got.grad_rejected)] {
            let bump = |delta: f64| {
                let (mut a, mut c) = (pc64.clone(), pr64.clone());
                if side == 0 {
                    a[i] += delta;
                } else {
                    c[i] += delta;
                }
                dpo_reference(&a, &c, &rc64, &rr64, counts, loss, b, e)
            };
            let fd = (bump(h) - bump(-h)) / (2.0 * h);
            let g = grad[i] as f64;
            // Hinge has a kink: skip the rare pair within h of it.
            if loss == DpoKernelLoss::Hinge
                && (bump(h) - bump(0.0) - (bump(0.0) - bump(-h))).abs() > 1e-12
            {
                continue;
            }
            assert!(
                (g - fd).abs() <= 2e-5 * fd.abs() + 1e-8,
                "grad side {side} [{i}] {g} vs fd {fd} ({ctx})"
            );
        }
    }
    let beta64 = beta as f64;
    // Rewards (and so accuracy) are on the summed log-probs for every loss type, IPO included.
    let acc = (0..n)
        .filter(|&i| beta64 * (pc64[i] - rc64[i]) > beta64 * (pr64[i] - rr64[i]))
        .count();
    assert_eq!(
        got.out[dpo_out::ACCURACY_COUNT] as usize,
        acc,
        "accuracy ({ctx})"
    );
    assert!(
        got.out.iter().all(|x| x.is_finite()),
        "every output slot written ({ctx})"
    );
}

#[test]
fn dpo_family_matches_the_f64_reference() {
    let losses = [
        DpoKernelLoss::Sigmoid,
        DpoKernelLoss::Robust,
        DpoKernelLoss::Hinge,
        DpoKernelLoss::Ipo,
        DpoKernelLoss::ApoZero,
    ];
    for (k, &loss) in losses.iter().enumerate() {
        for (j, &(n, beta, eps)) in [
            (1, 0.1, 0.0),
            (33, 0.1, 0.1),
            (1000, 0.5, 0.2),
            (257, 0.05, 0.0),
        ]
        .iter()
        .enumerate()
        {
            let eps = if matches!(loss, DpoKernelLoss::Sigmoid | DpoKernelLoss::Robust) {
                eps
            } else {
                0.0
            };
            check_dpo(1000 + (k * 10 + j) as u64, n, loss, beta, eps);
        }
    }
}

#[test]
fn dpo_ipo_reports_empty_sequences() {
    let v = [-5.0f32, -6.0, -7.0];
    let pairs = DpoPairs {
        policy_chosen: &v,
        policy_rejected: &v,
        reference_chosen: &v,
        reference_rejected: &v,
        counts: Some((&[3, 4, 0], &[2, 0, 1])),
    };
    assert_eq!(
        emu::dpo_loss_kernel(pairs, DpoKernelLoss::Ipo, 0.1, 0.0).unwrap_err(),
        HaloError::EmptySequence {
            what: "dpo pairs (chosen or rejected completion)",
            index: 1
        }
    );
    // Counts are not read by the other losses.
    emu::dpo_loss_kernel(pairs, DpoKernelLoss::Sigmoid, 0.1, 0.0).unwrap();
    assert!(emu::dpo_loss_kernel(
        DpoPairs {
            counts: None,
            ..pairs
        },
        DpoKernelLoss::Ipo,
        0.1,
        0.0
    )
    .is_err());
    assert!(emu::dpo_loss_kernel(pairs, DpoKernelLoss::Robust, 0.1, 0.5).is_err());
}

// ---- against the CPU losses (`halo_kernels::losses`) through the mirrored API ----------------

use halo_kernels::losses::{
    self, DpoConfig, DpoLossType, KlInput, KtoBatch, KtoConfig, KtoLossType, LossMetrics,
    PairBatch, ReferencePointPartial,
};

fn close64(what: &str, got: f64, want: f64, rel: f64) {
    assert!(
        (got - want).abs() <= rel * (1.0 + want.abs()),
        "{what}: got {got}, want {want}"
    );
}

fn metrics_close(ctx: &str, got: &LossMetrics, want: &LossMetrics) {
    assert_eq!(got.chosen_count, want.chosen_count, "chosen_count ({ctx})");
    assert_eq!(
        got.rejected_count, want.rejected_count,
        "rejected_count ({ctx})"
    );
    let g = got.to_named();
    let w = want.to_named();
    assert_eq!(
        g.iter().map(|x| x.0).collect::<Vec<_>>(),
        w.iter().map(|x| x.0).collect::<Vec<_>>(),
        "metric names ({ctx})"
    );
    for ((name, a), (_, b)) in g.iter().zip(&w) {
        close64(&format!("metric {name} ({ctx})"), *a, *b, 1e-4);
    }
}

#[test]
fn kto_matches_the_cpu_loss() {
    let mut r = rng(500);
    for (case, &(n, frac, loss_type)) in [
        (1usize, 1.0f64, KtoLossType::Kto),
        (2, 0.0, KtoLossType::Kto),
        (257, 0.4, KtoLossType::Kto),
        (1000, 1.0, KtoLossType::Kto),
        (300, 0.5, KtoLossType::ApoZeroUnpaired),
    ]
    .iter()
    .enumerate()
    {
        let policy: Vec<f32> = (0..n).map(|_| r.gen_range(-60.0f32..-5.0)).collect();
        let reference: Vec<f32> = policy
            .iter()
            .map(|p| p + r.gen_range(-5.0f32..5.0))
            .collect();
        let desirable: Vec<bool> = (0..n).map(|_| r.gen_bool(frac)).collect();
        let kl_p: Vec<f32> = (0..n.max(2)).map(|_| r.gen_range(-60.0f32..-5.0)).collect();
        let kl_r: Vec<f32> = kl_p
            .iter()
            .map(|p| p - 1.0 + r.gen_range(-2.0f32..2.0))
            .collect();
        let config = KtoConfig {
            beta: [0.1, 0.3][case % 2],
            desirable_weight: [1.0, 1.5][case % 2],
            loss_type,
            ..KtoConfig::default()
        };
        for kl in [
            KlInput::LogProbs {
                policy: &kl_p,
                reference: &kl_r,
            },
            KlInput::Partial(ReferencePointPartial::from_kl_logps(&kl_p, &kl_r).unwrap()),
        ] {
            let batch = KtoBatch {
                policy_logps: &policy,
                reference_logps: &reference,
                is_desirable: &desirable,
                kl: Some(kl),
            };
            let ctx = format!("case {case} n {n} {loss_type:?} {kl:?}");
            let got = emu::kto_loss(&config, &batch).unwrap();
            let want = losses::kto_loss(&config, &batch).unwrap();
            close64(&format!("loss ({ctx})"), got.loss, want.loss, 1e-5);
            close64(&format!("z0 ({ctx})"), got.z0, want.z0, 1e-5);
            assert_close(
                &format!("grad ({ctx})"),
                &got.grad_policy_logps,
                &want.grad_policy_logps,
                1e-9,
                1e-4,
            );
            metrics_close(&ctx, &got.metrics, &want.metrics);
        }
    }
}

#[test]
fn kto_errors_match_the_cpu_loss() {
    let c = KtoConfig::default();
    let p = [-3.0f32, -4.0];
    let batches = [
        KtoBatch {
            policy_logps: &p,
            reference_logps: &p,
            is_desirable: &[true, false],
            kl: None,
        },
        KtoBatch {
            policy_logps: &[],
            reference_logps: &[],
            is_desirable: &[],
            kl: None,
        },
        KtoBatch {
            policy_logps: &p,
            reference_logps: &p[..1],
            is_desirable: &[true, false],
            kl: None,
        },
        KtoBatch {
            policy_logps: &p,
            reference_logps: &[f32::NAN, -1.0],
            is_desirable: &[true, false],
            kl: Some(KlInput::LogProbs {
                policy: &p,
                reference: &p,
            }),
        },
        KtoBatch {
            policy_logps: &p,
            reference_logps: &p,
            is_desirable: &[true, false],
            kl: Some(KlInput::LogProbs {
                policy: &[],
                reference: &[],
            }),
        },
        KtoBatch {
            policy_logps: &p,
            reference_logps: &p,
            is_desirable: &[true, false],
            kl: Some(KlInput::Partial(ReferencePointPartial::empty())),
        },
    ];
    for batch in &batches {
        assert_eq!(
            emu::kto_loss(&c, batch).unwrap_err(),
            losses::kto_loss(&c, batch).unwrap_err(),
            "{batch:?}"
        );
    }
    let bad = KtoConfig { beta: -1.0, ..c };
    assert_eq!(
        emu::kto_loss(&bad, &batches[0]).unwrap_err(),
        losses::kto_loss(&bad, &batches[0]).unwrap_err()
    );
}

#[test]
fn dpo_family_matches_the_cpu_loss() {
    let mut r = rng(600);
    let types = [
        DpoLossType::Sigmoid,
        DpoLossType::Robust,
        DpoLossType::Hinge,
        DpoLossType::Ipo,
        DpoLossType::ApoZero,
    ];
    for (k, &loss_type) in types.iter().enumerate() {
        for &(n, beta, eps) in &[(1usize, 0.1f64, 0.0f64), (300, 0.25, 0.1)] {
            let pc: Vec<f32> = (0..n).map(|_| r.gen_range(-90.0f32..-5.0)).collect();
            let pr: Vec<f32> = (0..n).map(|_| r.gen_range(-90.0f32..-5.0)).collect();
            let rc: Vec<f32> = pc.iter().map(|p| p + r.gen_range(-8.0f32..8.0)).collect();
            let rr: Vec<f32> = pr.iter().map(|p| p + r.gen_range(-8.0f32..8.0)).collect();
            let nc: Vec<u32> = (0..n).map(|_| r.gen_range(1..300)).collect();
            let nr: Vec<u32> = (0..n).map(|_| r.gen_range(1..300)).collect();
            let batch = PairBatch {
                policy_chosen_logps: &pc,
                policy_rejected_logps: &pr,
                reference_chosen_logps: &rc,
                reference_rejected_logps: &rr,
                chosen_counts: Some(&nc),
                rejected_counts: Some(&nr),
            };
            let config = DpoConfig {
                beta,
                label_smoothing: eps,
                loss_type,
            };
            let ctx = format!("{loss_type:?} n {n} beta {beta} eps {eps} ({k})");
            let got = emu::dpo_loss(&config, &batch).unwrap();
            let want = losses::dpo_loss(&config, &batch).unwrap();
            close64(&format!("loss ({ctx})"), got.loss, want.loss, 1e-5);
            assert_close(
                &format!("grad chosen ({ctx})"),
                &got.grad_chosen,
                &want.grad_chosen,
                1e-9,
                1e-4,
            );
            assert_close(
                &format!("grad rejected ({ctx})"),
                &got.grad_rejected,
                &want.grad_rejected,
                1e-9,
                1e-4,
            );
            metrics_close(&ctx, &got.metrics, &want.metrics);
        }
    }
}

#[test]
fn dpo_errors_match_the_cpu_loss() {
    let v = [-5.0f32, -6.0];
    let batch = PairBatch {
        policy_chosen_logps: &v,
        policy_rejected_logps: &v,
        reference_chosen_logps: &v,
        reference_rejected_logps: &v,
        chosen_counts: Some(&[3, 0]),
        rejected_counts: Some(&[0, 1]),
    };
    let ipo = DpoConfig {
        loss_type: DpoLossType::Ipo,
        ..DpoConfig::default()
    };
    for (config, batch) in [
        (ipo, batch),
        (
            ipo,
            PairBatch {
                chosen_counts: None,
                ..batch
            },
        ),
        (
            DpoConfig {
                label_smoothing: 0.5,
                loss_type: DpoLossType::Robust,
                ..ipo
            },
            batch,
        ),
        (
            DpoConfig::default(),
            PairBatch {
                policy_rejected_logps: &v[..1],
                ..batch
            },
        ),
        (
            DpoConfig::default(),
            PairBatch {
                reference_chosen_logps: &[-1.0, f32::INFINITY],
                ..batch
            },
        ),
    ] {
        assert_eq!(
            emu::dpo_loss(&config, &batch).unwrap_err(),
            losses::dpo_loss(&config, &batch).unwrap_err(),
            "{config:?}"
        );
    }
    // Sigmoid accepts label smoothing up to 1 (cDPO), as the CPU loss does.
    let sig = DpoConfig {
        label_smoothing: 0.7,
        ..DpoConfig::default()
    };
    let got = emu::dpo_loss(&sig, &batch).unwrap();
    let want = losses::dpo_loss(&sig, &batch).unwrap();
    close64("cDPO loss", got.loss, want.loss, 1e-5);
}
