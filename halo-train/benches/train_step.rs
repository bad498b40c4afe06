//! One training step (forward + backward + clip + AdamW) of a small GPT, in tokens per second, at
//! the two shapes of issue 13 (PyTorch eager with transformers' GPT2LMHeadModel, same machine:
//! ~34k tokens/s for 2 layers × 128 wide, ~7.1k for 4 × 256; vocab 256, batch 16 × 32, AdamW,
//! clip 1).
//!
//! `cargo bench -p halo-train --bench train_step [-- --quick]`
//!
//! With a CUDA GPU the same steps also run there (`--device cuda` of the training example: the
//! tape on the device, clipping and AdamW on the device, one host wait per step) and print beside
//! the CPU figures; without one the GPU lines say why they were skipped.
//!
//! After criterion's figures (a mean, at the mercy of whatever else runs on the machine) it
//! prints the best step of a fixed number (`best of N`), the figure to compare before/after on a
//! shared machine: other processes can only make a step slower, never faster. Beside it, the
//! process's CPU time per step (user + system, all threads: what the step costs the machine,
//! spinning thread pools and page faults included).

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use halo_train::autograd::{Device, Tape};
use halo_train::model::optim::{clip_grad_norm, AdamW, AdamWConfig};
use halo_train::model::GptWeights;
use halo_train::model::{Gpt, GptConfig};
use halo_train::train::nll::nll_step;
use halo_train::train::trainee::Trainee;
use halo_train::train::TokenBatch;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BATCH: usize = 16;
const SEQ: usize = 32;
const VOCAB: usize = 256;

/// One benchmarked shape: a model, its optimizer and a fixed batch.
struct Setup {
    name: &'static str,
    model: Gpt,
    opt: AdamW,
    ids: Vec<u32>,
    targets: Vec<i32>,
}

impl Setup {
    fn new(name: &'static str, n_layer: usize, n_embd: usize) -> Self {
        let config = GptConfig {
            n_layer,
            n_head: 4,
            n_embd,
            vocab_size: VOCAB,
            n_ctx: SEQ,
            dropout: 0.0,
        };
        let model = Gpt::new(config, 0).unwrap();
        let opt = AdamW::new(&model, AdamWConfig::default());
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let ids = (0..BATCH * SEQ)
            .map(|_| rng.gen_range(0..VOCAB as u32))
            .collect();
        let targets = (0..BATCH * SEQ)
            .map(|_| rng.gen_range(0..VOCAB as i32))
            .collect();
        Self {
            name,
            model,
            opt,
            ids,
            targets,
        }
    }

    /// Forward, backward, clip to norm 1, AdamW.
    fn train_step(&mut self) {
        let mut tape = Tape::new();
        let loss = self
            .model
            .nll(&mut tape, &self.ids, &self.targets, BATCH, SEQ)
            .unwrap();
        let mut grads = tape.backward_scalar(loss).unwrap();
        drop(tape);
        clip_grad_norm(&mut grads, 1.0);
        self.opt.step(&mut self.model, &grads, 1e-4).unwrap();
    }

    /// The forward alone, without gradients (the frozen reference model's pass).
    fn forward(&self) -> Vec<f32> {
        self.model
            .token_logprobs_inference(&self.ids, &self.targets, BATCH, SEQ)
            .unwrap()
    }
}

fn criterion_figures(c: &mut Criterion, setups: &mut [Setup]) {
    for s in setups.iter_mut() {
        let mut group = c.benchmark_group("train_step");
        group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(4));
        group.bench_function(format!("gpt_{}_v256_b16_t32", s.name), |b| {
            b.iter(|| s.train_step())
        });
        group.bench_function(format!("forward_only_{}_v256_b16_t32", s.name), |b| {
            b.iter(|| s.forward())
        });
        group.finish();
    }
}

/// User + system CPU time of the whole process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The fastest of `n` calls of `f` (after two warm-up calls), and the mean CPU time per call.
fn best_of(n: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    f();
    f();
    let cpu_start = cpu_time();
    let best = (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap_or_default();
    (best, (cpu_time() - cpu_start) / n.max(1) as u32)
}

fn print_best(setups: &mut [Setup], n: usize) {
    let tokens = (BATCH * SEQ) as f64;
    for s in setups.iter_mut() {
        let (step, step_cpu) = best_of(n, || s.train_step());
        let (fwd, fwd_cpu) = best_of(n, || {
            std::hint::black_box(s.forward());
        });
        println!(
            "best of {n}: {}  train step {:7.2} ms = {:6.0} tokens/s (cpu {:7.2} ms/step)   \
             forward {:6.2} ms = {:6.0} tokens/s (cpu {:6.2} ms)",
            s.name,
            step.as_secs_f64() * 1e3,
            tokens / step.as_secs_f64(),
            step_cpu.as_secs_f64() * 1e3,
            fwd.as_secs_f64() * 1e3,
            tokens / fwd.as_secs_f64(),
            fwd_cpu.as_secs_f64() * 1e3,
        );
    }
}

/// Best-of times of the step's phases (forward, backward, clip, AdamW), to see where a step
/// goes; each phase is short enough that a best-of finds a quiet moment on a loaded machine.
fn print_phases(setups: &mut [Setup], n: usize) {
    for s in setups.iter_mut() {
        let mut best = [Duration::MAX; 4];
        for _ in 0..n + 2 {
            let t0 = Instant::now();
            let mut tape = Tape::new();
            let loss = s
                .model
                .nll(&mut tape, &s.ids, &s.targets, BATCH, SEQ)
                .unwrap();
            let t1 = Instant::now();
            let mut grads = tape.backward_scalar(loss).unwrap();
            drop(tape);
            let t2 = Instant::now();
            clip_grad_norm(&mut grads, 1.0);
            let t3 = Instant::now();
            s.opt.step(&mut s.model, &grads, 1e-4).unwrap();
            drop(grads);
            let t4 = Instant::now();
            for (b, d) in best.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
                *b = (*b).min(d);
            }
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "phases (best of {n}): {}  forward {:.2} ms, backward {:.2} ms, clip {:.2} ms, adamw {:.2} ms",
            s.name,
            ms(best[0]),
            ms(best[1]),
            ms(best[2]),
            ms(best[3]),
        );
    }
}

/// The same step on a CUDA device: the model and AdamW's moments resident there.
struct GpuSetup {
    name: &'static str,
    host: Gpt,
    trainee: Trainee,
    batch: TokenBatch,
}

impl GpuSetup {
    fn new(cpu: &Setup, device: &Device) -> halo_kernels::error::Result<Self> {
        let host = cpu.model.clone();
        let trainee = Trainee::new(&host, AdamW::new(&host, AdamWConfig::default()), device)?;
        Ok(Self {
            name: cpu.name,
            host,
            trainee,
            batch: TokenBatch {
                input_ids: cpu.ids.clone(),
                targets: cpu.targets.clone(),
                batch: BATCH,
                seq: SEQ,
            },
        })
    }

    /// Forward, backward, clip to norm 1, AdamW, all on the device; the checks, the loss and the
    /// norm read in the step's one wait.
    fn train_step(&mut self) {
        let out = nll_step(&self.trainee.model(&self.host), &self.batch).unwrap();
        self.trainee.step(&mut self.host, out, 1.0, 1e-4).unwrap();
    }
}

/// Best-of figures on the GPU, or why there are none.
fn print_gpu(setups: &[Setup], n: usize) {
    let device = match Device::cuda() {
        Ok(d) => d,
        Err(e) => {
            println!("gpu: skipped (no CUDA device: {e})");
            return;
        }
    };
    let name = match &device {
        Device::Cuda(gpu) => gpu.device_name().unwrap_or_else(|_| "CUDA device".into()),
        Device::Cpu => "CPU".into(),
    };
    let tokens = (BATCH * SEQ) as f64;
    for cpu in setups {
        let mut s = match GpuSetup::new(cpu, &device) {
            Ok(s) => s,
            Err(e) => {
                println!("gpu {}: skipped ({e})", cpu.name);
                return;
            }
        };
        let (step, _) = best_of(n, || s.train_step());
        println!(
            "best of {n} on {name}: {}  train step {:7.2} ms = {:7.0} tokens/s",
            s.name,
            step.as_secs_f64() * 1e3,
            tokens / step.as_secs_f64(),
        );
    }
}

fn main() {
    let mut setups = [Setup::new("2x128", 2, 128), Setup::new("4x256", 4, 256)];
    let best_only = std::env::var_os("HALO_BENCH_BEST_ONLY").is_some();
    if !best_only {
        let mut c = Criterion::default().configure_from_args();
        criterion_figures(&mut c, &mut setups);
        c.final_summary();
    }
    let n = std::env::var("HALO_BENCH_BEST_OF")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    print_best(&mut setups, n);
    if std::env::var_os("HALO_BENCH_PHASES").is_some() {
        print_phases(&mut setups, n);
    }
    print_gpu(&setups, n);
}
