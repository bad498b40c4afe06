//! Judge saved checkpoints of a run on its held-out prompts and say what kind of mistakes they make.
//!
//! ```text
//! cargo run --release --example judge_checkpoint -- runs/kto-dpo-seed0 base sft kto dpo
//! ```
//!
//! Reads `<run>/data/eval_prompts.txt` and `<run>/<stage>.safetensors` (byte-level tokenizer) and
//! prints, per stage, the desirable rate and an [`ErrorBreakdown`]: accuracy on prompts whose units
//! column carries vs the others, and the most common wrong answers as offsets from the true sum.
//! A stage the run's manifest (`run.json`) does not record as completed is refused: its file may
//! be from a run that died before finishing.

use std::path::Path;

use halo_train::model::Gpt;
use halo_train::train::evaluate::evaluate;
use halo_train::train::tokenizer::TextTokenizer;
use halo_train::train::{ErrorBreakdown, RunManifest};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: judge_checkpoint <run directory> <stage>... (e.g. runs/x base sft kto)");
        std::process::exit(2);
    }
    if let Err(err) = judge(Path::new(&args[0]), &args[1..]) {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn judge(run: &Path, stages: &[String]) -> halo_kernels::Result<()> {
    let prompts_path = run.join("data/eval_prompts.txt");
    let prompts: Vec<String> = std::fs::read_to_string(&prompts_path)
        .map_err(|e| halo_kernels::HaloError::Io {
            path: prompts_path.display().to_string(),
            reason: e.to_string(),
        })?
        .lines()
        .map(str::to_string)
        .collect();
    let tok = TextTokenizer::Byte;
    for stage in stages {
        RunManifest::require_completed(run, stage)?;
        let model = Gpt::load_safetensors(run.join(format!("{stage}.safetensors")))?;
        let report = evaluate(&model, &tok, &prompts)?;
        let breakdown = ErrorBreakdown::from_report(&report)?;
        println!("{stage}: {:.3} ({breakdown})", report.desirable_rate);
    }
    Ok(())
}
