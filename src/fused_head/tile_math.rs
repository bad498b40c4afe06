//! The per-row arithmetic on one f32 logits tile: its (max, Σ exp) for the online logsumexp, the
//! merge of two such partials, and the in-place turn of a tile row into `∂L/∂z`.
//! 8-wide lanes so that LLVM vectorizes (as `crate::cpu`'s row loops).

use crate::cpu::fast_exp::fast_exp;

const LANES: usize = 8;

/// One row's logsumexp state over the vocabulary seen so far: `sum = Σ exp(z − max)`, and the
/// label's logit once its tile has been seen (0 before: it lies in exactly one tile).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowPartial {
    pub max: f32,
    pub sum: f32,
    pub label_logit: f32,
    /// Every logit seen was finite.
    pub finite: bool,
}

impl RowPartial {
    pub const EMPTY: RowPartial = RowPartial {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        label_logit: 0.0,
        finite: true,
    };

    /// The state over both parts: rescale each sum to the larger max. `exp(−inf) = 0` (via the
    /// clamp of `fast_exp`, ≈1e-38) covers an empty side.
    #[inline]
    pub fn merge(self, other: RowPartial) -> RowPartial {
        if !(self.finite && other.finite) {
            return RowPartial {
                finite: false,
                ..self
            };
        }
        let max = self.max.max(other.max);
        let sum = if self.sum == 0.0 {
            other.sum
        } else if other.sum == 0.0 {
            self.sum
        } else {
            self.sum * fast_exp(self.max - max) + other.sum * fast_exp(other.max - max)
        };
        RowPartial {
            max,
            sum,
            label_logit: self.label_logit + other.label_logit,
            finite: true,
        }
    }
}

/// `(max, Σ exp(z − max), all finite)` of one tile row.
#[inline]
pub(crate) fn row_stats(z: &[f32]) -> (f32, f32, bool) {
    // `x · 0` is 0 for finite x and NaN otherwise: one multiply-add per element detects both.
    let mut probe = [0.0f32; LANES];
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let mut groups = z.chunks_exact(LANES);
    for g in &mut groups {
        for k in 0..LANES {
            lane_max[k] = if g[k] > lane_max[k] {
                g[k]
            } else {
                lane_max[k]
            };
            probe[k] += g[k] * 0.0;
        }
    }
    let mut max = lane_max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in groups.remainder() {
        max = max.max(x);
        probe[0] += x * 0.0;
    }
    let finite = probe.iter().all(|p| *p == 0.0) && max.is_finite();
    if !finite {
        return (max, 0.0, false);
    }
    let mut lane_sum = [0.0f32; LANES];
    let mut groups = z.chunks_exact(LANES);
    for g in &mut groups {
        for k in 0..LANES {
            lane_sum[k] += fast_exp(g[k] - max);
        }
    }
    for &x in groups.remainder() {
        lane_sum[0] += fast_exp(x - max);
    }
    (max, lane_sum.iter().sum(), true)
}

/// Overwrites a tile row of logits with `∂L/∂z = g · (1[v = y] − p_v)`, `p_v = exp((z_v − max) −
/// ln_sum)`: the row max and log-sum kept apart, because one f32 lse near 1000 rounds to 6e-5 and
/// would cost that much relative error in every `p` (the same recompute as the token backward).
/// `label` is the label's index inside the tile, if it lies there. Returns whether every logit
/// was finite.
#[inline]
pub(crate) fn row_grad_inplace(
    z: &mut [f32],
    max: f32,
    ln_sum: f32,
    g: f32,
    label: Option<usize>,
) -> bool {
    let mut probe = [0.0f32; LANES];
    let mut groups = z.chunks_exact_mut(LANES);
    for grp in &mut groups {
        for k in 0..LANES {
            probe[k] += grp[k] * 0.0;
            grp[k] = -g * fast_exp((grp[k] - max) - ln_sum);
        }
    }
    for x in groups.into_remainder() {
        probe[0] += *x * 0.0;
        *x = -g * fast_exp((*x - max) - ln_sum);
    }
    if let Some(y) = label {
        z[y] += g;
    }
    probe.iter().all(|p| *p == 0.0)
}
