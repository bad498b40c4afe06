//! The fused LM head on the CPU against the materialized path, with the bare GEMMs of the same
//! shapes as the floor: rows ∈ {1024, 4096}, H = 1024, V ∈ {32000, 128256}, f32 and bf16.
//!
//! Per shape it prints one line per variant, side by side: the time of one call and its peak
//! extra memory (bytes allocated beyond the inputs, from a counting allocator), then runs the
//! criterion benches of the same calls.
//! - forward: fused `fused_linear_token_logprobs` | materialized (logits = hidden · Wᵀ into an f32
//!   `[rows, V]` buffer, then `cpu::token_logprobs`) | floor: that GEMM alone (1 GEMM);
//! - forward + backward: fused forward + `fused_linear_token_logprobs_backward` | materialized
//!   (GEMM, log-probs, in-place `cpu::token_logprobs_backward_inplace`, `∂z · W`, `∂zᵀ · h`) |
//!   floor: the 4 GEMMs the fused op needs alone (logits, their recompute, `∂z · W`, `∂zᵀ · h`;
//!   the "3, plus the recompute"). GFLOP/s counts the GEMM work each variant does.
//!
//! The floor's GEMMs are `matrixmultiply::sgemm` on blocks of the fused op's default tile size, in
//! parallel with rayon (the fused op's own GEMM, without the softmax work); bf16 inputs are widened to f32 for the materialized path and the floor (not timed).
//!
//! Run: `cargo bench --bench fused_head` (slow on a small machine: ~1e11–1e12 flops per call).
//! `HALO_FUSED_BENCH=1024x32000:f32` restricts the shapes (`ROWSxVOCAB:DTYPE`, comma-separated);
//! `HALO_FUSED_BENCH_SUMMARY=1` prints the side-by-side lines only (no criterion);
//! `HALO_FUSED_BENCH_REPS=3` times each call 3 times, interleaved, and prints the fastest.
//! `cargo test` runs this file once at tiny shapes (`test = true`): no figure from that run means
//! anything.
//!
//! GPU (`benches/support/fused_head_gpu.rs`): the same shapes on the CUDA fused head, as a
//! fraction of the bare cuBLAS GEMMs measured in the same run, with peak device memory; skipped
//! (saying why) without a GPU under `cargo bench`, run on the emulated device by `cargo test`.
//! `HALO_FUSED_BENCH_GPU_ONLY=1` skips the CPU variants (for a lent GPU machine's time limit).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use half::bf16;
use halo_kernels::cpu::{token_logprobs, token_logprobs_backward_inplace};
use halo_kernels::fused_head::{
    fused_linear_token_logprobs, fused_linear_token_logprobs_backward, LmHead,
};
use halo_kernels::{LogitElement, IGNORE_INDEX};
use rayon::prelude::*;

#[path = "support/fused_head_gpu.rs"]
mod gpu;

/// Counts live heap bytes and their peak, to measure each call's extra memory.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` once; returns its result, seconds, and peak bytes above what was live before.
fn measure<R>(f: impl FnOnce() -> R) -> (R, f64, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t = Instant::now();
    let r = f();
    let s = t.elapsed().as_secs_f64();
    (r, s, PEAK.load(Ordering::Relaxed) - base)
}

const H: usize = 1024;
const ROWS: [usize; 2] = [1024, 4096];
const VOCABS: [usize; 2] = [32000, 128256];
/// The fused op's default tile (`FusedChunks::auto`), used by the floor's blocks too.
const TILE: (usize, usize) = (256, 2048);
const SMOKE: [(usize, usize, usize); 1] = [(37, 1031, 19)];

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let filter = std::env::var("HALO_FUSED_BENCH").ok();
    let summary_only = std::env::var("HALO_FUSED_BENCH_SUMMARY").is_ok_and(|v| v == "1");
    let gpu_only = std::env::var("HALO_FUSED_BENCH_GPU_ONLY").is_ok_and(|v| v == "1");
    let gpu = gpu::backend(bench_mode);
    match &gpu {
        Ok(g) => println!(
            "GPU variants on {}",
            g.device_name().unwrap_or_else(|e| format!("? ({e})"))
        ),
        Err(why) => println!("GPU variants skipped: {why}"),
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    let shapes: Vec<(usize, usize, usize)> = if bench_mode {
        ROWS.iter()
            .flat_map(|&r| VOCABS.iter().map(move |&v| (r, v, H)))
            .collect()
    } else {
        SMOKE.to_vec()
    };
    for (rows, vocab, h) in shapes {
        for dtype in ["f32", "bf16"] {
            let key = format!("{rows}x{vocab}:{dtype}");
            if filter
                .as_ref()
                .is_some_and(|f| !f.split(',').any(|k| k == key))
            {
                continue;
            }
            let run = if summary_only { None } else { Some(&mut c) };
            let gpu = gpu.as_ref().ok();
            match dtype {
                "f32" => bench_shape::<f32>(run, gpu, gpu_only, rows, vocab, h),
                _ => bench_shape::<bf16>(run, gpu, gpu_only, rows, vocab, h),
            }
        }
    }
    if !summary_only {
        c.final_summary();
    }
    if !bench_mode {
        println!("smoke run: every bench ran once at tiny shapes (no figures)");
    }
}

fn random<T: LogitElement>(seed: u64, n: usize, scale: f32) -> Vec<T> {
    (0..n as u64)
        .into_par_iter()
        .map(|i| {
            let x = (i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            T::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
        })
        .collect()
}

/// A raw output pointer shared by the blocks of `par_gemm`, which write disjoint regions.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// A method, so that closures capture the whole (Send) wrapper, not its raw-pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `c[m × n] (row-major) = a[m × k] · b[k × n]`, a and b given by (row, column) strides: one
/// single-threaded `sgemm` per `bm × bn` block of `c`, rayon across blocks — the fused op's own
/// GEMM at its own tile size, without the softmax work.
#[allow(clippy::too_many_arguments)]
fn par_gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    (bm, bn): (usize, usize),
) {
    assert!(c.len() == m * n && a.len() >= m * k && b.len() >= k * n);
    let out = OutPtr(c.as_mut_ptr());
    let blocks: Vec<(usize, usize)> = (0..m.div_ceil(bm))
        .flat_map(|i| (0..n.div_ceil(bn)).map(move |j| (i, j)))
        .collect();
    blocks.into_par_iter().for_each(|(i, j)| {
        let (r0, c0) = (i * bm, j * bn);
        let (rows, cols) = (bm.min(m - r0), bn.min(n - c0));
        // SAFETY: the block reads rows r0.. of a and columns c0.. of b inside their extents (the
        // strides describe m × k and k × n matrices) and writes only its own block of c.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                cols,
                1.0,
                a.as_ptr().add(r0 * rsa),
                rsa as isize,
                csa as isize,
                b.as_ptr().add(c0 * csb),
                rsb as isize,
                csb as isize,
                0.0,
                out.get().add(r0 * n + c0),
                n as isize,
                1,
            )
        }
    });
}

fn bench_shape<T: LogitElement + halo_kernels::cuda::CudaLogit>(
    c: Option<&mut Criterion>,
    gpu: Option<&halo_kernels::cuda::CudaBackend>,
    gpu_only: bool,
    rows: usize,
    vocab: usize,
    h: usize,
) {
    let hidden: Vec<T> = random(1, rows * h, 1.0);
    let weight: Vec<T> = random(2, vocab * h, (3.0 / h as f32).sqrt());
    let labels: Vec<i32> = (0..rows).map(|r| ((r * 7919) % vocab) as i32).collect();
    let grad_logp: Vec<f32> = (0..rows).map(|r| -1.0 / (1 + r % 7) as f32).collect();
    let head = LmHead {
        weight: &weight,
        bias: None,
        vocab,
        hidden_size: h,
    };
    let reps: usize = std::env::var("HALO_FUSED_BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let name = format!("{rows}x{vocab}x{h} {:?}", T::DTYPE);
    println!("{name}:");
    if let Some(gpu) = gpu {
        gpu::bench_shape(
            gpu,
            &hidden,
            &weight,
            &labels,
            &grad_logp,
            (rows, vocab, h),
            reps.max(3),
        );
    }
    if gpu_only {
        return;
    }
    let h32: Vec<f32> = hidden.iter().map(|x| x.to_f32()).collect();
    let w32: Vec<f32> = weight.iter().map(|x| x.to_f32()).collect();

    let fused_fwd =
        || fused_linear_token_logprobs(&hidden, &head, &labels, IGNORE_INDEX, None).unwrap();
    let fused_fwd_bwd = || {
        let f = fused_fwd();
        fused_linear_token_logprobs_backward(
            &hidden,
            &head,
            &labels,
            IGNORE_INDEX,
            &f.row_max,
            &f.ln_sum,
            &grad_logp,
            None,
        )
        .unwrap()
    };
    let logits = || {
        let mut z = vec![0.0f32; rows * vocab];
        par_gemm(rows, h, vocab, &h32, (h, 1), &w32, (1, h), &mut z, TILE);
        z
    };
    let materialized_fwd = || token_logprobs(&logits(), &labels, vocab, IGNORE_INDEX).unwrap();
    let materialized_fwd_bwd = || {
        let mut z = logits();
        let t = token_logprobs(&z, &labels, vocab, IGNORE_INDEX).unwrap();
        token_logprobs_backward_inplace(
            &mut z,
            &labels,
            t.saved_lse(),
            &grad_logp,
            vocab,
            IGNORE_INDEX,
        )
        .unwrap();
        grads(&z, &h32, &w32, rows, vocab, h)
    };
    // The GEMMs the fused forward + backward needs: the logits, their recompute, ∂z · W, ∂zᵀ · h
    // (the materialized path needs only 3: it keeps the logits).
    let floor_bwd = || {
        drop(logits());
        let z = logits();
        grads(&z, &h32, &w32, rows, vocab, h)
    };

    let gemm_flops = 2.0 * (rows * vocab * h) as f64;
    // Each variant `reps` times, interleaved, keeping the fastest (a shared machine is noisy).
    let best = |f: &dyn Fn() -> (f64, usize), acc: &mut (f64, usize)| {
        let (t, m) = f();
        *acc = (acc.0.min(t), acc.1.max(m));
    };
    let timed = |f: &dyn Fn()| -> (f64, usize) {
        let (_, t, m) = measure(f);
        (t, m)
    };
    let mut r = [(f64::INFINITY, 0usize); 6];
    for _ in 0..reps {
        best(&|| timed(&|| drop(logits())), &mut r[0]);
        best(&|| timed(&|| drop(fused_fwd())), &mut r[1]);
        best(&|| timed(&|| drop(materialized_fwd())), &mut r[2]);
        best(&|| timed(&|| drop(floor_bwd())), &mut r[3]);
        best(&|| timed(&|| drop(fused_fwd_bwd())), &mut r[4]);
        best(&|| timed(&|| drop(materialized_fwd_bwd())), &mut r[5]);
    }
    let [(t_floor, m_floor), (t_fused, m_fused), (t_mat, m_mat), (t_floor4, m_floor4), (t_fused2, m_fused2), (t_mat2, m_mat2)] =
        r;
    let line = |what: &str, t: f64, m: usize, floor: f64, gemms: f64| {
        println!(
            "  {what:<30} {:>9.1} ms  {:>5.2}x floor  {:>6.1} GFLOP/s  peak extra {:>8.1} MiB",
            t * 1e3,
            t / floor,
            gemms * gemm_flops / t / 1e9,
            m as f64 / (1 << 20) as f64
        )
    };
    line("forward: bare GEMM (floor)", t_floor, m_floor, t_floor, 1.0);
    line("forward: fused", t_fused, m_fused, t_floor, 1.0);
    line("forward: materialized", t_mat, m_mat, t_floor, 1.0);
    let out_mib = ((rows + vocab) * h * 4) as f64 / (1 << 20) as f64;
    println!("  (fwd+bwd peaks include the outputs ∂hidden + ∂weight, {out_mib:.1} MiB)");
    line(
        "fwd+bwd: 4 bare GEMMs (floor)",
        t_floor4,
        m_floor4,
        t_floor4,
        4.0,
    );
    line("fwd+bwd: fused", t_fused2, m_fused2, t_floor4, 4.0);
    line("fwd+bwd: materialized", t_mat2, m_mat2, t_floor4, 3.0);

    if let Some(c) = c {
        let mut g = c.benchmark_group(format!("fused_head/{name}"));
        g.bench_function("forward/fused", |b| b.iter(fused_fwd));
        g.bench_function("forward/materialized", |b| b.iter(materialized_fwd));
        g.bench_function("forward/gemm_floor", |b| b.iter(logits));
        g.bench_function("fwd_bwd/fused", |b| b.iter(fused_fwd_bwd));
        g.bench_function("fwd_bwd/materialized", |b| b.iter(materialized_fwd_bwd));
        g.bench_function("fwd_bwd/gemm_floor", |b| b.iter(floor_bwd));
        g.finish();
    }
}

/// `∂hidden = ∂z · W` (`[rows, H]`) and `∂W = ∂zᵀ · hidden` (`[V, H]`), the backward's two GEMMs.
fn grads(
    dz: &[f32],
    h32: &[f32],
    w32: &[f32],
    rows: usize,
    vocab: usize,
    h: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut dh = vec![0.0f32; rows * h];
    par_gemm(
        rows,
        vocab,
        h,
        dz,
        (vocab, 1),
        w32,
        (h, 1),
        &mut dh,
        (256, 512),
    );
    let mut dw = vec![0.0f32; vocab * h];
    par_gemm(
        vocab,
        rows,
        h,
        dz,
        (1, vocab),
        h32,
        (h, 1),
        &mut dw,
        (2048, h),
    );
    (dh, dw)
}
