//! Preference data from the model itself: sample a few completions per training prompt from the
//! starting (SFT) model, let the judge label them, and keep, per prompt with both outcomes, the
//! first correct sample as `chosen` and the first wrong one as `rejected`.
//!
//! This is the setting KTO was designed for — binary feedback on the model's own outputs — and
//! the negatives are exactly the mistakes the model makes. (Negatives written by a generator
//! instead — `--preference-data synthetic` — teach the model to avoid *those* mistakes, which on
//! this task over-corrects; see `docs/RESULTS.md`.) KTO reads the pairs unpaired, DPO paired:
//! the same data for both, as in the paper's comparison.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::arithmetic_task::judge;
use super::batching::prompt_context;
use super::data::{PairedExample, PreferenceRow, UnpairedExample};
use super::evaluate::{decode, Decoding, EVAL_MAX_NEW_TOKENS};
use super::tokenizer::TextTokenizer;
use crate::model::Gpt;
use halo_kernels::error::Result;

/// How the model is sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingPlan {
    /// Completions drawn per prompt.
    pub samples_per_prompt: usize,
    /// Softmax temperature.
    pub temperature: f32,
    /// Seed of the sampling RNG; the same seed, model and prompts give the same samples.
    pub seed: u64,
}

/// What sampling produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledPreferences {
    /// One pair per prompt that got both a correct and a wrong sample.
    pub pairs: Vec<PreferenceRow>,
    /// Every sample, judged: the unpaired data KTO can use in full (DPO only gets `pairs`).
    pub all_samples: Vec<PreferenceRow>,
    /// Fraction of all samples the judge accepted.
    pub sample_desirable_rate: f64,
}

/// Samples `plan.samples_per_prompt` completions of each prompt and pairs a correct one with a
/// wrong one where both occur. A completion that never emits EOS counts as wrong (its text is the
/// tokens it produced).
pub fn sample_preferences(
    model: &Gpt,
    tok: &TextTokenizer,
    prompts: &[String],
    plan: SamplingPlan,
) -> Result<SampledPreferences> {
    let mut contexts: Vec<Vec<u32>> = Vec::with_capacity(prompts.len() * plan.samples_per_prompt);
    for p in prompts {
        let context = prompt_context(tok, p)?;
        contexts.extend(std::iter::repeat_n(context, plan.samples_per_prompt));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
    let generated = decode(
        model,
        &contexts,
        EVAL_MAX_NEW_TOKENS,
        tok.eos(),
        Decoding::Sample {
            temperature: plan.temperature,
            rng: &mut rng,
        },
    )?;
    let mut pairs = Vec::new();
    let mut all_samples = Vec::with_capacity(generated.len());
    let mut accepted = 0usize;
    for (prompt, samples) in prompts
        .iter()
        .zip(generated.chunks(plan.samples_per_prompt.max(1)))
    {
        let mut chosen = None;
        let mut rejected = None;
        for ids in samples {
            let text = tok.decode(ids);
            let terminated = ids.last() == Some(&tok.eos());
            let desirable = terminated && judge(prompt, &text)?.is_desirable();
            all_samples.push(PreferenceRow::Unpaired(UnpairedExample {
                prompt: prompt.clone(),
                completion: text.clone(),
                desirable,
            }));
            if desirable {
                accepted += 1;
                chosen.get_or_insert(text);
            } else {
                rejected.get_or_insert(text);
            }
        }
        if let (Some(chosen), Some(rejected)) = (chosen, rejected) {
            pairs.push(PreferenceRow::Paired(PairedExample {
                prompt: prompt.clone(),
                chosen,
                rejected,
            }));
        }
    }
    Ok(SampledPreferences {
        pairs,
        all_samples,
        sample_desirable_rate: accepted as f64 / generated.len().max(1) as f64,
    })
}
