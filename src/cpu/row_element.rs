//! The element types the row loops read in place (no staging copy): f32, and bf16 widened by a
//! shift and narrowed by branch-free rounding, so that both vectorize. f16 has no such form
//! without F16C in the baseline build; its rows are converted a chunk at a time
//! (`load_f32` / `store_f32`) and run through the f32 loops.

use half::bf16;

/// An element read and written in place by the row loops.
pub(crate) trait RowElement: Copy + Send + Sync + bytemuck::Pod {
    /// The value as f32 (exact).
    fn widen(self) -> f32;
    /// `x` rounded to this type, to nearest even (as [`crate::LogitElement::from_f32`]), for a
    /// non-NaN `x`; a NaN gives an unspecified value. The backward's gradients are NaN only in
    /// rows it refuses (their contents are unspecified), so the loop carries no NaN test.
    fn narrow(x: f32) -> Self;
}

impl RowElement for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        x
    }
}

impl RowElement for bf16 {
    /// bf16 is f32's top half. (half's `to_f32` also sets the quiet bit of a NaN; a NaN stays a
    /// NaN here too, which is all the ops look at.)
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    /// Bit-equal to `bf16::from_f32` for every non-NaN input (tested on all of them): adding
    /// `0x7FFF` plus the kept mantissa's lowest bit carries into the kept half exactly when the
    /// dropped half is above the midpoint, or at it with an odd kept half (round to nearest even).
    /// Four integer operations per element and no select (a NaN may come out as anything).
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        let bits = x.to_bits();
        bf16::from_bits((bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn bf16_narrow_equals_half_on_every_non_nan_f32() {
        let mismatches = (0u32..=u16::MAX as u32)
            .into_par_iter()
            .filter(|&hi| {
                (0u32..=u16::MAX as u32).any(|lo| {
                    let x = f32::from_bits(hi << 16 | lo);
                    !x.is_nan()
                        && <bf16 as RowElement>::narrow(x).to_bits() != bf16::from_f32(x).to_bits()
                })
            })
            .count();
        assert_eq!(mismatches, 0);
    }

    #[test]
    fn bf16_widen_equals_half_on_every_non_nan() {
        for b in 0..=u16::MAX {
            let x = bf16::from_bits(b);
            let wide = RowElement::widen(x);
            if x.is_nan() {
                assert!(wide.is_nan());
            } else {
                assert_eq!(wide.to_bits(), x.to_f32().to_bits());
            }
        }
    }
}
