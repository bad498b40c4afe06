//! The loss heads from hidden states (`kto_head_step`, `dpo_head_step`) against the step from
//! materialized logits (`step::kto_step` / `dpo_step` on logits computed in the test, then
//! `∂hidden = ∂z · W`, `∂W = ∂zᵀ · h` in f64), padded and packed, reference given or from hidden.

mod fused_support;

use fused_support::{max_abs_diff, Problem};
use halo_kernels::cpu::{sequence_sums, token_logprobs, SequenceLayout};
use halo_kernels::fused_head::{
    dpo_head_step, kto_head_step, FusedChunks, HeadStep, HiddenBatch, KlSource, KtoHeadInputs,
    ReferenceSource,
};
use halo_kernels::losses::{DpoConfig, DpoLossType, KlInput, KtoConfig};
use halo_kernels::step::{dpo_step, kto_step, Logits, PairReference};
use halo_kernels::{HaloError, IGNORE_INDEX};

const CHUNKS: Option<FusedChunks> = Some(FusedChunks {
    row_tile: 3,
    vocab_tile: 7,
    vocab_groups: 3,
});

fn logits_f32(p: &Problem<f32>) -> Vec<f32> {
    p.logits_f64().iter().map(|&x| x as f32).collect()
}

/// Summed log-probs per sequence through the materialized path.
fn sums(p: &Problem<f32>, layout: SequenceLayout<'_>) -> Vec<f32> {
    let t = token_logprobs(&logits_f32(p), &p.labels, p.vocab, IGNORE_INDEX).unwrap();
    sequence_sums(&t.logp, &p.labels, IGNORE_INDEX, layout)
        .unwrap()
        .sums
}

/// Compares a head step's gradients with ∂z (the materialized step's `grad_logits`) pushed
/// through the head in f64.
fn check_grads<L>(p: &Problem<f32>, step: &HeadStep<L>, grad_logits: &[f32], ctx: &str) {
    let (rows, vocab, h) = (p.rows, p.vocab, p.h);
    let mut dh = vec![0.0f64; rows * h];
    let mut dw = vec![0.0f64; vocab * h];
    for r in 0..rows {
        for v in 0..vocab {
            let g = grad_logits[r * vocab + v] as f64;
            for k in 0..h {
                dh[r * h + k] += g * p.weight[v * h + k] as f64;
                dw[v * h + k] += g * p.hidden[r * h + k] as f64;
            }
        }
    }
    let scale = dh
        .iter()
        .chain(&dw)
        .fold(0.0f64, |m, x| m.max(x.abs()))
        .max(1e-3);
    let d = max_abs_diff(step.grads.hidden.iter().map(|&x| x as f64), dh);
    assert!(d < 1e-4 * scale, "{ctx}: ∂hidden {d} (scale {scale})");
    let d = max_abs_diff(step.grads.weight.iter().map(|&x| x as f64), dw);
    assert!(d < 1e-4 * scale, "{ctx}: ∂weight {d} (scale {scale})");
}

fn layouts(cu: &[u32]) -> [SequenceLayout<'_>; 2] {
    [
        SequenceLayout::Padded { batch: 4, seq: 6 },
        SequenceLayout::Packed { cu_seqlens: cu },
    ]
}

#[test]
fn kto_head_matches_the_step_from_logits() {
    let cu = [0u32, 4, 11, 17, 24];
    let policy = Problem::<f32>::random(1, 24, 29, 9, true, 5);
    let mut reference = Problem::<f32>::random(2, 24, 29, 9, false, 0);
    reference.labels = policy.labels.clone();
    // KL pairs: other hidden states and labels, through the same two heads.
    let mut kl_policy = Problem::<f32>::random(3, 24, 29, 9, false, 4);
    (kl_policy.weight, kl_policy.bias) = (policy.weight.clone(), policy.bias.clone());
    let mut kl_ref = Problem::<f32>::random(4, 24, 29, 9, false, 0);
    kl_ref.weight = reference.weight.clone();
    kl_ref.labels = kl_policy.labels.clone();
    let is_desirable = [true, false, false, true];
    let config = KtoConfig {
        beta: 0.3,
        desirable_weight: 1.2,
        ..KtoConfig::default()
    };
    for layout in layouts(&cu) {
        // The materialized step: every log-prob from materialized logits.
        let ref_sums = sums(&reference, layout);
        let (kl_p, kl_r) = (sums(&kl_policy, layout), sums(&kl_ref, layout));
        let z = logits_f32(&policy);
        let want = kto_step(
            &config,
            &Logits {
                logits: &z,
                labels: &policy.labels,
                vocab: policy.vocab,
                ignore_index: IGNORE_INDEX,
                layout,
            },
            &halo_kernels::step::KtoStepInputs {
                reference_logps: &ref_sums,
                is_desirable: &is_desirable,
                kl: Some(KlInput::LogProbs {
                    policy: &kl_p,
                    reference: &kl_r,
                }),
            },
        )
        .unwrap();
        let batch = HiddenBatch {
            hidden: &policy.hidden,
            labels: &policy.labels,
            ignore_index: IGNORE_INDEX,
            layout,
        };
        let kl_batch = HiddenBatch {
            hidden: &kl_policy.hidden,
            labels: &kl_policy.labels,
            ignore_index: IGNORE_INDEX,
            layout,
        };
        let from_hidden = KtoHeadInputs {
            reference: ReferenceSource::Hidden {
                hidden: &reference.hidden,
                head: reference.head(),
            },
            is_desirable: &is_desirable,
            kl: Some(KlSource::Hidden {
                policy: kl_batch,
                reference: ReferenceSource::Hidden {
                    hidden: &kl_ref.hidden,
                    head: kl_ref.head(),
                },
            }),
        };
        let given = KtoHeadInputs {
            reference: ReferenceSource::Sums(&ref_sums),
            is_desirable: &is_desirable,
            kl: Some(KlSource::Given(KlInput::LogProbs {
                policy: &kl_p,
                reference: &kl_r,
            })),
        };
        for (name, inputs, chunks) in [("from hidden", from_hidden, CHUNKS), ("given", given, None)]
        {
            let ctx = format!("{layout:?} {name}");
            let got = kto_head_step(&config, &batch, &policy.head(), &inputs, chunks).unwrap();
            assert!(
                (got.loss.loss - want.loss.loss).abs() < 1e-5,
                "{ctx}: loss {} vs {}",
                got.loss.loss,
                want.loss.loss
            );
            assert!((got.loss.z0 - want.loss.z0).abs() < 1e-5, "{ctx}: z0");
            let d = max_abs_diff(
                got.policy_logps.iter().map(|&x| x as f64),
                want.policy_logps.iter().map(|&x| x as f64),
            );
            assert!(d < 1e-4, "{ctx}: policy_logps {d}");
            let d = max_abs_diff(
                got.reference_logps.iter().map(|&x| x as f64),
                ref_sums.iter().map(|&x| x as f64),
            );
            assert!(d < 1e-4, "{ctx}: reference_logps {d}");
            let d = max_abs_diff(
                got.token_logps.iter().map(|&x| x as f64),
                want.token_logps.iter().map(|&x| x as f64),
            );
            assert!(d < 1e-5, "{ctx}: token_logps {d}");
            assert_eq!(got.token_counts, want.token_counts);
            let d = max_abs_diff(
                [got.loss.metrics.rewards_chosen.expect("metric")],
                [want.loss.metrics.rewards_chosen.expect("metric")],
            );
            assert!(d < 1e-5, "{ctx}: rewards/chosen {d}");
            check_grads(&policy, &got, &want.grad_logits, &ctx);
        }
    }
}

#[test]
fn dpo_head_matches_the_step_from_logits() {
    let cu = [0u32, 5, 9, 17, 24];
    let policy = Problem::<f32>::random(11, 24, 23, 5, false, 3);
    let mut reference = Problem::<f32>::random(12, 24, 23, 5, true, 0);
    reference.labels = policy.labels.clone();
    for loss_type in [DpoLossType::Sigmoid, DpoLossType::Ipo] {
        let config = DpoConfig {
            beta: 0.2,
            loss_type,
            ..DpoConfig::default()
        };
        for layout in layouts(&cu) {
            let ref_sums = sums(&reference, layout);
            let z = logits_f32(&policy);
            let want = dpo_step(
                &config,
                &Logits {
                    logits: &z,
                    labels: &policy.labels,
                    vocab: policy.vocab,
                    ignore_index: IGNORE_INDEX,
                    layout,
                },
                &PairReference {
                    chosen_logps: &ref_sums[..2],
                    rejected_logps: &ref_sums[2..],
                },
            )
            .unwrap();
            let batch = HiddenBatch {
                hidden: &policy.hidden,
                labels: &policy.labels,
                ignore_index: IGNORE_INDEX,
                layout,
            };
            for (name, source) in [
                (
                    "from hidden",
                    ReferenceSource::Hidden {
                        hidden: &reference.hidden,
                        head: reference.head(),
                    },
                ),
                ("given", ReferenceSource::Sums(&ref_sums)),
            ] {
                let ctx = format!("{loss_type:?} {layout:?} {name}");
                let got = dpo_head_step(&config, &batch, &policy.head(), &source, CHUNKS).unwrap();
                assert!((got.loss.loss - want.loss.loss).abs() < 1e-5, "{ctx}: loss");
                let d = max_abs_diff(
                    [got.loss.metrics.rewards_margins.expect("metric")],
                    [want.loss.metrics.rewards_margins.expect("metric")],
                );
                assert!(d < 1e-5, "{ctx}: margins {d}");
                check_grads(&policy, &got, &want.grad_logits, &ctx);
            }
        }
    }
}

#[test]
fn bad_batches_are_errors() {
    let p = Problem::<f32>::random(21, 6, 7, 3, false, 0);
    let layout = SequenceLayout::Padded { batch: 3, seq: 2 };
    let batch = HiddenBatch {
        hidden: &p.hidden,
        labels: &p.labels,
        ignore_index: IGNORE_INDEX,
        layout,
    };
    let err = dpo_head_step(
        &DpoConfig::default(),
        &batch,
        &p.head(),
        &ReferenceSource::Sums(&[0.0; 3]),
        None,
    );
    assert!(matches!(err.unwrap_err(), HaloError::InvalidShape(_)));
    let batch = HiddenBatch {
        layout: SequenceLayout::Padded { batch: 2, seq: 3 },
        ..batch
    };
    let err = dpo_head_step(
        &DpoConfig::default(),
        &batch,
        &p.head(),
        &ReferenceSource::Sums(&[0.0; 3]),
        None,
    );
    assert!(matches!(err.unwrap_err(), HaloError::LengthMismatch { .. }));
    let inputs = KtoHeadInputs::<f32> {
        reference: ReferenceSource::Sums(&[-1.0, -2.0]),
        is_desirable: &[true, false],
        kl: None,
    };
    let err = kto_head_step(&KtoConfig::default(), &batch, &p.head(), &inputs, None);
    assert!(matches!(err.unwrap_err(), HaloError::MissingKlPairs { .. }));
}
