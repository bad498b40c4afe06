//! The GPT-2 forward pass, written once for every place the weights can live: a host [`Gpt`](super::Gpt)
//! or a [`GptOnDevice`](super::GptOnDevice) on a CUDA device. Both implement
//! [`GptWeights`] (the config, the device, and how to record parameter `i` on a tape by
//! reference); everything else here is device-free: the tape's ops pick the kernels.

use super::config::GptConfig;
use super::gpt::{BLOCK_PARAMS, FIRST_BLOCK, LAYER_NORM_EPS, WPE, WTE};
use crate::autograd::{Device, DeviceChecks, Storage, Tape, Var};
use halo_kernels::error::{HaloError, Result};
use halo_kernels::IGNORE_INDEX;

/// What a forward pass reads from a model.
pub trait GptWeights {
    /// The model's hyper-parameters.
    fn config(&self) -> &GptConfig;
    /// Where the weights live (the device of every tape that records them).
    fn device(&self) -> Device;
    /// Records parameter `index` (Hugging Face order, [`super::Gpt::parameter_names`]) on
    /// `tape` by reference: never a copy.
    fn record<'a>(&'a self, tape: &mut Tape<'a>, index: usize) -> Result<Var>;

    /// Records the forward pass up to the LM head: the final layer norm's output `[batch·seq,
    /// n_embd]` and the (tied) unembedding weight `wte` `[vocab, n_embd]` ([`final_hidden`]).
    fn final_hidden<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        input_ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<(Var, Var)>
    where
        Self: Sized,
    {
        final_hidden(self, tape, input_ids, batch, seq)
    }

    /// Records the forward pass and returns the logits, shape `[batch·seq, vocab]` ([`logits`]).
    /// `input_ids` is row-major `[batch, seq]`; position ids are `0..seq` in every row.
    fn logits<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        input_ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<Var>
    where
        Self: Sized,
    {
        logits(self, tape, input_ids, batch, seq)
    }

    /// Per-token `log p(targets[t] | input_ids[..=t])`, shape `[batch·seq]`, 0 where
    /// `targets[t] == -100` ([`token_logprobs`]). No shifting happens inside: `targets[t]` is the
    /// token predicted at position `t` (for causal LM training pass `targets[t] = input_ids[t+1]`,
    /// −100 at the end).
    fn token_logprobs<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        input_ids: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<Var>
    where
        Self: Sized,
    {
        token_logprobs(self, tape, input_ids, targets, batch, seq)
    }

    /// [`token_logprobs`](Self::token_logprobs) through the fused LM head
    /// ([`token_logprobs_fused_head`]): the same values (to f32 rounding of the GEMM), without the
    /// `[batch·seq, vocab]` logits; the KTO and DPO steps use it for the policy.
    fn token_logprobs_fused_head<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        input_ids: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<Var>
    where
        Self: Sized,
    {
        token_logprobs_fused_head(self, tape, input_ids, targets, batch, seq)
    }

    /// Mean negative log-likelihood over the non-ignored targets, a scalar `[1]` ([`nll`]; PyTorch
    /// `cross_entropy(reduction="mean", ignore_index=-100)`). Errors if every target is ignored.
    fn nll<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        input_ids: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<Var>
    where
        Self: Sized,
    {
        nll(self, tape, input_ids, targets, batch, seq)
    }

    /// [`token_logprobs`](Self::token_logprobs) without gradients or dropout (the frozen
    /// reference model, evaluation; [`token_logprobs_inference`]).
    fn token_logprobs_inference(
        &self,
        input_ids: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<Vec<f32>>
    where
        Self: Sized,
    {
        token_logprobs_inference(self, input_ids, targets, batch, seq)
    }

    /// Logits `[batch·seq, vocab]` without gradients or dropout ([`logits_inference`]). Errors as
    /// [`logits`](Self::logits), and [`HaloError::NonFinite`] (`what: "logits"`, `row`: the first
    /// bad row) when finite but huge weights overflow f32 somewhere in the forward.
    fn logits_inference(&self, input_ids: &[u32], batch: usize, seq: usize) -> Result<Vec<f32>>
    where
        Self: Sized,
    {
        logits_inference(self, input_ids, batch, seq)
    }
}

fn check_tokens(config: &GptConfig, input_ids: &[u32], batch: usize, seq: usize) -> Result<()> {
    let n = tokens_len(batch, seq)?;
    if batch == 0 || seq == 0 {
        return Err(HaloError::InvalidShape(format!(
            "batch ({batch}) and seq ({seq}) must both be at least 1"
        )));
    }
    if seq > config.n_ctx {
        return Err(HaloError::InvalidShape(format!(
            "seq {seq} is longer than the model's context n_ctx = {}",
            config.n_ctx
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
        .position(|&t| t as usize >= config.vocab_size)
    {
        return Err(HaloError::InvalidShape(format!(
            "input_ids[{pos}] = {} is outside the vocabulary 0..{}",
            input_ids[pos], config.vocab_size
        )));
    }
    Ok(())
}

/// The final layer norm's output `[batch·seq, n_embd]` and the tied unembedding `wte`.
pub fn final_hidden<'a, W: GptWeights>(
    model: &'a W,
    tape: &mut Tape<'a>,
    input_ids: &[u32],
    batch: usize,
    seq: usize,
) -> Result<(Var, Var)> {
    let cfg = *model.config();
    check_tokens(&cfg, input_ids, batch, seq)?;
    let positions: Vec<u32> = (0..batch).flat_map(|_| 0..seq as u32).collect();
    let wte = model.record(tape, WTE)?;
    let wpe = model.record(tape, WPE)?;
    let tok = tape.embedding(wte, input_ids)?;
    let pos = tape.embedding(wpe, &positions)?;
    let mut x = tape.add(tok, pos)?;
    x = tape.dropout(x, cfg.dropout)?;
    for layer in 0..cfg.n_layer {
        let base = FIRST_BLOCK + layer * BLOCK_PARAMS.len();
        let p: Vec<Var> = (0..BLOCK_PARAMS.len())
            .map(|i| model.record(tape, base + i))
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
    let ln_f = FIRST_BLOCK + cfg.n_layer * BLOCK_PARAMS.len();
    let gamma = model.record(tape, ln_f)?;
    let beta = model.record(tape, ln_f + 1)?;
    let h = tape.layernorm(x, gamma, beta, LAYER_NORM_EPS)?;
    Ok((h, wte))
}

/// The logits `[batch·seq, vocab]` through the tied unembedding.
pub fn logits<'a, W: GptWeights>(
    model: &'a W,
    tape: &mut Tape<'a>,
    input_ids: &[u32],
    batch: usize,
    seq: usize,
) -> Result<Var> {
    let (h, wte) = final_hidden(model, tape, input_ids, batch, seq)?;
    // Tied unembedding: the same `wte` leaf, so both uses add into one gradient.
    tape.linear_transposed(h, wte, None)
}

/// Per-token log-probs of `targets` through the materialized logits.
pub fn token_logprobs<'a, W: GptWeights>(
    model: &'a W,
    tape: &mut Tape<'a>,
    input_ids: &[u32],
    targets: &[i32],
    batch: usize,
    seq: usize,
) -> Result<Var> {
    check_targets(targets, batch, seq)?;
    let logits = logits(model, tape, input_ids, batch, seq)?;
    tape.token_logprobs(logits, targets)
}

/// Per-token log-probs of `targets` through the fused LM head.
pub fn token_logprobs_fused_head<'a, W: GptWeights>(
    model: &'a W,
    tape: &mut Tape<'a>,
    input_ids: &[u32],
    targets: &[i32],
    batch: usize,
    seq: usize,
) -> Result<Var> {
    check_targets(targets, batch, seq)?;
    let (h, wte) = final_hidden(model, tape, input_ids, batch, seq)?;
    tape.fused_head_token_logprobs(h, wte, targets)
}

/// Mean negative log-likelihood over the counted targets, a scalar `[1]`.
pub fn nll<'a, W: GptWeights>(
    model: &'a W,
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
    let logp = token_logprobs(model, tape, input_ids, targets, batch, seq)?;
    let total = tape.sum(logp)?;
    tape.scale(total, -1.0 / counted as f32)
}

/// [`token_logprobs`] on an inference tape (no dropout, no gradient), as host values.
pub fn token_logprobs_inference<W: GptWeights>(
    model: &W,
    input_ids: &[u32],
    targets: &[i32],
    batch: usize,
    seq: usize,
) -> Result<Vec<f32>> {
    let mut tape = Tape::inference().on(model.device());
    let v = token_logprobs(model, &mut tape, input_ids, targets, batch, seq)?;
    tape.take_to_host(v)
}

/// [`token_logprobs_inference`] left where the model lives: the log-probs and the checks of the
/// kernels that computed them, not read yet (empty on the CPU, whose ops fail as they run).
pub fn token_logprobs_inference_queued<W: GptWeights>(
    model: &W,
    input_ids: &[u32],
    targets: &[i32],
    batch: usize,
    seq: usize,
) -> Result<(Storage, DeviceChecks)> {
    let mut tape = Tape::inference().on(model.device());
    let v = token_logprobs(model, &mut tape, input_ids, targets, batch, seq)?;
    let value = tape.take_storage(v)?;
    Ok((value, tape.checks().clone()))
}

/// [`logits`] on an inference tape, as host values; a non-finite logit is an error.
pub fn logits_inference<W: GptWeights>(
    model: &W,
    input_ids: &[u32],
    batch: usize,
    seq: usize,
) -> Result<Vec<f32>> {
    let mut tape = Tape::inference().on(model.device());
    let v = logits(model, &mut tape, input_ids, batch, seq)?;
    let logits = tape.take_to_host(v)?;
    if let Some(index) = logits.iter().position(|z| !z.is_finite()) {
        return Err(HaloError::NonFinite {
            what: "logits",
            row: index / model.config().vocab_size.max(1),
        });
    }
    Ok(logits)
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
