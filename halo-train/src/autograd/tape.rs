//! The tape: a flat list of nodes in creation order (a topological order by construction), and
//! the reverse sweep over it.

use std::ops::Deref;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::cpu::attention::{attention_backward, AttentionShape};
use super::cpu::elementwise::{accumulate, accumulate_product, accumulate_scaled, bias_backward};
use super::cpu::embedding::embedding_backward;
use super::cpu::gelu::gelu_backward;
use super::cpu::layernorm::layernorm_backward;
use super::cpu::matmul::linear_backward;
use super::pool::Buffer;
use halo_kernels::cpu::SavedLse;
use halo_kernels::error::{HaloError, Result};
use halo_kernels::IGNORE_INDEX;

/// A handle to a value on a [`Tape`] (an index; cheap to copy). Only meaningful on the tape that
/// made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub(crate) usize);

impl Var {
    /// The node index on its tape.
    pub fn index(self) -> usize {
        self.0
    }

    /// A handle to node `index` (checked by every op: a stale or foreign index is an error).
    pub fn from_index(index: usize) -> Self {
        Self(index)
    }
}

/// What produced a node, with the inputs and the tensors its backward needs.
pub(crate) enum Op {
    /// A parameter (gradient reported under `param`) or a constant (`None`, no gradient).
    Leaf {
        param: Option<usize>,
    },
    Embedding {
        table: Var,
        ids: Vec<u32>,
    },
    /// `x·w (+ b)`; `w` is `[in, out]`, or `[out, in]` when `transpose_w`.
    Linear {
        x: Var,
        w: Var,
        b: Option<Var>,
        transpose_w: bool,
    },
    AddBias {
        x: Var,
        b: Var,
    },
    Add {
        a: Var,
        b: Var,
    },
    Scale {
        x: Var,
        factor: f32,
    },
    Sum {
        x: Var,
    },
    LayerNorm {
        x: Var,
        gamma: Var,
        beta: Var,
        mean: Buffer,
        rstd: Buffer,
    },
    Gelu {
        x: Var,
    },
    Attention {
        qkv: Var,
        shape: AttentionShape,
        probs: Buffer,
    },
    Dropout {
        x: Var,
        mask: Buffer,
    },
    TokenLogprobs {
        logits: Var,
        labels: Vec<i32>,
        lse: Buffer,
        lse_residual: Buffer,
        vocab: usize,
    },
    /// The fused LM head (`halo_kernels::fused_head`): per-token log-probs of `hidden · weightᵀ`
    /// without the `[rows, vocab]` logits; the backward recomputes each logits tile.
    FusedHeadTokenLogprobs {
        hidden: Var,
        weight: Var,
        labels: Vec<i32>,
        row_max: Buffer,
        ln_sum: Buffer,
        vocab: usize,
    },
    /// Left behind once the backward has used a node.
    Consumed,
}

/// A node's value: an activation (owned, from the [`pool`](super::pool)) or a parameter
/// (borrowed from the model: never copied).
#[derive(Debug)]
pub(crate) enum Value<'a> {
    Owned(Buffer),
    Borrowed(&'a [f32]),
}

impl Default for Value<'_> {
    fn default() -> Self {
        Self::Owned(Buffer::default())
    }
}

impl Deref for Value<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Self::Owned(b) => b,
            Self::Borrowed(s) => s,
        }
    }
}

impl From<Buffer> for Value<'_> {
    fn from(b: Buffer) -> Self {
        Self::Owned(b)
    }
}

impl From<Vec<f32>> for Value<'_> {
    fn from(v: Vec<f32>) -> Self {
        Self::Owned(v.into())
    }
}

impl Value<'_> {
    /// The values as a plain vector (a copy only for a borrowed parameter).
    pub(crate) fn into_vec(self) -> Vec<f32> {
        match self {
            Self::Owned(b) => b.into_vec(),
            Self::Borrowed(s) => s.to_vec(),
        }
    }

    /// The owned buffer, or a copy of a borrowed parameter.
    fn into_buffer(self) -> Buffer {
        match self {
            Self::Owned(b) => b,
            Self::Borrowed(s) => Buffer::copied(s),
        }
    }
}

pub(crate) struct Node<'a> {
    pub(crate) value: Value<'a>,
    pub(crate) shape: Vec<usize>,
    /// Whether any parameter reaches this node (otherwise the backward skips it).
    pub(crate) requires_grad: bool,
    /// How many later ops read this node (its value can be recycled when the only reader is done).
    pub(crate) uses: usize,
    pub(crate) op: Op,
}

/// A recording of one forward pass. Create one per training step; drop it (or call
/// [`backward`](Tape::backward), which frees activations as it goes) when done.
///
/// `training` (on for [`Tape::new`]) enables dropout; [`Tape::inference`] turns it off.
///
/// `'a` is the lifetime of the parameters: [`param`](Tape::param) borrows their values instead of
/// copying them, so the model cannot change while a tape that read it is alive.
pub struct Tape<'a> {
    pub(crate) nodes: Vec<Node<'a>>,
    pub(crate) rng: ChaCha8Rng,
    pub(crate) training: bool,
    consumed: bool,
}

impl Default for Tape<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> Tape<'a> {
    /// A training tape (dropout active where the model asks for it), dropout RNG seeded with 0.
    pub fn new() -> Self {
        Self::with_seed(0)
    }

    /// A training tape whose dropout masks come from `ChaCha8Rng::seed_from_u64(seed)`.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            nodes: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            training: true,
            consumed: false,
        }
    }

    /// A tape with dropout off (evaluation, the frozen reference model, generation).
    pub fn inference() -> Self {
        Self {
            training: false,
            ..Self::new()
        }
    }

    /// Whether dropout is active.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Number of nodes recorded so far.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node has been recorded yet.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether [`backward`](Tape::backward) has run (no more ops can be recorded).
    pub fn is_consumed(&self) -> bool {
        self.consumed
    }

    /// The value of `v` (row-major). After [`backward`](Tape::backward) only the output's value
    /// is kept; every other value has been freed and reads as an empty slice.
    pub fn value(&self, v: Var) -> &[f32] {
        &self.nodes[v.0].value
    }

    /// The shape of `v`.
    pub fn shape(&self, v: Var) -> &[usize] {
        &self.nodes[v.0].shape
    }

    pub(crate) fn check(&self, v: Var, what: &str) -> Result<()> {
        if v.0 >= self.nodes.len() {
            return Err(HaloError::Autograd(format!(
                "`{what}` (node {}) is not on this tape ({} nodes)",
                v.0,
                self.nodes.len()
            )));
        }
        if self.consumed {
            return Err(HaloError::Autograd(
                "the tape has already been through backward; record a new one".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn push(
        &mut self,
        value: Value<'a>,
        shape: Vec<usize>,
        op: Op,
        inputs: &[Var],
    ) -> Var {
        debug_assert_eq!(value.len(), shape.iter().product::<usize>());
        let requires_grad = match op {
            Op::Leaf { param } => param.is_some(),
            _ => inputs.iter().any(|v| self.nodes[v.0].requires_grad),
        };
        for v in inputs {
            self.nodes[v.0].uses += 1;
        }
        self.nodes.push(Node {
            value,
            shape,
            requires_grad,
            uses: 0,
            op,
        });
        Var(self.nodes.len() - 1)
    }

    /// Backward of a scalar (one-element) output: seeds it with gradient 1.
    pub fn backward_scalar(&mut self, loss: Var) -> Result<Gradients> {
        self.backward(loss, &[1.0])
    }

    /// Reverse sweep from `output`, seeded with `upstream = ∂L/∂output` (same length as the
    /// output). Returns `∂L/∂parameter` for every parameter the output depends on, keyed by the
    /// index given to [`param`](Tape::param) (a parameter recorded twice gets the sum).
    ///
    /// Each node's value, saved tensors and gradient are freed as soon as the sweep passes it, so
    /// the peak memory is the forward's plus one gradient per live activation. A tape can be
    /// swept once; the output's value stays readable.
    pub fn backward(&mut self, output: Var, upstream: &[f32]) -> Result<Gradients> {
        self.backward_many(&[(output, upstream)])
    }

    /// [`backward`](Tape::backward) from several outputs at once (e.g. two forwards recorded on
    /// one tape), each with its own upstream gradient: the result is the sum of their gradients.
    pub fn backward_many(&mut self, seeds: &[(Var, &[f32])]) -> Result<Gradients> {
        let Some(last) = seeds.iter().map(|(v, _)| v.0).max() else {
            return Ok(Gradients::default());
        };
        for &(output, upstream) in seeds {
            self.check(output, "output")?;
            let out_len = self.nodes[output.0].value.len();
            if upstream.len() != out_len {
                return Err(HaloError::LengthMismatch {
                    what: "upstream gradient",
                    expected: out_len,
                    got: upstream.len(),
                });
            }
        }
        self.consumed = true;
        let mut grads: Vec<Option<Buffer>> = (0..=last).map(|_| None).collect();
        for &(output, upstream) in seeds {
            if self.nodes[output.0].requires_grad {
                put_grad(&mut grads, output, Some(Buffer::copied(upstream)));
            }
        }
        let mut result = Gradients::default();
        for i in (0..=last).rev() {
            let op = std::mem::replace(&mut self.nodes[i].op, Op::Consumed);
            if let Some(dy) = grads[i].take() {
                match op {
                    Op::Leaf { param: Some(p) } => result.add_buffer(p, dy),
                    Op::TokenLogprobs {
                        logits,
                        labels,
                        lse,
                        lse_residual,
                        vocab,
                    } if self.nodes[logits.0].uses == 1
                        && self.nodes[logits.0].requires_grad
                        && !seeds.iter().any(|(v, _)| *v == logits) =>
                    {
                        // Nothing else reads the logits, and their producer's backward needs only
                        // its inputs: overwrite them with their gradient instead of allocating a
                        // second [rows, vocab] buffer (Liger-Kernel's trick).
                        let mut z = std::mem::take(&mut self.nodes[logits.0].value).into_buffer();
                        halo_kernels::cpu::token_logprobs_backward_inplace(
                            &mut z,
                            &labels,
                            SavedLse::new(&lse, &lse_residual),
                            &dy,
                            vocab,
                            IGNORE_INDEX,
                        )?;
                        put_grad(&mut grads, logits, Some(z));
                    }
                    // Dropping `op` and `dy` here gives their buffers back to the pool.
                    op => backward_op(&self.nodes, &mut grads, op, &dy, i)?,
                }
            }
            if !seeds.iter().any(|(v, _)| v.0 == i) {
                self.nodes[i].value = Value::default();
            }
        }
        Ok(result)
    }
}

/// Takes the gradient buffer of `v` out of `grads` (zeros if none yet) when `v` needs one.
fn take_grad(nodes: &[Node<'_>], grads: &mut [Option<Buffer>], v: Var) -> Option<Buffer> {
    if !nodes[v.0].requires_grad {
        return None;
    }
    Some(
        grads[v.0]
            .take()
            .unwrap_or_else(|| Buffer::zeroed(nodes[v.0].value.len())),
    )
}

/// Puts a buffer from [`take_grad`] back, summing with anything stored meanwhile (an op whose two
/// inputs are the same variable takes the slot twice).
fn put_grad(grads: &mut [Option<Buffer>], v: Var, g: Option<Buffer>) {
    let Some(g) = g else { return };
    match &mut grads[v.0] {
        Some(existing) => accumulate(existing, &g),
        slot => *slot = Some(g),
    }
}

/// `∂L/∂v += dy` for an op whose local derivative is the identity: copies `dy` into an empty slot
/// instead of zero-filling and adding.
fn add_grad(nodes: &[Node<'_>], grads: &mut [Option<Buffer>], v: Var, dy: &[f32]) {
    if !nodes[v.0].requires_grad {
        return;
    }
    match &mut grads[v.0] {
        Some(existing) => accumulate(existing, dy),
        slot => *slot = Some(Buffer::copied(dy)),
    }
}

/// Applies one node's backward: reads `dy = ∂L/∂node`, accumulates into its inputs' gradients.
fn backward_op(
    nodes: &[Node<'_>],
    grads: &mut [Option<Buffer>],
    op: Op,
    dy: &[f32],
    index: usize,
) -> Result<()> {
    let value = |v: Var| &*nodes[v.0].value;
    let cols = |v: Var| *nodes[v.0].shape.last().unwrap_or(&1);
    match op {
        Op::Leaf { .. } | Op::Consumed => {}
        Op::Embedding { table, ids } => {
            let mut dt = take_grad(nodes, grads, table);
            if let Some(dt) = dt.as_mut() {
                embedding_backward(dy, &ids, cols(table), dt);
            }
            put_grad(grads, table, dt);
        }
        Op::Linear {
            x,
            w,
            b,
            transpose_w,
        } => {
            let k = cols(x);
            let n = value(x).len() / k.max(1);
            let m = cols(Var(index));
            let mut dx = take_grad(nodes, grads, x);
            let mut dw = take_grad(nodes, grads, w);
            let mut db = b.and_then(|b| take_grad(nodes, grads, b));
            linear_backward(
                value(x),
                value(w),
                dy,
                n,
                k,
                m,
                transpose_w,
                dx.as_deref_mut(),
                dw.as_deref_mut(),
                db.as_deref_mut(),
            );
            put_grad(grads, x, dx);
            put_grad(grads, w, dw);
            if let Some(b) = b {
                put_grad(grads, b, db);
            }
        }
        Op::AddBias { x, b } => {
            add_grad(nodes, grads, x, dy);
            let mut db = take_grad(nodes, grads, b);
            if let Some(db) = db.as_mut() {
                bias_backward(dy, db);
            }
            put_grad(grads, b, db);
        }
        Op::Add { a, b } => {
            add_grad(nodes, grads, a, dy);
            add_grad(nodes, grads, b, dy);
        }
        Op::Scale { x, factor } => {
            let mut dx = take_grad(nodes, grads, x);
            if let Some(dx) = dx.as_mut() {
                accumulate_scaled(dx, dy, factor);
            }
            put_grad(grads, x, dx);
        }
        Op::Sum { x } => {
            let mut dx = take_grad(nodes, grads, x);
            if let Some(dx) = dx.as_mut() {
                dx.iter_mut().for_each(|d| *d += dy[0]);
            }
            put_grad(grads, x, dx);
        }
        Op::LayerNorm {
            x,
            gamma,
            beta,
            mean,
            rstd,
        } => {
            let mut dx = take_grad(nodes, grads, x);
            let mut dg = take_grad(nodes, grads, gamma);
            let mut db = take_grad(nodes, grads, beta);
            layernorm_backward(
                value(x),
                value(gamma),
                &mean,
                &rstd,
                dy,
                dx.as_deref_mut(),
                dg.as_deref_mut(),
                db.as_deref_mut(),
            );
            put_grad(grads, x, dx);
            put_grad(grads, gamma, dg);
            put_grad(grads, beta, db);
        }
        Op::Gelu { x } => {
            let mut dx = take_grad(nodes, grads, x);
            if let Some(dx) = dx.as_mut() {
                gelu_backward(value(x), dy, dx);
            }
            put_grad(grads, x, dx);
        }
        Op::Attention { qkv, shape, probs } => {
            let mut dq = take_grad(nodes, grads, qkv);
            if let Some(dq) = dq.as_mut() {
                attention_backward(value(qkv), &probs, dy, shape, dq);
            }
            put_grad(grads, qkv, dq);
        }
        Op::Dropout { x, mask } => {
            let mut dx = take_grad(nodes, grads, x);
            if let Some(dx) = dx.as_mut() {
                accumulate_product(dx, dy, &mask);
            }
            put_grad(grads, x, dx);
        }
        Op::FusedHeadTokenLogprobs {
            hidden,
            weight,
            labels,
            row_max,
            ln_sum,
            vocab,
        } => {
            let hidden_size = nodes[hidden.0].shape.last().copied().unwrap_or(0);
            let head = halo_kernels::fused_head::LmHead {
                weight: value(weight),
                bias: None,
                vocab,
                hidden_size,
            };
            let g = halo_kernels::fused_head::fused_linear_token_logprobs_backward(
                value(hidden),
                &head,
                &labels,
                IGNORE_INDEX,
                &row_max,
                &ln_sum,
                dy,
                None,
            )?;
            if nodes[hidden.0].requires_grad {
                put_grad(grads, hidden, Some(g.hidden.into()));
            }
            if nodes[weight.0].requires_grad {
                put_grad(grads, weight, Some(g.weight.into()));
            }
        }
        Op::TokenLogprobs {
            logits,
            labels,
            lse,
            lse_residual,
            vocab,
        } => {
            if nodes[logits.0].requires_grad {
                let mut dz = Buffer::zeroed(value(logits).len());
                halo_kernels::cpu::token_logprobs_backward(
                    value(logits),
                    &labels,
                    SavedLse::new(&lse, &lse_residual),
                    dy,
                    vocab,
                    IGNORE_INDEX,
                    &mut dz,
                )?;
                put_grad(grads, logits, Some(dz));
            }
        }
    }
    Ok(())
}

/// Gradients of the parameters, indexed by the parameter index given to [`Tape::param`]
/// (for [`crate::model::Gpt`]: the position in [`crate::model::Gpt::parameter_names`]).
///
/// The buffers come from the [`pool`](super::pool) and go back to it when this is dropped, so the
/// next step's backward allocates none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gradients {
    grads: Vec<Option<Buffer>>,
}

impl Gradients {
    /// An empty set (every gradient absent, i.e. zero).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `g` to the gradient of parameter `param` (creating it if absent).
    pub fn add(&mut self, param: usize, g: Vec<f32>) {
        self.add_buffer(param, g.into());
    }

    fn add_buffer(&mut self, param: usize, g: Buffer) {
        if self.grads.len() <= param {
            self.grads.resize_with(param + 1, || None);
        }
        match &mut self.grads[param] {
            Some(existing) => accumulate(existing, &g),
            slot => *slot = Some(g),
        }
    }

    /// `self += other` (gradient accumulation over micro-batches).
    pub fn accumulate(&mut self, other: &Gradients) {
        for (p, g) in other.iter() {
            self.add_buffer(p, Buffer::copied(g));
        }
    }

    /// The gradient of parameter `param`, or `None` when the output did not depend on it.
    pub fn get(&self, param: usize) -> Option<&[f32]> {
        self.grads.get(param).and_then(|g| g.as_deref())
    }

    /// Mutable access to the gradient of parameter `param`, or `None` when it is absent.
    pub fn get_mut(&mut self, param: usize) -> Option<&mut [f32]> {
        self.grads.get_mut(param).and_then(|g| g.as_deref_mut())
    }

    /// `(parameter index, gradient)` for every present gradient, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &[f32])> {
        self.grads
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.as_deref().map(|g| (i, g)))
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f32) {
        for g in self.grads.iter_mut().flatten() {
            g.par_chunks_mut(1 << 14)
                .for_each(|c| c.iter_mut().for_each(|v| *v *= factor));
        }
    }

    /// The L2 norm of all gradients together (accumulated in f64).
    pub fn global_norm(&self) -> f32 {
        self.iter()
            .flat_map(|(_, g)| g.iter())
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt() as f32
    }
}
