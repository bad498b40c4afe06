//! The built-in task: addition prompts such as `"23+58="` whose completion (`"81"`) is desirable
//! exactly when it is the correct sum, written canonically. The judge is a program, so every
//! stage can be scored without humans or a reward model.
//!
//! [`ArithmeticTask::generate`] builds every data set from one seed:
//! - `pretrain`: mixed-quality text `"a+b=c"` with a *systematic* mistake, the kind web text is
//!   full of: when the units column carries, the answer forgets the carry (`38+47=75`) with
//!   probability `carry_error_rate` (> 1/2 by default, so it is the most common answer there and
//!   the base model learns it); elsewhere a fraction `noise_rate` of answers is off by a small
//!   offset (±1, ±2, ±10). The base model thus answers some prompts correctly and others not;
//! - `sft`: unpaired `(prompt, completion, label)` rows, labelled by the judge (SFT keeps the
//!   desirable ones);
//! - `preferences`: paired `(prompt, chosen, rejected)` rows, chosen/rejected decided by the judge
//!   (KTO reads them unpaired, DPO paired — the same data, as in the paper's comparison);
//! - `eval_prompts`: held-out operand pairs that appear in no training set.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::data::{PairedExample, PreferenceRow, UnpairedExample};
use halo_kernels::error::{HaloError, Result};

/// What the judge thinks of a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The canonical decimal sum.
    Correct,
    /// A canonical decimal number, but not the sum.
    Wrong {
        /// The correct sum `a + b`.
        expected: u64,
        /// The number the completion gave.
        got: u64,
    },
    /// Not a canonical decimal number (empty, other characters, leading zeros, too long).
    Garbled,
}

impl Verdict {
    /// Desirable means correct.
    pub fn is_desirable(&self) -> bool {
        matches!(self, Verdict::Correct)
    }
}

/// Parses `"<a>+<b>="` into its operands.
pub fn parse_prompt(prompt: &str) -> Option<(u64, u64)> {
    let body = prompt.strip_suffix('=')?;
    let (a, b) = body.split_once('+')?;
    Some((parse_canonical(a)?, parse_canonical(b)?))
}

/// A non-negative decimal integer without sign, spaces or leading zeros (and at most 18 digits).
fn parse_canonical(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.len() <= 18
        && text.bytes().all(|c| c.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if canonical {
        text.parse().ok()
    } else {
        None
    }
}

/// Judges `completion` for an addition `prompt`; errors if the prompt is not `"<a>+<b>="`.
pub fn judge(prompt: &str, completion: &str) -> Result<Verdict> {
    let (a, b) = parse_prompt(prompt).ok_or_else(|| {
        HaloError::InvalidShape(format!(
            "the arithmetic judge needs prompts of the form \"<a>+<b>=\", got {prompt:?}"
        ))
    })?;
    let expected = a + b;
    Ok(match parse_canonical(completion) {
        Some(got) if got == expected => Verdict::Correct,
        Some(got) => Verdict::Wrong { expected, got },
        None => Verdict::Garbled,
    })
}

/// Sizes and mixing rates of the generated data.
#[derive(Debug, Clone, PartialEq)]
pub struct ArithmeticTask {
    /// Operands are drawn from `0..operand_limit`.
    pub operand_limit: u64,
    /// Lines of pretraining text.
    pub n_pretrain: usize,
    /// Probability that a prompt whose units column carries gets the forgot-the-carry answer.
    pub carry_error_rate: f64,
    /// Probability that any other prompt gets a random near miss.
    pub noise_rate: f64,
    /// Unpaired SFT candidates (judge-labelled; SFT trains on the desirable ones).
    pub n_sft: usize,
    /// Preference pairs for KTO / DPO.
    pub n_preferences: usize,
    /// Held-out evaluation prompts.
    pub n_eval: usize,
}

/// The training example's defaults (`TrainArgs`): see `docs/RESULTS.md` for why.
impl Default for ArithmeticTask {
    fn default() -> Self {
        Self {
            operand_limit: 100,
            n_pretrain: 200_000,
            carry_error_rate: 0.6,
            noise_rate: 0.1,
            n_sft: 200,
            n_preferences: 4_000,
            n_eval: 500,
        }
    }
}

/// Every data set of one run.
#[derive(Debug, Clone)]
pub struct TaskData {
    /// `(prompt, completion)` lines of mixed quality; the LM trains on the whole text.
    pub pretrain: Vec<(String, String)>,
    /// [`PreferenceRow::Unpaired`] rows of mixed-quality answers, labelled by the [`judge`]; SFT
    /// trains on the desirable ones.
    pub sft: Vec<PreferenceRow>,
    /// [`PreferenceRow::Paired`] rows: `chosen` is the correct sum, `rejected` the typical
    /// mistake (the dropped carry, else a near miss).
    pub preferences: Vec<PreferenceRow>,
    /// Held-out prompts `"<a>+<b>="`; their operand pairs appear in no other set.
    pub eval_prompts: Vec<String>,
}

/// Offsets of the wrong answers: the near misses of a model that half-learned carrying.
const MISTAKE_OFFSETS: [i64; 6] = [-10, -2, -1, 1, 2, 10];

impl ArithmeticTask {
    /// Prompt text of `a + b`.
    pub fn prompt(a: u64, b: u64) -> String {
        format!("{a}+{b}=")
    }

    /// The forgot-the-carry answer `a + b − 10` when the units column carries, else `None`.
    pub fn dropped_carry(a: u64, b: u64) -> Option<u64> {
        (a % 10 + b % 10 >= 10).then(|| a + b - 10)
    }

    /// A typical wrong answer: the dropped carry where there is one, else a near miss.
    fn typical_mistake(rng: &mut ChaCha8Rng, a: u64, b: u64) -> u64 {
        Self::dropped_carry(a, b).unwrap_or_else(|| Self::near_miss(rng, a + b))
    }

    /// A wrong but well-formed answer near `a + b`.
    fn near_miss(rng: &mut ChaCha8Rng, sum: u64) -> u64 {
        loop {
            let offset = MISTAKE_OFFSETS[rng.gen_range(0..MISTAKE_OFFSETS.len())];
            let candidate = sum as i64 + offset;
            if candidate >= 0 {
                return candidate as u64;
            }
        }
    }

    /// Builds every data set; the same seed gives the same data.
    pub fn generate(&self, seed: u64) -> Result<TaskData> {
        let n_pairs = self
            .operand_limit
            .checked_mul(self.operand_limit)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                HaloError::InvalidShape(format!(
                    "operand_limit {}: its square (the number of prompts) overflows",
                    self.operand_limit
                ))
            })?;
        for (name, p) in [
            ("carry_error_rate", self.carry_error_rate),
            ("noise_rate", self.noise_rate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(HaloError::InvalidHyperParameter {
                    name,
                    value: p,
                    reason: "must be a probability in [0, 1]",
                });
            }
        }
        if self.operand_limit < 2 || self.n_eval.saturating_mul(2) > n_pairs {
            return Err(HaloError::InvalidShape(format!(
                "operand_limit {} gives {n_pairs} prompts: too few to hold out {} for evaluation",
                self.operand_limit, self.n_eval
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_da7a);
        let mut operands: Vec<(u64, u64)> = (0..self.operand_limit)
            .flat_map(|a| (0..self.operand_limit).map(move |b| (a, b)))
            .collect();
        operands.shuffle(&mut rng);
        let (held_out, train) = operands.split_at(self.n_eval);
        let eval_prompts = held_out.iter().map(|&(a, b)| Self::prompt(a, b)).collect();

        let mixed_line = |rng: &mut ChaCha8Rng| {
            let (a, b) = train[rng.gen_range(0..train.len())];
            let answer = match Self::dropped_carry(a, b) {
                Some(mistake) if rng.gen_bool(self.carry_error_rate) => mistake,
                None if rng.gen_bool(self.noise_rate) => Self::near_miss(rng, a + b),
                _ => a + b,
            };
            (Self::prompt(a, b), answer.to_string())
        };
        let pretrain: Vec<(String, String)> =
            (0..self.n_pretrain).map(|_| mixed_line(&mut rng)).collect();

        let mut sft = Vec::with_capacity(self.n_sft);
        for _ in 0..self.n_sft {
            let (prompt, completion) = mixed_line(&mut rng);
            let desirable = judge(&prompt, &completion)?.is_desirable();
            sft.push(PreferenceRow::Unpaired(UnpairedExample {
                prompt,
                completion,
                desirable,
            }));
        }

        let mut preferences = Vec::with_capacity(self.n_preferences);
        for _ in 0..self.n_preferences {
            let (a, b) = train[rng.gen_range(0..train.len())];
            let prompt = Self::prompt(a, b);
            let mut candidates = [
                (a + b).to_string(),
                Self::typical_mistake(&mut rng, a, b).to_string(),
            ];
            candidates.shuffle(&mut rng);
            // The judge, not the generator, decides which candidate is chosen.
            let first_ok = judge(&prompt, &candidates[0])?.is_desirable();
            let [x, y] = candidates;
            let (chosen, rejected) = if first_ok { (x, y) } else { (y, x) };
            preferences.push(PreferenceRow::Paired(PairedExample {
                prompt,
                chosen,
                rejected,
            }));
        }

        Ok(TaskData {
            pretrain,
            sft,
            preferences,
            eval_prompts,
        })
    }
}
