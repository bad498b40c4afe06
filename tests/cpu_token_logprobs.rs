//! `cpu::token_logprobs` against the f64 reference in `common`, for f32, bf16 and f16 logits, at
//! awkward vocab sizes, with ignored rows and extreme logits; and every documented error.

mod common;

use common::*;
use half::{bf16, f16};
use halo_kernels::cpu::{token_logprobs, token_logprobs_into};
use halo_kernels::{HaloError, LogitElement, IGNORE_INDEX};

/// Relative tolerance on |logp| and lse (f32 accumulation over up to 128k entries).
const REL: f64 = 1e-5;
/// Absolute floor for log-probs near 0 (a dominating entry): a few f32 ulps of `ln Σ ≈ 0`.
const ABS: f64 = 1e-6;

/// Runs the op on `values` rounded to `T` and checks it against the reference on the rounded values.
fn check_against_reference<T: LogitElement>(
    values: &[f32],
    labels: &[i32],
    vocab: usize,
    what: &str,
) {
    let logits: Vec<T> = to_elements(values);
    let got = token_logprobs(&logits, labels, vocab, IGNORE_INDEX)
        .unwrap_or_else(|e| panic!("{what} {:?}: {e}", T::DTYPE));
    let (want_logp, want_lse) = ref_token_logprobs(&to_f64(&logits), labels, vocab, IGNORE_INDEX);
    let what = format!("{what} {:?} vocab {vocab} rows {}", T::DTYPE, labels.len());
    assert_close(
        &format!("{what} logp"),
        &f32s_to_f64(&got.logp),
        &want_logp,
        REL,
        ABS,
    );
    assert_close(
        &format!("{what} lse"),
        &f32s_to_f64(&got.lse),
        &want_lse,
        REL,
        ABS,
    );
    for (r, &y) in labels.iter().enumerate() {
        if y == IGNORE_INDEX {
            assert_eq!(
                (got.logp[r], got.lse[r]),
                (0.0, 0.0),
                "{what}: ignored row {r} not zero"
            );
        } else {
            assert!(
                got.logp[r] <= 0.0,
                "{what}: logp[{r}] = {} > 0",
                got.logp[r]
            );
        }
    }
}

fn check_all_dtypes(values: &[f32], labels: &[i32], vocab: usize, what: &str) {
    check_against_reference::<f32>(values, labels, vocab, what);
    check_against_reference::<bf16>(values, labels, vocab, what);
    check_against_reference::<f16>(values, labels, vocab, what);
}

#[test]
fn matches_reference_at_awkward_vocab_sizes() {
    let mut rng = rng(1);
    for vocab in [1, 2, 7, 31, 33, 1000, 50257] {
        for rows in [1, 3, 64] {
            let values = random_logits(rows, vocab, 3.0, &mut rng);
            let labels = random_labels(rows, vocab, 0.25, IGNORE_INDEX, &mut rng);
            check_all_dtypes(&values, &labels, vocab, "random");
        }
    }
}

#[test]
fn matches_reference_on_128k_rows() {
    let mut rng = rng(2);
    let (rows, vocab) = (3, 128_256);
    let values = random_logits(rows, vocab, 4.0, &mut rng);
    // Labels at both ends of the vocabulary and in the middle.
    let labels = [0, vocab as i32 - 1, 77_777];
    check_all_dtypes(&values, &labels, vocab, "128k");
}

#[test]
fn vocab_of_one_gives_zero_logp_and_the_logit_as_lse() {
    let values = [3.5f32, -1.25, 1e4];
    let got = token_logprobs(&values, &[0, 0, 0], 1, IGNORE_INDEX).unwrap();
    assert_eq!(got.logp, vec![0.0; 3]);
    assert_eq!(got.lse, values.to_vec());
}

#[test]
fn all_ignored_rows_are_zero_and_not_read() {
    let mut rng = rng(3);
    let (rows, vocab) = (5, 33);
    let mut values = random_logits(rows, vocab, 2.0, &mut rng);
    values[7] = f32::NAN;
    values[40] = f32::INFINITY;
    values[100] = f32::NEG_INFINITY;
    let labels = vec![IGNORE_INDEX; rows];
    let got = token_logprobs(&values, &labels, vocab, IGNORE_INDEX).unwrap();
    assert_eq!(got.logp, vec![0.0; rows]);
    assert_eq!(got.lse, vec![0.0; rows]);
}

#[test]
fn mixed_ignored_rows_with_garbage_only_in_ignored_rows() {
    let mut rng = rng(4);
    let (rows, vocab) = (6, 31);
    let mut values = random_logits(rows, vocab, 2.0, &mut rng);
    let mut labels = random_labels(rows, vocab, 0.0, IGNORE_INDEX, &mut rng);
    labels[1] = IGNORE_INDEX;
    labels[4] = IGNORE_INDEX;
    // NaN in an ignored row is not an error: ignored rows are never read.
    values[vocab + 3] = f32::NAN;
    values[4 * vocab] = f32::INFINITY;
    let got = token_logprobs(&values, &labels, vocab, IGNORE_INDEX).unwrap();
    // Reference on the same rows with the garbage replaced (it is not read either way).
    let mut clean = values.clone();
    clean[vocab + 3] = 1.0;
    clean[4 * vocab] = 1.0;
    let (want_logp, want_lse) =
        ref_token_logprobs(&f32s_to_f64(&clean), &labels, vocab, IGNORE_INDEX);
    assert_close("mixed logp", &f32s_to_f64(&got.logp), &want_logp, REL, ABS);
    assert_close("mixed lse", &f32s_to_f64(&got.lse), &want_lse, REL, ABS);
}

#[test]
fn extreme_logits_of_plus_minus_1e4() {
    let mut rng = rng(5);
    let (rows, vocab) = (8, 1000);
    let values: Vec<f32> = (0..rows * vocab)
        .map(|_| {
            if rand::Rng::gen_bool(&mut rng, 0.5) {
                1e4
            } else {
                -1e4
            }
        })
        .collect();
    let labels = random_labels(rows, vocab, 0.0, IGNORE_INDEX, &mut rng);
    check_all_dtypes(&values, &labels, vocab, "±1e4");
}

#[test]
fn one_huge_entry_dominating_the_row() {
    let mut rng = rng(6);
    for vocab in [2, 33, 1000, 128_256] {
        let rows = 4;
        let mut values = random_logits(rows, vocab, 1.0, &mut rng);
        let mut labels = Vec::new();
        for r in 0..rows {
            let hot = (r * 7919 + 13) % vocab;
            values[r * vocab + hot] = 1e4;
            // Even rows: the label is the dominating entry (logp ≈ 0); odd rows: another entry
            // (logp ≈ −1e4, which must keep its small part, not round to ulp(1e4)).
            labels.push(if r % 2 == 0 { hot } else { (hot + 1) % vocab } as i32);
        }
        check_all_dtypes(&values, &labels, vocab, "dominating");
    }
}

#[test]
fn large_logits_do_not_swamp_a_small_logprob() {
    // Two entries near 1e4 one apart: logp of the smaller is −ln(1 + e) ≈ −1.3133, and an
    // implementation computing `z[y] − lse` in f32 is off by up to ulp(1e4)/2 ≈ 5e-4 here.
    let values = [1e4f32, 1e4 - 1.0, -3.0];
    let got = token_logprobs(&values, &[1], 3, IGNORE_INDEX).unwrap();
    let (want, _) = ref_token_logprobs(&f32s_to_f64(&values), &[1], 3, IGNORE_INDEX);
    assert_close("near-1e4 logp", &[got.logp[0] as f64], &want, REL, ABS);
}

#[test]
fn into_variant_matches_and_is_deterministic() {
    let mut rng = rng(7);
    let (rows, vocab) = (64, 1000);
    let values = random_logits(rows, vocab, 3.0, &mut rng);
    let labels = random_labels(rows, vocab, 0.3, IGNORE_INDEX, &mut rng);
    let first = token_logprobs(&values, &labels, vocab, IGNORE_INDEX).unwrap();
    let mut logp = vec![f32::NAN; rows];
    let mut lse = vec![f32::NAN; rows];
    let mut residual = vec![f32::NAN; rows];
    token_logprobs_into(
        &values,
        &labels,
        vocab,
        IGNORE_INDEX,
        &mut logp,
        &mut lse,
        &mut residual,
    )
    .unwrap();
    assert_eq!(first.logp, logp);
    assert_eq!(first.lse, lse);
    assert_eq!(first.lse_residual, residual);
    let again = token_logprobs(&values, &labels, vocab, IGNORE_INDEX).unwrap();
    assert_eq!(
        first, again,
        "two runs differ (reduction order must not depend on threads)"
    );
}

#[test]
fn custom_ignore_index() {
    let mut rng = rng(8);
    let (rows, vocab) = (4, 7);
    let values = random_logits(rows, vocab, 2.0, &mut rng);
    let labels = [3, -1, 0, -1];
    let got = token_logprobs(&values, &labels, vocab, -1).unwrap();
    let (want_logp, want_lse) = ref_token_logprobs(&f32s_to_f64(&values), &labels, vocab, -1);
    assert_close(
        "ignore -1 logp",
        &f32s_to_f64(&got.logp),
        &want_logp,
        REL,
        ABS,
    );
    assert_close("ignore -1 lse", &f32s_to_f64(&got.lse), &want_lse, REL, ABS);
    assert_eq!((got.logp[1], got.lse[3]), (0.0, 0.0));
    // With ignore index −1, the usual −100 is just an out-of-range label.
    let err = token_logprobs(&values, &[3, -100, 0, 1], vocab, -1).unwrap_err();
    assert_eq!(
        err,
        HaloError::LabelOutOfRange {
            row: 1,
            label: -100,
            vocab,
            ignore_index: -1
        }
    );
}

#[test]
fn empty_batch_is_fine() {
    let got = token_logprobs::<f32>(&[], &[], 5, IGNORE_INDEX).unwrap();
    assert!(got.logp.is_empty() && got.lse.is_empty() && got.lse_residual.is_empty());
}

// ---- errors ----

#[test]
fn length_mismatch_is_an_error() {
    let err = token_logprobs(&[0.5f32; 10], &[0, 1, 2], 3, IGNORE_INDEX).unwrap_err();
    assert_eq!(
        err,
        HaloError::LengthMismatch {
            what: "logits",
            expected: 9,
            got: 10
        }
    );
    let (mut logp, mut lse) = (vec![0.0; 3], vec![0.0; 2]);
    let err = token_logprobs_into(
        &[0.5f32; 9],
        &[0, 1, 2],
        3,
        IGNORE_INDEX,
        &mut logp,
        &mut lse,
        &mut [0.0; 3],
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::LengthMismatch {
            what: "lse",
            expected: 3,
            got: 2
        }
    );
    let (mut logp, mut lse) = (vec![0.0; 4], vec![0.0; 3]);
    let err = token_logprobs_into(
        &[0.5f32; 9],
        &[0, 1, 2],
        3,
        IGNORE_INDEX,
        &mut logp,
        &mut lse,
        &mut [0.0; 3],
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::LengthMismatch {
            what: "logp",
            expected: 3,
            got: 4
        }
    );
    let (mut logp, mut lse) = (vec![0.0; 3], vec![0.0; 3]);
    let err = token_logprobs_into(
        &[0.5f32; 9],
        &[0, 1, 2],
        3,
        IGNORE_INDEX,
        &mut logp,
        &mut lse,
        &mut [0.0; 2],
    )
    .unwrap_err();
    assert_eq!(
        err,
        HaloError::LengthMismatch {
            what: "lse_residual",
            expected: 3,
            got: 2
        }
    );
}

#[test]
fn vocab_zero_is_an_error() {
    let err = token_logprobs::<f32>(&[], &[0], 0, IGNORE_INDEX).unwrap_err();
    assert!(matches!(err, HaloError::InvalidShape(_)), "{err:?}");
}

#[test]
fn overflowing_shape_is_an_error_not_a_silent_empty_result() {
    // rows · vocab wraps to 0 in usize: must not be taken as "0 logits expected".
    let vocab = usize::MAX / 2 + 1;
    let err = token_logprobs::<f32>(&[], &[0, 0], vocab, IGNORE_INDEX).unwrap_err();
    assert!(matches!(err, HaloError::InvalidShape(_)), "{err:?}");
}

#[test]
fn label_equal_to_vocab_is_an_error() {
    let err = token_logprobs(&[0.5f32; 14], &[1, 7], 7, IGNORE_INDEX).unwrap_err();
    assert_eq!(
        err,
        HaloError::LabelOutOfRange {
            row: 1,
            label: 7,
            vocab: 7,
            ignore_index: IGNORE_INDEX as i64
        }
    );
}

#[test]
fn negative_label_that_is_not_the_ignore_index_is_an_error() {
    let err = token_logprobs(&[0.5f32; 14], &[-1, 2], 7, IGNORE_INDEX).unwrap_err();
    assert_eq!(
        err,
        HaloError::LabelOutOfRange {
            row: 0,
            label: -1,
            vocab: 7,
            ignore_index: IGNORE_INDEX as i64
        }
    );
}

fn non_finite_in_row<T: LogitElement>(bad: f32) {
    let mut rng = rng(9);
    let (rows, vocab) = (5, 1000);
    let mut values = random_logits(rows, vocab, 2.0, &mut rng);
    let labels = random_labels(rows, vocab, 0.0, IGNORE_INDEX, &mut rng);
    values[3 * vocab + 517] = bad; // first bad row is 3...
    values[4 * vocab + 999] = bad; // ...row 4 too; the error names the first
    let logits: Vec<T> = to_elements(&values);
    let err = token_logprobs(&logits, &labels, vocab, IGNORE_INDEX).unwrap_err();
    assert_eq!(
        err,
        HaloError::NonFinite {
            what: "logits",
            row: 3
        },
        "{:?} {bad}",
        T::DTYPE
    );
}

#[test]
fn nan_and_infinities_in_a_counted_row_are_errors_naming_the_row() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        non_finite_in_row::<f32>(bad);
        non_finite_in_row::<bf16>(bad);
        non_finite_in_row::<f16>(bad);
    }
    // The last element of an odd-length row (the scalar remainder path) is checked too.
    let mut values = vec![1.0f32; 2 * 33];
    values[2 * 33 - 1] = f32::NAN;
    let err = token_logprobs(&values, &[0, 5], 33, IGNORE_INDEX).unwrap_err();
    assert_eq!(
        err,
        HaloError::NonFinite {
            what: "logits",
            row: 1
        }
    );
    // A row of only −inf has no finite logsumexp.
    let err = token_logprobs(&[f32::NEG_INFINITY; 3], &[1], 3, IGNORE_INDEX).unwrap_err();
    assert_eq!(
        err,
        HaloError::NonFinite {
            what: "logits",
            row: 0
        }
    );
}

#[test]
fn f16_overflowing_input_is_reported_as_non_finite() {
    // 1e5 does not fit f16 and rounds to +inf on storage: the op must refuse it, not return NaN.
    let logits: Vec<f16> = to_elements(&[1.0, 1e5, 2.0]);
    let err = token_logprobs(&logits, &[0], 3, IGNORE_INDEX).unwrap_err();
    assert_eq!(
        err,
        HaloError::NonFinite {
            what: "logits",
            row: 0
        }
    );
}
