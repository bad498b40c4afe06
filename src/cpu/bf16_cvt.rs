//! The backward's loop over bf16 groups for CPUs with AVX-512 BF16 ([`Isa::Avx512Bf16`]): the
//! values of the generic loop of the other FMA builds (`Lanes::grad` with
//! `fast_exp::exp_term_coarse`, then `RowElement::narrow_group`) to within one bf16 ulp, rounded
//! to bf16 by `vcvtne2ps2bf16` (one instruction per 32 values) instead of the integer rounding
//! (five operations per 8 values and a blend per 16: measured 0.25 of the loop's 1.18 cycles per
//! logit on the AMD EPYC dev machine, Zen 4). The conversion rounds to nearest even as
//! `bf16::from_f32` does, except that it flushes f32 denormals to zero: a group holding one is
//! rounded by [`RowElement::narrow`] instead (detected by `vfpclassps`, one operation per 16).
//! Widened two groups at a time (32 logits: a shift and a mask on 16 words, evens and odds) and
//! put back in order by one word permute, rather than the generic loop's lanes, so the lane sums
//! of `Σ e` associate differently: that sum only feeds the row's checks, never a stored value.
//! The exp is `exp_term_coarse`'s reduction and polynomial in Horner's form with 2^n applied by
//! `vscalefps` (one operation instead of a shift and an add, and no upper clamp: see
//! `grad_groups`), three operations fewer per 16 logits; the polynomial's terms round in another
//! order, so a stored value may differ from the other builds' by one bf16 ulp (tested), where the
//! exact one lies within ~1e-6 of a rounding midpoint.
//! Measured on Zen 4, hot: the in-place bf16 backward 1.18 → 0.93 cycles per logit with the
//! conversion, → 0.74–0.83 with the pairs (a noisy, shared machine: best of 15 runs); on the
//! Sapphire Rapids dev machine, see docs/PERFORMANCE.md.
//!
//! [`Isa::Avx512Bf16`]: super::isa::Isa::Avx512Bf16

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::bf16;

use super::fast_exp::{D2, D3, D4, ROUND_MAGIC, TERM_LOW};
use super::prefetch::{prefetch, PREFETCH_AHEAD_BYTES};
use super::row_element::{RowElement, GROUP};

/// What [`grad_groups`] accumulates: `Σ e` per lane and the bf16 probe (`RowElement::Probe`).
pub(crate) struct GroupSums {
    pub(crate) sum: [f32; GROUP],
    pub(crate) probe: [u16; GROUP],
}

/// Writes `neg_gc · exp(z − lse)` of the first `groups · GROUP` values at `src` to `dst` as bf16
/// (`dst` may be `src`: each group is read before it is written; otherwise the ranges must not
/// overlap).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/DQ, BF16 and FMA; `src` is valid for reads and `dst` for writes of
/// `groups · GROUP` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")]
#[inline]
pub(crate) unsafe fn grad_groups(
    src: *const bf16,
    dst: *mut bf16,
    groups: usize,
    lse: f32,
    neg_gc: f32,
) -> GroupSums {
    let c = |x: f32| _mm512_set1_ps(x);
    let (v_lse, v_neg_gc, low) = (c(lse), c(neg_gc), c(TERM_LOW));
    let (log2e, magic, ln2) = (
        c(std::f32::consts::LOG2_E),
        c(ROUND_MAGIC),
        c(std::f32::consts::LN_2),
    );
    let (d2, d3, d4, one) = (c(D2), c(D3), c(D4), c(1.0));
    // `(e, neg_gc · e)` of 16 logits: exp_term_coarse's reduction and polynomial, in Horner's
    // form, with 2^n applied by `vscalefps`, which rounds to ±inf or 0 past f32's range where the
    // exponent add would wrap: the upper clamp goes (a `d` that large means an lse that does not
    // belong to the row, whose Σ e then becomes +inf and is refused). The lower clamp stays: far
    // below −86 the reduction itself breaks down (`r` is no longer small).
    macro_rules! exp_grad {
        ($x:expr) => {{
            let d = _mm512_max_ps(low, _mm512_sub_ps($x, v_lse));
            let shifted = _mm512_fmadd_ps(d, log2e, magic);
            let n = _mm512_sub_ps(shifted, magic);
            let r = _mm512_fnmadd_ps(n, ln2, d);
            let p = _mm512_fmadd_ps(_mm512_fmadd_ps(d4, r, d3), r, d2);
            let p = _mm512_fmadd_ps(_mm512_fmadd_ps(p, r, one), r, one);
            let e = _mm512_scalef_ps(p, n);
            (e, _mm512_mul_ps(v_neg_gc, e))
        }};
    }
    let mut sum = _mm512_setzero_ps();
    // The probe of `RowElement for bf16`: the largest `bits << 1`, over 32 words.
    let mut probe = _mm512_setzero_si512();
    let high_halves = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    // Word 2j of a pair's output is the even element j (word j of the conversion), word 2j + 1
    // the odd one (word 16 + j).
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    // Two groups at a time: 32 logits are 16 words, whose low halves (the even elements) widen
    // by a shift and high halves (the odd ones) by a mask, without the widening shuffle that 16
    // logits need; the two conversions are one, and one permute puts the words back in order.
    for i in 0..groups / 2 {
        let (at_src, at_dst) = (src.add(2 * i * GROUP), dst.add(2 * i * GROUP));
        // A hint, never a fault: past the row's end it asks for the next row's values.
        prefetch(at_src.cast::<u8>().wrapping_add(PREFETCH_AHEAD_BYTES));
        // SAFETY: within the `groups · GROUP` values the caller vouches for.
        let w = unsafe { _mm512_loadu_si512(at_src.cast()) };
        probe = _mm512_max_epu16(probe, _mm512_add_epi16(w, w));
        let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w));
        let odd = _mm512_castsi512_ps(_mm512_and_si512(w, high_halves));
        let (e_even, g_even) = exp_grad!(even);
        let (e_odd, g_odd) = exp_grad!(odd);
        sum = _mm512_add_ps(sum, _mm512_add_ps(e_even, e_odd));
        // 0x20: denormal (the conversion would flush it to zero).
        let denormal =
            _mm512_fpclass_ps_mask::<0x20>(g_even) | _mm512_fpclass_ps_mask::<0x20>(g_odd);
        if denormal == 0 {
            let h: __m512i =
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(g_odd, g_even));
            // SAFETY: as the load.
            unsafe { _mm512_storeu_si512(at_dst.cast(), _mm512_permutexvar_epi16(interleave, h)) };
        } else {
            let g_even: [f32; GROUP] = std::mem::transmute::<__m512, [f32; GROUP]>(g_even);
            let g_odd: [f32; GROUP] = std::mem::transmute::<__m512, [f32; GROUP]>(g_odd);
            for j in 0..GROUP {
                // SAFETY: as the load.
                unsafe {
                    at_dst
                        .add(2 * j)
                        .write(<bf16 as RowElement>::narrow(g_even[j]));
                    at_dst
                        .add(2 * j + 1)
                        .write(<bf16 as RowElement>::narrow(g_odd[j]));
                }
            }
        }
    }
    let mut probe = _mm256_max_epu16(
        _mm512_castsi512_si256(probe),
        _mm512_extracti64x4_epi64::<1>(probe),
    );
    if groups % 2 == 1 {
        let i = groups - 1;
        // SAFETY (both): within the `groups · GROUP` values the caller vouches for.
        let w = unsafe { _mm256_loadu_si256(src.add(i * GROUP).cast()) };
        probe = _mm256_max_epu16(probe, _mm256_add_epi16(w, w));
        let x = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(w)));
        let (e, g) = exp_grad!(x);
        sum = _mm512_add_ps(sum, e);
        // SAFETY: within the values the caller vouches for.
        unsafe { narrow16(g, dst.add(i * GROUP)) };
    }
    GroupSums {
        sum: std::mem::transmute::<__m512, [f32; GROUP]>(sum),
        probe: std::mem::transmute::<__m256i, [u16; GROUP]>(probe),
    }
}

/// Stores the 16 values of `g` at `out` as bf16, each as [`RowElement::narrow`] rounds it (bit for
/// bit, for every non-NaN value: tested on all of them).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/DQ and BF16; `out` is valid for writes of 16 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")]
#[inline]
unsafe fn narrow16(g: __m512, out: *mut bf16) {
    // 0x20: denormal (the conversion would flush it to zero).
    if _mm512_fpclass_ps_mask::<0x20>(g) == 0 {
        let h: __m256i = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(g));
        // SAFETY: the caller's.
        unsafe { _mm256_storeu_si256(out.cast(), h) };
    } else {
        let g: [f32; GROUP] = std::mem::transmute::<__m512, [f32; GROUP]>(g);
        for (k, &g) in g.iter().enumerate() {
            // SAFETY: the caller's.
            unsafe { out.add(k).write(<bf16 as RowElement>::narrow(g)) };
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::cpu::isa::Isa;
    use rayon::prelude::*;

    #[test]
    fn narrow16_equals_half_on_every_non_nan_f32() {
        if !Isa::Avx512Bf16.is_supported() {
            return;
        }
        // Every f32 bit pattern, 16 consecutive ones per call.
        let mismatches = (0u32..1 << 16)
            .into_par_iter()
            .filter(|&hi| {
                (0u32..1 << 12).any(|j| {
                    let g: [f32; GROUP] =
                        std::array::from_fn(|k| f32::from_bits(hi << 16 | j << 4 | k as u32));
                    let mut out = [bf16::ZERO; GROUP];
                    // SAFETY: supported (checked above); `out` holds 16 values.
                    unsafe {
                        narrow16(
                            std::mem::transmute::<[f32; GROUP], __m512>(g),
                            out.as_mut_ptr(),
                        )
                    };
                    g.iter()
                        .zip(out)
                        .any(|(g, o)| !g.is_nan() && o.to_bits() != bf16::from_f32(*g).to_bits())
                })
            })
            .count();
        assert_eq!(mismatches, 0);
    }
}
