//! One training step (forward + backward + clip + AdamW) of a small GPT, in tokens per second.
//!
//! `cargo bench --bench train_step -- --quick`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use halo_train::autograd::Tape;
use halo_train::model::optim::{clip_grad_norm, AdamW, AdamWConfig};
use halo_train::model::{Gpt, GptConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn train_step(c: &mut Criterion) {
    let config = GptConfig {
        n_layer: 2,
        n_head: 4,
        n_embd: 128,
        vocab_size: 256,
        n_ctx: 32,
        dropout: 0.0,
    };
    let (batch, seq) = (16, 32);
    let mut model = Gpt::new(config, 0).unwrap();
    let mut opt = AdamW::new(&model, AdamWConfig::default());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.gen_range(0..256)).collect();
    let targets: Vec<i32> = (0..batch * seq).map(|_| rng.gen_range(0..256)).collect();

    let mut group = c.benchmark_group("train_step");
    group.throughput(Throughput::Elements((batch * seq) as u64));
    group.sample_size(10);
    group.measurement_time(std::time::Duration::from_secs(3));
    group.bench_function("gpt_2x128_v256_b16_t32", |b| {
        b.iter(|| {
            let mut tape = Tape::new();
            let loss = model.nll(&mut tape, &ids, &targets, batch, seq).unwrap();
            let mut grads = tape.backward_scalar(loss).unwrap();
            clip_grad_norm(&mut grads, 1.0);
            opt.step(&mut model, &grads, 1e-4).unwrap();
        })
    });
    group.bench_function("forward_only_2x128_v256_b16_t32", |b| {
        b.iter(|| {
            model
                .token_logprobs_inference(&ids, &targets, batch, seq)
                .unwrap()
        })
    });
    group.finish();

    // A "few million parameters" model (4 layers × 256 wide: 3.2M parameters), same batch.
    let config = GptConfig {
        n_layer: 4,
        n_head: 4,
        n_embd: 256,
        vocab_size: 256,
        n_ctx: 32,
        dropout: 0.0,
    };
    let mut model = Gpt::new(config, 0).unwrap();
    let mut opt = AdamW::new(&model, AdamWConfig::default());
    let mut group = c.benchmark_group("train_step");
    group.throughput(Throughput::Elements((batch * seq) as u64));
    group.sample_size(10);
    group.measurement_time(std::time::Duration::from_secs(5));
    group.bench_function("gpt_4x256_v256_b16_t32", |b| {
        b.iter(|| {
            let mut tape = Tape::new();
            let loss = model.nll(&mut tape, &ids, &targets, batch, seq).unwrap();
            let mut grads = tape.backward_scalar(loss).unwrap();
            clip_grad_norm(&mut grads, 1.0);
            opt.step(&mut model, &grads, 1e-4).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
