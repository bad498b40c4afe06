//! DPO family (sigmoid/cDPO, robust, hinge, IPO, APO-zero) vs the plain f64 reference,
//! finite-difference gradients, metrics, extreme inputs and error cases.

mod losses_common;

use halo_kernels::losses::reference::{dpo_loss_ref, finite_difference_gradient};
use halo_kernels::losses::{dpo_loss, DpoConfig, DpoLossType, PairBatch};
use halo_kernels::HaloError;
use losses_common::*;
use rand::Rng;

const ALL: [DpoLossType; 5] = [
    DpoLossType::Sigmoid,
    DpoLossType::Robust,
    DpoLossType::Hinge,
    DpoLossType::Ipo,
    DpoLossType::ApoZero,
];

struct Pairs {
    pc: Vec<f32>,
    pr: Vec<f32>,
    rc: Vec<f32>,
    rr: Vec<f32>,
    cc: Vec<u32>,
    cr: Vec<u32>,
}

fn pairs(seed: u64, n: usize) -> Pairs {
    let mut r = rng(seed);
    let pc = logps(&mut r, n, -150.0, -3.0);
    let pr = logps(&mut r, n, -150.0, -3.0);
    let rc = perturbed(&mut r, &pc, 20.0);
    let rr = perturbed(&mut r, &pr, 20.0);
    let cc = counts(&mut r, n);
    let cr = counts(&mut r, n);
    Pairs {
        pc,
        pr,
        rc,
        rr,
        cc,
        cr,
    }
}

impl Pairs {
    fn batch(&self) -> PairBatch<'_> {
        PairBatch {
            policy_chosen_logps: &self.pc,
            policy_rejected_logps: &self.pr,
            reference_chosen_logps: &self.rc,
            reference_rejected_logps: &self.rr,
            chosen_counts: Some(&self.cc),
            rejected_counts: Some(&self.cr),
        }
    }
}

fn check(p: &Pairs, cfg: DpoConfig) {
    let out = dpo_loss(&cfg, &p.batch()).unwrap();
    let n = p.pc.len();
    let name = cfg.loss_type.name();
    let (rc, rr) = (to_f64(&p.rc), to_f64(&p.rr));
    // The reference as a function of the concatenated [chosen; rejected] policy log-probs.
    let loss_of = |x: &[f64]| {
        dpo_loss_ref(
            name,
            cfg.beta,
            cfg.label_smoothing,
            &x[..n],
            &x[n..],
            &rc,
            &rr,
            &p.cc,
            &p.cr,
        )
    };
    let x: Vec<f64> = to_f64(&p.pc).into_iter().chain(to_f64(&p.pr)).collect();
    assert_close(&format!("{name} loss"), out.loss, loss_of(&x), 1e-5, 1e-12);
    // Hinge has a kink at β l = 1: check FD only away from it.
    let h = 1e-3;
    let fd = finite_difference_gradient(loss_of, &x, h);
    let got: Vec<f32> = out
        .grad_chosen
        .iter()
        .chain(&out.grad_rejected)
        .copied()
        .collect();
    if cfg.loss_type == DpoLossType::Hinge {
        for i in 0..n {
            let l = (p.pc[i] as f64 - rc[i]) - (p.pr[i] as f64 - rr[i]);
            if (1.0 - cfg.beta * l).abs() > 10.0 * h * cfg.beta {
                assert_close("hinge grad chosen", got[i] as f64, fd[i], 1e-5, 1e-12);
                assert_close(
                    "hinge grad rejected",
                    got[n + i] as f64,
                    fd[n + i],
                    1e-5,
                    1e-12,
                );
            }
        }
    } else {
        assert_grad_close(&format!("{name} grad"), &got, &fd, 1e-5);
    }

    // Metrics from their TRL definitions (IPO: on length-normalised log-probs).
    let (sc, sr): (Vec<f64>, Vec<f64>) = if cfg.loss_type == DpoLossType::Ipo {
        (
            p.cc.iter().map(|&c| 1.0 / c as f64).collect(),
            p.cr.iter().map(|&c| 1.0 / c as f64).collect(),
        )
    } else {
        (vec![1.0; n], vec![1.0; n])
    };
    let chosen_r: Vec<f64> = (0..n)
        .map(|i| cfg.beta * (p.pc[i] as f64 - rc[i]) * sc[i])
        .collect();
    let rejected_r: Vec<f64> = (0..n)
        .map(|i| cfg.beta * (p.pr[i] as f64 - rr[i]) * sr[i])
        .collect();
    let m = out.metrics;
    assert_opt_close(
        "rewards/chosen",
        m.rewards_chosen,
        mean(chosen_r.iter().copied()),
    );
    assert_opt_close(
        "rewards/rejected",
        m.rewards_rejected,
        mean(rejected_r.iter().copied()),
    );
    assert_opt_close(
        "rewards/margins",
        m.rewards_margins,
        mean((0..n).map(|i| chosen_r[i] - rejected_r[i])),
    );
    assert_opt_close(
        "rewards/accuracies",
        m.rewards_accuracies,
        mean((0..n).map(|i| (chosen_r[i] > rejected_r[i]) as u8 as f64)),
    );
    assert_opt_close(
        "logps/chosen",
        m.logps_chosen,
        mean((0..n).map(|i| p.pc[i] as f64 * sc[i])),
    );
    assert_opt_close(
        "logps/rejected",
        m.logps_rejected,
        mean((0..n).map(|i| p.pr[i] as f64 * sr[i])),
    );
    assert_eq!(m.kl, None);
}

#[test]
fn every_loss_type_matches_reference() {
    for (seed, n) in [(1u64, 1usize), (2, 7), (3, 64), (4, 129)] {
        let p = pairs(seed, n);
        for loss_type in ALL {
            for beta in [0.1, 0.5, 3.0] {
                let eps = match loss_type {
                    DpoLossType::Sigmoid => [0.0, 0.1, 0.5][seed as usize % 3],
                    DpoLossType::Robust => [0.0, 0.2, 0.45][seed as usize % 3],
                    _ => 0.3, // ignored
                };
                check(
                    &p,
                    DpoConfig {
                        beta,
                        label_smoothing: eps,
                        loss_type,
                    },
                );
            }
        }
    }
}

#[test]
fn hinge_is_exactly_zero_past_margin() {
    // β l = 2 > 1: relu(1 − β l) = 0 and the gradient is 0.
    let out = dpo_loss(
        &DpoConfig {
            beta: 0.5,
            label_smoothing: 0.0,
            loss_type: DpoLossType::Hinge,
        },
        &PairBatch {
            policy_chosen_logps: &[-1.0],
            policy_rejected_logps: &[-10.0],
            reference_chosen_logps: &[-3.0],
            reference_rejected_logps: &[-8.0],
            chosen_counts: None,
            rejected_counts: None,
        },
    )
    .unwrap();
    assert_eq!(out.loss, 0.0);
    assert_eq!((out.grad_chosen[0], out.grad_rejected[0]), (0.0, 0.0));
}

#[test]
fn extreme_margins_stay_finite() {
    let pc = [-1.0e4f32, -1.0, -5.0e4];
    let pr = [-1.0f32, -1.0e4, -2.0];
    let rc = [-2.0f32, -3.0e4, -1.0];
    let rr = [-3.0e4f32, -2.0, -1.0e4];
    let counts = [1u32, 3, 1000];
    for loss_type in ALL {
        let out = dpo_loss(
            &DpoConfig {
                beta: 5.0,
                label_smoothing: if loss_type == DpoLossType::Robust {
                    0.2
                } else {
                    0.1
                },
                loss_type,
            },
            &PairBatch {
                policy_chosen_logps: &pc,
                policy_rejected_logps: &pr,
                reference_chosen_logps: &rc,
                reference_rejected_logps: &rr,
                chosen_counts: Some(&counts),
                rejected_counts: Some(&counts),
            },
        )
        .unwrap();
        assert!(out.loss.is_finite(), "{loss_type:?} loss {}", out.loss);
        assert!(out
            .grad_chosen
            .iter()
            .chain(&out.grad_rejected)
            .all(|g| g.is_finite()));
    }
    // Sigmoid, no smoothing: a pair with β l = −5e5 loses exactly −β l (softplus), gradient −β/n.
    let out = dpo_loss(
        &DpoConfig::default(),
        &PairBatch {
            policy_chosen_logps: &[-1.0e5],
            policy_rejected_logps: &[-1.0],
            reference_chosen_logps: &[-1.0],
            reference_rejected_logps: &[-1.0e5],
            chosen_counts: None,
            rejected_counts: None,
        },
    )
    .unwrap();
    let l = (-1.0e5f64 + 1.0) - (-1.0 + 1.0e5);
    assert_close("softplus tail", out.loss, -0.1 * l, 1e-12, 0.0);
    assert_close("grad tail", out.grad_chosen[0] as f64, -0.1, 1e-7, 0.0);
}

#[test]
fn zero_token_sequences() {
    let p = pairs(5, 3);
    let mut zero = p.cc.clone();
    zero[1] = 0;
    // Summed losses accept a 0-token sequence (its log-prob is 0).
    let mut b = p.batch();
    b.chosen_counts = Some(&zero);
    assert!(dpo_loss(&DpoConfig::default(), &b).is_ok());
    // IPO length-normalises: an empty sequence is an error.
    let ipo = DpoConfig {
        loss_type: DpoLossType::Ipo,
        ..DpoConfig::default()
    };
    assert_eq!(
        dpo_loss(&ipo, &b).unwrap_err(),
        HaloError::EmptySequence {
            what: "chosen_counts",
            index: 1
        }
    );
}

#[test]
fn bad_inputs_are_errors() {
    let p = pairs(6, 4);
    let ok = p.batch();
    let cfg = DpoConfig::default();
    let ipo = DpoConfig {
        loss_type: DpoLossType::Ipo,
        ..cfg
    };
    assert!(dpo_loss(&cfg, &ok).is_ok());
    let short = &p.pc[..3];
    for (what, b) in [
        (
            "policy_rejected_logps",
            PairBatch {
                policy_rejected_logps: short,
                ..ok
            },
        ),
        (
            "reference_chosen_logps",
            PairBatch {
                reference_chosen_logps: short,
                ..ok
            },
        ),
        (
            "reference_rejected_logps",
            PairBatch {
                reference_rejected_logps: short,
                ..ok
            },
        ),
        (
            "chosen_counts",
            PairBatch {
                chosen_counts: Some(&p.cc[..3]),
                ..ok
            },
        ),
        (
            "rejected_counts",
            PairBatch {
                rejected_counts: Some(&p.cr[..2]),
                ..ok
            },
        ),
    ] {
        match dpo_loss(&cfg, &b).unwrap_err() {
            HaloError::LengthMismatch {
                what: got,
                expected: 4,
                ..
            } => assert_eq!(got, what),
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(
        dpo_loss(
            &cfg,
            &PairBatch {
                policy_chosen_logps: &[],
                policy_rejected_logps: &[],
                reference_chosen_logps: &[],
                reference_rejected_logps: &[],
                chosen_counts: None,
                rejected_counts: None,
            }
        )
        .unwrap_err(),
        HaloError::EmptyBatch("policy_chosen_logps")
    );
    let mut nan = p.rr.clone();
    nan[2] = f32::NAN;
    assert_eq!(
        dpo_loss(
            &cfg,
            &PairBatch {
                reference_rejected_logps: &nan,
                ..ok
            }
        )
        .unwrap_err(),
        HaloError::NonFinite {
            what: "reference_rejected_logps",
            row: 2
        }
    );
    let mut inf = p.pc.clone();
    inf[0] = f32::INFINITY;
    assert_eq!(
        dpo_loss(
            &cfg,
            &PairBatch {
                policy_chosen_logps: &inf,
                ..ok
            }
        )
        .unwrap_err(),
        HaloError::NonFinite {
            what: "policy_chosen_logps",
            row: 0
        }
    );
    assert!(matches!(
        dpo_loss(
            &ipo,
            &PairBatch {
                chosen_counts: None,
                ..ok
            }
        )
        .unwrap_err(),
        HaloError::MissingArgument {
            what: "chosen_counts",
            ..
        }
    ));
    assert!(matches!(
        dpo_loss(
            &ipo,
            &PairBatch {
                rejected_counts: None,
                ..ok
            }
        )
        .unwrap_err(),
        HaloError::MissingArgument {
            what: "rejected_counts",
            ..
        }
    ));
    for (name, bad) in [
        ("beta", DpoConfig { beta: 0.0, ..cfg }),
        (
            "beta",
            DpoConfig {
                beta: f64::NAN,
                ..cfg
            },
        ),
        (
            "label_smoothing",
            DpoConfig {
                label_smoothing: -0.1,
                ..cfg
            },
        ),
        (
            "label_smoothing",
            DpoConfig {
                label_smoothing: 1.5,
                ..cfg
            },
        ),
        (
            "label_smoothing",
            DpoConfig {
                label_smoothing: 0.5,
                loss_type: DpoLossType::Robust,
                ..cfg
            },
        ),
        (
            "label_smoothing",
            DpoConfig {
                label_smoothing: f64::NAN,
                loss_type: DpoLossType::Robust,
                ..cfg
            },
        ),
    ] {
        match dpo_loss(&bad, &ok).unwrap_err() {
            HaloError::InvalidHyperParameter { name: got, .. } => assert_eq!(got, name),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn random_batches_never_produce_nan() {
    let mut r = rng(77);
    for _ in 0..200 {
        let n = r.gen_range(1..20);
        let p = pairs(r.gen(), n);
        for loss_type in ALL {
            let out = dpo_loss(
                &DpoConfig {
                    beta: r.gen_range(0.01..20.0),
                    label_smoothing: 0.1,
                    loss_type,
                },
                &p.batch(),
            )
            .unwrap();
            assert!(out.loss.is_finite());
            // Every loss but robust DPO is non-negative (robust's ε·logσ(−βl) term can win).
            assert!(
                out.loss >= 0.0 || loss_type == DpoLossType::Robust,
                "{loss_type:?}"
            );
            assert!(out
                .grad_chosen
                .iter()
                .chain(&out.grad_rejected)
                .all(|g| g.is_finite()));
        }
    }
}

#[test]
fn metric_names_follow_trl() {
    let p = pairs(8, 5);
    let out = dpo_loss(&DpoConfig::default(), &p.batch()).unwrap();
    let names: Vec<&str> = out.metrics.to_named().iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected"
        ]
    );
    assert_eq!(out.metrics.chosen_count, 5);
    assert_eq!(out.metrics.rejected_count, 5);
}

proptest::proptest! {
    /// For every loss of `l` alone, ∂/∂chosen = −∂/∂rejected, and sigmoid/IPO/hinge/robust push
    /// the chosen log-prob up (non-positive gradient) whenever the loss is not saturated.
    #[test]
    fn chosen_and_rejected_gradients_are_opposite(seed in 0u64..100_000, n in 1usize..12, beta in 0.01f64..5.0) {
        let p = pairs(seed, n);
        let mut b = p.batch();
        b.chosen_counts = None;
        b.rejected_counts = None;
        for loss_type in [DpoLossType::Sigmoid, DpoLossType::Robust, DpoLossType::Hinge] {
            let out = dpo_loss(&DpoConfig { beta, label_smoothing: 0.0, loss_type }, &b).unwrap();
            for i in 0..n {
                proptest::prop_assert_eq!(out.grad_chosen[i], -out.grad_rejected[i]);
                proptest::prop_assert!(out.grad_chosen[i] <= 0.0);
            }
        }
    }
}
