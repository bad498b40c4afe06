//! Training metrics: kept in memory for the plot and appended, one JSON object per line, to
//! `metrics.jsonl` in the run directory (`{"stage", "step", "global_step", <name>: <value>, ...}`,
//! names as in TRL's logs: `loss`, `kl`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
//! `eval/desirable_rate`, ...).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::data::io_error;
use halo_kernels::error::Result;

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

    /// A log that also writes `path` (truncating it).
    pub fn to_file(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| io_error(path, e))?;
        Ok(Self {
            records: Vec::new(),
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
