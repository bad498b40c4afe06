//! Training metrics: kept in memory for the plot and appended, one JSON object per line, to
//! `metrics.jsonl` in the run directory (`{"stage", "step", "global_step", <name>: <value>, ...}`,
//! names as in TRL's logs: `loss`, `kl`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
//! `eval/desirable_rate`, ...).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::data::io_error;
use crate::model::atomic_file::write_bytes_atomically;
use halo_kernels::error::{HaloError, Result};

/// One logged point.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRecord {
    /// The stage that logged it (`pretrain`, `sft`, `kto`, `dpo`).
    pub stage: String,
    /// Step inside the stage.
    pub step: usize,
    /// Step counted across all stages (the plot's x axis).
    pub global_step: usize,
    /// `(name, value)` pairs in logging order, names as in TRL's logs (`loss`, `kl`, ...).
    pub values: Vec<(String, f64)>,
}

impl MetricRecord {
    /// The value named `name`, if logged.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }
}

/// The metrics of a run.
#[derive(Debug)]
pub struct MetricsLog {
    records: Vec<MetricRecord>,
    file: Option<(PathBuf, BufWriter<File>)>,
}

impl MetricsLog {
    /// A log kept in memory only.
    pub fn in_memory() -> Self {
        Self {
            records: Vec::new(),
            file: None,
        }
    }

    /// A log that also writes `path`, which must not exist yet: an earlier run's metrics are
    /// never truncated (a run directory is emptied by `--overwrite` or continued by `--resume`).
    pub fn create_new(path: &Path) -> Result<Self> {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| io_error(path, e))?;
        Ok(Self {
            records: Vec::new(),
            file: Some((path.to_path_buf(), BufWriter::new(file))),
        })
    }

    /// Continues the log of a resumed run: keeps the first `keep` records of `path` (the ones a
    /// checkpoint was taken after; later ones, and a line torn by a kill, are logged again by the
    /// resumed run), rewrites the file atomically with exactly those lines, and appends from there.
    /// Errors if `path` holds fewer than `keep` complete records.
    pub fn resume(path: &Path, keep: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
        // Only lines ended by '\n' are complete; a kill can leave a torn last line.
        let lines: Vec<&str> = text.split_inclusive('\n').take(keep).collect();
        let complete = lines.iter().take_while(|l| l.ends_with('\n')).count();
        if complete < keep {
            return Err(HaloError::Dataset {
                file: path.display().to_string(),
                line: complete + 1,
                reason: format!(
                    "the run's checkpoint was taken after {keep} metric records but the file \
                     holds only {complete} complete ones"
                ),
            });
        }
        let records = lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                parse_record(line).map_err(|reason| HaloError::Dataset {
                    file: path.display().to_string(),
                    line: i + 1,
                    reason,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        write_bytes_atomically(path, lines.concat().as_bytes())?;
        let file = File::options()
            .append(true)
            .open(path)
            .map_err(|e| io_error(path, e))?;
        Ok(Self {
            records,
            file: Some((path.to_path_buf(), BufWriter::new(file))),
        })
    }

    /// Appends one record.
    pub fn log(&mut self, record: MetricRecord) -> Result<()> {
        if let Some((path, writer)) = &mut self.file {
            let mut object = Map::new();
            object.insert("stage".into(), Value::from(record.stage.clone()));
            object.insert("step".into(), Value::from(record.step));
            object.insert("global_step".into(), Value::from(record.global_step));
            for (name, value) in &record.values {
                // JSON has no NaN/inf; write null so the file stays parseable.
                let v = serde_json::Number::from_f64(*value).map_or(Value::Null, Value::Number);
                object.insert(name.clone(), v);
            }
            writeln!(writer, "{}", Value::Object(object)).map_err(|e| io_error(path, e))?;
        }
        self.records.push(record);
        Ok(())
    }

    /// Flushes the file.
    pub fn flush(&mut self) -> Result<()> {
        if let Some((path, writer)) = &mut self.file {
            writer.flush().map_err(|e| io_error(path, e))?;
        }
        Ok(())
    }

    /// Flushes the file and fsyncs it: every record so far is on disk (taken before a
    /// checkpoint records how many records it follows).
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        if let Some((path, writer)) = &mut self.file {
            writer
                .get_ref()
                .sync_data()
                .map_err(|e| io_error(path, e))?;
        }
        Ok(())
    }

    /// Every record so far.
    pub fn records(&self) -> &[MetricRecord] {
        &self.records
    }

    /// `(global_step, value)` of every record of `stage` (any stage when `None`) holding `name`.
    pub fn series(&self, stage: Option<&str>, name: &str) -> Vec<(f64, f64)> {
        self.records
            .iter()
            .filter(|r| stage.is_none_or(|s| r.stage == s))
            .filter_map(|r| r.get(name).map(|v| (r.global_step as f64, v)))
            .filter(|(_, v)| v.is_finite())
            .collect()
    }
}

/// One line of `metrics.jsonl` back into a record (`null` values, written for NaN/inf, read as
/// NaN). Value order follows the JSON object's (sorted) keys, not the logging order.
fn parse_record(line: &str) -> std::result::Result<MetricRecord, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let Value::Object(mut object) = value else {
        return Err("not a JSON object".into());
    };
    let stage = match object.remove("stage") {
        Some(Value::String(s)) => s,
        _ => return Err("no string `stage`".into()),
    };
    let mut index = |name: &str| {
        object
            .remove(name)
            .and_then(|v| v.as_u64())
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| format!("no integer `{name}`"))
    };
    let step = index("step")?;
    let global_step = index("global_step")?;
    let values = object
        .into_iter()
        .map(|(name, v)| match v {
            Value::Null => Ok((name, f64::NAN)),
            Value::Number(n) => n
                .as_f64()
                .map(|x| (name.clone(), x))
                .ok_or_else(|| format!("`{name}` is not a number")),
            _ => Err(format!("`{name}` is not a number")),
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    Ok(MetricRecord {
        stage,
        step,
        global_step,
        values,
    })
}
