//! SimPO and ORPO (reference-free, length-normalised) vs the plain f64 reference,
//! finite-difference gradients, metrics, edge cases near log-prob 0, and error cases.

mod losses_common;

use halo_kernels::losses::reference::{
    chosen_nll_ref, finite_difference_gradient, log_sigmoid_ref, orpo_loss_ref, simpo_loss_ref,
};
use halo_kernels::losses::{
    orpo_loss, simpo_loss, OrpoConfig, ReferenceFreePairBatch, SimpoConfig,
};
use halo_kernels::HaloError;
use losses_common::*;
use rand::Rng;

struct Pairs {
    pc: Vec<f32>,
    pr: Vec<f32>,
    cc: Vec<u32>,
    cr: Vec<u32>,
}

/// Summed log-probs whose per-token average lies in `[avg_lo, avg_hi]`.
fn pairs(seed: u64, n: usize, avg_lo: f64, avg_hi: f64) -> Pairs {
    let mut r = rng(seed);
    let cc = counts(&mut r, n);
    let cr = counts(&mut r, n);
    let mut sums = |cs: &[u32]| -> Vec<f32> {
        cs.iter()
            .map(|&c| (r.gen_range(avg_lo..avg_hi) * c as f64) as f32)
            .collect()
    };
    let pc = sums(&cc);
    let pr = sums(&cr);
    Pairs { pc, pr, cc, cr }
}

impl Pairs {
    fn batch(&self) -> ReferenceFreePairBatch<'_> {
        ReferenceFreePairBatch {
            policy_chosen_logps: &self.pc,
            policy_rejected_logps: &self.pr,
            chosen_counts: &self.cc,
            rejected_counts: &self.cr,
        }
    }
    fn x(&self) -> Vec<f64> {
        to_f64(&self.pc)
            .into_iter()
            .chain(to_f64(&self.pr))
            .collect()
    }
    fn avg(&self) -> (Vec<f64>, Vec<f64>) {
        (
            self.pc
                .iter()
                .zip(&self.cc)
                .map(|(&s, &c)| s as f64 / c as f64)
                .collect(),
            self.pr
                .iter()
                .zip(&self.cr)
                .map(|(&s, &c)| s as f64 / c as f64)
                .collect(),
        )
    }
}

fn check_pair_metrics(p: &Pairs, beta: f64, m: &halo_kernels::losses::LossMetrics) {
    let (ac, ar) = p.avg();
    let n = ac.len();
    assert_opt_close(
        "rewards/chosen",
        m.rewards_chosen,
        mean(ac.iter().map(|a| beta * a)),
    );
    assert_opt_close(
        "rewards/rejected",
        m.rewards_rejected,
        mean(ar.iter().map(|a| beta * a)),
    );
    assert_opt_close(
        "rewards/margins",
        m.rewards_margins,
        mean((0..n).map(|i| beta * (ac[i] - ar[i]))),
    );
    assert_opt_close(
        "rewards/accuracies",
        m.rewards_accuracies,
        mean((0..n).map(|i| if ac[i] > ar[i] { 1.0 } else { 0.0 })),
    );
    assert_opt_close("logps/chosen", m.logps_chosen, mean(ac.iter().copied()));
    assert_opt_close("logps/rejected", m.logps_rejected, mean(ar.iter().copied()));
    assert_opt_close(
        "nll_loss",
        m.nll_loss,
        Some(chosen_nll_ref(&to_f64(&p.pc), &p.cc)),
    );
}

#[test]
fn simpo_matches_reference() {
    for (seed, n) in [(1u64, 1usize), (2, 5), (3, 64), (4, 127)] {
        let p = pairs(seed, n, -4.0, -0.05);
        for cfg in [
            SimpoConfig::default(),
            SimpoConfig {
                beta: 2.0,
                gamma: 1.0,
                label_smoothing: 0.1,
                nll_weight: 0.0,
            },
            SimpoConfig {
                beta: 10.0,
                gamma: 5.0,
                label_smoothing: 0.0,
                nll_weight: 1.0,
            },
            SimpoConfig {
                beta: 0.5,
                gamma: -0.3,
                label_smoothing: 0.5,
                nll_weight: 0.3,
            },
        ] {
            let out = simpo_loss(&cfg, &p.batch()).unwrap();
            let loss_of = |x: &[f64]| {
                simpo_loss_ref(
                    cfg.beta,
                    cfg.gamma,
                    cfg.label_smoothing,
                    cfg.nll_weight,
                    &x[..n],
                    &x[n..],
                    &p.cc,
                    &p.cr,
                )
            };
            let x = p.x();
            assert_close("simpo loss", out.loss, loss_of(&x), 1e-5, 1e-12);
            let fd = finite_difference_gradient(loss_of, &x, 1e-2);
            let got: Vec<f32> = out
                .grad_chosen
                .iter()
                .chain(&out.grad_rejected)
                .copied()
                .collect();
            assert_grad_close("simpo grad", &got, &fd, 1e-5);
            check_pair_metrics(&p, cfg.beta, &out.metrics);
            assert_eq!(out.metrics.kl, None);
        }
    }
}

#[test]
fn orpo_matches_reference() {
    for (seed, n) in [(11u64, 1usize), (12, 6), (13, 64), (14, 129)] {
        for (lo, hi) in [(-4.0, -0.01), (-0.05, -1e-4), (-30.0, -5.0)] {
            let p = pairs(seed, n, lo, hi);
            for beta in [0.1, 1.0, 5.0] {
                let out = orpo_loss(&OrpoConfig { beta }, &p.batch()).unwrap();
                let loss_of = |x: &[f64]| orpo_loss_ref(beta, &x[..n], &x[n..], &p.cc, &p.cr);
                let x = p.x();
                assert_close("orpo loss", out.loss, loss_of(&x), 1e-5, 1e-12);
                // Step small relative to the smallest |sum| so no average crosses 0.
                let h = x.iter().fold(f64::INFINITY, |m, v| m.min(v.abs())) * 1e-3;
                let fd = finite_difference_gradient(loss_of, &x, h);
                let got: Vec<f32> = out
                    .grad_chosen
                    .iter()
                    .chain(&out.grad_rejected)
                    .copied()
                    .collect();
                assert_grad_close("orpo grad", &got, &fd, 1e-5);
                check_pair_metrics(&p, beta, &out.metrics);
                // log_odds metrics, from TRL's odds_ratio_loss.
                let (ac, ar) = p.avg();
                let log_odds: Vec<f64> = (0..n)
                    .map(|i| (ac[i] - ar[i]) - ((-ac[i].exp()).ln_1p() - (-ar[i].exp()).ln_1p()))
                    .collect();
                let m = out.metrics;
                assert_close(
                    "log_odds_chosen",
                    m.log_odds_chosen.unwrap(),
                    mean(log_odds.iter().copied()).unwrap(),
                    1e-6,
                    1e-9,
                );
                assert_close(
                    "log_odds_ratio",
                    m.log_odds_ratio.unwrap(),
                    mean(log_odds.iter().map(|&l| log_sigmoid_ref(l))).unwrap(),
                    1e-6,
                    1e-9,
                );
            }
        }
    }
}

#[test]
fn orpo_chosen_certain_is_finite_with_limit_gradient() {
    // Average chosen log-prob exactly 0 (p = 1): log_odds = +inf, odds term 0, and
    // ∂(−β logσ)/∂c → −β p_r/(1 − p_r) (the limit as c → 0⁻).
    let (beta, r) = (0.5f64, -0.7f64);
    let out = orpo_loss(
        &OrpoConfig { beta },
        &ReferenceFreePairBatch {
            policy_chosen_logps: &[0.0],
            policy_rejected_logps: &[r as f32 * 2.0],
            chosen_counts: &[3],
            rejected_counts: &[2],
        },
    )
    .unwrap();
    assert!(out.loss.is_finite());
    assert_close("loss = nll = 0", out.loss, 0.0, 0.0, 1e-15);
    let r = (r as f32) as f64;
    let want_c = (-beta * r.exp() / (1.0 - r.exp())) / 3.0 - 1.0 / 3.0;
    assert_close("grad chosen", out.grad_chosen[0] as f64, want_c, 1e-6, 0.0);
    assert_eq!(out.grad_rejected[0], 0.0);
    // And it is the limit of the reference: c = −1e-9 is already close.
    let near = orpo_loss(
        &OrpoConfig { beta },
        &ReferenceFreePairBatch {
            policy_chosen_logps: &[-3.0e-9],
            policy_rejected_logps: &[r as f32 * 2.0],
            chosen_counts: &[3],
            rejected_counts: &[2],
        },
    )
    .unwrap();
    assert_close("continuity", near.grad_chosen[0] as f64, want_c, 1e-6, 0.0);
    assert!(near.grad_rejected[0].is_finite());
}

#[test]
fn orpo_extreme_averages_never_nan() {
    let mut r = rng(99);
    for _ in 0..500 {
        let n = r.gen_range(1..6);
        let cc: Vec<u32> = (0..n).map(|_| r.gen_range(1..4)).collect();
        let cr = cc.clone();
        let pick = |r: &mut rand_chacha::ChaCha8Rng| -> f32 {
            match r.gen_range(0..5) {
                0 => 0.0,
                1 => -1e-30,
                2 => -r.gen_range(1e-7f32..1e-3),
                3 => -r.gen_range(700.0f32..3e4),
                _ => -r.gen_range(0.01f32..20.0),
            }
        };
        let pc: Vec<f32> = (0..n).map(|_| pick(&mut r)).collect();
        let pr: Vec<f32> = (0..n).map(|_| pick(&mut r).min(-1e-30)).collect();
        let out = orpo_loss(
            &OrpoConfig {
                beta: r.gen_range(0.01..10.0),
            },
            &ReferenceFreePairBatch {
                policy_chosen_logps: &pc,
                policy_rejected_logps: &pr,
                chosen_counts: &cc,
                rejected_counts: &cr,
            },
        )
        .unwrap();
        assert!(out.loss.is_finite(), "{pc:?} {pr:?}");
        assert!(
            out.grad_chosen
                .iter()
                .chain(&out.grad_rejected)
                .all(|g| g.is_finite()),
            "{pc:?} {pr:?} {:?} {:?}",
            out.grad_chosen,
            out.grad_rejected
        );
    }
}

#[test]
fn orpo_edge_errors() {
    let batch = |c: f32, r: f32| {
        orpo_loss(
            &OrpoConfig::default(),
            &ReferenceFreePairBatch {
                policy_chosen_logps: &[-1.0, c],
                policy_rejected_logps: &[-2.0, r],
                chosen_counts: &[1, 1],
                rejected_counts: &[1, 1],
            },
        )
    };
    assert!(matches!(
        batch(0.5, -1.0).unwrap_err(),
        HaloError::InvalidLogProb { index: 1, .. }
    ));
    assert!(matches!(
        batch(-1.0, 1e-3).unwrap_err(),
        HaloError::InvalidLogProb { index: 1, .. }
    ));
    assert!(matches!(
        batch(-1.0, 0.0).unwrap_err(),
        HaloError::NonFinite { row: 1, .. }
    ));
    assert!(matches!(
        batch(0.0, 0.0).unwrap_err(),
        HaloError::NonFinite { row: 1, .. }
    ));
    assert!(batch(0.0, -1.0).is_ok());
    assert!(matches!(
        orpo_loss(&OrpoConfig { beta: -1.0 }, &pairs(1, 2, -2.0, -1.0).batch()).unwrap_err(),
        HaloError::InvalidHyperParameter { name: "beta", .. }
    ));
}

#[test]
fn reference_free_bad_inputs_are_errors() {
    let p = pairs(21, 4, -3.0, -0.1);
    let ok = p.batch();
    type Loss = fn(
        &ReferenceFreePairBatch<'_>,
    ) -> halo_kernels::Result<halo_kernels::losses::PairLossOutput>;
    let losses: [(&str, Loss); 2] = [
        ("simpo", |b| simpo_loss(&SimpoConfig::default(), b)),
        ("orpo", |b| orpo_loss(&OrpoConfig::default(), b)),
    ];
    let mut zero = p.cr.clone();
    zero[3] = 0;
    let mut nan = p.pc.clone();
    nan[1] = f32::NAN;
    for (name, loss) in losses {
        assert!(loss(&ok).is_ok(), "{name}");
        for (what, b) in [
            (
                "policy_rejected_logps",
                ReferenceFreePairBatch {
                    policy_rejected_logps: &p.pr[..3],
                    ..ok
                },
            ),
            (
                "chosen_counts",
                ReferenceFreePairBatch {
                    chosen_counts: &p.cc[..1],
                    ..ok
                },
            ),
            (
                "rejected_counts",
                ReferenceFreePairBatch {
                    rejected_counts: &[],
                    ..ok
                },
            ),
        ] {
            match loss(&b).unwrap_err() {
                HaloError::LengthMismatch { what: got, .. } => assert_eq!(got, what, "{name}"),
                other => panic!("{name} {what}: {other:?}"),
            }
        }
        assert_eq!(
            loss(&ReferenceFreePairBatch {
                rejected_counts: &zero,
                ..ok
            })
            .unwrap_err(),
            HaloError::EmptySequence {
                what: "rejected_counts",
                index: 3
            },
            "{name}"
        );
        assert_eq!(
            loss(&ReferenceFreePairBatch {
                policy_chosen_logps: &nan,
                ..ok
            })
            .unwrap_err(),
            HaloError::NonFinite {
                what: "policy_chosen_logps",
                row: 1
            },
            "{name}"
        );
        assert_eq!(
            loss(&ReferenceFreePairBatch {
                policy_chosen_logps: &[],
                policy_rejected_logps: &[],
                chosen_counts: &[],
                rejected_counts: &[],
            })
            .unwrap_err(),
            HaloError::EmptyBatch("policy_chosen_logps"),
            "{name}"
        );
    }
    let cfg = SimpoConfig::default();
    for (name, bad) in [
        ("beta", SimpoConfig { beta: 0.0, ..cfg }),
        (
            "gamma",
            SimpoConfig {
                gamma: f64::NAN,
                ..cfg
            },
        ),
        (
            "label_smoothing",
            SimpoConfig {
                label_smoothing: 1.2,
                ..cfg
            },
        ),
        (
            "nll_weight",
            SimpoConfig {
                nll_weight: -1.0,
                ..cfg
            },
        ),
    ] {
        match simpo_loss(&bad, &ok).unwrap_err() {
            HaloError::InvalidHyperParameter { name: got, .. } => assert_eq!(got, name),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn orpo_gradient_overflow_is_an_error_not_inf() {
    // Rejected average log-prob −1e-44 (an f32 subnormal): ∂/∂r ~ β/|r| overflows f32.
    let err = orpo_loss(
        &OrpoConfig { beta: 1.0 },
        &ReferenceFreePairBatch {
            policy_chosen_logps: &[-2.0],
            policy_rejected_logps: &[-1e-44],
            chosen_counts: &[1],
            rejected_counts: &[1],
        },
    )
    .unwrap_err();
    assert!(matches!(err, HaloError::NonFinite { .. }), "{err:?}");
}
