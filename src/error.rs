//! One error type for the whole crate: every variant names the argument and the values involved,
//! so a caller can tell what to fix without reading the source.

use thiserror::Error;

/// Result alias used across the crate.
pub type Result<T, E = HaloError> = std::result::Result<T, E>;

/// Every error of the crate (and of `halo-train`): bad input is reported, never a panic or a NaN.
/// The `Display` text names the argument and the values; match on the variant to react.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum HaloError {
    /// Two arguments that must agree in length do not.
    #[error("length mismatch: `{what}` has {got} elements, expected {expected}")]
    LengthMismatch {
        /// The argument whose length is wrong.
        what: &'static str,
        /// The length it must have (from the other arguments).
        expected: usize,
        /// The length it has.
        got: usize,
    },
    /// A shape argument is invalid on its own (zero vocab, zero rows where rows are required, ...).
    #[error("invalid shape: {0}")]
    InvalidShape(String),
    /// A label is neither in `0..vocab` nor the ignore index.
    #[error("label {label} at row {row} is outside 0..{vocab} and is not the ignore index {ignore_index}")]
    LabelOutOfRange {
        /// The first row with such a label.
        row: usize,
        /// Its label.
        label: i64,
        /// The vocabulary size.
        vocab: usize,
        /// The ignore index of the call.
        ignore_index: i64,
    },
    /// A logit row holds NaN or an infinity.
    #[error("non-finite value in `{what}` at row {row}")]
    NonFinite {
        /// The argument (`"logits"`, `"lse"`, `"policy_logps"`, ...).
        what: &'static str,
        /// The first row (or index) holding a non-finite value.
        row: usize,
    },
    /// The backward's saved lse cannot be the logsumexp of its row's logits: the probabilities
    /// `exp(z − lse)` do not sum to 1 within `cpu::LSE_SUM_TOLERANCE + |lse|·2^-23` (an lse below
    /// the row max, or far above it, or saved for other logits).
    #[error(
        "`lse` = {lse} at row {row} is not the logsumexp of the row's logits: exp(logits - lse) does not sum to 1"
    )]
    InconsistentLse {
        /// The first such row.
        row: usize,
        /// Its lse (without the residual).
        lse: f32,
    },
    /// A gradient does not fit the dtype it is stored in (f16 beyond ±65504, bf16 or f32 beyond
    /// ~±3.4e38): it would be stored as ±inf.
    #[error("`grad_logits` at row {row} overflows {dtype:?} (a value would be stored as +-inf)")]
    GradientOverflow {
        /// The first such row.
        row: usize,
        /// The storage dtype.
        dtype: crate::dtype::DType,
    },
    /// An empty batch, where at least one example is required.
    #[error("empty batch: `{0}` has no elements")]
    EmptyBatch(&'static str),
    /// A KTO batch needs the log-probs of its mismatched (KL) pairs to form the reference point.
    #[error(
        "KTO loss type `{loss_type}` needs KL pairs (mismatched completions) but none were given"
    )]
    MissingKlPairs {
        /// The loss type that needs them (`"kto"`).
        loss_type: &'static str,
    },
    /// A sequence (or pair) with no unmasked tokens where the loss needs at least one.
    #[error("sequence {index} of `{what}` has no tokens (every label is the ignore index)")]
    EmptySequence {
        /// The argument the sequence belongs to (`"chosen_counts"`, ...).
        what: &'static str,
        /// The first such sequence.
        index: usize,
    },
    /// A hyper-parameter is outside its domain.
    #[error("invalid hyper-parameter `{name}` = {value}: {reason}")]
    InvalidHyperParameter {
        /// The hyper-parameter (`"beta"`, `"desirable_weight"`, ...).
        name: &'static str,
        /// Its value.
        value: f64,
        /// The domain it must lie in.
        reason: &'static str,
    },
    /// Settings that cannot be used together (an f-divergence with a loss type that has no f-DPO
    /// form, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An optional argument that this loss type needs was not given (e.g. token counts for IPO).
    #[error("`{what}` is required by {needed_by} but was not given")]
    MissingArgument {
        /// The missing argument.
        what: &'static str,
        /// What needs it (a loss type).
        needed_by: &'static str,
    },
    /// A value that must be a log-probability (≤ 0) is positive.
    #[error("`{what}` at index {index} is {value}, but a log-probability must be <= 0")]
    InvalidLogProb {
        /// The argument.
        what: &'static str,
        /// The first offending index.
        index: usize,
        /// Its value.
        value: f64,
    },
    /// Packed-sequence offsets are not a non-decreasing list starting at 0 and ending at the row count.
    #[error("invalid sequence offsets: {0}")]
    InvalidOffsets(String),
    /// The CUDA backend is unavailable (no driver, no GPU, or the kernels were not compiled).
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// A dataset line is malformed (bad JSON, missing or mistyped field); names the file and 1-based line.
    #[error("{file}:{line}: {reason}")]
    Dataset {
        /// The dataset file.
        file: String,
        /// The 1-based line.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing a file failed (datasets, metrics, checkpoints, plots).
    #[error("I/O error on `{path}`: {reason}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's error.
        reason: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// Misuse of the autograd tape (a variable from another tape, a second backward, ...).
    #[error("autograd: {0}")]
    Autograd(String),
    /// A model checkpoint cannot be read, written or matched to the model (names the tensor).
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A tokenizer cannot be loaded or used (invalid `tokenizer.json`, no end-of-sequence token,
    /// text it cannot encode); names the tokenizer file.
    #[error("tokenizer `{path}`: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}
