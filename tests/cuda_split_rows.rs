//! Split rows (issue 16, item 3): the token forward and backward with several blocks per row
//! (`kernels/split_rows.cuh`), at forced split counts 1, 2, 3, 7 and the automatic choice, against
//! plain f64 references written here, at awkward sizes and values, run twice for bit equality, and
//! with the CPU op's errors (same error, same row) for bad inputs.
//!
//! A `harness = false` test like `tests/cuda_kernels.rs`: on the real GPU when there is one, else on
//! the emulated CUDA device; with neither every test is reported IGNORED by name.

mod device_support;

use std::sync::Arc;

use half::{bf16, f16};
use halo_kernels::cpu::{self, SavedLse, SequenceLayout};
use halo_kernels::cuda::{
    auto_row_splits, row_slice, CudaBackend, CudaKlInput, CudaKtoStepInputs, CudaLogit, CudaLogits,
    CudaSlice, RowSplit, MAX_ROW_SPLITS,
};
use halo_kernels::losses::KtoConfig;
use halo_kernels::{HaloError, LogitElement, IGNORE_INDEX};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

type TestResult = Result<(), Failed>;

struct GpuTest {
    name: &'static str,
    what: &'static str,
    run: fn(&CudaBackend) -> TestResult,
}

fn main() {
    let args = Arguments::from_args();
    let backend = device_support::cuda_backend().map(Arc::new);
    match &backend {
        Ok(b) => eprintln!(
            "cuda_split_rows: running on {} ({} SMs)",
            b.device_name().unwrap_or_else(|e| e.to_string()),
            b.multiprocessor_count()
        ),
        Err(reason) => eprintln!("cuda_split_rows: every GPU test is ignored: {reason}"),
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
            "auto_choice",
            "the automatic split: 8 rows x 128256 split, 4096 rows not",
            auto_choice
        ),
        t!(
            "forward_f32",
            "split forward vs f64, f32, splits 1/2/3/7/auto, awkward sizes and labels",
            forward_cases::<f32>
        ),
        t!(
            "forward_bf16",
            "split forward vs f64, bf16, splits 1/2/3/7/auto, awkward sizes and labels",
            forward_cases::<bf16>
        ),
        t!(
            "forward_f16",
            "split forward vs f64, f16, splits 1/2/3/7/auto, awkward sizes and labels",
            forward_cases::<f16>
        ),
        t!(
            "forward_auto_8_rows_128256_bf16",
            "8 rows x 128256 bf16 with the automatic split vs f64",
            forward_auto_small_batch
        ),
        t!(
            "forward_extremes",
            "a huge logit only in a late slice (1e4, 3e7), -1e30 first: split forward vs f64",
            forward_extremes
        ),
        t!(
            "forward_errors",
            "NaN / inf in slice 2, bad labels, bad split counts: the CPU op's errors",
            forward_errors
        ),
        t!(
            "deterministic",
            "forward and backward with splits 7 and auto: two runs bit-equal",
            deterministic
        ),
        t!(
            "backward_f32",
            "split backward (both forms) vs f64, f32",
            backward_cases::<f32>
        ),
        t!(
            "backward_bf16",
            "split backward (both forms) vs f64, bf16",
            backward_cases::<bf16>
        ),
        t!(
            "backward_f16",
            "split backward (both forms) vs f64, f16",
            backward_cases::<f16>
        ),
        t!(
            "backward_errors",
            "split backward: non-finite logits in slice 2, inconsistent lse, overflow, bad inputs",
            backward_errors
        ),
        t!(
            "random_shapes",
            "random shapes, values and split counts: forward and backward vs f64",
            random_shapes
        ),
        t!(
            "kto_step_one_host_wait",
            "a KTO step whose token ops split keeps one host wait (emulated device only)",
            kto_step_one_host_wait
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

fn ok<T>(what: &str, r: halo_kernels::Result<T>) -> Result<T, Failed> {
    r.map_err(|e| Failed::from(format!("{what}: unexpected error: {e}")))
}

/// Deterministic uniform `[lo, hi)` from (seed, index): splitmix64.
fn uniform(seed: u64, i: u64, lo: f64, hi: f64) -> f64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    lo + (hi - lo) * ((z >> 11) as f64 / (1u64 << 53) as f64)
}

fn random_logits<T: LogitElement>(seed: u64, n: usize, scale: f64) -> Vec<T> {
    (0..n as u64)
        .map(|i| T::from_f32(uniform(seed, i, -scale, scale) as f32))
        .collect()
}

/// The split counts every case runs with.
const SPLITS: [RowSplit; 5] = [
    RowSplit::Fixed(1),
    RowSplit::Fixed(2),
    RowSplit::Fixed(3),
    RowSplit::Fixed(7),
    RowSplit::Auto,
];

/// Start of slice `k` of a row of `vocab` split `splits` ways, restated from the documented
/// formula `⌊k·vocab/splits⌋` (to place labels and values at slice boundaries).
fn slice_start(vocab: usize, splits: usize, k: usize) -> usize {
    k * vocab / splits
}

/// f64 logsumexp of one row (max first, as a reference must not overflow).
fn lse64(row: &[f64]) -> f64 {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|z| (z - m).exp()).sum::<f64>().ln()
}

fn row_f64<T: LogitElement>(logits: &[T], r: usize, vocab: usize) -> Vec<f64> {
    logits[r * vocab..(r + 1) * vocab]
        .iter()
        .map(|z| z.to_f32() as f64)
        .collect()
}

struct Forward {
    logp: Vec<f32>,
    lse: Vec<f32>,
    residual: Vec<f32>,
}

fn gpu_forward<T: CudaLogit>(
    gpu: &CudaBackend,
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    split: RowSplit,
) -> halo_kernels::Result<Forward> {
    let d_logits = gpu.htod(logits)?;
    let d_labels = gpu.htod(labels)?;
    let out = gpu.token_logprobs_with_split(&d_logits, &d_labels, vocab, IGNORE_INDEX, split)?;
    Ok(Forward {
        logp: gpu.dtoh(&out.logp)?,
        lse: gpu.dtoh(&out.lse)?,
        residual: gpu.dtoh(&out.lse_residual)?,
    })
}

/// The forward at `split` against f64: lse (and lse + residual, which is the row's logsumexp to
/// f32 precision of the f32 sum), logp; ignored rows exactly 0.
fn check_forward<T: CudaLogit>(
    gpu: &CudaBackend,
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    split: RowSplit,
    what: &str,
) -> TestResult {
    let out = ok(what, gpu_forward(gpu, logits, labels, vocab, split))?;
    for (r, &y) in labels.iter().enumerate() {
        if y == IGNORE_INDEX {
            ensure!(
                out.logp[r] == 0.0 && out.lse[r] == 0.0 && out.residual[r] == 0.0,
                "{what} {split:?}: ignored row {r}: logp {} lse {} residual {}",
                out.logp[r],
                out.lse[r],
                out.residual[r]
            );
            continue;
        }
        let z = row_f64(logits, r, vocab);
        let lse = lse64(&z);
        let logp = (z[y as usize] - lse).min(0.0);
        // f32 sums of up to 1e5 terms: a few 1e-6 relative in Σ, i.e. absolute in ln Σ; lse's
        // own rounding is 2^-24 of its magnitude.
        let tol = 3e-5 + 4e-7 * lse.abs();
        let full = out.lse[r] as f64 + out.residual[r] as f64;
        ensure!(
            (out.lse[r] as f64 - lse).abs() <= tol && (full - lse).abs() <= tol,
            "{what} {split:?}: row {r}: lse {} + {} vs f64 {lse}",
            out.lse[r],
            out.residual[r]
        );
        // logp's own f32 rounding adds 2^-24 of its magnitude (a logit at −6e4 in f16).
        ensure!(
            (out.logp[r] as f64 - logp).abs() <= tol + 1.2e-7 * logp.abs() && out.logp[r] <= 0.0,
            "{what} {split:?}: row {r}: logp {} vs f64 {logp}",
            out.logp[r]
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The automatic choice

fn auto_choice(gpu: &CudaBackend) -> TestResult {
    let sms = gpu.multiprocessor_count();
    ensure!(
        (1..=4096).contains(&sms),
        "multiprocessor count {sms} is not a device's"
    );
    if gpu.is_emulated() {
        ensure!(
            sms == 132,
            "the emulated device reports {sms} SMs, not an H200's 132"
        );
    }
    let small = ok("auto", gpu.row_splits(RowSplit::Auto, 8, 128_256))?;
    ensure!(
        small > 1,
        "8 rows x 128256 on {sms} SMs: not split ({small})"
    );
    ensure!(
        small == auto_row_splits(8, 128_256, sms),
        "the backend's choice {small} is not auto_row_splits'"
    );
    // Every slice stays large, and the blocks fill the device without exceeding twice it.
    ensure!(
        128_256 / small >= 8192 && 8 * small <= 2 * sms + 8,
        "8 rows x 128256: {small} splits"
    );
    let big = ok("auto", gpu.row_splits(RowSplit::Auto, 4096, 128_256))?;
    ensure!(big == 1, "4096 rows x 128256: split {big} ways");
    let narrow = ok("auto", gpu.row_splits(RowSplit::Auto, 1, 4096))?;
    ensure!(
        narrow == 1,
        "1 row x 4096 (rows share a block): split {narrow} ways"
    );
    for bad in [0, MAX_ROW_SPLITS + 1] {
        let err = gpu.row_splits(RowSplit::Fixed(bad), 8, 128_256);
        ensure!(
            matches!(err, Err(HaloError::InvalidShape(_))),
            "split {bad}: {err:?}"
        );
    }
    // The slices tile the row (the kernels' formula).
    for (vocab, splits) in [(128_256usize, small), (10_007, 7), (5, 7)] {
        let mut next = 0;
        for k in 0..splits {
            let s = row_slice(vocab, splits, k);
            ensure!(
                s.start == next && s.start == slice_start(vocab, splits, k),
                "vocab {vocab} / {splits}: slice {k} is {s:?}"
            );
            next = s.end;
        }
        ensure!(
            next == vocab,
            "vocab {vocab} / {splits}: slices end at {next}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Forward

fn forward_cases<T: CudaLogit>(gpu: &CudaBackend) -> TestResult {
    for &(rows, vocab) in &[
        (1usize, 20_000usize),
        (3, 10_007),
        (5, 33),
        (2, 16_385),
        (4, 5),
    ] {
        let logits = random_logits::<T>(vocab as u64 + rows as u64, rows * vocab, 8.0);
        for split in SPLITS {
            let splits = ok("splits", gpu.row_splits(split, rows, vocab))?;
            // Labels: the first column of slice 1, the last column of slice 0, the last column
            // (last slice), column 0, ignored.
            let labels: Vec<i32> = (0..rows)
                .map(|r| match r % 5 {
                    0 => slice_start(vocab, splits, 1.min(splits - 1)) as i32,
                    1 => slice_start(vocab, splits, 1).saturating_sub(1) as i32,
                    2 => vocab as i32 - 1,
                    3 => IGNORE_INDEX,
                    _ => 0,
                })
                .collect();
            let what = format!("{:?} {rows}x{vocab}", T::DTYPE);
            check_forward(gpu, &logits, &labels, vocab, split, &what)?;
            check_forward(
                gpu,
                &logits,
                &vec![IGNORE_INDEX; rows],
                vocab,
                split,
                &format!("{what} all ignored"),
            )?;
        }
    }
    Ok(())
}

fn forward_auto_small_batch(gpu: &CudaBackend) -> TestResult {
    let (rows, vocab) = (8, 128_256);
    let logits = random_logits::<bf16>(8, rows * vocab, 12.0);
    let labels: Vec<i32> = (0..rows as i32)
        .map(|r| {
            if r == 5 {
                IGNORE_INDEX
            } else {
                r * 16_001 % vocab as i32
            }
        })
        .collect();
    check_forward(
        gpu,
        &logits,
        &labels,
        vocab,
        RowSplit::Auto,
        "8 x 128256 bf16",
    )
}

fn forward_extremes(gpu: &CudaBackend) -> TestResult {
    let (rows, vocab) = (4, 24_011);
    for split in SPLITS {
        let splits = ok("splits", gpu.row_splits(split, rows, vocab))?;
        let late = slice_start(vocab, splits, splits - 1) + 3; // in the last slice
        let mut f32_logits = random_logits::<f32>(31, rows * vocab, 4.0);
        f32_logits[late] = 1e4; // row 0: the max only in the last slice, the label elsewhere
        f32_logits[vocab + late] = 3e7; // row 1: beyond the one-FMA range (exact fallback)
        f32_logits[2 * vocab] = -1e30; // row 2: a huge negative first, then ordinary values
        f32_logits[3 * vocab + vocab - 1] = 80.0; // row 3: the label is the dominant last column
        let labels = [7, late as i32, 1, vocab as i32 - 1];
        check_forward(gpu, &f32_logits, &labels, vocab, split, "f32 extremes")?;
        let mut b = random_logits::<bf16>(32, rows * vocab, 4.0);
        b[late] = bf16::from_f32(1e4);
        b[vocab + late] = bf16::from_f32(3e7);
        b[2 * vocab] = bf16::from_f32(-1e30);
        b[3 * vocab + vocab - 1] = bf16::from_f32(80.0);
        check_forward(gpu, &b, &labels, vocab, split, "bf16 extremes")?;
        let mut h = random_logits::<f16>(33, rows * vocab, 4.0);
        h[late] = f16::from_f32(6e4);
        h[vocab + late] = f16::from_f32(-6e4);
        h[3 * vocab + vocab - 1] = f16::from_f32(80.0);
        check_forward(gpu, &h, &labels, vocab, split, "f16 extremes")?;
    }
    Ok(())
}

/// The split forward returns exactly the CPU op's error.
fn same_forward_error<T: CudaLogit>(
    gpu: &CudaBackend,
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    split: RowSplit,
    what: &str,
) -> TestResult {
    let cpu_err = cpu::token_logprobs(logits, labels, vocab, IGNORE_INDEX).err();
    ensure!(cpu_err.is_some(), "{what}: not an error on the CPU");
    let gpu_err = gpu_forward(gpu, logits, labels, vocab, split).err();
    ensure!(
        gpu_err == cpu_err,
        "{what} {split:?}: gpu {gpu_err:?} vs cpu {cpu_err:?}"
    );
    Ok(())
}

fn forward_errors(gpu: &CudaBackend) -> TestResult {
    let (rows, vocab) = (6, 20_011);
    let logits = random_logits::<bf16>(41, rows * vocab, 5.0);
    let labels = [3, IGNORE_INDEX, 17, 20_010, 5, 9];
    for split in SPLITS {
        let splits = ok("splits", gpu.row_splits(split, rows, vocab))?;
        let in_slice_2 = slice_start(vocab, splits, 2.min(splits - 1)) + 1;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut z = logits.clone();
            z[2 * vocab + in_slice_2] = bf16::from_f32(bad);
            z[4 * vocab] = bf16::from_f32(bad); // a later row too
            z[vocab + in_slice_2] = bf16::from_f32(bad); // an ignored row: no error
            same_forward_error(gpu, &z, &labels, vocab, split, &format!("{bad} in slice 2"))?;
        }
        let mut l = labels;
        l[4] = vocab as i32;
        l[5] = -3;
        same_forward_error(gpu, &logits, &l, vocab, split, "bad labels")?;
        // A NaN in an ignored row only: no error.
        let mut z = logits.clone();
        z[vocab + in_slice_2] = bf16::from_f32(f32::NAN);
        check_forward(gpu, &z, &labels, vocab, split, "NaN in an ignored row")?;
    }
    let d_logits = ok("htod", gpu.htod(&logits))?;
    let d_labels = ok("htod", gpu.htod(&labels))?;
    for bad in [0, MAX_ROW_SPLITS + 1] {
        let err = gpu
            .token_logprobs_with_split(
                &d_logits,
                &d_labels,
                vocab,
                IGNORE_INDEX,
                RowSplit::Fixed(bad),
            )
            .err();
        ensure!(
            matches!(err, Some(HaloError::InvalidShape(_))),
            "split {bad}: {err:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Backward

/// The f64 saved lse of `logits` (as the f32 lse and its residual, for the backward's input).
fn saved64<T: LogitElement>(logits: &[T], labels: &[i32], vocab: usize) -> (Vec<f32>, Vec<f32>) {
    labels
        .iter()
        .enumerate()
        .map(|(r, &y)| {
            if y == IGNORE_INDEX {
                return (0.0, 0.0);
            }
            let lse = lse64(&row_f64(logits, r, vocab));
            let rounded = lse as f32;
            (rounded, (lse - rounded as f64) as f32)
        })
        .unzip()
}

/// Both backward forms at `split`; the out-of-place result (after checking the in-place one is
/// bit-equal to it).
#[allow(clippy::too_many_arguments)]
fn gpu_backward<T: CudaLogit>(
    gpu: &CudaBackend,
    logits: &[T],
    labels: &[i32],
    lse: &[f32],
    residual: Option<&[f32]>,
    g: &[f32],
    vocab: usize,
    split: RowSplit,
) -> Result<halo_kernels::Result<Vec<T>>, Failed> {
    let d_logits = ok("htod", gpu.htod(logits))?;
    let d_labels = ok("htod", gpu.htod(labels))?;
    let d_lse = ok("htod", gpu.htod(lse))?;
    let d_residual = match residual {
        Some(r) => Some(ok("htod", gpu.htod(r))?),
        None => None,
    };
    let saved = match &d_residual {
        Some(r) => SavedLse::new(&d_lse, r),
        None => SavedLse::bare(&d_lse),
    };
    let d_g = ok("htod", gpu.htod(g))?;
    let mut d_grad = ok(
        "poison",
        gpu.htod(&vec![T::from_f32(f32::NAN); logits.len()]),
    )?;
    let out_of_place = gpu.token_logprobs_backward_with_split(
        &d_logits,
        &d_labels,
        saved,
        &d_g,
        vocab,
        IGNORE_INDEX,
        split,
        &mut d_grad,
    );
    let mut d_inplace: CudaSlice<T> = ok("htod", gpu.htod(logits))?;
    let inplace = gpu.token_logprobs_backward_inplace_with_split(
        &mut d_inplace,
        &d_labels,
        saved,
        &d_g,
        vocab,
        IGNORE_INDEX,
        split,
    );
    ensure!(
        out_of_place == inplace,
        "{split:?}: out of place {out_of_place:?}, in place {inplace:?}"
    );
    if let Err(e) = out_of_place {
        return Ok(Err(e));
    }
    let a = ok("dtoh", gpu.dtoh(&d_grad))?;
    let b = ok("dtoh", gpu.dtoh(&d_inplace))?;
    let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
    ensure!(
        bits(&a) == bits(&b),
        "{split:?}: in-place and out-of-place gradients differ"
    );
    Ok(Ok(a))
}

/// Relative tolerance of one rounding to `T`.
fn storage_rtol<T: LogitElement>() -> f64 {
    match T::DTYPE {
        halo_kernels::DType::F32 => 2e-5,
        halo_kernels::DType::BF16 => 1.0 / 128.0,
        halo_kernels::DType::F16 => 1.0 / 1024.0,
    }
}

/// The backward at every split count against f64 `g·(1[v = y] − exp(z − lse))`, and bit-equal
/// across split counts (each element's value does not depend on the split).
fn check_backward<T: CudaLogit>(
    gpu: &CudaBackend,
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    what: &str,
) -> TestResult {
    let rows = labels.len();
    let (lse, residual) = saved64(logits, labels, vocab);
    let g: Vec<f32> = (0..rows)
        .map(|r| uniform(91, r as u64, -2.0, 2.0) as f32)
        .collect();
    let mut first: Option<Vec<u32>> = None;
    for split in SPLITS {
        let grad = gpu_backward(gpu, logits, labels, &lse, Some(&residual), &g, vocab, split)?;
        let grad = ok(&format!("{what} {split:?}"), grad)?;
        for (r, &y) in labels.iter().enumerate() {
            let z = row_f64(logits, r, vocab);
            let l = lse64(&z);
            for v in 0..vocab {
                let want = if y == IGNORE_INDEX {
                    0.0
                } else {
                    g[r] as f64 * ((v == y as usize) as i32 as f64 - (z[v] - l).exp())
                };
                let got = grad[r * vocab + v].to_f32() as f64;
                let tol = 2e-6 * g[r].abs() as f64 + storage_rtol::<T>() * want.abs() + 1e-30;
                ensure!(
                    (got - want).abs() <= tol,
                    "{what} {split:?}: row {r} col {v} (label {y}): {got} vs f64 {want}"
                );
            }
        }
        let bits: Vec<u32> = grad.iter().map(|x| x.to_f32().to_bits()).collect();
        match &first {
            None => first = Some(bits),
            Some(b) => {
                ensure!(
                    *b == bits,
                    "{what} {split:?}: gradient differs from the unsplit one"
                );
            }
        }
    }
    Ok(())
}

fn backward_cases<T: CudaLogit>(gpu: &CudaBackend) -> TestResult {
    for &(rows, vocab) in &[(1usize, 20_000usize), (3, 10_007), (5, 33), (2, 4)] {
        let logits = random_logits::<T>(vocab as u64 * 3 + rows as u64, rows * vocab, 8.0);
        // The labels at slice boundaries of 3 and 7 slices, the last column, ignored, column 0.
        let labels: Vec<i32> = (0..rows)
            .map(|r| match r % 5 {
                0 => slice_start(vocab, 7, 3) as i32,
                1 => slice_start(vocab, 3, 1).saturating_sub(1) as i32,
                2 => vocab as i32 - 1,
                3 => IGNORE_INDEX,
                _ => 0,
            })
            .collect();
        check_backward(
            gpu,
            &logits,
            &labels,
            vocab,
            &format!("{:?} {rows}x{vocab}", T::DTYPE),
        )?;
        check_backward(
            gpu,
            &logits,
            &vec![IGNORE_INDEX; rows],
            vocab,
            &format!("{:?} {rows}x{vocab} all ignored", T::DTYPE),
        )?;
    }
    Ok(())
}

/// The split backward returns exactly the CPU op's error (both forms).
#[allow(clippy::too_many_arguments)]
fn same_backward_error<T: CudaLogit>(
    gpu: &CudaBackend,
    logits: &[T],
    labels: &[i32],
    lse: &[f32],
    g: &[f32],
    vocab: usize,
    split: RowSplit,
    what: &str,
) -> TestResult {
    let mut cpu_grad = vec![T::from_f32(0.0); logits.len()];
    let cpu_err = cpu::token_logprobs_backward(
        logits,
        labels,
        SavedLse::bare(lse),
        g,
        vocab,
        IGNORE_INDEX,
        &mut cpu_grad,
    )
    .err();
    ensure!(cpu_err.is_some(), "{what}: not an error on the CPU");
    let gpu_err = gpu_backward(gpu, logits, labels, lse, None, g, vocab, split)?.err();
    ensure!(
        gpu_err == cpu_err,
        "{what} {split:?}: gpu {gpu_err:?} vs cpu {cpu_err:?}"
    );
    Ok(())
}

fn backward_errors(gpu: &CudaBackend) -> TestResult {
    let (rows, vocab) = (6, 20_011);
    let logits = random_logits::<bf16>(51, rows * vocab, 5.0);
    let labels = [3, IGNORE_INDEX, 17, 20_010, 5, 9];
    let (lse, _) = saved64(&logits, &labels, vocab);
    let g: Vec<f32> = (0..rows)
        .map(|r| uniform(52, r as u64, -1.0, 1.0) as f32)
        .collect();
    for split in SPLITS {
        let splits = ok("splits", gpu.row_splits(split, rows, vocab))?;
        let in_slice_2 = slice_start(vocab, splits, 2.min(splits - 1)) + 2;
        for bad in [f32::NAN, f32::INFINITY] {
            let mut z = logits.clone();
            z[3 * vocab + in_slice_2] = bf16::from_f32(bad);
            z[5 * vocab + 1] = bf16::from_f32(bad);
            same_backward_error(gpu, &z, &labels, &lse, &g, vocab, split, "non-finite logit")?;
        }
        // An lse 0.01 too large: Σp = e^-0.01, off by 1e-2 (the merged Σ over the slices).
        let mut wrong = lse.clone();
        wrong[4] += 0.01;
        wrong[5] -= 0.5;
        same_backward_error(
            gpu,
            &logits,
            &labels,
            &wrong,
            &g,
            vocab,
            split,
            "inconsistent lse",
        )?;
        // A gradient bf16 cannot hold: g·(1 − p) beyond bf16's max in row 2.
        let mut big = g.clone();
        big[2] = 3.0e38;
        big[4] = f32::MAX;
        same_backward_error(gpu, &logits, &labels, &lse, &big, vocab, split, "overflow")?;
        // Bad label, non-finite lse, non-finite grad: in the CPU op's order.
        let mut l = labels;
        l[4] = -5;
        let mut nan_lse = lse.clone();
        nan_lse[2] = f32::NAN;
        let mut inf_g = g.clone();
        inf_g[0] = f32::INFINITY;
        same_backward_error(
            gpu,
            &logits,
            &l,
            &nan_lse,
            &inf_g,
            vocab,
            split,
            "label first",
        )?;
        same_backward_error(
            gpu, &logits, &labels, &nan_lse, &inf_g, vocab, split, "lse next",
        )?;
        same_backward_error(gpu, &logits, &labels, &lse, &inf_g, vocab, split, "grad")?;
        // The faults of different rows: the first row wins whatever its fault.
        let mut z = logits.clone();
        z[5 * vocab + in_slice_2] = bf16::from_f32(f32::NAN);
        same_backward_error(
            gpu,
            &z,
            &labels,
            &wrong,
            &big,
            vocab,
            split,
            "first row wins",
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Determinism and random shapes

fn deterministic(gpu: &CudaBackend) -> TestResult {
    let (rows, vocab) = (5, 64_007);
    let logits = random_logits::<bf16>(61, rows * vocab, 10.0);
    let labels = [0, 64_006, IGNORE_INDEX, 30_000, 12];
    let (lse, residual) = saved64(&logits, &labels, vocab);
    let g = [0.5f32, -1.0, 2.0, 0.25, -0.75];
    for split in [RowSplit::Fixed(7), RowSplit::Auto] {
        let a = ok("forward", gpu_forward(gpu, &logits, &labels, vocab, split))?;
        let b = ok("forward", gpu_forward(gpu, &logits, &labels, vocab, split))?;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        ensure!(
            bits(&a.logp) == bits(&b.logp)
                && bits(&a.lse) == bits(&b.lse)
                && bits(&a.residual) == bits(&b.residual),
            "{split:?}: two forward runs differ"
        );
        let run = || {
            gpu_backward(
                gpu,
                &logits,
                &labels,
                &lse,
                Some(&residual),
                &g,
                vocab,
                split,
            )
        };
        let ga = ok("backward", run()?)?;
        let gb = ok("backward", run()?)?;
        ensure!(
            ga.iter()
                .map(|x| x.to_bits())
                .eq(gb.iter().map(|x| x.to_bits())),
            "{split:?}: two backward runs differ"
        );
    }
    Ok(())
}

/// Random shapes, split counts and values (with rare huge, tiny, tied and non-finite entries, and
/// the fuzzer's scales up to 3e38) through the forward and the backward: against f64, or, where
/// the CPU op refuses the input, the CPU op's error — the fuzz-style sweep of the split paths
/// (`tests/fuzz_core.rs` draws vocabularies ≤ 257, which are never split).
fn random_shapes(gpu: &CudaBackend) -> TestResult {
    // More cases for a longer sweep: HALO_SPLIT_CASES=<n> (and HALO_SPLIT_SEED for another stream).
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (cases, seed) = (env("HALO_SPLIT_CASES", 48), env("HALO_SPLIT_SEED", 7000));
    for case in 0..cases {
        match case % 3 {
            0 => random_case::<f32>(gpu, seed, case)?,
            1 => random_case::<bf16>(gpu, seed, case)?,
            _ => random_case::<f16>(gpu, seed, case)?,
        }
    }
    Ok(())
}

/// One case of [`random_shapes`], in `T`.
fn random_case<T: CudaLogit>(gpu: &CudaBackend, seed: u64, case: u64) -> TestResult {
    {
        let u = |i: u64, lo: f64, hi: f64| uniform(seed + case, i, lo, hi);
        let pick = |i: u64, n: usize| (u(i, 0.0, n as f64) as usize).min(n - 1);
        let rows = 1 + pick(0, 4);
        let vocab = 1 + (u(1, 0.0, 1.0).powi(2) * 40_000.0) as usize;
        let split = if case % 6 == 5 {
            RowSplit::Auto
        } else {
            RowSplit::Fixed(1 + pick(2, 12))
        };
        let scale = [1.0, 8.0, 100.0, 1e4, 1e5, 3e38][pick(3, 6)];
        let mut logits: Vec<T> = (0..rows * vocab)
            .map(|i| T::from_f32(u(10 + i as u64, -scale, scale) as f32))
            .collect();
        let specials = [
            3e7f32,
            -1e30,
            scale as f32,
            0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        // Non-finite values in one case in four.
        let usable = if case % 4 == 3 { specials.len() } else { 4 };
        for k in 0..3u64 {
            logits[pick(100 + k, rows * vocab)] = T::from_f32(specials[pick(200 + k, usable)]);
        }
        let labels: Vec<i32> = (0..rows as u64)
            .map(|r| {
                if u(300 + r, 0.0, 1.0) < 0.2 {
                    IGNORE_INDEX
                } else {
                    pick(400 + r, vocab) as i32
                }
            })
            .collect();
        let what = format!("case {case}: {:?} {rows}x{vocab} scale {scale}", T::DTYPE);
        if cpu::token_logprobs(&logits, &labels, vocab, IGNORE_INDEX).is_err() {
            return same_forward_error(gpu, &logits, &labels, vocab, split, &what);
        }
        check_forward(gpu, &logits, &labels, vocab, split, &what)?;
        // Backward against f64 at this split only (check_backward runs the fixed list).
        let (lse, residual) = saved64(&logits, &labels, vocab);
        let g: Vec<f32> = (0..rows as u64)
            .map(|r| u(500 + r, -1.0, 1.0) as f32)
            .collect();
        let grad = ok(
            &what,
            gpu_backward(
                gpu,
                &logits,
                &labels,
                &lse,
                Some(&residual),
                &g,
                vocab,
                split,
            )?,
        )?;
        for (r, &y) in labels.iter().enumerate() {
            let z = row_f64(&logits, r, vocab);
            let l = lse64(&z);
            for v in 0..vocab {
                let want = if y == IGNORE_INDEX {
                    0.0
                } else {
                    g[r] as f64 * ((v == y as usize) as i32 as f64 - (z[v] - l).exp())
                };
                let got = grad[r * vocab + v].to_f32() as f64;
                // f16 rounds tiny values to its subnormal grid (steps of 6e-8).
                let floor = if T::DTYPE == halo_kernels::DType::F16 {
                    3e-8
                } else {
                    0.0
                };
                let tol = 2e-6 * g[r].abs() as f64 + storage_rtol::<T>() * want.abs() + floor;
                ensure!(
                    (got - want).abs() <= tol,
                    "{what} {split:?}: row {r} col {v}: {got} vs f64 {want}"
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The step chain

/// A KTO step on a few rows of a wide vocabulary (the token ops split) waits for the device once.
fn kto_step_one_host_wait(gpu: &CudaBackend) -> TestResult {
    if !gpu.is_emulated() {
        return Ok(()); // the counters live in the emulated driver
    }
    let (batch, seq, vocab) = (2, 3, 40_000);
    let rows = batch * seq;
    ensure!(
        ok("splits", gpu.row_splits(RowSplit::Auto, rows, vocab))? > 1,
        "{rows} x {vocab} is not split: the test would not test the split"
    );
    let logits = random_logits::<bf16>(71, rows * vocab, 6.0);
    let labels = [IGNORE_INDEX, 5, 39_999, IGNORE_INDEX, 20_000, 7];
    let mut d_logits = ok("htod", gpu.htod(&logits))?;
    let d_labels = ok("htod", gpu.htod(&labels))?;
    let reference = ok("htod", gpu.htod(&[-9.0f32, -8.5]))?;
    let desirable = ok("htod", gpu.htod(&[1u8, 0]))?;
    let kl_policy = ok("htod", gpu.htod(&[-9.1f32, -8.7]))?;
    let kl_reference = ok("htod", gpu.htod(&[-9.0f32, -8.8]))?;
    ok("reset counts", halo_kernels::emulation::call_counts(true))?;
    let step = gpu.kto_step(
        &KtoConfig::default(),
        CudaLogits {
            logits: &mut d_logits,
            labels: &d_labels,
            vocab,
            ignore_index: IGNORE_INDEX,
            layout: SequenceLayout::Padded { batch, seq },
        },
        &CudaKtoStepInputs {
            reference_logps: reference.as_view(),
            is_desirable: desirable.as_view(),
            kl: Some(CudaKlInput::LogProbs {
                policy: kl_policy.as_view(),
                reference: kl_reference.as_view(),
            }),
        },
    );
    let counts = ok("counts", halo_kernels::emulation::call_counts(false))?;
    let step = ok("kto step", step)?;
    ensure!(step.loss.loss.is_finite(), "loss {}", step.loss.loss);
    ensure!(
        counts.host_waits == 1,
        "a split KTO step waits {} times: {counts:?}",
        counts.host_waits
    );
    // The step's per-sequence log-probs against f64.
    let sums = ok("dtoh", gpu.dtoh(&step.policy_logps))?;
    ensure!(
        sums.len() == batch,
        "{} sums for {batch} sequences",
        sums.len()
    );
    for (b, &sum) in sums.iter().enumerate() {
        let want: f64 = (b * seq..(b + 1) * seq)
            .filter(|&r| labels[r] != IGNORE_INDEX)
            .map(|r| {
                let z = row_f64(&logits, r, vocab);
                z[labels[r] as usize] - lse64(&z)
            })
            .sum();
        ensure!(
            (sum as f64 - want).abs() <= 1e-4,
            "sequence {b}: Σ logp {sum} vs f64 {want}"
        );
    }
    Ok(())
}
