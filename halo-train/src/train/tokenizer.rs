//! Tokenizers of the training driver.
//!
//! - [`ByteTokenizer`], the default: token `b` (0..=255) is the byte `b` of the UTF-8 text, and one
//!   extra token, [`ByteTokenizer::EOS`] = 256, ends a completion and also opens every sequence
//!   (GPT-2 uses its `<|endoftext|>` the same way), so the first prompt token has something to
//!   condition on. No download, no vocabulary file, and every string round-trips exactly.
//! - A Hugging Face `tokenizer.json` (`--tokenizer <PATH>`), read with the `tokenizers` crate.
//!   Its end-of-sequence token (`--eos-token`, or the first of [`EOS_CANDIDATES`] in the
//!   vocabulary) plays the byte tokenizer's EOS role. Text is encoded as the file says
//!   (normalizer, pre-tokenizer, unknown tokens: a BPE model without `unk_token` drops characters
//!   outside its vocabulary).
//!
//! [`TextTokenizer`] is the one the pipeline takes: either of the two.
//!
//! Every sequence is `[EOS] prompt completion [EOS]`, with the prompt and the completion encoded
//! **separately** and concatenated, so the completion starts at a token boundary. With a
//! byte-level or character-level tokenizer this is exactly the encoding of the joined text. With a
//! BPE (or other subword) tokenizer it can differ: given a merge `=8`, the joined `"23+58=81"`
//! ends in `"=8" "1"`, while `"23+58="` + `"81"` ends in `"=" "81"` — the model trains on the
//! latter, and evaluation decodes whatever it samples. TRL's trainers handle that boundary (they
//! tokenize the joined text and re-align the prompt); this driver does not, so byte- or
//! character-level tokenizers are the exact choice here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use halo_kernels::error::{HaloError, Result};

/// The byte-level tokenizer (vocabulary of 257 ids).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// End-of-sequence (and start-of-sequence) token id.
    pub const EOS: u32 = 256;

    /// 256 byte tokens + EOS.
    pub fn vocab_size(&self) -> usize {
        257
    }

    /// The bytes of `text`, one id per byte (no special tokens added).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// The text of `ids`, stopping at the first EOS. Bytes that are not valid UTF-8 (a model can
    /// emit any byte sequence) become U+FFFD, so the judge sees them as garbage, not a panic.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .take_while(|&&id| id != Self::EOS)
            // Ids above 256 do not exist; they map to 0xFF, which is never valid UTF-8.
            .map(|&id| id.min(255) as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// End-of-sequence tokens looked up, in this order, when `--eos-token` is not given.
pub const EOS_CANDIDATES: [&str; 4] = ["<|endoftext|>", "</s>", "<eos>", "<|eos|>"];

/// The tokenizer of a training run: the byte-level default or a Hugging Face `tokenizer.json`.
#[derive(Clone, Default)]
pub enum TextTokenizer {
    /// [`ByteTokenizer`]: 257 ids, EOS = 256.
    #[default]
    Byte,
    /// A Hugging Face tokenizer and the id of its end-of-sequence token.
    HuggingFace {
        /// The loaded tokenizer, padding and truncation switched off.
        inner: Box<tokenizers::Tokenizer>,
        /// Id of the end-of-sequence token (also used as start token and padding).
        eos: u32,
        /// Ids the model embeds: one past the largest id, at least the vocabulary size.
        vocab_size: usize,
        /// Where it was loaded from (for error messages).
        path: PathBuf,
    },
}

impl fmt::Debug for TextTokenizer {
    // The Hugging Face tokenizer's own `Debug` prints its whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Byte => f.write_str("Byte"),
            Self::HuggingFace {
                eos,
                vocab_size,
                path,
                ..
            } => f
                .debug_struct("HuggingFace")
                .field("path", path)
                .field("vocab_size", vocab_size)
                .field("eos", eos)
                .finish_non_exhaustive(),
        }
    }
}

impl TextTokenizer {
    /// The tokenizer the flags ask for: the byte-level one without `tokenizer_json`, else
    /// [`TextTokenizer::from_file`]. An `eos_token` without a `tokenizer_json` is an error (the
    /// byte tokenizer's EOS is a fixed id, not a string).
    pub fn from_flags(tokenizer_json: Option<&Path>, eos_token: Option<&str>) -> Result<Self> {
        match (tokenizer_json, eos_token) {
            (Some(path), eos) => Self::from_file(path, eos),
            (None, None) => Ok(Self::Byte),
            (None, Some(eos)) => Err(HaloError::Tokenizer {
                path: "<byte-level>".into(),
                reason: format!(
                    "--eos-token {eos:?} needs --tokenizer: the byte-level tokenizer's EOS is id {}",
                    ByteTokenizer::EOS
                ),
            }),
        }
    }

    /// Loads a Hugging Face `tokenizer.json`. Its end-of-sequence token is `eos_token` when given,
    /// else the first of [`EOS_CANDIDATES`] in the vocabulary. Padding and truncation settings
    /// saved in the file are switched off (batching pads and truncates itself).
    ///
    /// Errors: [`HaloError::Io`] when the file cannot be read, [`HaloError::Tokenizer`] when it is
    /// not a tokenizer the `tokenizers` crate can load or has no such end-of-sequence token.
    pub fn from_file(path: &Path, eos_token: Option<&str>) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| HaloError::Io {
            path: path.display().to_string(),
            reason: format!("cannot read the tokenizer file: {e}"),
        })?;
        let error = |reason: String| HaloError::Tokenizer {
            path: path.display().to_string(),
            reason,
        };
        // `tokenizers` panics (`expect("Helper")`) on some malformed `decoder` values, a
        // truncated file among them: check the JSON syntax first, then catch what is left.
        serde_json::from_str::<serde_json::Value>(&json).map_err(|e| {
            error(format!(
                "not a valid Hugging Face tokenizer.json (invalid JSON): {e}"
            ))
        })?;
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_str(&json)).map_err(
            |panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                error(format!(
                    "not a valid Hugging Face tokenizer.json (the tokenizers crate panicked: \
                     {what})"
                ))
            },
        )?;
        let mut inner = parsed.map_err(|e| {
            error(format!(
                "not a valid Hugging Face tokenizer.json (JSON or model): {e}"
            ))
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| error(format!("cannot switch truncation off: {e}")))?;
        let eos = match eos_token {
            Some(token) => inner.token_to_id(token).ok_or_else(|| {
                error(format!(
                    "the end-of-sequence token {token:?} (--eos-token) is not in the vocabulary"
                ))
            })?,
            None => EOS_CANDIDATES
                .iter()
                .find_map(|token| inner.token_to_id(token))
                .ok_or_else(|| {
                    error(format!(
                        "no end-of-sequence token found: none of {EOS_CANDIDATES:?} is in the \
                         vocabulary; name it with --eos-token"
                    ))
                })?,
        };
        let vocab = inner.get_vocab(true);
        // Ids need not be contiguous: the model needs a row for the largest one.
        let vocab_size = vocab
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0)
            .max(vocab.len());
        Ok(Self::HuggingFace {
            inner: Box::new(inner),
            eos,
            vocab_size,
            path: path.to_path_buf(),
        })
    }

    /// End-of-sequence (and start-of-sequence, and padding) token id.
    pub fn eos(&self) -> u32 {
        match self {
            Self::Byte => ByteTokenizer::EOS,
            Self::HuggingFace { eos, .. } => *eos,
        }
    }

    /// Number of ids the model must embed: the vocabulary including added (special) tokens.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Byte => ByteTokenizer.vocab_size(),
            Self::HuggingFace { vocab_size, .. } => *vocab_size,
        }
    }

    /// The ids of `text`, without special tokens (no BOS/EOS added by a post-processor).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Byte => Ok(ByteTokenizer.encode(text)),
            Self::HuggingFace { inner, path, .. } => inner
                .encode(text, false)
                .map(|encoding| encoding.get_ids().to_vec())
                .map_err(|e| HaloError::Tokenizer {
                    path: path.display().to_string(),
                    reason: format!("cannot encode {text:?}: {e}"),
                }),
        }
    }

    /// The text of `ids`, stopping at the first EOS; special tokens are skipped. What cannot be
    /// decoded becomes U+FFFD, which the judge sees as garbage.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Self::Byte => ByteTokenizer.decode(ids),
            Self::HuggingFace { inner, eos, .. } => {
                let end = ids.iter().position(|id| id == eos).unwrap_or(ids.len());
                inner
                    .decode(&ids[..end], true)
                    .unwrap_or_else(|_| "\u{fffd}".to_string())
            }
        }
    }
}
