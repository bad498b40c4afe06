//! `cpu::token_logprobs_backward` (separate output and in place) against the f64 reference
//! `g · (1[v = y] − softmax(z)[v])`, against finite differences of `Σ_r w_r · logp_r` (f32 path),
//! and its errors.

mod common;

use common::*;
use half::{bf16, f16};
use halo_kernels::cpu::{
    token_logprobs, token_logprobs_backward, token_logprobs_backward_inplace, SavedLse,
};
use halo_kernels::{DType, HaloError, LogitElement, IGNORE_INDEX};
use rand::Rng;

/// Relative error of one stored gradient element from rounding to `T` (half an ulp, with margin).
fn storage_rel(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2f64.powi(-23),
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-10),
    }
}

/// Absolute rounding floor of the storage type (f16 flushes tiny gradients to subnormals).
fn storage_abs(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2f64.powi(-24),
        _ => 1e-36,
    }
}

/// Forward, then both backward variants on the same inputs; checks both against the reference
/// and that they agree bit for bit. Returns the separate-output gradient (for further checks).
fn check_backward<T: LogitElement>(
    values: &[f32],
    labels: &[i32],
    grad_logp: &[f32],
    vocab: usize,
    what: &str,
) -> Vec<T> {
    let what = format!("{what} {:?} vocab {vocab} rows {}", T::DTYPE, labels.len());
    let logits: Vec<T> = to_elements(values);
    let fwd = token_logprobs(&logits, labels, vocab, IGNORE_INDEX).unwrap();

    let mut grad = vec![T::from_f32(f32::NAN); logits.len()];
    token_logprobs_backward(
        &logits,
        labels,
        fwd.saved_lse(),
        grad_logp,
        vocab,
        IGNORE_INDEX,
        &mut grad,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut inplace = logits.clone();
    token_logprobs_backward_inplace(
        &mut inplace,
        labels,
        fwd.saved_lse(),
        grad_logp,
        vocab,
        IGNORE_INDEX,
    )
    .unwrap_or_else(|e| panic!("{what} in place: {e}"));
    assert!(
        bytemuck::cast_slice::<T, u8>(&grad) == bytemuck::cast_slice::<T, u8>(&inplace),
        "{what}: in-place gradient differs from the separate one"
    );

    let z = to_f64(&logits);
    let want = ref_backward(&z, labels, &f32s_to_f64(grad_logp), vocab, IGNORE_INDEX);
    let got = to_f64(&grad);
    for (r, &y) in labels.iter().enumerate() {
        let row = r * vocab..(r + 1) * vocab;
        if y == IGNORE_INDEX {
            assert!(
                got[row].iter().all(|&d| d == 0.0),
                "{what}: ignored row {r} not zero"
            );
            continue;
        }
        let g = grad_logp[r].abs() as f64;
        // softmax is recomputed as exp(z − lse) with lse stored in f32: its rounding (half an ulp
        // of |lse|, ≈5e-4 at 1e4) is a relative error on every probability; 2e-5 covers fast_exp
        // and the f32 logsumexp accumulation.
        let rel_p = 2e-5 + ref_logsumexp(&z[row.clone()]).abs() * 2f64.powi(-23);
        let rel = rel_p + storage_rel(T::DTYPE);
        for v in 0..vocab {
            let (gv, wv) = (got[r * vocab + v], want[r * vocab + v]);
            // At the label, g·(1 − p_y) cancels when p_y ≈ 1: the error is absolute, ~ g·rel_p.
            let label_abs = if v == y as usize {
                g * (rel_p + 2f64.powi(-22))
            } else {
                0.0
            };
            let tol = rel * wv.abs() + label_abs + storage_abs(T::DTYPE);
            assert!(
                (gv - wv).abs() <= tol,
                "{what}: row {r} v {v} (label {y}): got {gv}, want {wv}, tol {tol}"
            );
        }
    }
    grad
}

fn check_all_dtypes(values: &[f32], labels: &[i32], grad_logp: &[f32], vocab: usize, what: &str) {
    check_backward::<f32>(values, labels, grad_logp, vocab, what);
    check_backward::<bf16>(values, labels, grad_logp, vocab, what);
    check_backward::<f16>(values, labels, grad_logp, vocab, what);
}

#[test]
fn matches_reference_at_awkward_vocab_sizes() {
    let mut rng = rng(101);
    for vocab in [1, 2, 7, 31, 33, 1000, 50257] {
        for rows in [1, 3, 64] {
            if vocab == 50257 && rows == 64 {
                continue; // the 3-row case covers this vocab; keeps the suite fast
            }
            let values = random_logits(rows, vocab, 3.0, &mut rng);
            let labels = random_labels(rows, vocab, 0.25, IGNORE_INDEX, &mut rng);
            let grad_logp = random_values(rows, -2.0, 2.0, &mut rng);
            check_all_dtypes(&values, &labels, &grad_logp, vocab, "random");
        }
    }
}

#[test]
fn matches_reference_on_128k_rows() {
    let mut rng = rng(102);
    let (rows, vocab) = (2, 128_256);
    let values = random_logits(rows, vocab, 4.0, &mut rng);
    let labels = [vocab as i32 - 1, 4242];
    let grad_logp = [0.75f32, -1.5];
    check_all_dtypes(&values, &labels, &grad_logp, vocab, "128k");
}

#[test]
fn extreme_logits() {
    let mut rng = rng(103);
    let (rows, vocab) = (6, 1000);
    let mut values: Vec<f32> = (0..rows * vocab)
        .map(|_| if rng.gen_bool(0.5) { 1e4 } else { -1e4 })
        .collect();
    // Rows 4 and 5: one dominating entry, the label on it (p_y ≈ 1, gradient ≈ 0) or not.
    for r in 4..6 {
        for v in 0..vocab {
            values[r * vocab + v] = rng.gen_range(-1.0..1.0);
        }
        values[r * vocab + 17] = 1e4;
    }
    let mut labels = random_labels(rows, vocab, 0.0, IGNORE_INDEX, &mut rng);
    labels[4] = 17;
    labels[5] = 18;
    let grad_logp = random_values(rows, -1.0, 1.0, &mut rng);
    check_all_dtypes(&values, &labels, &grad_logp, vocab, "extreme");
}

#[test]
fn ignored_rows_get_zero_gradient_and_are_not_read() {
    let mut rng = rng(104);
    let (rows, vocab) = (4, 33);
    let mut values = random_logits(rows, vocab, 2.0, &mut rng);
    let labels = [5, IGNORE_INDEX, 0, IGNORE_INDEX];
    values[vocab + 2] = f32::NAN; // garbage in ignored rows is never read
    values[3 * vocab + 32] = f32::INFINITY;
    let grad = check_backward::<f32>(&values, &labels, &[1.0, 1.0, -0.5, 1.0], vocab, "ignored");
    assert!(grad[vocab..2 * vocab].iter().all(|&d| d == 0.0));
    // lse / grad_logp of ignored rows are not read either.
    let fwd = token_logprobs(&values, &labels, vocab, IGNORE_INDEX).unwrap();
    let mut lse = fwd.lse.clone();
    lse[1] = f32::NAN;
    let grad_logp = [1.0, f32::INFINITY, -0.5, f32::NAN];
    let mut again = vec![0.0f32; values.len()];
    token_logprobs_backward(
        &values,
        &labels,
        SavedLse::new(&lse, &fwd.lse_residual),
        &grad_logp,
        vocab,
        IGNORE_INDEX,
        &mut again,
    )
    .unwrap();
    assert_eq!(grad, again);
}

#[test]
fn all_rows_ignored_gives_all_zeros() {
    let mut rng = rng(105);
    let (rows, vocab) = (3, 7);
    let values = random_logits(rows, vocab, 2.0, &mut rng);
    let labels = vec![IGNORE_INDEX; rows];
    for grad in [
        check_backward::<f32>(&values, &labels, &[1.0; 3], vocab, "all ignored"),
        check_backward::<bf16>(&values, &labels, &[1.0; 3], vocab, "all ignored")
            .iter()
            .map(|x| x.to_f32())
            .collect(),
    ] {
        assert!(grad.iter().all(|&d| d == 0.0));
    }
}

/// `L(z) = Σ_r w_r · logp_r(z)` in f64, from the reference forward.
fn weighted_logp(z: &[f64], labels: &[i32], weights: &[f64], vocab: usize) -> f64 {
    let (logp, _) = ref_token_logprobs(z, labels, vocab, IGNORE_INDEX);
    logp.iter().zip(weights).map(|(l, w)| l * w).sum()
}

#[test]
fn f32_gradient_matches_finite_differences() {
    let mut rng = rng(106);
    for (rows, vocab) in [(3, 7), (4, 33), (2, 1)] {
        let values = random_logits(rows, vocab, 2.0, &mut rng);
        let mut labels = random_labels(rows, vocab, 0.0, IGNORE_INDEX, &mut rng);
        labels[1] = IGNORE_INDEX;
        let weights = random_values(rows, -2.0, 2.0, &mut rng);
        let w64 = f32s_to_f64(&weights);

        let fwd = token_logprobs(&values, &labels, vocab, IGNORE_INDEX).unwrap();
        let mut grad = vec![0.0f32; values.len()];
        token_logprobs_backward(
            &values,
            &labels,
            fwd.saved_lse(),
            &weights,
            vocab,
            IGNORE_INDEX,
            &mut grad,
        )
        .unwrap();
        let analytic = ref_backward(&f32s_to_f64(&values), &labels, &w64, vocab, IGNORE_INDEX);

        // Central differences in f64 at the f32 point: truncation O(h²) ≈ 1e-12, rounding
        // ≈ 1e-16 / h.
        let h = 1e-5;
        let mut z = f32s_to_f64(&values);
        for i in 0..z.len() {
            let z0 = z[i];
            z[i] = z0 + h;
            let up = weighted_logp(&z, &labels, &w64, vocab);
            z[i] = z0 - h;
            let down = weighted_logp(&z, &labels, &w64, vocab);
            z[i] = z0;
            let fd = (up - down) / (2.0 * h);
            // The reference itself must agree with finite differences...
            assert!(
                (analytic[i] - fd).abs() <= 1e-8,
                "reference vs FD at {i}: {} vs {fd}",
                analytic[i]
            );
            // ...and so must the f32 implementation, to f32 accuracy.
            let got = grad[i] as f64;
            assert!(
                (got - fd).abs() <= 1e-5 * fd.abs() + 1e-6,
                "rows {rows} vocab {vocab} element {i}: got {got}, finite difference {fd}"
            );
        }
    }
}

#[test]
fn zero_upstream_gradient_gives_zero_rows() {
    let mut rng = rng(107);
    let (rows, vocab) = (2, 31);
    let values = random_logits(rows, vocab, 2.0, &mut rng);
    let grad = check_backward::<f32>(&values, &[3, 4], &[0.0, 1.0], vocab, "g = 0");
    assert!(grad[..vocab].iter().all(|&d| d == 0.0));
    assert!(grad[vocab..].iter().any(|&d| d != 0.0));
}

// ---- errors ----

#[test]
fn shape_and_length_errors() {
    let logits = [0.5f32; 6];
    let labels = [0, 1];
    let (lse, g) = ([1.0f32; 2], [1.0f32; 2]);
    let mut out = [0.0f32; 6];
    let err = token_logprobs_backward(
        &logits,
        &labels,
        SavedLse::bare(&lse[..1]),
        &g,
        3,
        IGNORE_INDEX,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::LengthMismatch {
            what: "lse",
            expected: 2,
            got: 1
        }
    );
    let err = token_logprobs_backward(
        &logits,
        &labels,
        SavedLse::bare(&lse),
        &[1.0; 3],
        3,
        IGNORE_INDEX,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::LengthMismatch {
            what: "grad_logp",
            expected: 2,
            got: 3
        }
    );
    let err = token_logprobs_backward(
        &logits,
        &labels,
        SavedLse::bare(&lse),
        &g,
        3,
        IGNORE_INDEX,
        &mut out[..5],
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::LengthMismatch {
            what: "grad_logits",
            expected: 6,
            got: 5
        }
    );
    let err = token_logprobs_backward(
        &logits[..5],
        &labels,
        SavedLse::bare(&lse),
        &g,
        3,
        IGNORE_INDEX,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::LengthMismatch {
            what: "logits",
            expected: 6,
            got: 5
        }
    );
    let mut inplace = logits;
    let err = token_logprobs_backward_inplace(
        &mut inplace,
        &labels,
        SavedLse::bare(&lse),
        &g,
        0,
        IGNORE_INDEX,
    )
    .unwrap_err();
    assert!(matches!(err, HaloError::InvalidShape(_)), "{err:?}");
    let err = token_logprobs_backward_inplace(
        &mut inplace,
        &[0, 3],
        SavedLse::bare(&lse),
        &g,
        3,
        IGNORE_INDEX,
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::LabelOutOfRange {
            row: 1,
            label: 3,
            vocab: 3,
            ignore_index: IGNORE_INDEX as i64
        }
    );
    assert_eq!(
        inplace, logits,
        "a failed call must leave the logits untouched"
    );
}

#[test]
fn non_finite_lse_or_upstream_gradient_in_a_counted_row_is_an_error() {
    let logits = [0.5f32; 6];
    let mut out = [0.0f32; 6];
    let err = token_logprobs_backward(
        &logits,
        &[0, 1],
        SavedLse::bare(&[1.0, f32::NAN]),
        &[1.0; 2],
        3,
        IGNORE_INDEX,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::NonFinite {
            what: "lse",
            row: 1
        }
    );
    let mut inplace = logits;
    let err = token_logprobs_backward_inplace(
        &mut inplace,
        &[0, 1],
        SavedLse::bare(&[1.0; 2]),
        &[f32::NEG_INFINITY, 1.0],
        3,
        IGNORE_INDEX,
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::NonFinite {
            what: "grad_logp",
            row: 0
        }
    );
}
