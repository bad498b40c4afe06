//! Safetensors save/load: round trips in f32 and bf16, Hugging Face naming, and refusals.

use std::collections::HashMap;
use std::path::PathBuf;

mod checkpoint_support;

use checkpoint_support::{as_raw, write_raw};
use halo_kernels::HaloError;
use halo_train::model::GptWeights;
use halo_train::model::{DTypeOnDisk, Gpt, GptConfig};
use safetensors::SafeTensors;

fn config() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        vocab_size: 13,
        n_ctx: 7,
        dropout: 0.0,
    }
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "halo_ckpt_{}_{name}.safetensors",
        std::process::id()
    ))
}

const IDS: [u32; 6] = [1, 5, 12, 0, 7, 3];

#[test]
fn f32_round_trip_is_exact() {
    let model = Gpt::new(config(), 1).unwrap();
    let path = temp_path("f32");
    model.save_safetensors(&path, DTypeOnDisk::F32).unwrap();
    let loaded = Gpt::load_safetensors(&path).unwrap();
    assert_eq!(loaded, model);
    assert_eq!(
        loaded.logits_inference(&IDS, 1, 6).unwrap(),
        model.logits_inference(&IDS, 1, 6).unwrap()
    );
    // The file uses Hugging Face names and carries the config.
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("transformer.h.1.attn.c_attn.weight")
            .unwrap()
            .shape(),
        &[8, 24]
    );
    assert_eq!(st.len(), model.parameters().len());
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["format"], "pt");
    assert!(meta["halo_gpt_config"].contains("\"n_layer\":2"));
    std::fs::remove_file(path).ok();
}

#[test]
fn bf16_round_trip_is_close() {
    let model = Gpt::new(config(), 2).unwrap();
    let path = temp_path("bf16");
    model.save_safetensors(&path, DTypeOnDisk::BF16).unwrap();
    let f32_path = temp_path("bf16_vs_f32");
    model.save_safetensors(&f32_path, DTypeOnDisk::F32).unwrap();
    let (bf16_len, f32_len) = (
        std::fs::metadata(&path).unwrap().len(),
        std::fs::metadata(&f32_path).unwrap().len(),
    );
    // Two bytes saved per value, up to small header differences.
    assert!(
        bf16_len + 2 * model.num_parameters() as u64 <= f32_len + 512,
        "{bf16_len} vs {f32_len}"
    );
    std::fs::remove_file(f32_path).ok();
    let loaded = Gpt::load_safetensors(&path).unwrap();
    for (a, b) in loaded.parameters().iter().zip(model.parameters()) {
        for (&x, &y) in a.data.iter().zip(&b.data) {
            assert_eq!(x, half::bf16::from_f32(y).to_f32(), "{}", a.name);
        }
    }
    let (la, lb) = (
        loaded.logits_inference(&IDS, 1, 6).unwrap(),
        model.logits_inference(&IDS, 1, 6).unwrap(),
    );
    assert_ne!(la, lb);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-2 * (1.0 + y.abs()), "{x} vs {y}");
    }
    std::fs::remove_file(path).ok();
}

#[test]
fn wrong_shape_is_refused_naming_the_tensor() {
    let model = Gpt::new(config(), 3).unwrap();
    let mut raw = as_raw(&model);
    let bad = raw
        .iter_mut()
        .find(|(n, _, _)| n == "transformer.h.1.mlp.c_fc.weight")
        .unwrap();
    bad.1 = vec![32, 8]; // transposed: nn.Linear layout instead of Conv1D
    let path = temp_path("shape");
    write_raw(&path, &raw, None);
    let err = Gpt::load_safetensors_with_config(&path, config()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HaloError::Checkpoint(_)));
    assert!(
        msg.contains("transformer.h.1.mlp.c_fc.weight")
            && msg.contains("[32, 8]")
            && msg.contains("[8, 32]"),
        "{msg}"
    );
    std::fs::remove_file(path).ok();
}

#[test]
fn missing_tensor_is_refused() {
    let model = Gpt::new(config(), 4).unwrap();
    let mut raw = as_raw(&model);
    raw.retain(|(n, _, _)| n != "transformer.h.0.ln_2.bias");
    let path = temp_path("missing");
    let meta = HashMap::from([(
        "halo_gpt_config".to_string(),
        serde_json::to_string(&config()).unwrap(),
    )]);
    write_raw(&path, &raw, Some(meta));
    let err = Gpt::load_safetensors(&path).unwrap_err();
    assert!(
        err.to_string()
            .contains("missing tensor `transformer.h.0.ln_2.bias`"),
        "{err}"
    );
    std::fs::remove_file(path).ok();
}

#[test]
fn mismatched_config_is_refused() {
    let model = Gpt::new(config(), 5).unwrap();
    let path = temp_path("config");
    model.save_safetensors(&path, DTypeOnDisk::F32).unwrap();
    let other = GptConfig {
        n_head: 4,
        ..config()
    };
    let err = Gpt::load_safetensors_with_config(&path, other).unwrap_err();
    assert!(
        matches!(err, HaloError::Checkpoint(ref m) if m.contains("does not match")),
        "{err}"
    );
    assert_eq!(
        Gpt::load_safetensors_with_config(&path, config()).unwrap(),
        model
    );
    assert!(matches!(
        Gpt::load_safetensors(temp_path("nonexistent")),
        Err(HaloError::Checkpoint(_))
    ));
    std::fs::write(&path, b"not a safetensors file").unwrap();
    assert!(matches!(
        Gpt::load_safetensors(&path),
        Err(HaloError::Checkpoint(_))
    ));
    std::fs::remove_file(path).ok();
}

#[test]
fn hugging_face_layout_without_prefix_or_metadata_loads() {
    // Shaped like `gpt2/model.safetensors`: no `transformer.` prefix, causal-mask buffers, no config.
    let cfg = GptConfig {
        n_layer: 1,
        n_head: 1,
        n_embd: 64,
        vocab_size: 10,
        n_ctx: 4,
        dropout: 0.0,
    };
    let model = Gpt::new(cfg, 6).unwrap();
    let mut raw: Vec<_> = as_raw(&model)
        .into_iter()
        .map(|(n, s, d)| (n.strip_prefix("transformer.").unwrap().to_string(), s, d))
        .collect();
    raw.push(("h.0.attn.bias".into(), vec![1, 1, 4, 4], vec![1.0; 16]));
    raw.push(("lm_head.weight".into(), vec![10, 64], raw[0].2.clone()));
    let path = temp_path("hf");
    write_raw(&path, &raw, None);
    let loaded = Gpt::load_safetensors(&path).unwrap();
    assert_eq!(loaded.config(), &cfg);
    assert_eq!(loaded, model);
    std::fs::remove_file(path).ok();
}

#[test]
fn tensors_of_a_deeper_model_are_refused() {
    let deep = GptConfig {
        n_layer: 3,
        ..config()
    };
    let model = Gpt::new(deep, 7).unwrap();
    let path = temp_path("deeper");
    write_raw(&path, &as_raw(&model), None);
    let err = Gpt::load_safetensors_with_config(&path, config()).unwrap_err();
    assert!(
        err.to_string()
            .contains("unexpected tensor `transformer.h.2."),
        "{err}"
    );
    std::fs::remove_file(path).ok();
}
