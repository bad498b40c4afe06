//! The op methods of [`Tape`]: check shapes, compute the value with the [`cpu`](super::cpu)
//! kernels, record what the backward needs. Matrices are row-major; an op that works on rows
//! treats a tensor as `[numel / last_dim, last_dim]`.

use super::cpu::attention::{attention_forward, AttentionShape};
use super::cpu::elementwise::{add_bias_forward, dropout_mask, multiply};
use super::cpu::embedding::embedding_forward;
use super::cpu::gelu::gelu_forward;
use super::cpu::layernorm::layernorm_forward;
use super::cpu::matmul::linear_forward;
use super::pool::Buffer;
use super::tape::{Op, Tape, Value, Var};
use halo_kernels::error::{HaloError, Result};
use halo_kernels::IGNORE_INDEX;

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
        self.leaf(Value::Borrowed(value), shape, Some(index))
    }

    /// A leaf that gets no gradient (inputs, masks). The value is copied onto the tape.
    pub fn constant(&mut self, value: &[f32], shape: &[usize]) -> Result<Var> {
        self.leaf(Buffer::copied(value).into(), shape, None)
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
        let mut y = Buffer::for_overwrite(ids.len() * dim);
        embedding_forward(self.value(table), ids, dim, &mut y);
        let op = Op::Embedding {
            table,
            ids: ids.to_vec(),
        };
        Ok(self.push(y.into(), vec![ids.len(), dim], op, &[table]))
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
        let mut y = Buffer::for_overwrite(n * m);
        linear_forward(
            self.value(x),
            self.value(w),
            b.map(|b| self.value(b)),
            n,
            k,
            m,
            transpose_w,
            &mut y,
        );
        let mut inputs = vec![x, w];
        inputs.extend(b);
        let mut shape = self.shape(x).to_vec();
        *shape.last_mut().unwrap() = m;
        Ok(self.push(
            y.into(),
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
        let mut y = Buffer::for_overwrite(self.value(x).len());
        add_bias_forward(self.value(x), self.value(b), &mut y);
        let shape = self.shape(x).to_vec();
        Ok(self.push(y.into(), shape, Op::AddBias { x, b }, &[x, b]))
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
        let mut y = Buffer::for_overwrite(self.value(a).len());
        for ((o, &x), &z) in y.iter_mut().zip(self.value(a)).zip(self.value(b)) {
            *o = x + z;
        }
        let shape = self.shape(a).to_vec();
        Ok(self.push(y.into(), shape, Op::Add { a, b }, &[a, b]))
    }

    /// `factor · x`.
    pub fn scale(&mut self, x: Var, factor: f32) -> Result<Var> {
        self.check(x, "x")?;
        let mut y = Buffer::for_overwrite(self.value(x).len());
        for (o, &v) in y.iter_mut().zip(self.value(x)) {
            *o = v * factor;
        }
        let shape = self.shape(x).to_vec();
        Ok(self.push(y.into(), shape, Op::Scale { x, factor }, &[x]))
    }

    /// The sum of all elements → shape `[1]` (accumulated in f64).
    pub fn sum(&mut self, x: Var) -> Result<Var> {
        self.check(x, "x")?;
        let s = self.value(x).iter().map(|&v| v as f64).sum::<f64>() as f32;
        Ok(self.push(vec![s].into(), vec![1], Op::Sum { x }, &[x]))
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
        let mut y = Buffer::for_overwrite(rows * dim);
        let mut mean = Buffer::for_overwrite(rows);
        let mut rstd = Buffer::for_overwrite(rows);
        layernorm_forward(
            self.value(x),
            self.value(gamma),
            self.value(beta),
            eps,
            &mut y,
            &mut mean,
            &mut rstd,
        );
        let shape = self.shape(x).to_vec();
        let op = Op::LayerNorm {
            x,
            gamma,
            beta,
            mean,
            rstd,
        };
        Ok(self.push(y.into(), shape, op, &[x, gamma, beta]))
    }

    /// GELU, tanh approximation (GPT-2's activation).
    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        self.check(x, "x")?;
        let mut y = Buffer::for_overwrite(self.value(x).len());
        gelu_forward(self.value(x), &mut y);
        let shape = self.shape(x).to_vec();
        Ok(self.push(y.into(), shape, Op::Gelu { x }, &[x]))
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
        let mut out = Buffer::for_overwrite(rows * dim);
        let mut probs = Buffer::for_overwrite(batch * n_head * seq * seq);
        attention_forward(self.value(qkv), shape, &mut out, &mut probs);
        Ok(self.push(
            out.into(),
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
        let mut mask = Buffer::for_overwrite(self.value(x).len());
        dropout_mask(&mut mask, p, &mut self.rng);
        let mut y = Buffer::for_overwrite(mask.len());
        multiply(self.value(x), &mask, &mut y);
        let shape = self.shape(x).to_vec();
        Ok(self.push(y.into(), shape, Op::Dropout { x, mask }, &[x]))
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
        let head = halo_kernels::fused_head::LmHead {
            weight: self.value(weight),
            bias: None,
            vocab,
            hidden_size,
        };
        let out = halo_kernels::fused_head::fused_linear_token_logprobs(
            self.value(hidden),
            &head,
            labels,
            IGNORE_INDEX,
            None,
        )?;
        let op = Op::FusedHeadTokenLogprobs {
            hidden,
            weight,
            labels: labels.to_vec(),
            row_max: out.row_max.into(),
            ln_sum: out.ln_sum.into(),
            vocab,
        };
        Ok(self.push(out.logp.into(), vec![rows], op, &[hidden, weight]))
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
        let out =
            halo_kernels::cpu::token_logprobs(self.value(logits), labels, vocab, IGNORE_INDEX)?;
        let op = Op::TokenLogprobs {
            logits,
            labels: labels.to_vec(),
            lse: out.lse.into(),
            lse_residual: out.lse_residual.into(),
            vocab,
        };
        Ok(self.push(out.logp.into(), vec![rows], op, &[logits]))
    }
}
