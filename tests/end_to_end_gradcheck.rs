//! End-to-end gradient check of the whole CPU chain
//! logits → `token_logprobs` → `sequence_sums` (or the humanline `sequence_logratio_sums`) →
//! loss → `broadcast_sequence_grad` (→ `humanline_grad_mask`) → `token_logprobs_backward`
//! against central finite differences of an f64 reference of the same chain, computed from the
//! logits in f64 (own logsumexp, own sums, the plain reference losses).

mod losses_common;

use halo_kernels::cpu::{
    broadcast_sequence_grad, humanline_grad_mask, sequence_logratio_sums, sequence_sums,
    token_logprobs, token_logprobs_backward, LogRatioClamp, SavedLse, SequenceLayout,
};
use halo_kernels::losses::reference::{dpo_loss_ref, kto_loss_ref};
use halo_kernels::losses::{
    dpo_loss, kto_loss, DpoConfig, DpoLossType, KlInput, KtoBatch, KtoConfig, PairBatch,
    ReferencePointPartial,
};
use halo_kernels::IGNORE_INDEX;
use losses_common::*;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 37;
const H: f64 = 1e-3;

/// A token batch: logits `[rows, VOCAB]`, labels with some `IGNORE_INDEX`, and its layout.
struct Tokens {
    logits: Vec<f32>,
    labels: Vec<i32>,
    /// Row ranges of each sequence (computed here, independently of `SequenceLayout::ranges`).
    ranges: Vec<std::ops::Range<usize>>,
    cu_seqlens: Vec<u32>,
    padded: Option<(usize, usize)>,
}

impl Tokens {
    fn layout(&self) -> SequenceLayout<'_> {
        match self.padded {
            Some((batch, seq)) => SequenceLayout::Padded { batch, seq },
            None => SequenceLayout::Packed {
                cu_seqlens: &self.cu_seqlens,
            },
        }
    }
}

/// `lengths`: rows per sequence. `min_tokens`: counted tokens forced per sequence (the first
/// `min_tokens` rows of each sequence keep a label); `all_ignored`: a sequence whose labels are
/// all ignored.
fn tokens(
    r: &mut ChaCha8Rng,
    lengths: &[usize],
    padded: bool,
    min_tokens: usize,
    all_ignored: Option<usize>,
) -> Tokens {
    let rows: usize = lengths.iter().sum();
    let logits: Vec<f32> = (0..rows * VOCAB)
        .map(|_| r.gen_range(-4.0f32..4.0))
        .collect();
    let mut labels = Vec::with_capacity(rows);
    let mut ranges = Vec::new();
    let mut cu = vec![0u32];
    let mut start = 0;
    for (s, &len) in lengths.iter().enumerate() {
        for t in 0..len {
            let keep = all_ignored != Some(s) && (t < min_tokens || r.gen_bool(0.7));
            labels.push(if keep {
                r.gen_range(0..VOCAB as i32)
            } else {
                IGNORE_INDEX
            });
        }
        ranges.push(start..start + len);
        start += len;
        cu.push(start as u32);
    }
    let padded = padded.then(|| (lengths.len(), lengths[0]));
    if padded.is_some() {
        assert!(lengths.iter().all(|&l| l == lengths[0]));
    }
    Tokens {
        logits,
        labels,
        ranges,
        cu_seqlens: cu,
        padded,
    }
}

/// f64 per-token log-probs (0 for ignored rows), from logits in f64.
fn token_logp64(logits: &[f64], labels: &[i32]) -> Vec<f64> {
    labels
        .iter()
        .enumerate()
        .map(|(row, &y)| {
            if y == IGNORE_INDEX {
                return 0.0;
            }
            let z = &logits[row * VOCAB..(row + 1) * VOCAB];
            let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let lse = m + z.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
            z[y as usize] - lse
        })
        .collect()
}

fn seq_sums64(tok: &Tokens, per_token: &[f64]) -> Vec<f64> {
    tok.ranges
        .iter()
        .map(|r| {
            r.clone()
                .filter(|&t| tok.labels[t] != IGNORE_INDEX)
                .map(|t| per_token[t])
                .sum()
        })
        .collect()
}

/// Runs the library's backward: per-sequence grad → token grad (→ mask) → ∂L/∂logits.
fn logits_grad(tok: &Tokens, saved: SavedLse<&[f32]>, token_grad: &[f32]) -> Vec<f32> {
    let mut grad = vec![0.0f32; tok.logits.len()];
    token_logprobs_backward(
        &tok.logits,
        &tok.labels,
        saved,
        token_grad,
        VOCAB,
        IGNORE_INDEX,
        &mut grad,
    )
    .unwrap();
    grad
}

/// `expect_nonzero`: the setup guarantees some gradient flows (guards against a vacuous pass).
fn check_against_fd(
    what: &str,
    tok: &Tokens,
    got: &[f32],
    expect_nonzero: bool,
    loss64: impl Fn(&[f64]) -> f64,
) {
    let x = to_f64(&tok.logits);
    let fd: Vec<f64> = (0..x.len())
        .map(|i| {
            let mut p = x.clone();
            let mut m = x.clone();
            p[i] += H;
            m[i] -= H;
            (loss64(&p) - loss64(&m)) / (2.0 * H)
        })
        .collect();
    if expect_nonzero {
        assert!(
            fd.iter().any(|g| g.abs() > 1e-4),
            "{what}: degenerate test, gradient ~0"
        );
    }
    assert_grad_close(what, got, &fd, 2e-5);
    // Ignored rows get exactly zero gradient.
    for (row, &y) in tok.labels.iter().enumerate() {
        if y == IGNORE_INDEX {
            assert!(got[row * VOCAB..(row + 1) * VOCAB]
                .iter()
                .all(|&g| g == 0.0));
        }
    }
}

fn layouts(r: &mut ChaCha8Rng, min_tokens: usize, allow_empty: bool) -> Vec<Tokens> {
    let mut out = vec![
        tokens(r, &[7; 5], true, min_tokens, allow_empty.then_some(3)),
        tokens(r, &[1], true, min_tokens.max(1), None),
        tokens(r, &[4, 9, 1, 7, 9], false, min_tokens, None),
    ];
    if allow_empty {
        out.push(tokens(r, &[4, 9, 0, 7, 9, 3], false, min_tokens, None));
    }
    out
}

#[test]
fn kto_chain_matches_finite_differences() {
    let mut r = rng(1);
    for tok in layouts(&mut r, 0, true) {
        let n = tok.ranges.len();
        let tl = token_logprobs(&tok.logits, &tok.labels, VOCAB, IGNORE_INDEX).unwrap();
        let sums = sequence_sums(&tl.logp, &tok.labels, IGNORE_INDEX, tok.layout()).unwrap();
        let reference: Vec<f32> = sums
            .sums
            .iter()
            .map(|s| s + r.gen_range(-3.0..3.0))
            .collect();
        let desirable: Vec<bool> = (0..n).map(|i| i % 2 == 0 || r.gen_bool(0.3)).collect();
        let kl_policy = logps(&mut r, 6, -30.0, -5.0);
        let kl_reference = perturbed(&mut r, &kl_policy, 2.0);
        let cfg = KtoConfig {
            beta: 0.5,
            desirable_weight: 1.0,
            undesirable_weight: 1.4,
            ..KtoConfig::default()
        };
        let out = kto_loss(
            &cfg,
            &KtoBatch {
                policy_logps: &sums.sums,
                reference_logps: &reference,
                is_desirable: &desirable,
                kl: Some(KlInput::LogProbs {
                    policy: &kl_policy,
                    reference: &kl_reference,
                }),
            },
        )
        .unwrap();
        let token_grad = broadcast_sequence_grad(
            &out.grad_policy_logps,
            &tok.labels,
            IGNORE_INDEX,
            tok.layout(),
        )
        .unwrap();
        let got = logits_grad(&tok, tl.saved_lse(), &token_grad);

        // z0 is detached: held at its value while the logits move.
        let z0 = halo_kernels::losses::reference::kto_z0_ref(
            &to_f64(&kl_policy),
            &to_f64(&kl_reference),
        );
        let ref64 = to_f64(&reference);
        let loss64 = |logits: &[f64]| {
            let s = seq_sums64(&tok, &token_logp64(logits, &tok.labels));
            kto_loss_ref(
                &s,
                &ref64,
                &desirable,
                z0,
                cfg.beta,
                cfg.desirable_weight,
                cfg.undesirable_weight,
                false,
            )
        };
        assert_close(
            "kto chain loss",
            out.loss,
            loss64(&to_f64(&tok.logits)),
            1e-5,
            1e-9,
        );
        check_against_fd("kto chain", &tok, &got, true, loss64);
    }
}

#[test]
fn dpo_chain_matches_finite_differences() {
    let mut r = rng(2);
    for loss_type in [DpoLossType::Sigmoid, DpoLossType::Ipo] {
        // Sequences [0, P) are chosen, [P, 2P) rejected (TRL's concatenated batch).
        for tok in [
            tokens(&mut r, &[6; 6], true, 1, None),
            tokens(&mut r, &[3, 8, 5, 1, 9, 4, 2, 6], false, 1, None),
            tokens(&mut r, &[5, 2], false, 1, None),
        ] {
            let p = tok.ranges.len() / 2;
            let tl = token_logprobs(&tok.logits, &tok.labels, VOCAB, IGNORE_INDEX).unwrap();
            let sums = sequence_sums(&tl.logp, &tok.labels, IGNORE_INDEX, tok.layout()).unwrap();
            let reference: Vec<f32> = sums
                .sums
                .iter()
                .map(|s| s + r.gen_range(-3.0..3.0))
                .collect();
            let cfg = DpoConfig {
                beta: 0.7,
                label_smoothing: 0.1,
                loss_type,
                ..DpoConfig::default()
            };
            let out = dpo_loss(
                &cfg,
                &PairBatch {
                    policy_chosen_logps: &sums.sums[..p],
                    policy_rejected_logps: &sums.sums[p..],
                    reference_chosen_logps: &reference[..p],
                    reference_rejected_logps: &reference[p..],
                    chosen_counts: Some(&sums.counts[..p]),
                    rejected_counts: Some(&sums.counts[p..]),
                },
            )
            .unwrap();
            let grad_seq: Vec<f32> = out
                .grad_chosen
                .iter()
                .chain(&out.grad_rejected)
                .copied()
                .collect();
            let token_grad =
                broadcast_sequence_grad(&grad_seq, &tok.labels, IGNORE_INDEX, tok.layout())
                    .unwrap();
            let got = logits_grad(&tok, tl.saved_lse(), &token_grad);

            let counts: Vec<u32> = tok
                .ranges
                .iter()
                .map(|rg| {
                    rg.clone()
                        .filter(|&t| tok.labels[t] != IGNORE_INDEX)
                        .count() as u32
                })
                .collect();
            let ref64 = to_f64(&reference);
            let loss64 = |logits: &[f64]| {
                let s = seq_sums64(&tok, &token_logp64(logits, &tok.labels));
                dpo_loss_ref(
                    loss_type.name(),
                    cfg.beta,
                    cfg.label_smoothing,
                    &s[..p],
                    &s[p..],
                    &ref64[..p],
                    &ref64[p..],
                    &counts[..p],
                    &counts[p..],
                )
            };
            assert_close(
                "dpo chain loss",
                out.loss,
                loss64(&to_f64(&tok.logits)),
                1e-5,
                1e-9,
            );
            check_against_fd(loss_type.name(), &tok, &got, true, loss64);
        }
    }
}

#[test]
fn humanline_kto_chain_matches_finite_differences_away_from_kinks() {
    let mut r = rng(3);
    let clamp = LogRatioClamp::default();
    for tok in layouts(&mut r, 0, true) {
        let n = tok.ranges.len();
        let tl = token_logprobs(&tok.logits, &tok.labels, VOCAB, IGNORE_INDEX).unwrap();
        // Per-token reference log-probs placing each log-ratio inside the clamp, below or above
        // it, at least 0.05 from either kink (finite differences move a log-prob by < 0.01).
        let logp64 = token_logp64(&to_f64(&tok.logits), &tok.labels);
        let mut any_inside = false;
        let ref_tok: Vec<f32> = logp64
            .iter()
            .zip(&tok.labels)
            .map(|(&lp, &y)| {
                let region = r.gen_range(0..3);
                any_inside |= region == 0 && y != IGNORE_INDEX;
                let target = match region {
                    0 => r.gen_range(-0.95..1.45),
                    1 => r.gen_range(-4.0..-1.05),
                    _ => r.gen_range(1.55..4.0),
                };
                (lp - target) as f32
            })
            .collect();
        let sums = sequence_logratio_sums(
            &tl.logp,
            &ref_tok,
            &tok.labels,
            IGNORE_INDEX,
            tok.layout(),
            Some(clamp),
        )
        .unwrap();
        let zeros = vec![0.0f32; n];
        let desirable: Vec<bool> = (0..n).map(|i| i % 3 != 1).collect();
        let z0 = 0.4;
        let cfg = KtoConfig {
            beta: 0.8,
            ..KtoConfig::default()
        };
        let out = kto_loss(
            &cfg,
            &KtoBatch {
                policy_logps: &sums.sums,
                reference_logps: &zeros,
                is_desirable: &desirable,
                kl: Some(KlInput::Partial(ReferencePointPartial {
                    sum: z0 * 8.0,
                    count: 8,
                })),
            },
        )
        .unwrap();
        let mut token_grad = broadcast_sequence_grad(
            &out.grad_policy_logps,
            &tok.labels,
            IGNORE_INDEX,
            tok.layout(),
        )
        .unwrap();
        humanline_grad_mask(&tl.logp, &ref_tok, clamp, &mut token_grad).unwrap();
        let got = logits_grad(&tok, tl.saved_lse(), &token_grad);

        let ref64 = to_f64(&ref_tok);
        let zeros64 = vec![0.0f64; n];
        let loss64 = |logits: &[f64]| {
            let ratios: Vec<f64> = token_logp64(logits, &tok.labels)
                .iter()
                .zip(&ref64)
                .map(|(&lp, &rf)| (lp - rf).clamp(clamp.min as f64, clamp.max as f64))
                .collect();
            let s = seq_sums64(&tok, &ratios);
            kto_loss_ref(&s, &zeros64, &desirable, z0, cfg.beta, 1.0, 1.0, false)
        };
        assert_close(
            "humanline chain loss",
            out.loss,
            loss64(&to_f64(&tok.logits)),
            1e-5,
            1e-9,
        );
        check_against_fd("humanline kto chain", &tok, &got, any_inside, loss64);
        // The mask must matter: some counted token is clamped in every multi-sequence case.
        if n > 1 {
            assert!(token_grad
                .iter()
                .zip(&tok.labels)
                .any(|(&g, &y)| g == 0.0 && y != IGNORE_INDEX));
        }
    }
}
