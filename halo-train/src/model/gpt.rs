//! [`Gpt`]: parameters in Hugging Face order and naming, and the forward pass on a [`Tape`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::GptConfig;
use crate::autograd::{Tape, Var};
use halo_kernels::error::{HaloError, Result};
use halo_kernels::IGNORE_INDEX;

/// GPT-2's layer-norm epsilon (`layer_norm_epsilon`); hard-coded, so a `config.json` with
/// another value is refused ([`GptConfig::from_hf_config`]).
pub const LAYER_NORM_EPS: f32 = 1e-5;
/// Standard deviation of the initial weights (`initializer_range`).
pub const INIT_STD: f32 = 0.02;

/// One named parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Parameter {
    /// Hugging Face name, e.g. `transformer.h.0.attn.c_attn.weight`.
    pub name: String,
    /// Dimensions, row-major (Hugging Face's layout, e.g. Conv1D weights are `[in, out]`).
    pub shape: Vec<usize>,
    /// The values, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

impl Parameter {
    fn new(name: String, shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Self { name, shape, data }
    }

    /// A parameter of `shape` filled with zeros.
    fn zeros(name: String, shape: Vec<usize>) -> Self {
        let data = vec![0.0; shape.iter().product()];
        Self::new(name, shape, data)
    }

    /// Whether AdamW applies weight decay to it: matrices (linear weights and the two embedding
    /// tables) yes, vectors (biases, layer-norm gains and shifts) no — nanoGPT's rule.
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2
    }
}

/// Parameter slots of one transformer block, in Hugging Face `state_dict` order.
const BLOCK_PARAMS: [&str; 12] = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
];
const WTE: usize = 0;
const WPE: usize = 1;
const FIRST_BLOCK: usize = 2;

/// A GPT-2 model: its config and parameters (owned `f32` tensors). `Clone` gives an independent
/// copy, e.g. the frozen reference model of KTO/DPO.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt {
    config: GptConfig,
    params: Vec<Parameter>,
}

impl Gpt {
    /// A freshly initialized model, deterministic in `seed`: weights `N(0, 0.02²)`, the two
    /// residual projections (`attn.c_proj`, `mlp.c_proj`) `N(0, (0.02/√(2·n_layer))²)` as in GPT-2,
    /// biases 0, layer norms γ = 1, β = 0.
    pub fn new(config: GptConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut model = Self::zeros(config)?;
        let proj_std = INIT_STD / (2.0 * config.n_layer as f32).sqrt();
        for p in &mut model.params {
            if p.name.ends_with("ln_1.weight")
                || p.name.ends_with("ln_2.weight")
                || p.name.ends_with("ln_f.weight")
            {
                p.data.fill(1.0);
            } else if p.shape.len() >= 2 {
                let std = if p.name.ends_with("c_proj.weight") {
                    proj_std
                } else {
                    INIT_STD
                };
                p.data
                    .iter_mut()
                    .for_each(|v| *v = std * standard_normal(&mut rng));
            }
        }
        Ok(model)
    }

    /// The parameter list with every value 0 (the skeleton a checkpoint is loaded into).
    pub(crate) fn zeros(config: GptConfig) -> Result<Self> {
        let params = Self::parameter_shapes(config)?
            .into_iter()
            .map(|(name, shape)| Parameter::zeros(name, shape))
            .collect();
        Ok(Self { config, params })
    }

    /// The name and shape of every parameter of a model with `config`, in index order, without
    /// allocating any values. Validates `config` first (so the shapes' products cannot overflow).
    pub(crate) fn parameter_shapes(config: GptConfig) -> Result<Vec<(String, Vec<usize>)>> {
        config.validate()?;
        let c = config.n_embd;
        let mut params = vec![
            (
                "transformer.wte.weight".to_string(),
                vec![config.vocab_size, c],
            ),
            ("transformer.wpe.weight".to_string(), vec![config.n_ctx, c]),
        ];
        for layer in 0..config.n_layer {
            for slot in BLOCK_PARAMS {
                let shape = match slot {
                    "attn.c_attn.weight" => vec![c, 3 * c],
                    "attn.c_attn.bias" => vec![3 * c],
                    "attn.c_proj.weight" => vec![c, c],
                    "mlp.c_fc.weight" => vec![c, 4 * c],
                    "mlp.c_fc.bias" => vec![4 * c],
                    "mlp.c_proj.weight" => vec![4 * c, c],
                    _ => vec![c],
                };
                params.push((format!("transformer.h.{layer}.{slot}"), shape));
            }
        }
        params.push(("transformer.ln_f.weight".into(), vec![c]));
        params.push(("transformer.ln_f.bias".into(), vec![c]));
        Ok(params)
    }

    /// The hyper-parameters the model was built with.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// Total number of scalars in all parameters (the tied embedding counted once).
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|p| p.data.len()).sum()
    }

    /// All parameters; index `i` here is the index of its gradient in
    /// [`Gradients`](crate::autograd::Gradients).
    pub fn parameters(&self) -> &[Parameter] {
        &self.params
    }

    /// Mutable access to the parameter values (shapes and names stay fixed).
    pub fn parameters_mut(&mut self) -> impl Iterator<Item = (&str, &mut [f32])> {
        self.params
            .iter_mut()
            .map(|p| (p.name.as_str(), p.data.as_mut_slice()))
    }

    /// Parameter names in index order.
    pub fn parameter_names(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// The index of the parameter called `name` (with or without the `transformer.` prefix).
    pub fn parameter_index(&self, name: &str) -> Option<usize> {
        self.params
            .iter()
            .position(|p| p.name == name || p.name.strip_prefix("transformer.") == Some(name))
    }

    /// Records parameter `index` on `tape` by reference (no copy).
    fn put<'a>(&'a self, tape: &mut Tape<'a>, index: usize) -> Result<Var> {
        let p = &self.params[index];
        tape.param(index, &p.data, &p.shape)
    }

    fn check_tokens(&self, input_ids: &[u32], batch: usize, seq: usize) -> Result<()> {
        let n = tokens_len(batch, seq)?;
        if batch == 0 || seq == 0 {
            return Err(HaloError::InvalidShape(format!(
                "batch ({batch}) and seq ({seq}) must both be at least 1"
            )));
        }
        if seq > self.config.n_ctx {
            return Err(HaloError::InvalidShape(format!(
                "seq {seq} is longer than the model's context n_ctx = {}",
                self.config.n_ctx
            )));
        }
        if input_ids.len() != n {
            return Err(HaloError::LengthMismatch {
                what: "input_ids",
                expected: n,
                got: input_ids.len(),
            });
        }
        if let Some(pos) = input_ids
            .iter()
            .position(|&t| t as usize >= self.config.vocab_size)
        {
            return Err(HaloError::InvalidShape(format!(
                "input_ids[{pos}] = {} is outside the vocabulary 0..{}",
                input_ids[pos], self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Records the forward pass up to the LM head: the final layer norm's output `[batch·seq,
    /// n_embd]` and the (tied) unembedding weight `wte` `[vocab, n_embd]`.
    pub fn final_hidden<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        input_ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<(Var, Var)> {
        self.check_tokens(input_ids, batch, seq)?;
        let cfg = self.config;
        let positions: Vec<u32> = (0..batch).flat_map(|_| 0..seq as u32).collect();
        let wte = self.put(tape, WTE)?;
        let wpe = self.put(tape, WPE)?;
        let tok = tape.embedding(wte, input_ids)?;
        let pos = tape.embedding(wpe, &positions)?;
        let mut x = tape.add(tok, pos)?;
        x = tape.dropout(x, cfg.dropout)?;
        for layer in 0..cfg.n_layer {
            let base = FIRST_BLOCK + layer * BLOCK_PARAMS.len();
            let p: Vec<Var> = (0..BLOCK_PARAMS.len())
                .map(|i| self.put(tape, base + i))
                .collect::<Result<_>>()?;
            // Attention branch.
            let h = tape.layernorm(x, p[0], p[1], LAYER_NORM_EPS)?;
            let qkv = tape.linear(h, p[2], Some(p[3]))?;
            let a = tape.causal_self_attention(qkv, batch, seq, cfg.n_head)?;
            let a = tape.linear(a, p[4], Some(p[5]))?;
            let a = tape.dropout(a, cfg.dropout)?;
            x = tape.add(x, a)?;
            // MLP branch.
            let h = tape.layernorm(x, p[6], p[7], LAYER_NORM_EPS)?;
            let f = tape.linear(h, p[8], Some(p[9]))?;
            let f = tape.gelu(f)?;
            let f = tape.linear(f, p[10], Some(p[11]))?;
            let f = tape.dropout(f, cfg.dropout)?;
            x = tape.add(x, f)?;
        }
        let ln_f = self.params.len() - 2;
        let gamma = self.put(tape, ln_f)?;
        let beta = self.put(tape, ln_f + 1)?;
        let h = tape.layernorm(x, gamma, beta, LAYER_NORM_EPS)?;
        Ok((h, wte))
    }

    /// Records the forward pass and returns the logits, shape `[batch·seq, vocab]`.
    /// `input_ids` is row-major `[batch, seq]`; position ids are `0..seq` in every row.
    pub fn logits<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        input_ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<Var> {
        let (h, wte) = self.final_hidden(tape, input_ids, batch, seq)?;
        // Tied unembedding: the same `wte` leaf, so both uses add into one gradient.
        tape.linear_transposed(h, wte, None)
    }

    /// Per-token `log p(targets[t] | input_ids[..=t])`, shape `[batch·seq]`, 0 where
    /// `targets[t] == -100`. No shifting happens inside: `targets[t]` is the token predicted at
    /// position `t` (for causal LM training pass `targets[t] = input_ids[t+1]`, −100 at the end).
    pub fn token_logprobs<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        input_ids: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<Var> {
        check_targets(targets, batch, seq)?;
        let logits = self.logits(tape, input_ids, batch, seq)?;
        tape.token_logprobs(logits, targets)
    }

    /// [`token_logprobs`](Gpt::token_logprobs) through the fused LM head: the same values (to f32
    /// rounding of the GEMM), without the `[batch·seq, vocab]` logits; the KTO and DPO steps use it
    /// for the policy.
    pub fn token_logprobs_fused_head<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        input_ids: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<Var> {
        check_targets(targets, batch, seq)?;
        let (h, wte) = self.final_hidden(tape, input_ids, batch, seq)?;
        tape.fused_head_token_logprobs(h, wte, targets)
    }

    /// Mean negative log-likelihood over the non-ignored targets, a scalar `[1]` (PyTorch
    /// `cross_entropy(reduction="mean", ignore_index=-100)`). Errors if every target is ignored.
    pub fn nll<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        input_ids: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<Var> {
        let counted = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        if counted == 0 {
            return Err(HaloError::EmptyBatch("targets (all ignored)"));
        }
        let logp = self.token_logprobs(tape, input_ids, targets, batch, seq)?;
        let total = tape.sum(logp)?;
        tape.scale(total, -1.0 / counted as f32)
    }

    /// [`token_logprobs`](Gpt::token_logprobs) without gradients or dropout (the frozen
    /// reference model, evaluation).
    pub fn token_logprobs_inference(
        &self,
        input_ids: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<Vec<f32>> {
        let mut tape = Tape::inference();
        let v = self.token_logprobs(&mut tape, input_ids, targets, batch, seq)?;
        Ok(std::mem::take(&mut tape.nodes[v.0].value).into_vec())
    }

    /// Logits `[batch·seq, vocab]` without gradients or dropout.
    ///
    /// Errors as [`logits`](Gpt::logits), and [`HaloError::NonFinite`] (`what: "logits"`, `row`:
    /// the first bad row) when finite but huge weights overflow f32 somewhere in the forward.
    pub fn logits_inference(
        &self,
        input_ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<Vec<f32>> {
        let mut tape = Tape::inference();
        let v = self.logits(&mut tape, input_ids, batch, seq)?;
        let logits = std::mem::take(&mut tape.nodes[v.0].value).into_vec();
        if let Some(index) = logits.iter().position(|z| !z.is_finite()) {
            return Err(HaloError::NonFinite {
                what: "logits",
                row: index / self.config.vocab_size.max(1),
            });
        }
        Ok(logits)
    }

    pub(crate) fn params_mut(&mut self) -> &mut [Parameter] {
        &mut self.params
    }

    pub(crate) fn from_parts(config: GptConfig, params: Vec<Parameter>) -> Self {
        Self { config, params }
    }
}

/// One target per token of the `[batch, seq]` input.
fn check_targets(targets: &[i32], batch: usize, seq: usize) -> Result<()> {
    let n = tokens_len(batch, seq)?;
    if targets.len() != n {
        return Err(HaloError::LengthMismatch {
            what: "targets",
            expected: n,
            got: targets.len(),
        });
    }
    Ok(())
}

/// `batch · seq`, or an error if the product overflows `usize` (sizes come from callers).
fn tokens_len(batch: usize, seq: usize) -> Result<usize> {
    batch.checked_mul(seq).ok_or_else(|| {
        HaloError::InvalidShape(format!("batch ({batch}) · seq ({seq}) overflows usize"))
    })
}

/// One `N(0, 1)` draw (Box–Muller; `rand` 0.8 has no normal distribution without `rand_distr`).
fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]: keeps ln finite
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
