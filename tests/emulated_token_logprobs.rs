//! The token log-prob kernels (`kernels/token_logprobs*.cu`), run under host emulation, against the
//! CPU ops (`halo_kernels::cpu`) and an f64 reference, at awkward sizes and in all three dtypes.

mod emulated_support;

use emulated_support::*;
use half::{bf16, f16};
use halo_kernels::emulation::{self as emu, EmulatedElement};
use halo_kernels::{cpu, HaloError, LogitElement};

/// f64 reference: (logp, lse) per row, 0 for ignored rows.
fn reference<T: LogitElement>(logits: &[T], labels: &[i32], vocab: usize) -> (Vec<f32>, Vec<f32>) {
    let mut logp = Vec::new();
    let mut lse = Vec::new();
    for (r, &y) in labels.iter().enumerate() {
        if y == IGNORE {
            logp.push(0.0);
            lse.push(0.0);
            continue;
        }
        let row: Vec<f64> = logits[r * vocab..(r + 1) * vocab]
            .iter()
            .map(|x| x.to_f32() as f64)
            .collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        lse.push(l as f32);
        logp.push((row[y as usize] - l).min(0.0) as f32);
    }
    (logp, lse)
}

/// Forward of `rows x vocab` random logits, starting `offset` elements into the buffer (so the
/// base pointer itself can be misaligned), compared with the CPU op and the f64 reference.
fn check_forward<T: EmulatedElement>(
    seed: u64,
    rows: usize,
    vocab: usize,
    offset: usize,
    ignore: f64,
    scale: f32,
) {
    let mut r = rng(seed);
    let buf: Vec<T> = random_logits(&mut r, rows * vocab + offset, scale);
    let logits = &buf[offset..];
    let labels = random_labels(&mut r, rows, vocab, ignore);
    let got = emu::token_logprobs(logits, &labels, vocab, IGNORE).unwrap();
    let cpu = cpu::token_logprobs(logits, &labels, vocab, IGNORE).unwrap();
    let (ref_logp, ref_lse) = reference(logits, &labels, vocab);
    let ctx = format!("{:?} rows {rows} vocab {vocab} offset {offset}", T::DTYPE);
    let tol = 2e-6 * (1.0 + scale);
    assert_close(
        &format!("lse vs f64 ({ctx})"),
        &got.lse,
        &ref_lse,
        tol,
        2e-6,
    );
    assert_close(
        &format!("logp vs f64 ({ctx})"),
        &got.logp,
        &ref_logp,
        tol,
        2e-6,
    );
    assert_close(
        &format!("lse vs cpu ({ctx})"),
        &got.lse,
        &cpu.lse,
        tol,
        2e-6,
    );
    assert_close(
        &format!("logp vs cpu ({ctx})"),
        &got.logp,
        &cpu.logp,
        tol,
        2e-6,
    );
    for (i, &y) in labels.iter().enumerate() {
        if y == IGNORE {
            assert_eq!(
                (got.logp[i], got.lse[i]),
                (0.0, 0.0),
                "ignored row {i} ({ctx})"
            );
        }
        assert!(
            got.logp[i] <= 0.0,
            "logp[{i}] = {} > 0 ({ctx})",
            got.logp[i]
        );
    }
    // Deterministic: a second launch gives the same bits.
    let again = emu::token_logprobs(logits, &labels, vocab, IGNORE).unwrap();
    assert_eq!(
        got.lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        again.lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        "bitwise determinism ({ctx})"
    );
}

fn forward_all_shapes<T: EmulatedElement>(seed: u64) {
    // vocab 1; below / above / not multiples of the vector width; warp- and block-wide rows.
    for (i, &(rows, vocab)) in [
        (1, 1),
        (37, 1),
        (9, 3),
        (33, 7),
        (65, 50),
        (20, 129),
        (17, 1000),
        (6, 4097),
        (3, 9001),
        // row counts that are exact multiples of rows_per_block, over several blocks
        (256, 50),
        (96, 129),
        (24, 1000),
        (4, 4097),
        // every threads-per-row size: 16 (vocab 300), 64 (1500, 2000), 128 (3001, 4000)
        (40, 300),
        (8, 1500),
        (7, 2000),
        (9, 3001),
        (6, 4000),
    ]
    .iter()
    .enumerate()
    {
        for offset in [0, 1, 3] {
            check_forward::<T>(
                seed + i as u64 * 10 + offset as u64,
                rows,
                vocab,
                offset,
                0.2,
                8.0,
            );
        }
    }
}

#[test]
fn forward_f32_awkward_shapes() {
    forward_all_shapes::<f32>(1);
}

#[test]
fn forward_bf16_awkward_shapes() {
    forward_all_shapes::<bf16>(2);
}

#[test]
fn forward_f16_awkward_shapes() {
    forward_all_shapes::<f16>(3);
}

#[test]
fn forward_large_rows_of_128k() {
    check_forward::<bf16>(4, 3, 128 * 1024 + 3, 0, 0.0, 8.0);
    check_forward::<f32>(5, 2, 128 * 1024, 1, 0.0, 8.0);
    check_forward::<f16>(6, 2, 128 * 1000 + 1, 0, 0.0, 8.0);
}

#[test]
fn forward_extreme_logits() {
    check_forward::<f32>(7, 12, 777, 0, 0.1, 1.0e4);
    check_forward::<bf16>(8, 12, 333, 1, 0.1, 1.0e4);
}

#[test]
fn forward_all_ignored_rows_are_not_read() {
    // NaN everywhere: ignored rows must not be read (no error) and must be written as 0.
    let (rows, vocab) = (70, 33);
    let logits = vec![f32::NAN; rows * vocab];
    let labels = vec![IGNORE; rows];
    let got = emu::token_logprobs(&logits, &labels, vocab, IGNORE).unwrap();
    assert!(got.logp.iter().chain(&got.lse).all(|&x| x == 0.0));
}

#[test]
fn forward_writes_into_poisoned_buffers() {
    let mut r = rng(9);
    let (rows, vocab) = (256, 61); // 4 full blocks of 64 rows
    let logits: Vec<bf16> = random_logits(&mut r, rows * vocab, 4.0);
    let labels = random_labels(&mut r, rows, vocab, 0.3);
    let mut logp = vec![f32::NAN; rows];
    let mut lse = vec![f32::NAN; rows];
    emu::token_logprobs_into(&logits, &labels, vocab, IGNORE, &mut logp, &mut lse).unwrap();
    assert!(
        logp.iter().chain(&lse).all(|x| x.is_finite()),
        "an output element was not written"
    );
}

#[test]
fn forward_reports_the_cpu_errors() {
    let mut r = rng(10);
    let (rows, vocab) = (40, 45);
    let logits: Vec<f32> = random_logits(&mut r, rows * vocab, 3.0);
    let mut labels = random_labels(&mut r, rows, vocab, 0.2);
    labels[5] = 3;
    labels[17] = 4;
    labels[30] = IGNORE;

    // A label out of range (two of them, and a negative one): the first row is reported.
    for bad in [vocab as i32, -1, i32::MAX] {
        let mut l = labels.clone();
        l[23] = bad;
        l[31] = vocab as i32 + 7;
        let want = cpu::token_logprobs(&logits, &l, vocab, IGNORE).unwrap_err();
        let got = emu::token_logprobs(&logits, &l, vocab, IGNORE).unwrap_err();
        assert_eq!(got, want);
        assert!(matches!(got, HaloError::LabelOutOfRange { row: 23, .. }));
    }
    // NaN / inf in non-ignored rows 17 and 5: row 5 is reported; in an ignored row: no error.
    for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut z = logits.clone();
        z[17 * vocab + 44] = poison;
        z[5 * vocab] = poison;
        z[30 * vocab + 1] = poison;
        let want = cpu::token_logprobs(&z, &labels, vocab, IGNORE).unwrap_err();
        let got = emu::token_logprobs(&z, &labels, vocab, IGNORE).unwrap_err();
        assert_eq!(got, want);
        assert_eq!(
            got,
            HaloError::NonFinite {
                what: "logits",
                row: 5
            }
        );
        let mut z = logits.clone();
        z[30 * vocab + 1] = poison;
        emu::token_logprobs(&z, &labels, vocab, IGNORE).unwrap();
    }
    // A bad label wins over a NaN in an earlier row (the CPU checks labels first).
    let mut z = logits.clone();
    z[5 * vocab] = f32::NAN;
    let mut l = labels.clone();
    l[20] = -5;
    assert_eq!(
        emu::token_logprobs(&z, &l, vocab, IGNORE).unwrap_err(),
        cpu::token_logprobs(&z, &l, vocab, IGNORE).unwrap_err()
    );
    // Shape errors.
    assert_eq!(
        emu::token_logprobs(&logits[1..], &labels, vocab, IGNORE).unwrap_err(),
        cpu::token_logprobs(&logits[1..], &labels, vocab, IGNORE).unwrap_err()
    );
    assert!(matches!(
        emu::token_logprobs::<f32>(&[], &[], 0, IGNORE),
        Err(HaloError::InvalidShape(_))
    ));
    assert_eq!(
        emu::token_logprobs::<f32>(&[], &[], 5, IGNORE)
            .unwrap()
            .logp
            .len(),
        0
    );
}

/// Tolerance of one element of `T`: the kernel and the CPU may round a value at a rounding
/// boundary to neighbouring representable numbers.
fn dtype_tol<T: LogitElement>() -> (f32, f32) {
    match T::DTYPE {
        halo_kernels::DType::F32 => (1e-7, 2e-5),
        halo_kernels::DType::BF16 => (1e-7, 1.0 / 128.0),
        halo_kernels::DType::F16 => (1e-7, 1.0 / 1024.0),
    }
}

fn check_backward<T: EmulatedElement>(
    seed: u64,
    rows: usize,
    vocab: usize,
    offset: usize,
    ignore: f64,
) {
    check_backward_scaled::<T>(seed, rows, vocab, offset, ignore, 6.0);
}

fn check_backward_scaled<T: EmulatedElement>(
    seed: u64,
    rows: usize,
    vocab: usize,
    offset: usize,
    ignore: f64,
    scale: f32,
) {
    let mut r = rng(seed);
    let buf: Vec<T> = random_logits(&mut r, rows * vocab + offset, scale);
    let logits = &buf[offset..];
    let labels = random_labels(&mut r, rows, vocab, ignore);
    let fwd = cpu::token_logprobs(logits, &labels, vocab, IGNORE).unwrap();
    let grad: Vec<f32> = (0..rows)
        .map(|_| rand::Rng::gen_range(&mut r, -2.0f32..2.0))
        .collect();
    let ctx = format!("{:?} rows {rows} vocab {vocab} offset {offset}", T::DTYPE);
    let (abs, rel) = dtype_tol::<T>();

    let mut want = vec![T::from_f32(0.0); rows * vocab];
    cpu::token_logprobs_backward(logits, &labels, &fwd.lse, &grad, vocab, IGNORE, &mut want)
        .unwrap();

    // Separate output, poisoned, at an output offset that differs from the input's (scalar path)
    // and at the same one (vector path).
    for out_offset in [0usize, 1, offset] {
        let mut out_buf = vec![T::from_f32(f32::NAN); rows * vocab + out_offset];
        let out = &mut out_buf[out_offset..];
        emu::token_logprobs_backward(logits, &labels, &fwd.lse, &grad, vocab, IGNORE, out).unwrap();
        assert_close(
            &format!("grad vs cpu ({ctx}, out offset {out_offset})"),
            &to_f32(out),
            &to_f32(&want),
            abs,
            rel,
        );
    }

    let mut inplace = logits.to_vec();
    emu::token_logprobs_backward_inplace(&mut inplace, &labels, &fwd.lse, &grad, vocab, IGNORE)
        .unwrap();
    assert_close(
        &format!("in-place grad vs cpu ({ctx})"),
        &to_f32(&inplace),
        &to_f32(&want),
        abs,
        rel,
    );

    // f64 reference of the formula, with the f64 softmax.
    for (row, &y) in labels.iter().enumerate() {
        let z: Vec<f64> = logits[row * vocab..(row + 1) * vocab]
            .iter()
            .map(|x| x.to_f32() as f64)
            .collect();
        for v in 0..vocab {
            let want = if y == IGNORE {
                0.0
            } else {
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                grad[row] as f64 * ((v as i32 == y) as i32 as f64 - (z[v] - l).exp())
            };
            let got = inplace[row * vocab + v].to_f32() as f64;
            assert!(
                (got - want).abs() <= 1e-6 + rel as f64 * 2.0 * want.abs(),
                "f64 reference row {row} col {v}: got {got}, want {want} ({ctx})"
            );
            if vocab > 200 && v > 40 {
                break; // spot-check wide rows
            }
        }
    }
}

#[test]
fn backward_all_dtypes_awkward_shapes() {
    for (i, &(rows, vocab)) in [
        (1, 1),
        (13, 1),
        (9, 3),
        (33, 7),
        (65, 50),
        (20, 129),
        (7, 1000),
        (3, 4099),
        (128, 50),
        (16, 1000),
        (33, 300),
        (8, 1500),
        (6, 4000),
    ]
    .iter()
    .enumerate()
    {
        for offset in [0, 1] {
            let seed = 100 + i as u64 * 10 + offset as u64;
            check_backward::<f32>(seed, rows, vocab, offset, 0.25);
            check_backward::<bf16>(seed + 1000, rows, vocab, offset, 0.25);
            check_backward::<f16>(seed + 2000, rows, vocab, offset, 0.25);
        }
    }
}

#[test]
fn backward_extreme_logits() {
    check_backward_scaled::<f32>(310, 9, 301, 0, 0.1, 1.0e4);
    check_backward_scaled::<bf16>(311, 9, 77, 1, 0.1, 1.0e4);
    check_backward_scaled::<f16>(312, 9, 77, 0, 0.1, 6.0e4);
}

#[test]
fn backward_large_rows_and_all_ignored() {
    check_backward::<bf16>(300, 2, 128 * 1024 + 5, 0, 0.0);
    check_backward::<f32>(301, 11, 77, 0, 1.0);
}

#[test]
fn backward_reports_the_cpu_errors() {
    let mut r = rng(11);
    let (rows, vocab) = (30, 21);
    let logits: Vec<f16> = random_logits(&mut r, rows * vocab, 3.0);
    let mut labels = random_labels(&mut r, rows, vocab, 0.0);
    labels[4] = IGNORE;
    let lse = cpu::token_logprobs(&logits, &labels, vocab, IGNORE)
        .unwrap()
        .lse;
    let grad = vec![0.5f32; rows];
    let run = |labels: &[i32], lse: &[f32], grad: &[f32]| {
        let mut out = vec![f16::ZERO; rows * vocab];
        let got = emu::token_logprobs_backward(&logits, labels, lse, grad, vocab, IGNORE, &mut out)
            .unwrap_err();
        let mut z = logits.clone();
        let got_inplace =
            emu::token_logprobs_backward_inplace(&mut z, labels, lse, grad, vocab, IGNORE)
                .unwrap_err();
        let want =
            cpu::token_logprobs_backward(&logits, labels, lse, grad, vocab, IGNORE, &mut out)
                .unwrap_err();
        assert_eq!(got, want);
        assert_eq!(got_inplace, want);
        got
    };
    let mut bad = labels.clone();
    bad[9] = vocab as i32;
    bad[12] = -3;
    assert!(matches!(
        run(&bad, &lse, &grad),
        HaloError::LabelOutOfRange { row: 9, .. }
    ));
    // Ignored rows are not read: a non-finite lse / grad there is no error (as the CPU op).
    let mut l = lse.clone();
    l[4] = f32::NAN;
    l[7] = f32::INFINITY;
    assert_eq!(
        run(&labels, &l, &grad),
        HaloError::NonFinite {
            what: "lse",
            row: 7
        }
    );
    let mut g = grad.clone();
    g[4] = f32::NAN;
    g[25] = f32::NEG_INFINITY;
    assert_eq!(
        run(&labels, &lse, &g),
        HaloError::NonFinite {
            what: "grad_logp",
            row: 25
        }
    );
    let mut only_ignored = lse.clone();
    only_ignored[4] = f32::NAN;
    let mut out = vec![f16::ZERO; rows * vocab];
    emu::token_logprobs_backward(
        &logits,
        &labels,
        &only_ignored,
        &grad,
        vocab,
        IGNORE,
        &mut out,
    )
    .unwrap();
    assert!(
        out[4 * vocab..5 * vocab].iter().all(|x| x.to_f32() == 0.0),
        "ignored row zeroed"
    );
    // lse is checked before grad_logp.
    assert_eq!(
        run(&labels, &l, &g),
        HaloError::NonFinite {
            what: "lse",
            row: 7
        }
    );
}
