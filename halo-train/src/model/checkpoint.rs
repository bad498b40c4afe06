//! Safetensors checkpoints in Hugging Face GPT-2 naming, and `save_pretrained` directories.
//!
//! Saved names carry the `transformer.` prefix (as `GPT2LMHeadModel.state_dict()`; `lm_head.weight`
//! is omitted because it is tied to `wte`). On load, names without the prefix (Hugging Face's own
//! `gpt2/model.safetensors`) are accepted too, and GPT-2's non-parameter buffers (`attn.bias`,
//! `attn.masked_bias`) and `lm_head.weight` are ignored; any other tensor without a slot in the
//! model (a deeper model's `h.5.*`, say) is refused as a config mismatch.
//!
//! Where the config comes from, in order:
//! 1. a Hugging Face `config.json` ([`HF_CONFIG_FILE`]): the one in a directory passed to
//!    [`Gpt::load_pretrained`] / [`Gpt::load_safetensors`], or the one beside a `.safetensors`
//!    file passed to [`Gpt::load_safetensors`]. It is read by [`GptConfig::from_hf_config`], which
//!    refuses what the model does not implement; its sizes must then agree with the tensors (the
//!    error names the key, its value and the tensor's shape), and a file that also carries our
//!    metadata must carry the same config;
//! 2. our metadata key [`CONFIG_KEY`] (the config as JSON), which [`Gpt::save_safetensors`]
//!    always writes;
//! 3. neither (a bare Hugging Face weights file): inferred from the tensor shapes, with GPT-2's
//!    head size of 64 ([`GPT2_HEAD_DIM`]).
//!
//! [`Gpt::save_pretrained`] writes a directory `transformers` loads with
//! `GPT2LMHeadModel.from_pretrained`: [`HF_WEIGHTS_FILE`] plus a `config.json` from
//! [`GptConfig::to_hf_config`].

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::atomic_file::write_bytes_atomically;
use super::config::GptConfig;
use super::gpt::{Gpt, Parameter};
use super::safetensors_bytes::{safetensors_bytes, TensorBytes};
use halo_kernels::error::{HaloError, Result};

/// Metadata key holding the [`GptConfig`] as JSON.
pub const CONFIG_KEY: &str = "halo_gpt_config";
/// Head size assumed when a checkpoint carries no config (every GPT-2 size uses 64).
pub const GPT2_HEAD_DIM: usize = 64;
/// The Hugging Face config file of a `save_pretrained` directory.
pub const HF_CONFIG_FILE: &str = "config.json";
/// The weights file of a `save_pretrained` directory (unsharded safetensors).
pub const HF_WEIGHTS_FILE: &str = "model.safetensors";

/// The element type written to disk. Loading accepts f32, bf16 and f16 whatever this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DTypeOnDisk {
    /// Exact: reloaded logits are bitwise equal.
    F32,
    /// Half the size; values round to nearest-even bf16, so reloaded logits are close, not equal.
    BF16,
}

fn ckpt_err(msg: String) -> HaloError {
    HaloError::Checkpoint(msg)
}

impl Gpt {
    /// Writes every parameter (and the config, as metadata under [`CONFIG_KEY`]) to the single
    /// file `path`; no `config.json` is written (see [`Gpt::save_pretrained`] for that).
    ///
    /// The file is replaced atomically ([`write_bytes_atomically`]: a temporary file in the same
    /// directory, fsynced and renamed), so a kill never leaves a truncated file under `path` and
    /// two concurrent saves leave one of the two complete files. Identical weights always give
    /// identical bytes ([`safetensors_bytes`]: sorted header keys).
    pub fn save_safetensors(&self, path: impl AsRef<Path>, dtype: DTypeOnDisk) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.safetensors_file_bytes(dtype)?;
        write_bytes_atomically(path, &bytes)
            .map_err(|e| ckpt_err(format!("cannot write {}: {e}", path.display())))
    }

    /// The bytes [`save_safetensors`](Gpt::save_safetensors) writes.
    fn safetensors_file_bytes(&self, dtype: DTypeOnDisk) -> Result<Vec<u8>> {
        let bytes: Vec<Vec<u8>> = self
            .parameters()
            .iter()
            .map(|p| match dtype {
                DTypeOnDisk::F32 => p.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DTypeOnDisk::BF16 => p
                    .data
                    .iter()
                    .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                    .collect(),
            })
            .collect();
        let st_dtype = match dtype {
            DTypeOnDisk::F32 => Dtype::F32,
            DTypeOnDisk::BF16 => Dtype::BF16,
        };
        let tensors: Vec<TensorBytes<'_>> = self
            .parameters()
            .iter()
            .zip(&bytes)
            .map(|(p, b)| TensorBytes {
                name: &p.name,
                shape: &p.shape,
                dtype: st_dtype,
                data: b,
            })
            .collect();
        let config_json = serde_json::to_string(self.config())
            .map_err(|e| ckpt_err(format!("cannot encode the config: {e}")))?;
        let metadata = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            (CONFIG_KEY.to_string(), config_json),
        ]);
        safetensors_bytes(&tensors, &metadata)
    }

    /// Writes a Hugging Face model directory `dir` (created if missing):
    /// [`HF_WEIGHTS_FILE`] (as [`save_safetensors`](Gpt::save_safetensors), our metadata included)
    /// and [`HF_CONFIG_FILE`] ([`GptConfig::to_hf_config`]), which `transformers` loads with
    /// `GPT2LMHeadModel.from_pretrained(dir)` and [`Gpt::load_pretrained`] reads back.
    ///
    /// Each file is replaced atomically. Two concurrent saves of models with different configs
    /// could pair one's `config.json` with the other's weights; the loader refuses that pair
    /// (the weights carry their config, which must match `config.json`).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>, dtype: DTypeOnDisk) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .map_err(|e| ckpt_err(format!("cannot create {}: {e}", dir.display())))?;
        self.save_safetensors(dir.join(HF_WEIGHTS_FILE), dtype)?;
        let config_path = dir.join(HF_CONFIG_FILE);
        let mut json = serde_json::to_string_pretty(&self.config().to_hf_config())
            .map_err(|e| ckpt_err(format!("cannot encode the config: {e}")))?;
        json.push('\n');
        write_bytes_atomically(&config_path, json.as_bytes())
            .map_err(|e| ckpt_err(format!("cannot write {}: {e}", config_path.display())))
    }

    /// Loads a Hugging Face model directory (`save_pretrained`'s [`HF_CONFIG_FILE`] and
    /// [`HF_WEIGHTS_FILE`]), taking the config from `config.json` (see the module docs).
    /// Sharded (`model.safetensors.index.json`) and PyTorch-pickle directories are refused.
    pub fn load_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(ckpt_err(format!("{} is not a directory", dir.display())));
        }
        let config_path = dir.join(HF_CONFIG_FILE);
        if !config_path.is_file() {
            return Err(ckpt_err(format!(
                "{} has no {HF_CONFIG_FILE} (a save_pretrained directory holds {HF_CONFIG_FILE} and \
                 {HF_WEIGHTS_FILE})",
                dir.display()
            )));
        }
        let weights = dir.join(HF_WEIGHTS_FILE);
        if !weights.is_file() {
            let why = if dir.join("model.safetensors.index.json").is_file() {
                "sharded checkpoints (model.safetensors.index.json) are not supported"
            } else if dir.join("pytorch_model.bin").is_file() {
                "only safetensors weights are supported, not pytorch_model.bin"
            } else {
                "it is missing"
            };
            return Err(ckpt_err(format!(
                "cannot load {}: {why}",
                weights.display()
            )));
        }
        load_with_hf_config(&weights, &config_path)
    }

    /// Loads a checkpoint: a directory goes to [`Gpt::load_pretrained`]; a file takes its config
    /// from a `config.json` beside it if there is one, else from its metadata, else from the
    /// tensor shapes (see the module docs).
    pub fn load_safetensors(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            return Self::load_pretrained(path);
        }
        if let Some(config_path) = config_beside(path) {
            return load_with_hf_config(path, &config_path);
        }
        let buffer = read(path)?;
        let st = parse(&buffer, path)?;
        let config = match stored_config(&buffer, path)? {
            Some(config) => config,
            None => infer_config(&st)?,
        };
        load_into(&st, config)
    }

    /// Loads a checkpoint for a model with `config`. Refuses a file whose stored config differs,
    /// a missing tensor, or a tensor of the wrong shape (the error names the tensor and both shapes).
    /// A directory means its [`HF_WEIGHTS_FILE`]; no `config.json` is read (the caller vouches
    /// for `config`).
    pub fn load_safetensors_with_config(path: impl AsRef<Path>, config: GptConfig) -> Result<Self> {
        let path = path.as_ref();
        let joined;
        let path = if path.is_dir() {
            joined = path.join(HF_WEIGHTS_FILE);
            joined.as_path()
        } else {
            path
        };
        let buffer = read(path)?;
        let st = parse(&buffer, path)?;
        if let Some(stored) = stored_config(&buffer, path)? {
            if stored != config {
                return Err(ckpt_err(format!(
                    "{} was saved with config {stored:?}, which does not match the requested {config:?}",
                    path.display()
                )));
            }
        }
        load_into(&st, config)
    }
}

/// The `config.json` in the directory of the file `path`, if there is one.
fn config_beside(path: &Path) -> Option<std::path::PathBuf> {
    let dir = path.parent()?;
    let config_path = dir.join(HF_CONFIG_FILE);
    config_path.is_file().then_some(config_path)
}

/// Loads `weights` with the config from the Hugging Face `config_path`.
fn load_with_hf_config(weights: &Path, config_path: &Path) -> Result<Gpt> {
    let source = config_path.display().to_string();
    let text = std::fs::read_to_string(config_path)
        .map_err(|e| ckpt_err(format!("cannot read {source}: {e}")))?;
    let config = GptConfig::from_hf_config_json_in(&text, &source)?;
    let buffer = read(weights)?;
    let st = parse(&buffer, weights)?;
    if let Some(stored) = stored_config(&buffer, weights)? {
        if stored != config {
            return Err(ckpt_err(format!(
                "{} was saved with config {stored:?}, but {source} describes {config:?}",
                weights.display()
            )));
        }
    }
    check_sizes(&st, &config, &source)?;
    load_into(&st, config)
}

/// The sizes `config.json` states against the tensors: `vocab_size` and `n_embd` against
/// `wte`, `n_positions` against `wpe`, `n_layer` against the blocks present.
fn check_sizes(st: &SafeTensors<'_>, config: &GptConfig, source: &str) -> Result<()> {
    let shape_of = |name: &str| {
        find(st, name)
            .map(|t| t.shape().to_vec())
            .ok_or_else(|| ckpt_err(format!("missing tensor `{name}`")))
    };
    let wte = shape_of("transformer.wte.weight")?;
    let wpe = shape_of("transformer.wpe.weight")?;
    let checks = [
        (
            "vocab_size",
            config.vocab_size,
            "transformer.wte.weight",
            &wte,
            0,
        ),
        ("n_embd", config.n_embd, "transformer.wte.weight", &wte, 1),
        (
            "n_positions",
            config.n_ctx,
            "transformer.wpe.weight",
            &wpe,
            0,
        ),
        ("n_embd", config.n_embd, "transformer.wpe.weight", &wpe, 1),
    ];
    for (key, value, tensor, shape, axis) in checks {
        if shape.len() != 2 || shape[axis] != value {
            let found = shape
                .get(axis)
                .filter(|_| shape.len() == 2)
                .map_or(String::new(), |n| format!(", i.e. {key} {n}"));
            return Err(ckpt_err(format!(
                "{source}: {key} = {value} but tensor `{tensor}` has shape {shape:?}{found}"
            )));
        }
    }
    let blocks = (0..)
        .take_while(|i| find(st, &format!("transformer.h.{i}.ln_1.weight")).is_some())
        .count();
    if blocks != config.n_layer {
        return Err(ckpt_err(format!(
            "{source}: n_layer = {} but the safetensors file has {blocks} blocks \
             (`transformer.h.0.*` .. `transformer.h.{}.*`)",
            config.n_layer,
            blocks.saturating_sub(1)
        )));
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| ckpt_err(format!("cannot read {}: {e}", path.display())))
}

fn parse<'a>(buffer: &'a [u8], path: &Path) -> Result<SafeTensors<'a>> {
    let st = SafeTensors::deserialize(buffer).map_err(|e| {
        ckpt_err(format!(
            "{} is not a valid safetensors file: {e}",
            path.display()
        ))
    })?;
    refuse_duplicates(&st, path)?;
    Ok(st)
}

/// Refuses a file holding one tensor under both accepted names (`wpe.weight` and
/// `transformer.wpe.weight`): which of the two would be loaded is ambiguous.
fn refuse_duplicates(st: &SafeTensors<'_>, path: &Path) -> Result<()> {
    let mut names = st.names();
    names.sort();
    for name in names {
        if name.starts_with("transformer.") {
            continue;
        }
        let long = format!("transformer.{name}");
        if st.tensor(&long).is_ok() {
            return Err(ckpt_err(format!(
                "{}: holds both `{name}` and `{long}` (the same tensor under its two accepted \
                 names); keep one",
                path.display()
            )));
        }
    }
    Ok(())
}

fn stored_config(buffer: &[u8], path: &Path) -> Result<Option<GptConfig>> {
    let (_, metadata) = SafeTensors::read_metadata(buffer)
        .map_err(|e| ckpt_err(format!("{}: bad header: {e}", path.display())))?;
    let Some(json) = metadata.metadata().as_ref().and_then(|m| m.get(CONFIG_KEY)) else {
        return Ok(None);
    };
    let config: GptConfig = serde_json::from_str(json).map_err(|e| {
        ckpt_err(format!(
            "{}: metadata `{CONFIG_KEY}` is not a config: {e}",
            path.display()
        ))
    })?;
    config.validate()?;
    Ok(Some(config))
}

/// Finds `name` with or without the `transformer.` prefix.
fn find<'a>(st: &'a SafeTensors<'a>, name: &str) -> Option<safetensors::tensor::TensorView<'a>> {
    st.tensor(name).ok().or_else(|| {
        name.strip_prefix("transformer.")
            .and_then(|short| st.tensor(short).ok())
    })
}

fn infer_config(st: &SafeTensors<'_>) -> Result<GptConfig> {
    let shape_of = |name: &str| {
        find(st, name).map(|t| t.shape().to_vec()).ok_or_else(|| {
            ckpt_err(format!(
                "missing tensor `{name}` (needed to infer the config)"
            ))
        })
    };
    let wte = shape_of("transformer.wte.weight")?;
    let wpe = shape_of("transformer.wpe.weight")?;
    if wte.len() != 2 || wpe.len() != 2 {
        return Err(ckpt_err(format!(
            "`transformer.wte.weight` is {wte:?} and `transformer.wpe.weight` is {wpe:?}; both must be 2-D"
        )));
    }
    let n_embd = wte[1];
    let n_layer = (0..)
        .take_while(|i| find(st, &format!("transformer.h.{i}.ln_1.weight")).is_some())
        .count();
    if !n_embd.is_multiple_of(GPT2_HEAD_DIM) {
        return Err(ckpt_err(format!(
            "the file has no `{CONFIG_KEY}` metadata and no {HF_CONFIG_FILE} beside it, and n_embd = \
             {n_embd} is not a multiple of GPT-2's head size {GPT2_HEAD_DIM}; put the model's \
             {HF_CONFIG_FILE} beside it or use Gpt::load_safetensors_with_config"
        )));
    }
    let config = GptConfig {
        n_layer,
        n_head: n_embd / GPT2_HEAD_DIM,
        n_embd,
        vocab_size: wte[0],
        n_ctx: wpe[0],
        dropout: 0.0,
    };
    config.validate()?;
    Ok(config)
}

/// Tensors GPT-2 files carry that are not parameters: the causal-mask buffers and the tied head.
fn is_ignorable(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name == "lm_head.weight"
}

fn load_into(st: &SafeTensors<'_>, config: GptConfig) -> Result<Gpt> {
    // Names and shapes first (validates the config): nothing the size of the model is allocated
    // until every tensor of the file has been checked against them.
    let shapes = Gpt::parameter_shapes(config)?;
    let has_slot = |name: &str| {
        shapes
            .iter()
            .any(|(p, _)| p == name || p.strip_prefix("transformer.") == Some(name))
    };
    // A tensor the model has no slot for means the file is for another config (e.g. more layers).
    for name in st.names() {
        if !is_ignorable(name) && !has_slot(name) {
            return Err(ckpt_err(format!(
                "unexpected tensor `{name}`: the checkpoint does not match the config {config:?}"
            )));
        }
    }
    let mut views = Vec::with_capacity(shapes.len());
    for (name, shape) in &shapes {
        let t = find(st, name).ok_or_else(|| ckpt_err(format!("missing tensor `{name}`")))?;
        if t.shape() != shape.as_slice() {
            return Err(ckpt_err(format!(
                "tensor `{name}` has shape {:?} in the file but the model expects {shape:?}",
                t.shape(),
            )));
        }
        views.push(t);
    }
    let mut params: Vec<Parameter> = Vec::with_capacity(shapes.len());
    for ((name, shape), t) in shapes.into_iter().zip(views) {
        let data = decode(t.dtype(), t.data()).ok_or_else(|| {
            ckpt_err(format!(
                "tensor `{name}` has dtype {:?}; only F32, BF16 and F16 are supported",
                t.dtype()
            ))
        })?;
        if let Some(index) = data.iter().position(|v| !v.is_finite()) {
            return Err(ckpt_err(format!(
                "tensor `{name}` holds a non-finite value ({}) at flat index {index}",
                data[index]
            )));
        }
        params.push(Parameter { name, shape, data });
    }
    Ok(Gpt::from_parts(config, params))
}

/// Little-endian bytes → f32 (the buffer may be unaligned, so no cast in place).
fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}
