//! Fuzz targets of halo-train (harness: the core's `tests/fuzz_support`): the checkpoint loader
//! (`Gpt::load_safetensors` on random bytes, on mutated valid files and on hand-made hostile
//! headers; `Gpt::load_pretrained` with a hostile `config.json`), the JSONL data loader with the
//! conversions and batching after it, and the tokenizers. An accepted checkpoint must hold finite
//! weights and give finite logits; accepted data must give batches of the right shape with labels
//! in the vocabulary.
//!
//! `HALO_FUZZ_SECONDS=60 cargo test --release -p halo-train --test fuzz_train -- --nocapture`
//! fuzzes longer; `scripts/fuzz.sh` prints the counts of every target as one table.

#[path = "../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::path::PathBuf;
use std::sync::OnceLock;

use fuzz_support::{fuzz, Gen, Outcome};
use halo_train::model::GptWeights;
use halo_train::model::{DTypeOnDisk, Gpt, GptConfig};
use halo_train::train::batching::{dpo_batch, kto_batch};
use halo_train::train::data::{keep_desirable_fraction, load_jsonl, paired_only, to_unpaired};
use halo_train::train::tokenizer::{ByteTokenizer, TextTokenizer};
use serde_json::{json, Map, Value};

/// This process's scratch directory for the target `name` (one file or folder per input, reused).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("halo_fuzz_{}_{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---- checkpoints -----------------------------------------------------------------------------

fn small_config(g: &mut Gen) -> GptConfig {
    GptConfig {
        n_layer: g.draw(1..3usize),
        n_head: 2,
        n_embd: 8,
        vocab_size: g.draw(2..13usize),
        n_ctx: g.draw(2..7usize),
        dropout: 0.0,
    }
}

/// Valid checkpoint files of a few small models (F32 and BF16 on disk) and their configs, built
/// once per process.
fn valid_files() -> &'static [(Vec<u8>, GptConfig)] {
    static FILES: OnceLock<Vec<(Vec<u8>, GptConfig)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = scratch("valid");
        let mut files = Vec::new();
        for (seed, n_layer, dtype) in [
            (1, 1, DTypeOnDisk::F32),
            (2, 2, DTypeOnDisk::F32),
            (3, 1, DTypeOnDisk::BF16),
        ] {
            let config = GptConfig {
                n_layer,
                n_head: 2,
                n_embd: 8,
                vocab_size: 11,
                n_ctx: 6,
                dropout: 0.0,
            };
            let path = dir.join(format!("{seed}.safetensors"));
            Gpt::new(config, seed)
                .unwrap()
                .save_safetensors(&path, dtype)
                .unwrap();
            files.push((std::fs::read(&path).unwrap(), config));
        }
        files
    })
}

/// A safetensors file's header (JSON) and data, or `None` when it does not split as one.
fn split(file: &[u8]) -> Option<(Map<String, Value>, Vec<u8>)> {
    let len = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    let header = serde_json::from_slice(file.get(8..8usize.checked_add(len)?)?).ok()?;
    Some((header, file[8 + len..].to_vec()))
}

fn join(header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(header).unwrap();
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend(text);
    file.extend(data);
    file
}

/// A hostile JSON value for a size field.
fn hostile_number(g: &mut Gen) -> Value {
    match g.draw(0..8u8) {
        0 => json!(g.hostile_usize() as u64),
        1 => json!(-1),
        2 => json!(1.5),
        3 => json!("8"),
        4 => Value::Null,
        5 => json!(true),
        6 => json!([8]),
        _ => json!(g.draw(0..20u64)),
    }
}

/// One structural change to a valid file's header or data.
fn mutate_header(g: &mut Gen, header: &mut Map<String, Value>, data: &mut [u8]) {
    let names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let name = g.pick(&names);
    match g.draw(0..9u8) {
        0 => {
            // A shape with an absurd or wrong dimension.
            let shape = header[&name]["shape"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut shape = shape;
            if shape.is_empty() || g.chance(0.2) {
                shape.push(hostile_number(g));
            } else {
                let i = g.draw(0..shape.len());
                shape[i] = hostile_number(g);
            }
            header[&name]["shape"] = Value::Array(shape);
        }
        1 => {
            let dtype = g.pick(&["F64", "F16", "I8", "BOOL", "U64", "X", "BF16", "F32"]);
            header[&name]["dtype"] = json!(dtype);
        }
        2 => {
            let i = g.draw(0..2usize);
            header[&name]["data_offsets"][i] = hostile_number(g);
        }
        3 => {
            header.remove(&name);
        }
        4 => {
            // The same tensor under its other accepted name too.
            let other = match name.strip_prefix("transformer.") {
                Some(short) => short.to_string(),
                None => format!("transformer.{name}"),
            };
            let entry = header[&name].clone();
            header.insert(other, entry);
        }
        5 => {
            let entry = header.remove(&name).unwrap();
            header.insert(format!("{name}.unknown"), entry);
        }
        6 => {
            // A hostile stored config.
            let mut config: Value = header
                .get("__metadata__")
                .and_then(|m| m.get("halo_gpt_config"))
                .and_then(|c| c.as_str())
                .and_then(|c| serde_json::from_str::<Value>(c).ok())
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            let field = g.pick(&[
                "n_layer",
                "n_head",
                "n_embd",
                "vocab_size",
                "n_ctx",
                "dropout",
                "extra",
            ]);
            config[field] = hostile_number(g);
            if g.chance(0.2) {
                config = json!("not a config");
            }
            header.insert(
                "__metadata__".into(),
                json!({ "halo_gpt_config": config.to_string() }),
            );
        }
        7 => {
            header.remove("__metadata__");
        }
        _ => {
            // NaN, ±inf or a huge finite value somewhere in the data (f32 or bf16 bit patterns).
            for _ in 0..g.draw(1..4usize) {
                if data.len() < 4 {
                    break;
                }
                let at = g.draw(0..data.len() / 2) * 2;
                let value = g.pick(&[
                    f32::NAN,
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    3e38,
                    -1e30,
                    65504.0,
                ]);
                let bytes = value.to_le_bytes();
                let end = (at + 4).min(data.len());
                data[at..end].copy_from_slice(&bytes[4 - (end - at)..]);
            }
        }
    }
}

/// A checkpoint file and the config it was saved with: random bytes, a valid file as it is, with
/// bytes flipped or cut, or with a structural change to its header.
fn checkpoint_bytes(g: &mut Gen) -> (Vec<u8>, GptConfig) {
    let valid = valid_files();
    let (file, config) = &valid[g.draw(0..valid.len())];
    (mutated(g, file.clone()), *config)
}

fn mutated(g: &mut Gen, mut file: Vec<u8>) -> Vec<u8> {
    match g.draw(0..12u8) {
        10 | 11 => file,
        0 => g.draw(proptest::collection::vec(proptest::num::u8::ANY, 0..200)),
        1 => {
            // A hostile header length.
            let len = g.pick(&[
                0u64,
                1,
                2,
                u64::MAX,
                1 << 40,
                file.len() as u64,
                100_000_000,
            ]);
            file[..8].copy_from_slice(&len.to_le_bytes());
            file
        }
        2 => {
            let cut = g.draw(0..file.len());
            file.truncate(cut);
            file
        }
        3 => {
            for _ in 0..g.draw(1..8usize) {
                let at = g.draw(0..file.len());
                file[at] ^= 1 << g.draw(0..8u32);
            }
            file
        }
        _ => {
            let (mut header, mut data) = split(&file).expect("a valid file splits");
            for _ in 0..g.draw(1..3usize) {
                mutate_header(g, &mut header, &mut data);
            }
            join(&header, &data)
        }
    }
}

/// An accepted model: finite weights, and a forward on a few tokens gives finite logits.
fn check_model(model: &Gpt) -> Outcome {
    for p in model.parameters() {
        if let Some(i) = p.data.iter().position(|v| !v.is_finite()) {
            return Outcome::NonFinite(format!("loaded weight {}[{i}] is {}", p.name, p.data[i]));
        }
    }
    let config = model.config();
    let seq = config.n_ctx.min(3);
    let ids: Vec<u32> = (0..seq).map(|i| (i % config.vocab_size) as u32).collect();
    match model.logits_inference(&ids, 1, seq) {
        Ok(logits) => match logits.iter().position(|v| !v.is_finite()) {
            None => Outcome::Accepted,
            Some(i) => Outcome::NonFinite(format!(
                "finite loaded weights give logit[{i}] = {}",
                logits[i]
            )),
        },
        // Finite but huge weights can overflow f32 in the forward: refused, as it must be.
        Err(e @ halo_kernels::HaloError::NonFinite { what: "logits", .. }) => {
            Outcome::Refused(format!("forward of the loaded model: {e}"))
        }
        Err(e) => Outcome::NonFinite(format!("accepted model's forward failed: {e}")),
    }
}

#[test]
fn fuzz_load_safetensors() {
    let dir = scratch("load_safetensors");
    let path = dir.join("model.safetensors");
    fuzz("fuzz_load_safetensors", |g| {
        let (bytes, saved_with) = checkpoint_bytes(g);
        g.show(
            "file",
            &String::from_utf8_lossy(&bytes[..bytes.len().min(2000)]),
        );
        std::fs::write(&path, &bytes).unwrap();
        let with_config = g.chance(0.3);
        let result = if with_config {
            let config = if g.chance(0.5) {
                saved_with
            } else {
                small_config(g)
            };
            Gpt::load_safetensors_with_config(&path, config)
        } else {
            Gpt::load_safetensors(&path)
        };
        Outcome::of(result, check_model)
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `config.json`: the model's own, with hostile values, keys removed or added, or not JSON.
fn hostile_hf_config(g: &mut Gen, model: &Gpt) -> String {
    let mut config = model.config().to_hf_config();
    match g.draw(0..8u8) {
        0 => {
            return g
                .pick(&["", "{", "[]", "null", "{\"n_embd\": 1e400}", "\u{0}"])
                .to_string()
        }
        1 => {
            let key = g.pick(&["n_embd", "n_head", "n_layer", "n_positions", "vocab_size"]);
            config.as_object_mut().unwrap().remove(key);
        }
        _ => {
            for _ in 0..g.draw(1..3usize) {
                let key = g.pick(&[
                    "n_embd",
                    "n_head",
                    "n_layer",
                    "n_positions",
                    "n_ctx",
                    "vocab_size",
                    "n_inner",
                    "layer_norm_epsilon",
                    "activation_function",
                    "model_type",
                    "tie_word_embeddings",
                    "scale_attn_weights",
                    "attn_pdrop",
                ]);
                let value = if g.chance(0.2) {
                    json!(g.pick(&["gelu", "relu", "gpt2", "llama", "", "gelu_new"]))
                } else {
                    hostile_number(g)
                };
                config[key] = value;
            }
        }
    }
    config.to_string()
}

#[test]
fn fuzz_load_pretrained() {
    let dir = scratch("load_pretrained");
    fuzz("fuzz_load_pretrained", |g| {
        let model = Gpt::new(small_config(g), 7).unwrap();
        let text = hostile_hf_config(g, &model);
        g.show("config.json", &text);
        if g.chance(0.5) {
            // The parser alone (cheap), then the whole directory.
            return Outcome::of(GptConfig::from_hf_config_json(&text), |c| {
                Outcome::of(c.validate(), |_| Outcome::Accepted)
            });
        }
        model.save_pretrained(&dir, DTypeOnDisk::F32).unwrap();
        std::fs::write(dir.join("config.json"), &text).unwrap();
        if g.chance(0.3) {
            let (bytes, _) = checkpoint_bytes(g);
            std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        }
        Outcome::of(Gpt::load_pretrained(&dir), check_model)
    });
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- data -------------------------------------------------------------------------------------

fn text(g: &mut Gen) -> String {
    match g.draw(0..6u8) {
        0 => String::new(),
        1 => g.draw("[0-9+= ]{0,12}"),
        2 => g.draw("\\PC{0,16}"),
        3 => "\u{0}\u{FFFD}\u{1F600}\n\t\"\\".into(),
        _ => g.draw("[a-z ]{0,20}"),
    }
}

/// One JSONL line: a valid unpaired or paired row, or one broken in some way.
fn jsonl_line(g: &mut Gen, broken: bool) -> String {
    let mut row = if g.chance(0.5) {
        json!({ "prompt": text(g), "completion": text(g), "label": g.chance(0.5) })
    } else {
        json!({ "prompt": text(g), "chosen": text(g), "rejected": text(g) })
    };
    if g.chance(0.15) {
        let key = g.pick(&[
            "prompt",
            "completion",
            "label",
            "chosen",
            "rejected",
            "extra",
        ]);
        match g.draw(0..4u8) {
            0 => {
                row.as_object_mut().unwrap().remove(key);
            }
            1 => row[key] = hostile_number(g),
            2 => row[key] = json!({ "nested": [1, 2] }),
            _ => row[key] = json!("true"),
        }
    }
    match if broken { g.draw(0..40u8) } else { 40 } {
        0 => "[".repeat(g.draw(1..300usize)),
        1 => "{\"prompt\": ".into(),
        2 => "   ".into(),
        3 => json!([row]).to_string(),
        4 => "1e99999".into(),
        _ => row.to_string(),
    }
}

#[test]
fn fuzz_data_loader() {
    let dir = scratch("data");
    let path = dir.join("data.jsonl");
    fuzz("fuzz_data_loader", |g| {
        // Half the files hold only well-formed rows, so that the batching after the loader runs.
        let broken = g.chance(0.5);
        let lines: Vec<String> = (0..g.size(12)).map(|_| jsonl_line(g, broken)).collect();
        let mut bytes = lines.join("\n").into_bytes();
        if g.chance(0.05) {
            bytes.push(0xff); // not UTF-8
        }
        g.show("file", &String::from_utf8_lossy(&bytes));
        std::fs::write(&path, &bytes).unwrap();
        let rows = match load_jsonl(&path) {
            Ok(rows) => rows,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        let fraction = g.hyper(0.0..1.0, 0.1);
        let examples = keep_desirable_fraction(to_unpaired(&rows, g.draw(0..u64::MAX)), fraction);
        let tok = TextTokenizer::Byte;
        let max_len = g.pick(&[0, 1, 2, 3, 8, 64, usize::MAX]);
        g.show("max_len", &max_len);
        if g.chance(0.5) {
            let batch: Vec<_> = examples.iter().take(g.size(6)).collect();
            Outcome::of(kto_batch(&tok, &batch, max_len), |b| {
                check_batch(&b.examples, &tok).and(|| check_batch(&b.kl_pairs, &tok))
            })
        } else {
            let pairs = match paired_only(&rows, "data.jsonl") {
                Ok(pairs) => pairs,
                Err(e) => return Outcome::Refused(e.to_string()),
            };
            let batch: Vec<_> = pairs.iter().take(g.size(6)).collect();
            Outcome::of(dpo_batch(&tok, &batch, max_len), |b| check_batch(b, &tok))
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}

fn check_batch(b: &halo_train::train::batching::TokenBatch, tok: &TextTokenizer) -> Outcome {
    let cells = b.batch.checked_mul(b.seq);
    if cells != Some(b.input_ids.len()) || cells != Some(b.targets.len()) {
        return Outcome::Wrong(format!(
            "batch {}×{} but {} ids",
            b.batch,
            b.seq,
            b.input_ids.len()
        ));
    }
    let vocab = tok.vocab_size();
    if let Some(t) = b
        .targets
        .iter()
        .find(|&&t| t != halo_kernels::IGNORE_INDEX && (t < 0 || t as usize >= vocab))
    {
        return Outcome::Wrong(format!("target {t} outside the vocabulary {vocab}"));
    }
    match b.input_ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Outcome::Wrong(format!("input id {id} outside the vocabulary {vocab}")),
        None => Outcome::Accepted,
    }
}

// ---- tokenizers -------------------------------------------------------------------------------

/// A small character-level BPE `tokenizer.json` (as `train_tokenizer.rs` writes), mutated.
fn tokenizer_json(g: &mut Gen) -> String {
    let mut vocab = Map::new();
    for (id, c) in "0123456789+=ab".chars().enumerate() {
        vocab.insert(c.to_string(), json!(id));
    }
    let eos_id = g.pick(&[14u64, 100, u32::MAX as u64, 3]);
    vocab.insert("<|endoftext|>".into(), json!(eos_id));
    let mut tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{
            "id": eos_id, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": { "type": "Fuse" },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    });
    for _ in 0..g.draw(0..3usize) {
        match g.draw(0..9u8) {
            8 => tok["decoder"] = hostile_number(g),
            0 => tok["model"]["type"] = json!(g.pick(&["WordLevel", "Unigram", "WordPiece", "X"])),
            1 => tok["model"]["vocab"] = hostile_number(g),
            2 => tok["model"]["merges"] = json!([["a", "b"], ["x", "y"], "a b", 3]),
            3 => tok["added_tokens"][0]["id"] = hostile_number(g),
            4 => tok["truncation"] = json!({ "max_length": g.hostile_usize() as u64, "stride": 0 }),
            5 => {
                tok["padding"] =
                    json!({ "strategy": "BatchLongest", "pad_id": g.hostile_usize() as u64 })
            }
            6 => tok["model"]["unk_token"] = json!("<unk>"),
            _ => tok["model"]["dropout"] = json!(g.hyper(0.0..1.0, 0.5)),
        }
    }
    let text = tok.to_string();
    if g.chance(0.1) {
        let cut = g.draw(0..text.len());
        return text.chars().take(cut).collect();
    }
    text
}

#[test]
fn fuzz_tokenizer() {
    let dir = scratch("tokenizer");
    let path = dir.join("tokenizer.json");
    fuzz("fuzz_tokenizer", |g| {
        let ids: Vec<u32> = (0..g.size(10))
            .map(|_| {
                if g.chance(0.1) {
                    g.pick(&[u32::MAX, 256, 257, 1 << 31])
                } else {
                    g.draw(0..300u32)
                }
            })
            .collect();
        let input = text(g);
        if g.chance(0.3) {
            // The byte-level tokenizer: encode is total, decode of any ids must not panic.
            let encoded = ByteTokenizer.encode(&input);
            let _ = ByteTokenizer.decode(&ids);
            return match encoded
                .iter()
                .find(|&&id| id as usize >= ByteTokenizer.vocab_size())
            {
                Some(id) => Outcome::Wrong(format!("byte id {id}")),
                None => Outcome::Accepted,
            };
        }
        let json = tokenizer_json(g);
        g.show("tokenizer.json", &json);
        std::fs::write(&path, &json).unwrap();
        let eos = g.pick(&[None, Some("<|endoftext|>"), Some("</s>"), Some("")]);
        let tok = match TextTokenizer::from_file(&path, eos) {
            Ok(tok) => tok,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        let _ = tok.decode(&ids);
        Outcome::of(tok.encode(&input), |encoded| {
            match encoded.iter().find(|&&id| id as usize >= tok.vocab_size()) {
                Some(id) => {
                    Outcome::Wrong(format!("id {id} beyond vocab_size {}", tok.vocab_size()))
                }
                None if (tok.eos() as usize) >= tok.vocab_size() => Outcome::Wrong(format!(
                    "eos {} beyond vocab_size {}",
                    tok.eos(),
                    tok.vocab_size()
                )),
                None => Outcome::Accepted,
            }
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
}
