//! Token-level ops on host slices: the CPU twin of every kernel in `kernels/`.
//! Rows run in parallel with rayon; inner loops work on fixed 8-wide lanes so LLVM vectorizes them.
//! The hot row loops also have an AVX2 build chosen at run time (`has_avx2`); results are
//! bitwise identical either way.
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

pub mod fast_exp;
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

/// Whether the AVX2 builds of the row kernels can run here (std caches the CPUID check).
///
/// The crate is built for the x86-64 baseline (SSE2, 4 lanes); the hot row loops are compiled a
/// second time with AVX2 enabled and picked at run time. No FMA: LLVM does not contract separate
/// multiplies and adds, so both builds give bitwise identical results.
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Elements converted to f32 and processed together by the row loops that stage through a buffer.
pub(crate) const CHUNK: usize = 512;

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
