//! A branch-free `exp` that LLVM vectorizes (std's `f32::exp` is a libm call per element).
//!
//! Cephes-style: split x = n·ln2 + r with |r| ≤ ln2/2, evaluate e^r by a degree-6 polynomial
//! and scale by 2^n through the exponent bits. Max relative error ≈ 2 ulp on [-87, 88];
//! inputs below -87 return ≈ 1e-38 instead of 0 (harmless for sums that include e^0 = 1).

use super::isa::madd;

const LOG2_E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in a high part exact in f32 and a low correction, so n·ln2 is subtracted exactly.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
// Adding then subtracting 1.5·2^23 rounds to the nearest integer without a libm call.
pub(crate) const ROUND_MAGIC: f32 = 12_582_912.0;

// The polynomial coefficients are Cephes' `expf` ones as published; keep their digits.
/// `e^x` in f32 without libm (Cephes' range reduction and polynomial, ~1 ulp), clamped to
/// `[-87, 88]` so that it never overflows or returns a denormal; vectorizes in the ops' loops.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    fast_exp_with::<false>(x)
}

/// [`fast_exp`] with its multiply-adds fused when `FMA` (the row loops' FMA builds: one rounding
/// per step instead of two, so results differ from [`fast_exp`] within its error, ~2 ulp).
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub(crate) fn fast_exp_with<const FMA: bool>(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let shifted = madd::<FMA>(x, LOG2_E, ROUND_MAGIC);
    let n = shifted - ROUND_MAGIC;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, x));
    let p = 1.987_569_1e-4_f32;
    let p = madd::<FMA>(p, r, 1.398_199_9e-3);
    let p = madd::<FMA>(p, r, 8.333_452e-3);
    let p = madd::<FMA>(p, r, 4.166_579_6e-2);
    let p = madd::<FMA>(p, r, 1.666_666_5e-1);
    let p = madd::<FMA>(p, r, 5.000_000_1e-1);
    // e^r ≈ 1 + r + r²·p: fused, two more steps of Horner's scheme (coefficients 1 and 1) are
    // one operation fewer than r·(r·p) + r + 1 and round no worse.
    let er = if FMA {
        madd::<FMA>(madd::<FMA>(p, r, 1.0), r, 1.0)
    } else {
        p * r * r + r + 1.0
    };
    // 2^n from the integer already sitting in `shifted`'s low mantissa bits (|n| ≤ 127 < 2^22).
    // Not `n as i32`: Rust's saturating float→int cast does not vectorize (LLVM scalarizes it
    // with a NaN check per lane), which made this function several times slower in loops.
    let n_bits = (shifted.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let scale = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    er * scale
}

// The row loops' polynomial: e^r ≈ 1 + r + r²·(C2 + C3·r + C4·r² + C5·r³), the minimax fit of
// degree 5 on |r| ≤ ln2/2 for relative error (Remez in 40-digit arithmetic): 1.8e-7 (1.5 ulp) before
// the f32 rounding of its steps, against 7e-9 for the degree-7 Cephes one above. The ops hold
// log-probs to ~1e-6 of f64 (the sum's own rounding is larger), so two multiply-adds per element
// are not worth keeping.
pub(crate) const C2: f32 = 0.499_988_7;
pub(crate) const C3: f32 = 0.166_667_7;
pub(crate) const C4: f32 = 0.041_926_7;
pub(crate) const C5: f32 = 0.008_346_551;
/// Lowest argument of [`exp_term`]: `round(−86·log2 e) = −124`, so that `2^n` times `e^r ≥ 0.7`
/// is still a normal f32 and the scale can be added to the exponent field.
pub(crate) const TERM_LOW: f32 = -86.0;
/// Highest argument of [`exp_term`] when clamped: `n = 127` and `e^r ≤ 1.42` stay finite.
pub(crate) const TERM_HIGH: f32 = 88.0;

/// `e^d` for the row loops' terms (`z − max ≤ 0` in the forward, `z − lse` in the backward), with
/// fewer operations than [`fast_exp_with`]: a degree-5 polynomial (relative error ≤ 3e-7 with
/// its rounding; tested against f64), 2^n added to the exponent bits instead of multiplied, and
/// the upper clamp only where `d` may be positive (`CLAMP_HIGH`; the forward's `d` never is).
/// `SHORT_CHAIN` (FMA builds only) evaluates the polynomial by Estrin's scheme and scales by 2^n
/// in the last multiply-add instead ([`exp_term_scaled`]): a shorter dependency chain, which pays
/// where the loop is bound by that chain (the backward) and costs where it is bound by throughput
/// (the forward's exp pass, which keeps Horner's form). `d` is clamped below at -86 (≈ 4e-38 instead of smaller
/// values or 0: harmless in a sum that includes e^0 = 1, and far below what a stored gradient
/// resolves). Without `CLAMP_HIGH`, `d`
/// must be ≤ 88; a NaN gives an unspecified value (the row loops refuse such rows by their probe).
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub(crate) fn exp_term<const FMA: bool, const CLAMP_HIGH: bool, const SHORT_CHAIN: bool>(
    d: f32,
) -> f32 {
    let d = if d < TERM_LOW { TERM_LOW } else { d };
    let d = if CLAMP_HIGH && d > TERM_HIGH {
        TERM_HIGH
    } else {
        d
    };
    exp_term_in_range::<FMA, SHORT_CHAIN>(d)
}

/// [`exp_term`] without its clamps, for `d` known to lie in `[TERM_LOW, 88]` (the clamps are the
/// identity there: the same value, bit for bit). The forward's exp pass uses it for a chunk whose
/// smallest logit is within 86 of the row max (the usual case), one operation per 8 lanes fewer.
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub(crate) fn exp_term_in_range<const FMA: bool, const SHORT_CHAIN: bool>(d: f32) -> f32 {
    if FMA && SHORT_CHAIN {
        return exp_term_scaled(d);
    }
    let shifted = madd::<FMA>(d, LOG2_E, ROUND_MAGIC);
    let n = shifted - ROUND_MAGIC;
    // Fused: one step with ln 2 rounded to f32 (its error, 1.9e-9, times |n| ≤ 124 is a relative
    // error of at most 2.4e-7, far below f32's own rounding of `d`, 6e-8·|d|), one multiply-add
    // and one constant register fewer in the loops than Cody-Waite's two steps. Unfused, the
    // product n·ln 2 would be rounded (3.8e-6 at n = 124): there `n·LN2_HI` is exact instead.
    let r = if FMA {
        madd::<FMA>(-n, std::f32::consts::LN_2, d)
    } else {
        (d - n * LN2_HI) - n * LN2_LO
    };
    let er = if FMA {
        let q = madd::<FMA>(madd::<FMA>(madd::<FMA>(C5, r, C4), r, C3), r, C2);
        madd::<FMA>(madd::<FMA>(q, r, 1.0), r, 1.0)
    } else {
        let q = madd::<FMA>(madd::<FMA>(madd::<FMA>(C5, r, C4), r, C3), r, C2);
        q * r * r + r + 1.0
    };
    // `shifted`'s bits are those of 1.5·2^23 plus n, and 1.5·2^23's bits end in 22 zeros: shifted
    // left by 23 they leave n·2^23 (mod 2^32), the exponent increment. e^r ∈ [0.70, 1.42] has
    // exponent field 126 or 127, n ∈ [−124, 127]: the sum stays within [2, 254], a normal f32.
    let n_bits = shifted.to_bits() << 23;
    f32::from_bits(er.to_bits().wrapping_add(n_bits))
}

/// `1.5·2^23 + 127`: adding it rounds to an integer as [`ROUND_MAGIC`] does, and leaves `n + 127`
/// (2^n's exponent field) in the low 9 bits.
pub(crate) const ROUND_MAGIC_BIASED: f32 = 12_583_039.0;

/// [`exp_term_in_range`]'s FMA build with `SHORT_CHAIN`: Estrin's scheme,
/// `q = (C2 + C3·r) + r²·(C4 + C5·r)`, then `e = (2^n·r²)·q + 2^n·(1 + r)`. `2^n` is one shift of
/// `shifted`'s bits (the biased rounding constant already holds the exponent bias), so Horner's
/// `+ 1` and exponent add go; `2^n·r²` (exact) and `2^n + 2^n·r` are computed beside `q`, which
/// leaves 3 dependent steps from `r` (r², q, e) instead of 4 (5 in Horner's form): the backward's loop is bound by
/// that chain (measured: bf16 in-place backward ≈ 1.17 → 1.10 cycles per logit, hot). Rounding:
/// `fl(1 + r)` then one more rounding, within [`exp_term`]'s stated 3e-7 (tested).
#[allow(clippy::excessive_precision)]
#[inline(always)]
fn exp_term_scaled(d: f32) -> f32 {
    let shifted = madd::<true>(d, LOG2_E, ROUND_MAGIC_BIASED);
    let n = shifted - ROUND_MAGIC_BIASED;
    let r = madd::<true>(-n, std::f32::consts::LN_2, d);
    let r2 = r * r;
    let q = madd::<true>(madd::<true>(C5, r, C4), r2, madd::<true>(C3, r, C2));
    // The low 9 bits of `shifted` are n + 127 ∈ [3, 254] (n ∈ [−124, 127]): shifted into the
    // exponent field they are 2^n, a normal f32; the bits above them shift out.
    let scale = f32::from_bits(shifted.to_bits() << 23);
    let head = madd::<true>(scale, r, scale);
    madd::<true>(scale * r2, q, head)
}

// Degree 4 for gradients stored in bf16 (8 significant bits): e^r ≈ 1 + r + r²·(D2 + D3·r +
// D4·r²), the minimax fit on |r| ≤ ln2/2 for relative error (Remez): 5.3e-6 before the f32
// rounding of its steps. A bf16 store rounds by up to 2^-9 = 2e-3; an error this small moves a
// stored value by one ulp only where the exact one lies within 5.3e-6 of a rounding midpoint.
pub(crate) const D2: f32 = 0.500_051_16;
pub(crate) const D3: f32 = 0.167_535_14;
pub(crate) const D4: f32 = 0.041_277_75;

/// [`exp_term`]`::<true, true, true>` with the degree-4 polynomial above (relative error ≤ 6e-6
/// plus the one-step reduction's 2.7e-9 per unit of |d|; tested against f64): one multiply-add
/// and one constant fewer, for the backward of bf16 rows (FMA builds only).
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub(crate) fn exp_term_coarse(d: f32) -> f32 {
    let d = if d < TERM_LOW { TERM_LOW } else { d };
    let d = if d > TERM_HIGH { TERM_HIGH } else { d };
    let shifted = madd::<true>(d, LOG2_E, ROUND_MAGIC_BIASED);
    let n = shifted - ROUND_MAGIC_BIASED;
    let r = madd::<true>(-n, std::f32::consts::LN_2, d);
    let r2 = r * r;
    let q = madd::<true>(D4, r2, madd::<true>(D3, r, D2));
    let scale = f32::from_bits(shifted.to_bits() << 23);
    let head = madd::<true>(scale, r, scale);
    madd::<true>(scale * r2, q, head)
}

#[cfg(test)]
mod tests {
    use super::fast_exp;

    #[test]
    fn exp_term_coarse_matches_f64_to_6e_6() {
        let mut worst = 0.0f64;
        let mut x = -86.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::exp_term_coarse(x) as f64;
            let excess = ((got - want) / want).abs() - 2.7e-9 * (x as f64).abs();
            worst = worst.max(excess);
            x += 0.000_731;
        }
        assert!(worst < 6e-6, "{worst}");
        assert!(worst > 4e-6, "{worst}: not the degree-4 polynomial's error");
        for x in [-86.0f32, -90.0, -1.0e4, f32::MIN, f32::NEG_INFINITY] {
            let e = super::exp_term_coarse(x);
            assert!(e.is_normal() && e < 1e-37, "{x}: {e}");
        }
        for x in [88.0f32, 1.0e4, f32::MAX, f32::INFINITY] {
            let e = super::exp_term_coarse(x);
            assert!(e.is_finite() && e > 1e38, "{x}: {e}");
        }
        assert_eq!(super::exp_term_coarse(0.0), 1.0);
    }

    #[test]
    fn matches_std_exp_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = fast_exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn fused_build_matches_std_exp_to_a_few_ulp() {
        // Run where it is compiled with FMA (a libm fmaf per step elsewhere: slow but exact).
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::fast_exp_with::<true>(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(super::fast_exp_with::<true>(f32::NAN).is_nan());
        assert!(super::fast_exp_with::<true>(-1.0e4) >= 0.0);
    }

    #[test]
    fn nan_propagates() {
        assert!(fast_exp(f32::NAN).is_nan());
    }

    #[test]
    fn scale_bits_equal_the_integer_cast() {
        // The exponent is taken from the rounding-shifted bits; it must be exactly round(x·log2 e).
        let mut x = -90.0f32;
        while x < 90.0 {
            let xc = x.clamp(-87.0, 88.0);
            let n = (xc * super::LOG2_E + super::ROUND_MAGIC) - super::ROUND_MAGIC;
            let r = xc - n * super::LN2_HI - n * super::LN2_LO;
            let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
            let er = fast_exp(r); // |r| ≤ ln2/2 ⇒ n = 0 there, scale 1
            assert_eq!(fast_exp(x), er * scale, "x = {x}");
            x += 0.013;
        }
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        assert!(fast_exp(-1.0e4) < 1e-37);
        assert!(fast_exp(-1.0e4) >= 0.0);
        assert!(fast_exp(1.0e4).is_finite());
    }

    /// The row loops' exp against f64 over its whole range, both clamps: the worst relative error
    /// beyond `per_unit · |x|`.
    fn exp_term_error<const FMA: bool>(per_unit: f64) -> f64 {
        let mut worst = 0.0f64;
        let mut x = -86.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            for got in [
                super::exp_term::<FMA, true, false>(x),
                super::exp_term::<FMA, false, false>(x),
                super::exp_term::<FMA, true, true>(x),
                super::exp_term::<FMA, false, true>(x),
            ] {
                let excess = ((got as f64 - want) / want).abs() - per_unit * (x as f64).abs();
                worst = worst.max(excess);
            }
            x += 0.000_731;
        }
        worst
    }

    #[test]
    fn exp_term_matches_f64_to_3e_7() {
        // 1.8e-7 of the polynomial plus the rounding of its steps; fused, plus the one-step
        // reduction's 1.9e-9 per unit of |n| = |x|·log2 e.
        let unfused = exp_term_error::<false>(0.0);
        assert!(unfused < 3e-7, "{unfused}");
        let fused = exp_term_error::<true>(1.9e-9 * std::f64::consts::LOG2_E);
        assert!(fused < 3e-7, "{fused}");
    }

    #[test]
    fn exp_term_clamps_stay_normal_and_finite() {
        use super::exp_term;
        for x in [-86.0f32, -86.5, -90.0, -1.0e4, f32::MIN, f32::NEG_INFINITY] {
            for e in [
                exp_term::<true, true, false>(x),
                exp_term::<true, false, false>(x),
                exp_term::<true, true, true>(x),
                exp_term::<true, false, true>(x),
                exp_term::<false, true, false>(x),
            ] {
                assert!(e.is_normal() && e < 1e-37, "{x}: {e}");
            }
        }
        for x in [88.0f32, 88.5, 1.0e4, f32::MAX, f32::INFINITY] {
            for e in [
                exp_term::<true, true, false>(x),
                exp_term::<true, true, true>(x),
                exp_term::<false, true, false>(x),
            ] {
                assert!(e.is_finite() && e > 1e38, "{x}: {e}");
            }
        }
        // Exactly 1 at 0 (the row max's own term).
        assert_eq!(exp_term::<true, false, false>(0.0), 1.0);
        assert_eq!(exp_term::<true, true, true>(0.0), 1.0);
        assert_eq!(exp_term::<false, false, false>(0.0), 1.0);
    }
}
