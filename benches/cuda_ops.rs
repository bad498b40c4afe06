//! GPU benches of the fused kernels: forward (log-prob gather), in-place backward, the unfused
//! naive path (materialised log_softmax kernel + gather kernel) and the KTO loss launch, at
//! rows ∈ {4096, 16384} × vocab ∈ {32000, 128256}, bf16.
//!
//! Kernel time is measured with CUDA events around a batch of launches (`iter_custom`), so host
//! overhead and synchronisation are excluded; the KTO loss is timed end to end (launch, wait and
//! read-back: what a training step pays). Each shape also times a device-to-device copy of the
//! logits, and a summary line prints GB/s and the fraction of that copy bandwidth (bytes counted:
//! forward = logits read once; backward in place = logits read + written; copy = read + write).
//!
//! Without a GPU it prints "skipped: no CUDA GPU" and exits 0.
//! Run: `cargo bench --bench cuda_ops` (add `-- --quick` for a short run, or a filter).
//!
//! `cargo test` runs this file too (`test = true` in Cargo.toml), without `--bench`: then every
//! bench runs once (criterion's test mode) at tiny shapes, on the GPU or else on the emulated
//! device, so that the bench code cannot rot unseen. No figure from that run means anything.

use std::cell::Cell;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use halo_kernels::cpu::SavedLse;
use halo_kernels::cuda::{CudaBackend, CudaKlInput, CudaKtoBatch, CudaSlice, RowSplit};
use halo_kernels::losses::KtoConfig;
use halo_kernels::{DType, LogitElement, IGNORE_INDEX};
use rayon::prelude::*;

const ROWS: [usize; 2] = [4096, 16384];
const VOCABS: [usize; 2] = [32000, 128256];
/// Tokens per sequence for the KTO launch (batch = rows / SEQ_LEN).
const SEQ_LEN: usize = 512;

/// Shapes of the smoke run under `cargo test` (odd vocabularies on purpose).
const SMOKE_ROWS: [usize; 1] = [24];
const SMOKE_VOCABS: [usize; 2] = [515, 1031];
/// Small batches (evaluation, scoring: too few rows to fill the device), unsplit vs split rows.
const SMALL_BATCHES: [(usize, usize); 3] = [(1, 128256), (8, 128256), (32, 32000)];
/// The smoke run's small batch (wide enough that the automatic choice splits it).
const SMOKE_SMALL_BATCHES: [(usize, usize); 1] = [(2, 20011)];

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` does not.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let gpu = match CudaBackend::new() {
        Ok(gpu) => gpu,
        Err(e) if bench_mode => {
            println!("skipped: no CUDA GPU ({e})");
            return;
        }
        Err(_) => CudaBackend::emulated().expect("the emulated CUDA device"),
    };
    let name = gpu.device_name().unwrap_or_else(|_| "unknown GPU".into());
    println!("cuda_ops on {name}");
    let (rows_list, vocabs): (&[usize], &[usize]) = if bench_mode {
        (&ROWS, &VOCABS)
    } else {
        (&SMOKE_ROWS, &SMOKE_VOCABS)
    };
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let mut summary = Vec::new();
    for &rows in rows_list {
        for &vocab in vocabs {
            summary.extend(bench_shape(&mut c, &gpu, rows, vocab));
        }
    }
    let small: &[(usize, usize)] = if bench_mode {
        &SMALL_BATCHES
    } else {
        &SMOKE_SMALL_BATCHES
    };
    for &(rows, vocab) in small {
        summary.extend(bench_small_batch(&mut c, &gpu, rows, vocab));
    }
    c.final_summary();
    if !bench_mode {
        println!("smoke run on {name}: every bench ran once at tiny shapes (no figures)");
        return;
    }
    println!("\nsummary ({name}, bf16):");
    for line in summary {
        println!("  {line}");
    }
}

/// Average seconds per launch, from the (total, count) a timed closure accumulated.
struct Tally {
    total: Cell<Duration>,
    iters: Cell<u64>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            total: Cell::new(Duration::ZERO),
            iters: Cell::new(0),
        }
    }
    fn add(&self, d: Duration, iters: u64) {
        self.total.set(self.total.get() + d);
        self.iters.set(self.iters.get() + iters);
    }
    fn seconds(&self) -> f64 {
        self.total.get().as_secs_f64() / self.iters.get().max(1) as f64
    }
}

/// Times `iters` calls of `launch` on the GPU with events recorded around them.
fn gpu_time(gpu: &CudaBackend, iters: u64, tally: &Tally, mut launch: impl FnMut()) -> Duration {
    let ctx = gpu.context();
    let start = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .expect("create event");
    let end = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .expect("create event");
    start.record(gpu.stream()).expect("record event");
    for _ in 0..iters {
        launch();
    }
    end.record(gpu.stream()).expect("record event");
    let ms = start.elapsed_ms(&end).expect("elapsed time");
    let d = Duration::from_secs_f64(ms as f64 / 1e3);
    tally.add(d, iters);
    d
}

fn random_bf16(seed: u64, n: usize) -> Vec<bf16> {
    (0..n as u64)
        .into_par_iter()
        .map(|i| {
            let x = (i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            bf16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32) * 16.0 - 8.0)
        })
        .collect()
}

fn bench_shape(c: &mut Criterion, gpu: &CudaBackend, rows: usize, vocab: usize) -> Vec<String> {
    let n = rows * vocab;
    let elem = bf16::DTYPE.size_in_bytes();
    let logits_bytes = (n * elem) as f64;
    let shape = format!("{rows}x{vocab}");
    let host = random_bf16(rows as u64, n);
    let labels: Vec<i32> = (0..rows).map(|r| ((r * 7919) % vocab) as i32).collect();
    let d_logits = gpu.htod(&host).expect("upload logits");
    drop(host);
    let d_labels = gpu.htod(&labels).expect("upload labels");
    let mut d_logp = gpu.alloc_zeros::<f32>(rows).expect("alloc");
    let mut d_lse = gpu.alloc_zeros::<f32>(rows).expect("alloc");
    let mut d_lse_residual = gpu.alloc_zeros::<f32>(rows).expect("alloc");
    let mut status = gpu.new_status().expect("status");
    let mut out = Vec::new();

    let mut group = c.benchmark_group("cuda_ops");
    group.throughput(Throughput::Bytes(logits_bytes as u64));

    // Device copy of the logits: the bandwidth reference.
    let copy = Tally::new();
    {
        let mut dst: CudaSlice<bf16> = gpu.alloc_zeros(n).expect("alloc copy");
        group.bench_function(BenchmarkId::new("d2d_copy", &shape), |b| {
            b.iter_custom(|iters| {
                gpu_time(gpu, iters, &copy, || {
                    gpu.stream().memcpy_dtod(&d_logits, &mut dst).expect("copy")
                })
            })
        });
    }
    let copy_gbs = 2.0 * logits_bytes / copy.seconds() / 1e9;
    out.push(format!(
        "{shape}: d2d copy {copy_gbs:.0} GB/s (read + write)"
    ));
    let report = |what: &str, bytes: f64, t: &Tally| {
        let gbs = bytes / t.seconds() / 1e9;
        let tokens = rows as f64 / t.seconds();
        format!(
            "{shape}: {what} {:.1} us, {gbs:.0} GB/s = {:.0}% of copy bandwidth, {:.2e} tokens/s",
            t.seconds() * 1e6,
            100.0 * gbs / copy_gbs,
            tokens
        )
    };

    let forward = Tally::new();
    group.bench_function(BenchmarkId::new("forward_fused", &shape), |b| {
        b.iter_custom(|iters| {
            gpu_time(gpu, iters, &forward, || {
                gpu.enqueue_token_logprobs(
                    &d_logits,
                    &d_labels,
                    vocab,
                    IGNORE_INDEX,
                    &mut d_logp,
                    &mut d_lse,
                    &mut d_lse_residual,
                    &mut status,
                )
                .expect("forward")
            })
        })
    });
    let word = gpu.read_status(&status).expect("status");
    gpu.token_logprobs_status(word, &d_labels, vocab, IGNORE_INDEX)
        .expect("forward reported an error");
    out.push(report("forward fused", logits_bytes, &forward));

    let naive = Tally::new();
    {
        let mut log_probs: CudaSlice<bf16> = gpu.alloc_zeros(n).expect("alloc naive");
        let mut logp = gpu.alloc_zeros::<f32>(rows).expect("alloc");
        group.bench_function(
            BenchmarkId::new("forward_naive_log_softmax_gather", &shape),
            |b| {
                b.iter_custom(|iters| {
                    gpu_time(gpu, iters, &naive, || {
                        gpu.enqueue_naive_token_logprobs(
                            &d_logits,
                            &d_labels,
                            vocab,
                            IGNORE_INDEX,
                            &mut log_probs,
                            &mut logp,
                        )
                        .expect("naive")
                    })
                })
            },
        );
    }
    out.push(format!(
        "{} (fused is {:.2}x faster)",
        report("forward naive (log_softmax + gather)", logits_bytes, &naive),
        naive.seconds() / forward.seconds()
    ));

    let backward = Tally::new();
    {
        let mut d_grad_logits = gpu.stream().clone_dtod(&d_logits).expect("copy logits");
        let grad_logp = gpu.htod(&vec![0.5f32; rows]).expect("upload");
        group.throughput(Throughput::Bytes(2 * logits_bytes as u64));
        group.bench_function(BenchmarkId::new("backward_inplace", &shape), |b| {
            b.iter_custom(|iters| {
                gpu_time(gpu, iters, &backward, || {
                    // The in-place backward overwrites its input with the gradient: restore the
                    // logits first (the copy's own time, measured above, is subtracted below), so
                    // that every iteration differentiates real logits and passes the lse check.
                    gpu.stream()
                        .memcpy_dtod(&d_logits, &mut d_grad_logits)
                        .expect("restore logits");
                    gpu.enqueue_token_logprobs_backward_inplace(
                        &mut d_grad_logits,
                        &d_labels,
                        SavedLse::new(&d_lse, &d_lse_residual),
                        &grad_logp,
                        vocab,
                        IGNORE_INDEX,
                        &mut status,
                    )
                    .expect("backward")
                })
            })
        });
    }
    let word = gpu.read_status(&status).expect("status");
    gpu.token_logprobs_backward_status(word, &d_labels, &d_lse, vocab, IGNORE_INDEX, DType::BF16)
        .expect("backward reported an error");
    let backward_only = Tally::new();
    backward_only.add(
        Duration::from_secs_f64((backward.seconds() - copy.seconds()).max(0.0)),
        1,
    );
    out.push(report(
        "backward in place (restore copy subtracted)",
        2.0 * logits_bytes,
        &backward_only,
    ));

    // The KTO loss: one small launch, timed end to end (launch, wait, read-back).
    let batch = (rows / SEQ_LEN).max(1);
    let policy = gpu.htod(&vec![-120.0f32; batch]).expect("upload");
    let reference: Vec<f32> = (0..batch).map(|i| -118.0 - (i % 5) as f32).collect();
    let reference = gpu.htod(&reference).expect("upload");
    let desirable: Vec<u8> = (0..batch).map(|i| (i % 2) as u8).collect();
    let desirable = gpu.htod(&desirable).expect("upload");
    let kl_policy = gpu.htod(&vec![-121.0f32; batch]).expect("upload");
    let kl_reference = gpu.htod(&vec![-119.5f32; batch]).expect("upload");
    let kto = Tally::new();
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function(
        BenchmarkId::new("kto_loss", format!("{shape}_batch{batch}")),
        |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let kto_batch = CudaKtoBatch {
                        policy_logps: policy.as_view(),
                        reference_logps: reference.as_view(),
                        is_desirable: desirable.as_view(),
                        kl: Some(CudaKlInput::LogProbs {
                            policy: kl_policy.as_view(),
                            reference: kl_reference.as_view(),
                        }),
                    };
                    gpu.kto_loss(&KtoConfig::default(), &kto_batch)
                        .expect("kto");
                }
                let d = start.elapsed();
                kto.add(d, iters);
                d
            })
        },
    );
    out.push(format!(
        "{shape}: kto_loss (batch {batch}, launch + wait + read-back) {:.1} us",
        kto.seconds() * 1e6
    ));
    group.finish();
    out
}

/// A batch too small to fill the device: forward and out-of-place backward with one block per row
/// (`RowSplit::Fixed(1)`) and with the automatic split, kernel time from events as above.
fn bench_small_batch(
    c: &mut Criterion,
    gpu: &CudaBackend,
    rows: usize,
    vocab: usize,
) -> Vec<String> {
    let n = rows * vocab;
    let logits_bytes = (n * bf16::DTYPE.size_in_bytes()) as u64;
    let splits = gpu
        .row_splits(RowSplit::Auto, rows, vocab)
        .expect("automatic split");
    let shape = format!("{rows}x{vocab}");
    let d_logits = gpu
        .htod(&random_bf16(rows as u64, n))
        .expect("upload logits");
    let labels: Vec<i32> = (0..rows).map(|r| ((r * 7919) % vocab) as i32).collect();
    let d_labels = gpu.htod(&labels).expect("upload labels");
    let mut d_logp = gpu.alloc_zeros::<f32>(rows).expect("alloc");
    let mut d_lse = gpu.alloc_zeros::<f32>(rows).expect("alloc");
    let mut d_residual = gpu.alloc_zeros::<f32>(rows).expect("alloc");
    let mut d_grad = gpu.alloc_zeros::<bf16>(n).expect("alloc");
    let grad_logp = gpu.htod(&vec![0.5f32; rows]).expect("upload");
    let mut status = gpu.new_status().expect("status");
    let mut group = c.benchmark_group("cuda_ops_small_batch");
    let mut out = Vec::new();
    for (what, split) in [("unsplit", RowSplit::Fixed(1)), ("split", RowSplit::Auto)] {
        let forward = Tally::new();
        group.throughput(Throughput::Bytes(logits_bytes));
        group.bench_function(BenchmarkId::new(format!("forward_{what}"), &shape), |b| {
            b.iter_custom(|iters| {
                gpu_time(gpu, iters, &forward, || {
                    gpu.enqueue_token_logprobs_with_split(
                        &d_logits,
                        &d_labels,
                        vocab,
                        IGNORE_INDEX,
                        split,
                        &mut d_logp,
                        &mut d_lse,
                        &mut d_residual,
                        &mut status,
                    )
                    .expect("forward")
                })
            })
        });
        let word = gpu.read_status(&status).expect("status");
        gpu.token_logprobs_status(word, &d_labels, vocab, IGNORE_INDEX)
            .expect("forward reported an error");
        let backward = Tally::new();
        group.throughput(Throughput::Bytes(2 * logits_bytes));
        group.bench_function(BenchmarkId::new(format!("backward_{what}"), &shape), |b| {
            b.iter_custom(|iters| {
                gpu_time(gpu, iters, &backward, || {
                    gpu.enqueue_token_logprobs_backward_with_split(
                        &d_logits,
                        &d_labels,
                        SavedLse::new(&d_lse, &d_residual),
                        &grad_logp,
                        vocab,
                        IGNORE_INDEX,
                        split,
                        &mut d_grad,
                        &mut status,
                    )
                    .expect("backward")
                })
            })
        });
        let gbs = |bytes: u64, t: &Tally| bytes as f64 / t.seconds() / 1e9;
        out.push(format!(
            "{shape} ({what}, {} block(s) per row): forward {:.1} us ({:.0} GB/s), backward {:.1} us ({:.0} GB/s)",
            if what == "split" { splits } else { 1 },
            forward.seconds() * 1e6,
            gbs(logits_bytes, &forward),
            backward.seconds() * 1e6,
            gbs(2 * logits_bytes, &backward)
        ));
    }
    group.finish();
    out
}
