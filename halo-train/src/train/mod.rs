//! End-to-end training driver: the crate's own ops train a small GPT from scratch (pretraining on
//! mixed-quality text, SFT on the desirable completions) and then align it with KTO (and DPO for
//! comparison) on a task whose judge is a program, so the gain can be measured.
//!
//! `cargo run --release --example train_kto` runs [`pipeline::run`]; see `docs/RESULTS.md`.
//!
//! - [`data`]: TRL-format JSONL (unpaired / paired) loading and conversion.
//! - [`tokenizer`]: byte-level tokenizer (default) or a Hugging Face `tokenizer.json`.
//! - [`arithmetic_task`]: the built-in task, its data sets and the judge.
//! - [`batching`]: padded token batches, KTO KL pairs, DPO pair batches, epoch sampler.
//! - [`nll`], [`kto`], [`dpo`]: one training step of each stage.
//! - [`stage`]: the loop shared by the stages (clip, AdamW, log, progress bar, periodic eval);
//!   [`trainee`]: the model and optimizer it trains, on the CPU or on a CUDA device;
//!   [`step_output`]: what a step hands over (gradients, and a loss on the host or the device).
//! - [`stage_checkpoint`]: a stage's periodic checkpoint (weights, AdamW state, data position).
//! - [`run_dir`]: the run directory's rules (empty, `--overwrite`, `--resume`) and its manifest.
//! - [`error_analysis`]: carrying vs other prompts, the most common wrong answers.
//! - [`evaluate`]: batched greedy / sampled decoding + judge → desirable rate.
//! - [`on_policy`]: judge-labelled preference pairs sampled from the starting model.
//! - [`metrics_log`], [`plot`], [`bitmap_font`]: metrics JSONL and the PNG of the curves.
//! - [`config`]: command-line flags; [`pipeline`]: the whole run.

pub mod arithmetic_task;
pub mod batching;
pub mod bitmap_font;
pub mod config;
pub mod data;
mod device_step;
pub mod dpo;
pub mod error_analysis;
pub mod evaluate;
pub mod kto;
pub mod metrics_log;
pub mod nll;
pub mod on_policy;
pub mod pipeline;
pub mod plot;
pub mod run_dir;
pub mod stage;
pub mod stage_checkpoint;
pub mod step_output;
pub mod tokenizer;
pub mod trainee;

pub use arithmetic_task::{judge, ArithmeticTask, TaskData, Verdict};
pub use batching::{
    kl_partners, kto_batch, token_batch, EpochSampler, KtoBatch, TargetSpan, TokenBatch,
};
pub use config::TrainArgs;
pub use data::{
    load_jsonl, parse_jsonl, to_unpaired, PairedExample, PreferenceRow, UnpairedExample,
};
pub use error_analysis::ErrorBreakdown;
pub use metrics_log::{MetricRecord, MetricsLog};
pub use pipeline::{run, RunSummary};
pub use run_dir::{RunDir, RunManifest};
pub use tokenizer::{ByteTokenizer, TextTokenizer};
