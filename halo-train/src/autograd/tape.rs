//! The tape: a flat list of nodes in creation order (a topological order by construction), and
//! the reverse sweep over it.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::cpu::attention::AttentionShape;
use super::device_checks::DeviceChecks;
use super::device_ops::{self as dev_ops, SavedIds, SavedLabels};
use super::storage::{Device, Storage, StorageRef};
use halo_kernels::error::{HaloError, Result};

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
        ids: SavedIds,
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
        mean: Storage,
        rstd: Storage,
    },
    Gelu {
        x: Var,
    },
    Attention {
        qkv: Var,
        shape: AttentionShape,
        probs: Storage,
    },
    Dropout {
        x: Var,
        mask: Storage,
    },
    TokenLogprobs {
        logits: Var,
        labels: SavedLabels,
        lse: Storage,
        lse_residual: Storage,
        vocab: usize,
    },
    /// The fused LM head (`halo_kernels::fused_head`): per-token log-probs of `hidden · weightᵀ`
    /// without the `[rows, vocab]` logits; the backward recomputes each logits tile.
    FusedHeadTokenLogprobs {
        hidden: Var,
        weight: Var,
        labels: SavedLabels,
        row_max: Storage,
        ln_sum: Storage,
        vocab: usize,
    },
    /// Left behind once the backward has used a node.
    Consumed,
}

/// A node's value: an activation (owned, on the tape's device) or a parameter (borrowed from
/// the model: never copied).
#[derive(Debug)]
pub(crate) enum Value<'a> {
    Owned(Storage),
    Borrowed(StorageRef<'a>),
}

impl Default for Value<'_> {
    fn default() -> Self {
        Self::Owned(Storage::default())
    }
}

impl From<Storage> for Value<'_> {
    fn from(s: Storage) -> Self {
        Self::Owned(s)
    }
}

impl<'a> Value<'a> {
    /// A borrowed view of the values, wherever they live.
    pub(crate) fn as_ref(&self) -> StorageRef<'_> {
        match self {
            Self::Owned(s) => s.as_ref(),
            Self::Borrowed(s) => *s,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.as_ref().len()
    }

    /// The owned storage, or a copy of a borrowed parameter.
    fn into_storage(self, device: &Device) -> Result<Storage> {
        match self {
            Self::Owned(s) => Ok(s),
            Self::Borrowed(s) => device.copy(s),
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
    pub(crate) device: Device,
    /// The checks of the CUDA kernels queued so far, not yet read (see [`DeviceChecks`]).
    pub(crate) checks: DeviceChecks,
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
            device: Device::Cpu,
            checks: DeviceChecks::new(),
        }
    }

    /// This tape computing on `device` instead ([`Device::Cpu`] for the constructors above):
    /// every value recorded on it must live there (parameters of a model moved with
    /// [`Gpt::to_device`](crate::model::Gpt::to_device), constants are copied there).
    pub fn on(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The device this tape computes on.
    pub fn device(&self) -> &Device {
        &self.device
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

    /// The value of `v` (row-major) on a CPU tape. After [`backward`](Tape::backward) only the
    /// output's value is kept; every other value has been freed and reads as an empty slice. A
    /// value on a CUDA device also reads as empty here: read it with [`Tape::to_host`].
    pub fn value(&self, v: Var) -> &[f32] {
        self.nodes[v.0].value.as_ref().host().unwrap_or(&[])
    }

    /// The value of `v` wherever it lives (a device buffer on a CUDA tape).
    pub fn storage(&self, v: Var) -> StorageRef<'_> {
        self.nodes[v.0].value.as_ref()
    }

    /// A host copy of the value of `v` (waits for the device on a CUDA tape). On a CUDA tape the
    /// checks of the kernels queued so far ([`checks`](Self::checks)) are read with it, in the
    /// same wait: a failed one is the error, as the CPU op's would have been.
    pub fn to_host(&self, v: Var) -> Result<Vec<f32>> {
        self.check_index(v, "value")?;
        self.checked_to_host(self.storage(v))
    }

    /// Takes the value of `v` off the tape into a host vector (an inference tape's output): no
    /// copy on the CPU, a device→host copy on a CUDA tape (with the checks, as
    /// [`to_host`](Self::to_host)). The node then reads as empty.
    pub fn take_to_host(&mut self, v: Var) -> Result<Vec<f32>> {
        self.check_index(v, "value")?;
        match std::mem::take(&mut self.nodes[v.0].value) {
            Value::Owned(Storage::Host(b)) => Ok(b.into_vec()),
            other => self.checked_to_host(other.as_ref()),
        }
    }

    /// `value` on the host, read in one wait with the pending checks (run first).
    fn checked_to_host(&self, value: StorageRef<'_>) -> Result<Vec<f32>> {
        match (&self.device, value) {
            (Device::Cuda(gpu), StorageRef::Cuda(v)) => {
                let mut values = self.checks.gather(gpu, &[v.as_view()], &[])?.read()?;
                Ok(values.pop().unwrap_or_default())
            }
            _ => self.device.to_host(value),
        }
    }

    /// The checks of the CUDA kernels queued on this tape, not yet read by the host (empty on a
    /// CPU tape, whose ops fail as they run). [`backward`](Self::backward) hands them, with the
    /// backward's own, to the [`Gradients`].
    pub fn checks(&self) -> &DeviceChecks {
        &self.checks
    }

    /// Appends checks of kernels queued elsewhere (e.g. a frozen reference model's inference
    /// forward on the same device) to this tape's: they are read, in this order, with the
    /// tape's own, and [`backward`](Self::backward) hands them on to the [`Gradients`].
    pub fn extend_checks(&mut self, checks: &DeviceChecks) {
        self.checks.extend(checks);
    }

    /// Takes the value of `v` off the tape, wherever it lives (e.g. a loss to read with the
    /// step's other values). The node then reads as empty.
    pub fn take_storage(&mut self, v: Var) -> Result<Storage> {
        self.check_index(v, "value")?;
        std::mem::take(&mut self.nodes[v.0].value).into_storage(&self.device)
    }

    /// The shape of `v`.
    pub fn shape(&self, v: Var) -> &[usize] {
        &self.nodes[v.0].shape
    }

    fn check_index(&self, v: Var, what: &str) -> Result<()> {
        if v.0 >= self.nodes.len() {
            return Err(HaloError::Autograd(format!(
                "`{what}` (node {}) is not on this tape ({} nodes)",
                v.0,
                self.nodes.len()
            )));
        }
        Ok(())
    }

    pub(crate) fn check(&self, v: Var, what: &str) -> Result<()> {
        self.check_index(v, what)?;
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
        let uploaded: Vec<(Var, Storage)> = seeds
            .iter()
            .map(|&(v, g)| Ok((v, self.device.upload(g)?)))
            .collect::<Result<_>>()?;
        let seeds: Vec<(Var, StorageRef<'_>)> =
            uploaded.iter().map(|(v, g)| (*v, g.as_ref())).collect();
        self.backward_from(&seeds)
    }

    /// [`backward_many`](Tape::backward_many) with the upstream gradients already on the tape's
    /// device (e.g. a loss's per-token gradient computed there): nothing is copied from the host.
    pub fn backward_from(&mut self, seeds: &[(Var, StorageRef<'_>)]) -> Result<Gradients> {
        let Some(last) = seeds.iter().map(|(v, _)| v.0).max() else {
            let mut none = Gradients::on(self.device.clone());
            none.checks = std::mem::take(&mut self.checks);
            return Ok(none);
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
            let on_device = matches!(
                (&self.device, upstream),
                (Device::Cpu, StorageRef::Host(_)) | (Device::Cuda(_), StorageRef::Cuda(_))
            );
            if !on_device {
                return Err(self.device.mismatch(upstream, "upstream gradient"));
            }
        }
        self.consumed = true;
        let device = self.device.clone();
        let mut grads: Vec<Option<Storage>> = (0..=last).map(|_| None).collect();
        for &(output, upstream) in seeds {
            if self.nodes[output.0].requires_grad {
                put_grad(&device, &mut grads, output, Some(device.copy(upstream)?))?;
            }
        }
        let mut result = Gradients::on(device.clone());
        let mut checks = std::mem::take(&mut self.checks);
        for i in (0..=last).rev() {
            let op = std::mem::replace(&mut self.nodes[i].op, Op::Consumed);
            if let Some(dy) = grads[i].take() {
                match op {
                    Op::Leaf { param: Some(p) } => result.add_storage(p, dy)?,
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
                        let mut z = std::mem::take(&mut self.nodes[logits.0].value)
                            .into_storage(&device)?;
                        dev_ops::token_logprobs_bwd_inplace(
                            &device,
                            &mut z,
                            &labels,
                            (lse, lse_residual),
                            dy.as_ref(),
                            vocab,
                            &mut checks,
                        )?;
                        put_grad(&device, &mut grads, logits, Some(z))?;
                    }
                    // Dropping `op` and `dy` here gives their buffers back to the pool.
                    op => backward_op(
                        &device,
                        &self.nodes,
                        &mut grads,
                        &mut checks,
                        op,
                        dy.as_ref(),
                        i,
                    )?,
                }
            }
            if !seeds.iter().any(|(v, _)| v.0 == i) {
                self.nodes[i].value = Value::default();
            }
        }
        result.checks = checks;
        Ok(result)
    }
}

/// Takes the gradient buffer of `v` out of `grads` (zeros if none yet) when `v` needs one.
fn take_grad(
    device: &Device,
    nodes: &[Node<'_>],
    grads: &mut [Option<Storage>],
    v: Var,
) -> Result<Option<Storage>> {
    if !nodes[v.0].requires_grad {
        return Ok(None);
    }
    match grads[v.0].take() {
        Some(g) => Ok(Some(g)),
        None => Ok(Some(device.zeros(nodes[v.0].value.len())?)),
    }
}

/// Puts a buffer from [`take_grad`] back, summing with anything stored meanwhile (an op whose two
/// inputs are the same variable takes the slot twice).
fn put_grad(
    device: &Device,
    grads: &mut [Option<Storage>],
    v: Var,
    g: Option<Storage>,
) -> Result<()> {
    let Some(g) = g else { return Ok(()) };
    match &mut grads[v.0] {
        Some(existing) => dev_ops::accumulate(device, existing, g.as_ref()),
        slot => {
            *slot = Some(g);
            Ok(())
        }
    }
}

/// `∂L/∂v += dy` for an op whose local derivative is the identity: copies `dy` into an empty slot
/// instead of zero-filling and adding.
fn add_grad(
    device: &Device,
    nodes: &[Node<'_>],
    grads: &mut [Option<Storage>],
    v: Var,
    dy: StorageRef<'_>,
) -> Result<()> {
    if !nodes[v.0].requires_grad {
        return Ok(());
    }
    match &mut grads[v.0] {
        Some(existing) => dev_ops::accumulate(device, existing, dy),
        slot => {
            *slot = Some(device.copy(dy)?);
            Ok(())
        }
    }
}

/// Applies one node's backward: reads `dy = ∂L/∂node`, accumulates into its inputs' gradients.
fn backward_op(
    device: &Device,
    nodes: &[Node<'_>],
    grads: &mut [Option<Storage>],
    checks: &mut DeviceChecks,
    op: Op,
    dy: StorageRef<'_>,
    index: usize,
) -> Result<()> {
    let value = |v: Var| nodes[v.0].value.as_ref();
    let cols = |v: Var| *nodes[v.0].shape.last().unwrap_or(&1);
    match op {
        Op::Leaf { .. } | Op::Consumed => {}
        Op::Embedding { table, ids } => {
            let mut dt = take_grad(device, nodes, grads, table)?;
            if let Some(dt) = dt.as_mut() {
                dev_ops::embedding_bwd(device, dy, &ids, cols(table), dt)?;
            }
            put_grad(device, grads, table, dt)?;
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
            let mut dx = take_grad(device, nodes, grads, x)?;
            let mut dw = take_grad(device, nodes, grads, w)?;
            let mut db = match b {
                Some(b) => take_grad(device, nodes, grads, b)?,
                None => None,
            };
            dev_ops::linear_bwd(
                device,
                value(x),
                value(w),
                dy,
                n,
                k,
                m,
                transpose_w,
                dx.as_mut(),
                dw.as_mut(),
                db.as_mut(),
            )?;
            put_grad(device, grads, x, dx)?;
            put_grad(device, grads, w, dw)?;
            if let Some(b) = b {
                put_grad(device, grads, b, db)?;
            }
        }
        Op::AddBias { x, b } => {
            add_grad(device, nodes, grads, x, dy)?;
            let mut db = take_grad(device, nodes, grads, b)?;
            if let Some(db) = db.as_mut() {
                dev_ops::bias_bwd(device, dy, db)?;
            }
            put_grad(device, grads, b, db)?;
        }
        Op::Add { a, b } => {
            add_grad(device, nodes, grads, a, dy)?;
            add_grad(device, nodes, grads, b, dy)?;
        }
        Op::Scale { x, factor } => {
            let mut dx = take_grad(device, nodes, grads, x)?;
            if let Some(dx) = dx.as_mut() {
                dev_ops::accumulate_scaled(device, dx, dy, factor)?;
            }
            put_grad(device, grads, x, dx)?;
        }
        Op::Sum { x } => {
            let mut dx = take_grad(device, nodes, grads, x)?;
            if let Some(dx) = dx.as_mut() {
                dev_ops::sum_bwd(device, dy, dx)?;
            }
            put_grad(device, grads, x, dx)?;
        }
        Op::LayerNorm {
            x,
            gamma,
            beta,
            mean,
            rstd,
        } => {
            let mut dx = take_grad(device, nodes, grads, x)?;
            let mut dg = take_grad(device, nodes, grads, gamma)?;
            let mut db = take_grad(device, nodes, grads, beta)?;
            dev_ops::layernorm_bwd(
                device,
                value(x),
                value(gamma),
                mean.as_ref(),
                rstd.as_ref(),
                dy,
                dx.as_mut(),
                dg.as_mut(),
                db.as_mut(),
            )?;
            put_grad(device, grads, x, dx)?;
            put_grad(device, grads, gamma, dg)?;
            put_grad(device, grads, beta, db)?;
        }
        Op::Gelu { x } => {
            let mut dx = take_grad(device, nodes, grads, x)?;
            if let Some(dx) = dx.as_mut() {
                dev_ops::gelu_bwd(device, value(x), dy, dx)?;
            }
            put_grad(device, grads, x, dx)?;
        }
        Op::Attention { qkv, shape, probs } => {
            let mut dq = take_grad(device, nodes, grads, qkv)?;
            if let Some(dq) = dq.as_mut() {
                dev_ops::attention_bwd(device, value(qkv), probs.as_ref(), dy, shape, dq)?;
            }
            put_grad(device, grads, qkv, dq)?;
        }
        Op::Dropout { x, mask } => {
            let mut dx = take_grad(device, nodes, grads, x)?;
            if let Some(dx) = dx.as_mut() {
                dev_ops::accumulate_product(device, dx, dy, mask.as_ref())?;
            }
            put_grad(device, grads, x, dx)?;
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
            let (dh, dw) = dev_ops::fused_head_bwd(
                device,
                value(hidden),
                value(weight),
                &labels,
                (row_max.as_ref(), ln_sum.as_ref()),
                dy,
                vocab,
                hidden_size,
                checks,
            )?;
            if nodes[hidden.0].requires_grad {
                put_grad(device, grads, hidden, Some(dh))?;
            }
            if nodes[weight.0].requires_grad {
                put_grad(device, grads, weight, Some(dw))?;
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
                let dz = dev_ops::token_logprobs_bwd(
                    device,
                    value(logits),
                    &labels,
                    (lse, lse_residual),
                    dy,
                    vocab,
                    checks,
                )?;
                put_grad(device, grads, logits, Some(dz))?;
            }
        }
    }
    Ok(())
}

/// Gradients of the parameters, indexed by the parameter index given to [`Tape::param`]
/// (for [`crate::model::Gpt`]: the position in [`crate::model::Gpt::parameter_names`]), on the
/// device of the tape that computed them.
///
/// Host buffers come from the [`pool`](super::pool) and go back to it when this is dropped, so the
/// next step's backward allocates none. The slice accessors ([`get`](Self::get),
/// [`iter`](Self::iter), …) see host gradients; [`to_host`](Self::to_host) copies device ones.
///
/// Device gradients come with the [`DeviceChecks`] of the kernels that computed them (a label
/// outside the vocabulary, non-finite logits, …), not yet read by the host: the values are only
/// meaningful once those pass. [`to_host`](Self::to_host) and the device optimizer read them
/// (the optimizer together with the step's loss and norm, in one wait).
#[derive(Debug, Default)]
pub struct Gradients {
    grads: Vec<Option<Storage>>,
    device: Device,
    checks: DeviceChecks,
}

impl Gradients {
    /// An empty set on the CPU (every gradient absent, i.e. zero).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set on `device`.
    pub fn on(device: Device) -> Self {
        Self {
            grads: Vec::new(),
            device,
            checks: DeviceChecks::new(),
        }
    }

    /// The device the gradients live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The checks of the device kernels that computed these gradients, not yet read (empty on
    /// the CPU, whose ops fail before they return).
    pub fn checks(&self) -> &DeviceChecks {
        &self.checks
    }

    /// Adds `g` (host values) to the gradient of parameter `param` (creating it if absent); a
    /// device set takes a copy. Errors: the copy failed, or `g`'s length differs from the
    /// gradient already there.
    pub fn add(&mut self, param: usize, g: Vec<f32>) -> Result<()> {
        let storage = match &self.device {
            Device::Cpu => Storage::from(g),
            device => device.upload(&g)?,
        };
        self.add_storage(param, storage)
    }

    /// Adds `g` (on this set's device) to the gradient of parameter `param`.
    pub(crate) fn add_storage(&mut self, param: usize, g: Storage) -> Result<()> {
        if self.grads.len() <= param {
            self.grads.resize_with(param + 1, || None);
        }
        match &mut self.grads[param] {
            Some(existing) if existing.len() != g.len() => Err(HaloError::LengthMismatch {
                what: "gradient to add",
                expected: existing.len(),
                got: g.len(),
            }),
            Some(existing) => dev_ops::accumulate(&self.device, existing, g.as_ref()),
            slot => {
                *slot = Some(g);
                Ok(())
            }
        }
    }

    /// `self += other` (gradient accumulation over micro-batches); both on the same device.
    pub fn accumulate(&mut self, other: &Gradients) -> Result<()> {
        for (p, g) in other.storages() {
            let copy = self.device.copy(g)?;
            self.add_storage(p, copy)?;
        }
        self.checks.extend(&other.checks);
        Ok(())
    }

    /// The gradient of parameter `param`, or `None` when the output did not depend on it (or it
    /// lives on a CUDA device: see [`get_storage`](Self::get_storage)).
    pub fn get(&self, param: usize) -> Option<&[f32]> {
        self.grads
            .get(param)
            .and_then(|g| g.as_ref())
            .and_then(|g| g.host())
    }

    /// The gradient of parameter `param` wherever it lives.
    pub fn get_storage(&self, param: usize) -> Option<StorageRef<'_>> {
        self.grads
            .get(param)
            .and_then(|g| g.as_ref())
            .map(|g| g.as_ref())
    }

    /// Mutable access to the gradient of parameter `param`, or `None` when it is absent (or on a
    /// device).
    pub fn get_mut(&mut self, param: usize) -> Option<&mut [f32]> {
        self.grads
            .get_mut(param)
            .and_then(|g| g.as_mut())
            .and_then(|g| g.host_mut().ok())
    }

    /// `(parameter index, gradient)` for every present host gradient, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &[f32])> {
        self.grads
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.as_ref().and_then(|g| g.host()).map(|g| (i, g)))
    }

    /// `(parameter index, gradient)` for every present gradient wherever it lives.
    pub fn storages(&self) -> impl Iterator<Item = (usize, StorageRef<'_>)> {
        self.grads
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.as_ref().map(|g| (i, g.as_ref())))
    }

    /// An independent copy on the same device (`Gradients` is not `Clone`: a device copy can fail).
    pub fn try_clone(&self) -> Result<Gradients> {
        let mut out = Gradients::on(self.device.clone());
        for (p, g) in self.storages() {
            out.add_storage(p, self.device.copy(g)?)?;
        }
        out.checks = self.checks.clone();
        Ok(out)
    }

    /// A host copy (waits for the device when the gradients live on one). Device gradients'
    /// [`checks`](Self::checks) are read first: a failed one is the error.
    pub fn to_host(&self) -> Result<Gradients> {
        if let Device::Cuda(gpu) = &self.device {
            self.checks.verify(gpu)?;
        }
        let mut out = Gradients::new();
        for (p, g) in self.storages() {
            out.add_storage(p, Storage::from(self.device.to_host(g)?))?;
        }
        Ok(out)
    }

    /// Multiplies every host gradient by `factor`.
    pub fn scale(&mut self, factor: f32) {
        for g in self.grads.iter_mut().flatten() {
            if let Ok(g) = g.host_mut() {
                g.par_chunks_mut(1 << 14)
                    .for_each(|c| c.iter_mut().for_each(|v| *v *= factor));
            }
        }
    }

    /// The L2 norm of all host gradients together (accumulated in f64).
    pub fn global_norm(&self) -> f32 {
        self.iter()
            .map(|(_, g)| super::cpu::elementwise::sum_of_squares(g))
            .sum::<f64>()
            .sqrt() as f32
    }
}
