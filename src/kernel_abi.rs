//! Rust mirror of `kernels/halo_abi.h`: the `#[repr(C)]` structs passed by value to the kernels and
//! the constants that fix their launch geometry. `tests/emulated_abi.rs` checks sizes and field
//! offsets against the C header (compiled into the host emulation).

/// Threads per block of the token-level kernels (forward, backward, backward in place).
pub const TOKEN_THREADS: u32 = 256;
/// Threads per block of the sequence kernels (one block per sequence).
pub const SEQ_THREADS: u32 = 256;
/// Threads of the single block of the loss kernels.
pub const LOSS_THREADS: u32 = 256;

/// Entries of the `status` buffer; fill with [`STATUS_OK`] before a launch.
pub const STATUS_LEN: usize = 8;
/// "No error" value of a status entry (`INT32_MAX`); otherwise an entry holds the first bad row.
pub const STATUS_OK: i32 = i32::MAX;
/// Status slot: a label neither the ignore index nor in `0..vocab`.
pub const STATUS_BAD_LABEL: usize = 0;
/// Status slot: non-finite logits (forward) or lse (backward).
pub const STATUS_NONFINITE: usize = 1;
/// Status slot: non-finite `grad_logp` (backward).
pub const STATUS_NONFINITE_GRAD: usize = 2;
/// Status slot: first pair with a zero token count (DPO, IPO loss).
pub const STATUS_EMPTY_SEQUENCE: usize = 2;
/// Status slot (backward): a NaN / ±inf logit in a counted row.
pub const STATUS_BWD_NONFINITE_LOGITS: usize = 4;
/// Status slot (backward): an lse that is not its row's logsumexp (`Σ p ≠ 1`).
pub const STATUS_BWD_INCONSISTENT_LSE: usize = 5;
/// Status slot (backward): a gradient the storage dtype cannot hold.
pub const STATUS_BWD_OVERFLOW: usize = 6;

/// Shape of a `[rows, vocab]` logits matrix and the row-to-block mapping.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HaloTokenParams {
    /// Rows of the logits (`< 2^31 − 1`).
    pub rows: i64,
    /// Columns of the logits.
    pub vocab: i64,
    /// The label of rows that are not read.
    pub ignore_index: i32,
    /// Power of two in `1..=TOKEN_THREADS`; see [`token_rows_per_block`].
    pub rows_per_block: i32,
}

/// Sequence layout and humanline clamp for the sequence kernels.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HaloSeqParams {
    /// Number of sequences (one block each).
    pub batch: i64,
    /// Rows per sequence (padded layout only).
    pub seq: i64,
    /// The label of rows that are not counted.
    pub ignore_index: i32,
    /// Non-zero: clamp each token's log-ratio to `[clamp_min, clamp_max]`.
    pub use_clamp: i32,
    /// Lower clamp of a token's log-ratio.
    pub clamp_min: f32,
    /// Upper clamp of a token's log-ratio.
    pub clamp_max: f32,
}

/// Humanline backward mask over `n` tokens (`humanline_grad_mask_f32`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HaloClampParams {
    /// Number of tokens.
    pub n: i64,
    /// A token's gradient is zeroed where its log-ratio is below this…
    pub clamp_min: f32,
    /// …or above this.
    pub clamp_max: f32,
}

/// KTO loss type `kto`.
pub const KTO_LOSS_KTO: i32 = 0;
/// KTO loss type `apo_zero_unpaired`.
pub const KTO_LOSS_APO_ZERO_UNPAIRED: i32 = 1;
/// z0 from the KL pairs' log-probs (reduced in the kernel).
pub const KL_FROM_PAIRS: i32 = 0;
/// z0 from an all-reduced `(kl_sum, kl_total)`.
pub const KL_FROM_SUM: i32 = 1;
/// z0 = 0.
pub const KL_ZERO: i32 = 2;

/// Parameters of `kto_loss_f32`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HaloKtoParams {
    /// Examples in the batch (≥ 1).
    pub batch: i32,
    /// KL pairs given (read when `kl_mode` is [`KL_FROM_PAIRS`]).
    pub kl_count: i32,
    /// [`KTO_LOSS_KTO`] or [`KTO_LOSS_APO_ZERO_UNPAIRED`].
    pub loss_type: i32,
    /// [`KL_FROM_PAIRS`], [`KL_FROM_SUM`] or [`KL_ZERO`].
    pub kl_mode: i32,
    /// β.
    pub beta: f32,
    /// λ_D.
    pub desirable_weight: f32,
    /// λ_U.
    pub undesirable_weight: f32,
    /// Σ of the KL log-ratios (read with [`KL_FROM_SUM`]).
    pub kl_sum: f32,
    /// Their count (read with [`KL_FROM_SUM`], > 0).
    pub kl_total: f32,
    /// Padding to a multiple of 8 bytes (0).
    pub _pad: i32,
}

/// Slots of the KTO kernel's `out` array.
pub mod kto_out {
    /// Mean loss.
    pub const LOSS: usize = 0;
    /// The reference point used.
    pub const Z0: usize = 1;
    /// Σ of the KL pairs' log-ratios (pairs mode; else `kl_sum`), before the clamp at 0.
    pub const KL_SUM: usize = 2;
    /// Number of KL pairs reduced (pairs mode; else `kl_total`).
    pub const KL_COUNT: usize = 3;
    /// Σ of the desirable examples' rewards.
    pub const CHOSEN_REWARD_SUM: usize = 4;
    /// Σ of the undesirable examples' rewards.
    pub const REJECTED_REWARD_SUM: usize = 5;
    /// Number of desirable examples.
    pub const CHOSEN_COUNT: usize = 6;
    /// Number of undesirable examples.
    pub const REJECTED_COUNT: usize = 7;
    /// Σ of the desirable examples' policy log-probs.
    pub const CHOSEN_LOGP_SUM: usize = 8;
    /// Σ of the undesirable examples' policy log-probs.
    pub const REJECTED_LOGP_SUM: usize = 9;
    /// Length of the array (two slots reserved).
    pub const LEN: usize = 12;
}

/// DPO loss type `sigmoid` (cDPO with label smoothing).
pub const DPO_LOSS_SIGMOID: i32 = 0;
/// DPO loss type `robust`.
pub const DPO_LOSS_ROBUST: i32 = 1;
/// DPO loss type `hinge` (SLiC).
pub const DPO_LOSS_HINGE: i32 = 2;
/// DPO loss type `ipo` (length-normalised log-probs).
pub const DPO_LOSS_IPO: i32 = 3;
/// DPO loss type `apo_zero`.
pub const DPO_LOSS_APO_ZERO: i32 = 4;
/// DPO loss type `apo_down`.
pub const DPO_LOSS_APO_DOWN: i32 = 5;
/// DPO loss type `exo_pair`.
pub const DPO_LOSS_EXO_PAIR: i32 = 6;
/// DPO loss type `nca_pair`.
pub const DPO_LOSS_NCA_PAIR: i32 = 7;
/// DPO loss type `bco_pair`.
pub const DPO_LOSS_BCO_PAIR: i32 = 8;
/// DPO loss type `sppo_hard`.
pub const DPO_LOSS_SPPO_HARD: i32 = 9;
/// DPO loss type `aot` (sorts over the batch: needs the kernel's `order` scratch).
pub const DPO_LOSS_AOT: i32 = 10;
/// DPO loss type `aot_unpaired` (sorts over the batch: needs the kernel's `order` scratch).
pub const DPO_LOSS_AOT_UNPAIRED: i32 = 11;
/// DPO loss type `discopop`.
pub const DPO_LOSS_DISCOPOP: i32 = 12;
/// DPO loss type `sft` (reads the chosen token counts).
pub const DPO_LOSS_SFT: i32 = 13;
/// DPO loss type `sigmoid_norm` (the logistic loss on length-normalised log-ratios).
pub const DPO_LOSS_SIGMOID_NORM: i32 = 14;
/// f-DPO divergence: reverse KL (DPO; the score is the log-ratio itself).
pub const DPO_F_REVERSE_KL: i32 = 0;
/// f-DPO divergence: forward KL (`1 − e^{−u}`).
pub const DPO_F_FORWARD_KL: i32 = 1;
/// f-DPO divergence: Jensen-Shannon (`log 2 + logσ(u)`).
pub const DPO_F_JS_DIVERGENCE: i32 = 2;
/// f-DPO divergence: α (`(e^{(α−1)u} − 1)/(α − 1)`, exponent clamped at 80).
pub const DPO_F_ALPHA: i32 = 3;

/// Parameters of `dpo_loss_f32`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HaloDpoParams {
    /// Pairs in the batch (≥ 1).
    pub pairs: i32,
    /// One of the `DPO_LOSS_*` codes.
    pub loss_type: i32,
    /// β.
    pub beta: f32,
    /// ε (sigmoid, robust, exo_pair, aot, aot_unpaired; else 0).
    pub label_smoothing: f32,
    /// DiscoPOP's τ (discopop; else 0).
    pub discopop_tau: f32,
    /// One of the `DPO_F_*` codes: f-DPO's score of a log-ratio.
    pub f_divergence: i32,
    /// α of [`DPO_F_ALPHA`] (else 0).
    pub f_alpha: f32,
    /// Padding to a multiple of 8 bytes (0).
    pub _pad: i32,
}

/// Slots of the DPO kernel's `out` array.
pub mod dpo_out {
    /// Mean loss.
    pub const LOSS: usize = 0;
    /// Σ of the chosen rewards.
    pub const CHOSEN_REWARD_SUM: usize = 1;
    /// Σ of the rejected rewards.
    pub const REJECTED_REWARD_SUM: usize = 2;
    /// Pairs whose chosen reward is strictly above the rejected one.
    pub const ACCURACY_COUNT: usize = 3;
    /// Σ of the reward margins.
    pub const MARGIN_SUM: usize = 4;
    /// Σ of the chosen policy log-probs (per token for IPO).
    pub const CHOSEN_LOGP_SUM: usize = 5;
    /// Σ of the rejected policy log-probs (per token for IPO).
    pub const REJECTED_LOGP_SUM: usize = 6;
    /// Length of the array (one slot reserved).
    pub const LEN: usize = 8;
}

/// Rows handled by one block of a token kernel: each row gets the smallest power of two of threads
/// that is at least `vocab / 32` (about 32 elements per thread), clamped to `4..=TOKEN_THREADS`.
/// Same rule as `halo_token_rows_per_block` in `halo_abi.h`.
pub fn token_rows_per_block(vocab: usize) -> i32 {
    let mut threads_per_row = 4usize;
    while threads_per_row < TOKEN_THREADS as usize && threads_per_row * 32 < vocab {
        threads_per_row *= 2;
    }
    (TOKEN_THREADS as usize / threads_per_row) as i32
}

/// Grid size (blocks) of a token kernel over `rows` rows.
pub fn token_grid(rows: usize, rows_per_block: i32) -> u32 {
    rows.div_ceil(rows_per_block as usize) as u32
}

// SAFETY: plain-old-data `#[repr(C)]` structs of fixed-width fields, passed by value to kernels.
unsafe impl cudarc::driver::DeviceRepr for HaloTokenParams {}
unsafe impl cudarc::driver::DeviceRepr for HaloSeqParams {}
unsafe impl cudarc::driver::DeviceRepr for HaloClampParams {}
unsafe impl cudarc::driver::DeviceRepr for HaloKtoParams {}
unsafe impl cudarc::driver::DeviceRepr for HaloDpoParams {}
