//! Training on the emulated CUDA device against the same training on the CPU (issue 13): the GPT's
//! forward and backward, AdamW steps with clipping, a KTO step, and a short pretrain → SFT → KTO
//! → DPO run of the training example with `--device cuda-emulated`. The CPU run is the reference;
//! both are f32 with different summation orders, so losses and weights agree to 1e-4 relative,
//! not bitwise.

use std::path::{Path, PathBuf};

use clap::Parser;
use halo_kernels::losses::KtoConfig;
use halo_train::autograd::{Device, Tape};
use halo_train::model::optim::{AdamW, AdamWConfig};
use halo_train::model::{Gpt, GptConfig, GptWeights, ModelRef};
use halo_train::train::trainee::Trainee;
use halo_train::train::{
    kto::kto_step, kto_batch, nll::nll_step, run, TextTokenizer, TokenBatch, TrainArgs,
    UnpairedExample,
};

/// The real GPU when there is one (scripts/gpu_check.sh runs these tests there; not with
/// `HALO_CUDA_EMULATED=1`), else the emulated device, which the test build always has.
fn emulated() -> Device {
    Device::cuda()
        .or_else(|_| Device::cuda_emulated())
        .expect("the emulated CUDA device (feature `emulation`) must load")
}

fn config() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 24,
        vocab_size: 37,
        n_ctx: 9,
        dropout: 0.1,
    }
}

/// `n` KTO examples, alternately desirable and undesirable.
fn unpaired(n: usize) -> Vec<UnpairedExample> {
    (0..n)
        .map(|i| UnpairedExample {
            prompt: format!("{i}+{}=", i + 1),
            completion: format!("{}", 2 * i + 1),
            desirable: i % 2 == 0,
        })
        .collect()
}

/// Relative closeness of two tensors: max |a − b| ≤ rel · max |b| (+ a tiny floor).
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= rel * scale,
        "{what}: max |diff| {worst} > {rel} · {scale}"
    );
}

/// Relative L2 distance of two tensors: ‖a − b‖ ≤ rel · ‖b‖. For weights after AdamW steps: Adam
/// divides each gradient by its own running RMS, so a gradient entry near 0 (a bias) moves its
/// weight by about ±lr whatever its last bits; a per-element relative bound would measure that
/// sign noise, the norm measures the model.
fn assert_close_l2(what: &str, got: &[f32], want: &[f32], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum::<f64>().sqrt();
    assert!(
        diff <= rel * norm.max(1e-6),
        "{what}: ‖diff‖ {diff} > {rel} · ‖want‖ {norm}"
    );
}

/// A `[batch, seq]` batch of ids and next-token targets, some ignored.
fn batch(batch: usize, seq: usize, vocab: usize, seed: usize) -> TokenBatch {
    let input_ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7 + seed * 13 + 3) % vocab) as u32)
        .collect();
    let targets: Vec<i32> = (0..batch * seq)
        .map(|i| {
            if (i + seed) % 5 == 4 {
                -100
            } else {
                ((i * 11 + seed * 5 + 1) % vocab) as i32
            }
        })
        .collect();
    TokenBatch {
        input_ids,
        targets,
        batch,
        seq,
    }
}

/// The forward (NLL through the materialized logits, fused-head log-probs) and every parameter's
/// gradient, dropout on: the masks come from the same host RNG on both devices.
#[test]
fn gpt_forward_and_backward_match_the_cpu() {
    let gpu = emulated();
    let model = Gpt::new(config(), 7).unwrap();
    let on_gpu = model.to_device(&gpu).unwrap();
    let b = batch(3, 9, 37, 1);
    let (cpu, cpu_grads) = nll_step(&model, &b).unwrap().read().unwrap();
    let (cuda, cuda_grads) = nll_step(&on_gpu, &b).unwrap().read().unwrap();
    assert!(
        ((cuda.loss - cpu.loss) / cpu.loss).abs() < 1e-5,
        "{} vs {}",
        cuda.loss,
        cpu.loss
    );
    let cuda_grads = cuda_grads.to_host().unwrap();
    let names = model.parameter_names();
    for (i, name) in names.iter().enumerate() {
        let want = cpu_grads
            .get(i)
            .unwrap_or_else(|| panic!("cpu grad {name}"));
        let got = cuda_grads
            .get(i)
            .unwrap_or_else(|| panic!("cuda grad {name}"));
        assert_close(name, got, want, 1e-4);
    }
    // The fused LM head's per-token log-probs, on an inference tape.
    let mut tape = Tape::inference().on(gpu.clone());
    let v = on_gpu
        .token_logprobs_fused_head(&mut tape, &b.input_ids, &b.targets, 3, 9)
        .unwrap();
    let fused = tape.to_host(v).unwrap();
    let plain = model
        .token_logprobs_inference(&b.input_ids, &b.targets, 3, 9)
        .unwrap();
    assert_close("fused-head logp", &fused, &plain, 1e-5);
}

/// Steps of NLL then KTO through [`Trainee`] (clipping + AdamW on the device): the loss of every
/// step and the weights after the last one agree with the CPU run.
#[test]
fn training_steps_match_the_cpu_step_by_step() {
    let gpu = emulated();
    let start = Gpt::new(config(), 11).unwrap();
    let adamw = AdamWConfig {
        lr: 3e-3,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let examples = unpaired(4);
    let run_on = |device: &Device| -> (Vec<f64>, Gpt) {
        let mut host = start.clone();
        let mut trainee = Trainee::new(&host, AdamW::new(&host, adamw), device).unwrap();
        let mut losses = Vec::new();
        for step in 0..3 {
            let b = batch(2, 9, 37, step);
            let out = nll_step(&trainee.model(&host), &b).unwrap();
            // A max norm below the gradients' norm: clipping is exercised.
            let report = trainee.step(&mut host, out, 0.5, 3e-3).unwrap();
            losses.push(report.metrics.loss);
        }
        trainee.sync_host(&mut host).unwrap();
        (losses, host)
    };
    let (cpu_losses, cpu_model) = run_on(&Device::Cpu);
    let (gpu_losses, gpu_model) = run_on(&gpu);
    for (step, (g, c)) in gpu_losses.iter().zip(&cpu_losses).enumerate() {
        assert!(((g - c) / c).abs() < 1e-4, "step {step}: {g} vs {c}");
    }
    for (p, q) in gpu_model.parameters().iter().zip(cpu_model.parameters()) {
        assert_close_l2(&p.name, &p.data, &q.data, 1e-4);
    }
    // One KTO step from there: policy on the device, reference on the device too.
    let tokenizer = TextTokenizer::Byte;
    let big = Gpt::new(
        GptConfig {
            vocab_size: tokenizer.vocab_size(),
            ..config()
        },
        5,
    )
    .unwrap();
    let refs: Vec<&UnpairedExample> = examples.iter().collect();
    let kb = kto_batch(&tokenizer, &refs, 9).unwrap();
    let kto = KtoConfig::default();
    let (cpu, cpu_grads) = kto_step(&big, &big, &kb, &kto).unwrap().read().unwrap();
    let big_gpu = big.to_device(&gpu).unwrap();
    let (cuda, cuda_grads) = kto_step(
        &ModelRef::Device(&big_gpu),
        &ModelRef::Device(&big_gpu),
        &kb,
        &kto,
    )
    .unwrap()
    .read()
    .unwrap();
    assert!(
        (cuda.loss - cpu.loss).abs() <= 1e-4 * cpu.loss.abs().max(1e-3),
        "kto loss {} vs {}",
        cuda.loss,
        cpu.loss
    );
    let cuda_grads = cuda_grads.to_host().unwrap();
    for (i, name) in big.parameter_names().iter().enumerate() {
        if let (Some(g), Some(c)) = (cuda_grads.get(i), cpu_grads.get(i)) {
            assert_close(name, g, c, 1e-3);
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("halo-device-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn tiny_args(dir: &Path, device: &str) -> TrainArgs {
    let flags = [
        "--operand-limit",
        "20",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--pretrain-steps",
        "12",
        "--sft-steps",
        "4",
        "--kto-steps",
        "4",
        "--pretrain-lines",
        "400",
        "--sft-lines",
        "40",
        "--n-eval",
        "8",
        "--evals-per-stage",
        "1",
        "--pretrain-batch-size",
        "8",
        "--batch-size",
        "8",
        "--preference-data",
        "synthetic",
        "--run-dpo",
        "--checkpoint-every",
        "5",
        "--device",
        device,
        "--output-dir",
    ];
    let mut all: Vec<String> = std::iter::once("train_kto")
        .chain(flags)
        .map(String::from)
        .collect();
    all.push(dir.display().to_string());
    TrainArgs::parse_from(all)
}

fn losses(dir: &Path, stage: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["stage"] == stage)
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

/// The training example end to end on the emulated device: every stage runs, the checkpoints
/// load, and the losses follow the CPU run's.
#[test]
fn the_training_example_runs_on_the_emulated_device() {
    let cpu_dir = temp_dir("cpu");
    let gpu_dir = temp_dir("gpu");
    run(&tiny_args(&cpu_dir, "cpu"), false).unwrap();
    run(&tiny_args(&gpu_dir, "cuda-emulated"), false).unwrap();
    for stage in ["pretrain", "sft", "kto", "dpo"] {
        let (c, g) = (losses(&cpu_dir, stage), losses(&gpu_dir, stage));
        assert!(
            !c.is_empty() && c.len() == g.len(),
            "{stage}: {c:?} vs {g:?}"
        );
        for (step, (a, b)) in g.iter().zip(&c).enumerate() {
            assert!(
                ((a - b) / b).abs() < 1e-3,
                "{stage} step {step}: {a} vs {b}"
            );
        }
    }
    for file in ["base", "sft", "kto", "dpo"] {
        let path = gpu_dir.join(format!("{file}.safetensors"));
        Gpt::load_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let _ = std::fs::remove_dir_all(&cpu_dir);
    let _ = std::fs::remove_dir_all(&gpu_dir);
}

/// Host round trips of a training step on the device, counted on the emulated device: the CUDA
/// ops only queue work, the token ops' checks stay on the device, and the update reads the checks,
/// the loss and the norm together (issue 13: one status read and one loss read per step at most).
/// An NLL step (forward, backward, clip, AdamW) waits once in all.
#[test]
fn host_round_trips_per_step() {
    use halo_kernels::emulation::call_counts;
    // Counted by the emulated device only (scripts/gpu_check.sh skips this test on a GPU).
    let gpu = Device::cuda_emulated().expect("the emulated CUDA device");
    let model = Gpt::new(config(), 3).unwrap();
    let mut host = model.clone();
    let mut trainee = Trainee::new(&host, AdamW::new(&host, AdamWConfig::default()), &gpu).unwrap();
    let b = batch(2, 9, 37, 2);
    // Warm up (module loads, the cuBLAS handle).
    let out = nll_step(&trainee.model(&host), &b).unwrap();
    trainee.step(&mut host, out, 1.0, 1e-3).unwrap();
    call_counts(true).unwrap();
    let out = nll_step(&trainee.model(&host), &b).unwrap();
    let forward_backward = call_counts(true).unwrap();
    let report = trainee.step(&mut host, out, 1.0, 1e-3).unwrap();
    let update = call_counts(true).unwrap();
    eprintln!("NLL forward + backward: {forward_backward:?}\nclip + AdamW + read: {update:?}");
    assert!(report.metrics.loss.is_finite() && report.grad_norm > 0.0);
    assert_eq!(
        forward_backward.host_waits, 0,
        "the forward and backward must only queue work"
    );
    assert_eq!(
        update.host_waits, 1,
        "the update must wait once (checks, loss and norm together)"
    );
}

/// The same for a KTO step (policy forward through the fused head, the reference's and the KL
/// pairs' inference forwards, the queued loss, the backward) and a DPO step: nothing waits until
/// the update, which waits once.
#[test]
fn kto_and_dpo_steps_wait_once() {
    use halo_kernels::emulation::call_counts;
    use halo_kernels::losses::DpoConfig;
    use halo_train::train::{batching::dpo_batch, dpo::dpo_step, PairedExample};
    let gpu = Device::cuda_emulated().expect("the emulated CUDA device");
    let tokenizer = TextTokenizer::Byte;
    let start = Gpt::new(
        GptConfig {
            vocab_size: tokenizer.vocab_size(),
            ..config()
        },
        6,
    )
    .unwrap();
    let reference = start.to_device(&gpu).unwrap();
    let examples = unpaired(4);
    let refs: Vec<&UnpairedExample> = examples.iter().collect();
    let kb = kto_batch(&tokenizer, &refs, 9).unwrap();
    let pairs: Vec<PairedExample> = (0..2)
        .map(|i| PairedExample {
            prompt: format!("{i}+1="),
            chosen: format!("{}", i + 1),
            rejected: format!("{}", i + 2),
        })
        .collect();
    let pair_refs: Vec<&PairedExample> = pairs.iter().collect();
    let db = dpo_batch(&tokenizer, &pair_refs, 9).unwrap();
    let mut host = start.clone();
    let mut trainee = Trainee::new(&host, AdamW::new(&host, AdamWConfig::default()), &gpu).unwrap();
    let reference = ModelRef::Device(&reference);
    for round in 0..2 {
        call_counts(true).unwrap();
        let out = kto_step(
            &trainee.model(&host),
            &reference,
            &kb,
            &KtoConfig::default(),
        )
        .unwrap();
        let kto_queued = call_counts(true).unwrap();
        trainee.step(&mut host, out, 1.0, 1e-3).unwrap();
        let kto_update = call_counts(true).unwrap();
        let out = dpo_step(
            &trainee.model(&host),
            &reference,
            &db,
            &DpoConfig::default(),
        )
        .unwrap();
        let dpo_queued = call_counts(true).unwrap();
        trainee.step(&mut host, out, 1.0, 1e-3).unwrap();
        let dpo_update = call_counts(true).unwrap();
        eprintln!(
            "round {round}: KTO {} + {} waits, DPO {} + {} waits",
            kto_queued.host_waits,
            kto_update.host_waits,
            dpo_queued.host_waits,
            dpo_update.host_waits
        );
        // Round 0 loads modules and the cuBLAS handle; count from round 1.
        if round == 1 {
            assert_eq!(
                kto_queued.host_waits, 0,
                "the KTO step must only queue work"
            );
            assert_eq!(kto_update.host_waits, 1, "the KTO update must wait once");
            assert_eq!(
                dpo_queued.host_waits, 0,
                "the DPO step must only queue work"
            );
            assert_eq!(dpo_update.host_waits, 1, "the DPO update must wait once");
        }
    }
}

/// A policy, a reference that differs from it (so the log-ratios are not all 0) and three
/// "i+2i=" pairs with the right sum chosen, as one DPO batch of byte tokens.
fn dpo_models_and_batch() -> (Gpt, Gpt, TokenBatch) {
    use halo_train::train::{batching::dpo_batch, PairedExample};
    let tokenizer = TextTokenizer::Byte;
    let model = Gpt::new(
        GptConfig {
            vocab_size: tokenizer.vocab_size(),
            ..config()
        },
        8,
    )
    .unwrap();
    let reference = Gpt::new(*model.config(), 9).unwrap();
    let pairs: Vec<PairedExample> = (0..3)
        .map(|i| PairedExample {
            prompt: format!("{i}+{}=", 2 * i),
            chosen: format!("{}", 3 * i),
            rejected: format!("{}", 3 * i + 1),
        })
        .collect();
    let pair_refs: Vec<&PairedExample> = pairs.iter().collect();
    let db = dpo_batch(&tokenizer, &pair_refs, 9).unwrap();
    (model, reference, db)
}

/// A DPO step on the device against the CPU's: loss, metrics and every gradient.
#[test]
fn dpo_step_matches_the_cpu() {
    use halo_kernels::losses::DpoConfig;
    use halo_train::train::dpo::dpo_step;
    let gpu = emulated();
    let (model, reference, db) = dpo_models_and_batch();
    let config = DpoConfig::default();
    let (cpu, cpu_grads) = dpo_step(&model, &reference, &db, &config)
        .unwrap()
        .read()
        .unwrap();
    let (on_gpu, ref_gpu) = (
        model.to_device(&gpu).unwrap(),
        reference.to_device(&gpu).unwrap(),
    );
    let (cuda, cuda_grads) = dpo_step(&on_gpu, &ref_gpu, &db, &config)
        .unwrap()
        .read()
        .unwrap();
    assert!(
        (cuda.loss - cpu.loss).abs() <= 1e-4 * cpu.loss.abs(),
        "dpo loss {} vs {}",
        cuda.loss,
        cpu.loss
    );
    assert_eq!(cuda.metrics.len(), cpu.metrics.len());
    for ((n, a), (m, b)) in cuda.metrics.iter().zip(&cpu.metrics) {
        assert_eq!(n, m);
        assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{n}: {a} vs {b}");
    }
    let cuda_grads = cuda_grads.to_host().unwrap();
    for (i, name) in model.parameter_names().iter().enumerate() {
        match (cuda_grads.get(i), cpu_grads.get(i)) {
            (Some(g), Some(c)) => assert_close(name, g, c, 1e-3),
            (None, None) => {}
            _ => panic!("{name}: a gradient on one device only"),
        }
    }
}

/// A step whose device checks fail is an error at the update, and the gated update leaves the
/// weights and the optimizer as they were: a non-finite weight makes the logits non-finite, which
/// the token op's status reports (on the CPU the forward itself fails).
#[test]
fn a_failed_device_check_is_the_error_and_the_weights_stay() {
    let gpu = emulated();
    let mut host = Gpt::new(config(), 4).unwrap();
    let b = batch(2, 9, 37, 3);
    let mut poisoned = host.clone();
    // The final layer norm's bias (the last parameter): every row's logits become NaN.
    let (_, last) = poisoned.parameters_mut().last().unwrap();
    last[0] = f32::NAN;
    let cpu_err = nll_step(&poisoned, &b).unwrap_err().to_string();
    let mut trainee = Trainee::new(
        &poisoned,
        AdamW::new(&poisoned, AdamWConfig::default()),
        &gpu,
    )
    .unwrap();
    let out = nll_step(&trainee.model(&poisoned), &b).unwrap();
    let err = trainee
        .step(&mut poisoned, out, 1.0, 1e-3)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("non-finite") || err.contains("not finite"),
        "{err}"
    );
    assert_eq!(err, cpu_err, "the device's error is the CPU's");
    let before = poisoned.clone();
    trainee.sync_host(&mut host).unwrap();
    for (p, q) in host.parameters().iter().zip(before.parameters()) {
        let same = p
            .data
            .iter()
            .zip(&q.data)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{} changed by a step whose checks failed", p.name);
    }
    let optimizer = trainee.host_optimizer(&host).unwrap();
    assert_eq!(optimizer.steps(), 0, "the failed step is not counted");
}

/// A DPO batch the loss refuses (IPO's zero-token sequence, sft without a chosen token) is the
/// CPU's error on the device too, and the update gated on the step's statuses — the loss kernel's
/// among them — leaves every weight and the step count as they were.
#[test]
fn a_refused_dpo_loss_is_the_cpus_error_and_the_weights_stay() {
    use halo_kernels::losses::{DpoConfig, DpoLossType};
    use halo_train::train::dpo::dpo_step;
    let gpu = emulated();
    let (host, reference, full) = dpo_models_and_batch();
    let ref_gpu = reference.to_device(&gpu).unwrap();
    let seq = full.seq;
    // Sequences 0..3 are chosen, 3..6 rejected: ignore every target of the first chosen one, or
    // of all three.
    let mut first_empty = full.clone();
    first_empty.targets[..seq].fill(-100);
    let mut no_chosen = full.clone();
    no_chosen.targets[..3 * seq].fill(-100);
    for (loss_type, db, want) in [
        (DpoLossType::Ipo, &first_empty, "has no tokens"),
        (DpoLossType::SigmoidNorm, &first_empty, "has no tokens"),
        (DpoLossType::Sft, &no_chosen, "at least one chosen token"),
    ] {
        let config = DpoConfig {
            loss_type,
            ..DpoConfig::default()
        };
        let cpu_err = dpo_step(&host, &reference, db, &config)
            .and_then(|out| out.read())
            .unwrap_err()
            .to_string();
        assert!(cpu_err.contains(want), "{loss_type:?}: {cpu_err}");
        let mut policy = host.clone();
        let mut trainee =
            Trainee::new(&policy, AdamW::new(&policy, AdamWConfig::default()), &gpu).unwrap();
        let out = dpo_step(&trainee.model(&policy), &ref_gpu, db, &config).unwrap();
        let err = trainee
            .step(&mut policy, out, 1.0, 1e-3)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err, cpu_err,
            "{loss_type:?}: the device's error is the CPU's"
        );
        let mut after = host.clone();
        trainee.sync_host(&mut after).unwrap();
        for (p, q) in after.parameters().iter().zip(host.parameters()) {
            let same = p
                .data
                .iter()
                .zip(&q.data)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{loss_type:?}: {} changed by a refused step", p.name);
        }
        let optimizer = trainee.host_optimizer(&after).unwrap();
        assert_eq!(
            optimizer.steps(),
            0,
            "{loss_type:?}: the refused step is counted"
        );
    }
}

/// Refusals: `--device cuda` without a GPU is an error before the run writes anything; a device
/// optimizer for a host model, host gradients into it, a model's weights on the wrong device.
#[test]
fn device_refusals_are_clear_errors() {
    use halo_train::model::DeviceAdamW;
    if Device::cuda().is_err() {
        let dir = temp_dir("nogpu");
        let err = run(&tiny_args(&dir, "cuda"), false)
            .unwrap_err()
            .to_string();
        assert!(err.to_lowercase().contains("cuda"), "{err}");
        assert!(!dir.exists(), "a refused run created {}", dir.display());
    }
    let gpu = emulated();
    let model = Gpt::new(config(), 1).unwrap();
    let on_host = model.to_device(&Device::Cpu).unwrap();
    let err = DeviceAdamW::from_host(&AdamW::new(&model, AdamWConfig::default()), &on_host)
        .unwrap_err()
        .to_string();
    assert!(err.contains("CUDA"), "{err}");
    let mut on_gpu = model.to_device(&gpu).unwrap();
    let mut opt =
        DeviceAdamW::from_host(&AdamW::new(&model, AdamWConfig::default()), &on_gpu).unwrap();
    let host_grads = nll_step(&model, &batch(1, 9, 37, 0)).unwrap().grads;
    let err = opt
        .clip_and_step(&mut on_gpu, &host_grads, 1.0, 1e-3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("host gradients"), "{err}");
    // The host AdamW refuses device gradients instead of skipping them.
    let device_grads = nll_step(&on_gpu, &batch(1, 9, 37, 0)).unwrap().grads;
    let mut host_model = model.clone();
    let err = AdamW::new(&model, AdamWConfig::default())
        .step(&mut host_model, &device_grads, 1e-3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("CUDA device"), "{err}");
    // A CPU tape cannot record the device model's weights.
    let mut tape = Tape::new();
    let err = on_gpu
        .nll(&mut tape, &[1, 2], &[2, 3], 1, 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("CUDA tensor"), "{err}");
}
