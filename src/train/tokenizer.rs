//! Byte-level tokenizer: token `b` (0..=255) is the byte `b` of the UTF-8 text, and one extra
//! token, [`ByteTokenizer::EOS`] = 256, ends a completion and also opens every sequence (GPT-2
//! uses its `<|endoftext|>` the same way), so the first prompt token has something to condition on.
//! No download, no vocabulary file, and every string round-trips exactly.

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
