//! Golden fixtures from Hugging Face transformers (`tests/fixtures/tiny_gpt2/`, written by
//! `scripts/conformance/make_fixtures.py` with `GPT2LMHeadModel.save_pretrained`, and
//! `tests/fixtures/transformers_gpt2.json`): a seeded random 2-layer, 4-head, n_embd 32, vocab 50,
//! n_positions 16 GPT-2 (`gelu_new`, layer-norm ε 1e-5, every parameter drawn at a scale where it
//! matters). Our [`Gpt`] loads the HF checkpoint and must reproduce, against HF's model run in
//! float64: the logits, per-token log-probs, HF's own shifted mean LM loss, and the parameter
//! gradients of `Σ_t w_t·logp_t` (autograd through HF's model).
//!
//! Tolerances: our forward is f32 with a fast exp/tanh (≈1e-7 absolute each); logits of this model
//! are O(10), so 1e-5 relative plus 2e-5 absolute. Gradients: 1e-4 relative of each tensor's
//! largest entry (f32 accumulation over two layers of matmuls).
//!
//! The reverse direction (a checkpoint saved by us loads in transformers and reproduces our
//! logits) is checked by `make_fixtures.py --reverse-check`, which runs the ignored test
//! `write_halo_checkpoint_for_python` below; CI has no Python.

#[path = "../../tests/conformance_common/mod.rs"]
mod conformance_common;

use std::collections::BTreeMap;

use conformance_common::*;
use halo_kernels::IGNORE_INDEX;
use halo_train::autograd::Tape;
use halo_train::model::gpt::LAYER_NORM_EPS;
use halo_train::model::GptWeights;
use halo_train::model::{DTypeOnDisk, Gpt, GptConfig};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    versions: BTreeMap<String, Option<String>>,
    config: HfConfig,
    cases: Vec<Case>,
}

/// The fields of HF's `config.json` that define the architecture.
#[derive(Deserialize)]
struct HfConfig {
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
    vocab_size: usize,
    n_positions: usize,
    layer_norm_epsilon: f64,
    activation_function: String,
    tie_word_embeddings: bool,
    #[serde(default)]
    n_inner: Option<usize>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    batch: usize,
    seq: usize,
    input_ids: Vec<u32>,
    targets: Vec<i32>,
    logits: Vec<f64>,
    token_logprobs: Vec<f64>,
    #[serde(default)]
    hf_loss_labels: Option<Vec<i64>>,
    #[serde(default)]
    hf_loss: Option<f64>,
    #[serde(default)]
    grad_weights: Option<Vec<f64>>,
    #[serde(default)]
    param_grads: Option<BTreeMap<String, Vec<f64>>>,
}

fn checkpoint_path() -> std::path::PathBuf {
    fixture_path("tiny_gpt2/model.safetensors")
}

/// Our config from HF's `config.json` (the one saved next to the checkpoint).
fn our_config(hf: &HfConfig) -> GptConfig {
    // What our GPT-2 implements: anything else in the file would be a different model.
    assert_eq!(hf.activation_function, "gelu_new");
    assert_eq!(hf.layer_norm_epsilon as f32, LAYER_NORM_EPS);
    assert!(hf.tie_word_embeddings);
    assert!(hf.n_inner.is_none() || hf.n_inner == Some(4 * hf.n_embd));
    GptConfig {
        n_layer: hf.n_layer,
        n_head: hf.n_head,
        n_embd: hf.n_embd,
        vocab_size: hf.vocab_size,
        n_ctx: hf.n_positions,
        dropout: 0.0,
    }
}

fn config_from_json_file() -> GptConfig {
    let text = std::fs::read_to_string(fixture_path("tiny_gpt2/config.json")).unwrap();
    our_config(&serde_json::from_str(&text).unwrap())
}

fn load() -> (Fixture, Gpt) {
    let f: Fixture = load_fixture("transformers_gpt2.json");
    assert!(f.versions["transformers"].is_some());
    let config = our_config(&f.config);
    assert_eq!(
        config,
        config_from_json_file(),
        "fixture JSON vs tiny_gpt2/config.json"
    );
    let model = Gpt::load_safetensors_with_config(checkpoint_path(), config)
        .expect("our loader reads the transformers checkpoint");
    (f, model)
}

#[test]
fn loads_hf_checkpoint_and_reproduces_logits() {
    let (f, model) = load();
    assert!(f.cases.len() >= 3);
    for case in &f.cases {
        let logits = model
            .logits_inference(&case.input_ids, case.batch, case.seq)
            .unwrap();
        let ours: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        let e = assert_close(
            &format!("{} logits", case.name),
            &ours,
            &case.logits,
            1e-5,
            |_| 2e-5,
        );
        let logp = model
            .token_logprobs_inference(&case.input_ids, &case.targets, case.batch, case.seq)
            .unwrap();
        let ours_logp: Vec<f64> = logp.iter().map(|&x| x as f64).collect();
        let el = assert_close(
            &format!("{} token_logprobs", case.name),
            &ours_logp,
            &case.token_logprobs,
            1e-5,
            |_| 2e-5,
        );
        for (t, &y) in case.targets.iter().enumerate() {
            if y == IGNORE_INDEX {
                assert_eq!(logp[t], 0.0, "{} ignored target {t}", case.name);
            }
        }
        eprintln!(
            "{}: max |Δ logit| {:.2e}, max |Δ logp| {:.2e}",
            case.name, e.abs, el.abs
        );
    }
}

/// HF's `model(input_ids, labels=labels).loss` shifts inside (logits[:, :-1] predict
/// labels[:, 1:]) and averages over the non-ignored targets; ours takes unshifted targets.
#[test]
fn mean_nll_matches_hf_causal_lm_loss() {
    let (f, model) = load();
    let mut checked = 0;
    for case in &f.cases {
        let (Some(labels), Some(hf_loss)) = (&case.hf_loss_labels, case.hf_loss) else {
            continue;
        };
        let mut targets = vec![IGNORE_INDEX; case.batch * case.seq];
        for b in 0..case.batch {
            for t in 0..case.seq - 1 {
                targets[b * case.seq + t] = labels[b * case.seq + t + 1] as i32;
            }
        }
        let mut tape = Tape::inference();
        let nll = model
            .nll(&mut tape, &case.input_ids, &targets, case.batch, case.seq)
            .unwrap();
        let ours = tape.value(nll)[0] as f64;
        assert_scalar_close(&format!("{} HF loss", case.name), ours, hf_loss, 1e-5, 1e-6);
        checked += 1;
    }
    assert!(checked >= 2);
}

#[test]
fn parameter_gradients_match_hf_autograd() {
    let (f, model) = load();
    let case = f
        .cases
        .iter()
        .find(|c| c.param_grads.is_some())
        .expect("fixture has a gradient case");
    let weights = to_f32(case.grad_weights.as_ref().unwrap());
    let theirs = case.param_grads.as_ref().unwrap();
    let mut tape = Tape::new();
    let logp = model
        .token_logprobs(
            &mut tape,
            &case.input_ids,
            &case.targets,
            case.batch,
            case.seq,
        )
        .unwrap();
    let grads = tape.backward(logp, &weights).unwrap();
    assert_eq!(
        theirs.len(),
        model.parameters().len(),
        "HF and ours disagree on the parameter set"
    );
    let mut worst = 0.0f64;
    for (name, expected) in theirs {
        let index = model
            .parameter_index(name)
            .unwrap_or_else(|| panic!("no parameter `{name}` in ours"));
        let ours: Vec<f64> = grads
            .get(index)
            .unwrap_or_else(|| panic!("no gradient for `{name}`"))
            .iter()
            .map(|&g| g as f64)
            .collect();
        let scale = expected.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        assert!(scale > 0.0, "{name}: HF gradient is all zero");
        let e = assert_close(&format!("grad {name}"), &ours, expected, 0.0, |_| {
            1e-4 * scale
        });
        worst = worst.max(e.abs / scale);
    }
    eprintln!("parameter gradients: max |Δ| / max|g| per tensor = {worst:.2e}");
}

/// The fixture's `model.safetensors` carries no metadata of ours; its `config.json` (written by
/// transformers) gives the head count. Shape inference alone (GPT-2's head size 64) could not
/// split n_embd 32: loading the file must use the config beside it, not guess.
#[test]
fn plain_load_reads_the_config_json_beside_the_weights() {
    let model = Gpt::load_safetensors(checkpoint_path()).expect("loads through config.json");
    let config = model.config();
    assert_eq!(
        (
            config.n_layer,
            config.n_head,
            config.n_embd,
            config.vocab_size,
            config.n_ctx
        ),
        (2, 4, 32, 50, 16),
        "the sizes transformers wrote into config.json"
    );
}

/// Writes a checkpoint of our own randomly initialised model and its logits for
/// `make_fixtures.py --reverse-check` (which loads it in transformers). Not run in CI.
#[test]
#[ignore = "run by scripts/conformance/make_fixtures.py --reverse-check"]
fn write_halo_checkpoint_for_python() {
    let dir = std::env::var("HALO_CONFORMANCE_OUT").expect("HALO_CONFORMANCE_OUT is set");
    let dir = std::path::Path::new(&dir);
    let config = GptConfig {
        n_layer: 2,
        n_head: 4,
        n_embd: 32,
        vocab_size: 50,
        n_ctx: 16,
        dropout: 0.0,
    };
    let mut model = Gpt::new(config, 2024).unwrap();
    // GPT-2's init (std 0.02, LayerNorm 1/0) gives near-constant logits: spread every parameter
    // (biases and LayerNorm included) so each one visibly matters.
    for (_, data) in model.parameters_mut() {
        for (i, x) in data.iter_mut().enumerate() {
            *x = *x * 15.0 + 0.1 * ((i * 37 % 11) as f32 - 5.0) / 5.0;
        }
    }
    model
        .save_safetensors(dir.join("halo.safetensors"), DTypeOnDisk::F32)
        .unwrap();
    // The same model as a `save_pretrained` directory: transformers' `from_pretrained` must take
    // our config.json as it is.
    model
        .save_pretrained(dir.join("pretrained"), DTypeOnDisk::F32)
        .unwrap();
    let (batch, seq) = (2, 11);
    let input_ids: Vec<u32> = (0..batch * seq).map(|i| (i * 7 + 3) as u32 % 50).collect();
    let logits = model.logits_inference(&input_ids, batch, seq).unwrap();
    let payload = serde_json::json!({
        "config": config,
        "batch": batch,
        "seq": seq,
        "input_ids": input_ids,
        "logits": logits,
    });
    std::fs::write(dir.join("halo_logits.json"), payload.to_string()).unwrap();
}
