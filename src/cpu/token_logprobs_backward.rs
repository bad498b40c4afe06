//! Backward of [`token_logprobs`](super::token_logprobs()): with `p = softmax(z)` recomputed from
//! the saved logsumexp, `∂L/∂z[v] = g · (1[v = y] − p[v])`. Ignored rows get a zero gradient.
//!
//! The in-place form overwrites the logits, which are dead after the backward in a training
//! step: this saves a `[rows, vocab]` buffer (the trick Liger-Kernel uses).

use rayon::prelude::*;

use super::fast_exp::fast_exp;
use super::{
    check_labels, check_logits_shape, has_avx2, load_f32, min_rows_per_task, store_f32, CHUNK,
};
use crate::dtype::{DType, LogitElement};
use crate::error::Result;
use crate::validate::{check_backward_inputs, check_counted_finite, check_grad_logits};

/// Writes `∂L/∂logits` into `grad_logits` (same shape and dtype as `logits`), where `lse` is the
/// forward's saved logsumexp and `grad_logp` is `∂L/∂logp` per row.
///
/// Errors: length mismatches, `vocab == 0`, a label outside `0..vocab` that is not
/// `ignore_index`, or a non-finite `lse` / `grad_logp` in a non-ignored row.
pub fn token_logprobs_backward<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    lse: &[f32],
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
    grad_logits: &mut [T],
) -> Result<()> {
    let rows = check_backward_args(logits.len(), labels, lse, grad_logp, vocab, ignore_index)?;
    check_grad_logits(rows, vocab, grad_logits.len())?;
    if rows == 0 {
        return Ok(());
    }
    logits
        .par_chunks(vocab)
        .zip(grad_logits.par_chunks_mut(vocab))
        .zip(
            labels
                .par_iter()
                .zip(lse.par_iter().zip(grad_logp.par_iter())),
        )
        .with_min_len(min_rows_per_task(vocab))
        .for_each(|((z, dz), (&label, (&lse, &g)))| {
            if label == ignore_index {
                dz.fill(T::from_f32(0.0));
            } else {
                backward_row(z, dz, label as usize, lse, g);
            }
        });
    Ok(())
}

/// Same as [`token_logprobs_backward`] but overwrites `logits` with the gradient.
pub fn token_logprobs_backward_inplace<T: LogitElement>(
    logits: &mut [T],
    labels: &[i32],
    lse: &[f32],
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
) -> Result<()> {
    let rows = check_backward_args(logits.len(), labels, lse, grad_logp, vocab, ignore_index)?;
    if rows == 0 {
        return Ok(());
    }
    logits
        .par_chunks_mut(vocab)
        .zip(
            labels
                .par_iter()
                .zip(lse.par_iter().zip(grad_logp.par_iter())),
        )
        .with_min_len(min_rows_per_task(vocab))
        .for_each(|(z, (&label, (&lse, &g)))| {
            if label == ignore_index {
                z.fill(T::from_f32(0.0));
            } else {
                backward_row_inplace(z, label as usize, lse, g);
            }
        });
    Ok(())
}

/// One row of the separate-output backward; the AVX2 build when the CPU has it (same results).
#[inline]
fn backward_row<T: LogitElement>(z: &[T], dz: &mut [T], y: usize, lse: f32, g: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time just above).
        return unsafe { backward_row_avx2(z, dz, y, lse, g) };
    }
    backward_row_portable(z, dz, y, lse, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_row_avx2<T: LogitElement>(z: &[T], dz: &mut [T], y: usize, lse: f32, g: f32) {
    backward_row_portable(z, dz, y, lse, g)
}

#[inline(always)]
fn backward_row_portable<T: LogitElement>(z: &[T], dz: &mut [T], y: usize, lse: f32, g: f32) {
    if T::DTYPE == DType::F16 {
        // f16 converts fastest a slice at a time (see `load_f32`): stage through a buffer.
        let mut buf = [0.0f32; CHUNK];
        for (zc, dc) in z.chunks(CHUNK).zip(dz.chunks_mut(CHUNK)) {
            let buf = &mut buf[..zc.len()];
            load_f32(zc, buf);
            for b in buf.iter_mut() {
                *b = -g * fast_exp(*b - lse);
            }
            store_f32(buf, dc);
        }
    } else {
        for (d, &x) in dz.iter_mut().zip(z) {
            *d = T::from_f32(-g * fast_exp(x.to_f32() - lse));
        }
    }
    dz[y] = T::from_f32(g * (1.0 - fast_exp(z[y].to_f32() - lse)));
}

/// One row of the in-place backward; the AVX2 build when the CPU has it (same results).
#[inline]
fn backward_row_inplace<T: LogitElement>(z: &mut [T], y: usize, lse: f32, g: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time just above).
        return unsafe { backward_row_inplace_avx2(z, y, lse, g) };
    }
    backward_row_inplace_portable(z, y, lse, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_row_inplace_avx2<T: LogitElement>(z: &mut [T], y: usize, lse: f32, g: f32) {
    backward_row_inplace_portable(z, y, lse, g)
}

#[inline(always)]
fn backward_row_inplace_portable<T: LogitElement>(z: &mut [T], y: usize, lse: f32, g: f32) {
    // p_y is read before the row is overwritten.
    let p_y = fast_exp(z[y].to_f32() - lse);
    if T::DTYPE == DType::F16 {
        let mut buf = [0.0f32; CHUNK];
        for zc in z.chunks_mut(CHUNK) {
            let buf = &mut buf[..zc.len()];
            load_f32(zc, buf);
            for b in buf.iter_mut() {
                *b = -g * fast_exp(*b - lse);
            }
            store_f32(buf, zc);
        }
    } else {
        for x in z.iter_mut() {
            *x = T::from_f32(-g * fast_exp(x.to_f32() - lse));
        }
    }
    z[y] = T::from_f32(g * (1.0 - p_y));
}

fn check_backward_args(
    logits_len: usize,
    labels: &[i32],
    lse: &[f32],
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
) -> Result<usize> {
    let rows = check_logits_shape(logits_len, labels.len(), vocab)?;
    check_backward_inputs(rows, lse.len(), grad_logp.len())?;
    check_labels(labels, vocab, ignore_index)?;
    // Ignored rows are not read (their gradient is 0 whatever lse / grad_logp hold there).
    check_counted_finite("lse", lse, labels, ignore_index)?;
    check_counted_finite("grad_logp", grad_logp, labels, ignore_index)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

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
            let (lse, g, y) = (9.5f32, -0.75f32, n / 2);
            let bits = |v: &[T]| bytemuck::cast_slice::<T, u8>(v).to_vec();
            let (mut a, mut b) = (z.clone(), z.clone());
            backward_row(&z, &mut a, y, lse, g);
            backward_row_portable(&z, &mut b, y, lse, g);
            assert_eq!(bits(&a), bits(&b), "{:?} n {n}", T::DTYPE);
            let (mut c, mut d) = (z.clone(), z.clone());
            backward_row_inplace(&mut c, y, lse, g);
            backward_row_inplace_portable(&mut d, y, lse, g);
            assert_eq!(bits(&c), bits(&d), "{:?} n {n} in place", T::DTYPE);
            assert_eq!(
                bits(&a),
                bits(&c),
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
}
