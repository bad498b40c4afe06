//! [`Gpt`]: parameters in Hugging Face order and naming, and the forward pass on a [`Tape`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::GptConfig;
use super::forward::GptWeights;
use crate::autograd::{Device, StorageRef, Tape, Var};
use halo_kernels::error::Result;

/// GPT-2's layer-norm epsilon (`layer_norm_epsilon`); hard-coded, so a `config.json` with
/// another value is refused ([`GptConfig::from_hf_config`]).
pub const LAYER_NORM_EPS: f32 = 1e-5;
/// Standard deviation of the initial weights (`initializer_range`).
pub const INIT_STD: f32 = 0.02;

/// One named parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Parameter {
    /// Hugging Face name, e.g. `transformer.h.0.attn.c_attn.weight`.
    pub name: String,
    /// Dimensions, row-major (Hugging Face's layout, e.g. Conv1D weights are `[in, out]`).
    pub shape: Vec<usize>,
    /// The values, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

impl Parameter {
    fn new(name: String, shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Self { name, shape, data }
    }

    /// A parameter of `shape` filled with zeros.
    fn zeros(name: String, shape: Vec<usize>) -> Self {
        let data = vec![0.0; shape.iter().product()];
        Self::new(name, shape, data)
    }

    /// Whether AdamW applies weight decay to it: matrices (linear weights and the two embedding
    /// tables) yes, vectors (biases, layer-norm gains and shifts) no — nanoGPT's rule.
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2
    }
}

impl GptWeights for Gpt {
    fn config(&self) -> &GptConfig {
        &self.config
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    /// By reference (no copy).
    fn record<'a>(&'a self, tape: &mut Tape<'a>, index: usize) -> Result<Var> {
        let p = &self.params[index];
        tape.param_storage(index, StorageRef::Host(&p.data), &p.shape)
    }
}

/// Parameter slots of one transformer block, in Hugging Face `state_dict` order.
pub(crate) const BLOCK_PARAMS: [&str; 12] = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
];
pub(crate) const WTE: usize = 0;
pub(crate) const WPE: usize = 1;
pub(crate) const FIRST_BLOCK: usize = 2;

/// A GPT-2 model: its config and parameters (owned `f32` tensors). `Clone` gives an independent
/// copy, e.g. the frozen reference model of KTO/DPO.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt {
    config: GptConfig,
    params: Vec<Parameter>,
}

impl Gpt {
    /// A freshly initialized model, deterministic in `seed`: weights `N(0, 0.02²)`, the two
    /// residual projections (`attn.c_proj`, `mlp.c_proj`) `N(0, (0.02/√(2·n_layer))²)` as in GPT-2,
    /// biases 0, layer norms γ = 1, β = 0.
    pub fn new(config: GptConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut model = Self::zeros(config)?;
        let proj_std = INIT_STD / (2.0 * config.n_layer as f32).sqrt();
        for p in &mut model.params {
            if p.name.ends_with("ln_1.weight")
                || p.name.ends_with("ln_2.weight")
                || p.name.ends_with("ln_f.weight")
            {
                p.data.fill(1.0);
            } else if p.shape.len() >= 2 {
                let std = if p.name.ends_with("c_proj.weight") {
                    proj_std
                } else {
                    INIT_STD
                };
                p.data
                    .iter_mut()
                    .for_each(|v| *v = std * standard_normal(&mut rng));
            }
        }
        Ok(model)
    }

    /// The parameter list with every value 0 (the skeleton a checkpoint is loaded into).
    pub(crate) fn zeros(config: GptConfig) -> Result<Self> {
        let params = Self::parameter_shapes(config)?
            .into_iter()
            .map(|(name, shape)| Parameter::zeros(name, shape))
            .collect();
        Ok(Self { config, params })
    }

    /// The name and shape of every parameter of a model with `config`, in index order, without
    /// allocating any values. Validates `config` first (so the shapes' products cannot overflow).
    pub(crate) fn parameter_shapes(config: GptConfig) -> Result<Vec<(String, Vec<usize>)>> {
        config.validate()?;
        let c = config.n_embd;
        let mut params = vec![
            (
                "transformer.wte.weight".to_string(),
                vec![config.vocab_size, c],
            ),
            ("transformer.wpe.weight".to_string(), vec![config.n_ctx, c]),
        ];
        for layer in 0..config.n_layer {
            for slot in BLOCK_PARAMS {
                let shape = match slot {
                    "attn.c_attn.weight" => vec![c, 3 * c],
                    "attn.c_attn.bias" => vec![3 * c],
                    "attn.c_proj.weight" => vec![c, c],
                    "mlp.c_fc.weight" => vec![c, 4 * c],
                    "mlp.c_fc.bias" => vec![4 * c],
                    "mlp.c_proj.weight" => vec![4 * c, c],
                    _ => vec![c],
                };
                params.push((format!("transformer.h.{layer}.{slot}"), shape));
            }
        }
        params.push(("transformer.ln_f.weight".into(), vec![c]));
        params.push(("transformer.ln_f.bias".into(), vec![c]));
        Ok(params)
    }

    /// The hyper-parameters the model was built with.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// Total number of scalars in all parameters (the tied embedding counted once).
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|p| p.data.len()).sum()
    }

    /// All parameters; index `i` here is the index of its gradient in
    /// [`Gradients`](crate::autograd::Gradients).
    pub fn parameters(&self) -> &[Parameter] {
        &self.params
    }

    /// Mutable access to the parameter values (shapes and names stay fixed).
    pub fn parameters_mut(&mut self) -> impl Iterator<Item = (&str, &mut [f32])> {
        self.params
            .iter_mut()
            .map(|p| (p.name.as_str(), p.data.as_mut_slice()))
    }

    /// Parameter names in index order.
    pub fn parameter_names(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// The index of the parameter called `name` (with or without the `transformer.` prefix).
    pub fn parameter_index(&self, name: &str) -> Option<usize> {
        self.params
            .iter()
            .position(|p| p.name == name || p.name.strip_prefix("transformer.") == Some(name))
    }

    pub(crate) fn params_mut(&mut self) -> &mut [Parameter] {
        &mut self.params
    }

    pub(crate) fn from_parts(config: GptConfig, params: Vec<Parameter>) -> Self {
        Self { config, params }
    }
}

/// One `N(0, 1)` draw (Box–Muller; `rand` 0.8 has no normal distribution without `rand_distr`).
fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]: keeps ln finite
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
