//! Throughput of the CPU token ops against a naive two-pass baseline.
//!
//! Groups `forward/<dtype>/v<vocab>` and `fwd_bwd_inplace/<dtype>/v<vocab>`, each with
//! - `halo`: `cpu::token_logprobs` (one online-logsumexp pass per row), then for fwd+bwd
//!   `cpu::token_logprobs_backward_inplace`;
//! - `naive_two_pass`: materialise `log_softmax` into a `[rows, vocab]` f32 buffer with std
//!   `exp`/`ln` (max, sum, write), then gather at the labels; for fwd+bwd, the gradient
//!   `g·(1[v=y] − exp(log_softmax))` read back from that buffer into the logits.
//!
//! Both run rows in parallel with rayon, so the comparison is of the algorithms, not threading.
//! Throughput is the size of the logits tensor (`rows · vocab · sizeof(dtype)`) per iteration in
//! both groups, so fwd+bwd GB/s reads as "logits tensors per second" comparable with the forward.
//!
//! Sizes: rows = 4096 (override with `HALO_BENCH_ROWS`, e.g. 256 for a quick run; 4096 × 128256
//! f32 logits are 2.1 GB, plus 2.1 GB for the baseline's buffer), vocab ∈ {32000, 50257, 128256},
//! f32 and bf16. Buffers are allocated once per size, on first use, so a filtered run skips the
//! sizes it does not measure. The in-place backward overwrites the logits with the gradient each
//! iteration; the next iteration runs on those values (finite, no ignored rows), and the cost of
//! both ops does not depend on the values.
//!
//! The machine's ceiling, measured in the same run on a scratch buffer of the logits' size with the
//! same rayon pool: `read` (a plain u64 sum over it) and `rw` (an in-place read + write pass;
//! forward + in-place backward reads the logits twice and writes them once, so its ceiling is
//! `1 / (1/read + 1/rw)` logits tensors per second), each the better of a plain pass and one that
//! prefetches 4 KiB ahead as the ops do. After each size a `summary` line prints, from its own
//! timings (8 rounds of the four, interleaved so that the ceiling and the ops are measured on the
//! same machine; each figure its best round), each
//! op's GB/s and the fraction of its ceiling it reaches (forward: of `read`; fwd+bwd: of the
//! combined ceiling).
//!
//! The bf16 summary also gives the forward against its 10 GB/s target. First, `hot` lines give each
//! op's compute cost on one core with its rows in L2: cycles per logit (the clock measured by a
//! chain of dependent multiplies) and the GB/s one core would reach if memory were free.
//!
//! Run: `HALO_BENCH_ROWS=256 cargo bench --bench cpu_ops -- --quick`; only the hot and summary
//! lines (no criterion runs): `HALO_BENCH_ROWS=256 cargo bench --bench cpu_ops -- summary`; only
//! the hot lines: `-- hot`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use half::bf16;
use halo_kernels::cpu::{token_logprobs_backward_inplace, token_logprobs_into, SavedLse};
use halo_kernels::{LogitElement, IGNORE_INDEX};
use rayon::prelude::*;

const VOCABS: [usize; 3] = [32_000, 50_257, 128_256];

fn bench_rows() -> usize {
    std::env::var("HALO_BENCH_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&rows: &usize| rows > 0)
        .unwrap_or(4096)
}

/// A cheap counter-based generator (splitmix64): filling gigabytes with ChaCha would dominate the
/// run. Values are uniform in [-8, 8), never 0 in practice; the benchmarked cost is value-independent.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn random_logits<T: LogitElement>(rows: usize, vocab: usize) -> Vec<T> {
    let mut logits = vec![T::from_f32(0.0); rows * vocab];
    logits
        .par_chunks_mut(vocab)
        .enumerate()
        .for_each(|(r, row)| {
            for (v, x) in row.iter_mut().enumerate() {
                let bits = splitmix(((r as u64) << 32) ^ v as u64);
                *x = T::from_f32((bits >> 40) as f32 / (1u64 << 24) as f32 * 16.0 - 8.0);
            }
        });
    logits
}

fn random_labels(rows: usize, vocab: usize) -> Vec<i32> {
    (0..rows)
        .map(|r| (splitmix(r as u64 ^ 0xABCD) % vocab as u64) as i32)
        .collect()
}

/// Baseline forward: `log_softmax` materialised into `logsm`, then a gather.
fn naive_forward<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    logsm: &mut [f32],
    logp: &mut [f32],
) {
    logits
        .par_chunks(vocab)
        .zip(logsm.par_chunks_mut(vocab))
        .for_each(|(z, out)| {
            let max = z
                .iter()
                .map(|x| x.to_f32())
                .fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = z.iter().map(|x| (x.to_f32() - max).exp()).sum();
            let lse = max + sum.ln();
            for (o, x) in out.iter_mut().zip(z) {
                *o = x.to_f32() - lse;
            }
        });
    for (r, (&y, lp)) in labels.iter().zip(logp.iter_mut()).enumerate() {
        *lp = if y == IGNORE_INDEX {
            0.0
        } else {
            logsm[r * vocab + y as usize]
        };
    }
}

/// Baseline backward from the materialised `log_softmax`, written over the logits.
fn naive_backward_inplace<T: LogitElement>(
    logits: &mut [T],
    labels: &[i32],
    logsm: &[f32],
    grad_logp: &[f32],
    vocab: usize,
) {
    logits
        .par_chunks_mut(vocab)
        .zip(logsm.par_chunks(vocab))
        .zip(labels.par_iter().zip(grad_logp.par_iter()))
        .for_each(|((dz, ls), (&y, &g))| {
            for (v, (d, &l)) in dz.iter_mut().zip(ls).enumerate() {
                let one_hot = if v as i32 == y { 1.0 } else { 0.0 };
                *d = T::from_f32(g * (one_hot - l.exp()));
            }
        });
}

/// A plain sum over `scratch`: the read the machine can do (its time gives the read bandwidth).
/// With `PREFETCH`, each 64-byte line also asks for the one 4 KiB ahead, as the ops do: the
/// ceiling is the better of the two, so that an op's prefetching cannot beat it by itself.
fn read_pass<const PREFETCH: bool>(scratch: &[u64]) -> u64 {
    scratch
        .par_chunks(1 << 16)
        .map(|c| {
            let mut sum = 0u64;
            for (i, line) in c.chunks(8).enumerate() {
                if PREFETCH {
                    prefetch_ahead(c.as_ptr(), i * 8);
                }
                sum = line.iter().fold(sum, |a, &x| a.wrapping_add(x));
            }
            sum
        })
        .reduce(|| 0, u64::wrapping_add)
}

/// An in-place read + write pass over `scratch` (each word incremented); `PREFETCH` as in
/// [`read_pass`].
fn rw_pass<const PREFETCH: bool>(scratch: &mut [u64]) {
    scratch.par_chunks_mut(1 << 16).for_each(|c| {
        let start = c.as_ptr();
        for (i, line) in c.chunks_mut(8).enumerate() {
            if PREFETCH {
                prefetch_ahead(start, i * 8);
            }
            for x in line {
                *x = x.wrapping_add(1);
            }
        }
    });
}

/// Asks for the cache line 4 KiB past word `i` at `c` (a hint: it never faults).
#[inline(always)]
fn prefetch_ahead(c: *const u64, i: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` is SSE (x86-64 baseline) and does not access memory architecturally.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i + 512).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (c, i);
}

/// Rounds of the `summary` measurements: each figure is its best of these.
const SUMMARY_ROUNDS: usize = 8;

/// One timing of `f`, in seconds.
fn time(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

/// Best of `n` timings of `f` (after one warm-up run), in seconds.
fn best_of(n: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Prints the ceilings and each op's fraction of them for one size (the `summary` line).
fn summary<T: LogitElement>(name: &str, rows: usize, vocab: usize, d: &mut Buffers<T>) {
    let bytes = (rows * vocab * std::mem::size_of::<T>()) as f64;
    let mut scratch = vec![1u64; (rows * vocab * std::mem::size_of::<T>()).div_ceil(8)];
    // Rounds of all four (after one warm-up round), each figure its best over the rounds: on a
    // shared machine the memory bandwidth drifts by a third within a minute, and timed apart the
    // ceiling and the ops would see different machines.
    let mut best = [f64::INFINITY; 4];
    for round in 0..=SUMMARY_ROUNDS {
        // The ceilings: the plain passes on even rounds, the prefetching ones on odd rounds.
        let prefetch = round % 2 == 1;
        let secs = [
            time(|| {
                black_box(if prefetch {
                    read_pass::<true>(black_box(&scratch))
                } else {
                    read_pass::<false>(black_box(&scratch))
                });
            }),
            time(|| {
                if prefetch {
                    rw_pass::<true>(black_box(&mut scratch))
                } else {
                    rw_pass::<false>(black_box(&mut scratch))
                }
            }),
            time(|| halo_fwd(d, vocab)),
            time(|| halo_fwd_bwd(d, vocab)),
        ];
        if round > 0 {
            for (b, s) in best.iter_mut().zip(secs) {
                *b = b.min(s);
            }
        }
    }
    let [read, rw, fwd, fwd_bwd] = best.map(|s| bytes / s);
    let ceiling = 1.0 / (1.0 / read + 1.0 / rw);
    let gb = 1e-9;
    // bf16's forward has a target of its own (issue 16): 10 GB/s of bf16 logits.
    let target = if std::mem::size_of::<T>() == 2 {
        format!(
            " = {:.0}% of the 10 GB/s target",
            100.0 * fwd * gb / BF16_FORWARD_TARGET_GBS
        )
    } else {
        String::new()
    };
    println!(
        "summary {name} v{vocab} rows {rows} ({:.0} MB): read {:.1} GB/s, rw {:.1} GB/s, \
         fwd+bwd ceiling {:.1} GB/s | forward {:.1} GB/s = {:.0}% of read{target} | fwd+bwd \
         {:.1} GB/s = {:.0}% of ceiling",
        bytes * 1e-6,
        read * gb,
        rw * gb,
        ceiling * gb,
        fwd * gb,
        100.0 * fwd / read,
        fwd_bwd * gb,
        100.0 * fwd_bwd / ceiling,
    );
}

/// The bf16 forward's throughput target, GB/s of bf16 logits.
const BF16_FORWARD_TARGET_GBS: f64 = 10.0;

/// The core clock, in cycles per second, from a chain of dependent 64-bit multiplies (3 cycles
/// each on every x86-64 core of the last decade; not adds, which Golden Cove and later cores can
/// execute several to a cycle at rename, reading 12 GHz on the Sapphire Rapids dev machine): the
/// ops' cost in cycles per element below. Short runs (~1 ms), best of 200: on a shared machine a
/// long one is always interrupted.
#[cfg(target_arch = "x86_64")]
fn clock_hz() -> f64 {
    const ITERS: u64 = 300_000;
    let secs = best_of(200, || {
        let mut x = 3u64;
        // SAFETY: register arithmetic only.
        unsafe {
            std::arch::asm!(
                "2:",
                "imul {x}, {x}", "imul {x}, {x}", "imul {x}, {x}", "imul {x}, {x}",
                "imul {x}, {x}", "imul {x}, {x}", "imul {x}, {x}", "imul {x}, {x}",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) ITERS => _,
                x = inout(reg) x,
                options(nomem, nostack),
            );
        }
        black_box(x);
    });
    (8 * 3 * ITERS) as f64 / secs
}

/// Each op's compute cost on one core with its rows in L2 (`hot` line): cycles per logit, and the
/// GB/s of logits one core would reach if memory were free. With `cores` cores this bounds the
/// op's throughput from above: where `cores × hot GB/s` is below the read bandwidth the op is
/// compute-bound, and where it is far above, memory-bound.
#[cfg(target_arch = "x86_64")]
fn hot<T: LogitElement>(name: &str, hz: f64) {
    // 8 rows × 8192 logits: 256 KiB of f32, inside one core's L2 with the outputs. Runs of ~0.1 ms
    // (one pass), best of 300 (as for the clock).
    let (rows, vocab) = (8, 8192);
    let mut d = Buffers::<T>::new(rows, vocab);
    let elems = (rows * vocab) as f64;
    let reps = 1;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (fwd, bwd) = pool.install(|| {
        let fwd = best_of(300, || {
            for _ in 0..reps {
                halo_fwd(&mut d, vocab);
            }
        }) / reps as f64;
        let fwd_bwd = best_of(300, || {
            for _ in 0..reps {
                halo_fwd_bwd(&mut d, vocab);
            }
        }) / reps as f64;
        (fwd, fwd_bwd - fwd)
    });
    let bytes = elems * std::mem::size_of::<T>() as f64;
    println!(
        "hot {name} (1 core, rows in L2, clock {:.2} GHz): forward {:.2} cycles/logit \
         ({:.1} GB/s per core) | in-place backward {:.2} cycles/logit ({:.1} GB/s per core)",
        hz * 1e-9,
        fwd * hz / elems,
        bytes / fwd * 1e-9,
        bwd * hz / elems,
        bytes / bwd * 1e-9,
    );
}

/// The forward into `d`'s outputs.
fn halo_fwd<T: LogitElement>(d: &mut Buffers<T>, vocab: usize) {
    token_logprobs_into(
        &d.logits,
        &d.labels,
        vocab,
        IGNORE_INDEX,
        &mut d.logp,
        &mut d.lse,
        &mut d.lse_residual,
    )
    .unwrap();
}

/// The forward then the in-place backward, as a training step runs them.
fn halo_fwd_bwd<T: LogitElement>(d: &mut Buffers<T>, vocab: usize) {
    halo_fwd(d, vocab);
    token_logprobs_backward_inplace(
        &mut d.logits,
        &d.labels,
        SavedLse::new(&d.lse, &d.lse_residual),
        &d.grad_logp,
        vocab,
        IGNORE_INDEX,
    )
    .unwrap();
}

/// One size's buffers, allocated on first use so that a filtered run (`-- forward/f32/v32000`)
/// does not generate gigabytes of logits for the sizes it skips.
struct Buffers<T> {
    logits: Vec<T>,
    labels: Vec<i32>,
    grad_logp: Vec<f32>,
    logp: Vec<f32>,
    lse: Vec<f32>,
    lse_residual: Vec<f32>,
    /// The baseline's materialised `[rows, vocab]` log-softmax.
    logsm: Vec<f32>,
}

impl<T: LogitElement> Buffers<T> {
    fn new(rows: usize, vocab: usize) -> Self {
        Buffers {
            logits: random_logits(rows, vocab),
            labels: random_labels(rows, vocab),
            grad_logp: vec![1.0; rows],
            logp: vec![0.0; rows],
            lse: vec![0.0; rows],
            lse_residual: vec![0.0; rows],
            logsm: vec![0.0; rows * vocab],
        }
    }
}

fn bench_dtype<T: LogitElement>(c: &mut Criterion, name: &str) {
    let rows = bench_rows();
    for vocab in VOCABS {
        let mut buffers: Option<Buffers<T>> = None;
        let bytes = (rows * vocab * std::mem::size_of::<T>()) as u64;

        let mut group = c.benchmark_group(format!("forward/{name}/v{vocab}"));
        group
            .throughput(Throughput::Bytes(bytes))
            .sampling_mode(SamplingMode::Flat);
        group.bench_function(BenchmarkId::new("halo", rows), |b| {
            let d = buffers.get_or_insert_with(|| Buffers::new(rows, vocab));
            b.iter(|| halo_fwd_bwd(d, vocab))
        });
        group.bench_function(BenchmarkId::new("naive_two_pass", rows), |b| {
            let d = buffers.get_or_insert_with(|| Buffers::new(rows, vocab));
            b.iter(|| {
                naive_forward(&d.logits, &d.labels, vocab, &mut d.logsm, &mut d.logp);
                naive_backward_inplace(&mut d.logits, &d.labels, &d.logsm, &d.grad_logp, vocab);
            })
        });
        group.finish();

        // After criterion's runs of this size, unless filtered out (`-- summary` runs only these).
        if summary_wanted(name, vocab) {
            let d = buffers.get_or_insert_with(|| Buffers::new(rows, vocab));
            summary(name, rows, vocab, d);
        }
    }
}

/// Whether the command line's filter (criterion's first free argument) selects this size's
/// summary: no filter, `summary`, or a filter naming the dtype and vocab (`forward/f32/v32000`).
fn summary_wanted(name: &str, vocab: usize) -> bool {
    match filter() {
        None => true,
        Some(f) => f == "summary" || f.contains(&format!("{name}/v{vocab}")),
    }
}

fn cpu_ops(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    if hot_wanted() {
        let hz = clock_hz();
        hot::<f32>("f32", hz);
        hot::<bf16>("bf16", hz);
    }
    bench_dtype::<f32>(c, "f32");
    bench_dtype::<bf16>(c, "bf16");
}

/// Whether the filter selects the `hot` lines: no filter, `summary` or `hot`.
fn hot_wanted() -> bool {
    matches!(filter().as_deref(), None | Some("summary" | "hot"))
}

/// Criterion's filter: the command line's first free argument.
fn filter() -> Option<String> {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-') && a != "bench")
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = cpu_ops
}
criterion_main!(benches);
