//! A whole KTO step through the emulated kernels — logits → per-token log-probs → per-sequence sums
//! → loss and ∂L/∂logp_seq → token gradients → ∂L/∂logits — against the same step through the CPU
//! ops and the CPU loss.

mod emulated_support;

use emulated_support::*;
use half::bf16;
use halo_kernels::cpu::{self, SequenceLayout};
use halo_kernels::emulation as emu;
use halo_kernels::losses::{self, KlInput, KtoBatch, KtoConfig};
use rand::Rng;

struct Step {
    loss: f64,
    grad_logits: Vec<f32>,
}

/// One KTO step; `gpu` selects the emulated kernels, else the CPU twins.
fn kto_step(
    gpu: bool,
    logits: &[bf16],
    ref_logp: &[f32],
    labels: &[i32],
    vocab: usize,
    batch: usize,
    desirable: &[bool],
) -> Step {
    let seq = labels.len() / batch;
    let layout = SequenceLayout::Padded { batch, seq };
    let tok = if gpu {
        emu::token_logprobs(logits, labels, vocab, IGNORE).unwrap()
    } else {
        cpu::token_logprobs(logits, labels, vocab, IGNORE).unwrap()
    };
    let sums = |values: &[f32]| {
        if gpu {
            emu::sequence_sums(values, labels, IGNORE, layout).unwrap()
        } else {
            cpu::sequence_sums(values, labels, IGNORE, layout).unwrap()
        }
    };
    let policy = sums(&tok.logp).sums;
    let reference = sums(ref_logp).sums;
    // KL pairs: each example's completion scored against the next prompt — here simply the
    // sequences rotated by one, which is what a mismatched pairing produces for the sums.
    let kl_policy: Vec<f32> = (0..batch).map(|i| policy[(i + 1) % batch] - 0.5).collect();
    let kl_reference: Vec<f32> = (0..batch).map(|i| reference[(i + 1) % batch]).collect();
    let config = KtoConfig::default();
    let kto_batch = KtoBatch {
        policy_logps: &policy,
        reference_logps: &reference,
        is_desirable: desirable,
        kl: Some(KlInput::LogProbs {
            policy: &kl_policy,
            reference: &kl_reference,
        }),
    };
    let out = if gpu {
        emu::kto_loss(&config, &kto_batch).unwrap()
    } else {
        losses::kto_loss(&config, &kto_batch).unwrap()
    };
    let token_grad = if gpu {
        emu::broadcast_sequence_grad(&out.grad_policy_logps, labels, IGNORE, layout).unwrap()
    } else {
        cpu::broadcast_sequence_grad(&out.grad_policy_logps, labels, IGNORE, layout).unwrap()
    };
    let mut grad_logits = logits.to_vec();
    if gpu {
        emu::token_logprobs_backward_inplace(
            &mut grad_logits,
            labels,
            &tok.lse,
            &token_grad,
            vocab,
            IGNORE,
        )
        .unwrap();
    } else {
        cpu::token_logprobs_backward_inplace(
            &mut grad_logits,
            labels,
            &tok.lse,
            &token_grad,
            vocab,
            IGNORE,
        )
        .unwrap();
    }
    Step {
        loss: out.loss,
        grad_logits: to_f32(&grad_logits),
    }
}

#[test]
fn kto_step_matches_the_cpu_step() {
    let mut r = rng(900);
    let (batch, seq, vocab) = (6, 40, 515);
    let logits: Vec<bf16> = random_logits(&mut r, batch * seq * vocab, 6.0);
    let mut labels = random_labels(&mut r, batch * seq, vocab, 0.0);
    // Prompt tokens are ignored: the first 10..20 positions of every sequence.
    for b in 0..batch {
        let prompt = r.gen_range(10..20);
        labels[b * seq..b * seq + prompt].fill(IGNORE);
    }
    let ref_logp: Vec<f32> = labels
        .iter()
        .map(|&y| {
            if y == IGNORE {
                0.0
            } else {
                r.gen_range(-9.0f32..-0.5)
            }
        })
        .collect();
    let desirable = [true, false, true, true, false, false];

    let gpu = kto_step(true, &logits, &ref_logp, &labels, vocab, batch, &desirable);
    let cpu = kto_step(false, &logits, &ref_logp, &labels, vocab, batch, &desirable);
    assert!(
        (gpu.loss - cpu.loss).abs() < 1e-5 * (1.0 + cpu.loss.abs()),
        "loss {} vs {}",
        gpu.loss,
        cpu.loss
    );
    // bf16 gradients: one bf16 rounding step apart at most, plus a small absolute slack.
    assert_close(
        "grad_logits",
        &gpu.grad_logits,
        &cpu.grad_logits,
        1e-9,
        1.0 / 64.0,
    );
    assert!(
        gpu.grad_logits.iter().any(|&g| g != 0.0),
        "the step produced a gradient"
    );
}
