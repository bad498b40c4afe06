//! The GPT model as a whole: gradient check on a tiny config, overfitting one batch, generation,
//! input validation.

use halo_kernels::{HaloError, IGNORE_INDEX};
use halo_train::autograd::Tape;
use halo_train::model::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use halo_train::model::GptWeights;
use halo_train::model::{Gpt, GptConfig, Sampling};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny_config() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        vocab_size: 11,
        n_ctx: 6,
        dropout: 0.0,
    }
}

/// A model with O(1) random weights so every gradient is far from rounding noise.
fn randomized(config: GptConfig, seed: u64) -> Gpt {
    let mut model = Gpt::new(config, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for (name, data) in model.parameters_mut() {
        let centre = if name.contains("ln_") && name.ends_with("weight") {
            1.0
        } else {
            0.0
        };
        data.iter_mut()
            .for_each(|v| *v = centre + rng.gen_range(-0.5..0.5));
    }
    model
}

/// The model's per-token log-probs through the materialized head or the fused one.
fn token_logp<'a>(
    model: &'a Gpt,
    tape: &mut Tape<'a>,
    (ids, targets): (&[u32], &[i32]),
    (b, s): (usize, usize),
    fused: bool,
) -> halo_train::autograd::Var {
    if fused {
        model.token_logprobs_fused_head(tape, ids, targets, b, s)
    } else {
        model.token_logprobs(tape, ids, targets, b, s)
    }
    .unwrap()
}

/// `Σ w · token_logp` on a training tape with a fixed seed: the same dropout masks every call.
fn weighted_logp(
    model: &Gpt,
    ids: &[u32],
    targets: &[i32],
    w: &[f32],
    (b, s): (usize, usize),
    fused: bool,
) -> f64 {
    let mut tape = Tape::with_seed(5);
    let logp = token_logp(model, &mut tape, (ids, targets), (b, s), fused);
    tape.value(logp)
        .iter()
        .zip(w)
        .map(|(&l, &w)| l as f64 * w as f64)
        .sum()
}

fn check_whole_model_gradient(config: GptConfig, fused: bool) {
    let (batch, seq) = (2, 5);
    let mut model = randomized(config, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.gen_range(0..11)).collect();
    let mut targets: Vec<i32> = (0..batch * seq).map(|_| rng.gen_range(0..11)).collect();
    targets[4] = IGNORE_INDEX;
    targets[7] = IGNORE_INDEX;
    let w: Vec<f32> = (0..batch * seq).map(|_| rng.gen_range(-1.0..1.0)).collect();

    let mut tape = Tape::with_seed(5);
    let logp = token_logp(&model, &mut tape, (&ids, &targets), (batch, seq), fused);
    assert_eq!(tape.value(logp)[4], 0.0);
    let grads = tape.backward(logp, &w).unwrap();

    let eps = 1e-2f32;
    let n_params = model.parameters().len();
    for p in 0..n_params {
        let name = model.parameters()[p].name.clone();
        let analytic = grads
            .get(p)
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .to_vec();
        let scale = analytic.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        let picks: Vec<usize> = (0..6).map(|_| rng.gen_range(0..analytic.len())).collect();
        for j in picks {
            let bump = |model: &mut Gpt, delta: f32| {
                model.parameters_mut().nth(p).unwrap().1[j] += delta;
            };
            bump(&mut model, eps);
            let plus = weighted_logp(&model, &ids, &targets, &w, (batch, seq), fused);
            bump(&mut model, -2.0 * eps);
            let minus = weighted_logp(&model, &ids, &targets, &w, (batch, seq), fused);
            bump(&mut model, eps);
            let numeric = (plus - minus) / (2.0 * eps as f64);
            let a = analytic[j] as f64;
            assert!(
                (a - numeric).abs() <= 3e-2 * (numeric.abs() + 0.1 * scale) + 1e-4,
                "{name}[{j}]: analytic {a} vs numeric {numeric} (scale {scale})"
            );
        }
    }
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    check_whole_model_gradient(tiny_config(), false);
}

#[test]
fn whole_model_gradient_through_the_fused_head_matches_finite_differences() {
    check_whole_model_gradient(tiny_config(), true);
}

#[test]
fn fused_head_matches_the_materialized_head() {
    // The KTO / DPO steps take the policy's log-probs through the fused head: the same values and
    // parameter gradients as the logits path (to f32 rounding), on a batch with ignored rows.
    let config = GptConfig {
        vocab_size: 37,
        n_ctx: 9,
        ..tiny_config()
    };
    let (batch, seq) = (3, 9);
    let model = randomized(config, 11);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.gen_range(0..37)).collect();
    let targets: Vec<i32> = (0..batch * seq)
        .map(|t| {
            if t % 4 == 0 {
                IGNORE_INDEX
            } else {
                rng.gen_range(0..37)
            }
        })
        .collect();
    let w: Vec<f32> = (0..batch * seq).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let run = |fused| {
        let mut tape = Tape::with_seed(5);
        let logp = token_logp(&model, &mut tape, (&ids, &targets), (batch, seq), fused);
        let values = tape.value(logp).to_vec();
        (values, tape.backward(logp, &w).unwrap())
    };
    let ((want, want_grads), (got, got_grads)) = (run(false), run(true));
    for (t, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "logp[{t}]: fused {g} vs {w}"
        );
    }
    for (p, param) in model.parameters().iter().enumerate() {
        let (g, w) = (got_grads.get(p).unwrap(), want_grads.get(p).unwrap());
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * scale + 1e-7,
                "{}[{j}]: fused {a} vs materialized {b}",
                param.name
            );
        }
    }
}

#[test]
fn whole_model_gradient_with_dropout_matches_finite_differences() {
    check_whole_model_gradient(
        GptConfig {
            dropout: 0.2,
            ..tiny_config()
        },
        false,
    );
}

#[test]
fn tape_and_inference_agree_and_ignored_targets_are_zero() {
    let model = randomized(tiny_config(), 5);
    let ids = [1u32, 2, 3, 4, 5, 6];
    let targets = [2, 3, IGNORE_INDEX, 5, 6, IGNORE_INDEX];
    let mut tape = Tape::new();
    let v = model
        .token_logprobs(&mut tape, &ids, &targets, 2, 3)
        .unwrap();
    let inference = model
        .token_logprobs_inference(&ids, &targets, 2, 3)
        .unwrap();
    assert_eq!(tape.value(v), inference.as_slice());
    assert_eq!(inference[2], 0.0);
    assert!(inference.iter().all(|&l| l <= 0.0));
    // Each batch row is independent of the others and of later positions.
    let alone = model
        .token_logprobs_inference(&ids[3..5], &targets[3..5], 1, 2)
        .unwrap();
    for (a, b) in alone.iter().zip(&inference[3..5]) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn bad_inputs_are_errors() {
    let model = Gpt::new(tiny_config(), 0).unwrap();
    let ids = [1u32; 6];
    let t = [1i32; 6];
    assert!(matches!(
        model.token_logprobs_inference(&ids, &t, 2, 2),
        Err(HaloError::LengthMismatch { .. })
    ));
    assert!(matches!(
        model.token_logprobs_inference(&[1; 7], &[1; 7], 1, 7),
        Err(HaloError::InvalidShape(_))
    ));
    assert!(matches!(
        model.token_logprobs_inference(&[11; 6], &t, 1, 6),
        Err(HaloError::InvalidShape(_))
    ));
    assert!(matches!(
        model.token_logprobs_inference(&ids, &[11; 6], 1, 6),
        Err(HaloError::LabelOutOfRange { .. })
    ));
    assert!(model.token_logprobs_inference(&[], &[], 0, 6).is_err());
    let bad = GptConfig {
        n_head: 3,
        ..tiny_config()
    };
    assert!(matches!(
        Gpt::new(bad, 0),
        Err(HaloError::InvalidHyperParameter { name: "n_embd", .. })
    ));
    let mut tape = Tape::new();
    assert!(matches!(
        model.nll(&mut tape, &ids, &[IGNORE_INDEX; 6], 1, 6),
        Err(HaloError::EmptyBatch(_))
    ));
}

#[test]
fn overfits_one_batch_to_near_zero_loss() {
    let config = GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        vocab_size: 16,
        n_ctx: 12,
        dropout: 0.0,
    };
    let mut model = Gpt::new(config, 11).unwrap();
    let (batch, seq) = (2, 12);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut tokens: Vec<u32> = (0..batch * (seq + 1))
        .map(|_| rng.gen_range(0..16))
        .collect();
    // Distinct first tokens, so no two identical prefixes ask for different next tokens.
    tokens[0] = 0;
    tokens[seq + 1] = 1;
    let mut ids = Vec::new();
    let mut targets = Vec::new();
    for row in tokens.chunks(seq + 1) {
        ids.extend_from_slice(&row[..seq]);
        targets.extend(row[1..].iter().map(|&t| t as i32));
    }
    let schedule = LrSchedule::cosine(1e-2, 1e-3, 10, 400);
    let mut opt = AdamW::new(
        &model,
        AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
    );
    let mut first = None;
    let mut last = f32::INFINITY;
    for step in 0..400 {
        let mut tape = Tape::new();
        let loss = model.nll(&mut tape, &ids, &targets, batch, seq).unwrap();
        last = tape.value(loss)[0];
        first.get_or_insert(last);
        let mut grads = tape.backward_scalar(loss).unwrap();
        clip_grad_norm(&mut grads, 1.0);
        opt.step(&mut model, &grads, schedule.lr_at(step)).unwrap();
        if last < 0.02 {
            break;
        }
    }
    let first = first.unwrap();
    assert!(
        (first - (16f32).ln()).abs() < 0.3,
        "initial loss {first} should be near ln 16"
    );
    assert!(last < 0.05, "loss after training: {last}");
}

#[test]
fn dropout_changes_training_forward_only() {
    let config = GptConfig {
        dropout: 0.3,
        ..tiny_config()
    };
    let model = randomized(config, 8);
    let ids = [1u32, 2, 3, 4, 5];
    let t = [2, 3, 4, 5, 6];
    let eval = model.token_logprobs_inference(&ids, &t, 1, 5).unwrap();
    let no_dropout = randomized(tiny_config(), 8)
        .token_logprobs_inference(&ids, &t, 1, 5)
        .unwrap();
    assert_eq!(eval, no_dropout);
    let mut tape = Tape::with_seed(1);
    let v = model.token_logprobs(&mut tape, &ids, &t, 1, 5).unwrap();
    assert_ne!(tape.value(v), eval.as_slice());
}

#[test]
fn greedy_generation_follows_the_argmax_and_sampling_is_seeded() {
    let model = randomized(tiny_config(), 9);
    let prompt = [3u32, 1];
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let greedy = model
        .generate(&prompt, 8, Sampling::Greedy, &mut rng, None)
        .unwrap();
    assert_eq!(greedy.len(), 8);
    // Rebuild by hand: argmax of the last position, context cropped to n_ctx.
    let mut seq = prompt.to_vec();
    for &tok in &greedy {
        let ctx = &seq[seq.len().saturating_sub(6)..];
        let logits = model.logits_inference(ctx, 1, ctx.len()).unwrap();
        let last = &logits[(ctx.len() - 1) * 11..];
        let best = (0..11)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(tok as usize, best);
        seq.push(tok);
    }
    let top1 = model
        .generate(
            &prompt,
            8,
            Sampling::TopK {
                k: 1,
                temperature: 0.7,
            },
            &mut rng,
            None,
        )
        .unwrap();
    assert_eq!(top1, greedy);
    let sample = |seed| {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        model
            .generate(
                &prompt,
                20,
                Sampling::TopK {
                    k: 11,
                    temperature: 2.0,
                },
                &mut r,
                None,
            )
            .unwrap()
    };
    assert_eq!(sample(5), sample(5));
    assert_ne!(sample(5), sample(6));
    let stop = greedy[2];
    let stopped = model
        .generate(&prompt, 8, Sampling::Greedy, &mut rng, Some(stop))
        .unwrap();
    let first_stop = greedy.iter().position(|&t| t == stop).unwrap();
    assert_eq!(stopped, greedy[..=first_stop]);
    assert!(model
        .generate(&[], 3, Sampling::Greedy, &mut rng, None)
        .is_err());
    assert!(model
        .generate(
            &prompt,
            3,
            Sampling::TopK {
                k: 0,
                temperature: 1.0
            },
            &mut rng,
            None
        )
        .is_err());
    assert!(model
        .generate(
            &prompt,
            3,
            Sampling::TopK {
                k: 2,
                temperature: 0.0
            },
            &mut rng,
            None
        )
        .is_err());
}

#[test]
fn parameter_names_follow_hugging_face() {
    let model = Gpt::new(tiny_config(), 0).unwrap();
    let names = model.parameter_names();
    assert_eq!(names.len(), 2 + 12 * 2 + 2);
    assert_eq!(names[0], "transformer.wte.weight");
    assert_eq!(names[4], "transformer.h.0.attn.c_attn.weight");
    assert_eq!(names[names.len() - 1], "transformer.ln_f.bias");
    let c = 8;
    let shape = |n: &str| {
        model.parameters()[model.parameter_index(n).unwrap()]
            .shape
            .clone()
    };
    assert_eq!(shape("h.1.attn.c_attn.weight"), vec![c, 3 * c]);
    assert_eq!(shape("transformer.h.1.mlp.c_fc.weight"), vec![c, 4 * c]);
    assert_eq!(shape("transformer.h.1.mlp.c_proj.weight"), vec![4 * c, c]);
    assert_eq!(
        model.num_parameters(),
        11 * c + 6 * c + 2 * (12 * c * c + 13 * c) + 2 * c
    );
    assert_eq!(Gpt::new(tiny_config(), 0).unwrap(), model);
    assert_ne!(Gpt::new(tiny_config(), 1).unwrap(), model);
}

#[test]
fn two_forwards_on_one_tape_sum_their_parameter_gradients() {
    let model = randomized(tiny_config(), 13);
    let (a_ids, a_t) = ([1u32, 2, 3, 4], [2, 3, 4, IGNORE_INDEX]);
    let (b_ids, b_t) = ([5u32, 6, 7], [6, 7, 8]);
    let grads_of = |runs: &[(&[u32], &[i32])]| {
        let mut tape = Tape::new();
        let outs: Vec<_> = runs
            .iter()
            .map(|(ids, t)| {
                model
                    .token_logprobs(&mut tape, ids, t, 1, ids.len())
                    .unwrap()
            })
            .collect();
        let ones: Vec<Vec<f32>> = runs.iter().map(|(ids, _)| vec![1.0; ids.len()]).collect();
        let seeds: Vec<_> = outs
            .iter()
            .zip(&ones)
            .map(|(&v, g)| (v, g.as_slice()))
            .collect();
        tape.backward_many(&seeds).unwrap()
    };
    let both = grads_of(&[(&a_ids, &a_t), (&b_ids, &b_t)]);
    let mut separate = grads_of(&[(&a_ids, &a_t)]);
    separate.accumulate(&grads_of(&[(&b_ids, &b_t)])).unwrap();
    for (p, g) in both.iter() {
        for (x, y) in g.iter().zip(separate.get(p).unwrap()) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "param {p}: {x} vs {y}"
            );
        }
    }
    assert_eq!(both.iter().count(), model.parameters().len());
}
