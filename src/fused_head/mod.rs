//! The fused LM head: per-token log-probs, and KTO / DPO steps, straight from hidden states and
//! the head's weight, without ever building the `[rows, vocab]` logits (issue 12, CPU half).
//!
//! ```text
//! hidden [rows, H] + weight [V, H] (+ bias [V]) + labels
//!   ──fused_linear_token_logprobs──────────▶ logp, lse (+ row max, log-sum kept apart)
//!   ──(sequence_sums, losses, broadcast)───▶ ∂L/∂logp per row          (crate::step, unchanged)
//!   ──fused_linear_token_logprobs_backward─▶ ∂hidden [rows, H], ∂weight [V, H], ∂bias [V]
//! ```
//!
//! The logits are computed a tile at a time (`row_tile × vocab_tile`, [`FusedChunks`]) with one
//! GEMM per tile (`matrixmultiply::sgemm`, f32 accumulation whatever the storage dtype), reduced
//! into each row's running max and sum (the online logsumexp) and dropped. The backward recomputes
//! each tile, turns it into `∂L/∂z` in place, and accumulates the two GEMMs `∂z · W` and `∂zᵀ · h`.
//! Rows whose label is the ignore index are never read (prompt and padding rows cost nothing).
//!
//! Determinism: the work is split by the shapes only (never by the thread count) and every sum
//! has a fixed order (tiles merged in vocabulary order, `∂weight` over row tiles in order, the
//! vocab groups' `∂hidden` partials added in group order): the same bits run after run and for
//! any rayon pool size.
//!
//! [`kto_head_step`] and [`dpo_head_step`] are one call per training step from hidden states; the
//! loss math is [`crate::step`]'s token-level steps over [`crate::losses`], not a copy.
//!
//! ```
//! use halo_kernels::fused_head::{fused_linear_token_logprobs, LmHead};
//! use halo_kernels::IGNORE_INDEX;
//!
//! let (vocab, hidden_size) = (5, 3);
//! let weight: Vec<f32> = (0..vocab * hidden_size).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
//! let hidden = [0.5f32, -1.0, 2.0, f32::NAN, f32::NAN, f32::NAN]; // row 1 is padding: not read
//! let head = LmHead { weight: &weight, bias: None, vocab, hidden_size };
//! let out = fused_linear_token_logprobs(&hidden, &head, &[3, IGNORE_INDEX], IGNORE_INDEX, None)?;
//! // The same as log_softmax(hidden · weightᵀ)[label], written out:
//! let z: Vec<f32> = (0..vocab)
//!     .map(|v| (0..hidden_size).map(|k| hidden[k] * weight[v * hidden_size + k]).sum())
//!     .collect();
//! let lse = z.iter().map(|z| z.exp()).sum::<f32>().ln();
//! assert!((out.logp[0] - (z[3] - lse)).abs() < 1e-5 && out.logp[1] == 0.0);
//! # Ok::<(), halo_kernels::HaloError>(())
//! ```

mod backward;
mod chunks;
mod forward;
mod gemm;
mod heads;
mod tile_math;
mod validate;

pub(crate) use validate::{check_head_shapes, non_finite_error, HeadShape};

pub use backward::{fused_linear_token_logprobs_backward, FusedHeadGrads};
pub use chunks::FusedChunks;
pub use forward::{fused_linear_token_logprobs, FusedTokenLogprobs};
pub use heads::{
    dpo_head_step, kto_head_step, HeadStep, HiddenBatch, KlSource, KtoHeadInputs, ReferenceSource,
};

use crate::dtype::LogitElement;

/// An LM head: `logits = hidden · weightᵀ + bias`, the layout of PyTorch's `nn.Linear(H, V)`.
#[derive(Debug, Clone, Copy)]
pub struct LmHead<'a, T> {
    /// `[vocab, hidden_size]`, row-major (row `v` is token `v`'s output embedding).
    pub weight: &'a [T],
    /// `[vocab]`, if the head has a bias.
    pub bias: Option<&'a [T]>,
    /// Rows of the weight: the vocabulary size.
    pub vocab: usize,
    /// Columns of the weight: the model's hidden size.
    pub hidden_size: usize,
}

/// The counted rows of a batch (label not the ignore index), gathered and widened to f32 once:
/// `[n, H]` plus their original row index and label. O(rows) memory; the GEMMs then skip the
/// prompt and padding rows, and a NaN in an ignored row can never reach `∂weight` through `0 · NaN`.
pub(crate) struct CountedRows {
    /// Original row of each counted row.
    pub rows: Vec<usize>,
    /// Label of each counted row.
    pub labels: Vec<usize>,
    /// `[rows.len(), H]` f32.
    pub hidden: Vec<f32>,
}

impl CountedRows {
    pub(crate) fn gather<T: LogitElement>(
        hidden: &[T],
        labels: &[i32],
        ignore_index: i32,
        hidden_size: usize,
    ) -> CountedRows {
        let rows: Vec<usize> = (0..labels.len())
            .filter(|&r| labels[r] != ignore_index)
            .collect();
        let mut gathered = vec![0.0f32; rows.len() * hidden_size];
        for (dst, &r) in gathered.chunks_exact_mut(hidden_size.max(1)).zip(&rows) {
            crate::cpu::load_f32(&hidden[r * hidden_size..(r + 1) * hidden_size], dst);
        }
        CountedRows {
            labels: rows.iter().map(|&r| labels[r] as usize).collect(),
            rows,
            hidden: gathered,
        }
    }
}
