//! The op methods of [`Tape`]: check shapes, compute the value with the [`cpu`](super::cpu)
//! kernels, record what the backward needs. Matrices are row-major; an op that works on rows
//! treats a tensor as `[numel / last_dim, last_dim]`.

use super::cpu::attention::AttentionShape;
use super::device_ops::{self as dev_ops, SavedIds, SavedLabels};
use super::storage::{Device, Storage, StorageRef};
use super::tape::{Op, Tape, Value, Var};
use halo_kernels::error::{HaloError, Result};

fn shape_err(msg: String) -> HaloError {
    HaloError::InvalidShape(msg)
}

impl<'a> Tape<'a> {
    fn leaf(&mut self, value: Value<'a>, shape: &[usize], param: Option<usize>) -> Result<Var> {
        if self.is_consumed() {
            return Err(HaloError::Autograd(
                "the tape has already been through backward; record a new one".into(),
            ));
        }
        let numel: usize = shape.iter().product();
        let on_device = matches!(
            (&self.device, value.as_ref()),
            (Device::Cpu, StorageRef::Host(_)) | (Device::Cuda(_), StorageRef::Cuda(_))
        );
        if !on_device {
            return Err(self.device.mismatch(value.as_ref(), "leaf"));
        }
        if value.len() != numel {
            return Err(HaloError::LengthMismatch {
                what: "leaf value",
                expected: numel,
                got: value.len(),
            });
        }
        Ok(self.push(value, shape.to_vec(), Op::Leaf { param }, &[]))
    }

    /// A trainable leaf. Its gradient is reported by [`backward`](Tape::backward) under `index`.
    /// The value is borrowed, not copied (a model's parameters are read in place by every
    /// forward): the caller can update it once the tape is gone.
    pub fn param(&mut self, index: usize, value: &'a [f32], shape: &[usize]) -> Result<Var> {
        self.leaf(Value::Borrowed(StorageRef::Host(value)), shape, Some(index))
    }

    /// [`param`](Tape::param) for values wherever they live (a parameter on a CUDA device for a
    /// CUDA tape); borrowed, not copied.
    pub fn param_storage(
        &mut self,
        index: usize,
        value: StorageRef<'a>,
        shape: &[usize],
    ) -> Result<Var> {
        self.leaf(Value::Borrowed(value), shape, Some(index))
    }

    /// A leaf that gets no gradient (inputs, masks). The value is copied onto the tape (and onto
    /// its device).
    pub fn constant(&mut self, value: &[f32], shape: &[usize]) -> Result<Var> {
        let numel: usize = shape.iter().product();
        if value.len() != numel {
            return Err(HaloError::LengthMismatch {
                what: "leaf value",
                expected: numel,
                got: value.len(),
            });
        }
        let stored = self.device.upload(value)?;
        self.leaf(stored.into(), shape, None)
    }

    /// Records an op's output.
    fn record(&mut self, value: Storage, shape: Vec<usize>, op: Op, inputs: &[Var]) -> Var {
        self.push(value.into(), shape, op, inputs)
    }

    fn rows_cols(&self, v: Var) -> (usize, usize) {
        let shape = self.shape(v);
        let cols = *shape.last().unwrap_or(&1);
        let numel: usize = shape.iter().product();
        (numel.checked_div(cols).unwrap_or(0), cols)
    }

    /// Rows `ids[r]` of `table` (`[vocab, dim]`) → `[ids.len(), dim]`. Ids ≥ vocab are an error.
    pub fn embedding(&mut self, table: Var, ids: &[u32]) -> Result<Var> {
        self.check(table, "table")?;
        let shape = self.shape(table).to_vec();
        if shape.len() != 2 {
            return Err(shape_err(format!(
                "embedding: table must be [vocab, dim], got {shape:?}"
            )));
        }
        let (vocab, dim) = (shape[0], shape[1]);
        if let Some(pos) = ids.iter().position(|&id| id as usize >= vocab) {
            return Err(shape_err(format!(
                "embedding: id {} at position {pos} is outside the table's {vocab} rows",
                ids[pos]
            )));
        }
        let saved = SavedIds::new(&self.device, ids, vocab)?;
        let y = dev_ops::embedding_fwd(&self.device, self.storage(table), &saved, dim)?;
        let op = Op::Embedding { table, ids: saved };
        Ok(self.record(y, vec![ids.len(), dim], op, &[table]))
    }

    /// `x·w + b` with `x: [n, in]`, `w: [in, out]` (Hugging Face Conv1D layout), `b: [out]`.
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        self.linear_impl(x, w, b, false)
    }

    /// The plain product `a·b` (`a: [n, k]`, `b: [k, m]`): [`linear`](Tape::linear) without a bias.
    pub fn matmul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.linear_impl(a, b, None, false)
    }

    /// `x·wᵀ (+ b)` with `w: [out, in]` (nn.Linear layout; the tied unembedding `h·wteᵀ`).
    pub fn linear_transposed(&mut self, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        self.linear_impl(x, w, b, true)
    }

    fn linear_impl(&mut self, x: Var, w: Var, b: Option<Var>, transpose_w: bool) -> Result<Var> {
        self.check(x, "x")?;
        self.check(w, "w")?;
        let (n, k) = self.rows_cols(x);
        let ws = self.shape(w).to_vec();
        let (wk, m) = match (ws.as_slice(), transpose_w) {
            ([a, b], false) => (*a, *b),
            ([a, b], true) => (*b, *a),
            _ => return Err(shape_err(format!("linear: weight must be 2-D, got {ws:?}"))),
        };
        if wk != k {
            return Err(shape_err(format!(
                "linear: x is {:?} but the weight{} is {ws:?}",
                self.shape(x),
                if transpose_w { " (transposed)" } else { "" }
            )));
        }
        if let Some(b) = b {
            self.check(b, "b")?;
            if self.shape(b) != [m] {
                return Err(shape_err(format!(
                    "linear: bias is {:?}, expected [{m}]",
                    self.shape(b)
                )));
            }
        }
        let y = dev_ops::linear_fwd(
            &self.device,
            self.storage(x),
            self.storage(w),
            b.map(|b| self.storage(b)),
            n,
            k,
            m,
            transpose_w,
        )?;
        let mut inputs = vec![x, w];
        inputs.extend(b);
        let mut shape = self.shape(x).to_vec();
        *shape.last_mut().unwrap() = m;
        Ok(self.record(
            y,
            shape,
            Op::Linear {
                x,
                w,
                b,
                transpose_w,
            },
            &inputs,
        ))
    }

    /// `x + b` with `b` broadcast over the rows of `x` (`b.len()` = last dim of `x`).
    pub fn add_bias(&mut self, x: Var, b: Var) -> Result<Var> {
        self.check(x, "x")?;
        self.check(b, "b")?;
        let (_, cols) = self.rows_cols(x);
        if self.shape(b) != [cols] {
            return Err(shape_err(format!(
                "add_bias: x is {:?}, bias is {:?}",
                self.shape(x),
                self.shape(b)
            )));
        }
        let y = dev_ops::add_bias_fwd(&self.device, self.storage(x), self.storage(b))?;
        let shape = self.shape(x).to_vec();
        Ok(self.record(y, shape, Op::AddBias { x, b }, &[x, b]))
    }

    /// `a + b`, same shapes (the residual connection).
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        self.check(a, "a")?;
        self.check(b, "b")?;
        if self.shape(a) != self.shape(b) {
            return Err(shape_err(format!(
                "add: {:?} vs {:?}",
                self.shape(a),
                self.shape(b)
            )));
        }
        let y = dev_ops::add_fwd(&self.device, self.storage(a), self.storage(b))?;
        let shape = self.shape(a).to_vec();
        Ok(self.record(y, shape, Op::Add { a, b }, &[a, b]))
    }

    /// `factor · x`.
    pub fn scale(&mut self, x: Var, factor: f32) -> Result<Var> {
        self.check(x, "x")?;
        let y = dev_ops::scale_fwd(&self.device, self.storage(x), factor)?;
        let shape = self.shape(x).to_vec();
        Ok(self.record(y, shape, Op::Scale { x, factor }, &[x]))
    }

    /// The sum of all elements → shape `[1]` (accumulated in f64).
    pub fn sum(&mut self, x: Var) -> Result<Var> {
        self.check(x, "x")?;
        let s = dev_ops::sum_fwd(&self.device, self.storage(x))?;
        Ok(self.record(s, vec![1], Op::Sum { x }, &[x]))
    }

    /// Layer norm over the last dimension (`gamma`, `beta`: `[dim]`), biased variance, `eps`
    /// inside the square root (GPT-2 uses 1e-5).
    pub fn layernorm(&mut self, x: Var, gamma: Var, beta: Var, eps: f32) -> Result<Var> {
        for (v, what) in [(x, "x"), (gamma, "gamma"), (beta, "beta")] {
            self.check(v, what)?;
        }
        let (rows, dim) = self.rows_cols(x);
        if self.shape(gamma) != [dim] || self.shape(beta) != [dim] {
            return Err(shape_err(format!(
                "layernorm: x is {:?}, gamma {:?}, beta {:?}",
                self.shape(x),
                self.shape(gamma),
                self.shape(beta)
            )));
        }
        let (y, mean, rstd) = dev_ops::layernorm_fwd(
            &self.device,
            self.storage(x),
            self.storage(gamma),
            self.storage(beta),
            eps,
            rows,
        )?;
        let shape = self.shape(x).to_vec();
        let op = Op::LayerNorm {
            x,
            gamma,
            beta,
            mean,
            rstd,
        };
        Ok(self.record(y, shape, op, &[x, gamma, beta]))
    }

    /// GELU, tanh approximation (GPT-2's activation).
    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        self.check(x, "x")?;
        let y = dev_ops::gelu_fwd(&self.device, self.storage(x))?;
        let shape = self.shape(x).to_vec();
        Ok(self.record(y, shape, Op::Gelu { x }, &[x]))
    }

    /// Fused causal self-attention on the `c_attn` output `qkv: [batch·seq, 3·C]` → `[batch·seq, C]`
    /// (see [`attention`](super::cpu::attention)).
    pub fn causal_self_attention(
        &mut self,
        qkv: Var,
        batch: usize,
        seq: usize,
        n_head: usize,
    ) -> Result<Var> {
        self.check(qkv, "qkv")?;
        let (rows, three_c) = self.rows_cols(qkv);
        let dim = three_c / 3;
        if rows != batch * seq
            || !three_c.is_multiple_of(3)
            || n_head == 0
            || !dim.is_multiple_of(n_head)
        {
            return Err(shape_err(format!(
                "attention: qkv is {:?}, expected [{batch}·{seq}, 3·C] with C divisible by {n_head} heads",
                self.shape(qkv)
            )));
        }
        let shape = AttentionShape {
            batch,
            seq,
            n_head,
            dim,
        };
        let (out, probs) = dev_ops::attention_fwd(&self.device, self.storage(qkv), shape)?;
        Ok(self.record(
            out,
            vec![rows, dim],
            Op::Attention { qkv, shape, probs },
            &[qkv],
        ))
    }

    /// Inverted dropout with drop probability `p` in `[0, 1)`: identity when `p == 0` or the tape
    /// is not training (then no node is recorded).
    pub fn dropout(&mut self, x: Var, p: f32) -> Result<Var> {
        self.check(x, "x")?;
        if !(0.0..1.0).contains(&p) {
            return Err(HaloError::InvalidHyperParameter {
                name: "dropout",
                value: p as f64,
                reason: "must be in [0, 1)",
            });
        }
        if p == 0.0 || !self.training {
            return Ok(x);
        }
        let len = self.storage(x).len();
        let mask = dev_ops::dropout_mask(&self.device, len, p, &mut self.rng)?;
        let y = dev_ops::multiply(&self.device, self.storage(x), mask.as_ref())?;
        let shape = self.shape(x).to_vec();
        Ok(self.record(y, shape, Op::Dropout { x, mask }, &[x]))
    }

    /// [`token_logprobs`](Tape::token_logprobs) of `hidden · weightᵀ` (`hidden: [rows, H]`, the
    /// tied or untied LM head `weight: [vocab, H]`) through the fused LM head
    /// ([`halo_kernels::fused_head`]): the `[rows, vocab]` logits are never stored, the backward
    /// recomputes them a tile at a time and gives `∂hidden` and `∂weight`.
    pub fn fused_head_token_logprobs(
        &mut self,
        hidden: Var,
        weight: Var,
        labels: &[i32],
    ) -> Result<Var> {
        self.check(hidden, "hidden")?;
        self.check(weight, "weight")?;
        let (rows, hidden_size) = self.rows_cols(hidden);
        let (vocab, weight_cols) = match self.shape(weight) {
            [v, h] => (*v, *h),
            other => {
                return Err(shape_err(format!(
                    "fused head: weight must be [vocab, hidden], got {other:?}"
                )))
            }
        };
        if weight_cols != hidden_size {
            return Err(shape_err(format!(
                "fused head: hidden is {:?} but the weight is {:?}",
                self.shape(hidden),
                self.shape(weight)
            )));
        }
        if rows != labels.len() {
            return Err(HaloError::LengthMismatch {
                what: "labels",
                expected: rows,
                got: labels.len(),
            });
        }
        let saved = SavedLabels::new(&self.device, labels)?;
        let (logp, row_max, ln_sum) = dev_ops::fused_head_fwd(
            &self.device,
            self.nodes[hidden.0].value.as_ref(),
            self.nodes[weight.0].value.as_ref(),
            &saved,
            vocab,
            hidden_size,
            &mut self.checks,
        )?;
        let op = Op::FusedHeadTokenLogprobs {
            hidden,
            weight,
            labels: saved,
            row_max,
            ln_sum,
            vocab,
        };
        Ok(self.record(logp, vec![rows], op, &[hidden, weight]))
    }

    /// Per-row `log softmax(logits)[label]` (`logits: [rows, vocab]`, `labels: [rows]`,
    /// −100 = ignored → 0) → `[rows]`. Forward is [`halo_kernels::cpu::token_logprobs()`], backward
    /// [`halo_kernels::cpu::token_logprobs_backward()`]: this is where a HALO loss's per-token gradient
    /// enters the model.
    pub fn token_logprobs(&mut self, logits: Var, labels: &[i32]) -> Result<Var> {
        self.check(logits, "logits")?;
        let (rows, vocab) = self.rows_cols(logits);
        if rows != labels.len() {
            return Err(HaloError::LengthMismatch {
                what: "labels",
                expected: rows,
                got: labels.len(),
            });
        }
        let saved = SavedLabels::new(&self.device, labels)?;
        let (logp, lse, lse_residual) = dev_ops::token_logprobs_fwd(
            &self.device,
            self.nodes[logits.0].value.as_ref(),
            &saved,
            vocab,
            &mut self.checks,
        )?;
        let op = Op::TokenLogprobs {
            logits,
            labels: saved,
            lse,
            lse_residual,
            vocab,
        };
        Ok(self.record(logp, vec![rows], op, &[logits]))
    }
}
