//! End-to-end training driver: the crate's own ops train a small GPT from scratch (pretraining on
//! mixed-quality text, SFT on the desirable completions) and then align it with KTO (and DPO for
//! comparison) on a task whose judge is a program, so the gain can be measured.
//!
//! `cargo run --release --example train_kto` runs the whole pipeline; see `docs/RESULTS.md`.

pub mod arithmetic_task;
pub mod batching;
pub mod bitmap_font;
pub mod data;
pub mod metrics_log;
pub mod plot;
pub mod tokenizer;

pub use arithmetic_task::{judge, ArithmeticTask, TaskData, Verdict};
pub use batching::{
    kl_partners, kto_batch, token_batch, EpochSampler, KtoBatch, TargetSpan, TokenBatch,
};
pub use data::{
    load_jsonl, parse_jsonl, to_unpaired, PairedExample, PreferenceRow, UnpairedExample,
};
pub use metrics_log::{MetricRecord, MetricsLog};
pub use tokenizer::ByteTokenizer;
