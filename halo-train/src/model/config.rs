//! The model's hyper-parameters, and their Hugging Face `config.json` form
//! ([`GptConfig::from_hf_config`], [`GptConfig::to_hf_config`]).

use serde::{Deserialize, Serialize};

use super::gpt::{INIT_STD, LAYER_NORM_EPS};
use halo_kernels::error::{HaloError, Result};

/// GPT-2 hyper-parameters (names as in Hugging Face `GPT2Config`). GPT-2 small is
/// `{ n_layer: 12, n_head: 12, n_embd: 768, vocab_size: 50257, n_ctx: 1024, dropout: 0.1 }`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block; the head size is `n_embd / n_head`.
    pub n_head: usize,
    /// Width of the residual stream (embedding size).
    pub n_embd: usize,
    /// Rows of the token embedding `wte` (and columns of the logits).
    pub vocab_size: usize,
    /// Longest sequence (rows of the position table; Hugging Face's `n_positions`).
    pub n_ctx: usize,
    /// Drop probability after the embeddings and on each residual branch while training
    /// (Hugging Face's `embd_pdrop` / `resid_pdrop`; attention-probability dropout is not
    /// implemented). 0 turns dropout off.
    pub dropout: f32,
}

/// Upper bound on each size of a [`GptConfig`] (`n_layer`, `n_head`, `n_embd`, `vocab_size`,
/// `n_ctx`): `2^24`. Far above any GPT-2 (the largest has 48 layers, 1 600 wide, 50 257 ids), and
/// low enough that a product of two sizes cannot overflow `usize` on 64-bit targets.
pub const MAX_CONFIG_DIM: usize = 1 << 24;

/// Upper bound on [`GptConfig::num_parameters`]: `2^34` scalars (64 GiB of f32). A config above
/// it (e.g. from a corrupt or hostile checkpoint header) is refused before anything is allocated.
pub const MAX_PARAMETERS: usize = 1 << 34;

impl GptConfig {
    /// The number of scalars the model's parameters hold (the tied embedding counted once), or
    /// `None` if that overflows `usize`. Computed with checked arithmetic, so any field values
    /// are safe to pass.
    pub fn num_parameters(&self) -> Option<usize> {
        let c = self.n_embd;
        let c2 = c.checked_mul(c)?;
        // Per block: 2 layer norms (4c), c_attn (3c² + 3c), attn c_proj (c² + c),
        // c_fc (4c² + 4c), mlp c_proj (4c² + c): 12c² + 13c.
        let block = c2.checked_mul(12)?.checked_add(c.checked_mul(13)?)?;
        let blocks = block.checked_mul(self.n_layer)?;
        let wte = self.vocab_size.checked_mul(c)?;
        let wpe = self.n_ctx.checked_mul(c)?;
        wte.checked_add(wpe)?
            .checked_add(blocks)?
            .checked_add(c.checked_mul(2)?)
    }

    /// Checks every field: each size in `1..=`[`MAX_CONFIG_DIM`], `n_embd` divisible by
    /// `n_head`, at most [`MAX_PARAMETERS`] parameters in all, `dropout` in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("vocab_size", self.vocab_size),
            ("n_ctx", self.n_ctx),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(HaloError::InvalidHyperParameter {
                    name,
                    value: 0.0,
                    reason: "must be at least 1",
                });
            }
            if value > MAX_CONFIG_DIM {
                return Err(HaloError::InvalidHyperParameter {
                    name,
                    value: value as f64,
                    reason: "must be at most MAX_CONFIG_DIM = 2^24",
                });
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(HaloError::InvalidHyperParameter {
                name: "n_embd",
                value: self.n_embd as f64,
                reason: "must be divisible by n_head",
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(HaloError::InvalidHyperParameter {
                name: "dropout",
                value: self.dropout as f64,
                reason: "must be in [0, 1)",
            });
        }
        match self.num_parameters() {
            Some(n) if n <= MAX_PARAMETERS => {}
            n => {
                return Err(HaloError::InvalidHyperParameter {
                    name: "num_parameters",
                    value: n.map_or(f64::INFINITY, |n| n as f64),
                    reason: "the config's parameter count must be at most MAX_PARAMETERS = 2^34",
                })
            }
        }
        Ok(())
    }
}

/// What `transformers`' `GPT2Config` uses for a key that `config.json` leaves out
/// (`save_pretrained` drops keys equal to `PretrainedConfig`'s defaults, e.g.
/// `tie_word_embeddings: true`, so absent keys must read as these, not as errors).
mod hf_defaults {
    pub const VOCAB_SIZE: usize = 50257;
    pub const N_POSITIONS: usize = 1024;
    pub const N_EMBD: usize = 768;
    pub const N_LAYER: usize = 12;
    pub const N_HEAD: usize = 12;
    pub const ACTIVATION: &str = "gelu_new";
    pub const PDROP: f64 = 0.1;
    pub const LAYER_NORM_EPSILON: f64 = 1e-5;
}

/// The `activation_function` values our GELU implements: `gelu_new` (GPT-2's), and the two other
/// names `transformers` gives the same tanh approximation `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`
/// (`gelu_pytorch_tanh` is `F.gelu(approximate="tanh")`; `gelu_fast` writes `√(2/π)` as
/// `0.7978845608` and factors out `x`).
pub const SUPPORTED_ACTIVATIONS: [&str; 3] = ["gelu_new", "gelu_pytorch_tanh", "gelu_fast"];

/// A `config.json` being read: its keys, and the file name (or path) errors are prefixed with.
struct HfKeys<'a> {
    map: &'a serde_json::Map<String, serde_json::Value>,
    source: &'a str,
}

impl HfKeys<'_> {
    fn err(&self, msg: String) -> HaloError {
        HaloError::Checkpoint(format!("{}: {msg}", self.source))
    }

    /// The value of `key`, `None` if absent or `null`.
    fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn wrong_type(&self, key: &str, value: &serde_json::Value, expected: &str) -> HaloError {
        self.err(format!("{key} = {value} is not {expected}"))
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.wrong_type(key, v, "a non-negative integer"))
            })
            .transpose()
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        self.get(key).map_or(Ok(default), |v| {
            v.as_f64()
                .ok_or_else(|| self.wrong_type(key, v, "a number"))
        })
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        self.get(key).map_or(Ok(default), |v| {
            v.as_bool()
                .ok_or_else(|| self.wrong_type(key, v, "true or false"))
        })
    }

    fn str_or<'s>(&'s self, key: &str, default: &'s str) -> Result<&'s str> {
        self.get(key).map_or(Ok(default), |v| {
            v.as_str()
                .ok_or_else(|| self.wrong_type(key, v, "a string"))
        })
    }

    /// Refuses `key` unless it is absent or `expected`: the model implements only that value.
    fn require_bool(&self, key: &str, default: bool, expected: bool, why: &str) -> Result<()> {
        let value = self.bool_or(key, default)?;
        if value != expected {
            return Err(self.err(format!(
                "{key} = {value} is not supported (only {expected}: {why})"
            )));
        }
        Ok(())
    }
}

impl GptConfig {
    /// Reads a Hugging Face `config.json` (as `GPT2Config.from_pretrained` does, with
    /// `GPT2Config`'s defaults for absent keys) and refuses, naming the key and its value, anything
    /// our [`Gpt`](super::Gpt) does not compute. See [`GptConfig::from_hf_config`].
    pub fn from_hf_config_json(text: &str) -> Result<Self> {
        Self::from_hf_config_json_in(text, "config.json")
    }

    /// [`from_hf_config_json`](GptConfig::from_hf_config_json) with errors prefixed by `source`
    /// (the file's path) instead of `config.json`.
    pub fn from_hf_config_json_in(text: &str, source: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| HaloError::Checkpoint(format!("{source}: not valid JSON: {e}")))?;
        Self::from_hf_config_in(&value, source)
    }

    /// The config a parsed Hugging Face `config.json` describes.
    ///
    /// Read: `model_type` (must be `"gpt2"` when present), `n_embd`, `n_head`, `n_layer`,
    /// `vocab_size`, `n_positions` (and the older `n_ctx`, which must then agree with it),
    /// `n_inner`, `activation_function`, `layer_norm_epsilon`, `scale_attn_weights`,
    /// `scale_attn_by_inverse_layer_idx`, `reorder_and_upcast_attn`, `add_cross_attention`,
    /// `tie_word_embeddings`, `pruned_heads`, and `resid_pdrop` / `embd_pdrop` (→
    /// [`dropout`](GptConfig::dropout)). Absent keys take `GPT2Config`'s defaults.
    ///
    /// Refused (a [`HaloError::Checkpoint`] naming the key and the value):
    /// - `model_type` other than `"gpt2"`;
    /// - `activation_function` other than the tanh-approximate GELU ([`SUPPORTED_ACTIVATIONS`]);
    /// - `layer_norm_epsilon` that is not [`LAYER_NORM_EPS`] in f32 (the model hard-codes it);
    /// - `n_inner` other than `null` or `4 · n_embd` (the MLP width is fixed at `4 · n_embd`);
    /// - `scale_attn_weights: false`, `scale_attn_by_inverse_layer_idx: true`,
    ///   `add_cross_attention: true`, `tie_word_embeddings: false`, a non-empty `pruned_heads`;
    /// - `embd_pdrop` ≠ `resid_pdrop` (one dropout probability serves both), either outside `[0, 1)`;
    /// - `n_ctx` ≠ `n_positions`, `n_embd` not divisible by `n_head`, a zero size, and a value of
    ///   the wrong JSON type.
    ///
    /// Accepted and ignored: `reorder_and_upcast_attn` (it only moves the attention scale and
    /// upcasts to f32, and our attention is f32 throughout: the same function), `attn_pdrop`
    /// (attention-probability dropout is not implemented; it acts only in training), and keys that
    /// do not change the forward (`architectures`, `initializer_range`, token ids, `summary_*`,
    /// `use_cache`, `dtype`, ...).
    ///
    /// The sizes are not checked against any tensors here; the checkpoint loader does that.
    pub fn from_hf_config(value: &serde_json::Value) -> Result<Self> {
        Self::from_hf_config_in(value, "config.json")
    }

    fn from_hf_config_in(value: &serde_json::Value, source: &str) -> Result<Self> {
        let map = value.as_object().ok_or_else(|| {
            HaloError::Checkpoint(format!("{source}: expected a JSON object, found {value}"))
        })?;
        let keys = HfKeys { map, source };

        let model_type = keys.str_or("model_type", "gpt2")?;
        if model_type != "gpt2" {
            return Err(keys.err(format!(
                "model_type = {:?} is not supported (only \"gpt2\")",
                model_type
            )));
        }

        let n_embd = keys.usize_or("n_embd", hf_defaults::N_EMBD)?;
        let n_head = keys.usize_or("n_head", hf_defaults::N_HEAD)?;
        let n_layer = keys.usize_or("n_layer", hf_defaults::N_LAYER)?;
        let vocab_size = keys.usize_or("vocab_size", hf_defaults::VOCAB_SIZE)?;
        let n_positions = keys.usize_opt("n_positions")?;
        let n_ctx_key = keys.usize_opt("n_ctx")?;
        let n_ctx = match (n_positions, n_ctx_key) {
            (Some(p), Some(c)) if p != c => {
                return Err(keys.err(format!(
                    "n_ctx = {c} disagrees with n_positions = {p} (the model has one context \
                     length, the rows of `wpe`)"
                )))
            }
            (Some(p), _) => p,
            (None, Some(c)) => c,
            (None, None) => hf_defaults::N_POSITIONS,
        };
        for (key, value) in [
            ("n_embd", n_embd),
            ("n_head", n_head),
            ("n_layer", n_layer),
            ("vocab_size", vocab_size),
            ("n_positions", n_ctx),
        ] {
            if value == 0 {
                return Err(keys.err(format!("{key} = 0 must be at least 1")));
            }
        }
        if !n_embd.is_multiple_of(n_head) {
            return Err(keys.err(format!(
                "n_embd = {n_embd} is not divisible by n_head = {n_head}"
            )));
        }
        if let Some(n_inner) = keys.usize_opt("n_inner")? {
            if n_embd.checked_mul(4) != Some(n_inner) {
                return Err(keys.err(format!(
                    "n_inner = {n_inner} is not supported (only null or 4 · n_embd = {}: the MLP \
                     width is fixed)",
                    n_embd as u128 * 4
                )));
            }
        }

        let activation = keys.str_or("activation_function", hf_defaults::ACTIVATION)?;
        if !SUPPORTED_ACTIVATIONS.contains(&activation) {
            return Err(keys.err(format!(
                "activation_function = {activation:?} is not supported (only \"gelu_new\", or its \
                 equivalent spellings \"gelu_pytorch_tanh\" and \"gelu_fast\")"
            )));
        }
        let eps = keys.f64_or("layer_norm_epsilon", hf_defaults::LAYER_NORM_EPSILON)?;
        if eps as f32 != LAYER_NORM_EPS {
            return Err(keys.err(format!(
                "layer_norm_epsilon = {eps:e} is not supported (only {LAYER_NORM_EPS:e}, which the \
                 model hard-codes)"
            )));
        }

        keys.require_bool(
            "scale_attn_weights",
            true,
            true,
            "attention scores are always divided by √head_size",
        )?;
        keys.require_bool(
            "scale_attn_by_inverse_layer_idx",
            false,
            false,
            "attention scores are not divided by the layer index",
        )?;
        keys.require_bool(
            "add_cross_attention",
            false,
            false,
            "the model has no cross-attention",
        )?;
        keys.require_bool(
            "tie_word_embeddings",
            true,
            true,
            "the unembedding is always `wte`",
        )?;
        // Same function in f32 either way; read only to refuse a non-boolean.
        keys.bool_or("reorder_and_upcast_attn", false)?;
        if let Some(pruned) = keys.get("pruned_heads") {
            let empty = pruned.as_object().is_some_and(|m| m.is_empty())
                || pruned.as_array().is_some_and(|a| a.is_empty());
            if !empty {
                return Err(keys.err(format!(
                    "pruned_heads = {pruned} is not supported (only {{}}: every layer has n_head heads)"
                )));
            }
        }

        let resid = keys.f64_or("resid_pdrop", hf_defaults::PDROP)?;
        let embd = keys.f64_or("embd_pdrop", hf_defaults::PDROP)?;
        if !(0.0..1.0).contains(&resid) {
            return Err(keys.err(format!("resid_pdrop = {resid} must be in [0, 1)")));
        }
        if embd != resid {
            return Err(keys.err(format!(
                "embd_pdrop = {embd} is not supported with resid_pdrop = {resid} (the model uses one \
                 dropout probability for both)"
            )));
        }

        let config = GptConfig {
            n_layer,
            n_head,
            n_embd,
            vocab_size,
            n_ctx,
            dropout: resid as f32,
        };
        config.validate().map_err(|e| keys.err(e.to_string()))?;
        Ok(config)
    }

    /// The `config.json` `transformers` needs to load this model as `GPT2LMHeadModel`
    /// (`GPT2Config.from_pretrained` / `GPT2LMHeadModel.from_pretrained`): `model_type: "gpt2"`,
    /// `architectures: ["GPT2LMHeadModel"]`, the sizes (`n_positions` and, for older readers,
    /// `n_ctx`), `n_inner: null`, `activation_function: "gelu_new"`, `layer_norm_epsilon`,
    /// `scale_attn_weights: true`, `scale_attn_by_inverse_layer_idx: false`,
    /// `reorder_and_upcast_attn: false`, `add_cross_attention: false`, `tie_word_embeddings: true`,
    /// `resid_pdrop` = `embd_pdrop` = [`dropout`](GptConfig::dropout), `attn_pdrop: 0.0`,
    /// `initializer_range` and `use_cache: true`. Token ids are not written (the model does not
    /// know its tokenizer). [`GptConfig::from_hf_config`] reads it back to `self`.
    pub fn to_hf_config(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": null,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": shortest_f64(LAYER_NORM_EPS),
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
            "add_cross_attention": false,
            "tie_word_embeddings": true,
            "resid_pdrop": shortest_f64(self.dropout),
            "embd_pdrop": shortest_f64(self.dropout),
            "attn_pdrop": 0.0,
            "initializer_range": shortest_f64(INIT_STD),
            "use_cache": true,
        })
    }
}

/// The f64 with `x`'s shortest decimal spelling (`1e-5f32` → `1e-5`, not `9.99999974738e-6`),
/// so the JSON reads like Python's and converts back to the same f32.
fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}
