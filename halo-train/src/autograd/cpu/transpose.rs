//! Out-of-place transpose of a row-major (possibly strided) `f32` matrix.
//!
//! Why: `matrixmultiply` packs an operand fast only when it is contiguous along the direction it
//! packs (a column-major `a`, a row-major `b`); any other layout it packs one element at a time,
//! about 2 cycles an element, which cost ~18% of a training step (its kernel does 16
//! multiply-adds a cycle, so even packing 1/128 of the work's size weighs). A transpose in 8×8
//! AVX blocks costs a fraction of a cycle an element and lets the packing take its fast path.
//! Moving data changes no arithmetic: the product's bits are the same.

/// `dst[c·rows + r] = src[offset + r·row_stride + c]` for `r < rows`, `c < cols`: `dst` is the
/// `cols × rows` row-major transpose (the `rows × cols` matrix stored column-major).
///
/// Panics if a buffer is too short (a caller bug).
pub(crate) fn transpose_into(
    src: &[f32],
    offset: usize,
    row_stride: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(row_stride >= cols, "transpose: rows overlap");
    assert!(offset + (rows - 1) * row_stride + cols <= src.len());
    assert!(dst.len() >= rows * cols);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked just above); bounds asserted above.
        unsafe { transpose_avx(src, offset, row_stride, rows, cols, dst) };
        return;
    }
    transpose_scalar(src, offset, row_stride, 0..rows, 0..cols, rows, dst);
}

/// The plain loop over the block `rs × cs` (also the edges of the AVX build).
fn transpose_scalar(
    src: &[f32],
    offset: usize,
    row_stride: usize,
    rs: std::ops::Range<usize>,
    cs: std::ops::Range<usize>,
    rows: usize,
    dst: &mut [f32],
) {
    for r in rs {
        let row = &src[offset + r * row_stride..];
        for c in cs.clone() {
            dst[c * rows + r] = row[c];
        }
    }
}

/// 8×8 blocks transposed in registers (unpack, shuffle, lane permute: 24 shuffles a block), two
/// blocks of 8 rows at a time so that every store fills a whole 64-byte line of `dst` (one
/// block's half lines were evicted before the next row block wrote their other half: a wide
/// matrix touches more lines than L1 holds), the ragged edges by [`transpose_scalar`].
///
/// # Safety
/// The CPU must have AVX; `src` and `dst` must be as [`transpose_into`] asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_avx(
    src: &[f32],
    offset: usize,
    row_stride: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (rows16, cols8) = (rows / 16 * 16, cols / 8 * 8);
    let s = src.as_ptr().add(offset);
    let d = dst.as_mut_ptr();
    for r0 in (0..rows16).step_by(16) {
        for c0 in (0..cols8).step_by(8) {
            let top = block8(s.add(r0 * row_stride + c0), row_stride);
            let bottom = block8(s.add((r0 + 8) * row_stride + c0), row_stride);
            let q = d.add(c0 * rows + r0);
            for j in 0..8 {
                _mm256_storeu_ps(q.add(j * rows), top[j]);
                _mm256_storeu_ps(q.add(j * rows + 8), bottom[j]);
            }
        }
    }
    transpose_scalar(src, offset, row_stride, 0..rows16, cols8..cols, rows, dst);
    transpose_scalar(src, offset, row_stride, rows16..rows, 0..cols, rows, dst);
}

/// The transpose of the 8×8 block at `p` (rows `row_stride` apart): element `[j][i]` of the
/// result is row `i`, column `j` of the block.
///
/// # Safety
/// The CPU must have AVX; the 8 rows of 8 floats at `p` must be readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn block8(p: *const f32, row_stride: usize) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let l = |i: usize| _mm256_loadu_ps(p.add(i * row_stride));
    let (a0, a1, a2, a3) = (l(0), l(1), l(2), l(3));
    let (a4, a5, a6, a7) = (l(4), l(5), l(6), l(7));
    let t0 = _mm256_unpacklo_ps(a0, a1);
    let t1 = _mm256_unpackhi_ps(a0, a1);
    let t2 = _mm256_unpacklo_ps(a2, a3);
    let t3 = _mm256_unpackhi_ps(a2, a3);
    let t4 = _mm256_unpacklo_ps(a4, a5);
    let t5 = _mm256_unpackhi_ps(a4, a5);
    let t6 = _mm256_unpacklo_ps(a6, a7);
    let t7 = _mm256_unpackhi_ps(a6, a7);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_at_awkward_sizes_and_strides() {
        for (rows, cols, pad) in [
            (1, 1, 0),
            (3, 5, 2),
            (8, 8, 0),
            (9, 17, 0),
            (16, 7, 3),
            (31, 33, 5),
            (64, 24, 0),
            (40, 20, 1),
            (33, 64, 0),
        ] {
            let stride = cols + pad;
            let offset = 3;
            let src: Vec<f32> = (0..offset + rows * stride).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose_into(&src, offset, stride, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[offset + r * stride + c],
                        "{rows}x{cols}+{pad} at ({r}, {c})"
                    );
                }
            }
        }
    }
}
