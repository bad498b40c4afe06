//! GPU tests: every kernel against its CPU op (the definitions, themselves checked against f64
//! references in the CPU tests), at awkward and at large sizes, for every dtype.
//!
//! A `harness = false` test (libtest-mimic): on the real GPU when there is one, else on the
//! emulated CUDA device; with neither (or without a GPU under `HALO_REQUIRE_GPU=1`) every test is
//! reported as IGNORED by name, with "no CUDA device: <what was not run>", never as passed. On a
//! GPU machine: `cargo test --release --test cuda_kernels` (see scripts/gpu_check.sh).

mod device_support;

use std::sync::Arc;

use half::{bf16, f16};
use halo_kernels::cpu::{self, LogRatioClamp, SavedLse, SequenceLayout};
use halo_kernels::cuda::{
    CudaBackend, CudaKlInput, CudaKtoBatch, CudaLogit, CudaPairBatch, CudaSequenceSums,
};
use halo_kernels::losses::{
    self, DpoConfig, DpoLossType, KlInput, KtoBatch, KtoConfig, KtoLossType, PairBatch,
    ReferencePointPartial,
};
use halo_kernels::{HaloError, LogitElement, IGNORE_INDEX};
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use rayon::prelude::*;

type TestResult = Result<(), Failed>;

/// One GPU test: name, what it checks (the "not run" message), body.
struct GpuTest {
    name: &'static str,
    what: &'static str,
    run: fn(&CudaBackend) -> TestResult,
}

fn main() {
    let args = Arguments::from_args();
    // The real GPU, else the emulated device (see `device_support::cuda_backend`): on a machine
    // without a GPU every test runs on the emulated device, through the same wrappers.
    let backend = device_support::cuda_backend().map(Arc::new);
    match &backend {
        Ok(b) => eprintln!(
            "cuda_kernels: running on {}",
            b.device_name().unwrap_or_else(|e| e.to_string())
        ),
        Err(reason) => eprintln!("cuda_kernels: every GPU test is ignored: {reason}"),
    }
    let trials = gpu_tests()
        .into_iter()
        .map(|t| {
            let backend = backend.clone();
            Trial::ignorable_test(t.name, move || match backend {
                Err(_) => Ok(Completion::ignored_with(format!(
                    "no CUDA device: {}",
                    t.what
                ))),
                Ok(b) => (t.run)(&b).map(|_| Completion::Completed),
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn gpu_tests() -> Vec<GpuTest> {
    macro_rules! t {
        ($name:literal, $what:literal, $f:expr) => {
            GpuTest {
                name: $name,
                what: $what,
                run: $f,
            }
        };
    }
    vec![
        t!(
            "forward_matches_cpu_f32",
            "fused forward vs CPU, f32, vocab 1/7/33/50257",
            forward_matches_cpu::<f32>
        ),
        t!(
            "forward_matches_cpu_bf16",
            "fused forward vs CPU, bf16, vocab 1/7/33/50257",
            forward_matches_cpu::<bf16>
        ),
        t!(
            "forward_matches_cpu_f16",
            "fused forward vs CPU, f16, vocab 1/7/33/50257",
            forward_matches_cpu::<f16>
        ),
        t!(
            "forward_extreme_logits",
            "fused forward at logits of ±1e4, every dtype",
            forward_extreme_logits
        ),
        t!(
            "forward_all_ignored_and_batch_of_one",
            "all-ignored rows give 0, a batch of one row",
            forward_all_ignored_and_batch_of_one
        ),
        t!(
            "forward_misaligned_views",
            "fused forward on views at odd element offsets (scalar head path)",
            forward_misaligned_views
        ),
        t!(
            "forward_deterministic",
            "two forward runs are bitwise equal",
            forward_deterministic
        ),
        t!(
            "forward_errors_match_cpu",
            "bad labels, NaN/inf logits, wrong lengths: the CPU's errors",
            forward_errors_match_cpu
        ),
        t!(
            "naive_baseline_matches_cpu",
            "the benches' unfused log_softmax + gather baseline vs CPU",
            naive_baseline_matches_cpu
        ),
        t!(
            "forward_large_bf16",
            "fused forward, 8192 rows x vocab 128256, bf16, vs CPU",
            forward_large_bf16
        ),
        t!(
            "backward_matches_cpu_f32",
            "backward (out of place and in place) vs CPU, f32",
            backward_matches_cpu::<f32>
        ),
        t!(
            "backward_matches_cpu_bf16",
            "backward (out of place and in place) vs CPU, bf16",
            backward_matches_cpu::<bf16>
        ),
        t!(
            "backward_matches_cpu_f16",
            "backward (out of place and in place) vs CPU, f16",
            backward_matches_cpu::<f16>
        ),
        t!(
            "backward_deterministic",
            "two backward runs are bitwise equal",
            backward_deterministic
        ),
        t!(
            "backward_errors_match_cpu",
            "backward: bad labels, NaN lse / grad, wrong lengths",
            backward_errors_match_cpu
        ),
        t!(
            "backward_large_bf16_inplace",
            "in-place backward, 8192 rows x vocab 128256, bf16, vs CPU",
            backward_large_bf16_inplace
        ),
        t!(
            "sequence_sums_match_cpu",
            "sequence sums / log-ratio sums / grad broadcast / humanline mask, padded and packed",
            sequence_sums_match_cpu
        ),
        t!(
            "sequence_errors_match_cpu",
            "sequence ops: bad offsets and lengths give the CPU's errors",
            sequence_errors_match_cpu
        ),
        t!(
            "kto_matches_cpu",
            "KTO / APO-zero unpaired loss, grads, metrics vs CPU",
            kto_matches_cpu
        ),
        t!(
            "kto_errors_match_cpu",
            "KTO: NaN inputs, missing / empty KL pairs: the CPU's errors",
            kto_errors_match_cpu
        ),
        t!(
            "dpo_matches_cpu",
            "DPO family (every TRL loss type) vs CPU",
            dpo_matches_cpu
        ),
        t!(
            "dpo_errors_match_cpu",
            "DPO: NaN inputs, IPO / SFT without or with zero counts, overflow: the CPU's errors",
            dpo_errors_match_cpu
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Helpers

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        let holds: bool = $cond;
        if !holds {
            return Err(format!($($msg)+).into());
        }
    };
}

/// `?` for the crate's errors inside a test.
fn ok<T>(what: &str, r: halo_kernels::Result<T>) -> Result<T, Failed> {
    r.map_err(|e| Failed::from(format!("{what}: unexpected error: {e}")))
}

/// Deterministic uniform `[lo, hi)` from (seed, index): splitmix64, parallel-friendly.
fn uniform(seed: u64, i: u64, lo: f32, hi: f32) -> f32 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
    lo + (hi - lo) * unit
}

fn random_logits<T: LogitElement>(seed: u64, n: usize, scale: f32) -> Vec<T> {
    (0..n as u64)
        .into_par_iter()
        .map(|i| T::from_f32(uniform(seed, i, -scale, scale)))
        .collect()
}

/// Labels in `0..vocab`, about one in `ignore_every` ignored (never all, unless asked).
fn random_labels(seed: u64, rows: usize, vocab: usize, ignore_every: u64) -> Vec<i32> {
    let mut labels: Vec<i32> = (0..rows as u64)
        .map(|i| {
            let u = uniform(seed ^ 0xABCD, i, 0.0, 1.0);
            if ignore_every > 0 && (i % ignore_every == ignore_every / 2) {
                IGNORE_INDEX
            } else {
                ((u * vocab as f32) as usize).min(vocab - 1) as i32
            }
        })
        .collect();
    if !labels.is_empty() && labels.iter().all(|&y| y == IGNORE_INDEX) {
        labels[0] = 0;
    }
    labels
}

fn random_f32(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n as u64).map(|i| uniform(seed, i, lo, hi)).collect()
}

/// `|gpu − cpu| ≤ atol + rtol·|cpu|` element-wise (both must be finite); names the first miss.
fn check_close(what: &str, gpu: &[f32], cpu: &[f32], atol: f32, rtol: f32) -> TestResult {
    ensure!(
        gpu.len() == cpu.len(),
        "{what}: gpu has {} values, cpu {}",
        gpu.len(),
        cpu.len()
    );
    let bad = gpu
        .par_iter()
        .zip(cpu.par_iter())
        .enumerate()
        .filter(|(_, (g, c))| !(g.is_finite() && (*g - *c).abs() <= atol + rtol * c.abs()))
        .map(|(i, _)| i)
        .min();
    if let Some(i) = bad {
        return Err(format!(
            "{what}: element {i}: gpu {} vs cpu {} (atol {atol}, rtol {rtol})",
            gpu[i], cpu[i]
        )
        .into());
    }
    Ok(())
}

fn to_f32<T: LogitElement>(v: &[T]) -> Vec<f32> {
    v.par_iter().map(|x| x.to_f32()).collect()
}

fn bits<T: bytemuck::Pod>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// Relative tolerance of one rounding to `T` (half an ulp, with slack for one-ulp ties).
fn storage_rtol<T: LogitElement>() -> f32 {
    match T::DTYPE {
        halo_kernels::DType::F32 => 2e-5,
        halo_kernels::DType::BF16 => 1.0 / 128.0,
        halo_kernels::DType::F16 => 1.0 / 1024.0,
    }
}

/// A device buffer of `n` elements filled with NaN (to prove a kernel writes every element).
fn poisoned<T: CudaLogit>(
    gpu: &CudaBackend,
    n: usize,
) -> Result<halo_kernels::cuda::CudaSlice<T>, Failed> {
    ok("poison", gpu.htod(&vec![T::from_f32(f32::NAN); n]))
}

// ---------------------------------------------------------------------------------------------
// Forward

/// Runs the fused forward into NaN-poisoned outputs and compares with the CPU op.
fn forward_case<T: CudaLogit>(
    gpu: &CudaBackend,
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    what: &str,
) -> TestResult {
    let rows = labels.len();
    let cpu_out = ok(
        "cpu forward",
        cpu::token_logprobs(logits, labels, vocab, IGNORE_INDEX),
    )?;
    let d_logits = ok("htod", gpu.htod(logits))?;
    let d_labels = ok("htod", gpu.htod(labels))?;
    let mut d_logp = poisoned::<f32>(gpu, rows)?;
    let mut d_lse = poisoned::<f32>(gpu, rows)?;
    let mut d_residual = poisoned::<f32>(gpu, rows)?;
    ok(
        "gpu forward",
        gpu.token_logprobs_into(
            &d_logits,
            &d_labels,
            vocab,
            IGNORE_INDEX,
            &mut d_logp,
            &mut d_lse,
            &mut d_residual,
        ),
    )?;
    let logp = ok("dtoh", gpu.dtoh(&d_logp))?;
    let lse = ok("dtoh", gpu.dtoh(&d_lse))?;
    // Both accumulate in f32 in different orders with different exp implementations: lse agrees
    // to a few ulp of its magnitude; logp = z[y] − lse inherits lse's absolute error.
    let max_lse = cpu_out.lse.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let atol = 2e-5 + 4e-7 * max_lse;
    check_close(&format!("{what}: lse"), &lse, &cpu_out.lse, atol, 2e-6)?;
    check_close(&format!("{what}: logp"), &logp, &cpu_out.logp, atol, 2e-6)?;
    for (r, &y) in labels.iter().enumerate() {
        if y == IGNORE_INDEX {
            ensure!(
                logp[r] == 0.0 && lse[r] == 0.0,
                "{what}: ignored row {r} gave logp {} lse {}",
                logp[r],
                lse[r]
            );
        } else {
            ensure!(logp[r] <= 0.0, "{what}: row {r}: logp {} > 0", logp[r]);
        }
    }
    Ok(())
}

fn forward_matches_cpu<T: CudaLogit>(gpu: &CudaBackend) -> TestResult {
    for (k, &vocab) in [1usize, 2, 7, 33, 127, 4097, 50257].iter().enumerate() {
        for &rows in &[1usize, 5, 67] {
            let seed = 1000 + (k * 10 + rows) as u64;
            let logits = random_logits::<T>(seed, rows * vocab, 8.0);
            let labels = random_labels(seed, rows, vocab, 4);
            forward_case(
                gpu,
                &logits,
                &labels,
                vocab,
                &format!("vocab {vocab} rows {rows}"),
            )?;
        }
    }
    Ok(())
}

fn forward_extreme_logits(gpu: &CudaBackend) -> TestResult {
    fn run<T: CudaLogit>(gpu: &CudaBackend) -> TestResult {
        for &vocab in &[7usize, 33, 50257] {
            let rows = 9;
            // ±1e4 with a few exact ties and one dominant entry per row.
            let mut logits = random_logits::<T>(77 + vocab as u64, rows * vocab, 1e4);
            for r in 0..rows {
                logits[r * vocab + (r % vocab)] = T::from_f32(1e4);
                logits[r * vocab + ((r * 5) % vocab)] = T::from_f32(-1e4);
            }
            let labels = random_labels(78, rows, vocab, 0);
            forward_case(
                gpu,
                &logits,
                &labels,
                vocab,
                &format!("{:?} ±1e4 vocab {vocab}", T::DTYPE),
            )?;
        }
        Ok(())
    }
    run::<f32>(gpu)?;
    run::<bf16>(gpu)?;
    run::<f16>(gpu) // 1e4 is representable in f16 (max 65504)
}

fn forward_all_ignored_and_batch_of_one(gpu: &CudaBackend) -> TestResult {
    let vocab = 33;
    let logits = random_logits::<bf16>(5, 4 * vocab, 4.0);
    forward_case(gpu, &logits, &[IGNORE_INDEX; 4], vocab, "all ignored")?;
    forward_case(gpu, &logits[..vocab], &[3], vocab, "batch of one")?;
    forward_case(
        gpu,
        &logits[..vocab],
        &[IGNORE_INDEX],
        vocab,
        "one ignored row",
    )?;
    // Zero rows: nothing launched, empty outputs.
    let d_logits = ok("htod", gpu.htod::<bf16>(&[]))?;
    let d_labels = ok("htod", gpu.htod::<i32>(&[]))?;
    let out = ok(
        "zero rows",
        gpu.token_logprobs(&d_logits, &d_labels, vocab, IGNORE_INDEX),
    )?;
    ensure!(
        out.logp.is_empty() && out.lse.is_empty(),
        "zero rows gave non-empty outputs"
    );
    Ok(())
}

fn forward_misaligned_views(gpu: &CudaBackend) -> TestResult {
    for &(vocab, offset) in &[(33usize, 1usize), (4097, 3), (50257, 5)] {
        let rows = 6;
        let logits = random_logits::<bf16>(31 + offset as u64, rows * vocab + offset, 6.0);
        let labels = random_labels(32, rows, vocab, 3);
        let cpu_out = ok(
            "cpu",
            cpu::token_logprobs(&logits[offset..], &labels, vocab, IGNORE_INDEX),
        )?;
        let d_all = ok("htod", gpu.htod(&logits))?;
        let d_view = d_all.slice(offset..);
        let d_labels = ok("htod", gpu.htod(&labels))?;
        let out = ok(
            "gpu",
            gpu.token_logprobs(&d_view, &d_labels, vocab, IGNORE_INDEX),
        )?;
        let lse = ok("dtoh", gpu.dtoh(&out.lse))?;
        let logp = ok("dtoh", gpu.dtoh(&out.logp))?;
        check_close(
            &format!("view +{offset}: lse"),
            &lse,
            &cpu_out.lse,
            1e-4,
            2e-6,
        )?;
        check_close(
            &format!("view +{offset}: logp"),
            &logp,
            &cpu_out.logp,
            1e-4,
            2e-6,
        )?;
    }
    Ok(())
}

fn forward_deterministic(gpu: &CudaBackend) -> TestResult {
    let (rows, vocab) = (257, 32000);
    let logits = random_logits::<bf16>(9, rows * vocab, 10.0);
    let labels = random_labels(9, rows, vocab, 5);
    let d_logits = ok("htod", gpu.htod(&logits))?;
    let d_labels = ok("htod", gpu.htod(&labels))?;
    let a = ok(
        "run 1",
        gpu.token_logprobs(&d_logits, &d_labels, vocab, IGNORE_INDEX),
    )?;
    let b = ok(
        "run 2",
        gpu.token_logprobs(&d_logits, &d_labels, vocab, IGNORE_INDEX),
    )?;
    let (a_logp, b_logp) = (
        ok("dtoh", gpu.dtoh(&a.logp))?,
        ok("dtoh", gpu.dtoh(&b.logp))?,
    );
    let (a_lse, b_lse) = (ok("dtoh", gpu.dtoh(&a.lse))?, ok("dtoh", gpu.dtoh(&b.lse))?);
    ensure!(
        bits(&a_logp) == bits(&b_logp),
        "logp differs between two runs"
    );
    ensure!(bits(&a_lse) == bits(&b_lse), "lse differs between two runs");
    Ok(())
}

/// The GPU returns exactly the CPU's error for the same input.
fn same_forward_error<T: CudaLogit>(
    gpu: &CudaBackend,
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    what: &str,
) -> TestResult {
    let cpu_err = cpu::token_logprobs(logits, labels, vocab, IGNORE_INDEX).err();
    ensure!(
        cpu_err.is_some(),
        "{what}: test input is not an error on the CPU"
    );
    let d_logits = ok("htod", gpu.htod(logits))?;
    let d_labels = ok("htod", gpu.htod(labels))?;
    let gpu_err = gpu
        .token_logprobs(&d_logits, &d_labels, vocab, IGNORE_INDEX)
        .err();
    ensure!(
        gpu_err == cpu_err,
        "{what}: gpu {gpu_err:?} vs cpu {cpu_err:?}"
    );
    Ok(())
}

fn forward_errors_match_cpu(gpu: &CudaBackend) -> TestResult {
    let vocab = 4099;
    let rows = 40;
    let logits = random_logits::<bf16>(3, rows * vocab, 5.0);
    let labels = random_labels(3, rows, vocab, 4);
    for bad in [vocab as i32, -1, i32::MAX, i32::MIN, -101] {
        let mut l = labels.clone();
        l[17] = bad;
        l[31] = 0; // a later valid row
        same_forward_error(gpu, &logits, &l, vocab, &format!("label {bad}"))?;
    }
    // Two bad labels: the first row is reported.
    let mut l = labels.clone();
    l[9] = vocab as i32 + 5;
    l[30] = -7;
    same_forward_error(gpu, &logits, &l, vocab, "two bad labels")?;
    // Non-finite logits in a counted row, at the start, middle and end of the row.
    let counted: Vec<usize> = (0..rows).filter(|&r| labels[r] != IGNORE_INDEX).collect();
    for (k, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
        .into_iter()
        .enumerate()
    {
        for pos in [0, vocab / 2, vocab - 1] {
            let mut z = logits.clone();
            let row = counted[3 + k];
            z[row * vocab + pos] = bf16::from_f32(bad);
            z[counted[10] * vocab + pos] = bf16::from_f32(bad); // a later bad row too
            same_forward_error(
                gpu,
                &z,
                &labels,
                vocab,
                &format!("{bad} at row {row} col {pos}"),
            )?;
        }
    }
    // A bad label and NaN logits: the label is reported (the CPU checks labels first).
    let mut z = logits.clone();
    z[counted[1] * vocab] = bf16::from_f32(f32::NAN);
    let mut l = labels.clone();
    l[counted[5]] = vocab as i32;
    same_forward_error(gpu, &z, &l, vocab, "bad label and NaN")?;
    // NaN in an ignored row is fine.
    let ignored = (0..rows)
        .find(|&r| labels[r] == IGNORE_INDEX)
        .ok_or("no ignored row")?;
    let mut z = logits.clone();
    z[ignored * vocab + 1] = bf16::from_f32(f32::NAN);
    forward_case(gpu, &z, &labels, vocab, "NaN in an ignored row")?;
    // Lengths and shape.
    same_forward_error(
        gpu,
        &logits[..rows * vocab - 1],
        &labels,
        vocab,
        "logits one short",
    )?;
    same_forward_error(gpu, &logits, &labels, 0, "vocab 0")?;
    let d_logits = ok("htod", gpu.htod(&logits))?;
    let d_labels = ok("htod", gpu.htod(&labels))?;
    let mut short = ok("alloc", gpu.alloc_zeros::<f32>(rows - 1))?;
    let mut lse = ok("alloc", gpu.alloc_zeros::<f32>(rows))?;
    let mut residual = ok("alloc", gpu.alloc_zeros::<f32>(rows))?;
    let err = gpu
        .token_logprobs_into(
            &d_logits,
            &d_labels,
            vocab,
            IGNORE_INDEX,
            &mut short,
            &mut lse,
            &mut residual,
        )
        .err();
    let want = Some(HaloError::LengthMismatch {
        what: "logp",
        expected: rows,
        got: rows - 1,
    });
    ensure!(err == want, "short logp: {err:?}, want {want:?}");
    Ok(())
}

/// The benches compare the fused forward with this baseline: it must compute the same thing
/// (within the rounding of the materialised log-softmax to the logits' dtype).
fn naive_baseline_matches_cpu(gpu: &CudaBackend) -> TestResult {
    for &vocab in &[7usize, 4099, 32000] {
        let rows = 37;
        let logits = random_logits::<bf16>(vocab as u64, rows * vocab, 8.0);
        let labels = random_labels(vocab as u64, rows, vocab, 4);
        let cpu_out = ok(
            "cpu",
            cpu::token_logprobs(&logits, &labels, vocab, IGNORE_INDEX),
        )?;
        let d_logits = ok("htod", gpu.htod(&logits))?;
        let d_labels = ok("htod", gpu.htod(&labels))?;
        let mut log_probs = poisoned::<bf16>(gpu, rows * vocab)?;
        let mut logp = poisoned::<f32>(gpu, rows)?;
        ok(
            "naive",
            gpu.enqueue_naive_token_logprobs(
                &d_logits,
                &d_labels,
                vocab,
                IGNORE_INDEX,
                &mut log_probs,
                &mut logp,
            ),
        )?;
        let logp = ok("dtoh", gpu.dtoh(&logp))?;
        // log_softmax stored in bf16: one bf16 rounding of a value of magnitude ~|logp|.
        check_close(
            &format!("naive vocab {vocab}"),
            &logp,
            &cpu_out.logp,
            1e-3,
            1.0 / 128.0,
        )?;
    }
    Ok(())
}

fn forward_large_bf16(gpu: &CudaBackend) -> TestResult {
    let (rows, vocab) = (8192, 128256);
    let logits = random_logits::<bf16>(2024, rows * vocab, 12.0);
    let labels = random_labels(2024, rows, vocab, 7);
    forward_case(gpu, &logits, &labels, vocab, "8192 x 128256 bf16")
}

// ---------------------------------------------------------------------------------------------
// Backward

/// Out-of-place (into a NaN-poisoned buffer) and in-place backward vs the CPU, given the CPU
/// forward's lse (so both sides see identical inputs).
fn backward_case<T: CudaLogit>(
    gpu: &CudaBackend,
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    what: &str,
) -> TestResult {
    let rows = labels.len();
    let fwd = ok(
        "cpu forward",
        cpu::token_logprobs(logits, labels, vocab, IGNORE_INDEX),
    )?;
    let grad_logp = random_f32(rows as u64 + 17, rows, -2.0, 2.0);
    let mut cpu_grad = vec![T::from_f32(0.0); rows * vocab];
    ok(
        "cpu backward",
        cpu::token_logprobs_backward(
            logits,
            labels,
            fwd.saved_lse(),
            &grad_logp,
            vocab,
            IGNORE_INDEX,
            &mut cpu_grad,
        ),
    )?;
    let d_logits = ok("htod", gpu.htod(logits))?;
    let d_labels = ok("htod", gpu.htod(labels))?;
    let d_lse = ok("htod", gpu.htod(&fwd.lse))?;
    let d_residual = ok("htod", gpu.htod(&fwd.lse_residual))?;
    let d_grad_logp = ok("htod", gpu.htod(&grad_logp))?;
    let mut d_grad = poisoned::<T>(gpu, rows * vocab)?;
    ok(
        "gpu backward",
        gpu.token_logprobs_backward(
            &d_logits,
            &d_labels,
            SavedLse::new(&d_lse, &d_residual),
            &d_grad_logp,
            vocab,
            IGNORE_INDEX,
            &mut d_grad,
        ),
    )?;
    let out_of_place = ok("dtoh", gpu.dtoh(&d_grad))?;
    // Values are g·p (or g·(1 − p)): one rounding to T apart at most, plus exp's few f32 ulp;
    // the absolute floor covers the CPU's fast_exp returning ~1e-38 where exp underflows.
    let g_max = grad_logp.iter().fold(0.0f32, |m, g| m.max(g.abs()));
    let atol = 1e-6 * g_max
        + if T::DTYPE == halo_kernels::DType::F16 {
            1e-7
        } else {
            0.0
        };
    check_close(
        &format!("{what}: grad"),
        &to_f32(&out_of_place),
        &to_f32(&cpu_grad),
        atol,
        storage_rtol::<T>(),
    )?;
    for (r, &y) in labels.iter().enumerate() {
        if y == IGNORE_INDEX {
            ensure!(
                out_of_place[r * vocab..(r + 1) * vocab]
                    .iter()
                    .all(|v| v.to_f32() == 0.0),
                "{what}: ignored row {r} has a non-zero gradient"
            );
        }
    }
    let mut d_inplace = ok("htod", gpu.htod(logits))?;
    ok(
        "gpu backward in place",
        gpu.token_logprobs_backward_inplace(
            &mut d_inplace,
            &d_labels,
            SavedLse::new(&d_lse, &d_residual),
            &d_grad_logp,
            vocab,
            IGNORE_INDEX,
        ),
    )?;
    let inplace = ok("dtoh", gpu.dtoh(&d_inplace))?;
    // Same formula, same rounding: the two forms must agree bit for bit.
    ensure!(
        bits(&inplace) == bits(&out_of_place),
        "{what}: in-place and out-of-place gradients differ"
    );
    Ok(())
}

fn backward_matches_cpu<T: CudaLogit>(gpu: &CudaBackend) -> TestResult {
    for (k, &vocab) in [1usize, 2, 7, 33, 127, 4097, 50257].iter().enumerate() {
        for &rows in &[1usize, 6, 41] {
            let seed = 500 + (k * 10 + rows) as u64;
            let logits = random_logits::<T>(seed, rows * vocab, 8.0);
            let labels = random_labels(seed, rows, vocab, 4);
            backward_case(
                gpu,
                &logits,
                &labels,
                vocab,
                &format!("vocab {vocab} rows {rows}"),
            )?;
        }
    }
    let vocab = 33;
    let logits = random_logits::<T>(3, 3 * vocab, 1e4);
    backward_case(gpu, &logits, &[1, IGNORE_INDEX, 32], vocab, "±1e4 logits")?;
    backward_case(gpu, &logits, &[IGNORE_INDEX; 3], vocab, "all ignored")
}

fn backward_deterministic(gpu: &CudaBackend) -> TestResult {
    let (rows, vocab) = (129, 32000);
    let logits = random_logits::<bf16>(12, rows * vocab, 10.0);
    let labels = random_labels(12, rows, vocab, 5);
    let fwd = ok(
        "cpu forward",
        cpu::token_logprobs(&logits, &labels, vocab, IGNORE_INDEX),
    )?;
    let grad_logp = random_f32(13, rows, -1.0, 1.0);
    let d_logits = ok("htod", gpu.htod(&logits))?;
    let d_labels = ok("htod", gpu.htod(&labels))?;
    let d_lse = ok("htod", gpu.htod(&fwd.lse))?;
    let d_residual = ok("htod", gpu.htod(&fwd.lse_residual))?;
    let d_g = ok("htod", gpu.htod(&grad_logp))?;
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut d_grad = poisoned::<bf16>(gpu, rows * vocab)?;
        ok(
            "gpu backward",
            gpu.token_logprobs_backward(
                &d_logits,
                &d_labels,
                SavedLse::new(&d_lse, &d_residual),
                &d_g,
                vocab,
                IGNORE_INDEX,
                &mut d_grad,
            ),
        )?;
        runs.push(ok("dtoh", gpu.dtoh(&d_grad))?);
    }
    ensure!(
        bits(&runs[0]) == bits(&runs[1]),
        "backward differs between two runs"
    );
    Ok(())
}

fn same_backward_error(
    gpu: &CudaBackend,
    logits: &[bf16],
    labels: &[i32],
    lse: &[f32],
    grad_logp: &[f32],
    vocab: usize,
    what: &str,
) -> TestResult {
    let mut cpu_grad = vec![bf16::from_f32(0.0); logits.len()];
    let cpu_err = cpu::token_logprobs_backward(
        logits,
        labels,
        SavedLse::bare(lse),
        grad_logp,
        vocab,
        IGNORE_INDEX,
        &mut cpu_grad,
    )
    .err();
    ensure!(
        cpu_err.is_some(),
        "{what}: test input is not an error on the CPU"
    );
    let d_logits = ok("htod", gpu.htod(logits))?;
    let d_labels = ok("htod", gpu.htod(labels))?;
    let d_lse = ok("htod", gpu.htod(lse))?;
    let d_g = ok("htod", gpu.htod(grad_logp))?;
    let mut d_grad = ok("alloc", gpu.alloc_zeros::<bf16>(logits.len()))?;
    let err = gpu
        .token_logprobs_backward(
            &d_logits,
            &d_labels,
            SavedLse::bare(&d_lse),
            &d_g,
            vocab,
            IGNORE_INDEX,
            &mut d_grad,
        )
        .err();
    ensure!(
        err == cpu_err,
        "{what} (out of place): gpu {err:?} vs cpu {cpu_err:?}"
    );
    let mut d_inplace = ok("htod", gpu.htod(logits))?;
    let err = gpu
        .token_logprobs_backward_inplace(
            &mut d_inplace,
            &d_labels,
            SavedLse::bare(&d_lse),
            &d_g,
            vocab,
            IGNORE_INDEX,
        )
        .err();
    ensure!(
        err == cpu_err,
        "{what} (in place): gpu {err:?} vs cpu {cpu_err:?}"
    );
    Ok(())
}

fn backward_errors_match_cpu(gpu: &CudaBackend) -> TestResult {
    let (rows, vocab) = (30, 517);
    let logits = random_logits::<bf16>(4, rows * vocab, 5.0);
    let labels = random_labels(4, rows, vocab, 4);
    let fwd = ok(
        "cpu forward",
        cpu::token_logprobs(&logits, &labels, vocab, IGNORE_INDEX),
    )?;
    let g = random_f32(5, rows, -1.0, 1.0);
    let mut l = labels.clone();
    l[11] = vocab as i32;
    same_backward_error(gpu, &logits, &l, &fwd.lse, &g, vocab, "bad label")?;
    let mut lse = fwd.lse.clone();
    lse[7] = f32::NAN;
    lse[20] = f32::INFINITY;
    same_backward_error(gpu, &logits, &labels, &lse, &g, vocab, "NaN lse")?;
    let mut gg = g.clone();
    gg[13] = f32::NEG_INFINITY;
    same_backward_error(gpu, &logits, &labels, &fwd.lse, &gg, vocab, "inf grad_logp")?;
    // All three: the label wins, then lse.
    same_backward_error(gpu, &logits, &l, &lse, &gg, vocab, "label + lse + grad")?;
    same_backward_error(gpu, &logits, &labels, &lse, &gg, vocab, "lse + grad")?;
    same_backward_error(gpu, &logits, &labels, &fwd.lse[1..], &g, vocab, "short lse")?;
    same_backward_error(
        gpu,
        &logits,
        &labels,
        &fwd.lse,
        &g[1..],
        vocab,
        "short grad_logp",
    )?;
    // The CPU does not read lse / grad_logp of ignored rows: NaN there is no error, and the row's
    // gradient is zero.
    let ignored = (0..rows)
        .find(|&r| labels[r] == IGNORE_INDEX)
        .ok_or("no ignored row")?;
    let mut lse = fwd.lse.clone();
    let mut gg = g.clone();
    lse[ignored] = f32::NAN;
    gg[ignored] = f32::INFINITY;
    let mut cpu_grad = vec![bf16::from_f32(0.0); logits.len()];
    ok(
        "cpu backward, NaN in an ignored row",
        cpu::token_logprobs_backward(
            &logits,
            &labels,
            SavedLse::bare(&lse),
            &gg,
            vocab,
            IGNORE_INDEX,
            &mut cpu_grad,
        ),
    )?;
    let d_logits = ok("htod", gpu.htod(&logits))?;
    let d_labels = ok("htod", gpu.htod(&labels))?;
    let d_lse = ok("htod", gpu.htod(&lse))?;
    let d_g = ok("htod", gpu.htod(&gg))?;
    let mut d_grad = poisoned::<bf16>(gpu, logits.len())?;
    ok(
        "gpu backward, NaN lse / inf grad in an ignored row",
        gpu.token_logprobs_backward(
            &d_logits,
            &d_labels,
            SavedLse::bare(&d_lse),
            &d_g,
            vocab,
            IGNORE_INDEX,
            &mut d_grad,
        ),
    )?;
    let grad = ok("dtoh", gpu.dtoh(&d_grad))?;
    ensure!(
        bits(&grad) == bits(&cpu_grad)
            || check_close(
                "NaN in an ignored row",
                &to_f32(&grad),
                &to_f32(&cpu_grad),
                1e-6,
                storage_rtol::<bf16>()
            )
            .is_ok(),
        "NaN in an ignored row: gradients differ from the CPU"
    );
    Ok(())
}

fn backward_large_bf16_inplace(gpu: &CudaBackend) -> TestResult {
    let (rows, vocab) = (8192, 128256);
    let logits = random_logits::<bf16>(77, rows * vocab, 12.0);
    let labels = random_labels(77, rows, vocab, 7);
    let fwd = ok(
        "cpu forward",
        cpu::token_logprobs(&logits, &labels, vocab, IGNORE_INDEX),
    )?;
    let g = random_f32(78, rows, -1.0, 1.0);
    let mut cpu_grad = logits.clone();
    ok(
        "cpu backward",
        cpu::token_logprobs_backward_inplace(
            &mut cpu_grad,
            &labels,
            fwd.saved_lse(),
            &g,
            vocab,
            IGNORE_INDEX,
        ),
    )?;
    let mut d_logits = ok("htod", gpu.htod(&logits))?;
    drop(logits);
    let d_labels = ok("htod", gpu.htod(&labels))?;
    let d_lse = ok("htod", gpu.htod(&fwd.lse))?;
    let d_residual = ok("htod", gpu.htod(&fwd.lse_residual))?;
    let d_g = ok("htod", gpu.htod(&g))?;
    ok(
        "gpu backward in place",
        gpu.token_logprobs_backward_inplace(
            &mut d_logits,
            &d_labels,
            SavedLse::new(&d_lse, &d_residual),
            &d_g,
            vocab,
            IGNORE_INDEX,
        ),
    )?;
    let gpu_grad = ok("dtoh", gpu.dtoh(&d_logits))?;
    check_close(
        "8192 x 128256 bf16 in place",
        &to_f32(&gpu_grad),
        &to_f32(&cpu_grad),
        1e-6,
        storage_rtol::<bf16>(),
    )
}

// ---------------------------------------------------------------------------------------------
// Sequence ops

fn sequence_case(
    gpu: &CudaBackend,
    labels: &[i32],
    layout: SequenceLayout<'_>,
    what: &str,
) -> TestResult {
    let rows = labels.len();
    let batch = layout.batch();
    let policy = random_f32(rows as u64, rows, -6.0, 0.0);
    let reference = random_f32(rows as u64 + 1, rows, -6.0, 0.0);
    let d_policy = ok("htod", gpu.htod(&policy))?;
    let d_reference = ok("htod", gpu.htod(&reference))?;
    let d_labels = ok("htod", gpu.htod(labels))?;
    let poisoned_sums = |gpu: &CudaBackend| -> Result<CudaSequenceSums, Failed> {
        Ok(CudaSequenceSums {
            sums: ok("htod", gpu.htod(&vec![f32::NAN; batch]))?,
            counts: ok("htod", gpu.htod(&vec![u32::MAX; batch]))?,
        })
    };
    // Sums are fixed-order trees on the GPU, sequential on the CPU: a few ulp of Σ|x| apart.
    let sum_tol = |x: &[f32]| 1e-5 + 1e-6 * x.iter().map(|v| v.abs()).sum::<f32>();

    let cpu_sums = ok(
        "cpu",
        cpu::sequence_sums(&policy, labels, IGNORE_INDEX, layout),
    )?;
    let mut out = poisoned_sums(gpu)?;
    ok(
        "gpu sequence_sums",
        gpu.sequence_sums_into(&d_policy, &d_labels, IGNORE_INDEX, layout, &mut out),
    )?;
    check_close(
        &format!("{what}: sums"),
        &ok("dtoh", gpu.dtoh(&out.sums))?,
        &cpu_sums.sums,
        sum_tol(&policy),
        1e-6,
    )?;
    let counts = ok("dtoh", gpu.dtoh(&out.counts))?;
    ensure!(
        counts == cpu_sums.counts,
        "{what}: counts {counts:?} vs cpu {:?}",
        cpu_sums.counts
    );

    for clamp in [
        None,
        Some(LogRatioClamp::default()),
        Some(LogRatioClamp {
            min: -0.25,
            max: 0.25,
        }),
    ] {
        let cpu_r = ok(
            "cpu",
            cpu::sequence_logratio_sums(&policy, &reference, labels, IGNORE_INDEX, layout, clamp),
        )?;
        let mut out = poisoned_sums(gpu)?;
        ok(
            "gpu logratio",
            gpu.sequence_logratio_sums_into(
                &d_policy,
                &d_reference,
                &d_labels,
                IGNORE_INDEX,
                layout,
                clamp,
                &mut out,
            ),
        )?;
        let diffs: Vec<f32> = policy.iter().zip(&reference).map(|(p, r)| p - r).collect();
        check_close(
            &format!("{what}: logratio {clamp:?}"),
            &ok("dtoh", gpu.dtoh(&out.sums))?,
            &cpu_r.sums,
            sum_tol(&diffs),
            1e-6,
        )?;
        let counts = ok("dtoh", gpu.dtoh(&out.counts))?;
        ensure!(counts == cpu_r.counts, "{what}: logratio counts differ");
    }

    let grad_seq = random_f32(batch as u64 + 3, batch, -1.0, 1.0);
    let cpu_grad = ok(
        "cpu",
        cpu::broadcast_sequence_grad(&grad_seq, labels, IGNORE_INDEX, layout),
    )?;
    let d_grad_seq = ok("htod", gpu.htod(&grad_seq))?;
    let mut d_token_grad = ok("htod", gpu.htod(&vec![f32::NAN; rows]))?;
    ok(
        "gpu broadcast",
        gpu.broadcast_sequence_grad_into(
            &d_grad_seq,
            &d_labels,
            IGNORE_INDEX,
            layout,
            &mut d_token_grad,
        ),
    )?;
    let token_grad = ok("dtoh", gpu.dtoh(&d_token_grad))?;
    ensure!(
        bits(&token_grad) == bits(&cpu_grad),
        "{what}: broadcast gradient differs from the CPU (a pure copy)"
    );

    // Humanline mask: the same f32 comparisons on both sides, so bitwise equal.
    for clamp in [
        LogRatioClamp::default(),
        LogRatioClamp {
            min: -0.25,
            max: 0.25,
        },
    ] {
        let mut cpu_masked = cpu_grad.clone();
        ok(
            "cpu mask",
            cpu::humanline_grad_mask(&policy, &reference, clamp, &mut cpu_masked),
        )?;
        let mut d_masked = ok("htod", gpu.htod(&cpu_grad))?;
        ok(
            "gpu mask",
            gpu.humanline_grad_mask(&d_policy, &d_reference, clamp, &mut d_masked),
        )?;
        let masked = ok("dtoh", gpu.dtoh(&d_masked))?;
        ensure!(
            bits(&masked) == bits(&cpu_masked),
            "{what}: humanline mask {clamp:?} differs from the CPU"
        );
    }
    Ok(())
}

fn sequence_sums_match_cpu(gpu: &CudaBackend) -> TestResult {
    for &(batch, seq) in &[
        (1usize, 1usize),
        (1, 7),
        (3, 33),
        (8, 1000),
        (2, 5000),
        (5, 0),
    ] {
        let labels = random_labels(batch as u64 * 31 + seq as u64, batch * seq, 100, 3);
        sequence_case(
            gpu,
            &labels,
            SequenceLayout::Padded { batch, seq },
            &format!("padded {batch}x{seq}"),
        )?;
    }
    // A sequence of all-ignored labels.
    let mut labels = random_labels(8, 40, 100, 0);
    labels[10..20].fill(IGNORE_INDEX);
    sequence_case(
        gpu,
        &labels,
        SequenceLayout::Padded { batch: 4, seq: 10 },
        "padded with an empty sequence",
    )?;
    // Packed, with empty sequences and one long one.
    let cu: Vec<u32> = vec![0, 0, 5, 5, 6, 3006, 3040];
    let labels = random_labels(9, 3040, 100, 4);
    sequence_case(
        gpu,
        &labels,
        SequenceLayout::Packed { cu_seqlens: &cu },
        "packed",
    )?;
    sequence_case(
        gpu,
        &labels[..0],
        SequenceLayout::Packed {
            cu_seqlens: &[0, 0],
        },
        "packed, one empty sequence",
    )?;
    sequence_case(
        gpu,
        &[],
        SequenceLayout::Padded { batch: 0, seq: 4 },
        "padded, no sequence",
    )
}

fn sequence_errors_match_cpu(gpu: &CudaBackend) -> TestResult {
    let labels = random_labels(1, 12, 50, 3);
    let values = random_f32(2, 12, -3.0, 0.0);
    let d_values = ok("htod", gpu.htod(&values))?;
    let d_labels = ok("htod", gpu.htod(&labels))?;
    let layouts: Vec<(&str, SequenceLayout<'_>)> = vec![
        (
            "padded mismatch",
            SequenceLayout::Padded { batch: 5, seq: 2 },
        ),
        (
            "packed too short",
            SequenceLayout::Packed { cu_seqlens: &[0] },
        ),
        (
            "packed not from 0",
            SequenceLayout::Packed {
                cu_seqlens: &[1, 12],
            },
        ),
        (
            "packed not to rows",
            SequenceLayout::Packed {
                cu_seqlens: &[0, 11],
            },
        ),
        (
            "packed decreasing",
            SequenceLayout::Packed {
                cu_seqlens: &[0, 8, 4, 12],
            },
        ),
    ];
    for (what, layout) in layouts {
        let cpu_err = cpu::sequence_sums(&values, &labels, IGNORE_INDEX, layout).err();
        let gpu_err = gpu
            .sequence_sums(&d_values, &d_labels, IGNORE_INDEX, layout)
            .err();
        ensure!(
            cpu_err.is_some() && gpu_err == cpu_err,
            "{what}: gpu {gpu_err:?} vs cpu {cpu_err:?}"
        );
        let cpu_err =
            cpu::broadcast_sequence_grad(&values[..2], &labels, IGNORE_INDEX, layout).err();
        let d_g = ok("htod", gpu.htod(&values[..2]))?;
        let gpu_err = gpu
            .broadcast_sequence_grad(&d_g, &d_labels, IGNORE_INDEX, layout)
            .err();
        ensure!(
            gpu_err == cpu_err,
            "{what} (broadcast): gpu {gpu_err:?} vs cpu {cpu_err:?}"
        );
    }
    let layout = SequenceLayout::Padded { batch: 3, seq: 4 };
    let bad_clamp = Some(LogRatioClamp {
        min: 1.0,
        max: -1.0,
    });
    let cpu_err =
        cpu::sequence_logratio_sums(&values, &values, &labels, IGNORE_INDEX, layout, bad_clamp)
            .err();
    let gpu_err = gpu
        .sequence_logratio_sums(
            &d_values,
            &d_values,
            &d_labels,
            IGNORE_INDEX,
            layout,
            bad_clamp,
        )
        .err();
    ensure!(
        cpu_err.is_some() && gpu_err == cpu_err,
        "bad clamp: gpu {gpu_err:?} vs cpu {cpu_err:?}"
    );
    // Non-finite counted tokens: the CPU's NonFinite (first bad token), also under a clamp, which
    // would map NaN/inf to a bound on the device. A NaN in an ignored token is not read.
    let counted: Vec<usize> = (0..12).filter(|&t| labels[t] != IGNORE_INDEX).collect();
    let ignored = (0..12)
        .find(|&t| labels[t] == IGNORE_INDEX)
        .ok_or("no ignored token")?;
    for (k, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
        .into_iter()
        .enumerate()
    {
        let mut v = values.clone();
        v[counted[1 + k]] = bad;
        v[counted[5]] = bad;
        let d_v = ok("htod", gpu.htod(&v))?;
        for clamp in [None, Some(LogRatioClamp::default())] {
            let cpu_err =
                cpu::sequence_logratio_sums(&v, &values, &labels, IGNORE_INDEX, layout, clamp)
                    .err();
            let gpu_err = gpu
                .sequence_logratio_sums(&d_v, &d_values, &d_labels, IGNORE_INDEX, layout, clamp)
                .err();
            ensure!(
                cpu_err.is_some() && gpu_err == cpu_err,
                "{bad} policy, clamp {clamp:?}: gpu {gpu_err:?} vs cpu {cpu_err:?}"
            );
            let cpu_err =
                cpu::sequence_logratio_sums(&values, &v, &labels, IGNORE_INDEX, layout, clamp)
                    .err();
            let gpu_err = gpu
                .sequence_logratio_sums(&d_values, &d_v, &d_labels, IGNORE_INDEX, layout, clamp)
                .err();
            ensure!(
                cpu_err.is_some() && gpu_err == cpu_err,
                "{bad} reference, clamp {clamp:?}: gpu {gpu_err:?} vs cpu {cpu_err:?}"
            );
        }
        let cpu_err = cpu::sequence_sums(&v, &labels, IGNORE_INDEX, layout).err();
        let gpu_err = gpu
            .sequence_sums(&d_v, &d_labels, IGNORE_INDEX, layout)
            .err();
        ensure!(
            cpu_err.is_some() && gpu_err == cpu_err,
            "{bad} value: gpu {gpu_err:?} vs cpu {cpu_err:?}"
        );
        let mut g = vec![0.5f32; 3];
        g[2] = bad; // sequence 2 may have no counted token: still refused, as on the CPU
        let d_g = ok("htod", gpu.htod(&g))?;
        let cpu_err = cpu::broadcast_sequence_grad(&g, &labels, IGNORE_INDEX, layout).err();
        let gpu_err = gpu
            .broadcast_sequence_grad(&d_g, &d_labels, IGNORE_INDEX, layout)
            .err();
        ensure!(
            cpu_err.is_some() && gpu_err == cpu_err,
            "{bad} grad_seq: gpu {gpu_err:?} vs cpu {cpu_err:?}"
        );
    }
    let mut v = values.clone();
    v[ignored] = f32::NAN;
    let d_v = ok("htod", gpu.htod(&v))?;
    let cpu_sums = ok("cpu", cpu::sequence_sums(&v, &labels, IGNORE_INDEX, layout))?;
    let gpu_sums = ok(
        "NaN in an ignored token",
        gpu.sequence_sums(&d_v, &d_labels, IGNORE_INDEX, layout),
    )?;
    let counts = ok("dtoh", gpu.dtoh(&gpu_sums.counts))?;
    ensure!(
        counts == cpu_sums.counts,
        "NaN in an ignored token: counts differ"
    );
    ensure!(
        ok("dtoh", gpu.dtoh(&gpu_sums.sums))?
            .iter()
            .all(|s| s.is_finite()),
        "NaN in an ignored token leaked into a sum"
    );

    let mut grad = ok("htod", gpu.htod(&values))?;
    for (what, clamp, n) in [
        ("bad mask clamp", LogRatioClamp { min: 0.5, max: 0.1 }, 12),
        ("short mask input", LogRatioClamp::default(), 11),
    ] {
        let mut host_grad = values.clone();
        let cpu_err = cpu::humanline_grad_mask(&values[..n], &values, clamp, &mut host_grad).err();
        let d_policy = ok("htod", gpu.htod(&values[..n]))?;
        let gpu_err = gpu
            .humanline_grad_mask(&d_policy, &d_values, clamp, &mut grad)
            .err();
        ensure!(
            cpu_err.is_some() && gpu_err == cpu_err,
            "{what}: gpu {gpu_err:?} vs cpu {cpu_err:?}"
        );
    }
    let d_short = ok("htod", gpu.htod(&labels[1..]))?;
    let cpu_err = cpu::sequence_sums(&values, &labels[1..], IGNORE_INDEX, layout).err();
    let gpu_err = gpu
        .sequence_sums(&d_values, &d_short, IGNORE_INDEX, layout)
        .err();
    ensure!(
        cpu_err.is_some() && gpu_err == cpu_err,
        "short labels: gpu {gpu_err:?} vs cpu {cpu_err:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Losses

fn close64(what: &str, gpu: f64, cpu: f64, tol: f64) -> TestResult {
    ensure!(
        (gpu - cpu).abs() <= tol * (1.0 + cpu.abs()),
        "{what}: gpu {gpu} vs cpu {cpu}"
    );
    Ok(())
}

fn close_opt(what: &str, gpu: Option<f64>, cpu: Option<f64>, tol: f64) -> TestResult {
    match (gpu, cpu) {
        (Some(g), Some(c)) => close64(what, g, c, tol),
        (None, None) => Ok(()),
        _ => Err(format!("{what}: gpu {gpu:?} vs cpu {cpu:?}").into()),
    }
}

fn close_metrics(what: &str, g: &losses::LossMetrics, c: &losses::LossMetrics) -> TestResult {
    // The GPU sums f32 rewards over the batch where the CPU averages f64 ones: agree to ~1e-6 of
    // the rewards' magnitude. The margin is a difference of two such means: scale by them.
    let tol = 1e-4;
    close_opt(
        &format!("{what}: rewards_chosen"),
        g.rewards_chosen,
        c.rewards_chosen,
        tol,
    )?;
    close_opt(
        &format!("{what}: rewards_rejected"),
        g.rewards_rejected,
        c.rewards_rejected,
        tol,
    )?;
    let scale =
        1.0 + c.rewards_chosen.unwrap_or(0.0).abs() + c.rewards_rejected.unwrap_or(0.0).abs();
    close_opt(
        &format!("{what}: rewards_margins"),
        g.rewards_margins,
        c.rewards_margins,
        tol * scale,
    )?;
    close_opt(
        &format!("{what}: rewards_accuracies"),
        g.rewards_accuracies,
        c.rewards_accuracies,
        tol,
    )?;
    close_opt(
        &format!("{what}: logps_chosen"),
        g.logps_chosen,
        c.logps_chosen,
        tol,
    )?;
    close_opt(
        &format!("{what}: logps_rejected"),
        g.logps_rejected,
        c.logps_rejected,
        tol,
    )?;
    close_opt(&format!("{what}: kl"), g.kl, c.kl, tol)?;
    ensure!(
        g.chosen_count == c.chosen_count && g.rejected_count == c.rejected_count,
        "{what}: counts differ"
    );
    Ok(())
}

struct KtoData {
    policy: Vec<f32>,
    reference: Vec<f32>,
    desirable: Vec<bool>,
    kl_policy: Vec<f32>,
    kl_reference: Vec<f32>,
}

fn kto_data(seed: u64, n: usize, n_kl: usize, desirable_every: usize) -> KtoData {
    KtoData {
        policy: random_f32(seed, n, -200.0, -20.0),
        reference: random_f32(seed + 1, n, -200.0, -20.0),
        desirable: (0..n)
            .map(|i| desirable_every > 0 && i % desirable_every == 0)
            .collect(),
        kl_policy: random_f32(seed + 2, n_kl, -200.0, -20.0),
        kl_reference: random_f32(seed + 3, n_kl, -200.0, -20.0),
    }
}

/// The CPU and GPU KTO losses on the same data: `kl` picks pairs / partial / none.
fn kto_both(
    gpu: &CudaBackend,
    config: &KtoConfig,
    d: &KtoData,
    kl: &str,
) -> Result<
    (
        halo_kernels::Result<losses::KtoOutput>,
        halo_kernels::Result<losses::KtoOutput>,
    ),
    Failed,
> {
    let partial =
        ReferencePointPartial::from_kl_logps(&d.kl_policy, &d.kl_reference).unwrap_or_default();
    let cpu_kl = match kl {
        "pairs" => Some(KlInput::LogProbs {
            policy: &d.kl_policy,
            reference: &d.kl_reference,
        }),
        "partial" => Some(KlInput::Partial(partial)),
        _ => None,
    };
    let cpu = losses::kto_loss(
        config,
        &KtoBatch {
            policy_logps: &d.policy,
            reference_logps: &d.reference,
            is_desirable: &d.desirable,
            kl: cpu_kl,
        },
    );
    let d_policy = ok("htod", gpu.htod(&d.policy))?;
    let d_reference = ok("htod", gpu.htod(&d.reference))?;
    let flags: Vec<u8> = d.desirable.iter().map(|&b| b as u8).collect();
    let d_desirable = ok("htod", gpu.htod(&flags))?;
    let d_kl_policy = ok("htod", gpu.htod(&d.kl_policy))?;
    let d_kl_reference = ok("htod", gpu.htod(&d.kl_reference))?;
    let gpu_kl = match kl {
        "pairs" => Some(CudaKlInput::LogProbs {
            policy: d_kl_policy.as_view(),
            reference: d_kl_reference.as_view(),
        }),
        "partial" => Some(CudaKlInput::Partial(partial)),
        _ => None,
    };
    let batch = CudaKtoBatch {
        policy_logps: d_policy.as_view(),
        reference_logps: d_reference.as_view(),
        is_desirable: d_desirable.as_view(),
        kl: gpu_kl,
    };
    Ok((cpu, gpu.kto_loss(config, &batch)))
}

fn kto_matches_cpu(gpu: &CudaBackend) -> TestResult {
    let configs = [
        KtoConfig::default(),
        KtoConfig {
            beta: 0.5,
            desirable_weight: 1.33,
            undesirable_weight: 0.7,
            loss_type: KtoLossType::Kto,
        },
        KtoConfig {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            loss_type: KtoLossType::ApoZeroUnpaired,
        },
    ];
    for config in &configs {
        for &(n, n_kl, every) in &[
            (1usize, 1usize, 1usize),
            (16, 16, 2),
            (300, 300, 3),
            (1000, 7, 1),
            (64, 64, 0),
        ] {
            for kl in ["pairs", "partial"] {
                let what = format!(
                    "{:?} n {n} kl {kl} desirable every {every}",
                    config.loss_type
                );
                let d = kto_data(n as u64 * 7 + every as u64, n, n_kl, every);
                let (cpu, gpu_out) = kto_both(gpu, config, &d, kl)?;
                let cpu = ok("cpu kto", cpu)?;
                let g = ok("gpu kto", gpu_out)?;
                close64(&format!("{what}: loss"), g.loss, cpu.loss, 1e-5)?;
                close64(&format!("{what}: z0"), g.z0, cpu.z0, 1e-4)?;
                let g_max = cpu
                    .grad_policy_logps
                    .iter()
                    .fold(0.0f32, |m, v| m.max(v.abs()));
                check_close(
                    &format!("{what}: grad"),
                    &g.grad_policy_logps,
                    &cpu.grad_policy_logps,
                    1e-4 * g_max,
                    1e-4,
                )?;
                close_metrics(&what, &g.metrics, &cpu.metrics)?;
            }
        }
    }
    // Determinism: two runs bitwise equal.
    let d = kto_data(99, 777, 777, 2);
    let (_, a) = kto_both(gpu, &KtoConfig::default(), &d, "pairs")?;
    let (_, b) = kto_both(gpu, &KtoConfig::default(), &d, "pairs")?;
    let (a, b) = (ok("run 1", a)?, ok("run 2", b)?);
    ensure!(
        a.loss.to_bits() == b.loss.to_bits()
            && bits(&a.grad_policy_logps) == bits(&b.grad_policy_logps),
        "KTO differs between two runs"
    );
    Ok(())
}

fn kto_errors_match_cpu(gpu: &CudaBackend) -> TestResult {
    let config = KtoConfig::default();
    let same = |d: &KtoData, kl: &str, what: &str, config: &KtoConfig| -> TestResult {
        let (cpu, g) = kto_both(gpu, config, d, kl)?;
        let (cpu, g) = (cpu.err(), g.err());
        ensure!(
            cpu.is_some() && g == cpu,
            "{what}: gpu {g:?} vs cpu {cpu:?}"
        );
        Ok(())
    };
    let base = kto_data(5, 40, 40, 2);
    let mut d = kto_data(5, 40, 40, 2);
    d.policy[13] = f32::NAN;
    d.policy[20] = f32::INFINITY;
    same(&d, "pairs", "NaN policy", &config)?;
    same(
        &d,
        "none",
        "NaN policy, no KL (finiteness is checked first)",
        &config,
    )?;
    let mut d = kto_data(5, 40, 40, 2);
    d.reference[0] = f32::NEG_INFINITY;
    same(&d, "pairs", "inf reference", &config)?;
    let mut d = kto_data(5, 40, 40, 2);
    d.kl_policy[3] = f32::NAN;
    same(&d, "pairs", "NaN KL policy", &config)?;
    same(&base, "none", "missing KL", &config)?;
    let empty_kl = kto_data(5, 40, 0, 2);
    same(&empty_kl, "pairs", "empty KL pairs", &config)?;
    same(&empty_kl, "partial", "empty KL partial", &config)?;
    let mut d = kto_data(5, 40, 40, 2);
    d.kl_reference.pop();
    same(&d, "pairs", "KL length mismatch", &config)?;
    let mut d = kto_data(5, 40, 40, 2);
    d.desirable.pop();
    same(&d, "pairs", "short is_desirable", &config)?;
    let none = kto_data(5, 0, 4, 2);
    same(&none, "pairs", "empty batch", &config)?;
    same(
        &base,
        "pairs",
        "beta 0",
        &KtoConfig {
            beta: 0.0,
            ..config
        },
    )?;
    same(
        &base,
        "pairs",
        "negative weight",
        &KtoConfig {
            undesirable_weight: -1.0,
            ..config
        },
    )?;
    Ok(())
}

struct PairData {
    pc: Vec<f32>,
    pr: Vec<f32>,
    rc: Vec<f32>,
    rr: Vec<f32>,
    cc: Vec<u32>,
    rc_counts: Vec<u32>,
}

fn pair_data(seed: u64, n: usize) -> PairData {
    PairData {
        pc: random_f32(seed, n, -300.0, -10.0),
        pr: random_f32(seed + 1, n, -300.0, -10.0),
        rc: random_f32(seed + 2, n, -300.0, -10.0),
        rr: random_f32(seed + 3, n, -300.0, -10.0),
        cc: (0..n as u64)
            .map(|i| 1 + (uniform(seed + 4, i, 0.0, 500.0) as u32))
            .collect(),
        rc_counts: (0..n as u64)
            .map(|i| 1 + (uniform(seed + 5, i, 0.0, 500.0) as u32))
            .collect(),
    }
}

fn dpo_both(
    gpu: &CudaBackend,
    config: &DpoConfig,
    d: &PairData,
    with_counts: bool,
) -> Result<
    (
        halo_kernels::Result<losses::PairLossOutput>,
        halo_kernels::Result<losses::PairLossOutput>,
    ),
    Failed,
> {
    let cpu = losses::dpo_loss(
        config,
        &PairBatch {
            policy_chosen_logps: &d.pc,
            policy_rejected_logps: &d.pr,
            reference_chosen_logps: &d.rc,
            reference_rejected_logps: &d.rr,
            chosen_counts: with_counts.then_some(&d.cc[..]),
            rejected_counts: with_counts.then_some(&d.rc_counts[..]),
        },
    );
    let (pc, pr) = (ok("htod", gpu.htod(&d.pc))?, ok("htod", gpu.htod(&d.pr))?);
    let (rc, rr) = (ok("htod", gpu.htod(&d.rc))?, ok("htod", gpu.htod(&d.rr))?);
    let (cc, rcc) = (
        ok("htod", gpu.htod(&d.cc))?,
        ok("htod", gpu.htod(&d.rc_counts))?,
    );
    let batch = CudaPairBatch {
        policy_chosen_logps: pc.as_view(),
        policy_rejected_logps: pr.as_view(),
        reference_chosen_logps: rc.as_view(),
        reference_rejected_logps: rr.as_view(),
        chosen_counts: with_counts.then(|| cc.as_view()),
        rejected_counts: with_counts.then(|| rcc.as_view()),
    };
    Ok((cpu, gpu.dpo_loss(config, &batch)))
}

fn dpo_matches_cpu(gpu: &CudaBackend) -> TestResult {
    for loss_type in DpoLossType::ALL {
        for &(beta, eps, tau) in &[(0.1, 0.0, 0.05), (0.5, 0.2, 1.0), (0.01, 0.1, 0.3)] {
            // exo_pair takes log ε: ε in (0, 1).
            let eps = if loss_type == DpoLossType::ExoPair && eps == 0.0 {
                1e-3
            } else {
                eps
            };
            for &n in &[1usize, 7, 256, 1000, 3000] {
                let config = DpoConfig {
                    beta,
                    label_smoothing: eps,
                    loss_type,
                    discopop_tau: tau,
                    ..DpoConfig::default()
                };
                let what = format!("{loss_type:?} beta {beta} eps {eps} n {n}");
                let d = pair_data(n as u64 + 40, n);
                let (cpu, g) = dpo_both(gpu, &config, &d, true)?;
                let (cpu, g) = (ok("cpu dpo", cpu)?, ok("gpu dpo", g)?);
                close64(&format!("{what}: loss"), g.loss, cpu.loss, 1e-5)?;
                let scale = |v: &[f32]| v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let g_max = scale(&cpu.grad_chosen).max(scale(&cpu.grad_rejected));
                check_close(
                    &format!("{what}: grad_chosen"),
                    &g.grad_chosen,
                    &cpu.grad_chosen,
                    1e-4 * g_max,
                    1e-4,
                )?;
                check_close(
                    &format!("{what}: grad_rejected"),
                    &g.grad_rejected,
                    &cpu.grad_rejected,
                    1e-4 * g_max,
                    1e-4,
                )?;
                close_metrics(&what, &g.metrics, &cpu.metrics)?;
            }
        }
    }
    let d = pair_data(3, 500);
    for loss_type in [
        DpoLossType::Sigmoid,
        DpoLossType::Aot,
        DpoLossType::AotUnpaired,
    ] {
        let config = DpoConfig {
            loss_type,
            ..DpoConfig::default()
        };
        let (_, a) = dpo_both(gpu, &config, &d, false)?;
        let (_, b) = dpo_both(gpu, &config, &d, false)?;
        let (a, b) = (ok("run 1", a)?, ok("run 2", b)?);
        ensure!(
            a.loss.to_bits() == b.loss.to_bits()
                && bits(&a.grad_chosen) == bits(&b.grad_chosen)
                && bits(&a.grad_rejected) == bits(&b.grad_rejected),
            "DPO {loss_type:?} differs between two runs"
        );
    }
    Ok(())
}

fn dpo_errors_match_cpu(gpu: &CudaBackend) -> TestResult {
    let same = |d: &PairData, counts: bool, config: DpoConfig, what: &str| -> TestResult {
        let (cpu, g) = dpo_both(gpu, &config, d, counts)?;
        let (cpu, g) = (cpu.err(), g.err());
        ensure!(
            cpu.is_some() && g == cpu,
            "{what}: gpu {g:?} vs cpu {cpu:?}"
        );
        Ok(())
    };
    let ipo = DpoConfig {
        loss_type: DpoLossType::Ipo,
        ..DpoConfig::default()
    };
    let mut d = pair_data(8, 30);
    d.rr[4] = f32::NAN;
    same(&d, true, DpoConfig::default(), "NaN reference_rejected")?;
    same(&d, false, ipo, "NaN and no counts (finiteness first)")?;
    let d = pair_data(8, 30);
    same(&d, false, ipo, "IPO without counts")?;
    let mut d = pair_data(8, 30);
    d.rc_counts[6] = 0;
    d.cc[9] = 0;
    same(&d, true, ipo, "IPO zero counts")?;
    let mut d = pair_data(8, 30);
    d.pc[2] = f32::INFINITY;
    d.cc[1] = 0;
    same(&d, true, ipo, "IPO inf and zero count")?;
    let mut d = pair_data(8, 30);
    d.cc.pop();
    same(&d, true, DpoConfig::default(), "short chosen_counts")?;
    let mut d = pair_data(8, 30);
    d.pr.pop();
    same(&d, true, DpoConfig::default(), "short policy_rejected")?;
    same(&pair_data(8, 0), true, DpoConfig::default(), "empty batch")?;
    let robust = DpoConfig {
        loss_type: DpoLossType::Robust,
        label_smoothing: 0.5,
        ..DpoConfig::default()
    };
    same(&pair_data(8, 3), true, robust, "robust eps 0.5")?;
    let sft = DpoConfig {
        loss_type: DpoLossType::Sft,
        ..DpoConfig::default()
    };
    same(&pair_data(8, 30), false, sft, "SFT without counts")?;
    let mut d = pair_data(8, 300);
    d.cc.iter_mut().for_each(|c| *c = 0);
    same(&d, true, sft, "SFT without a chosen token")?;
    d.pr[290] = f32::NAN;
    same(
        &d,
        true,
        sft,
        "SFT NaN and no chosen token (finiteness first)",
    )?;
    let mut d = pair_data(8, 300);
    d.rr[299] = f32::INFINITY;
    for loss_type in [DpoLossType::Sft, DpoLossType::Aot, DpoLossType::AotUnpaired] {
        let config = DpoConfig {
            loss_type,
            ..DpoConfig::default()
        };
        same(&d, true, config, "an infinite reference_rejected")?;
    }
    let exo = DpoConfig {
        loss_type: DpoLossType::ExoPair,
        label_smoothing: 0.0,
        ..DpoConfig::default()
    };
    same(&pair_data(8, 3), true, exo, "exo_pair eps 0")?;
    // DiscoPOP with τ = 2 at βh far below 0: e^{−βh/2} overflows (the policy log-probs are
    // [−300, −10], the reference ones the same: |h| up to ~580, β = 10).
    let discopop = DpoConfig {
        loss_type: DpoLossType::Discopop,
        beta: 10.0,
        discopop_tau: 2.0,
        ..DpoConfig::default()
    };
    same(
        &pair_data(8, 300),
        true,
        discopop,
        "discopop tau 2 overflow",
    )?;
    Ok(())
}
