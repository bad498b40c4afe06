//! DPO family (every TRL 1.x loss type: sigmoid/cDPO, robust, hinge, IPO, APO-zero/down, EXO, NCA,
//! BCO, SPPO, AOT, DiscoPOP, SFT) vs the plain f64 reference, finite-difference gradients,
//! metrics, extreme inputs and error cases.

mod losses_common;

use halo_kernels::losses::reference::{
    dpo_loss_ref, dpo_loss_ref_f_divergence, finite_difference_gradient,
};
use halo_kernels::losses::{dpo_loss, DpoConfig, DpoLossType, FDivergence, PairBatch};
use halo_kernels::HaloError;
use losses_common::*;
use rand::Rng;

const ALL: [DpoLossType; 15] = DpoLossType::ALL;

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
    let alpha = match cfg.f_divergence {
        FDivergence::Alpha { coef } => coef,
        _ => 0.5,
    };
    let loss_of = |x: &[f64]| {
        dpo_loss_ref_f_divergence(
            name,
            cfg.beta,
            cfg.label_smoothing,
            cfg.discopop_tau,
            cfg.f_divergence.name(),
            alpha,
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
    // Hinge has a kink at β l = 1: check FD only away from it. AOT's sorted values are not
    // differentiable where two of them cross: the step stays below their smallest gap. DiscoPOP
    // bends on the scale τ/β: a smaller step keeps the central difference's own error small.
    let h = match cfg.loss_type {
        DpoLossType::Discopop => 1e-5,
        DpoLossType::Aot | DpoLossType::AotUnpaired => {
            let gap = sorted_gap(&x, &rc, &rr, cfg.loss_type);
            assert!(gap > 1e-6, "seed gives near-tied AOT values ({gap})");
            (gap / 10.0).min(1e-3)
        }
        _ => 1e-3,
    };
    // An f-divergence's score may be steep (α's e^{(α−1)u}): shrink the step by its largest slope.
    let steepest = (0..n)
        .flat_map(|i| [x[i] - rc[i], x[n + i] - rr[i]])
        .map(|u| cfg.f_divergence.score(u).1.abs())
        .fold(1.0f64, f64::max);
    let h = h / steepest;
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

    // Metrics from their TRL (>= 1.0) definitions: on the summed log-probs for every loss type,
    // IPO included (TRL length-normalises inside the IPO loss only).
    let chosen_r: Vec<f64> = (0..n)
        .map(|i| cfg.beta * (p.pc[i] as f64 - rc[i]))
        .collect();
    let rejected_r: Vec<f64> = (0..n)
        .map(|i| cfg.beta * (p.pr[i] as f64 - rr[i]))
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
        mean((0..n).map(|i| p.pc[i] as f64)),
    );
    assert_opt_close(
        "logps/rejected",
        m.logps_rejected,
        mean((0..n).map(|i| p.pr[i] as f64)),
    );
    assert_eq!(m.kl, None);
}

/// The smallest gap between two of the values AOT sorts (policy and reference log-ratio
/// differences for `Aot`, chosen and rejected log-ratios for `AotUnpaired`).
fn sorted_gap(x: &[f64], rc: &[f64], rr: &[f64], loss_type: DpoLossType) -> f64 {
    let n = rc.len();
    let (pc, pr) = (&x[..n], &x[n..]);
    let groups: [Vec<f64>; 2] = if loss_type == DpoLossType::Aot {
        [
            (0..n).map(|i| pc[i] - pr[i]).collect(),
            (0..n).map(|i| rc[i] - rr[i]).collect(),
        ]
    } else {
        [
            (0..n).map(|i| pc[i] - rc[i]).collect(),
            (0..n).map(|i| pr[i] - rr[i]).collect(),
        ]
    };
    let mut gap = f64::INFINITY;
    for mut g in groups {
        g.sort_by(f64::total_cmp);
        for w in g.windows(2) {
            gap = gap.min(w[1] - w[0]);
        }
    }
    gap
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
                    DpoLossType::Aot | DpoLossType::AotUnpaired => {
                        [0.0, 0.1, 0.5][seed as usize % 3]
                    }
                    DpoLossType::ExoPair => [0.001, 0.1, 0.4][seed as usize % 3],
                    _ => 0.3, // ignored
                };
                check(
                    &p,
                    DpoConfig {
                        beta,
                        label_smoothing: eps,
                        loss_type,
                        ..DpoConfig::default()
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
            ..DpoConfig::default()
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
                ..DpoConfig::default()
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
    // IPO and sigmoid_norm length-normalise: an empty sequence is an error (TRL divides by
    // clamp(count, min=1) instead), and so are missing counts, naming the loss type.
    for loss_type in [DpoLossType::Ipo, DpoLossType::SigmoidNorm] {
        let normalised = DpoConfig {
            loss_type,
            ..DpoConfig::default()
        };
        assert_eq!(
            dpo_loss(&normalised, &b).unwrap_err(),
            HaloError::EmptySequence {
                what: "chosen_counts",
                index: 1
            }
        );
        let missing = PairBatch {
            rejected_counts: None,
            ..p.batch()
        };
        match dpo_loss(&normalised, &missing).unwrap_err() {
            HaloError::MissingArgument {
                what: "rejected_counts",
                needed_by,
            } => assert!(needed_by.contains(loss_type.name()), "{needed_by}"),
            other => panic!("{loss_type:?}: {other:?}"),
        }
    }
    // Every other loss type takes the zero-token sequence (sft among them: the batch has tokens).
    for loss_type in DpoLossType::ALL {
        if !loss_type.length_normalised() {
            let cfg = DpoConfig {
                loss_type,
                label_smoothing: 0.1,
                ..DpoConfig::default()
            };
            assert!(dpo_loss(&cfg, &b).is_ok(), "{loss_type:?}");
        }
    }
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
                    discopop_tau: r.gen_range(0.01..1.0),
                    ..DpoConfig::default()
                },
                &p.batch(),
            )
            .unwrap();
            assert!(out.loss.is_finite());
            // Every loss but robust DPO is non-negative (robust's ε·logσ(−βl) term can win;
            // EXO's is a KL divergence, 0 only up to rounding where q = p).
            assert!(
                out.loss >= -1e-12 || loss_type == DpoLossType::Robust,
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
            let out = dpo_loss(&DpoConfig { beta, label_smoothing: 0.0, loss_type, ..DpoConfig::default() }, &b).unwrap();
            for i in 0..n {
                proptest::prop_assert_eq!(out.grad_chosen[i], -out.grad_rejected[i]);
                proptest::prop_assert!(out.grad_chosen[i] <= 0.0);
            }
        }
    }
}

#[test]
fn loss_type_names_are_trls_and_round_trip() {
    let names: Vec<&str> = DpoLossType::ALL.iter().map(|t| t.name()).collect();
    // TRL 1.16's list in `DPOTrainer._compute_loss`'s error message, in its order.
    assert_eq!(
        names,
        [
            "sigmoid",
            "hinge",
            "ipo",
            "exo_pair",
            "nca_pair",
            "robust",
            "bco_pair",
            "sppo_hard",
            "aot",
            "aot_unpaired",
            "apo_zero",
            "apo_down",
            "discopop",
            "sft",
            "sigmoid_norm"
        ]
    );
    for t in DpoLossType::ALL {
        assert_eq!(DpoLossType::from_name(t.name()), Some(t));
    }
    for bad in ["", "SIGMOID", "aot_pair", "kto", "sigmoid "] {
        assert_eq!(DpoLossType::from_name(bad), None, "{bad:?}");
    }
    let named = |pick: fn(&DpoLossType) -> bool| -> Vec<&str> {
        DpoLossType::ALL
            .iter()
            .filter(|t| pick(t))
            .map(|t| t.name())
            .collect()
    };
    assert_eq!(
        named(DpoLossType::needs_counts),
        ["ipo", "sft", "sigmoid_norm"]
    );
    assert_eq!(
        named(DpoLossType::length_normalised),
        ["ipo", "sigmoid_norm"]
    );
    assert_eq!(
        named(DpoLossType::couples_pairs),
        ["aot", "aot_unpaired", "sft"]
    );
}

#[test]
fn new_loss_types_refuse_their_bad_hyper_parameters() {
    let p = pairs(9, 4);
    let b = p.batch();
    let exo = |eps: f64| DpoConfig {
        loss_type: DpoLossType::ExoPair,
        label_smoothing: eps,
        ..DpoConfig::default()
    };
    for eps in [0.0, 1.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
        match dpo_loss(&exo(eps), &b).unwrap_err() {
            HaloError::InvalidHyperParameter { name, .. } => assert_eq!(name, "label_smoothing"),
            other => panic!("exo eps {eps}: {other:?}"),
        }
    }
    assert!(dpo_loss(&exo(1e-9), &b).is_ok());
    for tau in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let cfg = DpoConfig {
            loss_type: DpoLossType::Discopop,
            discopop_tau: tau,
            ..DpoConfig::default()
        };
        match dpo_loss(&cfg, &b).unwrap_err() {
            HaloError::InvalidHyperParameter { name, .. } => assert_eq!(name, "discopop_tau"),
            other => panic!("tau {tau}: {other:?}"),
        }
        // τ is DiscoPOP's alone: the other types ignore it.
        let sigmoid = DpoConfig {
            discopop_tau: tau,
            ..DpoConfig::default()
        };
        assert!(dpo_loss(&sigmoid, &b).is_ok());
    }
    for (loss_type, eps) in [(DpoLossType::Aot, 1.01), (DpoLossType::AotUnpaired, -0.5)] {
        let cfg = DpoConfig {
            loss_type,
            label_smoothing: eps,
            ..DpoConfig::default()
        };
        assert!(matches!(
            dpo_loss(&cfg, &b).unwrap_err(),
            HaloError::InvalidHyperParameter {
                name: "label_smoothing",
                ..
            }
        ));
    }
}

#[test]
fn sft_needs_chosen_tokens() {
    let p = pairs(10, 3);
    let sft = DpoConfig {
        loss_type: DpoLossType::Sft,
        ..DpoConfig::default()
    };
    let b = PairBatch {
        chosen_counts: None,
        ..p.batch()
    };
    assert!(matches!(
        dpo_loss(&sft, &b).unwrap_err(),
        HaloError::MissingArgument {
            what: "chosen_counts",
            ..
        }
    ));
    // The rejected counts are not needed, and a chosen sequence without tokens is allowed
    // (its log-prob is 0) as long as the batch has some.
    let some = [0u32, 5, 0];
    let pc = [0.0f32, -7.5, 0.0];
    let out = dpo_loss(
        &sft,
        &PairBatch {
            policy_chosen_logps: &pc,
            chosen_counts: Some(&some),
            rejected_counts: None,
            ..p.batch()
        },
    )
    .unwrap();
    assert_close("sft nll", out.loss, 1.5, 1e-12, 0.0);
    for g in &out.grad_chosen {
        assert_close("sft grad", *g as f64, -1.0 / 5.0, 1e-7, 0.0);
    }
    assert!(out.grad_rejected.iter().all(|&g| g == 0.0));
    let none = [0u32; 3];
    assert!(matches!(
        dpo_loss(
            &sft,
            &PairBatch {
                chosen_counts: Some(&none),
                ..p.batch()
            }
        )
        .unwrap_err(),
        HaloError::EmptyBatch(_)
    ));
}

#[test]
fn aot_is_invariant_to_the_order_of_pairs() {
    // Sorting makes the batch a multiset: shuffling the pairs permutes the gradients alike.
    let p = pairs(11, 9);
    let perm = [4usize, 0, 8, 2, 7, 1, 6, 3, 5];
    let shuffle = |v: &[f32]| perm.iter().map(|&i| v[i]).collect::<Vec<f32>>();
    let (pc, pr, rc, rr) = (
        shuffle(&p.pc),
        shuffle(&p.pr),
        shuffle(&p.rc),
        shuffle(&p.rr),
    );
    for loss_type in [DpoLossType::Aot, DpoLossType::AotUnpaired] {
        let cfg = DpoConfig {
            loss_type,
            label_smoothing: 0.1,
            beta: 0.3,
            ..DpoConfig::default()
        };
        let base = dpo_loss(&cfg, &p.batch()).unwrap();
        let shuffled = dpo_loss(
            &cfg,
            &PairBatch {
                policy_chosen_logps: &pc,
                policy_rejected_logps: &pr,
                reference_chosen_logps: &rc,
                reference_rejected_logps: &rr,
                chosen_counts: None,
                rejected_counts: None,
            },
        )
        .unwrap();
        assert_close("aot loss", shuffled.loss, base.loss, 1e-12, 1e-15);
        for (k, &i) in perm.iter().enumerate() {
            assert_eq!(shuffled.grad_chosen[k], base.grad_chosen[i]);
            assert_eq!(shuffled.grad_rejected[k], base.grad_rejected[i]);
        }
        // It is not the per-pair sigmoid loss: sorting re-pairs the values.
        let sigmoid = dpo_loss(
            &DpoConfig {
                loss_type: DpoLossType::Sigmoid,
                ..cfg
            },
            &p.batch(),
        )
        .unwrap();
        assert!((sigmoid.loss - base.loss).abs() > 1e-6, "{loss_type:?}");
    }
}

#[test]
fn discopop_is_finite_where_the_literal_formula_is_not() {
    // βh = −1000 with τ = 0.05: e^{1000}·σ(−20000) is inf·0 = NaN written literally (as TRL's
    // f32 code gives for βh below about −88); the value is −logσ(−1000) ≈ 1000.
    let cfg = DpoConfig {
        loss_type: DpoLossType::Discopop,
        beta: 1.0,
        ..DpoConfig::default()
    };
    let batch = PairBatch {
        policy_chosen_logps: &[-1001.0],
        policy_rejected_logps: &[-1.0],
        reference_chosen_logps: &[-1.0],
        reference_rejected_logps: &[-1.0],
        chosen_counts: None,
        rejected_counts: None,
    };
    let literal = dpo_loss_ref(
        "discopop",
        1.0,
        0.0,
        &[-1001.0],
        &[-1.0],
        &[-1.0],
        &[-1.0],
        &[],
        &[],
    );
    assert!(literal.is_nan(), "{literal}");
    let out = dpo_loss(&cfg, &batch).unwrap();
    assert_close("discopop tail", out.loss, 1000.0, 1e-12, 0.0);
    assert_close(
        "discopop tail grad",
        out.grad_chosen[0] as f64,
        -1.0,
        1e-7,
        0.0,
    );
    // With τ > 1 the exponential term really is huge: e^{1000·(1 − 1/2)} overflows f32
    // gradients, and that is an error, not an inf.
    let wide = DpoConfig {
        discopop_tau: 2.0,
        ..cfg
    };
    assert!(matches!(
        dpo_loss(&wide, &batch).unwrap_err(),
        HaloError::NonFinite { .. }
    ));
}

const F_DIVERGENCES: [FDivergence; 5] = [
    FDivergence::ForwardKl,
    FDivergence::JsDivergence,
    FDivergence::Alpha { coef: 0.5 },
    FDivergence::Alpha { coef: 1.7 },
    FDivergence::Alpha { coef: -0.4 },
];

#[test]
fn f_divergences_match_reference_for_every_loss_type_that_has_them() {
    // Log-ratios within ±8 or so: forward KL's e^{−u} and α's e^{(α−1)u} stay moderate.
    let mut r = rng(12);
    for n in [1usize, 6, 33] {
        let pc = logps(&mut r, n, -80.0, -3.0);
        let pr = logps(&mut r, n, -80.0, -3.0);
        let p = Pairs {
            rc: perturbed(&mut r, &pc, 4.0),
            rr: perturbed(&mut r, &pr, 4.0),
            cc: counts(&mut r, n),
            cr: counts(&mut r, n),
            pc,
            pr,
        };
        for f in F_DIVERGENCES {
            for loss_type in ALL {
                let cfg = DpoConfig {
                    beta: 0.4,
                    label_smoothing: 0.15,
                    loss_type,
                    f_divergence: f,
                    ..DpoConfig::default()
                };
                if f.supports(loss_type) {
                    check(&p, cfg);
                } else {
                    match dpo_loss(&cfg, &p.batch()).unwrap_err() {
                        HaloError::Unsupported(msg) => {
                            assert!(msg.contains(f.name()) && msg.contains(loss_type.name()))
                        }
                        other => panic!("{f:?} {loss_type:?}: {other:?}"),
                    }
                }
            }
        }
    }
    // Exactly TRL's list has an f-DPO form.
    let with_form: Vec<&str> = ALL
        .iter()
        .filter(|t| FDivergence::ForwardKl.supports(**t))
        .map(|t| t.name())
        .collect();
    assert_eq!(
        with_form,
        [
            "sigmoid",
            "hinge",
            "ipo",
            "exo_pair",
            "robust",
            "discopop",
            "sft",
            "sigmoid_norm"
        ]
    );
    // Reverse KL is plain DPO, and α → 1 is its limit.
    let p = pairs(13, 5);
    let plain = dpo_loss(&DpoConfig::default(), &p.batch()).unwrap();
    for f in [FDivergence::ReverseKl, FDivergence::Alpha { coef: 1.0 }] {
        let out = dpo_loss(
            &DpoConfig {
                f_divergence: f,
                ..DpoConfig::default()
            },
            &p.batch(),
        )
        .unwrap();
        assert_eq!(out, plain, "{f:?}");
    }
    // A non-finite α is refused.
    let bad = DpoConfig {
        f_divergence: FDivergence::Alpha { coef: f64::NAN },
        ..DpoConfig::default()
    };
    assert!(matches!(
        dpo_loss(&bad, &p.batch()).unwrap_err(),
        HaloError::InvalidHyperParameter {
            name: "f_alpha_divergence_coef",
            ..
        }
    ));
}

#[test]
fn only_the_coupled_loss_types_differ_from_their_pairs_alone() {
    // A per-pair loss of a batch is the mean of the pairs' own losses, and its gradient is theirs
    // over n: what gradient accumulation over micro-batches relies on. AOT (sorted over the batch)
    // and SFT (a token mean over the batch) are not.
    let p = pairs(14, 6);
    let n = p.pc.len();
    for loss_type in ALL {
        let cfg = DpoConfig {
            loss_type,
            beta: 0.3,
            label_smoothing: 0.1,
            ..DpoConfig::default()
        };
        let whole = dpo_loss(&cfg, &p.batch()).unwrap();
        let mut mean = 0.0;
        let mut max_grad_gap = 0.0f64;
        for i in 0..n {
            let one = dpo_loss(
                &cfg,
                &PairBatch {
                    policy_chosen_logps: &p.pc[i..=i],
                    policy_rejected_logps: &p.pr[i..=i],
                    reference_chosen_logps: &p.rc[i..=i],
                    reference_rejected_logps: &p.rr[i..=i],
                    chosen_counts: Some(&p.cc[i..=i]),
                    rejected_counts: Some(&p.cr[i..=i]),
                },
            )
            .unwrap();
            mean += one.loss / n as f64;
            let gap = (one.grad_chosen[0] as f64 / n as f64 - whole.grad_chosen[i] as f64).abs()
                / (whole.grad_chosen[i] as f64).abs().max(1e-30);
            max_grad_gap = max_grad_gap.max(gap);
        }
        let loss_gap = (mean - whole.loss).abs() / whole.loss.abs();
        if loss_type.couples_pairs() {
            assert!(
                loss_gap > 1e-6 || max_grad_gap > 1e-3,
                "{loss_type:?} decomposes"
            );
        } else {
            assert!(loss_gap < 1e-12, "{loss_type:?}: loss {loss_gap}");
            assert!(max_grad_gap < 1e-6, "{loss_type:?}: grad {max_grad_gap}");
        }
    }
}
