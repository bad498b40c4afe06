//! JSONL preference data in TRL's two standard text forms.
//!
//! - unpaired (KTO): `{"prompt": str, "completion": str, "label": bool}`
//! - paired (DPO):   `{"prompt": str, "chosen": str, "rejected": str}`
//!
//! A paired row becomes two unpaired examples — `(prompt, chosen, true)` and
//! `(prompt, rejected, false)` — as TRL's `unpair_preference_dataset`
//! (`trl/data_utils.py`) does; [`to_unpaired`] then shuffles, so a batch mixes
//! both labels and the KL pairs built by rotation inside a batch are mismatched.
//! Every malformed line is an error naming the file and its 1-based line number.

use std::io::Write;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use halo_kernels::error::{HaloError, Result};

/// One KTO example: a prompt, a completion, and whether the completion is desirable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpairedExample {
    /// The prompt text (JSONL `"prompt"`).
    pub prompt: String,
    /// The completion that follows the prompt (JSONL `"completion"`).
    pub completion: String,
    /// Whether the completion is desirable (JSONL `"label"`).
    pub desirable: bool,
}

/// One DPO example: a prompt with a preferred and a dispreferred completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairedExample {
    /// The prompt text (JSONL `"prompt"`).
    pub prompt: String,
    /// The preferred completion (JSONL `"chosen"`).
    pub chosen: String,
    /// The dispreferred completion (JSONL `"rejected"`).
    pub rejected: String,
}

/// One line of a preference file, in whichever form it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreferenceRow {
    /// A `{prompt, completion, label}` row.
    Unpaired(UnpairedExample),
    /// A `{prompt, chosen, rejected}` row.
    Paired(PairedExample),
}

/// Parses JSONL text; `source` names the file in errors. Blank lines are skipped.
pub fn parse_jsonl(text: &str, source: &str) -> Result<Vec<PreferenceRow>> {
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = index + 1;
        let bad = |reason: String| HaloError::Dataset {
            file: source.to_string(),
            line: line_no,
            reason,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let Value::Object(object) = value else {
            return Err(bad("expected a JSON object".into()));
        };
        rows.push(parse_row(&object).map_err(bad)?);
    }
    Ok(rows)
}

/// Reads and parses a JSONL file.
pub fn load_jsonl(path: &Path) -> Result<Vec<PreferenceRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    parse_jsonl(&text, &path.display().to_string())
}

fn parse_row(object: &Map<String, Value>) -> std::result::Result<PreferenceRow, String> {
    let prompt = string_field(object, "prompt")?;
    if object.contains_key("chosen") || object.contains_key("rejected") {
        return Ok(PreferenceRow::Paired(PairedExample {
            prompt,
            chosen: string_field(object, "chosen")?,
            rejected: string_field(object, "rejected")?,
        }));
    }
    if object.contains_key("completion") || object.contains_key("label") {
        let desirable = match object.get("label") {
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(format!("field `label` must be true or false, got {other}")),
            None => {
                return Err(
                    "missing field `label` (unpaired rows need prompt, completion, label)".into(),
                )
            }
        };
        return Ok(PreferenceRow::Unpaired(UnpairedExample {
            prompt,
            completion: string_field(object, "completion")?,
            desirable,
        }));
    }
    Err(
        "row is neither unpaired {prompt, completion, label} nor paired {prompt, chosen, rejected}"
            .into(),
    )
}

fn string_field(object: &Map<String, Value>, name: &str) -> std::result::Result<String, String> {
    match object.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(_)) => Err(format!(
            "field `{name}` is a list (conversational format); only plain-text rows are supported"
        )),
        Some(other) => Err(format!("field `{name}` must be a string, got {other}")),
        None => Err(format!("missing field `{name}`")),
    }
}

/// Converts rows to unpaired examples (each pair → one desirable + one undesirable example, as
/// TRL's `unpair_preference_dataset`) and shuffles them with `seed`.
pub fn to_unpaired(rows: &[PreferenceRow], seed: u64) -> Vec<UnpairedExample> {
    let mut examples = Vec::with_capacity(rows.len() * 2);
    for row in rows {
        match row {
            PreferenceRow::Unpaired(example) => examples.push(example.clone()),
            PreferenceRow::Paired(pair) => {
                examples.push(UnpairedExample {
                    prompt: pair.prompt.clone(),
                    completion: pair.chosen.clone(),
                    desirable: true,
                });
                examples.push(UnpairedExample {
                    prompt: pair.prompt.clone(),
                    completion: pair.rejected.clone(),
                    desirable: false,
                });
            }
        }
    }
    examples.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    examples
}

/// The paired rows only (DPO cannot use unpaired rows); errors if there are none.
pub fn paired_only(rows: &[PreferenceRow], source: &str) -> Result<Vec<PairedExample>> {
    let pairs: Vec<PairedExample> = rows
        .iter()
        .filter_map(|row| match row {
            PreferenceRow::Paired(pair) => Some(pair.clone()),
            PreferenceRow::Unpaired(_) => None,
        })
        .collect();
    if pairs.is_empty() {
        return Err(HaloError::Dataset {
            file: source.to_string(),
            line: 0,
            reason: "DPO needs paired rows {prompt, chosen, rejected}; the file has none".into(),
        });
    }
    Ok(pairs)
}

/// Keeps `fraction` of the desirable examples (the first ones in the given, already shuffled,
/// order) and every undesirable one — the paper's "discard desirable data" experiment.
pub fn keep_desirable_fraction(
    examples: Vec<UnpairedExample>,
    fraction: f64,
) -> Vec<UnpairedExample> {
    let n_desirable = examples.iter().filter(|e| e.desirable).count();
    let keep = (n_desirable as f64 * fraction.clamp(0.0, 1.0)).round() as usize;
    let mut kept_desirable = 0;
    examples
        .into_iter()
        .filter(|e| {
            if !e.desirable {
                return true;
            }
            kept_desirable += 1;
            kept_desirable <= keep
        })
        .collect()
}

/// Writes rows as JSONL in the form they hold.
pub fn write_jsonl(path: &Path, rows: &[PreferenceRow]) -> Result<()> {
    let mut out = Vec::new();
    for row in rows {
        let value = match row {
            PreferenceRow::Unpaired(e) => serde_json::json!({
                "prompt": e.prompt, "completion": e.completion, "label": e.desirable
            }),
            PreferenceRow::Paired(p) => serde_json::json!({
                "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected
            }),
        };
        writeln!(out, "{value}").expect("writing to a Vec cannot fail");
    }
    std::fs::write(path, out).map_err(|e| io_error(path, e))
}

pub(crate) fn io_error(path: &Path, e: std::io::Error) -> HaloError {
    HaloError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}
