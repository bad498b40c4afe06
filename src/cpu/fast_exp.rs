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
const ROUND_MAGIC: f32 = 12_582_912.0;

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

#[cfg(test)]
mod tests {
    use super::fast_exp;

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
}
