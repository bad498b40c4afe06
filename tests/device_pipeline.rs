//! A whole KTO step — logits → per-token log-probs → per-sequence sums → loss and ∂L/∂logp_seq →
//! token gradients → ∂L/∂logits — on every device (CPU; CUDA, real or emulated), against the same
//! step computed in f64 straight from the definitions (log-softmax, sums, TRL's KTO loss).

mod device_support;

use device_support::*;
use half::bf16;
use halo_kernels::cpu::SequenceLayout;
use halo_kernels::losses::reference::{kto_loss_ref, kto_z0_ref, sigmoid_ref};
use halo_kernels::losses::{KlInput, KtoBatch, KtoConfig};
use rand::Rng;

struct Inputs {
    batch: usize,
    seq: usize,
    vocab: usize,
    logits: Vec<bf16>,
    labels: Vec<i32>,
    ref_logp: Vec<f32>,
    desirable: Vec<bool>,
}

fn inputs(seed: u64, batch: usize, seq: usize, vocab: usize) -> Inputs {
    let mut r = rng(seed);
    let logits: Vec<bf16> = random_logits(&mut r, batch * seq * vocab, 6.0);
    let mut labels = random_labels(&mut r, batch * seq, vocab, 0.0);
    // Prompt tokens are ignored: the first 10..20 positions of every sequence.
    for b in 0..batch {
        let prompt = r.gen_range(10..20);
        labels[b * seq..b * seq + prompt].fill(IGNORE);
    }
    let ref_logp = labels
        .iter()
        .map(|&y| {
            if y == IGNORE {
                0.0
            } else {
                r.gen_range(-9.0f32..-0.5)
            }
        })
        .collect();
    let desirable = (0..batch).map(|b| b % 3 != 1).collect();
    Inputs {
        batch,
        seq,
        vocab,
        logits,
        labels,
        ref_logp,
        desirable,
    }
}

/// KL pairs of a batch: each example's completion scored against the next prompt — here the
/// reference sums rotated by one, with the policy a little above them, so that z0 > 0 (the clamp
/// is not what this test exercises; the pairs' own forward pass is not part of the step).
fn kl_pairs<T: Copy + Into<f64>>(reference: &[T]) -> (Vec<f64>, Vec<f64>) {
    let n = reference.len();
    let r: Vec<f64> = (0..n).map(|i| reference[(i + 1) % n].into()).collect();
    let p = r
        .iter()
        .enumerate()
        .map(|(i, v)| v + 0.25 * i as f64 + 0.5)
        .collect();
    (p, r)
}

/// The step in f64 from the definitions: (loss, ∂L/∂logits).
fn reference_step(x: &Inputs) -> (f64, Vec<f64>) {
    let (rows, vocab) = (x.batch * x.seq, x.vocab);
    let z: Vec<f64> = x.logits.iter().map(|v| v.to_f32() as f64).collect();
    let mut logp = vec![0.0f64; rows];
    let mut lse = vec![0.0f64; rows];
    for t in 0..rows {
        if x.labels[t] == IGNORE {
            continue;
        }
        let row = &z[t * vocab..(t + 1) * vocab];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        lse[t] = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        logp[t] = row[x.labels[t] as usize] - lse[t];
    }
    let seq_sum = |v: &[f64]| -> Vec<f64> {
        (0..x.batch)
            .map(|b| v[b * x.seq..(b + 1) * x.seq].iter().sum())
            .collect()
    };
    let ref64: Vec<f64> = x.ref_logp.iter().map(|&v| v as f64).collect();
    let policy = seq_sum(&logp);
    let reference = seq_sum(&ref64);
    let (kl_p, kl_r) = kl_pairs(&reference);
    let z0 = kto_z0_ref(&kl_p, &kl_r);
    let beta = 0.1;
    let loss = kto_loss_ref(&policy, &reference, &x.desirable, z0, beta, 1.0, 1.0, false);
    // ∂/∂policy_i of mean λ(1 − σ(±β(r − z0))) with z0 detached: ∓β σ'(·) / n.
    let n = x.batch as f64;
    let grad_seq: Vec<f64> = (0..x.batch)
        .map(|i| {
            let h = beta * (policy[i] - reference[i] - z0);
            let s = if x.desirable[i] {
                sigmoid_ref(h)
            } else {
                sigmoid_ref(-h)
            };
            let sign = if x.desirable[i] { -1.0 } else { 1.0 };
            sign * beta * s * (1.0 - s) / n
        })
        .collect();
    let mut grad = vec![0.0f64; rows * vocab];
    for t in 0..rows {
        if x.labels[t] == IGNORE {
            continue;
        }
        let g = grad_seq[t / x.seq];
        for v in 0..vocab {
            let p = (z[t * vocab + v] - lse[t]).exp();
            let one = if v as i32 == x.labels[t] { 1.0 } else { 0.0 };
            grad[t * vocab + v] = g * (one - p);
        }
    }
    (loss, grad)
}

/// The step on device `d`: (loss, ∂L/∂logits as f32).
fn device_step<D: Device>(d: &D, x: &Inputs) -> (f64, Vec<f32>) {
    let layout = SequenceLayout::Padded {
        batch: x.batch,
        seq: x.seq,
    };
    let tok = d
        .token_logprobs(&x.logits, &x.labels, x.vocab, IGNORE)
        .unwrap();
    let policy = d
        .sequence_sums(&tok.logp, &x.labels, IGNORE, layout)
        .unwrap()
        .sums;
    let reference = d
        .sequence_sums(&x.ref_logp, &x.labels, IGNORE, layout)
        .unwrap()
        .sums;
    let (kl_p, kl_r) = kl_pairs(&reference);
    let kl_p: Vec<f32> = kl_p.iter().map(|&v| v as f32).collect();
    let kl_r: Vec<f32> = kl_r.iter().map(|&v| v as f32).collect();
    let out = d
        .kto_loss(
            &KtoConfig::default(),
            &KtoBatch {
                policy_logps: &policy,
                reference_logps: &reference,
                is_desirable: &x.desirable,
                kl: Some(KlInput::LogProbs {
                    policy: &kl_p,
                    reference: &kl_r,
                }),
            },
        )
        .unwrap();
    assert!(out.z0 > 0.0, "the KL pairs give a positive reference point");
    let token_grad = d
        .broadcast_sequence_grad(&out.grad_policy_logps, &x.labels, IGNORE, layout)
        .unwrap();
    let mut grad_logits = x.logits.clone();
    d.token_logprobs_backward_inplace(
        &mut grad_logits,
        &x.labels,
        &tok.lse,
        &token_grad,
        x.vocab,
        IGNORE,
    )
    .unwrap();
    (out.loss, to_f32(&grad_logits))
}

fn kto_step_matches_the_f64_step<D: Device>(d: &D) {
    let x = inputs(900, 6, 40, 515);
    let (want_loss, want_grad) = reference_step(&x);
    let (loss, grad) = device_step(d, &x);
    assert!(
        (loss - want_loss).abs() < 1e-5 * (1.0 + want_loss.abs()),
        "{}: loss {loss} vs f64 {want_loss}",
        d.name()
    );
    // bf16 gradients: one bf16 rounding (2^-8 relative) of the f64 value, plus f32 slack.
    let want: Vec<f32> = want_grad.iter().map(|&g| g as f32).collect();
    assert_close("grad_logits", &grad, &want, 1e-9, 1.0 / 128.0);
    assert!(
        grad.iter().any(|&g| g != 0.0),
        "the step produced a gradient"
    );
}

device_tests!(kto_step_matches_the_f64_step);
