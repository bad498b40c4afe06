//! Safetensors checkpoints in Hugging Face GPT-2 naming.
//!
//! Saved names carry the `transformer.` prefix (as `GPT2LMHeadModel.state_dict()`; `lm_head.weight`
//! is omitted because it is tied to `wte`). On load, names without the prefix (Hugging Face's own
//! `gpt2/model.safetensors`) are accepted too, and GPT-2's non-parameter buffers (`attn.bias`,
//! `attn.masked_bias`) and `lm_head.weight` are ignored; any other tensor without a slot in the
//! model (a deeper model's `h.5.*`, say) is refused as a config mismatch. The config is stored as JSON under the
//! metadata key [`CONFIG_KEY`]; a file without it (a Hugging Face checkpoint) gets its config
//! from the tensor shapes, with GPT-2's head size of 64.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::config::GptConfig;
use super::gpt::{Gpt, Parameter};
use halo_kernels::error::{HaloError, Result};

/// Metadata key holding the [`GptConfig`] as JSON.
pub const CONFIG_KEY: &str = "halo_gpt_config";
/// Head size assumed when a checkpoint carries no config (every GPT-2 size uses 64).
pub const GPT2_HEAD_DIM: usize = 64;

/// The element type written to disk. Loading accepts f32, bf16 and f16 whatever this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DTypeOnDisk {
    F32,
    /// Half the size; values round to nearest-even bf16, so reloaded logits are close, not equal.
    BF16,
}

fn ckpt_err(msg: String) -> HaloError {
    HaloError::Checkpoint(msg)
}

impl Gpt {
    /// Writes every parameter (and the config, as metadata) to `path`.
    pub fn save_safetensors(&self, path: impl AsRef<Path>, dtype: DTypeOnDisk) -> Result<()> {
        let path = path.as_ref();
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
        let views = self
            .parameters()
            .iter()
            .zip(&bytes)
            .map(|(p, b)| {
                safetensors::tensor::TensorView::new(st_dtype, p.shape.clone(), b)
                    .map(|v| (p.name.clone(), v))
                    .map_err(|e| ckpt_err(format!("tensor `{}`: {e}", p.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        let config_json = serde_json::to_string(self.config())
            .map_err(|e| ckpt_err(format!("cannot encode the config: {e}")))?;
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (CONFIG_KEY.to_string(), config_json),
        ]);
        safetensors::tensor::serialize_to_file(views, &Some(metadata), path)
            .map_err(|e| ckpt_err(format!("cannot write {}: {e}", path.display())))
    }

    /// Loads a checkpoint, taking the config from its metadata (or, without one, inferring it
    /// from the tensor shapes: see the module docs).
    pub fn load_safetensors(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
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
    pub fn load_safetensors_with_config(path: impl AsRef<Path>, config: GptConfig) -> Result<Self> {
        let path = path.as_ref();
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

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| ckpt_err(format!("cannot read {}: {e}", path.display())))
}

fn parse<'a>(buffer: &'a [u8], path: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(buffer).map_err(|e| {
        ckpt_err(format!(
            "{} is not a valid safetensors file: {e}",
            path.display()
        ))
    })
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
            "the file has no `{CONFIG_KEY}` metadata and n_embd = {n_embd} is not a multiple of GPT-2's head size \
             {GPT2_HEAD_DIM}; use Gpt::load_safetensors_with_config"
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
    let skeleton = Gpt::zeros(config)?;
    // A tensor the model has no slot for means the file is for another config (e.g. more layers).
    for name in st.names() {
        if !is_ignorable(name) && skeleton.parameter_index(name).is_none() {
            return Err(ckpt_err(format!(
                "unexpected tensor `{name}`: the checkpoint does not match the config {config:?}"
            )));
        }
    }
    let mut params: Vec<Parameter> = Vec::with_capacity(skeleton.parameters().len());
    for p in skeleton.parameters() {
        let t =
            find(st, &p.name).ok_or_else(|| ckpt_err(format!("missing tensor `{}`", p.name)))?;
        if t.shape() != p.shape.as_slice() {
            return Err(ckpt_err(format!(
                "tensor `{}` has shape {:?} in the file but the model expects {:?}",
                p.name,
                t.shape(),
                p.shape
            )));
        }
        let data = decode(t.dtype(), t.data()).ok_or_else(|| {
            ckpt_err(format!(
                "tensor `{}` has dtype {:?}; only F32, BF16 and F16 are supported",
                p.name,
                t.dtype()
            ))
        })?;
        params.push(Parameter { data, ..p.clone() });
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
