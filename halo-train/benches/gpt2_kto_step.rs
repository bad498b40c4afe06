//! One KTO training step of a 124M-parameter GPT-2 (12 layers, 12 heads, 768 wide, vocab 50257)
//! on a CUDA GPU: the policy's forward through the fused LM head, the frozen reference's and the
//! KL pairs' inference forwards, the queued KTO loss, the backward, clipping and AdamW — issue
//! 13's goal is this step within 2× of PyTorch eager (transformers' GPT2LMHeadModel, TRL's
//! KTOTrainer loss) on the same GPU.
//!
//! `cargo bench -p halo-train --bench gpt2_kto_step`: prints milliseconds and tokens per second
//! per step (best of `HALO_BENCH_STEPS`, default 5, after one warm-up step) and the host waits of
//! a step (1). Without a GPU it says so and measures nothing: the CPU would take minutes per step.
//! `HALO_BENCH_BATCH` / `HALO_BENCH_SEQ` set the batch (default 8 × 512: 4096 completion tokens,
//! the reference and KL forwards on top).

use std::time::Instant;

use halo_kernels::losses::KtoConfig;
use halo_kernels::IGNORE_INDEX;
use halo_train::autograd::Device;
use halo_train::model::optim::{AdamW, AdamWConfig};
use halo_train::model::{Gpt, GptConfig, ModelRef};
use halo_train::train::kto::kto_step;
use halo_train::train::trainee::Trainee;
use halo_train::train::{KtoBatch, TokenBatch};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Random token rows whose second half is the completion (the first half a prompt, ignored).
fn token_batch(rng: &mut ChaCha8Rng, batch: usize, seq: usize, vocab: usize) -> TokenBatch {
    let input_ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.gen_range(0..vocab as u32))
        .collect();
    let targets = (0..batch * seq)
        .map(|i| {
            let t = i % seq;
            if t + 1 < seq && t >= seq / 2 {
                input_ids[i + 1] as i32
            } else {
                IGNORE_INDEX
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

fn main() {
    let gpu = match Device::cuda() {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("gpt2_kto_step: skipped, no CUDA GPU ({e})");
            return;
        }
    };
    let (batch, seq) = (
        env_usize("HALO_BENCH_BATCH", 8),
        env_usize("HALO_BENCH_SEQ", 512),
    );
    let steps = env_usize("HALO_BENCH_STEPS", 5).max(1);
    let config = GptConfig {
        n_layer: 12,
        n_head: 12,
        n_embd: 768,
        vocab_size: 50257,
        n_ctx: 1024,
        dropout: 0.0,
    };
    let mut host = Gpt::new(config, 0).expect("GPT-2 124M");
    println!(
        "gpt2_kto_step: {} parameters, batch {batch} × {seq}",
        host.num_parameters()
    );
    let reference = host.to_device(&gpu).expect("reference on the GPU");
    let mut trainee = Trainee::new(&host, AdamW::new(&host, AdamWConfig::default()), &gpu)
        .expect("policy on the GPU");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let kto = KtoBatch {
        examples: token_batch(&mut rng, batch, seq, config.vocab_size),
        kl_pairs: token_batch(&mut rng, batch, seq, config.vocab_size),
        desirable: (0..batch).map(|i| i % 2 == 0).collect(),
        reference_logps: None,
    };
    let tokens = kto
        .examples
        .targets
        .iter()
        .filter(|&&t| t != IGNORE_INDEX)
        .count();
    let reference = ModelRef::Device(&reference);
    let config = KtoConfig::default();
    let mut best = f64::INFINITY;
    for step in 0..=steps {
        let start = Instant::now();
        let out = kto_step(&trainee.model(&host), &reference, &kto, &config).expect("KTO step");
        let report = trainee
            .step(&mut host, out, 1.0, 1e-5)
            .expect("clip + AdamW");
        let seconds = start.elapsed().as_secs_f64();
        if step > 0 {
            best = best.min(seconds);
        }
        println!(
            "step {step}{}: {:.1} ms, loss {:.4}, grad norm {:.3}",
            if step == 0 { " (warm-up)" } else { "" },
            seconds * 1e3,
            report.metrics.loss,
            report.grad_norm
        );
    }
    println!(
        "gpt2_kto_step: best of {steps}: {:.1} ms/step, {:.0} completion tokens/s \
         ({} policy + {} reference/KL sequence forwards of {seq} tokens per step)",
        best * 1e3,
        tokens as f64 / best,
        batch,
        3 * batch
    );
}
