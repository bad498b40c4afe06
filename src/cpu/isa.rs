//! Which build of the hot row loops runs here: chosen once per process from CPUID, then cached.
//!
//! The crate is compiled for the x86-64 baseline (SSE2); the row loops are compiled twice more
//! with wider instruction sets enabled (`#[target_feature]`) and one of the three is picked at run
//! time. The two FMA builds contract `a·b + c` explicitly ([`madd`]) and share one lane layout,
//! so they give bitwise identical results; the baseline build rounds each product and sum
//! separately, so it differs from them within rounding (bounds in the ops' unit tests).

use std::sync::atomic::{AtomicU8, Ordering};

/// A build of the row loops, ordered by what it needs: each level's CPUs run all lower levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// The x86-64 baseline (or any other architecture): no FMA.
    Portable,
    /// AVX2 + FMA (256-bit lanes).
    Avx2Fma,
    /// AVX-512 F/BW/VL/DQ + FMA (512-bit lanes).
    Avx512,
    /// [`Avx512`](Isa::Avx512) plus AVX-512 BF16: the same loops, except that the backward of bf16
    /// rows rounds its gradients to bf16 with the CPU's conversion (`bf16_cvt`), bit-equal to the
    /// other FMA builds.
    Avx512Bf16,
}

/// Every build, lowest first.
#[cfg(test)]
pub(crate) const ALL_ISAS: [Isa; 4] = [Isa::Portable, Isa::Avx2Fma, Isa::Avx512, Isa::Avx512Bf16];

/// 0: not detected yet; otherwise `1 + Isa as u8`.
static DETECTED: AtomicU8 = AtomicU8::new(0);

/// The best build this CPU runs (CPUID read once; later calls are one relaxed load).
#[inline]
pub(crate) fn isa() -> Isa {
    match DETECTED.load(Ordering::Relaxed) {
        1 => Isa::Portable,
        2 => Isa::Avx2Fma,
        3 => Isa::Avx512,
        4 => Isa::Avx512Bf16,
        _ => {
            let found = detect();
            DETECTED.store(1 + found as u8, Ordering::Relaxed);
            found
        }
    }
}

impl Isa {
    /// Whether this CPU can run the build.
    pub(crate) fn is_supported(self) -> bool {
        self <= isa()
    }
}

#[cold]
fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2_fma = has!("avx2") && has!("fma");
        if avx2_fma && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            if has!("avx512bf16") {
                return Isa::Avx512Bf16;
            }
            return Isa::Avx512;
        }
        if avx2_fma {
            return Isa::Avx2Fma;
        }
    }
    Isa::Portable
}

/// `a·b + c`: one fused multiply-add (single rounding) in the FMA builds, a multiply then an add in
/// the baseline build (whose CPUs may lack FMA: `f32::mul_add` would be a libm call per element).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_is_cached_and_ordered() {
        let first = isa();
        assert_eq!(isa(), first);
        assert!(Isa::Portable.is_supported());
        for level in ALL_ISAS {
            assert_eq!(level.is_supported(), level <= first);
        }
    }

    #[test]
    fn madd_rounds_once_only_when_fused() {
        // (1 + 2^-12)² = 1 + 2^-11 + 2^-24: the 2^-24 is lost by a separate multiply (ties to
        // even) and kept by a fused one, where subtracting 1 + 2^-11 leaves it exactly.
        let a = 1.0 + f32::powi(2.0, -12);
        let c = -(1.0 + f32::powi(2.0, -11));
        assert_eq!(madd::<true>(a, a, c), f32::powi(2.0, -24));
        assert_eq!(madd::<false>(a, a, c), 0.0);
    }
}
