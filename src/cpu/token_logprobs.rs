//! Per-token log-prob gathering: `logp[r] = z[r, y_r] − logsumexp(z[r, :])`, in one pass per row.
//!
//! The row's logsumexp is kept (as the f32 `lse` and its rounding residual, see [`SavedLse`]): the
//! backward recomputes softmax from it instead of storing a `[rows, vocab]` probability matrix. Rows whose label is the ignore index are not read at all;
//! their `logp` and `lse` are 0 (PyTorch's `cross_entropy(ignore_index=-100)` likewise contributes 0).

use rayon::prelude::*;

use half::bf16;

use super::fast_exp::{exp_term, exp_term_in_range, fast_exp_with, TERM_LOW};
use super::isa::{isa, Isa};
use super::prefetch::prefetch;
use super::row_element::{RowElement, BLOCK, GROUP};
use super::saved_lse::{split_lse, SavedLse};
// CHUNK: elements reduced together; the running max is updated once per chunk.
use super::{check_labels, check_logits_shape, load_f32, min_rows_per_task, CHUNK};
use crate::dtype::{DType, LogitElement};
use crate::error::{HaloError, Result};
use crate::validate::check_forward_outputs;

/// Output of [`token_logprobs`]: one entry per row.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// `log softmax(z)[y]`, 0 where the label is ignored. Always ≤ 0.
    pub logp: Vec<f32>,
    /// `logsumexp(z)` per row rounded to f32 (0 where ignored), saved for the backward.
    pub lse: Vec<f32>,
    /// `logsumexp(z) − lse` per row: the exact rounding error of `lse` (0 where ignored).
    pub lse_residual: Vec<f32>,
}

impl TokenLogprobs {
    /// What the backward needs: `lse` with its residual.
    pub fn saved_lse(&self) -> SavedLse<&[f32]> {
        SavedLse::new(&self.lse, &self.lse_residual)
    }
}

/// Lanes of the vectorized inner loops: one 512-bit register, two 256-bit ones (the FMA builds
/// share it, so that they sum in the same order and agree bit for bit).
const LANES: usize = GROUP;

/// Gathers per-token log-probs from `logits` (`[rows, vocab]`, row-major) at `labels` (`[rows]`).
///
/// Errors: a length mismatch, `vocab == 0`, a label outside `0..vocab` that is not
/// `ignore_index`, or a non-ignored row holding NaN or ±inf (`NonFinite { what: "logits" }`; also
/// for finite logits spread wider than f32, whose log-prob f32 cannot hold).
pub fn token_logprobs<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
) -> Result<TokenLogprobs> {
    let rows = labels.len();
    let mut out = TokenLogprobs {
        logp: vec![0.0; rows],
        lse: vec![0.0; rows],
        lse_residual: vec![0.0; rows],
    };
    token_logprobs_into(
        logits,
        labels,
        vocab,
        ignore_index,
        &mut out.logp,
        &mut out.lse,
        &mut out.lse_residual,
    )?;
    Ok(out)
}

/// [`token_logprobs`] writing into caller buffers of length `rows` (the fields of
/// [`TokenLogprobs`]). On error their contents are unspecified (rows before the failing one may
/// have been written).
pub fn token_logprobs_into<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
    logp: &mut [f32],
    lse: &mut [f32],
    lse_residual: &mut [f32],
) -> Result<()> {
    let rows = check_logits_shape(logits.len(), labels.len(), vocab)?;
    check_forward_outputs(rows, logp.len(), lse.len(), lse_residual.len())?;
    check_labels(labels, vocab, ignore_index)?;
    if rows == 0 {
        return Ok(());
    }

    let first_bad_row = logits
        .par_chunks(vocab)
        .zip(labels.par_iter())
        .zip(
            logp.par_iter_mut()
                .zip(lse.par_iter_mut().zip(lse_residual.par_iter_mut())),
        )
        .with_min_len(min_rows_per_task(vocab))
        .enumerate()
        .filter_map(|(row, ((z, &label), (logp, (lse, residual))))| {
            if label == ignore_index {
                *logp = 0.0;
                *lse = 0.0;
                *residual = 0.0;
                return None;
            }
            let (row_max, ln_sum, finite) = row_logsumexp(z);
            if !finite {
                return Some(row);
            }
            (*lse, *residual) = split_lse(row_max, ln_sum);
            // `(z[y] − max) − ln Σ` (PyTorch's log_softmax order), not `z[y] − lse`: with large
            // logits lse rounds to ulp(max) (≈1e-3 at 1e4), which would swamp a small log-prob.
            // `z[y] − max` is exact (Sterbenz) whenever it is small. The clamp guards rounding.
            *logp = ((z[label as usize].to_f32() - row_max) - ln_sum).min(0.0);
            // Finite logits whose spread exceeds f32 (z[y] = -3e38 beside a max of 3e38) give a
            // log-prob beyond f32: refused as non-finite logits rather than stored as -inf.
            if !logp.is_finite() {
                return Some(row);
            }
            None
        })
        .min();
    match first_bad_row {
        Some(row) => Err(HaloError::NonFinite {
            what: "logits",
            row,
        }),
        None => Ok(()),
    }
}

/// Online logsumexp over one row: per chunk, take the chunk max, rescale the running sum if the
/// max grew, then add `exp(z − max)`. Returns `(max, ln Σ exp(z − max), row_is_finite)`;
/// the logsumexp is their sum. Runs the best build for this CPU ([`isa`]).
#[inline]
pub(crate) fn row_logsumexp<T: LogitElement>(z: &[T]) -> (f32, f32, bool) {
    row_logsumexp_on(isa(), z)
}

/// [`row_logsumexp`] in a given build, which must be supported here (the baseline otherwise).
pub(crate) fn row_logsumexp_on<T: LogitElement>(build: Isa, z: &[T]) -> (f32, f32, bool) {
    #[cfg(target_arch = "x86_64")]
    if build.is_supported() {
        match build {
            // SAFETY: the CPU has the features these builds enable (`is_supported`).
            // The forward has no bf16 rounding: the BF16 build is the AVX-512 one. bf16 rows
            // take the loop written for their layout (`bf16_lse`).
            Isa::Avx512 | Isa::Avx512Bf16 if T::DTYPE == DType::BF16 => {
                return unsafe { super::bf16_lse::row_logsumexp(bytemuck::cast_slice(z)) }
            }
            Isa::Avx512 | Isa::Avx512Bf16 => return unsafe { row_logsumexp_avx512(z) },
            Isa::Avx2Fma => return unsafe { row_logsumexp_avx2(z) },
            Isa::Portable => {}
        }
    }
    let _ = build;
    row_logsumexp_body::<T, false>(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn row_logsumexp_avx512<T: LogitElement>(z: &[T]) -> (f32, f32, bool) {
    row_logsumexp_body::<T, true>(z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_logsumexp_avx2<T: LogitElement>(z: &[T]) -> (f32, f32, bool) {
    row_logsumexp_body::<T, true>(z)
}

/// f32 and bf16 rows are read in place; f16 rows are converted a chunk at a time (see
/// [`RowElement`]).
#[inline(always)]
fn row_logsumexp_body<T: LogitElement, const FMA: bool>(z: &[T]) -> (f32, f32, bool) {
    let mut acc = OnlineLse::new();
    match T::DTYPE {
        DType::F32 => {
            for chunk in bytemuck::cast_slice::<T, f32>(z).chunks(CHUNK) {
                acc.add_chunk::<f32, FMA, true>(chunk, None);
            }
        }
        DType::BF16 => {
            // The max pass leaves each chunk widened here for the exp pass (see `add_chunk`).
            let mut staged = [0.0f32; CHUNK];
            for chunk in bytemuck::cast_slice::<T, bf16>(z).chunks(CHUNK) {
                acc.add_chunk::<bf16, FMA, true>(chunk, Some(&mut staged));
            }
        }
        DType::F16 => {
            let mut buf = [0.0f32; CHUNK];
            for chunk in z.chunks(CHUNK) {
                let buf = &mut buf[..chunk.len()];
                load_f32(chunk, buf);
                // The staging buffer is not where the next chunk lies: no prefetch.
                acc.add_chunk::<f32, FMA, false>(buf, None);
            }
        }
    }
    acc.finish()
}

/// Independent accumulators of the max pass: each of its chains (max, min, probe: a
/// multiply-add of 4 cycles' latency for f32) is carried by one group in `MAX_PASS_WAYS`, so that
/// the pass runs at the loads' rate rather than at one group per multiply-add latency (measured
/// on Zen 4: that latency was a quarter of the forward's cycles). The max, min and probe are
/// exact whatever the grouping: results do not change.
const MAX_PASS_WAYS: usize = 4;
/// Logits per step of the max pass: one group per way ([`BLOCK`]).
const MAX_PASS_BLOCK: usize = BLOCK;
const _: () = assert!(BLOCK == MAX_PASS_WAYS * LANES);

/// `Σ exp(x − max)` over `groups`, in lanes (`IN_RANGE`: every `x − max` is known to be at least
/// `TERM_LOW`, so the exp's clamp can go). With `PREFETCH`, one cache line per group from `ahead`
/// on, `stride` bytes apart.
// One index over the group and the lane arrays: the shape LLVM vectorizes.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn exp_pass<G: RowElement, const FMA: bool, const PREFETCH: bool, const IN_RANGE: bool>(
    groups: &[[G; LANES]],
    max: f32,
    ahead: *const u8,
    stride: usize,
) -> [f32; LANES] {
    let mut lane_sum = [0.0f32; LANES];
    for (i, group) in groups.iter().enumerate() {
        if PREFETCH {
            prefetch(ahead.wrapping_add(i * stride));
        }
        let x = G::widen_group(group);
        for k in 0..LANES {
            lane_sum[k] += if IN_RANGE {
                exp_term_in_range::<FMA, false>(x[k] - max)
            } else {
                exp_term::<FMA, false, false>(x[k] - max)
            };
        }
    }
    lane_sum
}

/// The running state of [`row_logsumexp`].
struct OnlineLse {
    max: f32,
    sum: f32,
    /// Whether a NaN or ±inf was seen (the element type's probe, [`RowElement::probe_group`],
    /// run in the max pass and read once per chunk).
    non_finite: bool,
}

impl OnlineLse {
    #[inline(always)]
    fn new() -> Self {
        Self {
            max: f32::NEG_INFINITY,
            sum: 0.0,
            non_finite: false,
        }
    }

    /// Adds one chunk: its max pass (from memory), then its exp pass (from L1). With `PREFETCH`,
    /// the exp pass also asks for the chunk that follows in memory (the row's next chunk, or the
    /// next row's first), one cache line per group: the exp pass is compute and the max pass is
    /// memory, and without it the two alternate instead of overlapping (the hardware prefetcher
    /// runs only a short way ahead of the loads).
    // One index over the group and the lane arrays: the shape LLVM vectorizes.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    ///
    /// With `staged` (bf16 rows), the max pass also stores each block and group as it widened it
    /// (in [`RowElement::widen_block`]'s and [`RowElement::widen_group`]'s orders), and the exp
    /// pass reads those f32 groups: the same lanes in every build, so the same sums, without
    /// widening twice (measured on Zen 4: the shuffles cost more than the stores).
    fn add_chunk<E: RowElement, const FMA: bool, const PREFETCH: bool>(
        &mut self,
        chunk: &[E],
        mut staged: Option<&mut [f32; CHUNK]>,
    ) {
        // Way `w` holds lanes `w·LANES..(w + 1)·LANES`; a group left over after the blocks goes
        // to way 0.
        let mut lane_max = [f32::NEG_INFINITY; MAX_PASS_BLOCK];
        let mut lane_min = [f32::INFINITY; MAX_PASS_BLOCK];
        let mut probe = [E::PROBE_CLEAN; MAX_PASS_WAYS];
        let (blocks, rest) = chunk.as_chunks::<MAX_PASS_BLOCK>();
        for block in blocks {
            let (ways, _) = block.as_chunks::<LANES>();
            for w in 0..MAX_PASS_WAYS {
                E::probe_group::<FMA>(&ways[w], &mut probe[w]);
            }
            let x = E::widen_block(block);
            if let Some(st) = staged.as_deref_mut() {
                let at = (block.as_ptr() as usize - chunk.as_ptr() as usize) / size_of::<E>();
                st[at..at + MAX_PASS_BLOCK].copy_from_slice(&x);
            }
            for k in 0..MAX_PASS_BLOCK {
                lane_max[k] = if x[k] > lane_max[k] {
                    x[k]
                } else {
                    lane_max[k]
                };
                // The min costs little here and spares the exp pass its clamp (below).
                lane_min[k] = if x[k] < lane_min[k] {
                    x[k]
                } else {
                    lane_min[k]
                };
            }
        }
        let (rest_groups, _) = rest.as_chunks::<LANES>();
        for group in rest_groups {
            E::probe_group::<FMA>(group, &mut probe[0]);
            let x = E::widen_group(group);
            if let Some(st) = staged.as_deref_mut() {
                let at = (group.as_ptr() as usize - chunk.as_ptr() as usize) / size_of::<E>();
                st[at..at + LANES].copy_from_slice(&x);
            }
            for k in 0..LANES {
                lane_max[k] = if x[k] > lane_max[k] {
                    x[k]
                } else {
                    lane_max[k]
                };
                lane_min[k] = if x[k] < lane_min[k] {
                    x[k]
                } else {
                    lane_min[k]
                };
            }
        }
        let (groups, tail) = chunk.as_chunks::<LANES>();
        // The ways folded lane by lane first (vector max / min: no lane holds a NaN, the
        // comparisons above never pick one), then the lanes: a fold over all of them would be a
        // chain of 64 dependent scalar steps per chunk.
        let (mut way_max, mut way_min) = ([f32::NEG_INFINITY; LANES], [f32::INFINITY; LANES]);
        for w in 0..MAX_PASS_WAYS {
            for k in 0..LANES {
                let (a, b) = (lane_max[w * LANES + k], lane_min[w * LANES + k]);
                way_max[k] = if a > way_max[k] { a } else { way_max[k] };
                way_min[k] = if b < way_min[k] { b } else { way_min[k] };
            }
        }
        // Through memory (`black_box`): reduced in registers, LLVM reorders the lanes to suit
        // the reduction and pays for it with shuffles on every group of the loop above.
        let (way_max, way_min, probe) = std::hint::black_box((way_max, way_min, probe));
        let mut chunk_max = way_max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut chunk_min = way_min.iter().copied().fold(f32::INFINITY, f32::min);
        let mut non_finite = probe.into_iter().any(E::probe_found);
        for &x in tail {
            let x = x.widen();
            chunk_max = chunk_max.max(x);
            chunk_min = chunk_min.min(x);
            non_finite |= !x.is_finite();
        }
        self.non_finite |= non_finite;
        if chunk_max > self.max {
            // exp(−inf) = 0 handles the first chunk (the sum is 0 then anyway).
            self.sum *= fast_exp_with::<FMA>(self.max - chunk_max);
            self.max = chunk_max;
        }
        // The chunk is in L1 now: the second pass does not touch memory. `x − max ≤ 0` (the max
        // is of this chunk too), so the exp needs no upper clamp.
        let max = self.max;
        let ahead = chunk.as_ptr().wrapping_add(CHUNK).cast::<u8>();
        let stride = LANES * size_of::<E>();
        // Every `x − max` of the chunk lies in [chunk_min − max, 0]: within exp_term's range
        // (false when the chunk holds a NaN or −inf: those rows are refused by the probe anyway).
        let in_range = chunk_min - max >= TERM_LOW;
        let mut lane_sum = match staged {
            Some(st) => {
                let (st, _) = st[..groups.len() * LANES].as_chunks::<LANES>();
                if in_range {
                    exp_pass::<f32, FMA, PREFETCH, true>(st, max, ahead, stride)
                } else {
                    exp_pass::<f32, FMA, PREFETCH, false>(st, max, ahead, stride)
                }
            }
            None if in_range => exp_pass::<E, FMA, PREFETCH, true>(groups, max, ahead, stride),
            None => exp_pass::<E, FMA, PREFETCH, false>(groups, max, ahead, stride),
        };
        for &x in tail {
            lane_sum[0] += exp_term::<FMA, false, false>(x.widen() - max);
        }
        self.sum += lane_sum.iter().sum::<f32>();
    }

    #[inline(always)]
    fn finish(&self) -> (f32, f32, bool) {
        let finite = !self.non_finite && self.max.is_finite();
        (self.max, self.sum.ln(), finite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::isa::ALL_ISAS;
    use crate::cpu::test_support::lse_f64;
    use half::f16;

    fn values(n: usize) -> Vec<f32> {
        // Deterministic, irregular, never 0: a cheap LCG in [-20, 20).
        let mut s = 0x2545_F491u32;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 40.0 - 20.0 + 1e-3
            })
            .collect()
    }

    fn rows<T: LogitElement>() -> Vec<Vec<T>> {
        // Lengths around the lane width, the chunk and a row's tail; offsets where lse is large.
        let mut out = Vec::new();
        for n in [1, 7, 15, 16, 17, 2047, 2048, 2049, 5000, 32_003] {
            for offset in [0.0f32, 1000.0, -3.0e4] {
                out.push(
                    values(n)
                        .into_iter()
                        .map(|x| T::from_f32(x + offset))
                        .collect(),
                );
            }
            // Spread over [-120, 120): chunks with logits more than 86 below the max, where the
            // exp pass clamps (the narrower rows above take its unclamped loop).
            out.push(
                values(n)
                    .into_iter()
                    .map(|x| T::from_f32(x * 6.0))
                    .collect(),
            );
        }
        out
    }

    /// Every build against f64, the FMA builds against each other (bit for bit, except bf16 rows
    /// between the AVX2 build and the AVX-512 ones) and the baseline against them (the stated
    /// bound: `ln Σ` within 2^-20, the max exact).
    fn builds_agree<T: LogitElement>() {
        let fma_builds: Vec<Isa> = ALL_ISAS
            .into_iter()
            .filter(|&b| b > Isa::Portable && b.is_supported())
            .collect();
        for z in rows::<T>() {
            let want = lse_f64(&z);
            let base = row_logsumexp_on(Isa::Portable, &z);
            for build in ALL_ISAS.into_iter().filter(|b| b.is_supported()) {
                let (max, ln_sum, finite) = row_logsumexp_on(build, &z);
                assert!(finite);
                let got = max as f64 + ln_sum as f64;
                // ln Σ to ~2e-6 absolute (exp's 2 ulp plus the f32 sum of up to 2000 terms per lane).
                assert!(
                    (got - want).abs() <= 2e-6,
                    "{build:?} {:?} n {}: {got} vs {want}",
                    T::DTYPE,
                    z.len()
                );
                assert_eq!(max, base.0, "{build:?}");
                assert!(
                    (ln_sum - base.1).abs() <= f32::powi(2.0, -20),
                    "{build:?} {:?} n {}: {ln_sum} vs baseline {}",
                    T::DTYPE,
                    z.len(),
                    base.1
                );
            }
            for pair in fma_builds.windows(2) {
                let (x, y) = (row_logsumexp_on(pair[0], &z), row_logsumexp_on(pair[1], &z));
                // bf16 rows take their own loop from the AVX-512 build on (`bf16_lse`: the same
                // terms, summed in another order): the same max, `ln Σ` within 2^-20.
                let own_loop = |b: Isa| T::DTYPE == DType::BF16 && b >= Isa::Avx512;
                if own_loop(pair[0]) != own_loop(pair[1]) {
                    assert_eq!(x.0.to_bits(), y.0.to_bits(), "{pair:?}");
                    assert!(
                        (x.1 - y.1).abs() <= f32::powi(2.0, -20),
                        "{pair:?}: {x:?} {y:?}"
                    );
                    continue;
                }
                assert_eq!(
                    (x.0.to_bits(), x.1.to_bits()),
                    (y.0.to_bits(), y.1.to_bits()),
                    "{pair:?}"
                );
            }
        }
    }

    #[test]
    fn every_build_matches_f64_and_the_others() {
        builds_agree::<f32>();
        builds_agree::<bf16>();
        builds_agree::<f16>();
    }

    fn probe_finds<T: LogitElement>() {
        // A NaN or ±inf anywhere (first lane, mid-group, a chunk edge, the tail) is seen by every
        // build; only the max pass looks for it.
        let n = CHUNK + 1037;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 5, 16, CHUNK - 1, CHUNK, CHUNK + 1030, n - 1] {
                let mut z: Vec<T> = values(n).into_iter().map(T::from_f32).collect();
                z[at] = T::from_f32(bad);
                for build in ALL_ISAS.into_iter().filter(|b| b.is_supported()) {
                    let (_, _, finite) = row_logsumexp_on(build, &z);
                    assert!(!finite, "{build:?} {:?}: {bad} at {at}", T::DTYPE);
                }
            }
        }
    }

    #[test]
    fn every_build_sees_non_finite_logits() {
        probe_finds::<f32>();
        probe_finds::<bf16>();
        probe_finds::<f16>();
    }
}
