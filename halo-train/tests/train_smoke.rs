//! A few real training steps with the crate's own ops: each stage's loss goes down, batched greedy
//! decoding matches `Gpt::generate`, and a tiny end-to-end run writes everything it promises.

use halo_kernels::losses::{DpoConfig, KtoConfig};
use halo_kernels::Result;
use halo_train::model::optim::{clip_grad_norm, AdamW, AdamWConfig};
use halo_train::model::{Gpt, GptConfig, Sampling};
use halo_train::train::batching::{dpo_batch, TokenBatch};
use halo_train::train::dpo::dpo_step;
use halo_train::train::evaluate::{decode, greedy_decode, Decoding};
use halo_train::train::kto::kto_step;
use halo_train::train::nll::nll_step;
use halo_train::train::stage::StepOutput;
use halo_train::train::{
    kto_batch, run, token_batch, ByteTokenizer, KtoBatch, PairedExample, TargetSpan, TextTokenizer,
    TrainArgs, UnpairedExample,
};
use rand::SeedableRng;

mod train_support;
use train_support::{assert_full_summary_line, tiny_run_args};

fn tiny_model(seed: u64) -> Gpt {
    Gpt::new(
        GptConfig {
            n_layer: 1,
            n_head: 2,
            n_embd: 32,
            vocab_size: ByteTokenizer.vocab_size(),
            n_ctx: 16,
            dropout: 0.0,
        },
        seed,
    )
    .unwrap()
}

/// Runs `steps` AdamW steps of `step` on `model`; returns every loss.
fn train(
    model: &mut Gpt,
    steps: usize,
    lr: f32,
    mut step: impl FnMut(&Gpt) -> Result<StepOutput>,
) -> Vec<f64> {
    let mut opt = AdamW::new(
        model,
        AdamWConfig {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        },
    );
    (0..steps)
        .map(|_| {
            let (metrics, mut grads) = step(model).unwrap().read().unwrap();
            assert!(metrics.loss.is_finite());
            clip_grad_norm(&mut grads, 1.0);
            opt.step(model, &grads, lr).unwrap();
            metrics.loss
        })
        .collect()
}

fn examples() -> Vec<UnpairedExample> {
    (0..8)
        .map(|i| UnpairedExample {
            prompt: format!("{i}+{}=", i + 3),
            completion: if i % 2 == 0 {
                format!("{}", 2 * i + 3)
            } else {
                format!("{}", 2 * i + 4)
            },
            desirable: i % 2 == 0,
        })
        .collect()
}

#[test]
fn nll_loss_decreases() {
    let mut model = tiny_model(1);
    let rows = [("1+2=", "3"), ("4+4=", "8"), ("12+30=", "42")];
    let batch = token_batch(&TextTokenizer::Byte, &rows, TargetSpan::Everything, 16).unwrap();
    let losses = train(&mut model, 15, 1e-2, |m| nll_step(m, &batch));
    // A fresh model starts near ln(257) ≈ 5.55 nats per token.
    assert!((losses[0] - (257f64).ln()).abs() < 0.5, "{losses:?}");
    assert!(losses[14] < losses[0] - 1.0, "{losses:?}");
}

#[test]
fn kto_loss_decreases_from_one_half_and_separates_the_classes() {
    let reference = tiny_model(2);
    let mut policy = reference.clone();
    let data = examples();
    let refs: Vec<&UnpairedExample> = data.iter().collect();
    let batch = kto_batch(&TextTokenizer::Byte, &refs, 16).unwrap();
    let config = KtoConfig {
        beta: 1.0,
        ..KtoConfig::default()
    };
    let mut margins = Vec::new();
    let losses = train(&mut policy, 12, 5e-3, |m| {
        let out = kto_step(m, &reference, &batch, &config)?;
        let get = |name: &str| {
            out.host_metrics()
                .unwrap()
                .metrics
                .iter()
                .find(|(n, _)| n == name)
                .map(|&(_, v)| v)
                .unwrap()
        };
        margins.push(get("rewards/margins"));
        assert!(get("kl") >= 0.0);
        Ok(out)
    });
    // Policy == reference at the start: r = 0, z0 = 0, every example contributes σ(0) = 1/2.
    assert!((losses[0] - 0.5).abs() < 1e-6, "{losses:?}");
    assert!(losses[11] < 0.45, "{losses:?}");
    assert!(margins[11] > margins[0] + 0.1, "{margins:?}");
}

/// Four "i+1=" prompts with the right sum chosen and a wrong one rejected, as one DPO batch.
fn four_pairs() -> TokenBatch {
    let pairs: Vec<PairedExample> = (0..4)
        .map(|i| PairedExample {
            prompt: format!("{i}+1="),
            chosen: format!("{}", i + 1),
            rejected: format!("{}", i + 11),
        })
        .collect();
    let refs: Vec<&PairedExample> = pairs.iter().collect();
    dpo_batch(&TextTokenizer::Byte, &refs, 16).unwrap()
}

#[test]
fn dpo_loss_decreases_from_ln_two() {
    let reference = tiny_model(3);
    let mut policy = reference.clone();
    let batch = four_pairs();
    let config = DpoConfig {
        beta: 1.0,
        ..DpoConfig::default()
    };
    let losses = train(&mut policy, 12, 5e-3, |m| {
        dpo_step(m, &reference, &batch, &config)
    });
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-6,
        "{losses:?}"
    );
    assert!(losses[11] < 0.6, "{losses:?}");
}

/// Every TRL DPO loss type trains the model end to end: at policy = reference every log-ratio
/// is 0, where each loss has a value known in closed form (β = 1, ε = 0.1, τ = 0.05), and a few
/// steps lower it.
#[test]
fn every_dpo_loss_type_starts_at_its_closed_form_and_decreases() {
    use halo_kernels::losses::DpoLossType;
    let ln2 = std::f64::consts::LN_2;
    let reference = tiny_model(3);
    let batch = four_pairs();
    for loss_type in DpoLossType::ALL {
        let eps: f64 = 0.1;
        let at_zero = match loss_type {
            DpoLossType::Sigmoid => Some(ln2), // −0.9·logσ(0) − 0.1·logσ(0)
            DpoLossType::Robust => Some(ln2),  // (0.9 − 0.1)·ln2 / 0.8
            DpoLossType::Hinge => Some(1.0),
            DpoLossType::Ipo => Some(0.25), // (0 − 1/2)²
            DpoLossType::ExoPair => Some(-ln2 - 0.5 * ((1.0 - eps) * eps).ln()),
            DpoLossType::NcaPair | DpoLossType::BcoPair => Some(2.0 * ln2),
            DpoLossType::SppoHard => Some(0.5), // 2·(1/2)²
            DpoLossType::Aot | DpoLossType::AotUnpaired | DpoLossType::SigmoidNorm => Some(ln2),
            DpoLossType::ApoZero | DpoLossType::ApoDown => Some(1.0),
            DpoLossType::Discopop => Some(0.5 * ln2 + 0.5), // m = 1/2: ln2·½ + e⁰·½
            DpoLossType::Sft => None,                       // the model's NLL
        };
        let mut policy = reference.clone();
        let config = DpoConfig {
            beta: 1.0,
            label_smoothing: eps,
            loss_type,
            ..DpoConfig::default()
        };
        let losses = train(&mut policy, 8, 5e-3, |m| {
            dpo_step(m, &reference, &batch, &config)
        });
        if let Some(want) = at_zero {
            assert!(
                (losses[0] - want).abs() < 1e-6,
                "{loss_type:?}: {} vs {want}",
                losses[0]
            );
        }
        assert!(losses[7] < losses[0] - 1e-3, "{loss_type:?}: {losses:?}");
    }
}

#[test]
fn batched_greedy_decoding_matches_generate() {
    let mut model = tiny_model(4);
    // Train a little so the model is not uniform-ish and emits EOS sometimes.
    let rows = [
        ("1+2=", "3"),
        ("4+4=", "8"),
        ("12+30=", "42"),
        ("7+7=", "14"),
    ];
    let batch = token_batch(&TextTokenizer::Byte, &rows, TargetSpan::Everything, 16).unwrap();
    train(&mut model, 10, 1e-2, |m| nll_step(m, &batch));
    let tok = ByteTokenizer;
    let contexts: Vec<Vec<u32>> = ["1+2=", "12+30=", "9", "123+456=", "7+7="]
        .iter()
        .map(|p| {
            std::iter::once(ByteTokenizer::EOS)
                .chain(tok.encode(p))
                .collect()
        })
        .collect();
    let batched = greedy_decode(&model, &contexts, 12, ByteTokenizer::EOS).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for (context, got) in contexts.iter().zip(&batched) {
        let want = model
            .generate(
                context,
                12,
                Sampling::Greedy,
                &mut rng,
                Some(ByteTokenizer::EOS),
            )
            .unwrap();
        assert_eq!(got, &want, "context {context:?}");
    }
}

#[test]
fn sampling_at_a_tiny_temperature_is_greedy_and_at_a_high_one_is_not() {
    let mut model = tiny_model(5);
    let rows = [("1+2=", "3"), ("4+4=", "8"), ("12+30=", "42")];
    let batch = token_batch(&TextTokenizer::Byte, &rows, TargetSpan::Everything, 16).unwrap();
    train(&mut model, 10, 1e-2, |m| nll_step(m, &batch));
    let tok = ByteTokenizer;
    let contexts: Vec<Vec<u32>> = (0..30)
        .map(|i| {
            std::iter::once(ByteTokenizer::EOS)
                .chain(tok.encode(&format!("{i}+{}=", i % 7)))
                .collect()
        })
        .collect();
    let greedy = greedy_decode(&model, &contexts, 6, ByteTokenizer::EOS).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let cold = decode(
        &model,
        &contexts,
        6,
        ByteTokenizer::EOS,
        Decoding::Sample {
            temperature: 1e-4,
            rng: &mut rng,
        },
    )
    .unwrap();
    assert_eq!(cold, greedy);
    let hot = decode(
        &model,
        &contexts,
        6,
        ByteTokenizer::EOS,
        Decoding::Sample {
            temperature: 5.0,
            rng: &mut rng,
        },
    )
    .unwrap();
    assert_ne!(hot, greedy);
}

#[test]
fn tiny_end_to_end_run_writes_checkpoints_metrics_plot_and_summary() {
    let dir = std::env::temp_dir().join(format!("halo-train-smoke-{}", std::process::id()));
    let args = tiny_run_args(&dir);
    let summary = run(&args, false).unwrap();
    assert_full_summary_line(&summary.summary_line());
    for file in [
        "base.safetensors",
        "sft.safetensors",
        "kto.safetensors",
        "dpo.safetensors",
        "metrics.jsonl",
        "training_curves.png",
        "summary.txt",
        "data/preferences.jsonl",
    ] {
        assert!(dir.join(file).is_file(), "missing {file}");
    }
    let png = std::fs::read(dir.join("training_curves.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let kto_lines = metrics
        .lines()
        .filter(|l| l.contains("\"stage\":\"kto\"") && l.contains("\"loss\""))
        .count();
    assert_eq!(kto_lines, 3);
    // A checkpoint reloads to the same model.
    let reloaded = Gpt::load_safetensors(dir.join("kto.safetensors")).unwrap();
    assert_eq!(reloaded.config().n_embd, 32);

    // Into the same directory: refused unless asked to overwrite (tests/resume.rs).
    let skip = TrainArgs {
        skip_sft: true,
        run_dpo: false,
        overwrite: true,
        ..args
    };
    let line = run(&skip, false).unwrap().summary_line();
    assert!(
        line.contains(" sft=skipped ") && !line.contains("dpo="),
        "{line}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn empty_data_sets_are_named_errors_before_any_training() {
    use halo_kernels::HaloError;
    let dir = std::env::temp_dir().join(format!("halo-train-empty-{}", std::process::id()));
    for (args, flag) in [
        (
            TrainArgs {
                sft_lines: 0,
                ..tiny_run_args(&dir)
            },
            "sft_lines",
        ),
        (
            TrainArgs {
                pretrain_lines: 0,
                ..tiny_run_args(&dir)
            },
            "pretrain_lines",
        ),
        (
            TrainArgs {
                samples_per_prompt: 0,
                preference_data: halo_train::train::config::PreferenceSource::Sampled,
                ..tiny_run_args(&dir)
            },
            "samples_per_prompt",
        ),
    ] {
        match run(&args, false) {
            Err(HaloError::InvalidHyperParameter { name, .. }) => assert_eq!(name, flag),
            other => panic!("{flag}: expected an error naming it, got {other:?}"),
        }
    }
    // Every judged sample for KTO needs samples: refused before any training.
    let all_samples = TrainArgs {
        kto_data: halo_train::train::config::KtoData::AllSamples,
        ..tiny_run_args(&dir)
    };
    assert!(matches!(
        run(&all_samples, false),
        Err(HaloError::InvalidShape(m)) if m.contains("all-samples")
    ));
    assert!(!dir.join("base.safetensors").exists());
    // SFT lines exist but none is desirable: every generated answer is wrong.
    let no_desirable = TrainArgs {
        sft_lines: 5,
        carry_error_rate: 1.0,
        noise_rate: 1.0,
        ..tiny_run_args(&dir)
    };
    let err = run(&no_desirable, false).unwrap_err();
    assert!(
        matches!(&err, HaloError::Dataset { reason, .. } if reason.contains("no desirable line")),
        "{err:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn precomputed_reference_logps_give_the_same_kto_step_and_are_really_used() {
    use halo_train::train::kto::precompute_reference_logps;
    let tok = TextTokenizer::Byte;
    let (policy, reference) = (tiny_model(1), tiny_model(2));
    let examples = examples();
    let refs: Vec<&UnpairedExample> = examples.iter().collect();
    let config = KtoConfig::default();
    let batch = kto_batch(&tok, &refs, 16).unwrap();
    let on_the_fly = kto_step(&policy, &reference, &batch, &config).unwrap();

    // Scored in one pass, in a different order than the batch: the cache is indexed, not ordered.
    let rows: Vec<(&str, &str)> = examples
        .iter()
        .rev()
        .map(|e| (e.prompt.as_str(), e.completion.as_str()))
        .collect();
    let mut cache = precompute_reference_logps(&reference, &tok, &rows, 16).unwrap();
    cache.reverse();
    let precomputed = KtoBatch {
        reference_logps: Some(cache.clone()),
        ..batch.clone()
    };
    let cached = kto_step(&policy, &reference, &precomputed, &config).unwrap();
    assert!(
        (cached.host_metrics().unwrap().loss - on_the_fly.host_metrics().unwrap().loss).abs()
            < 1e-6,
        "{} vs {}",
        cached.host_metrics().unwrap().loss,
        on_the_fly.host_metrics().unwrap().loss
    );
    for (param, g) in on_the_fly.grads.iter() {
        let h = cached.grads.get(param).unwrap();
        for (a, b) in g.iter().zip(h) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                "param {param}: {a} vs {b}"
            );
        }
    }

    // The step reads the cache: raising one example's cached reference log-prob moves the loss.
    // (Shifting all of them would cancel between the balanced desirable and undesirable halves.)
    let mut raised = cache.clone();
    raised[0] += 1.0;
    let shifted = KtoBatch {
        reference_logps: Some(raised),
        ..batch.clone()
    };
    let moved = kto_step(&policy, &reference, &shifted, &config).unwrap();
    assert!(
        (moved.host_metrics().unwrap().loss - on_the_fly.host_metrics().unwrap().loss).abs() > 1e-3
    );

    // A cache of the wrong length is an error, not a silent mismatch.
    let short = KtoBatch {
        reference_logps: Some(cache[1..].to_vec()),
        ..batch
    };
    assert!(kto_step(&policy, &reference, &short, &config).is_err());
}
