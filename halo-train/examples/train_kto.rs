//! Train a small GPT from scratch on CPU and align it with KTO — no GPU, no download.
//!
//! ```text
//! cargo run --release --example train_kto                 # pretrain → SFT → KTO
//! cargo run --release --example train_kto -- --run-dpo    # + DPO from the same SFT model
//! cargo run --release --example train_kto -- --help       # every flag
//! ```
//!
//! Writes `runs/<name>/` (metrics.jsonl, *.safetensors per stage, training_curves.png, data/)
//! and ends with one line: `desirable_rate base=<a> sft=<x> kto=<y>[ dpo=<z>]`.

use clap::Parser;
use halo_train::train::{run, TrainArgs};

fn main() {
    let args = TrainArgs::parse();
    match run(&args, true) {
        Ok(summary) => {
            let sampled = summary.sample_desirable_rate.map_or(String::new(), |r| {
                format!(", judge accepted {r:.3} of the samples")
            });
            eprintln!(
                "run directory: {} ({:.0} s; {} preference rows{sampled}; KTO weights lambda_D={:.3} lambda_U={:.3})",
                summary.output_dir.display(),
                summary.seconds,
                summary.n_preference_rows,
                summary.kto_weights.0,
                summary.kto_weights.1
            );
            for (stage, breakdown) in &summary.error_breakdowns {
                eprintln!("{stage:>4}: {breakdown}");
            }
            println!("{}", summary.summary_line());
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    }
}
