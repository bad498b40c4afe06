//! Whole training steps through the step helper (`halo_kernels::step`, and its CUDA twin
//! `CudaBackend::{kto_step, dpo_step}`) — logits → per-token log-probs → per-sequence sums → loss
//! and ∂L/∂logp_seq → token gradients → ∂L/∂logits — on every device (CPU; CUDA, real or
//! emulated), against the same step computed in f64 straight from the definitions: log-softmax,
//! sums, TRL's KTO / DPO losses, their derivatives by central differences of the f64 loss, and
//! `∂L/∂z_t[v] = g_seq · (1[v = y_t] − softmax(z_t)[v])`.

mod device_support;

use device_support::*;
use half::bf16;
use halo_kernels::cpu::SequenceLayout;
use halo_kernels::losses::reference::{
    dpo_loss_ref, finite_difference_gradient, kto_loss_ref, kto_z0_ref,
};
use halo_kernels::losses::{DpoConfig, DpoLossType, KlInput, KtoConfig};
use halo_kernels::step::{KtoStepInputs, Logits, PairReference};
use rand::Rng;

/// A batch of `batch` sequences of `seq` rows, as padded rows; `packed` gives the same rows as
/// `cu_seqlens` with every sequence trimmed to its length (no padding rows).
struct Inputs {
    batch: usize,
    vocab: usize,
    logits: Vec<bf16>,
    labels: Vec<i32>,
    /// Row range of each sequence.
    ranges: Vec<std::ops::Range<usize>>,
    cu_seqlens: Option<Vec<u32>>,
    seq: usize,
    reference_token_logp: Vec<f32>,
}

impl Inputs {
    fn layout(&self) -> SequenceLayout<'_> {
        match &self.cu_seqlens {
            Some(cu) => SequenceLayout::Packed { cu_seqlens: cu },
            None => SequenceLayout::Padded {
                batch: self.batch,
                seq: self.seq,
            },
        }
    }

    fn logits(&self) -> Logits<'_, bf16> {
        Logits {
            logits: &self.logits,
            labels: &self.labels,
            vocab: self.vocab,
            ignore_index: IGNORE,
            layout: self.layout(),
        }
    }

    /// The reference's summed log-probs per sequence (f32, as a caller would hold them).
    fn reference_sums(&self) -> Vec<f32> {
        self.ranges
            .iter()
            .map(|r| self.reference_token_logp[r.clone()].iter().sum())
            .collect()
    }
}

fn inputs(seed: u64, batch: usize, seq: usize, vocab: usize, packed: bool) -> Inputs {
    let mut r = rng(seed);
    let lengths: Vec<usize> = (0..batch)
        .map(|_| if packed { r.gen_range(12..=seq) } else { seq })
        .collect();
    let rows: usize = lengths.iter().sum();
    let mut ranges = Vec::new();
    let mut start = 0;
    for &len in &lengths {
        ranges.push(start..start + len);
        start += len;
    }
    let logits: Vec<bf16> = random_logits(&mut r, rows * vocab, 6.0);
    let mut labels = random_labels(&mut r, rows, vocab, 0.0);
    // Prompt tokens are ignored: the first 4..10 positions of every sequence.
    for range in &ranges {
        let prompt = r.gen_range(4..10);
        labels[range.start..range.start + prompt].fill(IGNORE);
    }
    let reference_token_logp = labels
        .iter()
        .map(|&y| {
            if y == IGNORE {
                0.0
            } else {
                r.gen_range(-9.0f32..-0.5)
            }
        })
        .collect();
    let cu_seqlens = packed.then(|| {
        std::iter::once(0)
            .chain(ranges.iter().map(|r| r.end as u32))
            .collect()
    });
    Inputs {
        batch,
        vocab,
        logits,
        labels,
        ranges,
        cu_seqlens,
        seq,
        reference_token_logp,
    }
}

/// f64 per-token log-probs and logsumexps of the stored (rounded) logits.
fn reference_tokens(x: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let rows = x.labels.len();
    let mut logp = vec![0.0f64; rows];
    let mut lse = vec![0.0f64; rows];
    for t in 0..rows {
        if x.labels[t] == IGNORE {
            continue;
        }
        let row: Vec<f64> = x.logits[t * x.vocab..(t + 1) * x.vocab]
            .iter()
            .map(|v| v.to_f32() as f64)
            .collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        lse[t] = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        logp[t] = row[x.labels[t] as usize] - lse[t];
    }
    (logp, lse)
}

/// `∂L/∂logits` in f64 from one gradient per sequence.
fn reference_grad_logits(x: &Inputs, lse: &[f64], grad_seq: &[f64]) -> Vec<f64> {
    let mut grad = vec![0.0f64; x.logits.len()];
    for (b, range) in x.ranges.iter().enumerate() {
        for t in range.clone() {
            if x.labels[t] == IGNORE {
                continue;
            }
            for v in 0..x.vocab {
                let p = (x.logits[t * x.vocab + v].to_f32() as f64 - lse[t]).exp();
                let one = if v as i32 == x.labels[t] { 1.0 } else { 0.0 };
                grad[t * x.vocab + v] = grad_seq[b] * (one - p);
            }
        }
    }
    grad
}

fn check_grad_logits(what: &str, got: &[bf16], want: &[f64]) {
    // bf16 gradients: one bf16 rounding (2^-8 relative) of the f64 value, plus f32 slack.
    let want: Vec<f32> = want.iter().map(|&g| g as f32).collect();
    assert_close(what, &to_f32(got), &want, 1e-9, 1.0 / 128.0);
    assert!(
        got.iter().any(|g| g.to_f32() != 0.0),
        "{what}: the step produced a gradient"
    );
}

/// KL pairs of a batch: each example's completion scored against the next prompt — here the
/// reference sums rotated by one, with the policy a little above them, so that z0 > 0 (the pairs'
/// own forward pass is not part of the step).
fn kl_pairs(reference: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = reference.len();
    let r: Vec<f32> = (0..n).map(|i| reference[(i + 1) % n]).collect();
    let p = r
        .iter()
        .enumerate()
        .map(|(i, v)| v + 0.25 * i as f32 + 0.5)
        .collect();
    (p, r)
}

fn kto_step_matches_the_f64_step_on<D: Device>(d: &D, x: &Inputs) {
    let reference = x.reference_sums();
    let (kl_p, kl_r) = kl_pairs(&reference);
    let desirable: Vec<bool> = (0..x.batch).map(|b| b % 3 != 1).collect();
    let step = d
        .kto_step(
            &KtoConfig::default(),
            &x.logits(),
            &KtoStepInputs {
                reference_logps: &reference,
                is_desirable: &desirable,
                kl: Some(KlInput::LogProbs {
                    policy: &kl_p,
                    reference: &kl_r,
                }),
            },
        )
        .unwrap();

    let (logp, lse) = reference_tokens(x);
    let policy: Vec<f64> = x
        .ranges
        .iter()
        .map(|r| logp[r.clone()].iter().sum())
        .collect();
    let reference64: Vec<f64> = reference.iter().map(|&v| v as f64).collect();
    let z0 = kto_z0_ref(
        &kl_p.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &kl_r.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    );
    assert!(z0 > 0.0, "the KL pairs give a positive reference point");
    let loss = |p: &[f64]| kto_loss_ref(p, &reference64, &desirable, z0, 0.1, 1.0, 1.0, false);
    let want_loss = loss(&policy);
    assert!(
        (step.loss.loss - want_loss).abs() < 1e-5 * (1.0 + want_loss.abs()),
        "{}: loss {} vs f64 {want_loss}",
        d.name(),
        step.loss.loss
    );
    assert!(
        (step.loss.z0 - z0).abs() < 1e-5,
        "z0 {} vs {z0}",
        step.loss.z0
    );
    let policy32: Vec<f32> = policy.iter().map(|&v| v as f32).collect();
    assert_close("policy_logps", &step.policy_logps, &policy32, 1e-4, 1e-5);
    let logp32: Vec<f32> = logp.iter().map(|&v| v as f32).collect();
    assert_close("token_logps", &step.token_logps, &logp32, 1e-5, 1e-5);
    let grad_seq = finite_difference_gradient(loss, &policy, 1e-3);
    check_grad_logits(
        "kto grad_logits",
        &step.grad_logits,
        &reference_grad_logits(x, &lse, &grad_seq),
    );
}

fn dpo_step_matches_the_f64_step_on<D: Device>(d: &D, x: &Inputs, loss_type: DpoLossType) {
    let name = loss_type.name();
    let n = x.batch / 2;
    let reference = x.reference_sums();
    let config = DpoConfig {
        loss_type,
        // Used by sigmoid, robust, exo_pair (which needs ε > 0) and AOT; ignored by the others.
        label_smoothing: 0.1,
        ..DpoConfig::default()
    };
    let step = d
        .dpo_step(
            &config,
            &x.logits(),
            &PairReference {
                chosen_logps: &reference[..n],
                rejected_logps: &reference[n..],
            },
        )
        .unwrap();

    let (logp, lse) = reference_tokens(x);
    let policy: Vec<f64> = x
        .ranges
        .iter()
        .map(|r| logp[r.clone()].iter().sum())
        .collect();
    let counts: Vec<u32> = x
        .ranges
        .iter()
        .map(|r| x.labels[r.clone()].iter().filter(|&&y| y != IGNORE).count() as u32)
        .collect();
    assert_eq!(step.token_counts, counts, "token counts");
    let reference64: Vec<f64> = reference.iter().map(|&v| v as f64).collect();
    let (beta, smoothing) = (config.beta, config.label_smoothing);
    let loss = |p: &[f64]| {
        dpo_loss_ref(
            name,
            beta,
            smoothing,
            &p[..n],
            &p[n..],
            &reference64[..n],
            &reference64[n..],
            &counts[..n],
            &counts[n..],
        )
    };
    let want_loss = loss(&policy);
    assert!(
        (step.loss.loss - want_loss).abs() < 1e-5 * (1.0 + want_loss.abs()),
        "{} {name}: loss {} vs f64 {want_loss}",
        d.name(),
        step.loss.loss
    );
    let grad_seq = finite_difference_gradient(loss, &policy, 1e-3);
    check_grad_logits(
        &format!("dpo {name} grad_logits"),
        &step.grad_logits,
        &reference_grad_logits(x, &lse, &grad_seq),
    );
}

fn kto_step_matches_the_f64_step<D: Device>(d: &D) {
    kto_step_matches_the_f64_step_on(d, &inputs(900, 6, 40, 515, false));
    kto_step_matches_the_f64_step_on(d, &inputs(901, 5, 30, 259, true));
    // A batch of one, all desirable.
    kto_step_matches_the_f64_step_on(d, &inputs(902, 1, 25, 77, false));
}

fn dpo_step_matches_the_f64_step<D: Device>(d: &D) {
    let padded = inputs(910, 4, 32, 515, false);
    let packed = inputs(911, 6, 30, 259, true);
    // Every loss type: the step passes the token counts (IPO and SFT read them).
    for loss_type in DpoLossType::ALL {
        dpo_step_matches_the_f64_step_on(d, &padded, loss_type);
        dpo_step_matches_the_f64_step_on(d, &packed, loss_type);
    }
}

/// SFT on a batch whose chosen sequences have no counted token: the CPU step's error on every
/// device (the device step sees it only in its kernel's output).
fn dpo_step_sft_without_a_chosen_token<D: Device>(d: &D) {
    let mut x = inputs(930, 4, 20, 65, false);
    let n = x.batch / 2;
    for r in &x.ranges[..n] {
        x.labels[r.clone()].iter_mut().for_each(|y| *y = IGNORE);
    }
    let reference = x.reference_sums();
    let config = DpoConfig {
        loss_type: DpoLossType::Sft,
        ..DpoConfig::default()
    };
    let pair_reference = PairReference {
        chosen_logps: &reference[..n],
        rejected_logps: &reference[n..],
    };
    let want = halo_kernels::step::dpo_step(&config, &x.logits(), &pair_reference).unwrap_err();
    assert!(
        matches!(want, halo_kernels::HaloError::EmptyBatch(_)),
        "cpu: {want:?}"
    );
    let err = d
        .dpo_step(&config, &x.logits(), &pair_reference)
        .unwrap_err();
    assert_eq!(err, want, "{}", d.name());
}

/// An odd number of sequences is not a DPO batch: the same clear error on every device.
fn dpo_step_refuses_an_odd_batch<D: Device>(d: &D) {
    let x = inputs(920, 3, 20, 33, false);
    let reference = x.reference_sums();
    let err = d
        .dpo_step(
            &DpoConfig::default(),
            &x.logits(),
            &PairReference {
                chosen_logps: &reference[..1],
                rejected_logps: &reference[1..2],
            },
        )
        .unwrap_err();
    assert!(
        matches!(&err, halo_kernels::HaloError::InvalidShape(m) if m.contains("2n sequences")),
        "{err:?}"
    );
}

device_tests!(
    kto_step_matches_the_f64_step,
    dpo_step_matches_the_f64_step,
    dpo_step_sft_without_a_chosen_token,
    dpo_step_refuses_an_odd_batch
);
