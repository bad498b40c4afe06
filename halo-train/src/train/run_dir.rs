//! The run directory and its manifest: who may write into a directory, and what in it is done.
//!
//! A run starts only in an empty (or missing) directory, in a directory it may delete
//! (`--overwrite`: the old run is removed entirely, so no mix of two runs can remain), or in a
//! directory of its own earlier, interrupted attempt (`--resume`, same flags). Its first write is
//! the manifest [`MANIFEST_FILE`]; every time a stage completes (its checkpoint written), the
//! manifest, rewritten atomically, records it. A stage file that the manifest does not list is not
//! trusted (by a resume or by `judge_checkpoint`): it may be from a run that died right after
//! writing it, before recording it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::TrainArgs;
use super::data::io_error;
use super::metrics_log::MetricsLog;
use crate::model::atomic_file::{is_temporary, remove_temporaries, write_bytes_atomically};
use halo_kernels::error::{HaloError, Result};

/// The manifest of a run directory (JSON).
pub const MANIFEST_FILE: &str = "run.json";
/// The periodic checkpoint inside the running stage (see `stage_checkpoint`).
pub const RESUME_FILE: &str = "resume.safetensors";
/// The metrics of the run, one JSON object per line.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Format version of [`RunManifest`].
pub const MANIFEST_FORMAT: u32 = 1;

/// A stage that completed: its outputs are on disk and can be read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletedStage {
    /// `base`, `sft`, `preferences`, `kto`, `dpo` (the stage files' names).
    pub name: String,
    /// Records in `metrics.jsonl` when it completed.
    pub metrics_records: usize,
    /// The starting model's sample desirable rate (stage `preferences` with sampled data), as
    /// f64 bits so it reads back exactly.
    pub value_bits: Option<u64>,
}

/// What [`MANIFEST_FILE`] holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunManifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The run's flags ([`flags_fingerprint`]); a resume must pass the same.
    pub flags: String,
    /// Completed stages, in order.
    pub completed: Vec<CompletedStage>,
    /// Whether the run finished (summary written).
    pub finished: bool,
}

impl RunManifest {
    /// Reads `dir`'s manifest; `None` if it has none.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path, e)),
        };
        let manifest: Self = serde_json::from_str(&text).map_err(|e| HaloError::Dataset {
            file: path.display().to_string(),
            line: e.line(),
            reason: format!("not a run manifest: {e}"),
        })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(HaloError::Dataset {
                file: path.display().to_string(),
                line: 1,
                reason: format!(
                    "manifest format {} (this build reads {MANIFEST_FORMAT})",
                    manifest.format
                ),
            });
        }
        Ok(Some(manifest))
    }

    /// The record of stage `name`, if it completed.
    pub fn stage(&self, name: &str) -> Option<&CompletedStage> {
        self.completed.iter().find(|s| s.name == name)
    }

    /// Checks that `dir` holds a completed stage `name` (for readers such as
    /// `judge_checkpoint`): errors if the manifest does not record it (a run that died before
    /// finishing the stage, or a file that is not this run's). A directory without a manifest
    /// (written before manifests existed, or not a run) is accepted as it is.
    pub fn require_completed(dir: &Path, name: &str) -> Result<()> {
        match Self::read(dir)? {
            Some(manifest) if manifest.stage(name).is_none() => {
                Err(HaloError::Checkpoint(format!(
                    "{}: stage `{name}` did not complete in this run (its {MANIFEST_FILE} lists {}); \
                     {}",
                    dir.display(),
                    if manifest.completed.is_empty() {
                        "none".to_string()
                    } else {
                        manifest
                            .completed
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    if manifest.finished {
                        "the run finished without it"
                    } else {
                        "the run did not finish: continue it with --resume"
                    }
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The flags as the manifest stores and a resume compares them: every flag except `--resume`,
/// `--overwrite` and `--checkpoint-every` (which do not change the result).
pub fn flags_fingerprint(args: &TrainArgs) -> String {
    let mut args = args.clone();
    args.resume = false;
    args.overwrite = false;
    args.checkpoint_every = 0;
    // The device changes where the steps run, not what the run is: a run resumes on another.
    args.device = crate::train::config::TrainDevice::Cpu;
    format!("{args:#?}")
}

/// An open run directory.
#[derive(Debug)]
pub struct RunDir {
    dir: PathBuf,
    manifest: RunManifest,
    resumed: bool,
}

/// The entries of `dir` other than temporary files (a killed writer's leftovers); empty if
/// `dir` does not exist.
fn entries(dir: &Path) -> Result<Vec<String>> {
    match std::fs::read_dir(dir) {
        Ok(read) => {
            let mut names = Vec::new();
            for entry in read {
                let name = entry.map_err(|e| io_error(dir, e))?.file_name();
                if !is_temporary(&name) {
                    names.push(name.to_string_lossy().into_owned());
                }
            }
            names.sort();
            Ok(names)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_error(dir, e)),
    }
}

impl RunDir {
    /// Opens `dir` for the run `args` describes, by the rules of the module docs. Errors (before
    /// anything is written) on a non-empty directory without `--overwrite` or `--resume`; with
    /// `--overwrite`, on a directory that does not look like a run directory (it is not deleted);
    /// with `--resume`, on a directory without a manifest or with one of different flags.
    pub fn open(dir: &Path, args: &TrainArgs) -> Result<Self> {
        let flags = flags_fingerprint(args);
        let existing = entries(dir)?;
        if !existing.is_empty() {
            if args.resume {
                return Self::resume(dir, flags);
            }
            let looks_like_run = ["args.txt", MANIFEST_FILE, METRICS_FILE]
                .iter()
                .any(|f| existing.iter().any(|e| e == f));
            if !args.overwrite {
                let shown: Vec<&str> = existing.iter().take(5).map(String::as_str).collect();
                return Err(HaloError::InvalidShape(format!(
                    "run directory `{}` is not empty (it holds {}{}); pass --resume to continue \
                     the run in it, --overwrite to delete it and start afresh, or choose another \
                     --output-dir / --run-name",
                    dir.display(),
                    shown.join(", "),
                    if existing.len() > 5 { ", ..." } else { "" }
                )));
            }
            if !looks_like_run {
                return Err(HaloError::InvalidShape(format!(
                    "--overwrite: `{}` does not look like a run directory (no {MANIFEST_FILE}, \
                     args.txt or {METRICS_FILE}); not deleting it",
                    dir.display()
                )));
            }
            std::fs::remove_dir_all(dir).map_err(|e| io_error(dir, e))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        remove_temporaries(dir)?;
        let run = Self {
            dir: dir.to_path_buf(),
            manifest: RunManifest {
                format: MANIFEST_FORMAT,
                flags,
                completed: Vec::new(),
                finished: false,
            },
            resumed: false,
        };
        run.write_manifest()?;
        Ok(run)
    }

    fn resume(dir: &Path, flags: String) -> Result<Self> {
        let manifest = RunManifest::read(dir)?.ok_or_else(|| {
            HaloError::InvalidShape(format!(
                "--resume: `{}` has no {MANIFEST_FILE}, so it is not a run this version can \
                 continue (use --overwrite to start afresh there)",
                dir.display()
            ))
        })?;
        if manifest.flags != flags {
            let stored = manifest.flags.lines();
            let (old, new) = stored
                .zip(flags.lines())
                .find(|(a, b)| a != b)
                .unwrap_or(("(a flag)", "(another value)"));
            return Err(HaloError::InvalidShape(format!(
                "--resume: `{}` was started with other flags: it has `{}` where this command has \
                 `{}`; resume with the same flags, or use --overwrite to start afresh",
                dir.display(),
                old.trim().trim_end_matches(','),
                new.trim().trim_end_matches(',')
            )));
        }
        remove_temporaries(dir)?;
        let data = dir.join("data");
        if data.is_dir() {
            remove_temporaries(&data)?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            resumed: true,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether this is a resumed run (`--resume` on an existing run).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The record of stage `name` if it completed.
    pub fn completed(&self, name: &str) -> Option<&CompletedStage> {
        self.manifest.stage(name)
    }

    /// Where the running stage keeps its periodic checkpoint.
    pub fn resume_file(&self) -> PathBuf {
        self.dir.join(RESUME_FILE)
    }

    /// The metrics log: a new file for a fresh run; for a resumed one, the file cut back to the
    /// `keep` records the resume point follows.
    pub fn metrics_log(&self, keep: usize) -> Result<MetricsLog> {
        let path = self.dir.join(METRICS_FILE);
        // A resumed run whose checkpoint follows records must find them (a missing file is then
        // an error, not a silently shorter log).
        if self.resumed && (path.is_file() || keep > 0) {
            MetricsLog::resume(&path, keep)
        } else {
            MetricsLog::create_new(&path)
        }
    }

    /// Records in the manifest of the last completed stage (0 if none).
    pub fn completed_metrics_records(&self) -> usize {
        self.manifest
            .completed
            .last()
            .map_or(0, |s| s.metrics_records)
    }

    /// Records that stage `name` completed (its outputs must already be written): fsyncs the
    /// metrics, rewrites the manifest atomically, and removes the now stale periodic checkpoint.
    pub fn complete_stage(
        &mut self,
        name: &str,
        log: &mut MetricsLog,
        value: Option<f64>,
    ) -> Result<()> {
        if self.completed(name).is_some() {
            return Ok(());
        }
        log.sync()?;
        self.manifest.completed.push(CompletedStage {
            name: name.to_string(),
            metrics_records: log.records().len(),
            value_bits: value.map(f64::to_bits),
        });
        self.write_manifest()?;
        let resume = self.resume_file();
        match std::fs::remove_file(&resume) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&resume, e)),
            _ => Ok(()),
        }
    }

    /// Records that the run finished.
    pub fn finish(&mut self) -> Result<()> {
        self.manifest.finished = true;
        self.write_manifest()
    }

    fn write_manifest(&self) -> Result<()> {
        let mut json = serde_json::to_string_pretty(&self.manifest)
            .map_err(|e| HaloError::InvalidShape(format!("cannot encode the run manifest: {e}")))?;
        json.push('\n');
        write_bytes_atomically(&self.dir.join(MANIFEST_FILE), json.as_bytes())
    }
}
