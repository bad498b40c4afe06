//! Fused causal multi-head self-attention, GPT-2 style: the CUDA twin of `halo-train`'s
//! `autograd::cpu::attention` (its definition), kernels `attention_forward_f32`,
//! `attention_backward_query_f32` and `attention_backward_key_f32` in `kernels/nn_attention.cu`.
//!
//! The input is the `c_attn` output `qkv: [batch·seq, 3·C]` whose rows are `[q | k | v]`, each
//! split into `n_head` heads of `C / n_head` columns. For each sequence and head:
//! `S = QKᵀ/√d`, `P = softmax(S)` over the keys `j ≤ i` (later keys get probability 0),
//! `O = P·V`, written as `[batch·seq, C]` with the heads side by side; `P`
//! (`[batch, n_head, seq, seq]`) is saved for the backward.
//!
//! A simple kernel for short contexts: one block per (sequence, head, row), at most
//! [`AttentionDims::MAX_SEQ`] tokens per sequence and [`AttentionDims::MAX_HEAD_DIM`] columns per
//! head (GPT-2: 1024 and 64). Every sum runs in a fixed order and every block owns the rows it
//! writes (no atomics): a rerun gives the same bits. The results are not bitwise equal to the CPU
//! twin's (other summation orders, `expf` against `fast_exp`), but within f32 rounding of it.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use crate::cuda::device::{cuda_err, CudaBackend};
use crate::cuda::launch::{blocks_launch, check_aligned, check_len};
use crate::error::{HaloError, Result};

/// Threads per block of every attention kernel (`HALO_ATTN_THREADS` in `kernels/nn_attention.cu`).
const ATTENTION_THREADS: u32 = 128;

/// Shapes of one attention call: the same fields and meaning as `halo-train`'s `AttentionShape`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    /// Number of sequences.
    pub batch: usize,
    /// Tokens per sequence (every sequence has the same length).
    pub seq: usize,
    /// Number of heads; must divide [`dim`](Self::dim).
    pub n_head: usize,
    /// Model width `C` (all heads together).
    pub dim: usize,
}

/// The buffer lengths of a validated [`AttentionDims`].
struct AttentionLens {
    /// `qkv` and `dqkv`: `batch·seq·3·dim`.
    qkv: usize,
    /// `out` and `dout`: `batch·seq·dim`.
    out: usize,
    /// `probs` (and the backward's scratch): `batch·n_head·seq·seq`.
    probs: usize,
    /// Blocks of each launch: `batch·n_head·seq` (0: nothing to launch).
    blocks: usize,
}

impl AttentionDims {
    /// The longest sequence the kernels take (`HALO_ATTN_MAX_SEQ`: the scores of one query row live
    /// in shared memory). GPT-2's context.
    pub const MAX_SEQ: usize = 1024;
    /// The widest head the kernels take (`HALO_ATTN_MAX_HEAD_DIM`: one thread per column).
    pub const MAX_HEAD_DIM: usize = ATTENTION_THREADS as usize;

    /// Columns per head, `dim / n_head` (0 when `n_head` is 0).
    pub fn head_dim(&self) -> usize {
        self.dim.checked_div(self.n_head).unwrap_or(0)
    }

    /// `1/√head_dim` in f32, as the CPU twin computes it.
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim() as f32).sqrt()
    }

    /// Checks the shape against the kernels' limits and returns the buffer lengths. `n_head` and
    /// `dim` must be at least 1 (a head needs a column) with `n_head` dividing `dim`; `batch == 0`
    /// or `seq == 0` is a valid empty call (every buffer empty, nothing launched).
    fn validate(&self) -> Result<AttentionLens> {
        let Self {
            batch,
            seq,
            n_head,
            dim,
        } = *self;
        let bad = |why: String| {
            Err(HaloError::InvalidShape(format!(
                "attention {self:?}: {why}"
            )))
        };
        if n_head == 0 || dim == 0 {
            return bad("n_head and dim must be at least 1".into());
        }
        if !dim.is_multiple_of(n_head) {
            return bad(format!("n_head {n_head} does not divide dim {dim}"));
        }
        if self.head_dim() > Self::MAX_HEAD_DIM {
            return bad(format!(
                "head size {} exceeds the kernel's limit of {}",
                self.head_dim(),
                Self::MAX_HEAD_DIM
            ));
        }
        if seq > Self::MAX_SEQ {
            return bad(format!(
                "seq {seq} exceeds the kernel's limit of {} tokens per sequence",
                Self::MAX_SEQ
            ));
        }
        let product = |factors: &[usize]| {
            factors
                .iter()
                .try_fold(1usize, |acc, &f| acc.checked_mul(f))
                .filter(|&n| n <= i64::MAX as usize)
        };
        let (Some(qkv), Some(out), Some(probs), Some(blocks)) = (
            product(&[batch, seq, 3, dim]),
            product(&[batch, seq, dim]),
            product(&[batch, n_head, seq, seq]),
            product(&[batch, n_head, seq]),
        ) else {
            return bad("the buffer sizes overflow".into());
        };
        if blocks > i32::MAX as usize {
            return bad(format!(
                "batch·n_head·seq = {blocks} blocks exceed the CUDA grid limit"
            ));
        }
        Ok(AttentionLens {
            qkv,
            out,
            probs,
            blocks,
        })
    }
}

impl CudaBackend {
    /// Causal self-attention forward, like `halo-train`'s `attention_forward`: writes `out`
    /// (`[batch·seq, dim]`) and `probs` (`[batch, n_head, seq, seq]`, every entry: 0 above the
    /// diagonal) from `qkv` (`[batch·seq, 3·dim]`). Checks the shape (see [`AttentionDims`]) and
    /// the lengths on the host (`InvalidShape`, `LengthMismatch`), then queues one kernel without
    /// waiting. `batch == 0` or `seq == 0`: nothing is queued.
    pub fn attention_forward(
        &self,
        qkv: &impl DevicePtr<f32>,
        dims: AttentionDims,
        out: &mut impl DevicePtrMut<f32>,
        probs: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let lens = dims.validate()?;
        check_len("qkv", lens.qkv, qkv.len())?;
        check_len("out", lens.out, out.len())?;
        check_len("probs", lens.probs, probs.len())?;
        if lens.blocks == 0 {
            return Ok(());
        }
        let cfg = blocks_launch(lens.blocks, ATTENTION_THREADS)?;
        let (seq, n_head, dim) = kernel_sizes(dims);
        let scale = dims.scale();
        let func = self.function("attention_forward_f32")?;
        let stream = self.stream();
        let (qkv_ptr, _r0) = qkv.device_ptr(stream);
        let (out_ptr, _w0) = out.device_ptr_mut(stream);
        let (probs_ptr, _w1) = probs.device_ptr_mut(stream);
        check_aligned::<f32>("qkv", qkv_ptr)?;
        check_aligned::<f32>("out", out_ptr)?;
        check_aligned::<f32>("probs", probs_ptr)?;
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&qkv_ptr)
            .arg(&out_ptr)
            .arg(&probs_ptr)
            .arg(&seq)
            .arg(&n_head)
            .arg(&dim)
            .arg(&scale);
        // SAFETY: arguments follow `attention_forward_f32` in kernels/README.md; the shape was
        // validated (seq ≤ MAX_SEQ, head size ≤ MAX_HEAD_DIM, grid = batch·n_head·seq) and every
        // buffer has the length it implies, so each block reads and writes inside them.
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launch attention_forward_f32"))?;
        Ok(())
    }

    /// Causal self-attention backward, like `halo-train`'s `attention_backward`: ACCUMULATES
    /// (`+=`) the gradient of `qkv` into `dqkv` (`[batch·seq, 3·dim]`) from the forward's `qkv` and
    /// `probs` and the output gradient `dout` (`[batch·seq, dim]`). Same checks as
    /// [`CudaBackend::attention_forward`]; queues two kernels without waiting, with a
    /// stream-ordered scratch of `probs`'s size for `dS` (freed after the kernels, no host wait).
    pub fn attention_backward(
        &self,
        qkv: &impl DevicePtr<f32>,
        probs: &impl DevicePtr<f32>,
        dout: &impl DevicePtr<f32>,
        dims: AttentionDims,
        dqkv: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let lens = dims.validate()?;
        check_len("qkv", lens.qkv, qkv.len())?;
        check_len("probs", lens.probs, probs.len())?;
        check_len("dout", lens.out, dout.len())?;
        check_len("dqkv", lens.qkv, dqkv.len())?;
        if lens.blocks == 0 {
            return Ok(());
        }
        let cfg = blocks_launch(lens.blocks, ATTENTION_THREADS)?;
        let (seq, n_head, dim) = kernel_sizes(dims);
        let scale = dims.scale();
        // dS = P ⊙ (dP − rowsum(dP ⊙ P)): written by the query kernel on and below the diagonal,
        // read there by the key kernel (the entries above are never touched).
        let mut dscores = self.alloc_output::<f32>(lens.probs)?;
        let query = self.function("attention_backward_query_f32")?;
        let key = self.function("attention_backward_key_f32")?;
        let stream = self.stream();
        let (qkv_ptr, _r0) = qkv.device_ptr(stream);
        let (probs_ptr, _r1) = probs.device_ptr(stream);
        let (dout_ptr, _r2) = dout.device_ptr(stream);
        let (dqkv_ptr, _w0) = dqkv.device_ptr_mut(stream);
        let (dscores_ptr, _w1) = dscores.device_ptr_mut(stream);
        check_aligned::<f32>("qkv", qkv_ptr)?;
        check_aligned::<f32>("probs", probs_ptr)?;
        check_aligned::<f32>("dout", dout_ptr)?;
        check_aligned::<f32>("dqkv", dqkv_ptr)?;
        let mut launch = stream.launch_builder(query);
        launch
            .arg(&qkv_ptr)
            .arg(&probs_ptr)
            .arg(&dout_ptr)
            .arg(&dqkv_ptr)
            .arg(&dscores_ptr)
            .arg(&seq)
            .arg(&n_head)
            .arg(&dim)
            .arg(&scale);
        // SAFETY: arguments follow `attention_backward_query_f32` in kernels/README.md; shape and
        // lengths validated as in the forward; `dscores` holds batch·n_head·seq·seq floats. Block
        // (b, h, i) alone updates head h of dq's row i.
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launch attention_backward_query_f32"))?;
        let mut launch = stream.launch_builder(key);
        launch
            .arg(&qkv_ptr)
            .arg(&probs_ptr)
            .arg(&dout_ptr)
            .arg(&dscores_ptr)
            .arg(&dqkv_ptr)
            .arg(&seq)
            .arg(&n_head)
            .arg(&dim)
            .arg(&scale);
        // SAFETY: as above, for `attention_backward_key_f32`, queued after the query kernel on the
        // same stream (it reads the dS that one wrote). Block (b, h, j) alone updates head h of dk's
        // and dv's row j.
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launch attention_backward_key_f32"))?;
        Ok(())
    }
}

/// The kernels' scalar arguments `(seq, n_head, dim)` of a validated shape: `seq ≤ MAX_SEQ` and
/// `n_head ≤ batch·n_head·seq ≤ i32::MAX` fit `i32`, `dim ≤ qkv.len()` fits `i64`.
fn kernel_sizes(dims: AttentionDims) -> (i32, i32, i64) {
    (dims.seq as i32, dims.n_head as i32, dims.dim as i64)
}
