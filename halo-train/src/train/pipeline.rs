//! The whole run: generate the task data (written to the run directory as JSONL and read back
//! through the loader), pretrain a small GPT on mixed-quality text (base), SFT it on desirable
//! completions, align it with KTO against a frozen copy of the SFT model, optionally run DPO from
//! the same start, checkpoint every stage, plot the curves, and summarise.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::arithmetic_task::ArithmeticTask;
use super::batching::{dpo_batch, kto_batch, token_batch, EpochSampler, TargetSpan};
use super::config::{KtoData, PreferenceSource, TrainArgs};
use super::data::{
    io_error, keep_desirable_fraction, load_jsonl, paired_only, to_unpaired, write_jsonl,
    PreferenceRow,
};
use super::dpo::dpo_step;
use super::error_analysis::ErrorBreakdown;
use super::evaluate::evaluate;
use super::kto::{kto_step, precompute_reference_logps};
use super::metrics_log::MetricsLog;
use super::nll::nll_step;
use super::on_policy::{sample_preferences, SamplingPlan};
use super::plot::plot_training;
use super::run_dir::RunDir;
use super::stage::{run_stage, PeriodicCheckpoints, StageContext, StageSpec};
use super::stage_checkpoint::StageCheckpoint;
use super::tokenizer::TextTokenizer;
use crate::autograd::Device;
use crate::model::atomic_file::{write_atomically, write_bytes_atomically};
use crate::model::optim::{AdamWConfig, LrSchedule};
use crate::model::{DTypeOnDisk, Gpt, GptConfig, ModelRef};
use halo_kernels::error::{HaloError, Result};
use halo_kernels::losses::KtoConfig;

/// Context length of the model: enough for `[EOS] a+b=c [EOS]` with operands up to 10^6.
pub const N_CTX: usize = 24;

/// Desirable rates (held-out prompts, greedy, judged) at the end of each stage.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Desirable rate of the base (pretrained, or `--init-from`) model.
    pub base: f64,
    /// `None` with `--skip-sft`.
    pub sft: Option<f64>,
    /// Desirable rate after the KTO stage.
    pub kto: f64,
    /// `Some` with `--run-dpo`.
    pub dpo: Option<f64>,
    /// Fraction of the starting model's samples the judge accepted (sampled preference data).
    pub sample_desirable_rate: Option<f64>,
    /// Preference pairs (or unpaired rows) the alignment stages trained on.
    pub n_preference_rows: usize,
    /// λ_D, λ_U actually used.
    pub kto_weights: (f64, f64),
    /// Per stage (`base`, `sft`, `kto`, `dpo`): what kind of mistakes its greedy answers make.
    pub error_breakdowns: Vec<(&'static str, ErrorBreakdown)>,
    /// The run directory (checkpoints, data, `metrics.jsonl`, plot, `summary.txt`).
    pub output_dir: PathBuf,
    /// Wall-clock duration of the whole run, in seconds.
    pub seconds: f64,
}

impl RunSummary {
    /// The one-line summary: `desirable_rate base=<a> sft=<x> kto=<y>` (+ ` dpo=<z>`); `sft=skipped`
    /// with `--skip-sft`.
    pub fn summary_line(&self) -> String {
        let sft = self
            .sft
            .map_or("skipped".to_string(), |v| format!("{v:.3}"));
        let mut line = format!(
            "desirable_rate base={:.3} sft={sft} kto={:.3}",
            self.base, self.kto
        );
        if let Some(dpo) = self.dpo {
            line.push_str(&format!(" dpo={dpo:.3}"));
        }
        line
    }
}

fn checkpoint(model: &Gpt, dir: &Path, stage: &str) -> Result<()> {
    model.save_safetensors(dir.join(format!("{stage}.safetensors")), DTypeOnDisk::F32)
}

/// Writes the stage file `<stage>.safetensors` and then records the stage in the manifest.
fn complete_stage(
    run_dir: &mut RunDir,
    log: &mut MetricsLog,
    model: &Gpt,
    stage: &str,
) -> Result<()> {
    if run_dir.completed(stage).is_some() {
        return Ok(()); // read back by a resumed run: already on disk
    }
    checkpoint(model, run_dir.path(), stage)?;
    run_dir.complete_stage(stage, log, None)
}

/// The model a completed stage saved (exact: f32 on disk).
fn load_completed(dir: &Path, stage: &str) -> Result<Gpt> {
    Gpt::load_safetensors(dir.join(format!("{stage}.safetensors")))
}

/// [`write_jsonl`], atomically.
fn write_rows(path: &Path, rows: &[PreferenceRow]) -> Result<()> {
    write_atomically(path, |temp| write_jsonl(temp, rows))
}

/// Runs every stage as `args` says and returns the summary; prints nothing but the progress bars
/// (when `progress` is set).
///
/// The run directory is opened by [`RunDir::open`] (empty, `--overwrite` or `--resume`). Every
/// file is written atomically; each completed stage is recorded in the manifest, and the running
/// stage saves its state every `--checkpoint-every` steps. With `--resume`, completed stages are
/// read back (and re-evaluated, which is deterministic), the running stage continues from its
/// periodic checkpoint, and the run ends with the summary an uninterrupted run gives.
pub fn run(args: &TrainArgs, progress: bool) -> Result<RunSummary> {
    let started = Instant::now();
    args.validate()?;
    // First: a missing GPU is an error before any work (or file) is made.
    let device = args.device.open()?;
    let tok = TextTokenizer::from_flags(args.tokenizer.as_deref(), args.eos_token.as_deref())?;
    let out_dir = args.resolved_output_dir();
    let mut run_dir = RunDir::open(&out_dir, args)?;
    std::fs::create_dir_all(out_dir.join("data")).map_err(|e| io_error(&out_dir, e))?;
    if !run_dir.resumed() {
        write_bytes_atomically(&out_dir.join("args.txt"), format!("{args:#?}\n").as_bytes())?;
    }

    // ---- data ----
    let task = ArithmeticTask {
        operand_limit: args.operand_limit,
        carry_error_rate: args.carry_error_rate,
        noise_rate: args.noise_rate,
        n_eval: args.n_eval,
        n_pretrain: args.pretrain_lines,
        n_sft: args.sft_lines,
        ..ArithmeticTask::default()
    };
    let data = task.generate(args.seed)?;
    let sft_path = out_dir.join("data/sft.jsonl");
    write_rows(&sft_path, &data.sft)?;
    let eval_path = out_dir.join("data/eval_prompts.txt");
    write_bytes_atomically(&eval_path, (data.eval_prompts.join("\n") + "\n").as_bytes())?;
    let sft_examples: Vec<(String, String)> = load_jsonl(&sft_path)?
        .into_iter()
        .filter_map(|row| match row {
            PreferenceRow::Unpaired(e) if e.desirable => Some((e.prompt, e.completion)),
            _ => None,
        })
        .collect();
    // ---- model ----
    let mut model = Gpt::new(
        GptConfig {
            n_layer: args.n_layer,
            n_head: args.n_head,
            n_embd: args.n_embd,
            vocab_size: tok.vocab_size(),
            n_ctx: N_CTX,
            dropout: 0.0,
        },
        args.seed,
    )?;
    // ---- where a resumed run continues: the running stage's periodic checkpoint, if any ----
    let resume_path = run_dir.resume_file();
    let mut pending = None;
    if run_dir.resumed() {
        if let Some(saved) = StageCheckpoint::load(&resume_path)? {
            if run_dir.completed(saved.saved_as()).is_none() {
                pending = Some(saved);
            } else {
                // Its stage completed after it was taken: stale.
                std::fs::remove_file(&resume_path).map_err(|e| io_error(&resume_path, e))?;
            }
        }
    }
    let keep = pending
        .as_ref()
        .map_or(run_dir.completed_metrics_records(), |c| c.metrics_records());
    let mut log = run_dir.metrics_log(keep)?;
    let mut ctx = StageContext {
        log: &mut log,
        tokenizer: &tok,
        eval_prompts: &data.eval_prompts,
        evals_per_stage: args.evals_per_stage,
        progress,
        checkpoints: Some(PeriodicCheckpoints {
            path: resume_path.clone(),
            every: args.checkpoint_every,
        }),
        resume_from: pending.map(|c| (resume_path.clone(), c)),
        device: device.clone(),
    };
    let adamw = |lr: f32, weight_decay: f32| AdamWConfig {
        lr,
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay,
    };

    // ---- base: language modelling on the mixed-quality text ----
    let mut sampler = EpochSampler::new(data.pretrain.len(), args.seed ^ 1)?;
    let spec = StageSpec {
        name: "pretrain",
        steps: args.pretrain_steps,
        schedule: LrSchedule::cosine(
            args.pretrain_lr,
            args.pretrain_lr * 0.1,
            args.pretrain_steps / 20,
            args.pretrain_steps,
        ),
        optimizer: adamw(args.pretrain_lr, 0.01),
        first_global_step: 0,
        batch_size: args.pretrain_batch_size,
        saved_as: "base",
    };
    let base_eval = if run_dir.completed("base").is_some() {
        model = load_completed(&out_dir, "base")?;
        evaluate(&model, &tok, &data.eval_prompts)?
    } else if let Some(dir) = &args.init_from {
        model = Gpt::load_safetensors(dir.join("base.safetensors"))?;
        if model.config().vocab_size != tok.vocab_size() {
            return Err(HaloError::Checkpoint(format!(
                "{}/base.safetensors has a vocabulary of {} ids but the tokenizer has {} \
                 (--init-from needs the same --tokenizer)",
                dir.display(),
                model.config().vocab_size,
                tok.vocab_size()
            )));
        }
        evaluate(&model, &tok, &data.eval_prompts)?
    } else {
        run_stage(&spec, &mut model, &mut ctx, &mut sampler, |m, indices| {
            let rows: Vec<(&str, &str)> = indices
                .iter()
                .map(|&i| (data.pretrain[i].0.as_str(), data.pretrain[i].1.as_str()))
                .collect();
            nll_step(
                &m,
                &token_batch(&tok, &rows, TargetSpan::Everything, N_CTX)?,
            )
        })?
        .final_eval
    };
    let base_rate = base_eval.desirable_rate;
    let mut breakdowns = vec![("base", ErrorBreakdown::from_report(&base_eval)?)];
    complete_stage(&mut run_dir, ctx.log, &model, "base")?;
    let mut global = args.pretrain_steps;

    // ---- SFT: NLL on the desirable completions only ----
    let sft_rate = if args.skip_sft {
        None
    } else {
        if sft_examples.is_empty() {
            return Err(HaloError::Dataset {
                file: sft_path.display().to_string(),
                line: 0,
                reason: "no desirable line to train SFT on (raise --sft-lines or use --skip-sft)"
                    .into(),
            });
        }
        let mut sampler = EpochSampler::new(sft_examples.len(), args.seed ^ 2)?;
        let lr = args.pretrain_lr * 0.3;
        let spec = StageSpec {
            name: "sft",
            steps: args.sft_steps,
            schedule: LrSchedule::cosine(lr, lr * 0.1, args.sft_steps / 20, args.sft_steps),
            optimizer: adamw(lr, 0.01),
            first_global_step: global,
            batch_size: args.pretrain_batch_size,
            saved_as: "sft",
        };
        let sft_eval = if run_dir.completed("sft").is_some() {
            model = load_completed(&out_dir, "sft")?;
            evaluate(&model, &tok, &data.eval_prompts)?
        } else {
            let result = run_stage(&spec, &mut model, &mut ctx, &mut sampler, |m, indices| {
                let rows: Vec<(&str, &str)> = indices
                    .iter()
                    .map(|&i| (sft_examples[i].0.as_str(), sft_examples[i].1.as_str()))
                    .collect();
                nll_step(
                    &m,
                    &token_batch(&tok, &rows, TargetSpan::CompletionOnly, N_CTX)?,
                )
            })?;
            complete_stage(&mut run_dir, ctx.log, &model, "sft")?;
            result.final_eval
        };
        global += args.sft_steps;
        breakdowns.push(("sft", ErrorBreakdown::from_report(&sft_eval)?));
        Some(sft_eval.desirable_rate)
    };

    // ---- preference data: judge-labelled samples of the starting model (or synthetic / a file) ----
    let generated_prefs = out_dir.join("data/preferences.jsonl");
    let prefs_path = args.preferences.clone().unwrap_or(generated_prefs.clone());
    let sample_rate = if let Some(done) = run_dir.completed("preferences") {
        done.value_bits.map(f64::from_bits)
    } else {
        let mut sample_rate = None;
        if args.preferences.is_none() {
            let rows = match args.preference_data {
                PreferenceSource::Synthetic => data.preferences.clone(),
                PreferenceSource::Sampled => {
                    let prompts: Vec<String> = data
                        .preferences
                        .iter()
                        .map(|row| match row {
                            PreferenceRow::Paired(p) => p.prompt.clone(),
                            PreferenceRow::Unpaired(e) => e.prompt.clone(),
                        })
                        .collect();
                    let sampled = sample_preferences(
                        &model,
                        &tok,
                        &prompts,
                        SamplingPlan {
                            samples_per_prompt: args.samples_per_prompt,
                            temperature: args.sample_temperature,
                            seed: args.seed ^ 5,
                        },
                    )?;
                    sample_rate = Some(sampled.sample_desirable_rate);
                    write_rows(&out_dir.join("data/samples.jsonl"), &sampled.all_samples)?;
                    sampled.pairs
                }
            };
            write_rows(&generated_prefs, &rows)?;
        }
        run_dir.complete_stage("preferences", ctx.log, sample_rate)?;
        sample_rate
    };
    let preference_rows = load_jsonl(&prefs_path)?;
    if preference_rows.len() < 2 {
        return Err(HaloError::Dataset {
            file: prefs_path.display().to_string(),
            line: 0,
            reason: format!(
                "only {} preference rows: the starting model produced too few prompts with both a \
                 correct and a wrong sample (train it longer, raise --samples-per-prompt, or use \
                 --preference-data synthetic)",
                preference_rows.len()
            ),
        });
    }
    // KTO reads the pairs unpaired (the same data DPO gets), or, with `--kto-data all-samples`,
    // every judged sample — data DPO cannot use (prompts whose samples all agree).
    let kto_rows = match args.kto_data {
        KtoData::Pairs => preference_rows.clone(),
        KtoData::AllSamples => load_jsonl(&out_dir.join("data/samples.jsonl"))?,
    };
    let kto_examples =
        keep_desirable_fraction(to_unpaired(&kto_rows, args.seed), args.desirable_fraction);
    let n_desirable = kto_examples.iter().filter(|e| e.desirable).count() as u64;
    let n_undesirable = kto_examples.len() as u64 - n_desirable;
    // Paper's rule: λ_D n_D / (λ_U n_U) ∈ [1, 4/3]. Default λ_U = 1 and λ_D at the ratio
    // `--weight-ratio` (4/3, the top of the range: on this task the undesirable push is the risky
    // part, see docs/RESULTS.md).
    let auto_desirable_weight =
        args.weight_ratio * n_undesirable.max(1) as f64 / n_desirable.max(1) as f64;
    let kto_config = KtoConfig {
        beta: args.beta,
        desirable_weight: args.desirable_weight.unwrap_or(auto_desirable_weight),
        undesirable_weight: args.undesirable_weight.unwrap_or(1.0),
        loss_type: args.loss_type.into(),
    };

    // ---- KTO against a frozen copy of the starting model ----
    let start = model.clone();
    let reference = start.clone();
    // The frozen reference scores every step's batch: on the steps' device with them.
    let reference_on_device = match &device {
        Device::Cpu => None,
        cuda => Some(reference.to_device(cuda)?),
    };
    let reference_ref = reference_on_device
        .as_ref()
        .map_or(ModelRef::Host(&reference), ModelRef::Device);
    let align_schedule = LrSchedule::linear(args.lr, 0.0, args.kto_steps / 10, args.kto_steps);
    let mut sampler = EpochSampler::new(kto_examples.len(), args.seed ^ 3)?;
    let spec = StageSpec {
        name: "kto",
        steps: args.kto_steps,
        schedule: align_schedule,
        optimizer: adamw(args.lr, 0.0),
        first_global_step: global,
        batch_size: args.batch_size,
        saved_as: "kto",
    };
    let kto_eval = if run_dir.completed("kto").is_some() {
        evaluate(&load_completed(&out_dir, "kto")?, &tok, &data.eval_prompts)?
    } else {
        let precomputed_reference = if args.precompute_ref_logps {
            let rows: Vec<(&str, &str)> = kto_examples
                .iter()
                .map(|e| (e.prompt.as_str(), e.completion.as_str()))
                .collect();
            Some(precompute_reference_logps(
                &reference_ref,
                &tok,
                &rows,
                N_CTX,
            )?)
        } else {
            None
        };
        let mut policy = start.clone();
        let kto = run_stage(&spec, &mut policy, &mut ctx, &mut sampler, |m, indices| {
            let examples: Vec<_> = indices.iter().map(|&i| &kto_examples[i]).collect();
            let mut batch = kto_batch(&tok, &examples, N_CTX)?;
            if let Some(all) = &precomputed_reference {
                batch.reference_logps = Some(indices.iter().map(|&i| all[i]).collect());
            }
            kto_step(&m, &reference_ref, &batch, &kto_config)
        })?;
        complete_stage(&mut run_dir, ctx.log, &policy, "kto")?;
        kto.final_eval
    };
    breakdowns.push(("kto", ErrorBreakdown::from_report(&kto_eval)?));

    // ---- DPO from the same start, on the paired form of the same data ----
    let dpo_rate = if args.run_dpo {
        let pairs = paired_only(&preference_rows, &prefs_path.display().to_string())?;
        let dpo_config = args.dpo_config();
        let mut sampler = EpochSampler::new(pairs.len(), args.seed ^ 4)?;
        let spec = StageSpec {
            name: "dpo",
            steps: args.kto_steps,
            schedule: align_schedule,
            optimizer: adamw(args.lr, 0.0),
            first_global_step: global,
            batch_size: (args.batch_size / 2).max(1),
            saved_as: "dpo",
        };
        let dpo_eval = if run_dir.completed("dpo").is_some() {
            evaluate(&load_completed(&out_dir, "dpo")?, &tok, &data.eval_prompts)?
        } else {
            let mut policy = start.clone();
            let result = run_stage(&spec, &mut policy, &mut ctx, &mut sampler, |m, indices| {
                let batch: Vec<_> = indices.iter().map(|&i| &pairs[i]).collect();
                dpo_step(
                    &m,
                    &reference_ref,
                    &dpo_batch(&tok, &batch, N_CTX)?,
                    &dpo_config,
                )
            })?;
            complete_stage(&mut run_dir, ctx.log, &policy, "dpo")?;
            result.final_eval
        };
        breakdowns.push(("dpo", ErrorBreakdown::from_report(&dpo_eval)?));
        Some(dpo_eval.desirable_rate)
    } else {
        None
    };

    log.sync()?;
    write_atomically(&out_dir.join("training_curves.png"), |temp| {
        plot_training(temp, &log)
    })?;
    let summary = RunSummary {
        base: base_rate,
        sft: sft_rate,
        kto: kto_eval.desirable_rate,
        dpo: dpo_rate,
        sample_desirable_rate: sample_rate,
        n_preference_rows: preference_rows.len(),
        kto_weights: (kto_config.desirable_weight, kto_config.undesirable_weight),
        error_breakdowns: breakdowns,
        output_dir: out_dir.clone(),
        seconds: started.elapsed().as_secs_f64(),
    };
    let summary_path = out_dir.join("summary.txt");
    let mut text = format!(
        "{}\nkto weights: lambda_D={} lambda_U={} (n_D={n_desirable}, n_U={n_undesirable})\nseconds: {:.1}\n",
        summary.summary_line(),
        summary.kto_weights.0,
        summary.kto_weights.1,
        summary.seconds
    );
    for (stage, breakdown) in &summary.error_breakdowns {
        text.push_str(&format!("{stage}: {breakdown}\n"));
    }
    write_bytes_atomically(&summary_path, text.as_bytes())?;
    run_dir.finish()?;
    Ok(summary)
}
