//! The element types the row loops read in place (no staging copy): f32, and bf16 widened a group
//! at a time by a shift and a mask on 32-bit words and narrowed by branch-free rounding, so that
//! both vectorize without shuffles. f16 has no such form
//! without F16C in the baseline build; its rows are converted a chunk at a time
//! (`load_f32` / `store_f32`) and run through the f32 loops.

use half::bf16;

use super::isa::madd;

/// An element read and written in place by the row loops.
pub(crate) trait RowElement: Copy + Send + Sync + bytemuck::Pod {
    /// A group's running test for NaN and ±inf ([`probe_group`](Self::probe_group)), in lanes
    /// so that it vectorizes.
    type Probe: Copy;
    /// The probe before any value was seen.
    const PROBE_CLEAN: Self::Probe;
    /// Adds a group to the probe (from the stored values, before an in-place loop overwrites them).
    fn probe_group<const FMA: bool>(group: &[Self; GROUP], probe: &mut Self::Probe);
    /// Whether the probe saw a NaN or ±inf.
    fn probe_found(probe: Self::Probe) -> bool;
    /// Whether values stored as this type (8 significant bits) take the backward's coarser exp
    /// (`fast_exp::exp_term_coarse`, 6e-6) in the FMA builds, and its loop's paired lane sums.
    const COARSE_EXP: bool = false;
    /// The value as f32 (exact).
    fn widen(self) -> f32;
    /// A group of [`GROUP`] values as f32, in the lane order of [`group_lane`] (how the type's
    /// register layout is cheapest to widen).
    #[inline(always)]
    fn widen_group(group: &[Self; GROUP]) -> [f32; GROUP] {
        std::array::from_fn(|k| group[group_lane::<Self>(k)].widen())
    }
    /// A block of [`BLOCK`] values as f32, in an order of the type's choosing (the forward's max
    /// pass, which stages them for its exp pass: every build uses the same order, so they sum
    /// alike). By default the groups' [`widen_group`](Self::widen_group)s one after the other.
    #[inline(always)]
    fn widen_block(block: &[Self; BLOCK]) -> [f32; BLOCK] {
        let mut out = [0.0f32; BLOCK];
        for (o, g) in out
            .chunks_exact_mut(GROUP)
            .zip(block.as_chunks::<GROUP>().0)
        {
            o.copy_from_slice(&Self::widen_group(g));
        }
        out
    }
    /// Writes `w` (in the lane order of [`widen_group`](Self::widen_group)) back as this type,
    /// each value through [`narrow`](Self::narrow).
    #[inline(always)]
    fn narrow_group(w: [f32; GROUP], out: &mut [Self; GROUP]) {
        for (k, &w) in w.iter().enumerate() {
            out[group_lane::<Self>(k)] = Self::narrow(w);
        }
    }
    /// `x` rounded to this type, to nearest even (as [`crate::LogitElement::from_f32`]), for a
    /// non-NaN `x`; a NaN gives an unspecified value. The backward's gradients are NaN only in
    /// rows it refuses (their contents are unspecified), so the loop carries no NaN test.
    fn narrow(x: f32) -> Self;
}

impl RowElement for f32 {
    /// `Σ fma(x, 0, ·)`: 0 while every value is finite, NaN once a NaN or ±inf was seen.
    type Probe = [f32; GROUP];
    const PROBE_CLEAN: Self::Probe = [0.0; GROUP];
    #[inline(always)]
    fn probe_group<const FMA: bool>(group: &[Self; GROUP], probe: &mut Self::Probe) {
        for (p, &x) in probe.iter_mut().zip(group) {
            *p = madd::<FMA>(x, 0.0, *p);
        }
    }
    #[inline(always)]
    fn probe_found(probe: Self::Probe) -> bool {
        probe.iter().any(|&p| p != 0.0)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(x: f32) -> Self {
        x
    }
}

/// Values the row loops widen together: one 512-bit register of f32, two 256-bit ones.
pub(crate) const GROUP: usize = 16;
/// Values the forward's max pass widens together ([`RowElement::widen_block`]): four groups.
pub(crate) const BLOCK: usize = 4 * GROUP;

/// Which element of a group lane `k` of [`RowElement::widen_group`] holds: the element itself,
/// except for bf16 (2 bytes), whose even elements go to lanes 0..8 and odd ones to lanes 8..16.
/// Read as eight 32-bit words, a group of bf16 has element 2j in word j's low half and 2j + 1 in
/// its high half: the high halves are f32 already once the low ones are masked off, and the low
/// halves once shifted up. Two operations per 16 values instead of a widening shuffle and a shift
/// per 8 (and, narrowing, a mask, a shift and an or instead of a pack and a lane permute). The
/// sums run over lanes, so only their order changes; every build uses the same order.
#[inline(always)]
pub(crate) const fn group_lane<E>(k: usize) -> usize {
    if std::mem::size_of::<E>() == 2 && cfg!(target_endian = "little") {
        if k < GROUP / 2 {
            2 * k
        } else {
            2 * (k - GROUP / 2) + 1
        }
    } else {
        k
    }
}

impl RowElement for bf16 {
    /// The largest `bits << 1` (as u16: the sign shifted out): at least `0xFF00` exactly when the
    /// exponent field of some value was all ones (NaN or ±inf). Two integer operations per 16
    /// values and one register, against a multiply-add per 8 values and two registers in f32.
    type Probe = [u16; GROUP];
    const PROBE_CLEAN: Self::Probe = [0; GROUP];
    const COARSE_EXP: bool = true;
    #[inline(always)]
    fn probe_group<const FMA: bool>(group: &[Self; GROUP], probe: &mut Self::Probe) {
        let bits: [u16; GROUP] = bytemuck::cast(*group);
        for (p, b) in probe.iter_mut().zip(bits) {
            *p = (*p).max(b << 1);
        }
    }
    #[inline(always)]
    fn probe_found(probe: Self::Probe) -> bool {
        probe.iter().any(|&p| p >= 0xFF00)
    }
    /// bf16 is f32's top half. (half's `to_f32` also sets the quiet bit of a NaN; a NaN stays a
    /// NaN here too, which is all the ops look at.)
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[inline(always)]
    fn widen_group(group: &[Self; GROUP]) -> [f32; GROUP] {
        let words: [u32; GROUP / 2] = bytemuck::cast(*group);
        if cfg!(target_endian = "little") {
            std::array::from_fn(|k| {
                if k < GROUP / 2 {
                    f32::from_bits(words[k] << 16)
                } else {
                    f32::from_bits(words[k - GROUP / 2] & 0xFFFF_0000)
                }
            })
        } else {
            std::array::from_fn(|k| group[k].widen())
        }
    }

    /// Element `2j` (the low half of 32-bit word `j`) at `j`, element `2j + 1` at `BLOCK/2 + j`:
    /// a shift and a mask per register of words, with no shuffle (a group's
    /// [`widen_group`](RowElement::widen_group) needs one per 16 values in the AVX-512 build;
    /// measured on Zen 4: the bf16 forward 0.79 → 0.76 cycles per logit, hot).
    #[inline(always)]
    fn widen_block(block: &[Self; BLOCK]) -> [f32; BLOCK] {
        let words: [u32; BLOCK / 2] = bytemuck::cast(*block);
        if cfg!(target_endian = "little") {
            let mut out = [0.0f32; BLOCK];
            let (lo, hi) = out.split_at_mut(BLOCK / 2);
            for ((l, h), w) in lo.iter_mut().zip(hi.iter_mut()).zip(words) {
                *l = f32::from_bits(w << 16);
                *h = f32::from_bits(w & 0xFFFF_0000);
            }
            out
        } else {
            std::array::from_fn(|k| block[k].widen())
        }
    }

    #[inline(always)]
    fn narrow_group(w: [f32; GROUP], out: &mut [Self; GROUP]) {
        if cfg!(target_endian = "little") {
            let rounded = w.map(|x| Self::narrow(x).to_bits() as u32);
            let words: [u32; GROUP / 2] =
                std::array::from_fn(|j| rounded[j] | (rounded[j + GROUP / 2] << 16));
            *out = bytemuck::cast(words);
        } else {
            for (o, x) in out.iter_mut().zip(w) {
                *o = Self::narrow(x);
            }
        }
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
    fn probes_find_exactly_the_non_finite_values() {
        // Every bf16 bit pattern, alone in a group of finite values, in every lane.
        for b in 0..=u16::MAX {
            let x = bf16::from_bits(b);
            for at in [0, 7, 8, GROUP - 1] {
                let mut group = [bf16::from_f32(-1.5); GROUP];
                group[at] = x;
                let mut probe = bf16::PROBE_CLEAN;
                <bf16 as RowElement>::probe_group::<true>(&group, &mut probe);
                assert_eq!(bf16::probe_found(probe), !x.is_finite(), "{b:#06x} at {at}");
            }
        }
        for x in [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-45,
        ] {
            for bad in [
                None,
                Some(f32::NAN),
                Some(f32::INFINITY),
                Some(f32::NEG_INFINITY),
            ] {
                let mut group = [x; GROUP];
                if let Some(bad) = bad {
                    group[GROUP / 2 + 1] = bad;
                }
                for fused in [false, true] {
                    let mut probe = f32::PROBE_CLEAN;
                    if fused {
                        <f32 as RowElement>::probe_group::<true>(&group, &mut probe);
                    } else {
                        <f32 as RowElement>::probe_group::<false>(&group, &mut probe);
                    }
                    assert_eq!(f32::probe_found(probe), bad.is_some(), "{x} {bad:?}");
                }
            }
        }
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

    #[test]
    fn bf16_groups_widen_and_narrow_in_lane_order() {
        let lane = group_lane::<bf16>;
        let mut seen = [false; GROUP];
        for k in 0..GROUP {
            seen[lane(k)] = true;
        }
        assert!(seen.iter().all(|&s| s), "every element in one lane");
        let group: [bf16; GROUP] = std::array::from_fn(|i| bf16::from_f32(i as f32 * 1.5 - 7.25));
        let wide = <bf16 as RowElement>::widen_group(&group);
        for k in 0..GROUP {
            assert_eq!(wide[k], group[lane(k)].to_f32(), "lane {k}");
        }
        // Off bf16's grid (one tie among them): each lands where it came from, rounded as half does.
        let w: [f32; GROUP] = std::array::from_fn(|k| k as f32 * 0.001_37 - 3.3);
        let mut w = w;
        w[5] = f32::from_bits(0x3F80_8000); // 1 + 2^-8: a tie, to even (1.0)
        let mut out = [bf16::ZERO; GROUP];
        <bf16 as RowElement>::narrow_group(w, &mut out);
        for k in 0..GROUP {
            assert_eq!(
                out[lane(k)].to_bits(),
                bf16::from_f32(w[k]).to_bits(),
                "lane {k}"
            );
        }
        // f32 groups are the identity.
        let g: [f32; GROUP] = std::array::from_fn(|i| i as f32 - 0.5);
        assert_eq!(<f32 as RowElement>::widen_group(&g), g);
        let mut o = [0.0f32; GROUP];
        <f32 as RowElement>::narrow_group(g, &mut o);
        assert_eq!(o, g);
    }
}
