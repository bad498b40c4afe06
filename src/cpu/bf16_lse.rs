//! The forward's online logsumexp over a bf16 row for CPUs with AVX-512 ([`Isa::Avx512`] and
//! up): the algorithm of the generic loop (`OnlineLse::add_chunk`: per chunk a max pass from
//! memory, then an exp pass from L1 while the next chunk is prefetched), written for bf16's
//! layout. 32 logits are one 512-bit load, whose 16 low halves (the even elements) widen to f32
//! by a shift and whose high halves (the odd ones) by a mask: no widening shuffle, and nothing
//! staged through the stack (the generic loop stores every widened chunk for its exp pass; here
//! the exp pass reloads the bf16 chunk from L1 and widens it again, two operations per 32).
//! The probe's largest `|bits|` also bounds the chunk from below (every `x ≥ −max|x|`), which
//! replaces the generic loop's min: the exp needs no clamp when `−max|x| − max ≥ −86`.
//!
//! Each term `exp(x − max)` is the generic FMA build's `exp_term_in_range` value bit for bit (the
//! same steps; `2^n` applied by `vscalefps`, exact for these normal results, instead of an
//! exponent add); the sums associate differently (even and odd lanes), so `ln Σ` differs from
//! the AVX2 build's within the tests' stated bound between builds (2^-20), not bit for bit.
//! Measured on the Sapphire Rapids dev machine (one row in L1/L2, one core, best of 15): 0.79–1.14
//! → 0.59–0.76 cycles per logit against the generic AVX-512 loop (docs/PERFORMANCE.md).
//!
//! [`Isa::Avx512`]: super::isa::Isa::Avx512

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::bf16;

use super::fast_exp::{fast_exp_with, C2, C3, C4, C5, ROUND_MAGIC, TERM_LOW};
use super::prefetch::prefetch;
use super::row_element::RowElement;
use super::CHUNK;

/// Logits per 512-bit load.
const PER_LOAD: usize = 32;
const _: () = assert!(CHUNK.is_multiple_of(2 * PER_LOAD));

/// `(max, ln Σ exp(z − max), row_is_finite)` of a bf16 row, as `row_logsumexp` returns it.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/DQ and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
pub(crate) unsafe fn row_logsumexp(z: &[bf16]) -> (f32, f32, bool) {
    let mut max = f32::NEG_INFINITY;
    let mut sum = 0.0f32;
    let mut non_finite = false;
    let high_halves = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for chunk in z.chunks(CHUNK) {
        let p = chunk.as_ptr();
        let full = chunk.len() / PER_LOAD;
        let rest = chunk.len() % PER_LOAD;
        // The rest's load: its missing words are the chunk's first value (the max pass) or
        // zeros whose terms are masked off (the exp pass).
        let rest_words: __mmask32 = (1u32 << rest).wrapping_sub(1);
        let first = _mm512_set1_epi16(chunk[0].to_bits() as i16);

        // Max pass, from memory: two loads per step, four max chains and two probe chains.
        let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
        let mut probe = [_mm512_setzero_si512(); 2];
        // (A macro, not a closure: the intrinsics must inline into this function's features.)
        macro_rules! max_step {
            ($w:expr, $half:expr) => {{
                let (w, half) = ($w, $half);
                probe[half] = _mm512_max_epu16(probe[half], _mm512_add_epi16(w, w));
                let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w));
                let odd = _mm512_castsi512_ps(_mm512_and_si512(w, high_halves));
                // `max(x, m)` returns `m` when x is a NaN: the probe sees those.
                m[2 * half] = _mm512_max_ps(even, m[2 * half]);
                m[2 * half + 1] = _mm512_max_ps(odd, m[2 * half + 1]);
            }};
        }
        for i in (0..full / 2 * 2).step_by(2) {
            // SAFETY: loads `i` and `i + 1` lie within the chunk (`i + 1 < full`).
            let (a, b) = unsafe {
                (
                    _mm512_loadu_si512(p.add(i * PER_LOAD).cast()),
                    _mm512_loadu_si512(p.add((i + 1) * PER_LOAD).cast()),
                )
            };
            max_step!(a, 0);
            max_step!(b, 1);
        }
        if full % 2 == 1 {
            // SAFETY: load `full − 1` lies within the chunk.
            max_step!(
                unsafe { _mm512_loadu_si512(p.add((full - 1) * PER_LOAD).cast()) },
                0
            );
        }
        if rest > 0 {
            // SAFETY: the words of `rest_words` lie within the chunk; the others are not read
            // (a masked load does not touch, nor fault on, masked-off memory).
            max_step!(
                unsafe {
                    _mm512_mask_loadu_epi16(first, rest_words, p.add(full * PER_LOAD).cast())
                },
                0
            );
        }
        let chunk_max = _mm512_reduce_max_ps(_mm512_max_ps(
            _mm512_max_ps(m[0], m[1]),
            _mm512_max_ps(m[2], m[3]),
        ));
        // The largest `bits << 1` over the chunk (the sign shifted out): at least 0xFF00 exactly
        // when some value is a NaN or ±inf; otherwise, shifted back, the bits of max |x|.
        let probe = _mm512_max_epu16(probe[0], probe[1]);
        let probe = _mm256_max_epu16(
            _mm512_castsi512_si256(probe),
            _mm512_extracti64x4_epi64::<1>(probe),
        );
        let probe: [u16; 16] = std::mem::transmute::<__m256i, [u16; 16]>(probe);
        non_finite |= <bf16 as RowElement>::probe_found(probe);
        let largest = probe.into_iter().max().unwrap_or(0);
        let max_abs = f32::from_bits(((largest >> 1) as u32) << 16);
        if chunk_max > max {
            // exp(−inf) = 0 handles the first chunk (the sum is 0 then anyway).
            sum *= fast_exp_with::<true>(max - chunk_max);
            max = chunk_max;
        }
        // Every x of the chunk is at least −max|x|, and the rounding of `x − max` is monotone:
        // every `x − max` is then ≥ TERM_LOW, where the exp needs no clamp.
        let in_range = -max_abs - max >= TERM_LOW;
        // SAFETY: the caller's features; `p` holds `chunk.len()` values.
        let lane_sum = unsafe {
            if in_range {
                exp_pass::<false>(p, full, rest, max)
            } else {
                exp_pass::<true>(p, full, rest, max)
            }
        };
        sum += _mm512_reduce_add_ps(lane_sum);
    }
    (max, sum.ln(), !non_finite && max.is_finite())
}

/// `Σ exp(x − max)` over `full · 32 + rest` values at `p`, in lanes; `CLAMP`: `x − max` clamped
/// below at `TERM_LOW` (as `exp_term` does). Prefetches the 4 KiB that follow, one line per load.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/DQ and FMA; `p` is valid for reads of `full · 32 + rest` values,
/// `rest < 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
#[inline]
unsafe fn exp_pass<const CLAMP: bool>(
    p: *const bf16,
    full: usize,
    rest: usize,
    max: f32,
) -> __m512 {
    let c = |x: f32| _mm512_set1_ps(x);
    let (v_max, low) = (c(max), c(TERM_LOW));
    let (log2e, magic, ln2) = (
        c(std::f32::consts::LOG2_E),
        c(ROUND_MAGIC),
        c(std::f32::consts::LN_2),
    );
    let (c2, c3, c4, c5, one) = (c(C2), c(C3), c(C4), c(C5), c(1.0));
    let high_halves = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    // exp_term_in_range::<true, false>, operation for operation, with 2^n applied by scalef
    // (exact: the results are normal, n ∈ [−124, 0]).
    macro_rules! term {
        ($x:expr) => {{
            let x: __m512 = $x;
            let d = _mm512_sub_ps(x, v_max);
            let d = if CLAMP { _mm512_max_ps(d, low) } else { d };
            let shifted = _mm512_fmadd_ps(d, log2e, magic);
            let n = _mm512_sub_ps(shifted, magic);
            let r = _mm512_fnmadd_ps(n, ln2, d);
            let q = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(c5, r, c4), r, c3), r, c2);
            let er = _mm512_fmadd_ps(_mm512_fmadd_ps(q, r, one), r, one);
            _mm512_scalef_ps(er, n)
        }};
    }
    let (mut even_sum, mut odd_sum) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for i in 0..full {
        let at = p.add(i * PER_LOAD);
        // The chunk after this one, one line per load (a hint: never faults).
        prefetch(at.wrapping_add(CHUNK));
        // SAFETY: load `i < full` lies within the range the caller vouches for.
        let w = unsafe { _mm512_loadu_si512(at.cast()) };
        even_sum = _mm512_add_ps(
            even_sum,
            term!(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))),
        );
        odd_sum = _mm512_add_ps(
            odd_sum,
            term!(_mm512_castsi512_ps(_mm512_and_si512(w, high_halves))),
        );
    }
    if rest > 0 {
        let words: __mmask32 = (1u32 << rest) - 1;
        // SAFETY: the words of `words` lie within the range; masked-off ones are not read.
        let w = unsafe { _mm512_maskz_loadu_epi16(words, p.add(full * PER_LOAD).cast()) };
        // Even element j is word 2j: there are ⌈rest/2⌉ of them, and ⌊rest/2⌋ odd ones.
        let lanes = |k: usize| ((1u32 << k) - 1) as __mmask16;
        let (evens, odds) = (lanes(rest.div_ceil(2)), lanes(rest / 2));
        let even = term!(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(w)));
        let odd = term!(_mm512_castsi512_ps(_mm512_and_si512(w, high_halves)));
        even_sum = _mm512_mask_add_ps(even_sum, evens, even_sum, even);
        odd_sum = _mm512_mask_add_ps(odd_sum, odds, odd_sum, odd);
    }
    _mm512_add_ps(even_sum, odd_sum)
}
