//! `--tokenizer <tokenizer.json>`: a Hugging Face tokenizer written by the test (character-level
//! BPE over the arithmetic alphabet) loads, round-trips, finds its EOS, fails clearly on bad input,
//! batches as `[EOS] prompt completion [EOS]`, and trains end to end; the byte-level default is
//! unchanged.

use std::path::{Path, PathBuf};

use clap::Parser;
use halo_kernels::{HaloError, IGNORE_INDEX};
use halo_train::model::Gpt;
use halo_train::train::{run, token_batch, ByteTokenizer, TargetSpan, TextTokenizer, TrainArgs};
use serde_json::{json, Value};

mod train_support;
use train_support::{assert_full_summary_line, tiny_run_args};

/// Ids of the test vocabulary: `'0'..='9'` → 0..=9, `+` → 10, `=` → 11, `<|endoftext|>` → 12.
const PLUS: u32 = 10;
const EQUALS: u32 = 11;
const ENDOFTEXT: u32 = 12;

/// A fresh directory for one test.
fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "halo-train-tokenizer-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An added special token, as `tokenizers` serializes it.
fn special(id: u32, content: &str) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": true
    })
}

/// A character-level BPE tokenizer.json (no merges, so every character is one token; the `Fuse`
/// decoder joins tokens without spaces) over digits, `+`, `=`, with `special_tokens` added.
fn char_bpe_json(special_tokens: &[(u32, &str)]) -> Value {
    let mut vocab = serde_json::Map::new();
    for (id, c) in "0123456789+=".chars().enumerate() {
        vocab.insert(c.to_string(), json!(id));
    }
    for &(id, token) in special_tokens {
        vocab.insert(token.to_string(), json!(id));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": special_tokens.iter().map(|&(id, t)| special(id, t)).collect::<Vec<_>>(),
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": { "type": "Fuse" },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    })
}

fn write(dir: &Path, name: &str, json: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(json).unwrap()).unwrap();
    path
}

/// The arithmetic tokenizer with `<|endoftext|>` = 12, written to `dir/tokenizer.json`.
fn arithmetic_tokenizer(dir: &Path) -> PathBuf {
    write(
        dir,
        "tokenizer.json",
        &char_bpe_json(&[(ENDOFTEXT, "<|endoftext|>")]),
    )
}

#[test]
fn char_level_tokenizer_round_trips_arithmetic_and_stops_at_eos() {
    let dir = test_dir("roundtrip");
    let tok = TextTokenizer::from_file(&arithmetic_tokenizer(&dir), None).unwrap();
    let ids = tok.encode("23+58=").unwrap();
    assert_eq!(ids, vec![2, 3, PLUS, 5, 8, EQUALS]);
    assert_eq!(tok.decode(&ids), "23+58=");
    // No special tokens are added by encode.
    assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
    // Decoding stops at EOS, as for the byte tokenizer.
    assert_eq!(tok.decode(&[8, 1, ENDOFTEXT, 3, 3]), "81");
    assert_eq!(tok.decode(&[ENDOFTEXT]), "");
    assert_eq!(tok.eos(), ENDOFTEXT);
    // 12 characters + the added `<|endoftext|>`.
    assert_eq!(tok.vocab_size(), 13);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gpt2_style_byte_level_bpe_applies_its_merges_and_round_trips() {
    let dir = test_dir("bytelevel");
    // GPT-2's pre-tokenizer (its regex needs look-ahead: the fancy-regex backend) and decoder,
    // with one merge `8 1` -> `81` (id 13).
    let mut json = char_bpe_json(&[(ENDOFTEXT, "<|endoftext|>")]);
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    json["pre_tokenizer"] = byte_level.clone();
    json["decoder"] = byte_level;
    json["model"]["vocab"]["81"] = json!(13);
    json["model"]["merges"] = json!(["8 1"]);
    let path = write(&dir, "byte-level-bpe.json", &json);
    let tok = TextTokenizer::from_file(&path, None).unwrap();
    assert_eq!(tok.encode("58+81=").unwrap(), vec![5, 8, PLUS, 13, EQUALS]);
    assert_eq!(tok.decode(&[5, 8, PLUS, 13, EQUALS, ENDOFTEXT]), "58+81=");
    assert_eq!(tok.decode(&[13, ENDOFTEXT, 1]), "81");
    assert_eq!((tok.vocab_size(), tok.eos()), (14, ENDOFTEXT));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn vocab_size_counts_added_tokens_and_covers_the_largest_id() {
    let dir = test_dir("vocab");
    // An added token after a gap in the ids: the model needs rows up to id 40.
    let path = write(
        &dir,
        "gap.json",
        &char_bpe_json(&[(ENDOFTEXT, "<|endoftext|>"), (40, "<pad>")]),
    );
    let tok = TextTokenizer::from_file(&path, None).unwrap();
    assert_eq!(tok.vocab_size(), 41);
    // Other special tokens are skipped when decoding.
    assert_eq!(tok.decode(&[4, 40, 2]), "42");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eos_is_the_first_known_end_token_or_the_one_named_by_the_flag() {
    let dir = test_dir("eos");
    // `</s>` is found when `<|endoftext|>` is absent; `<eos>` comes later in the list.
    let path = write(
        &dir,
        "s.json",
        &char_bpe_json(&[(12, "<eos>"), (13, "</s>")]),
    );
    assert_eq!(TextTokenizer::from_file(&path, None).unwrap().eos(), 13);
    // `--eos-token` picks any token of the vocabulary, through the command line.
    let args = TrainArgs::parse_from([
        "train_kto",
        "--tokenizer",
        path.to_str().unwrap(),
        "--eos-token",
        "<eos>",
    ]);
    assert_eq!(args.tokenizer.as_deref(), Some(path.as_path()));
    let tok =
        TextTokenizer::from_flags(args.tokenizer.as_deref(), args.eos_token.as_deref()).unwrap();
    assert_eq!(tok.eos(), 12);
    // Decoding now stops at `<eos>`, not `</s>` (which is only skipped).
    assert_eq!(tok.decode(&[1, 13, 2, 12, 3]), "12");
    // `--eos-token` alone makes no sense for the byte tokenizer.
    assert!(TrainArgs::try_parse_from(["train_kto", "--eos-token", "</s>"]).is_err());
    assert!(matches!(
        TextTokenizer::from_flags(None, Some("</s>")),
        Err(HaloError::Tokenizer { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn byte_level_default_is_unchanged() {
    let args = TrainArgs::default();
    assert_eq!(args.tokenizer, None);
    assert_eq!(args.eos_token, None);
    let tok = TextTokenizer::from_flags(None, None).unwrap();
    assert!(matches!(tok, TextTokenizer::Byte));
    assert_eq!(tok.eos(), 256);
    assert_eq!(tok.vocab_size(), 257);
    for text in ["23+58=", "héllo \u{1F600}", ""] {
        assert_eq!(tok.encode(text).unwrap(), ByteTokenizer.encode(text));
    }
    assert_eq!(
        tok.decode(&[b'8' as u32, b'1' as u32, 256, b'9' as u32]),
        "81"
    );
}

/// The error's message, checked to name `path` and contain every one of `words`.
fn assert_message(err: &HaloError, path: &Path, words: &[&str]) {
    let message = err.to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "{message:?} does not name {path:?}"
    );
    for word in words {
        assert!(message.contains(word), "{message:?} lacks {word:?}");
    }
}

#[test]
fn loading_fails_clearly_on_a_missing_file_bad_json_or_no_eos() {
    let dir = test_dir("errors");

    let missing = dir.join("does-not-exist.json");
    let err = TextTokenizer::from_file(&missing, None).unwrap_err();
    assert!(matches!(err, HaloError::Io { .. }), "{err:?}");
    assert_message(&err, &missing, &["cannot read the tokenizer file"]);

    let truncated = dir.join("truncated.json");
    std::fs::write(&truncated, "{\"version\": \"1.0\", \"model\": {").unwrap();
    let err = TextTokenizer::from_file(&truncated, None).unwrap_err();
    assert!(matches!(err, HaloError::Tokenizer { .. }), "{err:?}");
    assert_message(
        &err,
        &truncated,
        &["not a valid Hugging Face tokenizer.json"],
    );

    // Valid JSON, but not a tokenizer the crate knows.
    let mut unknown_model = char_bpe_json(&[(ENDOFTEXT, "<|endoftext|>")]);
    unknown_model["model"]["type"] = json!("NoSuchModel");
    let path = write(&dir, "unknown-model.json", &unknown_model);
    let err = TextTokenizer::from_file(&path, None).unwrap_err();
    assert!(matches!(err, HaloError::Tokenizer { .. }), "{err:?}");
    assert_message(&err, &path, &["not a valid Hugging Face tokenizer.json"]);

    // No end-of-sequence token among the known names.
    let path = write(&dir, "no-eos.json", &char_bpe_json(&[(12, "<pad>")]));
    let err = TextTokenizer::from_file(&path, None).unwrap_err();
    assert!(matches!(err, HaloError::Tokenizer { .. }), "{err:?}");
    assert_message(
        &err,
        &path,
        &[
            "no end-of-sequence token",
            "<|endoftext|>",
            "</s>",
            "--eos-token",
        ],
    );
    // ... and an `--eos-token` that is not in the vocabulary.
    let err = TextTokenizer::from_file(&path, Some("<|im_end|>")).unwrap_err();
    assert!(matches!(err, HaloError::Tokenizer { .. }), "{err:?}");
    assert_message(&err, &path, &["<|im_end|>", "not in the vocabulary"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn text_the_tokenizer_cannot_encode_is_an_error_naming_it() {
    let dir = test_dir("encode");
    // Word-level, one word per character, and no `<unk>`: a letter cannot be encoded.
    let mut json = char_bpe_json(&[(ENDOFTEXT, "<|endoftext|>")]);
    json["pre_tokenizer"] = json!({
        "type": "Split", "pattern": { "Regex": "." }, "behavior": "Isolated", "invert": false
    });
    json["model"] = json!({
        "type": "WordLevel", "vocab": json["model"]["vocab"].clone(), "unk_token": "<unk>"
    });
    let path = write(&dir, "wordlevel.json", &json);
    let tok = TextTokenizer::from_file(&path, None).unwrap();
    assert_eq!(tok.encode("7+35=").unwrap(), vec![7, PLUS, 3, 5, EQUALS]);
    assert_eq!(tok.decode(&[4, 2, ENDOFTEXT]), "42");
    let err = tok.encode("7+x=").unwrap_err();
    assert!(matches!(err, HaloError::Tokenizer { .. }), "{err:?}");
    assert_message(&err, &path, &["\"7+x=\""]);
    // A batch containing it fails instead of training on a silently altered text.
    assert!(token_batch(&tok, &[("7+x=", "1")], TargetSpan::CompletionOnly, 16).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn batches_are_eos_prompt_completion_eos_in_the_tokenizers_ids() {
    let dir = test_dir("batch");
    let tok = TextTokenizer::from_file(&arithmetic_tokenizer(&dir), None).unwrap();
    let b = token_batch(
        &tok,
        &[("23+58=", "81"), ("1+2=", "3")],
        TargetSpan::CompletionOnly,
        32,
    )
    .unwrap();
    assert_eq!((b.batch, b.seq), (2, 10));
    let e = ENDOFTEXT;
    assert_eq!(&b.input_ids[..10], &[e, 2, 3, PLUS, 5, 8, EQUALS, 8, 1, e]);
    // Padding is the EOS id too.
    assert_eq!(&b.input_ids[10..], &[e, 1, PLUS, 2, EQUALS, 3, e, e, e, e]);
    let i = IGNORE_INDEX;
    assert_eq!(&b.targets[..10], &[i, i, i, i, i, i, 8, 1, e as i32, i]);
    assert_eq!(&b.targets[10..], &[i, i, i, i, 3, e as i32, i, i, i, i]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tiny_end_to_end_run_with_a_hugging_face_tokenizer() {
    let dir = test_dir("run");
    let tokenizer = arithmetic_tokenizer(&dir);
    let out = dir.join("run");
    let args = TrainArgs {
        tokenizer: Some(tokenizer.clone()),
        ..tiny_run_args(&out)
    };
    let summary = run(&args, false).unwrap();
    assert_full_summary_line(&summary.summary_line());
    // The model's vocabulary is the tokenizer's (13 ids), not the byte tokenizer's 257.
    for stage in ["base", "sft", "kto", "dpo"] {
        let model = Gpt::load_safetensors(out.join(format!("{stage}.safetensors"))).unwrap();
        assert_eq!(model.config().vocab_size, 13, "{stage}");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("eval/desirable_rate"));

    // A byte-level run cannot start from this run's 13-id base model.
    let byte_level = TrainArgs {
        output_dir: Some(dir.join("from-base")),
        tokenizer: None,
        init_from: Some(out.clone()),
        run_dpo: false,
        ..args
    };
    let err = run(&byte_level, false).unwrap_err();
    assert!(
        matches!(&err, HaloError::Checkpoint(m) if m.contains("13") && m.contains("257")),
        "{err:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
