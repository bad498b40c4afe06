//! The GPU half of `benches/fused_head.rs`: the CUDA fused head (`CudaBackend::
//! fused_linear_token_logprobs` and its backward) against the bare cuBLAS GEMMs of the same shapes,
//! measured in the same run, and its peak device memory.
//!
//! Per shape one line per variant: time per call (wall clock around the call and a stream
//! synchronize; the fused ops wait for their status anyway), the fraction of the bare GEMMs'
//! throughput it reaches (`floor time / fused time`; the target is ≥ 70 %), and the peak
//! extra device memory (the default memory pool's `USED_MEM_HIGH` above what was in use before,
//! reset per call; cudarc allocates from that pool). The floors:
//! - forward: one GEMM `hidden · Wᵀ` (T inputs, f32 out) into a `[rows, V]` f32 buffer;
//! - forward + backward: the GEMMs the fused pair runs: that GEMM twice (forward, recompute), then
//!   `∂z · W` and `∂zᵀ · hidden` in f32 (as the fused backward runs them, on widened inputs).
//!
//! Without a GPU under `cargo bench` it prints why and skips; under `cargo test` it runs once on
//! the emulated device at a tiny shape (no figure from that run means anything).

use std::time::Instant;

use cudarc::driver::sys;
use halo_kernels::cuda::{
    CudaBackend, CudaFusedSaved, CudaGemm, CudaLmHead, CudaLogit, CudaSlice, GemmShape,
};
use halo_kernels::{LogitElement, IGNORE_INDEX};

/// The real GPU, the emulated device for the smoke run, or why there is none.
pub fn backend(bench_mode: bool) -> Result<CudaBackend, String> {
    match CudaBackend::new() {
        Ok(gpu) => Ok(gpu),
        Err(e) if bench_mode => Err(format!("no CUDA GPU ({e})")),
        Err(_) => CudaBackend::emulated().map_err(|e| format!("no emulated device ({e})")),
    }
}

/// Peak bytes of the device's default memory pool above the current use, around `f`; `None` on
/// the emulated device (no pool attributes there).
fn peak_pool_bytes<R>(gpu: &CudaBackend, f: impl FnOnce() -> R) -> (R, Option<u64>) {
    if gpu.is_emulated() {
        return (f(), None);
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: plain driver queries on the backend's (current) device; the attribute values are
    // u64s as cuda.h documents for USED_MEM_CURRENT / USED_MEM_HIGH.
    unsafe {
        let dev = gpu.context().cu_device();
        if sys::cuDeviceGetDefaultMemPool(&mut pool, dev) != sys::CUresult::CUDA_SUCCESS {
            return (f(), None);
        }
        let mut current = 0u64;
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            (&mut current as *mut u64).cast(),
        );
        let mut zero = 0u64;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        );
        let r = f();
        let mut high = 0u64;
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut high as *mut u64).cast(),
        );
        (r, Some(high.saturating_sub(current)))
    }
}

/// Fastest of `reps` timed runs of `f` (synchronized), and the largest peak seen.
fn time(gpu: &CudaBackend, reps: usize, f: &dyn Fn()) -> (f64, Option<u64>) {
    f(); // warm-up: module JIT, cuBLAS heuristics, pool growth
    gpu.synchronize().unwrap();
    let mut best = (f64::INFINITY, None::<u64>);
    for _ in 0..reps {
        let t = Instant::now();
        let ((), peak) = peak_pool_bytes(gpu, || {
            f();
            gpu.synchronize().unwrap();
        });
        best.0 = best.0.min(t.elapsed().as_secs_f64());
        best.1 = best.1.max(peak);
    }
    best
}

/// One shape: prints the side-by-side lines.
pub fn bench_shape<T: CudaLogit + LogitElement>(
    gpu: &CudaBackend,
    hidden: &[T],
    weight: &[T],
    labels: &[i32],
    grad_logp: &[f32],
    (rows, vocab, h): (usize, usize, usize),
    reps: usize,
) {
    let blas = match gpu.gemm() {
        Ok(b) => b,
        Err(e) => {
            println!("  GPU: skipped: {e}");
            return;
        }
    };
    let d_hidden = gpu.htod(hidden).unwrap();
    let d_weight = gpu.htod(weight).unwrap();
    let d_grad = gpu.htod(grad_logp).unwrap();
    let head = CudaLmHead {
        weight: &d_weight,
        bias: None,
        vocab,
        hidden_size: h,
    };
    let fwd = || {
        gpu.fused_linear_token_logprobs(&d_hidden, &head, labels, IGNORE_INDEX, None)
            .unwrap()
    };
    let fwd_bwd = || {
        let f = fwd();
        let saved = CudaFusedSaved {
            row_max: &f.row_max,
            ln_sum: &f.ln_sum,
            grad_logp: &d_grad,
        };
        drop(
            gpu.fused_linear_token_logprobs_backward(
                &d_hidden,
                &head,
                labels,
                IGNORE_INDEX,
                saved,
                None,
            )
            .unwrap(),
        );
    };
    // The floors' buffers, allocated outside the timed calls.
    let mut z = gpu.alloc_zeros::<f32>(rows * vocab).unwrap();
    let h32 = gpu.alloc_zeros::<f32>(rows * h).unwrap();
    let w32 = gpu.alloc_zeros::<f32>(vocab * h).unwrap();
    let mut dh = gpu.alloc_zeros::<f32>(rows * h).unwrap();
    let mut dw = gpu.alloc_zeros::<f32>(vocab * h).unwrap();
    let logits = |blas: &CudaGemm, z: &mut CudaSlice<f32>| {
        let s = GemmShape::packed(rows, vocab, h, false, true);
        blas.gemm(&s, 1.0, &d_hidden, &d_weight, 0.0, z).unwrap();
    };
    let z_cell = std::cell::RefCell::new(&mut z);
    let floor_fwd = || logits(blas, &mut z_cell.borrow_mut());
    let grads_cell = std::cell::RefCell::new((&mut dh, &mut dw));
    let floor_bwd = || {
        let mut z = z_cell.borrow_mut();
        logits(blas, &mut z);
        logits(blas, &mut z);
        let (dh, dw) = &mut *grads_cell.borrow_mut();
        let s = GemmShape::packed(rows, h, vocab, false, false);
        blas.gemm(&s, 1.0, &**z, &w32, 0.0, *dh).unwrap();
        let s = GemmShape::packed(vocab, h, rows, true, false);
        blas.gemm(&s, 1.0, &**z, &h32, 0.0, *dw).unwrap();
    };
    let fused_fwd = || drop(fwd());
    let (t_floor, m_floor) = time(gpu, reps, &floor_fwd);
    let (t_fused, m_fused) = time(gpu, reps, &fused_fwd);
    let (t_floor4, m_floor4) = time(gpu, reps, &floor_bwd);
    let (t_fused2, m_fused2) = time(gpu, reps, &fwd_bwd);
    let gemm_flops = 2.0 * (rows * vocab * h) as f64;
    let mib = |m: Option<u64>| {
        m.map_or("n/a".to_string(), |b| {
            format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
        })
    };
    let line = |what: &str, t: f64, m: Option<u64>, floor: f64, gemms: f64| {
        println!(
            "  GPU {what:<28} {:>9.3} ms  {:>5.1}% of cuBLAS  {:>7.1} TFLOP/s  peak extra {}",
            t * 1e3,
            100.0 * floor / t,
            gemms * gemm_flops / t / 1e12,
            mib(m)
        )
    };
    line("forward: cuBLAS GEMM", t_floor, m_floor, t_floor, 1.0);
    line("forward: fused", t_fused, m_fused, t_floor, 1.0);
    line("fwd+bwd: 4 cuBLAS GEMMs", t_floor4, m_floor4, t_floor4, 4.0);
    line("fwd+bwd: fused", t_fused2, m_fused2, t_floor4, 4.0);
    let materialized = (rows * vocab * 4) as f64 / (1 << 20) as f64;
    println!("  (the materialized f32 logits alone would take {materialized:.1} MiB)");
}
