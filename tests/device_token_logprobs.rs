//! The token log-prob ops — forward (`logp`, `lse`) and backward (`∂L/∂logits`, separate output
//! and in place) — on every device (CPU; CUDA, real or emulated), against f64 references computed
//! here from the definitions (log-softmax; `g · (1[v = y] − softmax_v)`), at awkward sizes, at
//! misaligned offsets, with extreme logits, and in all three dtypes; and the errors, which must be
//! the same `HaloError` on every device.

mod device_support;

use device_support::*;
use half::{bf16, f16};
use halo_kernels::cpu::{SavedLse, TokenLogprobs};
use halo_kernels::cuda::{CudaBackend, CudaLogit};
use halo_kernels::{DType, HaloError, LogitElement, Result};
use rand::Rng;

// ---- the ops on sub-slices of larger buffers ---------------------------------------------------

/// The ops on `buf[offset..]` (and `out[out_offset..]`). The [`Device`] methods upload a host
/// sub-slice into a fresh allocation, so on CUDA the kernels would only ever see well-aligned base
/// pointers; here the CUDA device uploads the whole buffer and runs on a view `offset` elements
/// into it, so the kernels see base pointers aligned to the element size only (odd offsets of
/// 2-byte elements are 2 mod 4 bytes). The CPU runs on the host sub-slices.
trait Offsets: Device {
    fn token_logprobs_at<T: CudaLogit>(
        &self,
        buf: &[T],
        offset: usize,
        labels: &[i32],
        vocab: usize,
    ) -> Result<TokenLogprobs>;

    /// Writes `out[out_offset..]`; the rest of `out` must be left as it was.
    #[allow(clippy::too_many_arguments)]
    fn backward_at<T: CudaLogit>(
        &self,
        buf: &[T],
        offset: usize,
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
        out: &mut [T],
        out_offset: usize,
    ) -> Result<()>;

    /// Overwrites `buf[offset..]` with the gradient; `buf[..offset]` must be left as it was.
    fn backward_inplace_at<T: CudaLogit>(
        &self,
        buf: &mut [T],
        offset: usize,
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
    ) -> Result<()>;
}

impl Offsets for Cpu {
    fn token_logprobs_at<T: CudaLogit>(
        &self,
        buf: &[T],
        offset: usize,
        labels: &[i32],
        vocab: usize,
    ) -> Result<TokenLogprobs> {
        self.token_logprobs(&buf[offset..], labels, vocab, IGNORE)
    }

    fn backward_at<T: CudaLogit>(
        &self,
        buf: &[T],
        offset: usize,
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
        out: &mut [T],
        out_offset: usize,
    ) -> Result<()> {
        self.token_logprobs_backward(
            &buf[offset..],
            labels,
            saved,
            grad_logp,
            vocab,
            IGNORE,
            &mut out[out_offset..],
        )
    }

    fn backward_inplace_at<T: CudaLogit>(
        &self,
        buf: &mut [T],
        offset: usize,
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
    ) -> Result<()> {
        self.token_logprobs_backward_inplace(
            &mut buf[offset..],
            labels,
            saved,
            grad_logp,
            vocab,
            IGNORE,
        )
    }
}

impl Offsets for CudaBackend {
    fn token_logprobs_at<T: CudaLogit>(
        &self,
        buf: &[T],
        offset: usize,
        labels: &[i32],
        vocab: usize,
    ) -> Result<TokenLogprobs> {
        let d_buf = self.htod(buf)?;
        // Fresh outputs: on the emulated device they start as NaN bytes.
        let out = CudaBackend::token_logprobs(
            self,
            &d_buf.slice(offset..),
            &self.htod(labels)?,
            vocab,
            IGNORE,
        )?;
        Ok(TokenLogprobs {
            logp: self.dtoh(&out.logp)?,
            lse: self.dtoh(&out.lse)?,
            lse_residual: self.dtoh(&out.lse_residual)?,
        })
    }

    fn backward_at<T: CudaLogit>(
        &self,
        buf: &[T],
        offset: usize,
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
        out: &mut [T],
        out_offset: usize,
    ) -> Result<()> {
        let d_buf = self.htod(buf)?;
        let mut d_out = self.htod(out)?;
        CudaBackend::token_logprobs_backward(
            self,
            &d_buf.slice(offset..),
            &self.htod(labels)?,
            upload_saved(self, saved)?.as_saved(),
            &self.htod(grad_logp)?,
            vocab,
            IGNORE,
            &mut d_out.slice_mut(out_offset..),
        )?;
        out.copy_from_slice(&self.dtoh(&d_out)?);
        Ok(())
    }

    fn backward_inplace_at<T: CudaLogit>(
        &self,
        buf: &mut [T],
        offset: usize,
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
    ) -> Result<()> {
        let mut d_buf = self.htod(buf)?;
        CudaBackend::token_logprobs_backward_inplace(
            self,
            &mut d_buf.slice_mut(offset..),
            &self.htod(labels)?,
            upload_saved(self, saved)?.as_saved(),
            &self.htod(grad_logp)?,
            vocab,
            IGNORE,
        )?;
        buf.copy_from_slice(&self.dtoh(&d_buf)?);
        Ok(())
    }
}

// ---- f64 references --------------------------------------------------------------------------

/// log-softmax of one row in f64: (logsumexp, the row as f64).
fn row_lse<T: LogitElement>(row: &[T]) -> (f64, Vec<f64>) {
    let z: Vec<f64> = row.iter().map(|x| x.to_f32() as f64).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let l = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    (l, z)
}

/// f64 forward: (logp, lse) per row, 0 for ignored rows.
fn reference_forward<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut logp = Vec::with_capacity(labels.len());
    let mut lse = Vec::with_capacity(labels.len());
    for (r, &y) in labels.iter().enumerate() {
        if y == IGNORE {
            logp.push(0.0);
            lse.push(0.0);
            continue;
        }
        let (l, z) = row_lse(&logits[r * vocab..(r + 1) * vocab]);
        lse.push(l);
        logp.push((z[y as usize] - l).min(0.0));
    }
    (logp, lse)
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_all_finite(what: &str, v: &[f32]) {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        panic!("{what}[{i}] = {} (an output element was not written)", v[i]);
    }
}

// ---- forward -----------------------------------------------------------------------------------

/// Forward of `rows x vocab` random logits in [-scale, scale], starting `offset` elements into the
/// buffer, against the f64 reference; ignored rows must be exactly 0, every output finite, every
/// logp ≤ 0, and a second launch must give the same bits.
fn check_forward<T: CudaLogit, D: Offsets>(
    d: &D,
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
    let got = d.token_logprobs_at(&buf, offset, &labels, vocab).unwrap();
    let (ref_logp, ref_lse) = reference_forward(logits, &labels, vocab);
    let ctx = format!(
        "{}: {:?} rows {rows} vocab {vocab} offset {offset} scale {scale}",
        d.name(),
        T::DTYPE
    );
    assert_all_finite(&format!("lse ({ctx})"), &got.lse);
    assert_all_finite(&format!("logp ({ctx})"), &got.logp);
    // f32 accumulation of an exact (f64) function of the stored logits: a few f32 ulps of the
    // logits' magnitude.
    let tol = 2e-6 * (1.0 + scale);
    let lse_ctx = format!("lse vs f64 ({ctx})");
    assert_close(&lse_ctx, &got.lse, &f32s(&ref_lse), tol, 2e-6);
    let logp_ctx = format!("logp vs f64 ({ctx})");
    assert_close(&logp_ctx, &got.logp, &f32s(&ref_logp), tol, 2e-6);
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
    let again = d.token_logprobs_at(&buf, offset, &labels, vocab).unwrap();
    assert_eq!(
        bits(&got.lse),
        bits(&again.lse),
        "lse bitwise determinism ({ctx})"
    );
    assert_eq!(
        bits(&got.logp),
        bits(&again.logp),
        "logp bitwise determinism ({ctx})"
    );
}

fn forward_all_shapes<T: CudaLogit, D: Offsets>(d: &D, seed: u64) {
    // vocab 1; below / above / not multiples of the vector width; warp- and block-wide rows.
    for (i, &(rows, vocab)) in [
        (1, 1),
        (37, 1),
        (9, 3),
        (33, 7),
        (65, 50),
        (20, 129),
        (1, 1000),
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
            let seed = seed + i as u64 * 10 + offset as u64;
            check_forward::<T, D>(d, seed, rows, vocab, offset, 0.2, 8.0);
        }
    }
}

fn forward_f32_awkward_shapes<D: Offsets>(d: &D) {
    forward_all_shapes::<f32, D>(d, 1);
}

fn forward_bf16_awkward_shapes<D: Offsets>(d: &D) {
    forward_all_shapes::<bf16, D>(d, 2);
}

fn forward_f16_awkward_shapes<D: Offsets>(d: &D) {
    forward_all_shapes::<f16, D>(d, 3);
}

fn forward_large_rows_of_128k<D: Offsets>(d: &D) {
    check_forward::<bf16, D>(d, 4, 3, 128 * 1024 + 3, 0, 0.0, 8.0);
    check_forward::<f32, D>(d, 5, 2, 128 * 1024, 1, 0.0, 8.0);
    check_forward::<f16, D>(d, 6, 2, 128 * 1000 + 1, 0, 0.0, 8.0);
}

fn forward_extreme_logits<D: Offsets>(d: &D) {
    check_forward::<f32, D>(d, 7, 12, 777, 0, 0.1, 1.0e4);
    check_forward::<bf16, D>(d, 8, 12, 333, 1, 0.1, 1.0e4);
    check_forward::<f16, D>(d, 9, 12, 333, 3, 0.1, 6.0e4);
}

/// Huge logits (`centre` ± 15%: past 2^24, where the kernels' one-FFMA exponent would overflow and
/// they take the exact two-step form, up to near f32's top): forward and both backward forms
/// against f64, with the label at the row's max in some rows (p ≈ 1) and elsewhere in others.
fn logits_near_f32_max_take_the_fallback<T: CudaLogit, D: Offsets>(d: &D, seed: u64, centre: f32) {
    let mut r = rng(seed);
    let (rows, vocab) = (6, 41);
    let logits: Vec<T> = (0..rows * vocab)
        .map(|_| T::from_f32(centre * (1.0 + r.gen_range(-0.15f32..0.15))))
        .collect();
    let mut labels = random_labels(&mut r, rows, vocab, 0.0);
    labels[1] = IGNORE;
    for row in [2, 4] {
        let z = &logits[row * vocab..(row + 1) * vocab];
        let argmax = (0..vocab).max_by(|&a, &b| z[a].to_f32().total_cmp(&z[b].to_f32()));
        labels[row] = argmax.unwrap() as i32;
    }
    let name = format!("{}: {:?} near f32::MAX", d.name(), T::DTYPE);
    let out = d.token_logprobs(&logits, &labels, vocab, IGNORE).unwrap();
    for row in 0..rows {
        if labels[row] == IGNORE {
            assert_eq!(
                (out.logp[row], out.lse[row]),
                (0.0, 0.0),
                "{name}: row {row}"
            );
            continue;
        }
        // In f64 too, m + ln Σ at 2e38 rounds ln Σ away (ulp 3e22): keep them apart, as the ops do.
        let (_, z) = row_lse(&logits[row * vocab..(row + 1) * vocab]);
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let ln_sum = z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        let (l, p) = (m + ln_sum, (z[labels[row] as usize] - m) - ln_sum);
        assert!(
            (out.lse[row] as f64 - l).abs() <= 4.0 * 2f64.powi(-24) * l.abs(),
            "{name}: lse[{row}] {} vs {l}",
            out.lse[row]
        );
        // z[y] − max is exact; ln Σ is O(1): the log-prob keeps an absolute accuracy of a few
        // ulps of the spread, not of |z|.
        assert!(
            (out.logp[row] as f64 - p).abs() <= 1e-6 * (1.0 + p.abs()),
            "{name}: logp[{row}] {} vs {p}",
            out.logp[row]
        );
    }
    let grad: Vec<f32> = (0..rows).map(|_| r.gen_range(-2.0f32..2.0)).collect();
    let mut separate = vec![T::from_f32(0.0); rows * vocab];
    d.token_logprobs_backward(
        &logits,
        &labels,
        out.saved_lse(),
        &grad,
        vocab,
        IGNORE,
        &mut separate,
    )
    .unwrap();
    let mut in_place = logits.clone();
    d.token_logprobs_backward_inplace(
        &mut in_place,
        &labels,
        out.saved_lse(),
        &grad,
        vocab,
        IGNORE,
    )
    .unwrap();
    let (floor, rel) = storage_tol::<T>();
    for (row, &y) in labels.iter().enumerate() {
        let (_, z) = row_lse(&logits[row * vocab..(row + 1) * vocab]);
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let ln_sum = z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        for v in 0..vocab {
            let want = if y == IGNORE {
                0.0
            } else {
                let p = ((z[v] - m) - ln_sum).exp();
                grad[row] as f64 * ((v as i32 == y) as i32 as f64 - p)
            };
            // Ties at the max (bf16 rounding makes some) give p = 1/2: resolved only because the
            // saved lse keeps its residual (an f32 lse alone is ~1e31 off at 2e38).
            let tol = floor + rel * want.abs() + 1e-5 * (grad[row] as f64).abs();
            for (what, got) in [("separate", &separate), ("in place", &in_place)] {
                let g = got[row * vocab + v].to_f32() as f64;
                assert!(
                    (g - want).abs() <= tol,
                    "{name} {what}: row {row} column {v}: {g} vs {want}"
                );
            }
        }
    }
}

fn forward_and_backward_near_f32_max<D: Offsets>(d: &D) {
    // 1e38 is where the fast form's limit of 2^127 once let the terms overflow (found by fuzzing).
    for (k, centre) in [3e7f32, 1e12, 1e20, 1e38, 2e38, -1e38]
        .into_iter()
        .enumerate()
    {
        logits_near_f32_max_take_the_fallback::<f32, D>(d, 41 + k as u64, centre);
        logits_near_f32_max_take_the_fallback::<bf16, D>(d, 51 + k as u64, centre);
    }
}

/// A huge but finite logit met before ordinary ones (a thread's share starting at −6e24): the
/// kernel's running max passes through a value its fast exponent cannot handle and comes back; the
/// sum must not keep the garbage (it gave NaN before; found by fuzzing).
fn forward_huge_logit_before_ordinary_ones<D: Offsets>(d: &D) {
    let mut r = rng(61);
    let (rows, vocab) = (24, 257);
    let mut logits: Vec<bf16> = random_logits(&mut r, rows * vocab, 8.0);
    let labels = random_labels(&mut r, rows, vocab, 0.0);
    for row in 0..rows {
        for k in 0..3 {
            // Rows start at every alignment (odd vocab): the huge values land in heads and vectors.
            logits[row * vocab + (row + 17 * k) % vocab] =
                bf16::from_f32(-6.4e24 * (1.0 + k as f32));
        }
    }
    let out = d.token_logprobs(&logits, &labels, vocab, IGNORE).unwrap();
    let (want_logp, want_lse) = reference_forward(&logits, &labels, vocab);
    for row in 0..rows {
        assert!(
            (out.lse[row] as f64 - want_lse[row]).abs() <= 1e-5 * (1.0 + want_lse[row].abs())
                && (out.logp[row] as f64 - want_logp[row]).abs()
                    <= 1e-5 * (1.0 + want_logp[row].abs()),
            "{}: row {row}: logp {} lse {} vs {} {}",
            d.name(),
            out.logp[row],
            out.lse[row],
            want_logp[row],
            want_lse[row]
        );
    }
}

fn forward_all_ignored_rows_are_not_read<D: Offsets>(d: &D) {
    // NaN everywhere: ignored rows must not be read (no error) and must be written as 0.
    let (rows, vocab) = (70, 33);
    let logits = vec![f32::NAN; rows * vocab];
    let labels = vec![IGNORE; rows];
    let got = d.token_logprobs(&logits, &labels, vocab, IGNORE).unwrap();
    assert_eq!(got.logp.len(), rows);
    assert_eq!(got.lse.len(), rows);
    assert!(
        got.logp.iter().chain(&got.lse).all(|&x| x == 0.0),
        "{}: every ignored row is written as 0",
        d.name()
    );
}

fn forward_writes_every_output<D: Offsets>(d: &D) {
    // 4 full blocks of 64 rows. On the emulated CUDA device fresh outputs are NaN bytes, so an
    // element the kernel does not write shows as NaN.
    let mut r = rng(9);
    let (rows, vocab) = (256, 61);
    let logits: Vec<bf16> = random_logits(&mut r, rows * vocab, 4.0);
    let labels = random_labels(&mut r, rows, vocab, 0.3);
    let got = d.token_logprobs(&logits, &labels, vocab, IGNORE).unwrap();
    assert_all_finite(&format!("{}: logp", d.name()), &got.logp);
    assert_all_finite(&format!("{}: lse", d.name()), &got.lse);
    let (ref_logp, ref_lse) = reference_forward(&logits, &labels, vocab);
    assert_close("lse vs f64", &got.lse, &f32s(&ref_lse), 1e-5, 2e-6);
    assert_close("logp vs f64", &got.logp, &f32s(&ref_logp), 1e-5, 2e-6);
}

fn bad_label(row: usize, label: i32, vocab: usize) -> HaloError {
    HaloError::LabelOutOfRange {
        row,
        label: label as i64,
        vocab,
        ignore_index: IGNORE as i64,
    }
}

fn forward_errors<D: Offsets>(d: &D) {
    let mut r = rng(10);
    let (rows, vocab) = (40, 45);
    let logits: Vec<f32> = random_logits(&mut r, rows * vocab, 3.0);
    let mut labels = random_labels(&mut r, rows, vocab, 0.2);
    labels[5] = 3;
    labels[17] = 4;
    labels[30] = IGNORE;
    let name = d.name();

    // A label out of range (two of them, and a negative one): the first row is reported.
    for bad in [vocab as i32, -1, i32::MAX] {
        let mut l = labels.clone();
        l[23] = bad;
        l[31] = vocab as i32 + 7;
        let got = d.token_logprobs(&logits, &l, vocab, IGNORE).unwrap_err();
        assert_eq!(got, bad_label(23, bad, vocab), "{name}: label {bad}");
    }
    // NaN / inf in non-ignored rows 17 and 5: row 5 is reported; in an ignored row: no error.
    for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut z = logits.clone();
        z[17 * vocab + 44] = poison;
        z[5 * vocab] = poison;
        z[30 * vocab + 1] = poison;
        let got = d.token_logprobs(&z, &labels, vocab, IGNORE).unwrap_err();
        assert_eq!(
            got,
            HaloError::NonFinite {
                what: "logits",
                row: 5
            },
            "{name}: {poison} in rows 5 and 17"
        );
        let mut z = logits.clone();
        z[30 * vocab + 1] = poison;
        let out = d.token_logprobs(&z, &labels, vocab, IGNORE).unwrap();
        assert_eq!(
            (out.logp[30], out.lse[30]),
            (0.0, 0.0),
            "{name}: ignored row 30"
        );
        assert_all_finite(
            &format!("{name}: logp, {poison} in an ignored row"),
            &out.logp,
        );
    }
    // Finite logits spread wider than f32 (the label's at -3e38, another at +3e38): the log-prob
    // z[y] - lse is beyond f32, refused like a non-finite logit (found by fuzz_token_forward);
    // the first bad row of either kind is reported.
    let mut l = labels.clone();
    (l[8], l[12], l[26]) = (1, 7, 9);
    let mut z = logits.clone();
    for row in [12, 26] {
        z[row * vocab + l[row] as usize] = -3e38;
        z[row * vocab + l[row] as usize + 1] = 3e38;
    }
    let spread = |row| HaloError::NonFinite {
        what: "logits",
        row,
    };
    let got = d.token_logprobs(&z, &l, vocab, IGNORE).unwrap_err();
    assert_eq!(got, spread(12), "{name}: logits spanning beyond f32");
    z[26 * vocab] = f32::NAN;
    let got = d.token_logprobs(&z, &l, vocab, IGNORE).unwrap_err();
    assert_eq!(got, spread(12), "{name}: spread in row 12, NaN in row 26");
    z[8 * vocab + 3] = f32::NAN;
    let got = d.token_logprobs(&z, &l, vocab, IGNORE).unwrap_err();
    assert_eq!(got, spread(8), "{name}: NaN in row 8, spread in row 12");
    // A bad label wins over a NaN in an earlier row (labels are checked first).
    let mut z = logits.clone();
    z[5 * vocab] = f32::NAN;
    let mut l = labels.clone();
    l[20] = -5;
    assert_eq!(
        d.token_logprobs(&z, &l, vocab, IGNORE).unwrap_err(),
        bad_label(20, -5, vocab),
        "{name}: bad label and NaN"
    );
    // Shape errors.
    assert_eq!(
        d.token_logprobs(&logits[1..], &labels, vocab, IGNORE)
            .unwrap_err(),
        HaloError::LengthMismatch {
            what: "logits",
            expected: rows * vocab,
            got: rows * vocab - 1
        },
        "{name}: one logit short"
    );
    assert_eq!(
        d.token_logprobs(&logits, &labels[1..], vocab, IGNORE)
            .unwrap_err(),
        HaloError::LengthMismatch {
            what: "logits",
            expected: (rows - 1) * vocab,
            got: rows * vocab
        },
        "{name}: one label short"
    );
    assert!(
        matches!(
            d.token_logprobs::<f32>(&[], &[], 0, IGNORE),
            Err(HaloError::InvalidShape(_))
        ),
        "{name}: vocab 0"
    );
    assert!(
        matches!(
            d.token_logprobs(&logits, &labels, 0, IGNORE),
            Err(HaloError::InvalidShape(_))
        ),
        "{name}: vocab 0 with data"
    );
    // Zero rows: no error, empty outputs.
    let empty = d.token_logprobs::<f32>(&[], &[], 5, IGNORE).unwrap();
    assert_eq!(
        (empty.logp.len(), empty.lse.len()),
        (0, 0),
        "{name}: zero rows"
    );
}

// ---- backward ----------------------------------------------------------------------------------

/// Relative error of one rounding to `T` (half an ulp: 2^-24, 2^-8, 2^-11), and a floor below
/// which values may round to 0 (f16 subnormals are 6e-8 apart).
fn storage_tol<T: LogitElement>() -> (f64, f64) {
    match T::DTYPE {
        DType::F32 => (1e-12, 2f64.powi(-24)),
        DType::BF16 => (1e-12, 2f64.powi(-8)),
        DType::F16 => (4e-8, 2f64.powi(-11)),
    }
}

/// Backward of `rows x vocab` random logits at `offset`, into a NaN-poisoned output at several
/// output offsets and in place, against the f64 gradient `g · (1[v = y] − softmax_v)` with the
/// f64 softmax; the `lse` given to the op is the f64 one rounded to f32.
fn check_backward<T: CudaLogit, D: Offsets>(
    d: &D,
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
    let grad: Vec<f32> = (0..rows).map(|_| r.gen_range(-2.0f32..2.0)).collect();
    let (_, ref_lse) = reference_forward(logits, &labels, vocab);
    let lse = f32s(&ref_lse);
    let ctx = format!(
        "{}: {:?} rows {rows} vocab {vocab} offset {offset} scale {scale}",
        d.name(),
        T::DTYPE
    );

    // The f64 gradient and the tolerance of each element: one rounding to T (half an ulp, which
    // storage rounding does reach) of the f32 value, whose own error is a few f32 ulps of |w| plus
    // that of p = exp(z − lse), which scales |g|·p: the exponent carries the f32 rounding of the
    // lse input and of z − lse, a few ulps of their magnitude.
    let (floor, rel) = storage_tol::<T>();
    let mut want = vec![0.0f64; rows * vocab];
    let mut tol = vec![floor; rows * vocab];
    for (row, &y) in labels.iter().enumerate() {
        if y == IGNORE {
            continue; // exactly 0
        }
        let (l, z) = row_lse(&logits[row * vocab..(row + 1) * vocab]);
        let g = grad[row] as f64;
        for v in 0..vocab {
            let p = (z[v] - l).exp();
            let w = g * ((v as i32 == y) as i32 as f64 - p);
            let exponent_err = 4e-6 + (z[v].abs() + l.abs()) * 2f64.powi(-22);
            want[row * vocab + v] = w;
            tol[row * vocab + v] =
                floor + (rel + 2e-6) * w.abs() + 2.5 * g.abs() * p * exponent_err;
        }
    }
    let check = |what: &str, got: &[T]| {
        assert_eq!(got.len(), want.len(), "{what}: length ({ctx})");
        let got = to_f32(got);
        assert_all_finite(&format!("{what} ({ctx})"), &got);
        for (i, (&g, (&w, &t))) in got.iter().zip(want.iter().zip(&tol)).enumerate() {
            assert!(
                (g as f64 - w).abs() <= t,
                "{what} row {} col {}: got {g}, want {w} (|diff| {:e} > tol {t:e}) ({ctx})",
                i / vocab,
                i % vocab,
                (g as f64 - w).abs()
            );
        }
    };

    // Separate output, poisoned with NaN, at an output offset that differs from the input's and at
    // the same one; the elements before the output must be left alone.
    for out_offset in [0usize, 1, offset] {
        let poison = T::from_f32(f32::NAN);
        let mut out = vec![poison; rows * vocab + out_offset];
        d.backward_at(
            &buf,
            offset,
            &labels,
            SavedLse::bare(&lse),
            &grad,
            vocab,
            &mut out,
            out_offset,
        )
        .unwrap();
        assert!(
            out[..out_offset].iter().all(|x| x.to_f32().is_nan()),
            "elements before the output were written ({ctx}, out offset {out_offset})"
        );
        check(
            &format!("grad (out offset {out_offset})"),
            &out[out_offset..],
        );
    }

    let mut inplace = buf.clone();
    d.backward_inplace_at(
        &mut inplace,
        offset,
        &labels,
        SavedLse::bare(&lse),
        &grad,
        vocab,
    )
    .unwrap();
    assert_eq!(
        bytemuck::cast_slice::<T, u8>(&inplace[..offset]),
        bytemuck::cast_slice::<T, u8>(&buf[..offset]),
        "elements before the logits were written ({ctx})"
    );
    check("in-place grad", &inplace[offset..]);
}

fn backward_all_dtypes_awkward_shapes<D: Offsets>(d: &D) {
    for (i, &(rows, vocab)) in [
        (1, 1),
        (13, 1),
        (9, 3),
        (33, 7),
        (65, 50),
        (20, 129),
        (1, 1000),
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
            check_backward::<f32, D>(d, seed, rows, vocab, offset, 0.25, 6.0);
            check_backward::<bf16, D>(d, seed + 1000, rows, vocab, offset, 0.25, 6.0);
            check_backward::<f16, D>(d, seed + 2000, rows, vocab, offset, 0.25, 6.0);
        }
    }
}

fn backward_extreme_logits<D: Offsets>(d: &D) {
    check_backward::<f32, D>(d, 310, 9, 301, 0, 0.1, 1.0e4);
    check_backward::<bf16, D>(d, 311, 9, 77, 1, 0.1, 1.0e4);
    check_backward::<f16, D>(d, 312, 9, 77, 0, 0.1, 6.0e4);
}

fn backward_large_rows_and_all_ignored<D: Offsets>(d: &D) {
    check_backward::<bf16, D>(d, 300, 2, 128 * 1024 + 5, 0, 0.0, 6.0);
    check_backward::<f32, D>(d, 301, 11, 77, 0, 1.0, 6.0);
    check_backward::<f16, D>(d, 302, 11, 77, 1, 1.0, 6.0);
}

fn backward_errors<D: Offsets>(d: &D) {
    let mut r = rng(11);
    let (rows, vocab) = (30, 21);
    let logits: Vec<f16> = random_logits(&mut r, rows * vocab, 3.0);
    let mut labels = random_labels(&mut r, rows, vocab, 0.0);
    labels[4] = IGNORE;
    let (_, ref_lse) = reference_forward(&logits, &labels, vocab);
    let lse = f32s(&ref_lse);
    let grad = vec![0.5f32; rows];
    let name = d.name();
    // The error of the separate-output and of the in-place form, which must agree.
    let run = |labels: &[i32], lse: &[f32], grad: &[f32]| {
        let mut out = vec![f16::ZERO; rows * vocab];
        let got = d
            .token_logprobs_backward(
                &logits,
                labels,
                SavedLse::bare(lse),
                grad,
                vocab,
                IGNORE,
                &mut out,
            )
            .unwrap_err();
        let mut z = logits.clone();
        let got_inplace = d
            .token_logprobs_backward_inplace(
                &mut z,
                labels,
                SavedLse::bare(lse),
                grad,
                vocab,
                IGNORE,
            )
            .unwrap_err();
        assert_eq!(got_inplace, got, "{name}: in-place vs separate output");
        got
    };
    let mut bad = labels.clone();
    bad[9] = vocab as i32;
    bad[12] = -3;
    assert_eq!(
        run(&bad, &lse, &grad),
        bad_label(9, vocab as i32, vocab),
        "{name}"
    );
    let mut bad = labels.clone();
    bad[12] = -3;
    assert_eq!(run(&bad, &lse, &grad), bad_label(12, -3, vocab), "{name}");
    // Ignored rows are not read: a non-finite lse / grad there is no error.
    let mut l = lse.clone();
    l[4] = f32::NAN;
    l[7] = f32::INFINITY;
    assert_eq!(
        run(&labels, &l, &grad),
        HaloError::NonFinite {
            what: "lse",
            row: 7
        },
        "{name}"
    );
    let mut g = grad.clone();
    g[4] = f32::NAN;
    g[25] = f32::NEG_INFINITY;
    assert_eq!(
        run(&labels, &lse, &g),
        HaloError::NonFinite {
            what: "grad_logp",
            row: 25
        },
        "{name}"
    );
    // lse is checked before grad_logp; a bad label before both.
    assert_eq!(
        run(&labels, &l, &g),
        HaloError::NonFinite {
            what: "lse",
            row: 7
        },
        "{name}"
    );
    let mut bad = labels.clone();
    bad[28] = vocab as i32 + 1;
    assert_eq!(
        run(&bad, &l, &g),
        bad_label(28, vocab as i32 + 1, vocab),
        "{name}"
    );

    // Only the ignored row non-finite: no error, and the ignored row is zeroed (out of place into
    // a NaN-poisoned buffer, and in place).
    let mut only_ignored_lse = lse.clone();
    only_ignored_lse[4] = f32::NAN;
    let mut only_ignored_grad = grad.clone();
    only_ignored_grad[4] = f32::INFINITY;
    let mut out = vec![f16::NAN; rows * vocab];
    d.token_logprobs_backward(
        &logits,
        &labels,
        SavedLse::bare(&only_ignored_lse),
        &only_ignored_grad,
        vocab,
        IGNORE,
        &mut out,
    )
    .unwrap();
    assert_all_finite(&format!("{name}: grad"), &to_f32(&out));
    assert!(
        out[4 * vocab..5 * vocab].iter().all(|x| x.to_f32() == 0.0),
        "{name}: ignored row zeroed"
    );
    let mut z = logits.clone();
    d.token_logprobs_backward_inplace(
        &mut z,
        &labels,
        SavedLse::bare(&only_ignored_lse),
        &only_ignored_grad,
        vocab,
        IGNORE,
    )
    .unwrap();
    assert_all_finite(&format!("{name}: in-place grad"), &to_f32(&z));
    assert!(
        z[4 * vocab..5 * vocab].iter().all(|x| x.to_f32() == 0.0),
        "{name}: ignored row zeroed in place"
    );

    // Length errors, the same for both forms (the output's only for the separate one).
    let mismatch = |what, expected, got| HaloError::LengthMismatch {
        what,
        expected,
        got,
    };
    let long_grad: Vec<f32> = grad.iter().copied().chain([0.5]).collect();
    assert_eq!(
        run(&labels, &lse[1..], &grad),
        mismatch("lse", rows, rows - 1),
        "{name}: short lse"
    );
    assert_eq!(
        run(&labels, &lse, &long_grad),
        mismatch("grad_logp", rows, rows + 1),
        "{name}: long grad_logp"
    );
    assert_eq!(
        run(&labels[1..], &lse[1..], &grad[1..]),
        mismatch("logits", (rows - 1) * vocab, rows * vocab),
        "{name}: logits of more rows than labels"
    );
    let mut short_out = vec![f16::ZERO; rows * vocab - 1];
    assert_eq!(
        d.token_logprobs_backward(
            &logits,
            &labels,
            SavedLse::bare(&lse),
            &grad,
            vocab,
            IGNORE,
            &mut short_out
        )
        .unwrap_err(),
        mismatch("grad_logits", rows * vocab, rows * vocab - 1),
        "{name}: short grad_logits"
    );
    assert!(
        matches!(
            d.token_logprobs_backward::<f16>(
                &[],
                &[],
                SavedLse::bare(&[]),
                &[],
                0,
                IGNORE,
                &mut []
            ),
            Err(HaloError::InvalidShape(_))
        ),
        "{name}: vocab 0"
    );
    // Zero rows: no error.
    d.token_logprobs_backward::<f16>(&[], &[], SavedLse::bare(&[]), &[], 5, IGNORE, &mut [])
        .unwrap();
    d.token_logprobs_backward_inplace::<f16>(&mut [], &[], SavedLse::bare(&[]), &[], 5, IGNORE)
        .unwrap();
}

// ---- backward: what it refuses, and its precision ------------------------------------------

/// The separate-output and the in-place backward on the same inputs; their results (error or
/// gradient) must agree. Returns the separate form's result and gradient.
fn both_backwards<T: CudaLogit, D: Device>(
    d: &D,
    logits: &[T],
    labels: &[i32],
    saved: SavedLse<&[f32]>,
    grad: &[f32],
    vocab: usize,
) -> (Result<()>, Vec<T>) {
    let mut out = vec![T::from_f32(f32::NAN); logits.len()];
    let got = d.token_logprobs_backward(logits, labels, saved, grad, vocab, IGNORE, &mut out);
    let mut z = logits.to_vec();
    let got_inplace = d.token_logprobs_backward_inplace(&mut z, labels, saved, grad, vocab, IGNORE);
    assert_eq!(
        got_inplace,
        got,
        "{}: in place vs separate output",
        d.name()
    );
    if got.is_ok() {
        assert_eq!(
            bytemuck::cast_slice::<T, u8>(&z),
            bytemuck::cast_slice::<T, u8>(&out),
            "{}: in-place and separate gradients differ",
            d.name()
        );
    }
    (got, out)
}

/// The exact row max of row `r`.
fn row_max<T: LogitElement>(logits: &[T], r: usize, vocab: usize) -> f32 {
    logits[r * vocab..(r + 1) * vocab]
        .iter()
        .map(|x| x.to_f32())
        .fold(f32::NEG_INFINITY, f32::max)
}

fn backward_refuses_bad_logits_and_lse<D: Device>(d: &D) {
    let mut r = rng(20);
    // vocab 600: rows of 32 threads on CUDA; 1500: rows of 64 threads (cross-warp reduction).
    for vocab in [37usize, 600, 1500] {
        let rows = 24;
        let logits: Vec<bf16> = random_logits(&mut r, rows * vocab, 4.0);
        let mut labels = random_labels(&mut r, rows, vocab, 0.0);
        labels[3] = IGNORE;
        let (_, ref_lse) = reference_forward(&logits, &labels, vocab);
        let lse = f32s(&ref_lse);
        let grad: Vec<f32> = (0..rows).map(|_| r.gen_range(-2.0f32..2.0)).collect();
        let name = format!("{} vocab {vocab}", d.name());
        let run = |logits: &[bf16], lse: &[f32]| {
            both_backwards(d, logits, &labels, SavedLse::bare(lse), &grad, vocab).0
        };
        let nonfinite = |row| HaloError::NonFinite {
            what: "logits",
            row,
        };
        let inconsistent =
            |row: usize, lse: &[f32]| HaloError::InconsistentLse { row, lse: lse[row] };
        // The f64 lse rounded to f32 is accepted.
        run(&logits, &lse).unwrap_or_else(|e| panic!("{name}: clean input refused: {e}"));

        for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // In counted rows 17 and 9 (9 at its label): row 9 is reported.
            let mut z = logits.clone();
            z[17 * vocab + vocab / 2] = bf16::from_f32(poison);
            z[9 * vocab + labels[9] as usize] = bf16::from_f32(poison);
            assert_eq!(run(&z, &lse), Err(nonfinite(9)), "{name}: {poison}");
            // In the ignored row 3 only: accepted, and the row is zero.
            let mut z = logits.clone();
            z[3 * vocab + 1] = bf16::from_f32(poison);
            let (got, out) = both_backwards(d, &z, &labels, SavedLse::bare(&lse), &grad, vocab);
            got.unwrap_or_else(|e| panic!("{name}: {poison} in an ignored row: {e}"));
            assert!(out[3 * vocab..4 * vocab].iter().all(|x| x.to_f32() == 0.0));
            assert_all_finite(
                &format!("{name}: {poison} in an ignored row"),
                &to_f32(&out),
            );
        }

        // An lse below the row's max (that element's p > 1), or far above it (Σp = e^-0.05).
        let mut below = lse.clone();
        below[12] = row_max(&logits, 12, vocab) - 0.5;
        assert_eq!(
            run(&logits, &below),
            Err(inconsistent(12, &below)),
            "{name}: below the max"
        );
        let mut above = lse.clone();
        above[5] += 0.05;
        above[20] += 30.0;
        assert_eq!(
            run(&logits, &above),
            Err(inconsistent(5, &above)),
            "{name}: above"
        );
        // Just outside the stated tolerance (Σp = e^-δ with δ = 2·tolerance) and just inside.
        let tol = halo_kernels::cpu::LSE_SUM_TOLERANCE;
        let mut off = lse.clone();
        off[7] += 2.0 * tol;
        assert_eq!(
            run(&logits, &off),
            Err(inconsistent(7, &off)),
            "{name}: 2 x tolerance"
        );
        let mut off = lse.clone();
        off[7] += 0.5 * tol;
        run(&logits, &off).unwrap_or_else(|e| panic!("{name}: half the tolerance: {e}"));
        // An lse far off in the ignored row is not read.
        let mut off = lse.clone();
        off[3] = -1e30;
        run(&logits, &off).unwrap_or_else(|e| panic!("{name}: ignored row's lse: {e}"));

        // First failing row over all the checks: a bad lse at row 4 before a NaN logit at row 6;
        // both in row 6: the logits are named first (the CPU's order within a row).
        let mut z = logits.clone();
        z[6 * vocab] = bf16::from_f32(f32::NAN);
        let mut l = lse.clone();
        l[4] += 1.0;
        l[6] -= 1.0;
        assert_eq!(
            run(&z, &l),
            Err(inconsistent(4, &l)),
            "{name}: lse row 4, NaN row 6"
        );
        l[4] = lse[4];
        assert_eq!(
            run(&z, &l),
            Err(nonfinite(6)),
            "{name}: NaN and lse in row 6"
        );
        // A non-finite lse (checked before the logits) wins over a NaN logit in an earlier row.
        l[15] = f32::INFINITY;
        assert_eq!(
            run(&z, &l),
            Err(HaloError::NonFinite {
                what: "lse",
                row: 15
            }),
            "{name}: inf lse at row 15"
        );
        // A non-finite residual is a non-finite lse.
        let mut residual = vec![0.0f32; rows];
        residual[11] = f32::NAN;
        let (got, _) = both_backwards(
            d,
            &logits,
            &labels,
            SavedLse::new(&lse, &residual),
            &grad,
            vocab,
        );
        assert_eq!(
            got,
            Err(HaloError::NonFinite {
                what: "lse",
                row: 11
            }),
            "{name}: NaN residual"
        );
    }
}

fn backward_refuses_overflowing_f16<D: Device>(d: &D) {
    let mut r = rng(21);
    let (rows, vocab) = (10, 300);
    let values: Vec<f32> = random_logits(&mut r, rows * vocab, 3.0);
    let labels = random_labels(&mut r, rows, vocab, 0.0);
    let mut grad: Vec<f32> = (0..rows).map(|_| r.gen_range(-2.0f32..2.0)).collect();
    // |g (1 − p_y)| ≈ 1e5 > 65504 at row 6's label (p_y ≈ 1/300); row 8 likewise.
    grad[6] = 1.0e5;
    grad[8] = -2.0e5;
    let name = d.name();

    let f16s: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
    let (_, ref_lse) = reference_forward(&f16s, &labels, vocab);
    let lse = f32s(&ref_lse);
    let (got, _) = both_backwards(d, &f16s, &labels, SavedLse::bare(&lse), &grad, vocab);
    assert_eq!(
        got,
        Err(HaloError::GradientOverflow {
            row: 6,
            dtype: DType::F16
        }),
        "{name}: f16"
    );
    // 6e4 still fits f16.
    let mut fits = grad.clone();
    fits[6] = 6.0e4;
    fits[8] = -6.0e4;
    let (got, out) = both_backwards(d, &f16s, &labels, SavedLse::bare(&lse), &fits, vocab);
    got.unwrap_or_else(|e| panic!("{name}: f16, |g| = 6e4: {e}"));
    assert_all_finite(&format!("{name}: f16 |g| = 6e4"), &to_f32(&out));

    // bf16 holds 1e5: no error, and the values are right (f64 reference, bf16 rounding).
    let bf16s: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
    let (_, ref_lse) = reference_forward(&bf16s, &labels, vocab);
    let lse = f32s(&ref_lse);
    let (got, out) = both_backwards(d, &bf16s, &labels, SavedLse::bare(&lse), &grad, vocab);
    got.unwrap_or_else(|e| panic!("{name}: bf16: {e}"));
    let got = to_f32(&out);
    for row in [6usize, 8] {
        let (l, z) = row_lse(&bf16s[row * vocab..(row + 1) * vocab]);
        let g = grad[row] as f64;
        for v in 0..vocab {
            let p = (z[v] - l).exp();
            let want = g * ((v as i32 == labels[row]) as i32 as f64 - p);
            let have = got[row * vocab + v] as f64;
            assert!(
                (have - want).abs() <= 2f64.powi(-8) * want.abs() + 1e-5 * g.abs() * p,
                "{name}: bf16 row {row} col {v}: {have} vs {want}"
            );
        }
    }
}

/// Rows of f32 logits at large and mixed magnitudes: the gradient after the forward must be
/// within ~1e-6 relative of the f64 gradient of the same logits — what PyTorch's f32 achieves,
/// and what a backward from the f32 lse alone (off by half an ulp of |lse|: 3e-5 at 1000) misses.
fn backward_precision_at_large_logits<D: Device>(d: &D) {
    let mut r = rng(22);
    let vocab = 1024;
    let mut values: Vec<f32> = Vec::new();
    for (center, spread) in [
        (1000.0f32, 8.0f32),
        (-1000.0, 8.0),
        (1000.5, 8.0),
        (4000.0, 8.0),
        (-3000.0, 8.0),
        (0.0, 8.0),
        (1000.0, 1.0),
    ] {
        values.extend((0..vocab).map(|_| center + r.gen_range(-spread..spread)));
    }
    // Mixed magnitudes in one row: a cluster near 1000, values near 0 and near −1000 (p = 0).
    values.extend(
        (0..vocab).map(|v| [1000.0f32, 997.0, 0.0, -1000.0][v % 4] + r.gen_range(-1.0f32..1.0)),
    );
    let rows = values.len() / vocab;
    let labels: Vec<i32> = (0..rows).map(|i| ((i * 389) % vocab) as i32).collect();
    let grad: Vec<f32> = (0..rows)
        .map(|i| if i % 2 == 0 { 1.5 } else { -0.75 })
        .collect();

    let fwd = d.token_logprobs(&values, &labels, vocab, IGNORE).unwrap();
    let (got, out) = both_backwards(d, &values, &labels, fwd.saved_lse(), &grad, vocab);
    got.unwrap_or_else(|e| panic!("{}: {e}", d.name()));
    let mut worst = 0.0f64;
    for row in 0..rows {
        let (l, z) = row_lse(&values[row * vocab..(row + 1) * vocab]);
        let g = grad[row] as f64;
        for v in 0..vocab {
            let p = (z[v] - l).exp();
            let is_label = v as i32 == labels[row];
            let want = g * (is_label as i32 as f64 - p);
            let have = out[row * vocab + v] as f64;
            // 1e-6 of the value (of |g| at the label, whose 1 − p cancels), plus f32's own
            // rounding of the exponent z − lse (2^-23·|z − lse| relative on p) and the floor of
            // an exp that underflows.
            let scale = if is_label { g.abs() } else { want.abs() };
            let tol = 1e-6 * scale + g.abs() * p * 2f64.powi(-23) * (z[v] - l).abs() + 1e-37;
            let err = (have - want).abs();
            if p > 1e-30 {
                worst = worst.max(err / scale.max(1e-300));
            }
            assert!(
                err <= tol,
                "{}: row {row} col {v} (z {}, lse {l}): got {have}, want {want}, |diff| {err:e} > {tol:e}",
                d.name(),
                z[v]
            );
        }
    }
    eprintln!(
        "{}: worst relative gradient error at large logits {worst:e}",
        d.name()
    );
}

device_tests!(
    forward_f32_awkward_shapes,
    forward_bf16_awkward_shapes,
    forward_f16_awkward_shapes,
    forward_large_rows_of_128k,
    forward_extreme_logits,
    forward_and_backward_near_f32_max,
    forward_huge_logit_before_ordinary_ones,
    forward_all_ignored_rows_are_not_read,
    forward_writes_every_output,
    forward_errors,
    backward_all_dtypes_awkward_shapes,
    backward_extreme_logits,
    backward_large_rows_and_all_ignored,
    backward_errors,
    backward_refuses_bad_logits_and_lse,
    backward_refuses_overflowing_f16,
    backward_precision_at_large_logits,
);
