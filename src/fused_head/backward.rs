//! Backward of [`fused_linear_token_logprobs`](super::fused_linear_token_logprobs()): from
//! `∂L/∂logp` per row to `∂hidden`, `∂weight` and `∂bias`, recomputing each logits tile, turning
//! it into `∂L/∂z` in place and accumulating the two GEMMs `∂hidden += ∂z · W_tile` and
//! `∂W_tile += ∂zᵀ · hidden_tile`.
//!
//! Determinism without float atomics: the vocab groups run in parallel; each owns its rows of
//! `∂weight` and `∂bias` (walking the row tiles in order) and its own `∂hidden` partial (walking
//! its vocab tiles in order); the partials are added in group order at the end.

use rayon::prelude::*;

use super::chunks::FusedChunks;
use super::forward::{add_bias, WeightTile};
use super::gemm::{gemm, View};
use super::tile_math::row_grad_inplace;
use super::validate::{check_head_args, non_finite_error};
use super::{CountedRows, LmHead};
use crate::dtype::LogitElement;
use crate::error::{HaloError, Result};
use crate::validate::{check_counted_finite, check_len};

/// Gradients of the fused head, in f32 whatever the inputs' dtype (the accumulation over rows of
/// `∂weight` needs it; cast to the parameters' dtype if wanted).
#[derive(Debug, Clone, PartialEq)]
pub struct FusedHeadGrads {
    /// `∂L/∂hidden`, `[rows, H]` (zero rows where the label is ignored).
    pub hidden: Vec<f32>,
    /// `∂L/∂weight`, `[V, H]`.
    pub weight: Vec<f32>,
    /// `∂L/∂bias`, `[V]`, when the head has a bias.
    pub bias: Option<Vec<f32>>,
}

/// Gradients of `L` w.r.t. the head's inputs, given `grad_logp = ∂L/∂logp` per row and the
/// forward's saved `row_max` and `ln_sum` (of [`super::FusedTokenLogprobs`]).
///
/// `chunks` need not equal the forward's. Ignored rows are not read (neither their hidden state
/// nor their saved values).
///
/// Errors: those of the forward, `LengthMismatch` for `row_max` / `ln_sum` / `grad_logp`, and
/// `NonFinite` for a non-finite saved value or `grad_logp` in a counted row, or a gradient that
/// overflows f32 (`grad_hidden`, `grad_weight`).
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_token_logprobs_backward<T: LogitElement>(
    hidden: &[T],
    head: &LmHead<'_, T>,
    labels: &[i32],
    ignore_index: i32,
    row_max: &[f32],
    ln_sum: &[f32],
    grad_logp: &[f32],
    chunks: Option<FusedChunks>,
) -> Result<FusedHeadGrads> {
    let rows = check_head_args(hidden.len(), head, labels, ignore_index)?;
    for (what, values) in [
        ("row_max", row_max),
        ("ln_sum", ln_sum),
        ("grad_logp", grad_logp),
    ] {
        check_len(what, rows, values.len())?;
        check_counted_finite(what, values, labels, ignore_index)?;
    }
    let (h, vocab) = (head.hidden_size, head.vocab);
    let counted = CountedRows::gather(hidden, labels, ignore_index, h);
    let n = counted.rows.len();
    let chunks = FusedChunks::resolve(chunks, n, vocab, h)?;
    let saved = SavedRows {
        max: counted.rows.iter().map(|&r| row_max[r]).collect(),
        ln_sum: counted.rows.iter().map(|&r| ln_sum[r]).collect(),
        grad: counted.rows.iter().map(|&r| grad_logp[r]).collect(),
    };

    let mut grad_weight = vec![0.0f32; vocab * h];
    let mut grad_bias = head.bias.map(|_| vec![0.0f32; vocab]);
    let groups = chunks.vocab_group_ranges(vocab);
    // Split ∂weight (and ∂bias) into each group's own rows.
    let mut weight_parts = Vec::with_capacity(groups.len());
    let mut bias_parts = Vec::with_capacity(groups.len());
    let (mut w_rest, mut b_rest) = (&mut grad_weight[..], grad_bias.as_deref_mut());
    for g in &groups {
        let (w, rest) = w_rest.split_at_mut(g.len() * h);
        weight_parts.push(w);
        w_rest = rest;
        bias_parts.push(b_rest.take().map(|b| {
            let (bg, rest) = b.split_at_mut(g.len());
            b_rest = Some(rest);
            bg
        }));
    }
    let partials: Vec<std::result::Result<Vec<f32>, usize>> = groups
        .par_iter()
        .zip(weight_parts.into_par_iter().zip(bias_parts.into_par_iter()))
        .map(|(g, (dw, db))| group_backward(&counted, &saved, head, &chunks, g.clone(), dw, db))
        .collect();

    // Σ_g ∂hidden_g in group order, then scattered to the original rows.
    let mut grad_counted: Option<Vec<f32>> = None;
    for partial in partials {
        let partial = partial.map_err(|i| non_finite_error(hidden, head, counted.rows[i]))?;
        match grad_counted.as_mut() {
            None => grad_counted = Some(partial),
            Some(acc) => acc.iter_mut().zip(&partial).for_each(|(a, p)| *a += p),
        }
    }
    let mut grad_hidden = vec![0.0f32; rows * h];
    if let Some(acc) = grad_counted {
        for (src, &r) in acc.chunks_exact(h).zip(&counted.rows) {
            grad_hidden[r * h..(r + 1) * h].copy_from_slice(src);
        }
    }
    // Finite inputs can still overflow a sum of f32 products: report it rather than return inf.
    for (what, grad) in [("grad_hidden", &grad_hidden), ("grad_weight", &grad_weight)] {
        if let Some(i) = grad.iter().position(|x| !x.is_finite()) {
            return Err(HaloError::NonFinite { what, row: i / h });
        }
    }
    Ok(FusedHeadGrads {
        hidden: grad_hidden,
        weight: grad_weight,
        bias: grad_bias,
    })
}

/// The forward's saved values and `∂L/∂logp` of the counted rows.
struct SavedRows {
    max: Vec<f32>,
    ln_sum: Vec<f32>,
    grad: Vec<f32>,
}

/// One vocab group: its rows of `∂weight` / `∂bias` (written here), and its `∂hidden` partial
/// `[n, H]` (returned). Err: the counted row index whose recomputed logits were non-finite.
fn group_backward<T: LogitElement>(
    counted: &CountedRows,
    saved: &SavedRows,
    head: &LmHead<'_, T>,
    chunks: &FusedChunks,
    group: std::ops::Range<usize>,
    grad_weight: &mut [f32],
    mut grad_bias: Option<&mut [f32]>,
) -> std::result::Result<Vec<f32>, usize> {
    let h = head.hidden_size;
    let n = counted.rows.len();
    let mut grad_hidden = vec![0.0f32; n * h];
    let mut tile = vec![0.0f32; chunks.row_tile.min(n) * chunks.vocab_tile];
    let mut weight_tile = WeightTile::new();
    for vt in chunks.vocab_tiles(group.clone()) {
        let width = vt.len();
        let w = weight_tile.load(head, vt.clone());
        let local = vt.start - group.start..vt.end - group.start;
        let dw = &mut grad_weight[local.start * h..local.end * h];
        for rt in chunks.row_tiles(n) {
            let hid = &counted.hidden[rt.start * h..rt.end * h];
            let dz = &mut tile[..rt.len() * width];
            gemm(
                rt.len(),
                h,
                width,
                View::rows(hid, h),
                View::transposed(w, h),
                0.0,
                dz,
            );
            add_bias(dz, head, vt.clone());
            for (i, zr) in dz.chunks_exact_mut(width).enumerate() {
                let r = rt.start + i;
                let y = counted.labels[r];
                let label = vt.contains(&y).then(|| y - vt.start);
                if !row_grad_inplace(zr, saved.max[r], saved.ln_sum[r], saved.grad[r], label) {
                    return Err(r);
                }
            }
            // ∂hidden[rt] += ∂z · W_tile   ([rt, width] · [width, H])
            let dh = &mut grad_hidden[rt.start * h..rt.end * h];
            gemm(
                rt.len(),
                width,
                h,
                View::rows(dz, width),
                View::rows(w, h),
                1.0,
                dh,
            );
            // ∂W_tile += ∂zᵀ · hidden[rt]   ([width, rt] · [rt, H])
            gemm(
                width,
                rt.len(),
                h,
                View::transposed(dz, width),
                View::rows(hid, h),
                1.0,
                dw,
            );
            if let Some(db) = grad_bias.as_deref_mut() {
                let db = &mut db[local.clone()];
                for zr in dz.chunks_exact(width) {
                    db.iter_mut().zip(zr).for_each(|(d, z)| *d += z);
                }
            }
        }
    }
    Ok(grad_hidden)
}
