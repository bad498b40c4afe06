//! Token batches in the padded `[batch, seq]` layout the model and the sequence ops take, the
//! epoch sampler, and the KTO KL pairs.
//!
//! Every sequence is `[EOS] prompt completion [EOS]` (the leading EOS plays GPT-2's
//! `<|endoftext|>` role as a start token), prompt and completion encoded separately by the run's
//! [`TextTokenizer`] (see [`super::tokenizer`] for what that means with a BPE tokenizer). `targets[t]` is the token predicted at position `t`,
//! i.e. `input_ids[t + 1]`, or [`IGNORE_INDEX`] where that token does not count: prompt tokens in
//! completion batches, the last position, padding.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::data::{PairedExample, UnpairedExample};
use super::tokenizer::TextTokenizer;
use halo_kernels::error::{HaloError, Result};
use halo_kernels::IGNORE_INDEX;

/// `batch` sequences of `seq` tokens each, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    /// Token ids, `[batch, seq]`; rows shorter than `seq` are right-padded with EOS.
    pub input_ids: Vec<u32>,
    /// Next-token targets, `[batch, seq]`: `targets[t] = input_ids[t + 1]` where the prediction
    /// counts, [`IGNORE_INDEX`] elsewhere (see the module docs).
    pub targets: Vec<i32>,
    /// Number of sequences (rows).
    pub batch: usize,
    /// Tokens per row: the longest sequence of the batch, at most the `max_len` it was built with.
    pub seq: usize,
}

/// Which next-token predictions count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSpan {
    /// Every token after the start token (language modelling on the whole text).
    Everything,
    /// Only the completion and its closing EOS (SFT, KTO, DPO).
    CompletionOnly,
}

/// `[EOS] prompt`: the head of every training sequence, and what the model continues when it
/// generates.
pub fn prompt_context(tok: &TextTokenizer, prompt: &str) -> Result<Vec<u32>> {
    let mut context = vec![tok.eos()];
    context.extend(tok.encode(prompt)?);
    Ok(context)
}

/// One tokenized sequence and the index where its completion starts.
fn encode(
    tok: &TextTokenizer,
    prompt: &str,
    completion: &str,
    max_len: usize,
) -> Result<(Vec<u32>, usize)> {
    let mut head = prompt_context(tok, prompt)?;
    let mut tail = tok.encode(completion)?;
    tail.push(tok.eos());
    // Over-long examples keep the end of the prompt and the start of the completion (TRL's
    // truncation keeps the prompt's end too); one context token always remains.
    tail.truncate(max_len.saturating_sub(1).max(1));
    let room = max_len.saturating_sub(tail.len()).max(1);
    if head.len() > room {
        head.drain(..head.len() - room);
    }
    let start = head.len();
    head.extend(tail);
    Ok((head, start))
}

/// Tokenizes `(prompt, completion)` pairs into one padded batch (padding id EOS, target ignored).
pub fn token_batch(
    tok: &TextTokenizer,
    examples: &[(&str, &str)],
    span: TargetSpan,
    max_len: usize,
) -> Result<TokenBatch> {
    if examples.is_empty() {
        return Err(HaloError::EmptyBatch("examples"));
    }
    if max_len < 2 {
        return Err(HaloError::InvalidShape(format!(
            "max_len must be at least 2 (a context token and a target), got {max_len}"
        )));
    }
    let encoded: Vec<(Vec<u32>, usize)> = examples
        .iter()
        .map(|(p, c)| encode(tok, p, c, max_len))
        .collect::<Result<_>>()?;
    let seq = encoded.iter().map(|(ids, _)| ids.len()).max().unwrap_or(1);
    let mut input_ids = vec![tok.eos(); examples.len() * seq];
    let mut targets = vec![IGNORE_INDEX; examples.len() * seq];
    for (row, (ids, completion_start)) in encoded.iter().enumerate() {
        let base = row * seq;
        input_ids[base..base + ids.len()].copy_from_slice(ids);
        let first_target = match span {
            TargetSpan::Everything => 1,
            TargetSpan::CompletionOnly => *completion_start,
        };
        for next in first_target..ids.len() {
            targets[base + next - 1] = ids[next] as i32;
        }
    }
    Ok(TokenBatch {
        input_ids,
        targets,
        batch: examples.len(),
        seq,
    })
}

/// The example whose completion is paired with example `i`'s prompt to form its KL pair:
/// `(i + batch − 1) % batch`, the rotation by one of TRL's `_get_kl_dataset`
/// (`trl/trainer/kto_trainer.py`: `[answers[-1]] + answers[:-1]`). For `batch > 1` no example
/// keeps its own completion. A batch of one cannot be mismatched, so it is an error (TRL would
/// silently pair the example with itself, making the reference point a matched log-ratio).
pub fn kl_partners(batch: usize) -> Result<Vec<usize>> {
    if batch < 2 {
        return Err(HaloError::InvalidShape(format!(
            "KTO KL pairs rotate completions inside a batch and need batch >= 2, got {batch}"
        )));
    }
    Ok((0..batch).map(|i| (i + batch - 1) % batch).collect())
}

/// A KTO batch: the examples, their mismatched KL pairs, and the labels.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoBatch {
    /// Each example's own `(prompt, completion)`, completion tokens counted.
    pub examples: TokenBatch,
    /// Row `i`: example `i`'s prompt with the completion of example [`kl_partners`]`[i]`, for
    /// KTO's KL reference point; same number of rows as `examples`.
    pub kl_pairs: TokenBatch,
    /// Label of each row of `examples` (`true`: desirable).
    pub desirable: Vec<bool>,
    /// The reference model's summed log-probs of `examples`, when they were computed once before
    /// training (`--precompute-ref-logps`, TRL's `precompute_ref_log_probs`); `None`: the step
    /// runs the reference model itself.
    pub reference_logps: Option<Vec<f32>>,
}

/// Tokenizes a KTO batch, building KL pairs by rotating completions by one.
pub fn kto_batch(
    tok: &TextTokenizer,
    examples: &[&UnpairedExample],
    max_len: usize,
) -> Result<KtoBatch> {
    let partners = kl_partners(examples.len())?;
    let matched: Vec<(&str, &str)> = examples
        .iter()
        .map(|e| (e.prompt.as_str(), e.completion.as_str()))
        .collect();
    let mismatched: Vec<(&str, &str)> = examples
        .iter()
        .zip(&partners)
        .map(|(e, &j)| (e.prompt.as_str(), examples[j].completion.as_str()))
        .collect();
    Ok(KtoBatch {
        examples: token_batch(tok, &matched, TargetSpan::CompletionOnly, max_len)?,
        kl_pairs: token_batch(tok, &mismatched, TargetSpan::CompletionOnly, max_len)?,
        desirable: examples.iter().map(|e| e.desirable).collect(),
        reference_logps: None,
    })
}

/// A DPO batch as one forward pass: rows `0..n` are the chosen completions, rows `n..2n` the
/// rejected ones (TRL's `concatenated_forward` order).
pub fn dpo_batch(
    tok: &TextTokenizer,
    pairs: &[&PairedExample],
    max_len: usize,
) -> Result<TokenBatch> {
    let rows: Vec<(&str, &str)> = pairs
        .iter()
        .map(|p| (p.prompt.as_str(), p.chosen.as_str()))
        .chain(
            pairs
                .iter()
                .map(|p| (p.prompt.as_str(), p.rejected.as_str())),
        )
        .collect();
    token_batch(tok, &rows, TargetSpan::CompletionOnly, max_len)
}

/// Draws full batches of indices in shuffled epochs: every index once per epoch; a batch that
/// crosses an epoch boundary is completed from the next (reshuffled) epoch.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    order: Vec<usize>,
    position: usize,
    rng: ChaCha8Rng,
}

impl EpochSampler {
    /// A sampler over `0..len`.
    pub fn new(len: usize, seed: u64) -> Result<Self> {
        if len == 0 {
            return Err(HaloError::EmptyBatch("training set"));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..len).collect();
        order.shuffle(&mut rng);
        Ok(Self {
            order,
            position: 0,
            rng,
        })
    }

    /// The next `batch` indices.
    pub fn next_batch(&mut self, batch: usize) -> Vec<usize> {
        (0..batch)
            .map(|_| {
                if self.position == self.order.len() {
                    self.order.shuffle(&mut self.rng);
                    self.position = 0;
                }
                self.position += 1;
                self.order[self.position - 1]
            })
            .collect()
    }
}
