//! The emulation runtime itself (`kernels/emulation/cuda_host.h`): 16-bit conversions bit-exact with
//! the device's `cvt.rn` (round to nearest even; NaN → canonical 0x7fff) and the warp primitives'
//! semantics, so that a kernel passing under emulation computes what it will on the GPU.

use half::{bf16, f16};
use halo_kernels::emulation::runtime_selftest as rt;
use rand::{Rng, SeedableRng};

fn interesting_floats() -> Vec<f32> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut v: Vec<f32> = (0..200_000).map(|_| f32::from_bits(r.gen())).collect();
    v.extend([
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.99,
        65520.0,
        1e-8,
        5.9604645e-8,
        2.9802322e-8,
        2.9802326e-8,
        6.1035156e-5,
        6.097555e-5,
        f32::MAX,
        f32::MIN_POSITIVE,
        1.0e-45,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(0x3f80_8000), // 1 + 2^-8: a bf16 tie
        f32::from_bits(0x3f81_8000), // 1 + 3·2^-8: the other parity
        3.0e38,
    ]);
    // Exact ties between neighbouring bf16 / f16 values, both parities.
    for k in 0..2000u32 {
        v.push(f32::from_bits(0x3f80_8000 + (k << 16)));
        v.push(f32::from_bits(0x3f80_1000 + (k << 13)));
        v.push(f32::from_bits(0x3300_0000 + k * 4096)); // f16 subnormal range
    }
    v
}

#[test]
fn bf16_narrowing_is_round_to_nearest_even_with_canonical_nan() {
    for x in interesting_floats() {
        let got = rt::float_to_bf16_bits(x).unwrap();
        if x.is_nan() {
            assert_eq!(got, 0x7fff, "NaN {:#x}", x.to_bits());
        } else {
            assert_eq!(
                got,
                bf16::from_f32(x).to_bits(),
                "x = {x:e} ({:#x})",
                x.to_bits()
            );
        }
    }
}

#[test]
fn f16_narrowing_is_round_to_nearest_even_with_canonical_nan() {
    for x in interesting_floats() {
        let got = rt::float_to_f16_bits(x).unwrap();
        if x.is_nan() {
            assert_eq!(got, 0x7fff, "NaN {:#x}", x.to_bits());
        } else {
            assert_eq!(
                got,
                f16::from_f32(x).to_bits(),
                "x = {x:e} ({:#x})",
                x.to_bits()
            );
        }
    }
}

#[test]
fn widening_is_exact_for_every_16_bit_pattern() {
    for bits in 0..=u16::MAX {
        let (b, h) = (
            bf16::from_bits(bits).to_f32(),
            f16::from_bits(bits).to_f32(),
        );
        let (gb, gh) = (
            rt::bf16_bits_to_float(bits).unwrap(),
            rt::f16_bits_to_float(bits).unwrap(),
        );
        assert!(
            gb.to_bits() == b.to_bits() || (gb.is_nan() && b.is_nan()),
            "bf16 {bits:#x}"
        );
        assert!(
            gh.to_bits() == h.to_bits() || (gh.is_nan() && h.is_nan()),
            "f16 {bits:#x}"
        );
    }
}

#[test]
fn warp_primitives_follow_the_cuda_semantics() {
    let (grid, block) = (3u32, 96u32);
    let out = rt::warp_primitives(grid, block).unwrap();
    for b in 0..grid as i32 {
        for t in 0..block as i32 {
            let o = &out[8 * (b * block as i32 + t) as usize..][..8];
            let v = |thread: i32| thread * 10 + b * 1000;
            let lane = t % 32;
            let ctx = format!("block {b} thread {t}");
            // shfl_down: lane + 1 within the warp, own value for the last lane.
            assert_eq!(
                o[0],
                if lane < 31 { v(t + 1) } else { v(t) },
                "shfl_down {ctx}"
            );
            assert_eq!(o[1], v(t - lane), "shfl lane 0 {ctx}");
            assert_eq!(
                o[2],
                v(t - lane + ((lane ^ 3) % 8) + lane / 8 * 8),
                "shfl_xor width 8 {ctx}"
            );
            let ballot = (0..32).filter(|l| l % 3 == 0).fold(0u32, |m, l| m | 1 << l);
            assert_eq!(o[3] as u32, ballot, "ballot {ctx}");
            assert_eq!(o[4], 1, "any {ctx}");
            assert_eq!(o[5], 0, "all {ctx}");
            assert_eq!(o[6], block as i32, "syncthreads + atomicAdd {ctx}");
            assert_eq!(
                o[7],
                grid as i32 * 100_000 + block as i32,
                "gridDim/blockDim {ctx}"
            );
        }
    }
}
