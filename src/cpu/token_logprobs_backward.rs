//! Backward of [`token_logprobs`](super::token_logprobs()): with `p = softmax(z)` recomputed from
//! the saved logsumexp (`lse` and its residual, [`SavedLse`]), `∂L/∂z[v] = g · (1[v = y] − p[v])`.
//! Ignored rows get a zero gradient.
//!
//! The in-place form overwrites the logits, which are dead after the backward in a training
//! step: this saves a `[rows, vocab]` buffer (the trick Liger-Kernel uses).
//!
//! Checks. Before anything is written: shapes, labels, then a finite `lse` (and residual) and a
//! finite `grad_logp` in every counted row. While each counted row is written, in the same pass
//! over its logits (no second read): a NaN/±inf logit (`NonFinite { what: "logits" }`), an lse that
//! cannot belong to the row (`InconsistentLse`: the `p` it gives do not sum to 1 within
//! [`LSE_SUM_TOLERANCE`](super::LSE_SUM_TOLERANCE)` + |lse|·2^-23`), and a gradient that the storage
//! dtype cannot hold (`GradientOverflow`: f16/bf16 values that round to ±inf; for f32, whose values
//! are bounded by `|g|·max(1, Σp)`, that bound overflowing). The first failing row is reported, with
//! its first failing check in that order — the same rule as the CUDA kernels' status slots.

use rayon::prelude::*;

use super::fast_exp::fast_exp;
use super::saved_lse::{lse_fits_row, SavedLse};
use super::{
    check_labels, check_logits_shape, has_avx2, load_f32, min_rows_per_task, store_f32, CHUNK,
};
use crate::dtype::{DType, LogitElement};
use crate::error::{HaloError, Result};
use crate::validate::{
    check_backward_inputs, check_counted_finite, check_counted_lse, check_grad_logits,
};

/// Lanes of the vectorized accumulations.
const LANES: usize = 8;

/// Writes `∂L/∂logits` into `grad_logits` (same shape and dtype as `logits`), where `saved` is the
/// forward's saved logsumexp ([`TokenLogprobs::saved_lse`](super::TokenLogprobs::saved_lse), or
/// [`SavedLse::bare`] of an lse from elsewhere) and `grad_logp` is `∂L/∂logp` per row.
///
/// Errors: length mismatches, `vocab == 0`, a label outside `0..vocab` that is not
/// `ignore_index`, a non-finite `lse` / residual / `grad_logp` in a counted row, and the checks
/// made while writing (module doc): non-finite logits, an inconsistent lse, an overflowing
/// gradient. On error the contents of `grad_logits` are unspecified.
pub fn token_logprobs_backward<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    saved: SavedLse<&[f32]>,
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
    grad_logits: &mut [T],
) -> Result<()> {
    let rows = check_backward_args(logits.len(), labels, saved, grad_logp, vocab, ignore_index)?;
    check_grad_logits(rows, vocab, grad_logits.len())?;
    if rows == 0 {
        return Ok(());
    }
    let first_fault = logits
        .par_chunks(vocab)
        .zip(grad_logits.par_chunks_mut(vocab))
        .with_min_len(min_rows_per_task(vocab))
        .enumerate()
        .filter_map(|(row, (z, dz))| {
            let label = labels[row];
            if label == ignore_index {
                dz.fill(T::from_f32(0.0));
                return None;
            }
            let r = RowInputs::of(saved, grad_logp, row, label, z);
            backward_row(RowBufs::Separate { z, dz }, r).map(|fault| (row, fault))
        })
        .min();
    fault_error::<T>(first_fault, saved.lse)
}

/// Same as [`token_logprobs_backward`] but overwrites `logits` with the gradient. On error the
/// logits are unspecified (rows may have been overwritten).
pub fn token_logprobs_backward_inplace<T: LogitElement>(
    logits: &mut [T],
    labels: &[i32],
    saved: SavedLse<&[f32]>,
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
) -> Result<()> {
    let rows = check_backward_args(logits.len(), labels, saved, grad_logp, vocab, ignore_index)?;
    if rows == 0 {
        return Ok(());
    }
    let first_fault = logits
        .par_chunks_mut(vocab)
        .with_min_len(min_rows_per_task(vocab))
        .enumerate()
        .filter_map(|(row, z)| {
            let label = labels[row];
            if label == ignore_index {
                z.fill(T::from_f32(0.0));
                return None;
            }
            let r = RowInputs::of(saved, grad_logp, row, label, z);
            backward_row(RowBufs::InPlace(z), r).map(|fault| (row, fault))
        })
        .min();
    fault_error::<T>(first_fault, saved.lse)
}

/// What a counted row's pass found wrong, in the order a row reports them (one per row). Also the
/// order of the CUDA status slots `HALO_STATUS_BWD_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum RowFault {
    /// A NaN or ±inf logit.
    NonFiniteLogits,
    /// `Σ p` is not 1 within the tolerance.
    InconsistentLse,
    /// A gradient does not fit the storage dtype.
    Overflow,
}

impl RowFault {
    /// The error for this fault at `row`, whose saved lse is `lse`.
    pub(crate) fn error(self, row: usize, lse: f32, dtype: DType) -> HaloError {
        match self {
            RowFault::NonFiniteLogits => HaloError::NonFinite {
                what: "logits",
                row,
            },
            RowFault::InconsistentLse => HaloError::InconsistentLse { row, lse },
            RowFault::Overflow => HaloError::GradientOverflow { row, dtype },
        }
    }
}

fn fault_error<T: LogitElement>(first: Option<(usize, RowFault)>, lse: &[f32]) -> Result<()> {
    match first {
        Some((row, fault)) => Err(fault.error(row, lse[row], T::DTYPE)),
        None => Ok(()),
    }
}

/// The smallest f32 magnitude that rounds to ±inf when stored as `T` (round to nearest even: the
/// midpoint between the largest finite value and the next power of two rounds up); `None` for f32.
pub(crate) fn overflow_threshold(dtype: DType) -> Option<f32> {
    match dtype {
        DType::F32 => None,
        // 65504 = 0x7BFF has an odd mantissa: the tie 65520 rounds up to 65536 = inf.
        DType::F16 => Some(65520.0),
        // bf16's largest finite value 0x7F7F is odd too: the tie 0x7F7F8000 (as f32) rounds to inf.
        DType::BF16 => Some(f32::from_bits(0x7F7F_8000)),
    }
}

/// One counted row's scalars.
#[derive(Clone, Copy)]
struct RowInputs {
    y: usize,
    /// The label's logit, read before an in-place row is overwritten.
    z_y: f32,
    lse: f32,
    /// `exp(−residual)`: `exp(z − lse − residual) = exp(z − lse) · c`, folded into `g`.
    c: f32,
    g: f32,
}

impl RowInputs {
    fn of<T: LogitElement>(
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        row: usize,
        label: i32,
        z: &[T],
    ) -> Self {
        let residual = saved.residual.map_or(0.0, |r| r[row]);
        Self {
            y: label as usize,
            z_y: z[label as usize].to_f32(),
            lse: saved.lse[row],
            // Exactly 1 for a bare lse (residual 0): then results equal the plain exp(z − lse).
            c: (-residual).exp(),
            g: grad_logp[row],
        }
    }
}

/// A row's logits and where its gradient goes.
enum RowBufs<'a, T> {
    /// Read `z`, write `dz`.
    Separate { z: &'a [T], dz: &'a mut [T] },
    /// Overwrite the logits with their gradient.
    InPlace(&'a mut [T]),
}

/// One row of the backward; returns the row's first fault. The AVX2 build when the CPU has it
/// (same results).
#[inline]
fn backward_row<T: LogitElement>(bufs: RowBufs<'_, T>, r: RowInputs) -> Option<RowFault> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time just above).
        return unsafe { backward_row_avx2(bufs, r) };
    }
    backward_row_portable(bufs, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_row_avx2<T: LogitElement>(
    bufs: RowBufs<'_, T>,
    r: RowInputs,
) -> Option<RowFault> {
    backward_row_portable(bufs, r)
}

#[inline(always)]
fn backward_row_portable<T: LogitElement>(bufs: RowBufs<'_, T>, r: RowInputs) -> Option<RowFault> {
    let neg_gc = -(r.g * r.c);
    let threshold = overflow_threshold(T::DTYPE);
    let mut acc = RowAcc::new();
    // Staged through an f32 buffer a chunk at a time: f16 converts fastest a slice at a time (see
    // `load_f32`), and the lane accumulators need f32 lanes.
    let mut buf = [0.0f32; CHUNK];
    let out: &mut [T] = match bufs {
        RowBufs::Separate { z, dz } => {
            for (zc, dc) in z.chunks(CHUNK).zip(dz.chunks_mut(CHUNK)) {
                let buf = &mut buf[..zc.len()];
                load_f32(zc, buf);
                acc.grad_chunk(buf, r.lse, neg_gc, threshold.is_some());
                store_f32(buf, dc);
            }
            dz
        }
        RowBufs::InPlace(z) => {
            for zc in z.chunks_mut(CHUNK) {
                let buf = &mut buf[..zc.len()];
                load_f32(zc, buf);
                acc.grad_chunk(buf, r.lse, neg_gc, threshold.is_some());
                store_f32(buf, zc);
            }
            z
        }
    };
    // g · (1 − p_y) = g − g·c·e_y, from the label's logit read before the row was written.
    let w_y = r.g + neg_gc * fast_exp(r.z_y - r.lse);
    out[r.y] = T::from_f32(w_y);

    let (prob_sum, probe, max_abs) = acc.finish();
    let prob_sum = r.c * prob_sum;
    if probe != 0.0 {
        return Some(RowFault::NonFiniteLogits);
    }
    if !lse_fits_row(r.lse, prob_sum) {
        return Some(RowFault::InconsistentLse);
    }
    let overflow = match threshold {
        Some(t) => max_abs.max(w_y.abs()) >= t,
        // f32 stores the values themselves, all bounded by |g|·max(1, Σp).
        None => (r.g.abs() * prob_sum.max(1.0)).is_infinite(),
    };
    overflow.then_some(RowFault::Overflow)
}

/// A row's running checks, in `LANES` lanes so that the loops vectorize.
struct RowAcc {
    /// Σ exp(z − lse).
    sum: [f32; LANES],
    /// Σ z·0: 0 while every logit is finite, NaN once a NaN or ±inf was seen.
    probe: [f32; LANES],
    /// max |stored value| (f16/bf16 only).
    max_abs: [f32; LANES],
}

impl RowAcc {
    fn new() -> Self {
        Self {
            sum: [0.0; LANES],
            probe: [0.0; LANES],
            max_abs: [0.0; LANES],
        }
    }

    /// Overwrites `buf` (logits as f32) with `neg_gc · exp(z − lse)`, accumulating the checks.
    // One index over the group and the four lane arrays: the shape LLVM vectorizes.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    fn grad_chunk(&mut self, buf: &mut [f32], lse: f32, neg_gc: f32, track_max: bool) {
        let mut groups = buf.chunks_exact_mut(LANES);
        for group in &mut groups {
            for k in 0..LANES {
                let x = group[k];
                let e = fast_exp(x - lse);
                self.sum[k] += e;
                self.probe[k] += x * 0.0;
                let w = neg_gc * e;
                if track_max {
                    let a = w.abs();
                    self.max_abs[k] = if a > self.max_abs[k] {
                        a
                    } else {
                        self.max_abs[k]
                    };
                }
                group[k] = w;
            }
        }
        for x in groups.into_remainder() {
            let e = fast_exp(*x - lse);
            self.sum[0] += e;
            self.probe[0] += *x * 0.0;
            let w = neg_gc * e;
            if track_max {
                self.max_abs[0] = self.max_abs[0].max(w.abs());
            }
            *x = w;
        }
    }

    /// (Σ exp(z − lse), probe, max |value|).
    fn finish(&self) -> (f32, f32, f32) {
        let max_abs = self.max_abs.iter().copied().fold(0.0f32, f32::max);
        (self.sum.iter().sum(), self.probe.iter().sum(), max_abs)
    }
}

fn check_backward_args(
    logits_len: usize,
    labels: &[i32],
    saved: SavedLse<&[f32]>,
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
) -> Result<usize> {
    let rows = check_logits_shape(logits_len, labels.len(), vocab)?;
    check_backward_inputs(
        rows,
        saved.lse.len(),
        saved.residual.map(<[f32]>::len),
        grad_logp.len(),
    )?;
    check_labels(labels, vocab, ignore_index)?;
    // Ignored rows are not read (their gradient is 0 whatever lse / grad_logp hold there).
    check_counted_lse(saved.lse, saved.residual, labels, ignore_index)?;
    check_counted_finite("grad_logp", grad_logp, labels, ignore_index)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn row_of(lse: f32, residual: f32, g: f32, y: usize, z_y: f32) -> RowInputs {
        RowInputs {
            y,
            z_y,
            lse,
            c: (-residual).exp(),
            g,
        }
    }

    fn same_as_portable<T: LogitElement>() {
        // The dispatched build (AVX2 where available) must equal the portable one bit for bit.
        for n in [1usize, 7, 9, 513, 5000] {
            let mut s = 0x9E37_79B9u32;
            let z: Vec<T> = (0..n)
                .map(|_| {
                    s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    T::from_f32((s >> 8) as f32 / (1u32 << 24) as f32 * 16.0 - 8.0 + 1e-3)
                })
                .collect();
            let y = n / 2;
            let r = row_of(9.5, 1e-6, -0.75, y, z[y].to_f32());
            let bits = |v: &[T]| bytemuck::cast_slice::<T, u8>(v).to_vec();
            let (mut a, mut b) = (z.clone(), z.clone());
            let fa = backward_row(RowBufs::Separate { z: &z, dz: &mut a }, r);
            let fb = backward_row_portable(RowBufs::Separate { z: &z, dz: &mut b }, r);
            assert_eq!((bits(&a), fa), (bits(&b), fb), "{:?} n {n}", T::DTYPE);
            let (mut c, mut d) = (z.clone(), z.clone());
            let fc = backward_row(RowBufs::InPlace(&mut c), r);
            let fd = backward_row_portable(RowBufs::InPlace(&mut d), r);
            assert_eq!(
                (bits(&c), fc),
                (bits(&d), fd),
                "{:?} n {n} in place",
                T::DTYPE
            );
            assert_eq!(
                (bits(&a), fa),
                (bits(&c), fc),
                "{:?} n {n} in place vs separate",
                T::DTYPE
            );
        }
    }

    #[test]
    fn dispatched_rows_equal_portable() {
        same_as_portable::<f32>();
        same_as_portable::<bf16>();
        same_as_portable::<f16>();
    }

    #[test]
    fn overflow_thresholds_are_where_storage_becomes_infinite() {
        // Against the half crate's own round-to-nearest-even conversions.
        let t = overflow_threshold(DType::F16).unwrap();
        assert!(f16::from_f32(t).is_infinite());
        assert!(f16::from_f32(-t).is_infinite());
        assert!(f16::from_f32(f32::from_bits(t.to_bits() - 1)).is_finite());
        let t = overflow_threshold(DType::BF16).unwrap();
        assert!(bf16::from_f32(t).is_infinite());
        assert!(bf16::from_f32(f32::from_bits(t.to_bits() - 1)).is_finite());
        assert_eq!(overflow_threshold(DType::F32), None);
    }

    #[test]
    fn row_faults_in_order() {
        // One row of 4 logits; lse exact in f64 → each fault alone, then two at once (the first
        // in RowFault order is reported).
        let z = [0.5f32, -1.0, 2.0, 0.25];
        let lse = z.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln() as f32;
        let run = |z: &[f32], lse: f32, g: f32| {
            let mut out = vec![0.0f32; z.len()];
            backward_row(
                RowBufs::Separate { z, dz: &mut out },
                row_of(lse, 0.0, g, 1, z[1]),
            )
        };
        let run16 = |g: f32| {
            let z16: Vec<f16> = z.iter().map(|&x| f16::from_f32(x)).collect();
            let mut out = vec![f16::ZERO; z.len()];
            let r = row_of(lse, 0.0, g, 1, z16[1].to_f32());
            backward_row(
                RowBufs::Separate {
                    z: &z16,
                    dz: &mut out,
                },
                r,
            )
        };
        assert_eq!(run(&z, lse, 1.0), None);
        assert_eq!(
            run(&[0.5, f32::NEG_INFINITY, 2.0, 0.25], lse, 1.0),
            Some(RowFault::NonFiniteLogits)
        );
        assert_eq!(run(&z, lse - 0.01, 1.0), Some(RowFault::InconsistentLse));
        assert_eq!(run(&z, lse + 0.01, 1.0), Some(RowFault::InconsistentLse));
        assert_eq!(
            run(&[0.5, f32::NAN, 2.0, 0.25], lse - 1.0, 1.0),
            Some(RowFault::NonFiniteLogits)
        );
        // f32: |g|·Σp overflows (Σp = e^1e-5 > 1, within the lse tolerance).
        assert_eq!(run(&z, lse - 1e-5, f32::MAX), Some(RowFault::Overflow));
        assert_eq!(run(&z, lse + 1e-5, f32::MAX), None);
        assert_eq!(run16(1.0e5), Some(RowFault::Overflow));
        assert_eq!(run16(6.0e4), None);
    }
}
