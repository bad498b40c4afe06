//! What kind of mistakes a model makes on the arithmetic task: accuracy on prompts whose units
//! column carries vs the others, and the most common wrong answers as offsets from the true sum
//! (`−10` on a carrying prompt is the forgotten carry the pretraining text teaches; `+10` on a
//! non-carrying prompt is the opposite, over-carrying).

use std::collections::HashMap;
use std::fmt;

use super::arithmetic_task::{parse_prompt, ArithmeticTask, Verdict};
use super::evaluate::EvalReport;
use halo_kernels::error::{HaloError, Result};

/// Counts over one set of judged prompts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorBreakdown {
    /// Prompts whose units column carries: (correct, total).
    pub carrying: (usize, usize),
    /// The other prompts: (correct, total).
    pub non_carrying: (usize, usize),
    /// Garbled or unterminated completions.
    pub garbled: usize,
    /// `(carrying?, got − expected)` → count, for well-formed wrong answers.
    pub wrong_offsets: HashMap<(bool, i64), usize>,
}

impl ErrorBreakdown {
    /// Tallies judged `(prompt, verdict)` pairs; errors on a prompt that is not `"<a>+<b>="`.
    pub fn from_verdicts<'a>(
        judged: impl IntoIterator<Item = (&'a str, &'a Verdict)>,
    ) -> Result<Self> {
        let mut out = Self::default();
        for (prompt, verdict) in judged {
            let (a, b) = parse_prompt(prompt).ok_or_else(|| {
                HaloError::InvalidShape(format!("not an addition prompt: {prompt:?}"))
            })?;
            let carrying = ArithmeticTask::dropped_carry(a, b).is_some();
            let bucket = if carrying {
                &mut out.carrying
            } else {
                &mut out.non_carrying
            };
            bucket.1 += 1;
            match *verdict {
                Verdict::Correct => bucket.0 += 1,
                Verdict::Garbled => out.garbled += 1,
                Verdict::Wrong { expected, got } => {
                    let offset = got as i64 - expected as i64;
                    *out.wrong_offsets.entry((carrying, offset)).or_default() += 1;
                }
            }
        }
        Ok(out)
    }

    /// Tallies an evaluation of held-out prompts.
    pub fn from_report(report: &EvalReport) -> Result<Self> {
        Self::from_verdicts(
            report
                .samples
                .iter()
                .map(|(prompt, _, verdict)| (prompt.as_str(), verdict)),
        )
    }

    /// The `n` most common wrong answers, most common first (ties: smaller offset first).
    pub fn most_common_wrong(&self, n: usize) -> Vec<((bool, i64), usize)> {
        let mut all: Vec<_> = self.wrong_offsets.iter().map(|(&k, &v)| (k, v)).collect();
        all.sort_by_key(|&((carrying, offset), count)| {
            (std::cmp::Reverse(count), !carrying, offset)
        });
        all.truncate(n);
        all
    }
}

impl fmt::Display for ErrorBreakdown {
    /// `carrying 149/216, other 248/284, garbled 0; common errors: carry−10 ×47, other+10 ×12`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "carrying {}/{}, other {}/{}, garbled {}; common errors:",
            self.carrying.0,
            self.carrying.1,
            self.non_carrying.0,
            self.non_carrying.1,
            self.garbled
        )?;
        let common = self.most_common_wrong(4);
        if common.is_empty() {
            write!(f, " none")?;
        }
        for (i, ((carrying, offset), count)) in common.into_iter().enumerate() {
            let kind = if carrying { "carry" } else { "other" };
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{kind}{offset:+} x{count}")?;
        }
        Ok(())
    }
}
