//! Runtime choice of the AVX-512 or AVX2 build of the element-wise loops.
//!
//! The crate is compiled for baseline x86-64 (SSE2, 4 lanes), so LLVM vectorizes the ops' loops
//! 4 wide. [`avx2_twin`] compiles a loop twice more, with AVX-512F (16 lanes) and with AVX2 (8
//! lanes), and runs the widest build the CPU has. No FMA: Rust never fuses a multiply and an add
//! on its own, and the reductions keep a fixed number of partial sums whatever the width, so
//! every build does the same IEEE operations in the same order and gives the same bits.
//!
//! Why AVX-512 even where it runs at AVX2's throughput (Zen 4 splits a 512-bit operation in
//! two): loops like GELU's are bound by their dependency chains, not by throughput, and a
//! 16-lane op carries twice the elements through the same chain (GELU forward 1.2 -> 0.6 ns an
//! element, same bits).

/// Whether the CPU has AVX2 (checked once, then cached by `std`).
#[inline]
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX-512F (checked once, then cached by `std`).
#[inline]
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `fn name(args) -> ret { body }` whose body runs compiled with AVX-512F or AVX2 where
/// the CPU has it: the body becomes an `#[inline(always)]` function, inlined (so vectorized 16 or
/// 8 wide) into twins called when [`avx512`] or [`avx2`] says so; the baseline build otherwise.
macro_rules! avx2_twin {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn avx2_build($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512_build($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::autograd::cpu::simd::avx512() {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { avx512_build($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::autograd::cpu::simd::avx2() {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { avx2_build($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
pub(crate) use avx2_twin;

/// Number of partial sums of [`sum`] and [`dot`]: 16 lanes, two AVX2 registers, enough to hide
/// the latency of the additions.
const LANES: usize = 16;

/// `Σ x` as 16 interleaved partial sums (element `i` into sum `i mod 16`) added pairwise at the
/// end: vectorizes, unlike a sequential sum (which LLVM may not reorder).
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += v;
    }
    reduce(acc)
}

/// `Σ f(a_i, b_i)` with the partial sums of [`sum`].
#[inline(always)]
pub(crate) fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (xa, xb) in (&mut ca).zip(&mut cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(xa).zip(xb) {
            *s += f(u, v);
        }
    }
    for ((s, &u), &v) in acc.iter_mut().zip(ca.remainder()).zip(cb.remainder()) {
        *s += f(u, v);
    }
    reduce(acc)
}

/// The pairwise sum of `N` (a power of two) partial sums: `acc[i] += acc[i + N/2]`, halving until
/// one is left; a fixed order, so every build gets the same value.
#[inline(always)]
pub(crate) fn reduce<T: Copy + std::ops::AddAssign, const N: usize>(mut acc: [T; N]) -> T {
    let mut width = N / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    avx2_twin! {
        fn sum_avx2(x: &[f32]) -> f32 {
            sum(x)
        }
    }

    #[test]
    fn sums_match_f64_at_awkward_lengths() {
        for len in [0usize, 1, 7, 15, 16, 17, 33, 100, 257] {
            let a: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
                .collect();
            let b: Vec<f32> = (0..len)
                .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.7)
                .collect();
            let want: f64 = a.iter().map(|&v| v as f64).sum();
            let want_dot: f64 = a.iter().zip(&b).map(|(&u, &v)| u as f64 * v as f64).sum();
            let got = sum_avx2(&a);
            let got_dot = sum_zip(&a, &b, |u, v| u * v);
            assert!(
                (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{len}"
            );
            assert!(
                (got_dot as f64 - want_dot).abs() <= 1e-5 * (1.0 + want_dot.abs()),
                "{len}"
            );
            assert_eq!(sum(&a), got, "both builds give the same bits");
        }
    }
}
