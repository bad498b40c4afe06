//! Fused causal multi-head self-attention, GPT-2 style.
//!
//! Input is the `c_attn` output `qkv: [batch·seq, 3·C]` whose rows are `[q | k | v]`, each split
//! into `n_head` heads of `C / n_head` columns (Hugging Face `GPT2Attention._split_heads`). For
//! each sequence and head: `S = QKᵀ/√d`, `P = softmax(S)` over keys `j ≤ i` (later keys get
//! probability 0), `O = P·V`, written back as `[batch·seq, C]` with heads side by side.
//! The probabilities `P` (`[batch, n_head, seq, seq]`) are saved for the backward; heads are
//! never copied out: every product is one `sgemm` over strided views of `qkv`.

use rayon::prelude::*;

use super::matmul::{gemm, MatMut, MatRef};
use super::simd::{avx2_twin, sum_zip};
use halo_kernels::cpu::fast_exp::fast_exp;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Number of sequences.
    pub batch: usize,
    /// Tokens per sequence (every sequence has the same length).
    pub seq: usize,
    /// Number of heads; must divide [`dim`](Self::dim).
    pub n_head: usize,
    /// Model width `C` (all heads together).
    pub dim: usize,
}

impl AttentionShape {
    fn head_dim(&self) -> usize {
        self.dim / self.n_head
    }

    /// The view of head `h`'s slice of part `part` (0 = q, 1 = k, 2 = v) of one sequence.
    fn qkv_view<'a>(&self, qkv_seq: &'a [f32], part: usize, h: usize) -> MatRef<'a> {
        MatRef {
            data: qkv_seq,
            offset: part * self.dim + h * self.head_dim(),
            rows: self.seq,
            cols: self.head_dim(),
            row_stride: 3 * self.dim as isize,
            col_stride: 1,
        }
    }
}

/// Strided mutable view of head `h` inside a `[seq, row_len]` buffer, starting at `col0`.
fn head_view_mut(
    buf: &mut [f32],
    col0: usize,
    seq: usize,
    head_dim: usize,
    row_len: usize,
) -> MatMut<'_> {
    MatMut {
        data: buf,
        offset: col0,
        rows: seq,
        cols: head_dim,
        row_stride: row_len as isize,
        col_stride: 1,
    }
}

/// Forward: writes `out` (`[batch·seq, C]`) and `probs` (`[batch, n_head, seq, seq]`).
pub fn attention_forward(qkv: &[f32], shape: AttentionShape, out: &mut [f32], probs: &mut [f32]) {
    let AttentionShape {
        seq, n_head, dim, ..
    } = shape;
    let hd = shape.head_dim();
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(seq * dim)
        .zip(probs.par_chunks_mut(n_head * seq * seq))
        .zip(qkv.par_chunks(seq * 3 * dim))
        .for_each(|((out_b, probs_b), qkv_b)| {
            for (h, p) in probs_b.chunks_exact_mut(seq * seq).enumerate() {
                let q = shape.qkv_view(qkv_b, 0, h);
                let k = shape.qkv_view(qkv_b, 1, h);
                gemm(scale, q, k.t(), 0.0, MatMut::row_major(p, seq, seq));
                causal_softmax(p, seq);
                let v = shape.qkv_view(qkv_b, 2, h);
                let o = head_view_mut(out_b, h * hd, seq, hd, dim);
                gemm(1.0, MatRef::row_major(p, seq, seq), v, 0.0, o);
            }
        });
}

avx2_twin! {
    /// Causal softmax of every row of the `seq × seq` scores `p`, in place.
    fn causal_softmax(p: &mut [f32], seq: usize) {
        for (i, row) in p.chunks_exact_mut(seq).enumerate() {
            causal_softmax_row(row, i);
        }
    }
}

avx2_twin! {
    /// `dS = P ⊙ (dP − rowsum(dP ⊙ P))` in place of `dp`; masked entries have p = 0 and so get
    /// dS = 0.
    fn softmax_backward(p: &[f32], dp: &mut [f32], seq: usize) {
        for (dp_row, p_row) in dp.chunks_exact_mut(seq).zip(p.chunks_exact(seq)) {
            let dot = sum_zip(dp_row, p_row, |a, b| a * b);
            for (d, &pv) in dp_row.iter_mut().zip(p_row) {
                *d = pv * (*d - dot);
            }
        }
    }
}

/// Softmax over `row[..=i]` (the keys query `i` may see); `row[i+1..]` becomes 0.
#[inline(always)]
fn causal_softmax_row(row: &mut [f32], i: usize) {
    let (visible, future) = row.split_at_mut(i + 1);
    let max = visible.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in visible.iter_mut() {
        *v = fast_exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in visible.iter_mut() {
        *v *= inv;
    }
    future.fill(0.0);
}

/// Backward, accumulating into `dqkv`. With `dP = dO·Vᵀ`:
/// `dV += Pᵀ·dO`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ += dS·K/√d`, `dK += dSᵀ·Q/√d`.
pub fn attention_backward(
    qkv: &[f32],
    probs: &[f32],
    dout: &[f32],
    shape: AttentionShape,
    dqkv: &mut [f32],
) {
    let AttentionShape {
        seq, n_head, dim, ..
    } = shape;
    let hd = shape.head_dim();
    let scale = 1.0 / (hd as f32).sqrt();
    dqkv.par_chunks_mut(seq * 3 * dim)
        .zip(qkv.par_chunks(seq * 3 * dim))
        .zip(
            probs
                .par_chunks(n_head * seq * seq)
                .zip(dout.par_chunks(seq * dim)),
        )
        .for_each(|((dqkv_b, qkv_b), (probs_b, dout_b))| {
            let mut dp = vec![0.0f32; seq * seq];
            for (h, p) in probs_b.chunks_exact(seq * seq).enumerate() {
                let p_mat = MatRef::row_major(p, seq, seq);
                let d_o = MatRef {
                    data: dout_b,
                    offset: h * hd,
                    rows: seq,
                    cols: hd,
                    row_stride: dim as isize,
                    col_stride: 1,
                };
                let v = shape.qkv_view(qkv_b, 2, h);
                gemm(1.0, d_o, v.t(), 0.0, MatMut::row_major(&mut dp, seq, seq));
                let dv = head_view_mut(dqkv_b, 2 * dim + h * hd, seq, hd, 3 * dim);
                gemm(1.0, p_mat.t(), d_o, 1.0, dv);
                softmax_backward(p, &mut dp, seq);
                let ds = MatRef::row_major(&dp, seq, seq);
                let q = shape.qkv_view(qkv_b, 0, h);
                let k = shape.qkv_view(qkv_b, 1, h);
                gemm(
                    scale,
                    ds,
                    k,
                    1.0,
                    head_view_mut(dqkv_b, h * hd, seq, hd, 3 * dim),
                );
                gemm(
                    scale,
                    ds.t(),
                    q,
                    1.0,
                    head_view_mut(dqkv_b, dim + h * hd, seq, hd, 3 * dim),
                );
            }
        });
}
