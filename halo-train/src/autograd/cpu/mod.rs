//! The CPU backend: every op's forward and backward as plain functions on `f32` slices.
//!
//! This module is the device boundary. The [`Tape`](super::Tape) records *what* was computed
//! (shapes, inputs, saved tensors) and calls these functions for *how*; a CUDA backend adds a
//! sibling module with the same functions over device buffers (cuBLAS for the matmuls, the crate's
//! kernels for the token log-probs), and model code never changes. Every function here takes
//! row-major buffers and checks nothing beyond debug assertions: the tape validates shapes first.
//!
//! Backward functions *accumulate* (`+=`) into their gradient outputs, so a value used twice
//! (a residual stream, the tied embedding) collects both contributions without a copy.

pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod matmul;
mod simd;
mod transpose;

/// Rows handed to one rayon task at least, so tiny rows do not drown in scheduling overhead.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (8 * 1024 / row_len.max(1)).max(1)
}
