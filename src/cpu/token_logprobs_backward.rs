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

use half::bf16;

use super::fast_exp::{exp_term, exp_term_coarse};
use super::isa::{isa, madd, Isa};
use super::prefetch::{prefetch, PREFETCH_AHEAD_BYTES};
use super::row_element::{RowElement, GROUP};
use super::saved_lse::{lse_fits_row, SavedLse};
use super::{check_labels, check_logits_shape, load_f32, min_rows_per_task, store_f32, CHUNK};
use crate::dtype::{DType, LogitElement};
use crate::error::{HaloError, Result};
use crate::validate::{
    check_backward_inputs, check_counted_finite, check_counted_lse, check_grad_logits,
};

/// Lanes of the vectorized accumulations (as the forward's: the FMA builds agree bit for bit).
const LANES: usize = GROUP;

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

/// One row of the backward; returns the row's first fault. Runs the best build for this CPU
/// ([`isa`]).
#[inline]
fn backward_row<T: LogitElement>(bufs: RowBufs<'_, T>, r: RowInputs) -> Option<RowFault> {
    backward_row_on(isa(), bufs, r)
}

/// [`backward_row`] in a given build, which must be supported here (the baseline otherwise).
fn backward_row_on<T: LogitElement>(
    build: Isa,
    bufs: RowBufs<'_, T>,
    r: RowInputs,
) -> Option<RowFault> {
    #[cfg(target_arch = "x86_64")]
    if build.is_supported() {
        match build {
            // SAFETY: the CPU has the features these builds enable (`is_supported`).
            Isa::Avx512Bf16 => return unsafe { backward_row_avx512bf16(bufs, r) },
            Isa::Avx512 => return unsafe { backward_row_avx512(bufs, r) },
            Isa::Avx2Fma => return unsafe { backward_row_avx2(bufs, r) },
            Isa::Portable => {}
        }
    }
    let _ = build;
    backward_row_body::<T, false, false>(bufs, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")]
unsafe fn backward_row_avx512bf16<T: LogitElement>(
    bufs: RowBufs<'_, T>,
    r: RowInputs,
) -> Option<RowFault> {
    backward_row_body::<T, true, true>(bufs, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn backward_row_avx512<T: LogitElement>(
    bufs: RowBufs<'_, T>,
    r: RowInputs,
) -> Option<RowFault> {
    backward_row_body::<T, true, false>(bufs, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_row_avx2<T: LogitElement>(
    bufs: RowBufs<'_, T>,
    r: RowInputs,
) -> Option<RowFault> {
    backward_row_body::<T, true, false>(bufs, r)
}

/// f32 and bf16 rows are read and written in place; f16 rows are staged a chunk at a time
/// through an f32 buffer (see [`RowElement`]). `BF16_CVT` (the AVX-512 BF16 build only): bf16
/// rows take the loop of [`bf16_cvt`](super::bf16_cvt).
#[inline(always)]
fn backward_row_body<T: LogitElement, const FMA: bool, const BF16_CVT: bool>(
    bufs: RowBufs<'_, T>,
    r: RowInputs,
) -> Option<RowFault> {
    let neg_gc = -(r.g * r.c);
    let threshold = overflow_threshold(T::DTYPE);
    let mut acc = RowAcc::new();
    let out: &mut [T] = match bufs {
        RowBufs::Separate { z, dz } => {
            match T::DTYPE {
                DType::F32 => acc.grad_separate::<f32, FMA>(
                    bytemuck::cast_slice(z),
                    bytemuck::cast_slice_mut(dz),
                    r.lse,
                    neg_gc,
                ),
                DType::BF16 if BF16_CVT => {
                    let (z, dz) = (
                        bytemuck::cast_slice::<T, bf16>(z),
                        bytemuck::cast_slice_mut(dz),
                    );
                    // SAFETY: `z` and `dz` are distinct rows of the same length.
                    unsafe {
                        acc.grad_bf16_cvt(z.as_ptr(), z.len(), dz.as_mut_ptr(), r.lse, neg_gc)
                    };
                }
                DType::BF16 => acc.grad_separate::<bf16, FMA>(
                    bytemuck::cast_slice(z),
                    bytemuck::cast_slice_mut(dz),
                    r.lse,
                    neg_gc,
                ),
                DType::F16 => {
                    let mut buf = [0.0f32; CHUNK];
                    for (zc, dc) in z.chunks(CHUNK).zip(dz.chunks_mut(CHUNK)) {
                        let buf = &mut buf[..zc.len()];
                        load_f32(zc, buf);
                        acc.grad_inplace::<f32, FMA>(buf, r.lse, neg_gc);
                        store_f32(buf, dc);
                    }
                }
            }
            dz
        }
        RowBufs::InPlace(z) => {
            match T::DTYPE {
                DType::F32 => {
                    acc.grad_inplace::<f32, FMA>(bytemuck::cast_slice_mut(z), r.lse, neg_gc)
                }
                DType::BF16 if BF16_CVT => {
                    let z: &mut [bf16] = bytemuck::cast_slice_mut(z);
                    let (out, len) = (z.as_mut_ptr(), z.len());
                    // SAFETY: the row, read and written through one pointer.
                    unsafe { acc.grad_bf16_cvt(out.cast_const(), len, out, r.lse, neg_gc) };
                }
                DType::BF16 => {
                    acc.grad_inplace::<bf16, FMA>(bytemuck::cast_slice_mut(z), r.lse, neg_gc)
                }
                DType::F16 => {
                    let mut buf = [0.0f32; CHUNK];
                    for zc in z.chunks_mut(CHUNK) {
                        let buf = &mut buf[..zc.len()];
                        load_f32(zc, buf);
                        acc.grad_inplace::<f32, FMA>(buf, r.lse, neg_gc);
                        store_f32(buf, zc);
                    }
                }
            }
            z
        }
    };
    // g · (1 − p_y) = g − g·c·e_y, from the label's logit read before the row was written.
    let w_y = madd::<FMA>(neg_gc, exp_term::<FMA, true, true>(r.z_y - r.lse), r.g);
    let fault = row_fault(&acc, r, neg_gc, w_y, threshold, out);
    out[r.y] = T::from_f32(w_y);
    fault
}

/// The first fault of a row whose loop has run (`out` holds the loop's values, the label's
/// included: its `g − g·p_y` is `w_y`, not written yet).
#[inline(always)]
fn row_fault<T: LogitElement>(
    acc: &RowAcc,
    r: RowInputs,
    neg_gc: f32,
    w_y: f32,
    threshold: Option<f32>,
    out: &[T],
) -> Option<RowFault> {
    let (e_sum, non_finite) = acc.finish();
    let prob_sum = r.c * e_sum;
    if non_finite {
        return Some(RowFault::NonFiniteLogits);
    }
    if !lse_fits_row(r.lse, prob_sum) {
        return Some(RowFault::InconsistentLse);
    }
    let overflow = match threshold {
        // A stored value overflows when |neg_gc · e| ≥ t. Every e is at most the f32 sum of all
        // of them (a sum of non-negative terms never rounds below one of its terms), and the
        // product rounds monotonically: below `t` at the sum, no value reaches it, and the loop
        // need not track the largest e. Otherwise (|g| near the dtype's largest value) the
        // stored values say it: one of them is ±inf exactly when its product reached `t`.
        Some(t) => {
            w_y.abs() >= t
                || ((neg_gc * e_sum).abs() >= t && out.iter().any(|v| !v.to_f32().is_finite()))
        }
        // f32 stores the values themselves, all bounded by |g|·max(1, Σp).
        None => (r.g.abs() * prob_sum.max(1.0)).is_infinite(),
    };
    overflow.then_some(RowFault::Overflow)
}

/// A row's running checks: the sum in `LANES` lanes, so that the loops vectorize.
struct RowAcc {
    /// Σ exp(z − lse).
    sum: [f32; LANES],
    /// Whether a NaN or ±inf logit was seen.
    non_finite: bool,
}

impl RowAcc {
    #[inline(always)]
    fn new() -> Self {
        Self {
            sum: [0.0; LANES],
            non_finite: false,
        }
    }

    /// Overwrites `z` with its gradient.
    #[inline(always)]
    fn grad_inplace<E: RowElement, const FMA: bool>(&mut self, z: &mut [E], lse: f32, neg_gc: f32) {
        let mut lanes = Lanes::new(lse, neg_gc);
        let (groups, tail) = z.as_chunks_mut::<LANES>();
        for group in groups {
            prefetch(
                group
                    .as_ptr()
                    .cast::<u8>()
                    .wrapping_add(PREFETCH_AHEAD_BYTES),
            );
            let w = lanes.grad::<FMA>(group);
            E::narrow_group(w, group);
        }
        self.add(lanes);
        for x in tail {
            *x = E::narrow(self.grad_one::<FMA>(x.widen(), lse, neg_gc));
        }
    }

    /// Writes the gradient of `z` into `dz` (same length).
    #[inline(always)]
    fn grad_separate<E: RowElement, const FMA: bool>(
        &mut self,
        z: &[E],
        dz: &mut [E],
        lse: f32,
        neg_gc: f32,
    ) {
        let mut lanes = Lanes::new(lse, neg_gc);
        let groups = z.as_chunks::<LANES>().0.iter();
        for (zg, dg) in groups.zip(dz.as_chunks_mut::<LANES>().0) {
            prefetch(zg.as_ptr().cast::<u8>().wrapping_add(PREFETCH_AHEAD_BYTES));
            let w = lanes.grad::<FMA>(zg);
            E::narrow_group(w, dg);
        }
        self.add(lanes);
        let tail = z.len() - z.len() % LANES;
        for (x, d) in z[tail..].iter().zip(&mut dz[tail..]) {
            *d = E::narrow(self.grad_one::<FMA>(x.widen(), lse, neg_gc));
        }
    }

    /// [`bf16_cvt::grad_groups`](super::bf16_cvt::grad_groups) over the groups of the row at
    /// `z` (`len` values) writing to `out`, then the tail as the other loops do it. Reached from
    /// the AVX-512 BF16 build only.
    ///
    /// # Safety
    /// The CPU has the features of `grad_groups`; `z` is valid for reads and `out` for writes of
    /// `len` values, and they are the same pointer or do not overlap.
    #[inline(always)]
    unsafe fn grad_bf16_cvt(
        &mut self,
        z: *const bf16,
        len: usize,
        out: *mut bf16,
        lse: f32,
        neg_gc: f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let groups = len / LANES;
            // SAFETY: the caller's.
            let sums = unsafe { super::bf16_cvt::grad_groups(z, out, groups, lse, neg_gc) };
            for k in 0..LANES {
                self.sum[k] += sums.sum[k];
            }
            self.non_finite |= bf16::probe_found(sums.probe);
            for i in groups * LANES..len {
                // SAFETY: `i < len`; element `i` is read before it is written.
                let x = unsafe { z.add(i).read() }.widen();
                let d = <bf16 as RowElement>::narrow(self.grad_one::<true>(x, lse, neg_gc));
                unsafe { out.add(i).write(d) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{z:?} {len} {out:?} {lse} {neg_gc}: the AVX-512 BF16 build is x86-64 only");
    }

    /// Folds a loop's lanes in. Through memory (`black_box`): reduced in registers, LLVM keeps
    /// the accumulators on the stack and scalarizes parts of the loop.
    #[inline(always)]
    fn add<E: RowElement>(&mut self, lanes: Lanes<E>) {
        let lanes = std::hint::black_box(lanes);
        for k in 0..LANES {
            self.sum[k] += lanes.sum[k];
        }
        self.non_finite |= E::probe_found(lanes.probe);
    }

    /// One element's gradient (a row's tail), accumulated in lane 0.
    #[inline(always)]
    fn grad_one<const FMA: bool>(&mut self, x: f32, lse: f32, neg_gc: f32) -> f32 {
        let e = exp_term::<FMA, true, true>(x - lse);
        self.sum[0] += e;
        self.non_finite |= !x.is_finite();
        neg_gc * e
    }

    /// (Σ exp(z − lse), whether a NaN or ±inf was seen).
    #[inline(always)]
    fn finish(&self) -> (f32, bool) {
        (self.sum.iter().sum(), self.non_finite)
    }
}

/// One loop's accumulators (as [`RowAcc`]'s), local so that they stay in registers.
#[derive(Clone, Copy)]
struct Lanes<E: RowElement> {
    lse: f32,
    neg_gc: f32,
    /// Σ exp(z − lse) per lane; for bf16 rows lanes `k` and `k + LANES / 2` together in lane `k`
    /// (one 256-bit register instead of two: their loop is short of registers; the f32 one, with
    /// four constants fewer, measured no better that way).
    sum: [f32; LANES],
    probe: E::Probe,
}

impl<E: RowElement> Lanes<E> {
    #[inline(always)]
    fn new(lse: f32, neg_gc: f32) -> Self {
        Self {
            lse,
            neg_gc,
            sum: [0.0; LANES],
            probe: E::PROBE_CLEAN,
        }
    }

    /// The gradients `neg_gc · exp(x − lse)` of a group of logits (in the lane order of
    /// [`RowElement::widen_group`]), accumulating the checks.
    // One index over the group and the lane arrays: the shape LLVM vectorizes.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    fn grad<const FMA: bool>(&mut self, group: &[E; LANES]) -> [f32; LANES] {
        E::probe_group::<FMA>(group, &mut self.probe);
        let x = E::widen_group(group);
        let mut e = [0.0f32; LANES];
        for k in 0..LANES {
            e[k] = if FMA && E::COARSE_EXP {
                exp_term_coarse(x[k] - self.lse)
            } else {
                exp_term::<FMA, true, true>(x[k] - self.lse)
            };
        }
        if E::COARSE_EXP {
            for k in 0..LANES / 2 {
                self.sum[k] += e[k] + e[k + LANES / 2];
            }
        } else {
            for k in 0..LANES {
                self.sum[k] += e[k];
            }
        }
        e.map(|e| self.neg_gc * e)
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
    use crate::cpu::isa::ALL_ISAS;
    use crate::cpu::test_support::lse_f64;
    use half::f16;

    fn row_of(lse: f32, residual: f32, g: f32, y: usize, z_y: f32) -> RowInputs {
        RowInputs {
            y,
            z_y,
            lse,
            c: (-residual).exp(),
            g,
        }
    }

    fn logits<T: LogitElement>(n: usize, offset: f32) -> Vec<T> {
        let mut s = 0x9E37_79B9u32;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                T::from_f32((s >> 8) as f32 / (1u32 << 24) as f32 * 16.0 - 8.0 + 1e-3 + offset)
            })
            .collect()
    }

    /// `ulp(x)` of the storage type (at least its smallest normal's).
    fn ulp<T: LogitElement>(x: f32) -> f32 {
        let mantissa_bits = match T::DTYPE {
            DType::F32 => 23,
            DType::BF16 => 7,
            DType::F16 => 10,
        };
        let e = x.abs().max(f32::MIN_POSITIVE).log2().floor();
        // In f64: f32's powi goes through 2^133, which overflows, for the subnormal spacings.
        f64::powi(2.0, e as i32 - mantissa_bits) as f32
    }

    /// One row in `build`, written both ways (separate and in place, which must agree bit for bit).
    fn run_row<T: LogitElement>(build: Isa, z: &[T], r: RowInputs) -> Vec<T> {
        let bits = |v: &[T]| bytemuck::cast_slice::<T, u8>(v).to_vec();
        let mut a = z.to_vec();
        let fa = backward_row_on(build, RowBufs::Separate { z, dz: &mut a }, r);
        let mut b = z.to_vec();
        let fb = backward_row_on(build, RowBufs::InPlace(&mut b), r);
        assert_eq!((bits(&a), fa), (bits(&b), fb), "{build:?} {:?}", T::DTYPE);
        assert_eq!(fa, None, "{build:?} {:?}", T::DTYPE);
        a
    }

    /// Every build against f64 (`g·(1[v=y] − exp(z − L))` from the exact L), the FMA builds against
    /// each other (bit for bit; bf16 rows between the AVX-512 BF16 build and the others within
    /// one bf16 ulp) and the baseline against them: within 8 f32 ulp of the value plus
    /// 2^-22·|g| (the label's `g − g·p_y` cancels), plus one ulp of the storage type (a value
    /// near a rounding midpoint may round either way).
    fn builds_agree<T: LogitElement>() {
        for n in [1usize, 7, 15, 16, 17, 49, 2049, 5000] {
            // A tiny g: gradients below f32's smallest normal (the AVX-512 BF16 build's conversion
            // would flush them; it rounds such groups as the others do).
            // (f16 has no values that small: its case would test nothing but the flush to 0.)
            let cases = [(0.0f32, -0.75f32), (700.0, -0.75), (0.0, 2.5e-37)];
            for (offset, g) in cases
                .into_iter()
                .filter(|&(_, g)| T::DTYPE != DType::F16 || g.abs() > 1e-30)
            {
                let z = logits::<T>(n, offset);
                let lse64 = lse_f64(&z);
                let lse = lse64 as f32;
                let residual = (lse64 - lse as f64) as f32;
                let y = n / 2;
                let r = row_of(lse, residual, g, y, z[y].to_f32());
                let base = run_row(Isa::Portable, &z, r);
                let mut fma_rows = Vec::new();
                for build in ALL_ISAS.into_iter().filter(|b| b.is_supported()) {
                    let got = run_row(build, &z, r);
                    for v in 0..n {
                        let x = z[v].to_f32() as f64;
                        let one_hot = if v == y { 1.0 } else { 0.0 };
                        let want = g as f64 * (one_hot - (x - lse64).exp());
                        let (w, w0) = (got[v].to_f32(), base[v].to_f32());
                        // Against f64: exp's error grows with |z − lse| (the f32 difference is
                        // rounded before it is exponentiated).
                        let rel = 1e-6 + (x - lse64).abs() * 1.2e-7;
                        let tol = rel * want.abs()
                            + f32::powi(2.0, -22) as f64 * g.abs() as f64
                            + ulp::<T>(want as f32) as f64;
                        assert!(
                            (w as f64 - want).abs() <= tol,
                            "{build:?} {:?} n {n} v {v}: {w} vs {want}",
                            T::DTYPE
                        );
                        let between = 8.0 * f32::EPSILON * w.abs()
                            + f32::powi(2.0, -22) * g.abs()
                            + ulp::<T>(w);
                        assert!(
                            (w - w0).abs() <= between,
                            "{build:?} {:?} n {n} v {v}: {w} vs baseline {w0}",
                            T::DTYPE
                        );
                    }
                    if build > Isa::Portable {
                        fma_rows.push((build, got));
                    }
                }
                for pair in fma_rows.windows(2) {
                    let ((b0, x), (b1, y)) = (&pair[0], &pair[1]);
                    // bf16 rows in the AVX-512 BF16 build take their own loop (`bf16_cvt`: the
                    // same polynomial, 2^n and g applied in another order): within one bf16 ulp.
                    let own_loop = |b: Isa| T::DTYPE == DType::BF16 && b == Isa::Avx512Bf16;
                    if own_loop(*b0) != own_loop(*b1) {
                        for (v, (p, q)) in x.iter().zip(y).enumerate() {
                            let (p, q) = (p.to_f32(), q.to_f32());
                            assert!(
                                (p - q).abs() <= ulp::<T>(p.abs().max(q.abs())),
                                "{b0:?} {b1:?} n {n} v {v}: {p} vs {q}"
                            );
                        }
                        continue;
                    }
                    let bits = |v: &[T]| bytemuck::cast_slice::<T, u8>(v).to_vec();
                    assert_eq!(bits(x), bits(y), "{:?} n {n}", T::DTYPE);
                }
            }
        }
    }

    /// Logits far below the row's lse (down to the most negative finite value) get a gradient of
    /// ~0 in every build: the exp's lower clamp keeps its range reduction valid there (without it
    /// `d·log2 e` leaves the range where `d − n·ln 2` is small, and the polynomial overflows).
    fn far_below_the_lse<T: LogitElement>() {
        let n = 2 * CHUNK + 77;
        let mut z = logits::<T>(n, 0.0);
        let lowest = match T::DTYPE {
            DType::F16 => -65504.0,
            _ => -3.0e38,
        };
        for (at, x) in [(3, lowest), (40, (-1.0e6f32).max(lowest)), (n - 2, -200.0)] {
            z[at] = T::from_f32(x);
        }
        let lse64 = lse_f64(&z);
        let (lse, g, y) = (lse64 as f32, -0.75f32, 11);
        let r = row_of(lse, (lse64 - lse as f64) as f32, g, y, z[y].to_f32());
        for build in ALL_ISAS.into_iter().filter(|b| b.is_supported()) {
            let got = run_row(build, &z, r);
            for at in [3, 40, n - 2] {
                let w = got[at].to_f32();
                assert!(
                    w.abs() <= 1e-30,
                    "{build:?} {:?}: logit {} got gradient {w}",
                    T::DTYPE,
                    z[at].to_f32()
                );
            }
        }
    }

    /// An lse far from the row's (the exp far above its range, where the AVX-512 BF16 loop has no
    /// upper clamp, or far below) is refused as inconsistent by every build, in every dtype.
    fn far_off_lse<T: LogitElement>() {
        let n = CHUNK + 45;
        let z = logits::<T>(n, 0.0);
        let lse = lse_f64(&z) as f32;
        // (Not far above: the tolerance grows with |lse|, by f32's rounding of it.)
        for wrong in [lse - 1000.0, lse - 1.0e30, -3.0e38, lse + 1000.0] {
            let r = row_of(wrong, 0.0, -0.75, 7, z[7].to_f32());
            for build in ALL_ISAS.into_iter().filter(|b| b.is_supported()) {
                for bufs in [0, 1] {
                    let (mut a, mut b) = (z.clone(), z.clone());
                    let rows = if bufs == 0 {
                        RowBufs::Separate { z: &z, dz: &mut a }
                    } else {
                        RowBufs::InPlace(&mut b)
                    };
                    assert_eq!(
                        backward_row_on(build, rows, r),
                        Some(RowFault::InconsistentLse),
                        "{build:?} {:?}: lse {wrong} for a row whose lse is {lse}",
                        T::DTYPE
                    );
                }
            }
        }
    }

    #[test]
    fn a_far_off_lse_is_refused() {
        far_off_lse::<f32>();
        far_off_lse::<bf16>();
        far_off_lse::<f16>();
    }

    #[test]
    fn logits_far_below_the_lse_get_no_gradient() {
        far_below_the_lse::<f32>();
        far_below_the_lse::<bf16>();
        far_below_the_lse::<f16>();
    }

    #[test]
    fn every_build_matches_f64_and_the_others() {
        builds_agree::<f32>();
        builds_agree::<bf16>();
        builds_agree::<f16>();
    }

    fn probe_finds<T: LogitElement>() {
        let n = CHUNK + 1037;
        let z0 = logits::<T>(n, 0.0);
        let m = z0
            .iter()
            .map(|x| x.to_f32() as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let lse = (m + z0
            .iter()
            .map(|x| (x.to_f32() as f64 - m).exp())
            .sum::<f64>()
            .ln()) as f32;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 5, 16, CHUNK - 1, CHUNK, CHUNK + 1030, n - 1] {
                let mut z = z0.clone();
                z[at] = T::from_f32(bad);
                let y = if at == 3 { 4 } else { 3 };
                let r = row_of(lse, 0.0, 1.0, y, z[y].to_f32());
                for build in ALL_ISAS.into_iter().filter(|b| b.is_supported()) {
                    let mut out = z.clone();
                    let f = backward_row_on(
                        build,
                        RowBufs::Separate {
                            z: &z,
                            dz: &mut out,
                        },
                        r,
                    );
                    assert_eq!(
                        f,
                        Some(RowFault::NonFiniteLogits),
                        "{build:?} {bad} at {at}"
                    );
                    let mut inplace = z.clone();
                    let f = backward_row_on(build, RowBufs::InPlace(&mut inplace), r);
                    assert_eq!(
                        f,
                        Some(RowFault::NonFiniteLogits),
                        "{build:?} {bad} at {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_build_sees_non_finite_logits() {
        probe_finds::<f32>();
        probe_finds::<bf16>();
        probe_finds::<f16>();
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
        // |g|·Σp at or past the threshold but every stored value below it (the largest p is
        // 0.69, the label's): the stored values are scanned and none is infinite.
        let run_label_max = |g: f32, lse_shift: f32, bf: bool| {
            let r = |zy: f32| row_of(lse + lse_shift, 0.0, g, 2, zy);
            if bf {
                let zb: Vec<bf16> = z.iter().map(|&x| bf16::from_f32(x)).collect();
                let mut out = vec![bf16::ZERO; z.len()];
                let row = r(zb[2].to_f32());
                let got = backward_row(
                    RowBufs::Separate {
                        z: &zb,
                        dz: &mut out,
                    },
                    row,
                );
                (got, out.iter().all(|v| v.is_finite()))
            } else {
                let zh: Vec<f16> = z.iter().map(|&x| f16::from_f32(x)).collect();
                let mut out = vec![f16::ZERO; z.len()];
                let row = r(zh[2].to_f32());
                let got = backward_row(
                    RowBufs::Separate {
                        z: &zh,
                        dz: &mut out,
                    },
                    row,
                );
                (got, out.iter().all(|v| v.is_finite()))
            }
        };
        assert_eq!(run_label_max(7.0e4, 0.0, false), (None, true));
        assert_eq!(run_label_max(3.396e38, -1e-4, true), (None, true));
        // The label's p·g reaching it counts as an overflow, as in the CUDA kernels (the loop
        // writes g·p there before g − g·p_y replaces it).
        assert_eq!(run_label_max(9.5e4, 0.0, false).0, Some(RowFault::Overflow));
        // A dominant logit off the label, with Σp = 1.0001 (within the lse tolerance): its stored
        // value −g·p is −inf in bf16 while g and g − g·p_y are not; at Σp = 1 it is finite.
        let zb = [bf16::from_f32(0.0), bf16::from_f32(20.0)];
        let lse_b = (1.0f64 + 20f64.exp()).ln() as f32;
        let g = 3.396e38;
        assert!(g < overflow_threshold(DType::BF16).unwrap());
        let mut out = [bf16::ZERO; 2];
        let row = row_of(lse_b - 1e-4, 0.0, g, 0, 0.0);
        let got = backward_row(
            RowBufs::Separate {
                z: &zb,
                dz: &mut out,
            },
            row,
        );
        assert_eq!(got, Some(RowFault::Overflow));
        let row = row_of(lse_b, 0.0, g, 0, 0.0);
        let got = backward_row(
            RowBufs::Separate {
                z: &zb,
                dz: &mut out,
            },
            row,
        );
        assert_eq!(got, None);
    }
}
