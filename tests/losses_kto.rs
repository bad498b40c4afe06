//! KTO / APO-zero-unpaired loss vs the plain f64 reference, finite-difference gradients,
//! invariants, reference-point partials and error cases.

mod losses_common;

use halo_kernels::losses::reference::{finite_difference_gradient, kto_loss_ref, kto_z0_ref};
use halo_kernels::losses::{
    kto_loss, KlInput, KtoBatch, KtoConfig, KtoLossType, ReferencePointPartial,
};
use halo_kernels::HaloError;
use losses_common::*;
use proptest::prelude::*;
use rand::Rng;

struct Case {
    policy: Vec<f32>,
    reference: Vec<f32>,
    desirable: Vec<bool>,
    kl_policy: Vec<f32>,
    kl_reference: Vec<f32>,
}

/// `mode`: 0 mixed, 1 all desirable, 2 all undesirable.
fn case(seed: u64, n: usize, mode: u8) -> Case {
    let mut r = rng(seed);
    let policy = logps(&mut r, n, -120.0, -2.0);
    let reference = perturbed(&mut r, &policy, 15.0);
    let desirable = (0..n)
        .map(|_| match mode {
            1 => true,
            2 => false,
            _ => r.gen_bool(0.4),
        })
        .collect();
    let m = r.gen_range(1..2 * n + 2);
    let kl_policy = logps(&mut r, m, -120.0, -2.0);
    // Shift so the reference point is sometimes positive, sometimes clamped to 0.
    let shift = r.gen_range(-6.0..10.0);
    let kl_reference = perturbed(&mut r, &kl_policy, 8.0)
        .iter()
        .map(|x| x - shift)
        .collect();
    Case {
        policy,
        reference,
        desirable,
        kl_policy,
        kl_reference,
    }
}

fn config(beta: f64, wd: f64, wu: f64, loss_type: KtoLossType) -> KtoConfig {
    KtoConfig {
        beta,
        desirable_weight: wd,
        undesirable_weight: wu,
        loss_type,
    }
}

fn check_against_reference(seed: u64, n: usize, mode: u8, cfg: KtoConfig) {
    let c = case(seed, n, mode);
    let out = kto_loss(
        &cfg,
        &KtoBatch {
            policy_logps: &c.policy,
            reference_logps: &c.reference,
            is_desirable: &c.desirable,
            kl: Some(KlInput::LogProbs {
                policy: &c.kl_policy,
                reference: &c.kl_reference,
            }),
        },
    )
    .unwrap();
    let apo = cfg.loss_type == KtoLossType::ApoZeroUnpaired;
    let z0 = if apo {
        0.0
    } else {
        kto_z0_ref(&to_f64(&c.kl_policy), &to_f64(&c.kl_reference))
    };
    assert_close("z0", out.z0, z0, 1e-12, 1e-12);
    let reference = to_f64(&c.reference);
    let loss_of = |p: &[f64]| {
        kto_loss_ref(
            p,
            &reference,
            &c.desirable,
            z0,
            cfg.beta,
            cfg.desirable_weight,
            cfg.undesirable_weight,
            apo,
        )
    };
    let policy = to_f64(&c.policy);
    assert_close("loss", out.loss, loss_of(&policy), 1e-5, 1e-12);
    let fd = finite_difference_gradient(loss_of, &policy, 1e-3);
    assert_grad_close("grad", &out.grad_policy_logps, &fd, 1e-5);

    // Metrics, computed here from their TRL definitions.
    let beta = cfg.beta;
    let desirable = &c.desirable;
    let idx = |d: bool| (0..n).filter(move |&i| desirable[i] == d);
    let reward = |i: usize| beta * (policy[i] - reference[i]);
    let policy = &policy;
    let reward = &reward;
    let rc = mean(idx(true).map(reward));
    let rr = mean(idx(false).map(reward));
    let m = out.metrics;
    assert_opt_close("rewards/chosen", m.rewards_chosen, rc);
    assert_opt_close("rewards/rejected", m.rewards_rejected, rr);
    assert_opt_close(
        "rewards/margins",
        m.rewards_margins,
        rc.zip(rr).map(|(a, b)| a - b),
    );
    assert_opt_close(
        "logps/chosen",
        m.logps_chosen,
        mean(idx(true).map(|i| policy[i])),
    );
    assert_opt_close(
        "logps/rejected",
        m.logps_rejected,
        mean(idx(false).map(|i| policy[i])),
    );
    assert_opt_close("kl", m.kl, Some(z0));
    assert_eq!(m.rewards_accuracies, None);
    assert_eq!(m.chosen_count as usize, idx(true).count());
    assert_eq!(m.rejected_count as usize, idx(false).count());
}

#[test]
fn kto_matches_reference_mixed_batches() {
    for (seed, n) in [(1, 7), (2, 33), (3, 128), (4, 5)] {
        for &beta in &[0.1, 0.5, 2.0] {
            check_against_reference(seed, n, 0, config(beta, 1.0, 1.0, KtoLossType::Kto));
            check_against_reference(seed, n, 0, config(beta, 1.33, 0.7, KtoLossType::Kto));
        }
    }
}

#[test]
fn kto_matches_reference_batch_of_one_and_single_class() {
    for seed in 10..16 {
        for mode in 0..3 {
            check_against_reference(seed, 1, mode, config(0.1, 1.0, 1.0, KtoLossType::Kto));
            check_against_reference(seed, 9, mode, config(0.3, 2.0, 0.5, KtoLossType::Kto));
        }
    }
}

#[test]
fn apo_zero_unpaired_matches_reference_without_kl() {
    for seed in 20..26 {
        for mode in 0..3 {
            let cfg = config(0.2, 1.5, 0.8, KtoLossType::ApoZeroUnpaired);
            check_against_reference(seed, 17, mode, cfg);
            // No KL input needed; kl metric is 0.
            let c = case(seed, 17, mode);
            let out = kto_loss(
                &cfg,
                &KtoBatch {
                    policy_logps: &c.policy,
                    reference_logps: &c.reference,
                    is_desirable: &c.desirable,
                    kl: None,
                },
            )
            .unwrap();
            assert_eq!(out.metrics.kl, Some(0.0));
        }
    }
}

#[test]
fn partial_input_equals_raw_kl_input() {
    let c = case(30, 12, 0);
    let cfg = KtoConfig::default();
    let raw = kto_loss(
        &cfg,
        &KtoBatch {
            policy_logps: &c.policy,
            reference_logps: &c.reference,
            is_desirable: &c.desirable,
            kl: Some(KlInput::LogProbs {
                policy: &c.kl_policy,
                reference: &c.kl_reference,
            }),
        },
    )
    .unwrap();
    // Split the KL pairs over three "devices" and all-reduce the partials.
    let m = c.kl_policy.len();
    let cuts = [0, m / 3, 2 * m / 3, m];
    let mut merged = ReferencePointPartial::empty();
    for w in cuts.windows(2) {
        merged
            .add(
                ReferencePointPartial::from_kl_logps(
                    &c.kl_policy[w[0]..w[1]],
                    &c.kl_reference[w[0]..w[1]],
                )
                .unwrap(),
            )
            .unwrap();
    }
    let via_partial = kto_loss(
        &cfg,
        &KtoBatch {
            policy_logps: &c.policy,
            reference_logps: &c.reference,
            is_desirable: &c.desirable,
            kl: Some(KlInput::Partial(merged)),
        },
    )
    .unwrap();
    assert_close("loss", via_partial.loss, raw.loss, 1e-12, 1e-15);
    assert_close("z0", via_partial.z0, raw.z0, 1e-12, 1e-15);
    for (a, b) in via_partial
        .grad_policy_logps
        .iter()
        .zip(&raw.grad_policy_logps)
    {
        assert_close("grad", *a as f64, *b as f64, 1e-6, 1e-15);
    }
}

#[test]
fn reference_point_merge_equals_partial_of_concatenation() {
    let mut r = rng(40);
    for _ in 0..50 {
        let m = r.gen_range(0..40);
        let pol = logps(&mut r, m, -200.0, -1.0);
        let refe = perturbed(&mut r, &pol, 20.0);
        let whole = ReferencePointPartial::from_kl_logps(&pol, &refe).unwrap();
        let cut = if m == 0 { 0 } else { r.gen_range(0..=m) };
        let a = ReferencePointPartial::from_kl_logps(&pol[..cut], &refe[..cut]).unwrap();
        let b = ReferencePointPartial::from_kl_logps(&pol[cut..], &refe[cut..]).unwrap();
        for merged in [a.merge(b).unwrap(), b.merge(a).unwrap()] {
            assert_eq!(merged.count, whole.count);
            assert_close("sum", merged.sum, whole.sum, 1e-12, 1e-9);
        }
        let want = (m > 0).then(|| kto_z0_ref(&to_f64(&pol), &to_f64(&refe)));
        match want {
            Some(z) => assert_close("z0", whole.z0().unwrap(), z, 1e-12, 1e-12),
            None => assert_eq!(whole.z0(), Err(HaloError::EmptyBatch("kl pairs"))),
        }
        let ratios: Vec<f32> = pol.iter().zip(&refe).map(|(p, q)| p - q).collect();
        let from_ratios = ReferencePointPartial::from_kl_logratios(&ratios).unwrap();
        assert_eq!(from_ratios.count, whole.count);
        assert_close("sum from ratios", from_ratios.sum, whole.sum, 1e-6, 1e-3);
    }
}

#[test]
fn extreme_log_ratios_give_finite_tiny_gradients() {
    // |β (r − z0)| up to 1e5: the loss saturates, gradients are exactly 0 or tiny, never NaN.
    let policy = [-1.0e4f32, -2.0, -3.0e4, -5.0, -0.5, -7.0e3];
    let reference = [-3.0f32, -1.0e4, -1.0, -3.0e4, -9.0e3, -2.0];
    let desirable = [true, true, false, false, true, false];
    for loss_type in [KtoLossType::Kto, KtoLossType::ApoZeroUnpaired] {
        let out = kto_loss(
            &KtoConfig {
                beta: 10.0,
                loss_type,
                ..KtoConfig::default()
            },
            &KtoBatch {
                policy_logps: &policy,
                reference_logps: &reference,
                is_desirable: &desirable,
                kl: Some(KlInput::Partial(ReferencePointPartial {
                    sum: 3.0,
                    count: 2,
                })),
            },
        )
        .unwrap();
        assert!(out.loss.is_finite() && (0.0..=1.0).contains(&out.loss));
        for g in &out.grad_policy_logps {
            assert!(g.is_finite() && g.abs() < 1e-12, "{g}");
        }
        // Saturated values: desirable with r ≪ 0 (example 0) and undesirable with r ≫ 0
        // (example 3) lose λ = 1 each, the other four lose 0.
        assert_close("saturated loss", out.loss, 2.0 / 6.0, 1e-12, 1e-12);
    }
}

fn fixed_partial(z0: f64) -> KlInput<'static> {
    KlInput::Partial(ReferencePointPartial {
        sum: z0 * 4.0,
        count: 4,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gradient_vanishes_when_saturated(
        r in prop_oneof![-1.0e4f64..-61.0, 61.0f64..1.0e4],
        z0 in 0.0f64..50.0,
        beta in 0.05f64..5.0,
        desirable in any::<bool>(),
    ) {
        // Choose the log-ratio so that |β (r' − z0)| = |r| > 60.
        let logratio = z0 + r / beta;
        let policy = [(logratio - 10.0) as f32];
        let reference = [-10.0f32];
        // Recompute the effective argument in f32-rounded inputs and skip the borderline.
        let x = beta * ((policy[0] as f64 - reference[0] as f64) - z0);
        prop_assume!(x.abs() > 60.0);
        let out = kto_loss(
            &KtoConfig { beta, ..KtoConfig::default() },
            &KtoBatch {
                policy_logps: &policy,
                reference_logps: &reference,
                is_desirable: &[desirable],
                kl: Some(fixed_partial(z0)),
            },
        ).unwrap();
        let g = out.grad_policy_logps[0];
        prop_assert!(g.is_finite() && g.abs() < 1e-12, "grad {} at x = {}", g, x);
    }

    #[test]
    fn swapping_classes_flips_gradient_sign(
        seed in 0u64..10_000,
        n in 1usize..20,
        z0 in 0.0f64..5.0,
        beta in 0.05f64..2.0,
        weight in 0.1f64..3.0,
    ) {
        let c = case(seed, n, 0);
        let swapped: Vec<bool> = c.desirable.iter().map(|d| !d).collect();
        let cfg = KtoConfig { beta, desirable_weight: weight, undesirable_weight: weight, ..KtoConfig::default() };
        let run = |desirable: &[bool]| kto_loss(&cfg, &KtoBatch {
            policy_logps: &c.policy,
            reference_logps: &c.reference,
            is_desirable: desirable,
            kl: Some(fixed_partial(z0)),
        }).unwrap();
        let (a, b) = (run(&c.desirable), run(&swapped));
        for i in 0..n {
            let (ga, gb) = (a.grad_policy_logps[i], b.grad_policy_logps[i]);
            prop_assert_eq!(ga, -gb);
            // Desirable examples are pushed up (negative gradient of the loss), undesirable down.
            if c.desirable[i] { prop_assert!(ga <= 0.0); } else { prop_assert!(ga >= 0.0); }
        }
    }

    #[test]
    fn z0_nonnegative_and_loss_bounded(
        seed in 0u64..10_000,
        n in 1usize..40,
        beta in 0.01f64..10.0,
        wd in 0.0f64..3.0,
        wu in 0.0f64..3.0,
    ) {
        let c = case(seed, n, 0);
        let out = kto_loss(
            &KtoConfig { beta, desirable_weight: wd, undesirable_weight: wu, ..KtoConfig::default() },
            &KtoBatch {
                policy_logps: &c.policy,
                reference_logps: &c.reference,
                is_desirable: &c.desirable,
                kl: Some(KlInput::LogProbs { policy: &c.kl_policy, reference: &c.kl_reference }),
            },
        ).unwrap();
        prop_assert!(out.z0 >= 0.0);
        prop_assert_eq!(out.metrics.kl, Some(out.z0));
        prop_assert!(out.loss >= 0.0 && out.loss <= wd.max(wu) + 1e-12, "loss {}", out.loss);
        prop_assert!(out.grad_policy_logps.iter().all(|g| g.is_finite()));
    }
}

#[test]
fn bad_inputs_are_errors() {
    let p = [-1.0f32, -2.0, -3.0];
    let q = [-1.5f32, -2.5, -2.0];
    let d = [true, false, true];
    let kl = Some(KlInput::LogProbs {
        policy: &p[..2],
        reference: &q[..2],
    });
    let ok = KtoBatch {
        policy_logps: &p,
        reference_logps: &q,
        is_desirable: &d,
        kl,
    };
    let cfg = KtoConfig::default();
    assert!(kto_loss(&cfg, &ok).is_ok());

    let err = |cfg: &KtoConfig, b: &KtoBatch| kto_loss(cfg, b).unwrap_err();
    assert!(matches!(
        err(
            &cfg,
            &KtoBatch {
                reference_logps: &q[..2],
                ..ok
            }
        ),
        HaloError::LengthMismatch {
            what: "reference_logps",
            expected: 3,
            got: 2
        }
    ));
    assert!(matches!(
        err(
            &cfg,
            &KtoBatch {
                is_desirable: &d[..1],
                ..ok
            }
        ),
        HaloError::LengthMismatch {
            what: "is_desirable",
            ..
        }
    ));
    assert!(matches!(
        err(
            &cfg,
            &KtoBatch {
                kl: Some(KlInput::LogProbs {
                    policy: &p,
                    reference: &q[..1]
                }),
                ..ok
            }
        ),
        HaloError::LengthMismatch {
            what: "kl_reference_logps",
            ..
        }
    ));
    assert_eq!(
        err(
            &cfg,
            &KtoBatch {
                policy_logps: &[],
                reference_logps: &[],
                is_desirable: &[],
                kl
            }
        ),
        HaloError::EmptyBatch("policy_logps")
    );
    assert_eq!(
        err(&cfg, &KtoBatch { kl: None, ..ok }),
        HaloError::MissingKlPairs { loss_type: "kto" }
    );
    assert_eq!(
        err(
            &cfg,
            &KtoBatch {
                kl: Some(KlInput::LogProbs {
                    policy: &[],
                    reference: &[]
                }),
                ..ok
            }
        ),
        HaloError::EmptyBatch("kl pairs")
    );
    assert_eq!(
        err(
            &cfg,
            &KtoBatch {
                kl: Some(KlInput::Partial(ReferencePointPartial::empty())),
                ..ok
            }
        ),
        HaloError::EmptyBatch("kl pairs")
    );
    let nan = [-1.0f32, f32::NAN, -3.0];
    let inf = [-1.0f32, -2.0, f32::NEG_INFINITY];
    assert_eq!(
        err(
            &cfg,
            &KtoBatch {
                policy_logps: &nan,
                ..ok
            }
        ),
        HaloError::NonFinite {
            what: "policy_logps",
            row: 1
        }
    );
    assert_eq!(
        err(
            &cfg,
            &KtoBatch {
                reference_logps: &inf,
                ..ok
            }
        ),
        HaloError::NonFinite {
            what: "reference_logps",
            row: 2
        }
    );
    assert!(matches!(
        err(
            &cfg,
            &KtoBatch {
                kl: Some(KlInput::LogProbs {
                    policy: &nan,
                    reference: &q
                }),
                ..ok
            }
        ),
        HaloError::NonFinite {
            what: "kl_policy_logps",
            row: 1
        }
    ));
    assert!(matches!(
        err(
            &cfg,
            &KtoBatch {
                kl: Some(KlInput::Partial(ReferencePointPartial {
                    sum: f64::NAN,
                    count: 3
                })),
                ..ok
            }
        ),
        HaloError::NonFinite { .. }
    ));
    for (name, bad) in [
        ("beta", KtoConfig { beta: 0.0, ..cfg }),
        ("beta", KtoConfig { beta: -0.1, ..cfg }),
        (
            "beta",
            KtoConfig {
                beta: f64::NAN,
                ..cfg
            },
        ),
        (
            "beta",
            KtoConfig {
                beta: f64::INFINITY,
                ..cfg
            },
        ),
        (
            "desirable_weight",
            KtoConfig {
                desirable_weight: -1.0,
                ..cfg
            },
        ),
        (
            "desirable_weight",
            KtoConfig {
                desirable_weight: f64::INFINITY,
                ..cfg
            },
        ),
        (
            "undesirable_weight",
            KtoConfig {
                undesirable_weight: -0.5,
                ..cfg
            },
        ),
        (
            "undesirable_weight",
            KtoConfig {
                undesirable_weight: f64::NAN,
                ..cfg
            },
        ),
    ] {
        match err(&bad, &ok) {
            HaloError::InvalidHyperParameter { name: got, .. } => assert_eq!(got, name),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn zero_token_sequences_are_allowed_for_summed_losses() {
    // A sequence with no tokens has summed log-prob 0 for both models: r = 0.
    let out = kto_loss(
        &KtoConfig::default(),
        &KtoBatch {
            policy_logps: &[0.0, -4.0],
            reference_logps: &[0.0, -3.0],
            is_desirable: &[true, false],
            kl: Some(KlInput::LogProbs {
                policy: &[0.0],
                reference: &[0.0],
            }),
        },
    )
    .unwrap();
    let want = kto_loss_ref(
        &[0.0, -4.0],
        &[0.0, -3.0],
        &[true, false],
        0.0,
        0.1,
        1.0,
        1.0,
        false,
    );
    assert_close("loss", out.loss, want, 1e-12, 1e-15);
}

/// Merging partials whose counts overflow `u64` is an error, not a wrap to an "empty" batch.
#[test]
fn merging_partials_refuses_a_count_overflow() {
    let big = ReferencePointPartial {
        sum: 1.0,
        count: u64::MAX,
    };
    let one = ReferencePointPartial { sum: 0.5, count: 1 };
    match big.merge(one) {
        Err(HaloError::InvalidShape(m)) => assert!(m.contains("overflows u64"), "{m}"),
        other => panic!("expected an overflow error, got {other:?}"),
    }
    let mut acc = one;
    assert!(acc.add(big).is_err());
    assert_eq!(acc, one, "unchanged on error");
    assert_eq!(one.merge(one).unwrap().count, 2);
}
