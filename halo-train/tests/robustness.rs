//! Untrusted sizes, bad weights and bad flags become clear `HaloError`s, never a panic, an abort
//! (allocation) or a silent NaN. Every input here is small: nothing allocates more than kilobytes.

use std::collections::HashMap;
use std::path::PathBuf;

mod checkpoint_support;

use checkpoint_support::{as_raw, write_raw};
use clap::Parser;
use halo_kernels::HaloError;
use halo_train::model::config::{MAX_CONFIG_DIM, MAX_PARAMETERS};
use halo_train::model::GptWeights;
use halo_train::model::{DTypeOnDisk, Gpt, GptConfig, Sampling};
use halo_train::train::TrainArgs;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn config() -> GptConfig {
    GptConfig {
        n_layer: 1,
        n_head: 2,
        n_embd: 8,
        vocab_size: 11,
        n_ctx: 6,
        dropout: 0.0,
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("halo_robust_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn expect_err<T: std::fmt::Debug>(result: halo_kernels::error::Result<T>) -> String {
    match result {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.to_string(),
    }
}

// ---- 1. sizes from untrusted input ----

#[test]
fn config_validate_bounds_each_size() {
    config().validate().unwrap();
    for field in 0..5 {
        let mut c = config();
        let huge = 1usize << 40;
        match field {
            0 => c.n_layer = huge,
            1 => c.n_head = huge,
            2 => c.n_embd = huge,
            3 => c.vocab_size = huge,
            _ => c.n_ctx = huge,
        }
        let msg = expect_err(c.validate());
        assert!(msg.contains("MAX_CONFIG_DIM"), "{msg}");
    }
    let mut at_limit = config();
    at_limit.n_ctx = MAX_CONFIG_DIM;
    at_limit.validate().unwrap();
    at_limit.n_ctx = MAX_CONFIG_DIM + 1;
    assert!(at_limit.validate().is_err());
}

#[test]
fn config_validate_bounds_the_parameter_count() {
    // Every size within MAX_CONFIG_DIM, but 12·n_embd²·n_layer is far above MAX_PARAMETERS.
    let c = GptConfig {
        n_layer: 1 << 20,
        n_head: 1,
        n_embd: 1 << 20,
        vocab_size: 1,
        n_ctx: 1,
        dropout: 0.0,
    };
    let msg = expect_err(c.validate());
    assert!(msg.contains("MAX_PARAMETERS"), "{msg}");
    // Overflowing usize is reported as such, not wrapped.
    let c = GptConfig {
        n_embd: usize::MAX / 2,
        ..config()
    };
    assert_eq!(c.num_parameters(), None);
    // The count is exact for a real model.
    let model = Gpt::new(config(), 0).unwrap();
    assert_eq!(config().num_parameters(), Some(model.num_parameters()));
    assert!(model.num_parameters() <= MAX_PARAMETERS);
}

#[test]
fn checkpoint_with_huge_n_ctx_in_metadata_is_refused_before_allocating() {
    let dir = temp_dir("huge_ctx");
    let path = dir.join("tiny.safetensors");
    let huge = GptConfig {
        n_ctx: 1 << 40,
        ..config()
    };
    let metadata = HashMap::from([(
        "halo_gpt_config".to_string(),
        serde_json::to_string(&huge).unwrap(),
    )]);
    write_raw(
        &path,
        &[("wte.weight".into(), vec![1, 2], vec![0.0, 0.0])],
        Some(metadata),
    );
    assert!(std::fs::metadata(&path).unwrap().len() < 400);
    let msg = expect_err(Gpt::load_safetensors(&path));
    assert!(msg.contains("n_ctx"), "{msg}");
    // The caller-given config path validates too.
    let msg = expect_err(Gpt::load_safetensors_with_config(&path, huge));
    assert!(msg.contains("n_ctx"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoint_config_json_with_huge_sizes_is_refused() {
    let dir = temp_dir("huge_hf");
    write_raw(
        &dir.join("model.safetensors"),
        &[("wte.weight".into(), vec![1, 2], vec![0.0, 0.0])],
        None,
    );
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"gpt2","n_positions":1099511627776,"n_embd":64,"n_head":1,"n_layer":1,"vocab_size":5}"#,
    )
    .unwrap();
    let msg = expect_err(Gpt::load_pretrained(&dir));
    assert!(msg.contains("n_ctx"), "{msg}");
    // n_inner with a huge n_embd: no overflow of 4 · n_embd.
    let text = format!(r#"{{"n_embd":{},"n_head":1,"n_inner":4}}"#, usize::MAX / 2);
    assert!(GptConfig::from_hf_config_json(&text).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn overflowing_batch_times_seq_is_an_error() {
    let model = Gpt::new(config(), 0).unwrap();
    let msg = expect_err(model.logits_inference(&[], 1 << 63, 2));
    assert!(msg.contains("overflows"), "{msg}");
    let msg = expect_err(model.token_logprobs_inference(&[], &[], 1 << 63, 2));
    assert!(msg.contains("overflows"), "{msg}");
    // Ordinary sizes still work.
    assert_eq!(model.logits_inference(&[1, 2], 1, 2).unwrap().len(), 2 * 11);
}

// ---- 2. the loader and generate ----

#[test]
fn loader_refuses_non_finite_weights_naming_tensor_and_index() {
    let dir = temp_dir("nan");
    for (bad, label) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let mut model = Gpt::new(config(), 1).unwrap();
        for (name, data) in model.parameters_mut() {
            if name == "transformer.h.0.mlp.c_fc.bias" {
                data[5] = bad;
            }
        }
        let path = dir.join(format!("{label}.safetensors"));
        model.save_safetensors(&path, DTypeOnDisk::F32).unwrap();
        let msg = expect_err(Gpt::load_safetensors(&path));
        assert!(
            msg.contains("transformer.h.0.mlp.c_fc.bias") && msg.contains("index 5"),
            "{msg}"
        );
        assert!(msg.contains("non-finite"), "{msg}");
    }
    // A finite model still loads.
    let model = Gpt::new(config(), 1).unwrap();
    let path = dir.join("ok.safetensors");
    model.save_safetensors(&path, DTypeOnDisk::F32).unwrap();
    assert_eq!(Gpt::load_safetensors(&path).unwrap(), model);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loader_refuses_a_tensor_under_both_names() {
    let dir = temp_dir("dup");
    let model = Gpt::new(config(), 2).unwrap();
    let mut tensors = as_raw(&model);
    let wpe = tensors
        .iter()
        .find(|t| t.0 == "transformer.wpe.weight")
        .unwrap()
        .clone();
    tensors.push(("wpe.weight".into(), wpe.1, wpe.2));
    let path = dir.join("dup.safetensors");
    write_raw(&path, &tensors, None);
    let msg = expect_err(Gpt::load_safetensors(&path));
    assert!(
        msg.contains("`wpe.weight`") && msg.contains("`transformer.wpe.weight`"),
        "{msg}"
    );
    let msg = expect_err(Gpt::load_safetensors_with_config(&path, config()));
    assert!(msg.contains("wpe.weight"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn logits_inference_refuses_logits_that_overflow_from_finite_weights() {
    // Found by fuzz_load_safetensors: finite weights of 3e38 load (they are finite) but the
    // forward overflows f32; the logits must be refused, not returned as inf/NaN.
    let mut model = Gpt::new(config(), 5).unwrap();
    for (name, data) in model.parameters_mut() {
        if name == "lm_head.weight" || name == "transformer.wte.weight" {
            data.iter_mut().for_each(|w| *w = 3e38);
        }
    }
    let err = model.logits_inference(&[1, 2], 1, 2).unwrap_err();
    assert!(
        matches!(
            err,
            HaloError::NonFinite {
                what: "logits",
                row: 0
            }
        ),
        "{err}"
    );
}

#[test]
fn generate_refuses_non_finite_logits() {
    let mut model = Gpt::new(config(), 3).unwrap();
    for (name, data) in model.parameters_mut() {
        if name == "transformer.ln_f.bias" {
            data[0] = f32::NAN;
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for sampling in [
        Sampling::Greedy,
        Sampling::TopK {
            k: 3,
            temperature: 1.0,
        },
    ] {
        let err = model
            .generate(&[1, 2], 3, sampling, &mut rng, None)
            .unwrap_err();
        assert!(
            matches!(err, HaloError::NonFinite { what: "logits", .. }),
            "{err}"
        );
    }
    // Finite weights generate as before.
    let model = Gpt::new(config(), 3).unwrap();
    let out = model
        .generate(&[1, 2], 3, Sampling::Greedy, &mut rng, None)
        .unwrap();
    assert_eq!(out.len(), 3);
}

// ---- 3. flags, through the parse + validate the binary does ----

fn validate(flags: &[&str]) -> halo_kernels::error::Result<()> {
    let args = TrainArgs::try_parse_from(std::iter::once("train_kto").chain(flags.iter().copied()))
        .unwrap_or_else(|e| panic!("{flags:?} should parse: {e}"));
    args.validate()
}

#[test]
fn default_flags_validate() {
    validate(&[]).unwrap();
    validate(&["--run-dpo", "--beta", "0.1", "--desirable-weight", "2"]).unwrap();
}

#[test]
fn kto_and_dpo_hyper_parameters_are_checked_up_front() {
    for (flags, name) in [
        (&["--beta", "0"][..], "beta"),
        (&["--beta=-1"], "beta"),
        (&["--beta", "NaN"], "beta"),
        (&["--beta", "inf"], "beta"),
        (&["--desirable-weight=-1"], "desirable_weight"),
        (&["--desirable-weight", "NaN"], "desirable_weight"),
        (&["--undesirable-weight=-0.5"], "undesirable_weight"),
        (&["--undesirable-weight", "inf"], "undesirable_weight"),
        (&["--weight-ratio", "0"], "weight_ratio"),
        (&["--weight-ratio=-2"], "weight_ratio"),
        (&["--weight-ratio", "NaN"], "weight_ratio"),
        (&["--weight-ratio", "1e300"], "weight_ratio"),
    ] {
        let msg = expect_err(validate(flags));
        assert!(msg.contains(&format!("`{name}`")), "{flags:?}: {msg}");
    }
}

#[test]
fn every_trl_dpo_loss_type_is_a_flag_value_and_its_hyper_parameters_are_checked() {
    use halo_kernels::losses::DpoLossType;
    for loss_type in DpoLossType::ALL {
        // TRL's spelling and the kebab-case one both parse, to the same loss.
        let trl = loss_type.name();
        let kebab = trl.replace('_', "-");
        for spelling in [trl, kebab.as_str()] {
            let args = TrainArgs::try_parse_from([
                "train_kto",
                "--run-dpo",
                "--dpo-loss-type",
                spelling,
                "--dpo-label-smoothing",
                "0.001",
            ])
            .unwrap_or_else(|e| panic!("{spelling}: {e}"));
            assert_eq!(args.dpo_config().loss_type, loss_type, "{spelling}");
            args.validate()
                .unwrap_or_else(|e| panic!("{spelling} with eps 0.001: {e}"));
        }
    }
    assert!(TrainArgs::try_parse_from(["train_kto", "--dpo-loss-type", "aot_pair"]).is_err());
    for (flags, name) in [
        // EXO takes log(eps): TRL refuses 0 as well.
        (
            &["--run-dpo", "--dpo-loss-type", "exo_pair"][..],
            "label_smoothing",
        ),
        (
            &[
                "--run-dpo",
                "--dpo-loss-type",
                "robust",
                "--dpo-label-smoothing",
                "0.5",
            ],
            "label_smoothing",
        ),
        (
            &["--run-dpo", "--dpo-label-smoothing", "NaN"],
            "label_smoothing",
        ),
        (
            &["--run-dpo", "--dpo-label-smoothing=-0.1"],
            "label_smoothing",
        ),
        (
            &[
                "--run-dpo",
                "--dpo-loss-type",
                "discopop",
                "--discopop-tau",
                "0",
            ],
            "discopop_tau",
        ),
        (
            &[
                "--run-dpo",
                "--dpo-loss-type",
                "discopop",
                "--discopop-tau",
                "inf",
            ],
            "discopop_tau",
        ),
    ] {
        let msg = expect_err(validate(flags));
        assert!(msg.contains(&format!("`{name}`")), "{flags:?}: {msg}");
    }
    // f-DPO: TRL's names, a finite α, and only with loss types that have a form for it.
    for f in [
        "forward_kl",
        "js-divergence",
        "alpha_divergence",
        "reverse-kl",
    ] {
        validate(&["--run-dpo", "--f-divergence", f, "--dpo-loss-type", "ipo"]).unwrap();
    }
    let msg = expect_err(validate(&[
        "--run-dpo",
        "--f-divergence",
        "forward_kl",
        "--dpo-loss-type",
        "nca_pair",
    ]));
    assert!(
        msg.contains("nca_pair") && msg.contains("forward_kl"),
        "{msg}"
    );
    let msg = expect_err(validate(&[
        "--run-dpo",
        "--f-divergence",
        "alpha_divergence",
        "--f-alpha-divergence-coef",
        "NaN",
    ]));
    assert!(msg.contains("`f_alpha_divergence_coef`"), "{msg}");
    // Without --run-dpo the DPO flags are not used, and not refused.
    validate(&["--dpo-loss-type", "exo_pair"]).unwrap();
}

#[test]
fn sample_temperature_and_n_eval_are_checked() {
    for t in ["0", "NaN", "-1", "inf"] {
        let flag = format!("--sample-temperature={t}");
        let msg = expect_err(validate(&[&flag]));
        assert!(msg.contains("sample_temperature"), "{t}: {msg}");
    }
    let msg = expect_err(validate(&["--n-eval", "0"]));
    assert!(msg.contains("n_eval"), "{msg}");
    // More held-out prompts than the task has.
    assert!(validate(&["--operand-limit", "10", "--n-eval", "51"]).is_err());
}

#[test]
fn numeric_flags_have_upper_bounds() {
    for (flags, name) in [
        (&["--operand-limit", "100000"][..], "operand_limit"),
        (&["--operand-limit", "4294967296"], "operand_limit"),
        (&["--operand-limit", "1"], "operand_limit"),
        (&["--n-embd", "1048576", "--n-head", "1"], "n_embd"),
        (
            &["--n-embd", "8192", "--n-head", "1", "--n-layer", "128"],
            "num_parameters",
        ),
        (
            &["--n-embd", "4096", "--n-head", "1", "--n-layer", "16"],
            "2^28 parameters",
        ),
        (&["--n-layer", "1000000"], "n_layer"),
        (&["--n-head", "1000000"], "n_head"),
        (&["--pretrain-lines", "100000000000"], "pretrain_lines"),
        (&["--sft-lines", "100000000000"], "sft_lines"),
        (
            &["--samples-per-prompt", "1000000000000"],
            "samples_per_prompt",
        ),
        (&["--batch-size", "100000000000"], "batch_size"),
        (
            &["--pretrain-batch-size", "100000000000"],
            "pretrain_batch_size",
        ),
        (&["--pretrain-steps", "100000000000"], "pretrain_steps"),
        (&["--kto-steps", "100000000000"], "kto_steps"),
        (&["--n-eval", "100000000000"], "n_eval"),
        (&["--evals-per-stage", "100000000000"], "evals_per_stage"),
        (&["--carry-error-rate", "1.5"], "carry_error_rate"),
        (&["--noise-rate", "NaN"], "noise_rate"),
    ] {
        let msg = expect_err(validate(flags));
        assert!(msg.contains(name), "{flags:?}: {msg}");
    }
    // n_head must still divide n_embd.
    assert!(validate(&["--n-embd", "130", "--n-head", "4"]).is_err());
}

/// The issue's CLI aborts (exit 134) came from `run` starting work before the flags were checked:
/// through `run` itself, each flag is an error before anything is written, and the run directory
/// is not even created.
#[test]
fn run_refuses_the_issues_abort_flags_before_any_work() {
    let dir = temp_dir("run_flags");
    for flags in [
        &["--operand-limit", "100000"][..],
        &["--operand-limit", "4294967296"],
        &["--n-embd", "1048576", "--n-head", "1"],
        &["--pretrain-lines", "100000000000"],
        &["--samples-per-prompt", "1000000000000"],
        &["--beta", "NaN"],
        &["--sample-temperature=-1"],
        &["--n-eval", "0"],
    ] {
        let out = dir.join("run");
        let out_flag = out.display().to_string();
        let args = TrainArgs::try_parse_from(
            ["train_kto", "--output-dir", &out_flag]
                .into_iter()
                .chain(flags.iter().copied()),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let err = halo_train::train::run(&args, false).unwrap_err();
        assert!(
            matches!(err, HaloError::InvalidHyperParameter { .. }),
            "{flags:?}: {err}"
        );
        assert!(!out.exists(), "{flags:?} created {}", out.display());
        assert!(started.elapsed().as_secs() < 5, "{flags:?} started work");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--pretrain-lines 1e11` as typed in the issue: not a `usize`, so a clean parse error.
#[test]
fn exponent_notation_for_a_count_flag_is_a_parse_error() {
    for flags in [
        &["--pretrain-lines", "1e11"][..],
        &["--samples-per-prompt", "1e12"],
        &["--operand-limit", "-1"],
    ] {
        let parsed =
            TrainArgs::try_parse_from(std::iter::once("train_kto").chain(flags.iter().copied()));
        assert!(parsed.is_err(), "{flags:?} parsed");
    }
}

// ---- 4. what the fuzz targets found (halo-train/tests/fuzz_train.rs) ----

/// `tokenizers` panics (`expect("Helper")` in its decoder deserializer) on a truncated
/// tokenizer.json and on a non-object `decoder`: `TextTokenizer::from_file` must give a
/// `Tokenizer` error naming the file instead (found by `fuzz_tokenizer`).
#[test]
fn malformed_tokenizer_json_is_an_error_not_a_panic() {
    use halo_train::train::tokenizer::TextTokenizer;
    let dir = temp_dir("tokenizer");
    let path = dir.join("tokenizer.json");
    let valid = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":2,"content":"<|endoftext|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":{"type":"Fuse"},"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,"vocab":{"a":0,"b":1,"<|endoftext|>":2},"merges":[]}}"#;
    std::fs::write(&path, valid).unwrap();
    let tok = TextTokenizer::from_file(&path, None).unwrap();
    assert_eq!(tok.encode("ab").unwrap(), vec![0, 1]);
    let truncated = &valid[..valid.find(r#""decoder":{"ty"#).unwrap() + 14];
    let non_object_decoder = valid.replace(r#"{"type":"Fuse"}"#, "5");
    for text in [truncated, non_object_decoder.as_str()] {
        std::fs::write(&path, text).unwrap();
        match TextTokenizer::from_file(&path, None) {
            Err(HaloError::Tokenizer { path: p, reason }) => {
                assert!(p.ends_with("tokenizer.json"), "{p}");
                assert!(reason.contains("not a valid"), "{reason}");
            }
            other => panic!("{text}: {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Hostile safetensors headers: a header length of u64::MAX or past the end, and a shape whose
/// element count overflows, are checkpoint errors (no allocation of the stated size, no panic).
#[test]
fn hostile_safetensors_headers_are_errors() {
    let dir = temp_dir("headers");
    let path = dir.join("h.safetensors");
    let header = |json: &str| {
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend(json.as_bytes());
        file.extend([0u8; 8]);
        file
    };
    let mut huge_len = header("{}");
    huge_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut past_end = header("{}");
    past_end[..8].copy_from_slice(&1000u64.to_le_bytes());
    let overflow = header(
        r#"{"wte.weight":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
    );
    let wrong_size =
        header(r#"{"wte.weight":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,8]}}"#);
    for (bytes, case) in [
        (huge_len, "header length u64::MAX"),
        (past_end, "header length past the end"),
        (overflow, "shape product overflows"),
        (wrong_size, "shape of 2^40 elements over 8 bytes"),
    ] {
        std::fs::write(&path, bytes).unwrap();
        let err = Gpt::load_safetensors(&path).unwrap_err();
        assert!(matches!(err, HaloError::Checkpoint(_)), "{case}: {err}");
        let err = Gpt::load_safetensors_with_config(&path, config()).unwrap_err();
        assert!(matches!(err, HaloError::Checkpoint(_)), "{case}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
