//! The periodic checkpoint inside a stage: everything a killed run needs to continue the stage
//! exactly where the checkpoint was taken, in one safetensors file written atomically.
//!
//! Tensors: `model/<name>` (the weights), `adam_m/<name>` and `adam_v/<name>` (AdamW's moments),
//! all f32 so the resumed run is bitwise the uninterrupted one. Metadata [`STATE_KEY`]: the stage,
//! the steps taken (which is also the data position: the stage's sampler is replayed that many
//! batches), AdamW's step counter, every loss so far (as f64 bits) and how many metric records
//! precede the checkpoint. The only random state of a stage is its sampler's (dropout is off), so
//! replaying it restores the RNG too.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::stage::StageSpec;
use crate::model::atomic_file::write_bytes_atomically;
use crate::model::optim::AdamW;
use crate::model::safetensors_bytes::{safetensors_bytes, TensorBytes};
use crate::model::{Gpt, GptConfig};
use halo_kernels::error::{HaloError, Result};

/// Metadata key of the stage state (JSON).
pub const STATE_KEY: &str = "halo_stage_state";

/// The small part of the state, stored as JSON metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StageState {
    stage: String,
    saved_as: String,
    steps_done: usize,
    adam_steps: u32,
    metrics_records: usize,
    loss_bits: Vec<u64>,
    config: GptConfig,
}

/// A stage's state at a periodic checkpoint, as read back by [`StageCheckpoint::load`].
#[derive(Debug, Clone)]
pub struct StageCheckpoint {
    state: StageState,
    tensors: BTreeMap<String, Vec<f32>>,
}

fn err(path: &Path, msg: impl std::fmt::Display) -> HaloError {
    HaloError::Checkpoint(format!("{}: {msg}", path.display()))
}

impl StageCheckpoint {
    /// Writes the state of stage `spec` after `steps_done` steps to `path` (atomically).
    pub fn save(
        path: &Path,
        spec: &StageSpec,
        steps_done: usize,
        model: &Gpt,
        optimizer: &AdamW,
        losses: &[f64],
        metrics_records: usize,
    ) -> Result<()> {
        let state = StageState {
            stage: spec.name.to_string(),
            saved_as: spec.saved_as.to_string(),
            steps_done,
            adam_steps: optimizer.steps(),
            metrics_records,
            loss_bits: losses.iter().map(|l| l.to_bits()).collect(),
            config: *model.config(),
        };
        let (m, v) = optimizer.moments();
        let names: Vec<[String; 3]> = model
            .parameters()
            .iter()
            .map(|p| {
                [
                    format!("model/{}", p.name),
                    format!("adam_m/{}", p.name),
                    format!("adam_v/{}", p.name),
                ]
            })
            .collect();
        let bytes: Vec<[Vec<u8>; 3]> = model
            .parameters()
            .iter()
            .zip(m.iter().zip(v))
            .map(|(p, (m, v))| {
                [&p.data, m, v].map(|x| x.iter().flat_map(|f| f.to_le_bytes()).collect())
            })
            .collect();
        let mut tensors = Vec::new();
        for ((p, names), bytes) in model.parameters().iter().zip(&names).zip(&bytes) {
            for (name, data) in names.iter().zip(bytes) {
                tensors.push(TensorBytes {
                    name,
                    shape: &p.shape,
                    dtype: Dtype::F32,
                    data,
                });
            }
        }
        let json = serde_json::to_string(&state).map_err(|e| err(path, e))?;
        let metadata = BTreeMap::from([(STATE_KEY.to_string(), json)]);
        write_bytes_atomically(path, &safetensors_bytes(&tensors, &metadata)?)
    }

    /// Reads `path`; `None` if there is no such file.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let buffer = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(path, e)),
        };
        let (_, header) = SafeTensors::read_metadata(&buffer).map_err(|e| err(path, e))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(STATE_KEY))
            .ok_or_else(|| err(path, format!("no `{STATE_KEY}` metadata")))?;
        let state: StageState = serde_json::from_str(json).map_err(|e| err(path, e))?;
        let st = SafeTensors::deserialize(&buffer).map_err(|e| err(path, e))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(err(path, format!("tensor `{name}` is not F32")));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(name, data);
        }
        Ok(Some(Self { state, tensors }))
    }

    /// The stage (its [`StageSpec::name`]) this checkpoint was taken in.
    pub fn stage(&self) -> &str {
        &self.state.stage
    }

    /// The [`StageSpec::saved_as`] of that stage (its name in the run manifest).
    pub fn saved_as(&self) -> &str {
        &self.state.saved_as
    }

    /// Metric records logged before the checkpoint was taken.
    pub fn metrics_records(&self) -> usize {
        self.state.metrics_records
    }

    /// Puts the saved weights into `model` and returns the optimizer, the steps already taken
    /// and their losses. Errors if the checkpoint is not of `spec`'s stage, does not fit `model`,
    /// or is past the stage's end.
    pub fn restore(
        mut self,
        path: &Path,
        spec: &StageSpec,
        model: &mut Gpt,
    ) -> Result<(AdamW, usize, Vec<f64>)> {
        let s = &self.state;
        if s.stage != spec.name || s.config != *model.config() || s.steps_done > spec.steps {
            return Err(err(
                path,
                format!(
                    "a checkpoint of stage `{}` after {} steps (config {:?}) cannot continue \
                     stage `{}` of {} steps (config {:?})",
                    s.stage,
                    s.steps_done,
                    s.config,
                    spec.name,
                    spec.steps,
                    model.config()
                ),
            ));
        }
        let mut take = |prefix: &str, name: &str, len: usize| -> Result<Vec<f32>> {
            let key = format!("{prefix}/{name}");
            let data = self
                .tensors
                .remove(&key)
                .ok_or_else(|| err(path, format!("missing tensor `{key}`")))?;
            if data.len() != len || data.iter().any(|x| !x.is_finite()) {
                return Err(err(
                    path,
                    format!("tensor `{key}` has the wrong size or a non-finite value"),
                ));
            }
            Ok(data)
        };
        let (mut weights, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for p in model.parameters() {
            weights.push(take("model", &p.name, p.data.len())?);
            m.push(take("adam_m", &p.name, p.data.len())?);
            v.push(take("adam_v", &p.name, p.data.len())?);
        }
        if let Some(extra) = self.tensors.keys().next() {
            return Err(err(path, format!("unexpected tensor `{extra}`")));
        }
        let optimizer = AdamW::restore(model, spec.optimizer, self.state.adam_steps, m, v)?;
        for ((_, slot), saved) in model.parameters_mut().zip(weights) {
            slot.copy_from_slice(&saved);
        }
        let losses = self
            .state
            .loss_bits
            .iter()
            .map(|&b| f64::from_bits(b))
            .collect();
        Ok((optimizer, self.state.steps_done, losses))
    }
}
