//! `fused_linear_token_logprobs`: per-token log-probs of `hidden · weightᵀ + bias` at the labels,
//! a logits tile at a time, merged with the online logsumexp; no `[rows, vocab]` buffer exists.

use rayon::prelude::*;

use super::chunks::FusedChunks;
use super::gemm::{gemm, View};
use super::tile_math::{row_stats, RowPartial};
use super::validate::{check_head_args, non_finite_error};
use super::{CountedRows, LmHead};
use crate::dtype::{DType, LogitElement};
use crate::error::Result;

/// Output of [`fused_linear_token_logprobs`]: one entry per row, 0 where the label is ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedTokenLogprobs {
    /// `log softmax(z)[y]` (≤ 0), as `cpu::token_logprobs` of the materialized logits gives it.
    pub logp: Vec<f32>,
    /// `logsumexp(z)` per row (`row_max + ln_sum`).
    pub lse: Vec<f32>,
    /// The row's largest logit: saved for the backward, apart from `ln_sum` (see there).
    pub row_max: Vec<f32>,
    /// `ln Σ_v exp(z_v − row_max)`: saved for the backward.
    pub ln_sum: Vec<f32>,
}

/// Per-token log-probs and logsumexp of the logits `hidden · weightᵀ + bias`, never materialized.
///
/// `hidden` is `[rows, H]` row-major, `labels` `[rows]`; rows whose label is `ignore_index` are
/// not read (they may hold anything) and give 0. `chunks`: the tiling, [`FusedChunks::auto`] when
/// `None`. Every GEMM accumulates in f32 whatever `T` is.
///
/// Errors: `InvalidShape` (zero vocab or hidden size, a zero chunk field), `LengthMismatch`
/// (`hidden`, `weight`, `bias`), `LabelOutOfRange`, `NonFinite` naming `hidden` / `weight` /
/// `bias` (or the logits, if finite inputs overflow f32) and the first bad row.
pub fn fused_linear_token_logprobs<T: LogitElement>(
    hidden: &[T],
    head: &LmHead<'_, T>,
    labels: &[i32],
    ignore_index: i32,
    chunks: Option<FusedChunks>,
) -> Result<FusedTokenLogprobs> {
    let rows = check_head_args(hidden.len(), head, labels, ignore_index)?;
    let counted = CountedRows::gather(hidden, labels, ignore_index, head.hidden_size);
    let chunks = FusedChunks::resolve(chunks, counted.rows.len(), head.vocab, head.hidden_size)?;
    let partials = row_partials(&counted, head, &chunks);

    let mut out = FusedTokenLogprobs {
        logp: vec![0.0; rows],
        lse: vec![0.0; rows],
        row_max: vec![0.0; rows],
        ln_sum: vec![0.0; rows],
    };
    for (i, (p, &row)) in partials.iter().zip(&counted.rows).enumerate() {
        if !p.finite {
            return Err(non_finite_error(hidden, head, counted.rows[i]));
        }
        let ln_sum = p.sum.ln();
        out.row_max[row] = p.max;
        out.ln_sum[row] = ln_sum;
        out.lse[row] = p.max + ln_sum;
        // `(z_y − max) − ln Σ` as `cpu::token_logprobs` (exact subtraction first); clamp rounding.
        out.logp[row] = ((p.label_logit - p.max) - ln_sum).min(0.0);
    }
    Ok(out)
}

/// Each counted row's merged (max, Σ exp, label logit) over the whole vocabulary.
///
/// Tasks are (row tile, vocab group) pairs; each walks its group's vocab tiles in order, and the
/// groups are merged in order afterwards: a fixed reduction order for any thread count.
pub(crate) fn row_partials<T: LogitElement>(
    counted: &CountedRows,
    head: &LmHead<'_, T>,
    chunks: &FusedChunks,
) -> Vec<RowPartial> {
    let n = counted.rows.len();
    let row_tiles = chunks.row_tiles(n);
    let groups = chunks.vocab_group_ranges(head.vocab);
    let tasks: Vec<(usize, usize)> = (0..row_tiles.len())
        .flat_map(|t| (0..groups.len()).map(move |g| (t, g)))
        .collect();
    let per_task: Vec<Vec<RowPartial>> = tasks
        .par_iter()
        .map(|&(t, g)| {
            group_partials(
                counted,
                head,
                chunks,
                row_tiles[t].clone(),
                groups[g].clone(),
            )
        })
        .collect();
    let mut merged = vec![RowPartial::EMPTY; n];
    for (&(t, _), partial) in tasks.iter().zip(&per_task) {
        for (m, p) in merged[row_tiles[t].clone()].iter_mut().zip(partial) {
            *m = m.merge(*p);
        }
    }
    merged
}

/// One row tile over one vocab group: GEMM a tile, reduce its rows, merge, drop the tile.
fn group_partials<T: LogitElement>(
    counted: &CountedRows,
    head: &LmHead<'_, T>,
    chunks: &FusedChunks,
    rows: std::ops::Range<usize>,
    group: std::ops::Range<usize>,
) -> Vec<RowPartial> {
    let h = head.hidden_size;
    let mut partial = vec![RowPartial::EMPTY; rows.len()];
    let mut logits = vec![0.0f32; rows.len() * chunks.vocab_tile];
    let mut weight_tile = WeightTile::new();
    let hidden = &counted.hidden[rows.start * h..rows.end * h];
    for vt in chunks.vocab_tiles(group) {
        let width = vt.len();
        let w = weight_tile.load(head, vt.clone());
        let z = &mut logits[..rows.len() * width];
        gemm(
            rows.len(),
            h,
            width,
            View::rows(hidden, h),
            View::transposed(w, h),
            0.0,
            z,
        );
        add_bias(z, head, vt.clone());
        for (i, (zr, p)) in z.chunks_exact(width).zip(partial.iter_mut()).enumerate() {
            let (max, sum, finite) = row_stats(zr);
            let y = counted.labels[rows.start + i];
            let label_logit = if vt.contains(&y) {
                zr[y - vt.start]
            } else {
                0.0
            };
            *p = p.merge(RowPartial {
                max,
                sum,
                label_logit,
                finite,
            });
        }
    }
    partial
}

/// Adds the bias slice of `vt` to every row of a `[_, vt.len()]` logits tile.
pub(crate) fn add_bias<T: LogitElement>(
    z: &mut [f32],
    head: &LmHead<'_, T>,
    vt: std::ops::Range<usize>,
) {
    if let Some(bias) = head.bias {
        let b = &bias[vt.clone()];
        for zr in z.chunks_exact_mut(vt.len()) {
            for (x, &b) in zr.iter_mut().zip(b) {
                *x += b.to_f32();
            }
        }
    }
}

/// The weight rows of one vocab tile as f32: borrowed when the weight is f32, else widened into a
/// `vocab_tile × H` buffer reused across tiles.
#[derive(Default)]
pub(crate) struct WeightTile {
    buf: Vec<f32>,
}

impl WeightTile {
    /// Allocates nothing yet: an f32 weight is borrowed, never copied.
    pub fn new() -> WeightTile {
        WeightTile { buf: Vec::new() }
    }

    pub fn load<'s, T: LogitElement>(
        &'s mut self,
        head: &LmHead<'s, T>,
        vt: std::ops::Range<usize>,
    ) -> &'s [f32] {
        let h = head.hidden_size;
        let rows = &head.weight[vt.start * h..vt.end * h];
        if T::DTYPE == DType::F32 {
            return bytemuck::cast_slice(rows);
        }
        self.buf.resize(rows.len(), 0.0);
        crate::cpu::load_f32(rows, &mut self.buf);
        &self.buf
    }
}
