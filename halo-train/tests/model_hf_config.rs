//! Hugging Face `config.json` interop: loading a `save_pretrained` directory reads its config
//! (n_head included, so head sizes other than GPT-2's 64 load), refuses what our model does not
//! compute by key and value, checks the sizes against the tensors, and `save_pretrained` writes a
//! directory that reads back bitwise and whose `config.json` has what `transformers` needs.
//!
//! Independent checks: transformers' own logits and `config.json` (the `tiny_gpt2` fixture), and a
//! naive f64 transcription of GPT-2's forward that takes the head count from the JSON the test
//! wrote, not from the loader.

#[path = "../../tests/conformance_common/mod.rs"]
mod conformance_common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use conformance_common::{assert_close, fixture_path, load_fixture};
use halo_kernels::HaloError;
use halo_train::model::GptWeights;
use halo_train::model::{DTypeOnDisk, Gpt, GptConfig};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::Deserialize;
use serde_json::{json, Value};

/// The architecture of the transformers fixture, as its `config.json` states it.
const TINY: GptConfig = GptConfig {
    n_layer: 2,
    n_head: 4,
    n_embd: 32,
    vocab_size: 50,
    n_ctx: 16,
    dropout: 0.0,
};

/// The parts of `transformers_gpt2.json` this file uses.
#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

/// One forward case of the fixture: inputs and transformers' float64 logits.
#[derive(Deserialize)]
struct Case {
    name: String,
    batch: usize,
    seq: usize,
    input_ids: Vec<u32>,
    logits: Vec<f64>,
}

fn tiny_dir() -> PathBuf {
    fixture_path("tiny_gpt2")
}

/// A fresh, empty directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("halo_hf_config_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The fixture's `config.json` (written by transformers' `save_pretrained`).
fn tiny_config_json() -> Value {
    let text = std::fs::read_to_string(tiny_dir().join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// Writes `model`'s parameters as a bare Hugging Face file: f32, HF names, only the `format`
/// metadata (no config of ours), so the loader can learn the config only from `config.json`.
fn write_bare_safetensors(model: &Gpt, path: &Path) {
    let bytes: Vec<Vec<u8>> = model
        .parameters()
        .iter()
        .map(|p| bytemuck::cast_slice(&p.data).to_vec())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = model
        .parameters()
        .iter()
        .zip(&bytes)
        .map(|(p, b)| {
            (
                p.name.clone(),
                TensorView::new(Dtype::F32, p.shape.clone(), b).unwrap(),
            )
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, &Some(metadata), path).unwrap();
}

/// A directory with the fixture's weights and `config` as its `config.json`.
fn fixture_dir_with_config(name: &str, config: &Value) -> PathBuf {
    let dir = temp_dir(name);
    std::fs::copy(
        tiny_dir().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    write_json(&dir.join("config.json"), config);
    dir
}

/// The fixture's `config.json` with `key` set to `value` (`Value::Null` → key removed).
fn tiny_config_with(key: &str, value: Value) -> Value {
    let mut config = tiny_config_json();
    let map = config.as_object_mut().unwrap();
    if value.is_null() {
        map.remove(key);
    } else {
        map.insert(key.to_string(), value);
    }
    config
}

fn checkpoint_error(result: halo_kernels::Result<Gpt>, what: &str) -> String {
    match result {
        Err(HaloError::Checkpoint(msg)) => msg,
        Err(e) => panic!("{what}: expected a checkpoint error, got {e}"),
        Ok(m) => panic!("{what}: loaded with config {:?}", m.config()),
    }
}

/// GPT-2's init gives near-constant logits; spread every parameter (biases and layer norms too)
/// so that each one, and the head split, visibly matters.
fn spread(model: &mut Gpt) {
    for (_, data) in model.parameters_mut() {
        for (i, x) in data.iter_mut().enumerate() {
            *x = *x * 15.0 + 0.1 * ((i * 37 % 11) as f32 - 5.0) / 5.0;
        }
    }
}

fn logits(model: &Gpt, ids: &[u32], batch: usize, seq: usize) -> Vec<f32> {
    model.logits_inference(ids, batch, seq).unwrap()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------------
// (a) transformers' directory loads through its config.json

/// `Gpt::load_pretrained(dir)`, `Gpt::load_safetensors(dir)` and `Gpt::load_safetensors(file)`
/// (config.json beside it) all read the fixture's config (4 heads of 8: not GPT-2's 64, which the
/// old shape inference assumed) and reproduce transformers' logits.
#[test]
fn transformers_directory_loads_through_config_json_and_reproduces_logits() {
    let fixture: Fixture = load_fixture("transformers_gpt2.json");
    assert!(fixture.cases.len() >= 3);
    let explicit =
        Gpt::load_safetensors_with_config(tiny_dir().join("model.safetensors"), TINY).unwrap();
    let loaders: [(&str, halo_kernels::Result<Gpt>); 3] = [
        ("load_pretrained(dir)", Gpt::load_pretrained(tiny_dir())),
        ("load_safetensors(dir)", Gpt::load_safetensors(tiny_dir())),
        (
            "load_safetensors(dir/model.safetensors)",
            Gpt::load_safetensors(tiny_dir().join("model.safetensors")),
        ),
    ];
    for (how, model) in loaders {
        let model = model.unwrap_or_else(|e| panic!("{how}: {e}"));
        assert_eq!(*model.config(), TINY, "{how}: config from config.json");
        assert_eq!(model, explicit, "{how}: parameters");
        for case in &fixture.cases {
            let ours: Vec<f64> = logits(&model, &case.input_ids, case.batch, case.seq)
                .iter()
                .map(|&x| x as f64)
                .collect();
            assert_close(
                &format!("{how} {} logits", case.name),
                &ours,
                &case.logits,
                1e-5,
                |_| 2e-5,
            );
        }
    }
}

/// Without a config.json (and without our metadata) a file still gets its config from the tensor
/// shapes with GPT-2's head size of 64: the fixture's n_embd 32 is then refused, naming the way out.
#[test]
fn bare_file_without_config_json_keeps_shape_inference_fallback() {
    let dir = temp_dir("bare_fallback");
    std::fs::copy(
        tiny_dir().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let msg = checkpoint_error(
        Gpt::load_safetensors(dir.join("model.safetensors")),
        "n_embd 32 without config.json",
    );
    assert!(msg.contains("n_embd = 32") && msg.contains("64"), "{msg}");
    assert!(msg.contains("config.json"), "{msg}");
    // A directory, though, must have its config.json.
    let msg = checkpoint_error(Gpt::load_pretrained(&dir), "directory without config.json");
    assert!(msg.contains("config.json"), "{msg}");

    // n_embd 64 without config.json: inferred as one 64-wide head, as before.
    let config = GptConfig {
        n_layer: 1,
        n_head: 1,
        n_embd: 64,
        vocab_size: 11,
        n_ctx: 5,
        dropout: 0.0,
    };
    let model = Gpt::new(config, 3).unwrap();
    let path = dir.join("wide.safetensors");
    write_bare_safetensors(&model, &path);
    let loaded = Gpt::load_safetensors(&path).unwrap();
    assert_eq!(*loaded.config(), config);
    assert_eq!(loaded, model);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// (b) head size 12

/// A naive f64 transcription of `GPT2LMHeadModel.forward` for one sequence, with the head count
/// given by the caller (read from the JSON the test wrote) and the weights read by HF name.
fn reference_logits(model: &Gpt, n_head: usize, ids: &[u32]) -> Vec<f64> {
    let param = |name: &str| -> (Vec<f64>, Vec<usize>) {
        let p = &model.parameters()[model.parameter_index(name).unwrap()];
        (p.data.iter().map(|&v| v as f64).collect(), p.shape.clone())
    };
    let layer_norm = |x: &[Vec<f64>], prefix: &str| -> Vec<Vec<f64>> {
        let (g, _) = param(&format!("{prefix}.weight"));
        let (b, _) = param(&format!("{prefix}.bias"));
        x.iter()
            .map(|row| {
                let n = row.len() as f64;
                let mean = row.iter().sum::<f64>() / n;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                let rstd = 1.0 / (var + 1e-5).sqrt();
                (0..row.len())
                    .map(|i| (row[i] - mean) * rstd * g[i] + b[i])
                    .collect()
            })
            .collect()
    };
    let conv1d = |x: &[Vec<f64>], prefix: &str| -> Vec<Vec<f64>> {
        let (w, shape) = param(&format!("{prefix}.weight"));
        let (b, _) = param(&format!("{prefix}.bias"));
        let (nin, nout) = (shape[0], shape[1]);
        x.iter()
            .map(|row| {
                (0..nout)
                    .map(|o| b[o] + (0..nin).map(|i| row[i] * w[i * nout + o]).sum::<f64>())
                    .collect()
            })
            .collect()
    };
    let (wte, wte_shape) = param("transformer.wte.weight");
    let (wpe, _) = param("transformer.wpe.weight");
    let (vocab, c) = (wte_shape[0], wte_shape[1]);
    let hd = c / n_head;
    let seq = ids.len();
    let mut x: Vec<Vec<f64>> = (0..seq)
        .map(|t| {
            (0..c)
                .map(|j| wte[ids[t] as usize * c + j] + wpe[t * c + j])
                .collect()
        })
        .collect();
    let mut layer = 0;
    while model
        .parameter_index(&format!("transformer.h.{layer}.ln_1.weight"))
        .is_some()
    {
        let pre = format!("transformer.h.{layer}");
        let qkv = conv1d(
            &layer_norm(&x, &format!("{pre}.ln_1")),
            &format!("{pre}.attn.c_attn"),
        );
        let mut att = vec![vec![0.0; c]; seq];
        for h in 0..n_head {
            for i in 0..seq {
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|d| qkv[i][h * hd + d] * qkv[j][c + h * hd + d])
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for d in 0..hd {
                    att[i][h * hd + d] = (0..=i)
                        .map(|j| exps[j] / total * qkv[j][2 * c + h * hd + d])
                        .sum();
                }
            }
        }
        let a = conv1d(&att, &format!("{pre}.attn.c_proj"));
        for (row, delta) in x.iter_mut().zip(&a) {
            row.iter_mut().zip(delta).for_each(|(v, d)| *v += d);
        }
        let mut f = conv1d(
            &layer_norm(&x, &format!("{pre}.ln_2")),
            &format!("{pre}.mlp.c_fc"),
        );
        for v in f.iter_mut().flatten() {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (*v + 0.044715 * v.powi(3));
            *v = 0.5 * *v * (1.0 + u.tanh());
        }
        let f = conv1d(&f, &format!("{pre}.mlp.c_proj"));
        for (row, delta) in x.iter_mut().zip(&f) {
            row.iter_mut().zip(delta).for_each(|(v, d)| *v += d);
        }
        layer += 1;
    }
    let h = layer_norm(&x, "transformer.ln_f");
    h.iter()
        .flat_map(|row| {
            (0..vocab)
                .map(|v| (0..c).map(|j| row[j] * wte[v * c + j]).sum::<f64>())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The fixture's config.json with the sizes of a 48-wide model: transformers' format, written by
/// hand (no Python offline).
fn head12_config_json(n_head: usize) -> Value {
    let mut config = tiny_config_json();
    let map = config.as_object_mut().unwrap();
    for (key, value) in [
        ("n_embd", 48),
        ("n_head", n_head),
        ("n_layer", 2),
        ("n_positions", 10),
        ("vocab_size", 37),
    ] {
        map.insert(key.to_string(), json!(value));
    }
    config
}

/// n_embd 48 with 4 heads (head size 12): refused by the shape inference (48 is no multiple of 64),
/// loaded through config.json, and its forward matches the naive reference run with the head count
/// the JSON says; the same weights under `n_head: 6` give other logits, so n_head is really read.
#[test]
fn head_size_12_loads_from_config_json_and_matches_reference_forward() {
    let config = GptConfig {
        n_layer: 2,
        n_head: 4,
        n_embd: 48,
        vocab_size: 37,
        n_ctx: 10,
        dropout: 0.0,
    };
    let mut model = Gpt::new(config, 48).unwrap();
    spread(&mut model);
    let dir = temp_dir("head12");
    write_bare_safetensors(&model, &dir.join("model.safetensors"));
    let msg = checkpoint_error(
        Gpt::load_safetensors(dir.join("model.safetensors")),
        "no config.json",
    );
    assert!(msg.contains("n_embd = 48"), "{msg}");

    let json4 = head12_config_json(4);
    write_json(&dir.join("config.json"), &json4);
    let loaded = Gpt::load_pretrained(&dir).unwrap();
    assert_eq!(loaded.config().n_head, 4);
    assert_eq!(loaded.config().n_embd, 48);
    assert_eq!(loaded.config().n_ctx, 10);

    let ids: Vec<u32> = (0..10).map(|i| (i * 7 + 3) % 37).collect();
    let n_head_from_json = json4["n_head"].as_u64().unwrap() as usize;
    let expected = reference_logits(&loaded, n_head_from_json, &ids);
    let ours4 = logits(&loaded, &ids, 1, ids.len());
    let ours4_f64: Vec<f64> = ours4.iter().map(|&x| x as f64).collect();
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1.0, "logits too flat to tell heads apart: {scale}");
    assert_close("head size 12 logits", &ours4_f64, &expected, 1e-5, |_| {
        1e-5 * scale
    });
    // Batched rows are the same sequence run independently.
    let two: Vec<u32> = ids.iter().chain(&ids).copied().collect();
    let batched = logits(&loaded, &two, 2, ids.len());
    assert_eq!(bits(&batched[..ours4.len()]), bits(&ours4));

    write_json(&dir.join("config.json"), &head12_config_json(6));
    let six = Gpt::load_safetensors(&dir).unwrap();
    assert_eq!(six.config().n_head, 6);
    let ours6 = logits(&six, &ids, 1, ids.len());
    let max_diff = ours4
        .iter()
        .zip(&ours6)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        max_diff as f64 > 1e-3 * scale,
        "6 heads gave the same logits as 4 (max diff {max_diff})"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// (c) refusals

/// Every value our model does not implement is refused with a checkpoint error naming the key and
/// the value, both through `load_pretrained` (prefixed by the file) and `from_hf_config_json`.
#[test]
fn unsupported_config_values_are_refused_naming_key_and_value() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "activation_function",
            json!("relu"),
            "activation_function = \"relu\"",
        ),
        (
            "activation_function",
            json!("gelu"),
            "activation_function = \"gelu\"",
        ),
        (
            "activation_function",
            json!("quick_gelu"),
            "activation_function = \"quick_gelu\"",
        ),
        ("activation_function", json!(7), "activation_function = 7"),
        (
            "layer_norm_epsilon",
            json!(1e-6),
            "layer_norm_epsilon = 1e-6",
        ),
        (
            "layer_norm_epsilon",
            json!(1e-12),
            "layer_norm_epsilon = 1e-12",
        ),
        (
            "scale_attn_weights",
            json!(false),
            "scale_attn_weights = false",
        ),
        (
            "scale_attn_by_inverse_layer_idx",
            json!(true),
            "scale_attn_by_inverse_layer_idx = true",
        ),
        (
            "add_cross_attention",
            json!(true),
            "add_cross_attention = true",
        ),
        (
            "tie_word_embeddings",
            json!(false),
            "tie_word_embeddings = false",
        ),
        ("n_inner", json!(64), "n_inner = 64"),
        ("model_type", json!("gpt_neo"), "model_type = \"gpt_neo\""),
        (
            "pruned_heads",
            json!({"0": [1]}),
            "pruned_heads = {\"0\":[1]}",
        ),
        ("embd_pdrop", json!(0.2), "embd_pdrop = 0.2"),
        ("resid_pdrop", json!(1.5), "resid_pdrop = 1.5"),
        ("n_ctx", json!(32), "n_ctx = 32"),
        ("n_head", json!(5), "n_head = 5"),
        ("n_head", json!(0), "n_head = 0"),
        ("n_embd", json!("32"), "n_embd = \"32\""),
        (
            "reorder_and_upcast_attn",
            json!("yes"),
            "reorder_and_upcast_attn = \"yes\"",
        ),
    ];
    for (key, value, expected) in cases {
        let config = tiny_config_with(key, value.clone());
        let direct = GptConfig::from_hf_config_json(&config.to_string());
        match direct {
            Err(HaloError::Checkpoint(msg)) => {
                assert!(msg.contains(expected), "{key} = {value}: {msg}");
                assert!(msg.starts_with("config.json: "), "{msg}");
            }
            other => panic!("{key} = {value}: expected a refusal, got {other:?}"),
        }
        let dir = fixture_dir_with_config(&format!("refuse_{key}"), &config);
        let msg = checkpoint_error(Gpt::load_pretrained(&dir), &format!("{key} = {value}"));
        assert!(msg.contains(expected), "{key} = {value}: {msg}");
        assert!(
            msg.contains(&dir.join("config.json").display().to_string()),
            "{msg}"
        );
        eprintln!("{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Sizes that merely must agree with the tensors are checked against them; the error names the
/// key, its value and the tensor with its shape (or the block count).
#[test]
fn config_sizes_must_agree_with_the_tensors() {
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "vocab_size",
            json!(60),
            &["vocab_size = 60", "transformer.wte.weight", "[50, 32]"],
        ),
        (
            "n_positions",
            json!(8),
            &["n_positions = 8", "transformer.wpe.weight", "[16, 32]"],
        ),
        (
            "n_embd",
            json!(64),
            &["n_embd = 64", "transformer.wte.weight", "[50, 32]"],
        ),
        ("n_layer", json!(3), &["n_layer = 3", "2 blocks"]),
        ("n_layer", json!(1), &["n_layer = 1", "2 blocks"]),
        // Absent: GPT2Config's default 768 applies, as in transformers.
        (
            "n_embd",
            Value::Null,
            &["n_embd = 768", "transformer.wte.weight", "[50, 32]"],
        ),
    ];
    for (key, value, expected) in cases {
        let dir = fixture_dir_with_config(&format!("sizes_{key}"), &tiny_config_with(key, value));
        let msg = checkpoint_error(Gpt::load_pretrained(&dir), key);
        for part in expected {
            assert!(msg.contains(part), "{key}: `{part}` not in: {msg}");
        }
        eprintln!("{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Spellings of what the model does compute are accepted and give the very same model: the other
/// names of the tanh GELU, `n_inner = 4·n_embd`, `reorder_and_upcast_attn` (same function in f32),
/// an agreeing legacy `n_ctx`, and keys left out (transformers' defaults).
#[test]
fn equivalent_config_values_are_accepted() {
    let baseline = Gpt::load_pretrained(tiny_dir()).unwrap();
    let ids: Vec<u32> = (0..16).map(|i| (i * 5 + 1) % 50).collect();
    let expected = bits(&logits(&baseline, &ids, 1, 16));
    let cases: Vec<(&str, Value)> = vec![
        ("activation_function", json!("gelu_pytorch_tanh")),
        ("activation_function", json!("gelu_fast")),
        ("n_inner", json!(128)),
        ("reorder_and_upcast_attn", json!(true)),
        ("n_ctx", json!(16)),
        ("layer_norm_epsilon", json!(1e-5)),
        ("tie_word_embeddings", Value::Null),
        ("add_cross_attention", Value::Null),
        ("model_type", Value::Null),
        ("activation_function", Value::Null),
        ("pruned_heads", json!({})),
    ];
    for (key, value) in cases {
        let dir = fixture_dir_with_config(
            &format!("accept_{key}"),
            &tiny_config_with(key, value.clone()),
        );
        let model = Gpt::load_pretrained(&dir).unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
        assert_eq!(*model.config(), TINY, "{key} = {value}");
        assert_eq!(
            bits(&logits(&model, &ids, 1, 16)),
            expected,
            "{key} = {value}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // Dropout is read from resid_pdrop / embd_pdrop (absent: GPT2Config's 0.1).
    let mut config = tiny_config_json();
    let map = config.as_object_mut().unwrap();
    map.remove("resid_pdrop");
    map.remove("embd_pdrop");
    assert_eq!(GptConfig::from_hf_config(&config).unwrap().dropout, 0.1);
}

/// A file carrying our config metadata and a config.json beside it that describes another model
/// is refused, naming both.
#[test]
fn metadata_and_disagreeing_config_json_are_refused() {
    let dir = temp_dir("disagree");
    let model = Gpt::new(TINY, 5).unwrap();
    model
        .save_safetensors(dir.join("base.safetensors"), DTypeOnDisk::F32)
        .unwrap();
    // Without a config.json beside it, the metadata is used.
    assert_eq!(
        Gpt::load_safetensors(dir.join("base.safetensors")).unwrap(),
        model
    );
    let mut other = TINY;
    other.n_head = 2;
    write_json(&dir.join("config.json"), &other.to_hf_config());
    let msg = checkpoint_error(
        Gpt::load_safetensors(dir.join("base.safetensors")),
        "disagreeing config.json",
    );
    assert!(
        msg.contains("n_head: 4") && msg.contains("n_head: 2") && msg.contains("config.json"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// (d) save → load

/// `save_pretrained` → `load_pretrained` reproduces the parameters and logits bitwise (dropout
/// included), the weights alone (our metadata stripped, as transformers sees them) load the same
/// through config.json, and config.json has the keys transformers needs with the values its own
/// `save_pretrained` wrote for the same architecture (the fixture).
#[test]
fn save_pretrained_round_trip_is_bitwise_and_writes_transformers_config() {
    let mut config = TINY;
    config.dropout = 0.1;
    let mut model = Gpt::new(config, 2024).unwrap();
    spread(&mut model);
    let dir = temp_dir("save_pretrained").join("nested");
    model.save_pretrained(&dir, DTypeOnDisk::F32).unwrap();

    let loaded = Gpt::load_pretrained(&dir).unwrap();
    assert_eq!(*loaded.config(), config);
    assert_eq!(loaded, model);
    let ids: Vec<u32> = (0..2 * 11).map(|i| (i * 7 + 3) % 50).collect();
    let before = bits(&logits(&model, &ids, 2, 11));
    assert_eq!(bits(&logits(&loaded, &ids, 2, 11)), before);
    assert_eq!(Gpt::load_safetensors(&dir).unwrap(), model);

    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let written: Value = serde_json::from_str(&text).unwrap();
    let expect = |key: &str, value: Value| {
        assert_eq!(
            written.get(key),
            Some(&value),
            "config.json `{key}` in {text}"
        );
    };
    expect("model_type", json!("gpt2"));
    expect("architectures", json!(["GPT2LMHeadModel"]));
    expect("n_embd", json!(32));
    expect("n_head", json!(4));
    expect("n_layer", json!(2));
    expect("n_positions", json!(16));
    expect("vocab_size", json!(50));
    expect("n_inner", Value::Null);
    expect("activation_function", json!("gelu_new"));
    expect("layer_norm_epsilon", json!(1e-5));
    expect("scale_attn_weights", json!(true));
    expect("scale_attn_by_inverse_layer_idx", json!(false));
    expect("reorder_and_upcast_attn", json!(false));
    expect("add_cross_attention", json!(false));
    expect("tie_word_embeddings", json!(true));
    expect("resid_pdrop", json!(0.1));
    expect("embd_pdrop", json!(0.1));
    expect("attn_pdrop", json!(0.0));

    // What transformers' save_pretrained wrote for the fixture's architecture (dropout 0): every
    // key that defines the model must carry the same value in ours.
    let theirs = tiny_config_json();
    let ours = TINY.to_hf_config();
    for key in [
        "activation_function",
        "add_cross_attention",
        "architectures",
        "attn_pdrop",
        "embd_pdrop",
        "initializer_range",
        "layer_norm_epsilon",
        "model_type",
        "n_embd",
        "n_head",
        "n_inner",
        "n_layer",
        "n_positions",
        "reorder_and_upcast_attn",
        "resid_pdrop",
        "scale_attn_by_inverse_layer_idx",
        "scale_attn_weights",
        "tie_word_embeddings",
        "vocab_size",
    ] {
        assert_eq!(
            ours.get(key),
            theirs.get(key),
            "`{key}`: ours vs transformers"
        );
    }

    // The weights without our metadata: the config can only come from config.json.
    write_bare_safetensors(&model, &dir.join("model.safetensors"));
    let bare = Gpt::load_pretrained(&dir).unwrap();
    assert_eq!(*bare.config(), config);
    assert_eq!(bits(&logits(&bare, &ids, 2, 11)), before);
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

/// The single-file checkpoint (what the training pipeline writes as `runs/<name>/<stage>.safetensors`)
/// is unchanged: no config.json appears beside it and it reloads from its metadata.
#[test]
fn single_file_save_writes_no_config_json_and_reloads() {
    let dir = temp_dir("single_file");
    let model = Gpt::new(TINY, 9).unwrap();
    model
        .save_safetensors(dir.join("kto.safetensors"), DTypeOnDisk::F32)
        .unwrap();
    assert!(!dir.join("config.json").exists());
    assert_eq!(
        Gpt::load_safetensors(dir.join("kto.safetensors")).unwrap(),
        model
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
