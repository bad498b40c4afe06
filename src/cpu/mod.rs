//! Token-level ops on host slices: the CPU twin of every kernel in `kernels/`.
//! Rows run in parallel with rayon; inner loops work on fixed 16-wide lanes so LLVM vectorizes them,
//! reading f32 and bf16 rows in place. The hot row loops have four builds, one chosen at run time
//! and cached (`isa`): AVX-512 + FMA with AVX-512 BF16 (whose bf16 backward rounds with the CPU's
//! conversion, `bf16_cvt`), AVX-512 + FMA, AVX2 + FMA (the same operations: bitwise identical
//! to each other in every stored value and log-prob; the BF16 build's bf16 backward sums its
//! `Σ p` check in another order), and the x86-64 baseline without FMA, which
//! rounds differently. The bounds the unit
//! tests hold between the baseline and the FMA builds: the row max exactly, `ln Σ` (hence `lse` and
//! every log-prob) within 2^-20 absolute plus the rounding of the final sum; each gradient value
//! within 8 f32 ulp of itself plus 2^-22·|∂L/∂logp| (the label's `g − g·p` cancels) plus one ulp of
//! the storage type (a value at a rounding midpoint may round either way). Every build is also held
//! to an f64 reference. The exp of the row loops is `fast_exp::exp_term` (degree 5, ≤ 3e-7
//! relative plus 2.7e-9 per unit of |z − max| in the FMA builds), not the public `fast_exp`;
//! the FMA builds' backward of bf16 rows uses `fast_exp::exp_term_coarse` (degree 4, ≤ 6e-6:
//! a bf16 store rounds by up to 2^-9, so it moves a stored gradient by one ulp at most, and only
//! where the exact value lies that close to a rounding midpoint; within the bounds above).
//!
//! ```
//! use halo_kernels::cpu::{sequence_sums, token_logprobs, SequenceLayout};
//! use halo_kernels::IGNORE_INDEX;
//!
//! // 2 rows over a vocabulary of 3; the first row is prompt (ignored, never read).
//! let logits = [f32::NAN, 0.0, 0.0, 1.0, 2.0, 3.0];
//! let labels = [IGNORE_INDEX, 2];
//! let out = token_logprobs(&logits, &labels, 3, IGNORE_INDEX)?;
//! let lse = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
//! assert!((out.logp[1] - (3.0 - lse)).abs() < 1e-6 && out.logp[0] == 0.0);
//! let sums = sequence_sums(&out.logp, &labels, IGNORE_INDEX, SequenceLayout::Padded { batch: 1, seq: 2 })?;
//! assert_eq!(sums.counts, [1]);
//! # Ok::<(), halo_kernels::HaloError>(())
//! ```

#[cfg(target_arch = "x86_64")]
mod bf16_cvt;
#[cfg(target_arch = "x86_64")]
mod bf16_lse;
pub mod fast_exp;
mod isa;
mod prefetch;
mod row_element;
pub mod saved_lse;
pub mod sequence_sums;
pub mod token_logprobs;
pub mod token_logprobs_backward;

pub use saved_lse::{SavedLse, LSE_SUM_TOLERANCE};
pub use sequence_sums::{
    broadcast_sequence_grad, humanline_grad_mask, sequence_logratio_sums, sequence_sums,
    LogRatioClamp, SequenceLayout, SequenceSums, MAX_SEQUENCES,
};
pub use token_logprobs::{token_logprobs, token_logprobs_into, TokenLogprobs};
pub use token_logprobs_backward::{token_logprobs_backward, token_logprobs_backward_inplace};

use crate::dtype::{DType, LogitElement};
// The token ops' argument checks, shared with the CUDA twins.
pub(crate) use crate::validate::{check_labels, check_logits_shape};

/// Elements processed together by the row loops (the forward's running max is updated once per
/// chunk; f16 rows are converted to f32 a chunk at a time).
// 2048 f32 are 8 KiB: the chunk stays in L1 between the forward's two passes over it.
pub(crate) const CHUNK: usize = 2048;

/// Converts f32 `src` into `dst` (same length), rounding to nearest even.
#[inline(always)]
pub(crate) fn store_f32<T: LogitElement>(src: &[f32], dst: &mut [T]) {
    if T::DTYPE == DType::F16 {
        // As in `load_f32`: the slice form checks for F16C once, not per element.
        use half::slice::HalfFloatSliceExt;
        bytemuck::cast_slice_mut::<T, half::f16>(dst).convert_from_f32_slice(src);
    } else {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = T::from_f32(x);
        }
    }
}

/// Converts `src` to f32 into `dst` (same length).
#[inline(always)]
pub(crate) fn load_f32<T: LogitElement>(src: &[T], dst: &mut [f32]) {
    if T::DTYPE == DType::F16 {
        // half's scalar f16 → f32 re-checks for F16C on every element; the slice form does not.
        use half::slice::HalfFloatSliceExt;
        bytemuck::cast_slice::<T, half::f16>(src).convert_to_f32_slice(dst);
    } else {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x.to_f32();
        }
    }
}

/// Rows below this many logits are grouped so rayon's per-task overhead stays small.
pub(crate) fn min_rows_per_task(vocab: usize) -> usize {
    (16 * 1024 / vocab.max(1)).max(1)
}

/// Helpers shared by the CPU ops' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::dtype::LogitElement;

    /// The row's logsumexp in f64 (of the values as stored).
    pub(crate) fn lse_f64<T: LogitElement>(z: &[T]) -> f64 {
        let m = z
            .iter()
            .map(|x| x.to_f32() as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        m + z
            .iter()
            .map(|x| (x.to_f32() as f64 - m).exp())
            .sum::<f64>()
            .ln()
    }
}
