//! Scoring a model: greedy completions of the held-out prompts, judged by the arithmetic judge.
//!
//! Decoding is batched: all prompts go through one forward per new token, right-padded. With
//! causal attention the logits at a row's last real position do not depend on the padding after
//! it, so this gives exactly the tokens `Gpt::generate(.., Sampling::Greedy, ..)` gives one prompt
//! at a time (a test checks it), at a fraction of the cost.

use rand::Rng;

use super::arithmetic_task::{judge, Verdict};
use super::batching::prompt_context;
use super::tokenizer::TextTokenizer;
use crate::model::Gpt;
use crate::model::GptWeights;
use halo_kernels::error::Result;

/// Prompts decoded per forward pass (bounds the activation memory).
const PROMPTS_PER_CHUNK: usize = 256;

/// Greedy completion of each prompt (prefixed by the start token, as in training): `Some(text)`
/// when the model closed it with EOS within `max_new_tokens`, `None` otherwise.
pub fn greedy_completions(
    model: &Gpt,
    tok: &TextTokenizer,
    prompts: &[String],
    max_new_tokens: usize,
) -> Result<Vec<Option<String>>> {
    let contexts: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| prompt_context(tok, p))
        .collect::<Result<_>>()?;
    let generated = greedy_decode(model, &contexts, max_new_tokens, tok.eos())?;
    Ok(generated
        .iter()
        .map(|ids| (ids.last() == Some(&tok.eos())).then(|| tok.decode(ids)))
        .collect())
}

/// How the next token is picked.
#[derive(Debug)]
pub enum Decoding<'r, R: Rng> {
    /// The arg-max token (lowest id on ties), as `Sampling::Greedy`.
    Greedy,
    /// A draw from `softmax(logits / temperature)` over the whole vocabulary.
    Sample {
        /// Divides the logits before the softmax; must be finite and `> 0` (not checked here).
        temperature: f32,
        /// The random source of every draw.
        rng: &'r mut R,
    },
}

/// Greedy decoding of many token contexts at once: for each, up to `max_new_tokens` new tokens,
/// stopping right after `stop_token` (included; also the padding id), exactly as `Gpt::generate` with
/// `Sampling::Greedy` does for one context.
pub fn greedy_decode(
    model: &Gpt,
    contexts: &[Vec<u32>],
    max_new_tokens: usize,
    stop_token: u32,
) -> Result<Vec<Vec<u32>>> {
    decode::<rand_chacha::ChaCha8Rng>(
        model,
        contexts,
        max_new_tokens,
        stop_token,
        Decoding::Greedy,
    )
}

/// Batched decoding (greedy or sampled) of many token contexts; see [`greedy_decode`].
pub fn decode<R: Rng>(
    model: &Gpt,
    contexts: &[Vec<u32>],
    max_new_tokens: usize,
    stop_token: u32,
    mut decoding: Decoding<'_, R>,
) -> Result<Vec<Vec<u32>>> {
    let vocab = model.config().vocab_size;
    let mut results = Vec::with_capacity(contexts.len());
    for chunk in contexts.chunks(PROMPTS_PER_CHUNK) {
        let mut sequences: Vec<Vec<u32>> = chunk.to_vec();
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); chunk.len()];
        let mut finished = vec![false; chunk.len()];
        for _ in 0..max_new_tokens {
            let active: Vec<usize> = (0..chunk.len()).filter(|&i| !finished[i]).collect();
            if active.is_empty() {
                break;
            }
            let views: Vec<&[u32]> = active.iter().map(|&i| sequences[i].as_slice()).collect();
            let logits = last_position_logits(model, &views, stop_token)?;
            for (row, &i) in active.iter().enumerate() {
                let row_logits = &logits[row * vocab..(row + 1) * vocab];
                let token = match &mut decoding {
                    Decoding::Greedy => argmax(row_logits),
                    Decoding::Sample { temperature, rng } => sample(row_logits, *temperature, *rng),
                };
                sequences[i].push(token);
                generated[i].push(token);
                finished[i] = token == stop_token;
            }
        }
        results.extend(generated);
    }
    Ok(results)
}

/// The logits after each sequence (`[sequences, vocab]`), in one forward right-padded with `pad`.
/// Sequences longer than the context keep their last `n_ctx` tokens.
fn last_position_logits(model: &Gpt, sequences: &[&[u32]], pad: u32) -> Result<Vec<f32>> {
    let n_ctx = model.config().n_ctx;
    let vocab = model.config().vocab_size;
    let cropped: Vec<&[u32]> = sequences
        .iter()
        .map(|s| &s[s.len().saturating_sub(n_ctx)..])
        .collect();
    let seq = cropped.iter().map(|s| s.len()).max().unwrap_or(1);
    let mut ids = vec![pad; cropped.len() * seq];
    for (row, s) in cropped.iter().enumerate() {
        ids[row * seq..row * seq + s.len()].copy_from_slice(s);
    }
    let logits = model.logits_inference(&ids, cropped.len(), seq)?;
    let mut last = Vec::with_capacity(cropped.len() * vocab);
    for (row, s) in cropped.iter().enumerate() {
        let at = (row * seq + s.len() - 1) * vocab;
        last.extend_from_slice(&logits[at..at + vocab]);
    }
    Ok(last)
}

fn sample<R: Rng>(logits: &[f32], temperature: f32, rng: &mut R) -> u32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let weights: Vec<f64> = logits
        .iter()
        .map(|&v| (((v - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        u -= w;
        if u <= 0.0 {
            return i as u32;
        }
    }
    (weights.len() - 1) as u32
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// The judge's view of a model on a prompt set.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Fraction of prompts whose greedy completion is judged correct.
    pub desirable_rate: f64,
    /// Fraction whose completion is a well-formed but wrong number.
    pub wrong_rate: f64,
    /// Fraction that is garbled or never closed with EOS.
    pub garbled_rate: f64,
    /// `(prompt, completion or None if unterminated, verdict)` for every prompt.
    pub samples: Vec<(String, Option<String>, Verdict)>,
}

/// Longest completion generated during evaluation: enough for any sum of the task plus EOS.
pub const EVAL_MAX_NEW_TOKENS: usize = 8;

/// Greedy-decodes every prompt and judges it; an unterminated completion counts as garbled.
pub fn evaluate(model: &Gpt, tok: &TextTokenizer, prompts: &[String]) -> Result<EvalReport> {
    let completions = greedy_completions(model, tok, prompts, EVAL_MAX_NEW_TOKENS)?;
    let mut samples = Vec::with_capacity(prompts.len());
    let (mut correct, mut wrong, mut garbled) = (0usize, 0usize, 0usize);
    for (prompt, completion) in prompts.iter().zip(completions) {
        let verdict = match &completion {
            Some(text) => judge(prompt, text)?,
            None => Verdict::Garbled,
        };
        match verdict {
            Verdict::Correct => correct += 1,
            Verdict::Wrong { .. } => wrong += 1,
            Verdict::Garbled => garbled += 1,
        }
        samples.push((prompt.clone(), completion, verdict));
    }
    let n = prompts.len().max(1) as f64;
    Ok(EvalReport {
        desirable_rate: correct as f64 / n,
        wrong_rate: wrong as f64 / n,
        garbled_rate: garbled as f64 / n,
        samples,
    })
}
