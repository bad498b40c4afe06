//! The loop every stage shares: compute a step's loss and gradients, clip them to norm 1, take an
//! AdamW step on the scheduled learning rate, log the metrics (file + progress bar), and evaluate
//! the judge's desirable rate a few times per stage for the plot; every
//! [`PeriodicCheckpoints::every`] steps save the stage's state ([`StageCheckpoint`]) so that a
//! killed run continues from there.

use std::collections::VecDeque;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::batching::EpochSampler;
use super::evaluate::{evaluate, EvalReport};
use super::metrics_log::{MetricRecord, MetricsLog};
use super::stage_checkpoint::StageCheckpoint;
use super::tokenizer::TextTokenizer;
use super::trainee::Trainee;
use crate::autograd::Device;
use crate::model::optim::{AdamW, AdamWConfig, LrSchedule};
use crate::model::{Gpt, ModelRef};
use halo_kernels::error::Result;

/// Largest global gradient norm; larger gradients are scaled down (TRL's `max_grad_norm`).
pub const MAX_GRAD_NORM: f32 = 1.0;

pub use super::step_output::{DeviceValues, PendingMetrics, StepMetrics, StepOutput, StepValues};

/// Shared state of a run that every stage reports into.
#[derive(Debug)]
pub struct StageContext<'a> {
    /// Where every step's metrics and every evaluation are recorded.
    pub log: &'a mut MetricsLog,
    /// The run's tokenizer (evaluation encodes the prompts and decodes the completions).
    pub tokenizer: &'a TextTokenizer,
    /// Held-out prompts the judge scores at every evaluation.
    pub eval_prompts: &'a [String],
    /// Evaluations per stage (0: only the final one).
    pub evals_per_stage: usize,
    /// Draw a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// Where and how often to save the running stage's state (`None`: never).
    pub checkpoints: Option<PeriodicCheckpoints>,
    /// A saved state to continue from: taken by the stage it belongs to.
    pub resume_from: Option<(PathBuf, StageCheckpoint)>,
    /// Where the steps run (forward, backward, clipping, AdamW); evaluation and checkpoints read
    /// the host model, synced from the device when they need it.
    pub device: Device,
}

/// Periodic checkpoints inside a stage.
#[derive(Debug, Clone)]
pub struct PeriodicCheckpoints {
    /// The file (replaced atomically at every save).
    pub path: PathBuf,
    /// Save after every this many steps (not after the last step: the stage's own checkpoint
    /// follows); 0 never saves.
    pub every: usize,
}

/// Settings of one stage.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Stage name: the `stage` of its [`MetricRecord`]s and the progress bar's prefix.
    pub name: &'static str,
    /// Optimizer steps to take.
    pub steps: usize,
    /// Learning rate per step, indexed from the stage's first step (0).
    pub schedule: LrSchedule,
    /// AdamW hyper-parameters; a fresh optimizer (zero moments) is built for each stage. Its
    /// `lr` is unused: [`schedule`](Self::schedule) sets every step's rate.
    pub optimizer: AdamWConfig,
    /// Global step of this stage's first step (the plot's x axis).
    pub first_global_step: usize,
    /// Sequences (or pairs) drawn from the sampler per step.
    pub batch_size: usize,
    /// The stage's name in the run manifest and its checkpoint file (`pretrain` saves `base`).
    pub saved_as: &'static str,
}

/// What a stage ends with.
#[derive(Debug, Clone, PartialEq)]
pub struct StageResult {
    /// The judge's evaluation of the held-out prompts after the last step (desirable rate, every
    /// completion and verdict).
    pub final_eval: EvalReport,
    /// Mean loss of the last 10% of steps.
    pub final_loss: f64,
    /// Every step's loss.
    pub losses: Vec<f64>,
}

/// Runs `spec.steps` steps of `step_fn` on `model`; each step gets the next
/// [`StageSpec::batch_size`] indices of `sampler`. With a [`StageContext::resume_from`] state of
/// this stage, continues after its last step: weights, AdamW state and losses restored, the
/// sampler replayed to the same position.
pub fn run_stage(
    spec: &StageSpec,
    model: &mut Gpt,
    ctx: &mut StageContext<'_>,
    sampler: &mut EpochSampler,
    mut step_fn: impl FnMut(ModelRef<'_>, &[usize]) -> Result<StepOutput>,
) -> Result<StageResult> {
    let resume = ctx
        .resume_from
        .take_if(|(_, checkpoint)| checkpoint.stage() == spec.name);
    let (optimizer, first_step, mut losses) = match resume {
        Some((path, checkpoint)) => checkpoint.restore(&path, spec, model)?,
        None => (
            AdamW::new(model, spec.optimizer),
            0,
            Vec::with_capacity(spec.steps),
        ),
    };
    let mut trainee = Trainee::new(model, optimizer, &ctx.device)?;
    // The sampler's position and RNG are a function of the batches drawn: replay them.
    for _ in 0..first_step {
        sampler.next_batch(spec.batch_size);
    }
    let bar = progress_bar(spec, ctx.progress);
    bar.set_position(first_step as u64);
    let eval_every = if ctx.evals_per_stage == 0 {
        usize::MAX
    } else {
        spec.steps.div_ceil(ctx.evals_per_stage).max(1)
    };
    let checkpoint_every = ctx.checkpoints.as_ref().map_or(0, |c| c.every);
    let mut recent: VecDeque<Vec<(String, f64)>> = VecDeque::new();
    let mut last_eval: Option<EvalReport> = None;
    if first_step == 0 && spec.steps > 0 && ctx.evals_per_stage > 0 {
        last_eval = Some(log_eval(spec, model, ctx, 0)?);
    }
    for step in first_step..spec.steps {
        let indices = sampler.next_batch(spec.batch_size);
        let out = step_fn(trainee.model(model), &indices)?;
        let lr = spec.schedule.lr_at(step);
        let report = trainee.step(model, out, MAX_GRAD_NORM, lr)?;
        let loss = report.metrics.loss;
        losses.push(loss);

        let mut values = vec![
            ("loss".to_string(), loss),
            ("grad_norm".to_string(), report.grad_norm as f64),
            ("learning_rate".to_string(), lr as f64),
        ];
        values.extend(report.metrics.metrics);
        ctx.log.log(MetricRecord {
            stage: spec.name.to_string(),
            step: step + 1,
            global_step: spec.first_global_step + step + 1,
            values: values.clone(),
        })?;
        recent.push_back(values);
        if recent.len() > 20 {
            recent.pop_front();
        }
        let last = step + 1 == spec.steps;
        let checkpoint_now = checkpoint_every > 0 && (step + 1) % checkpoint_every == 0 && !last;
        let eval_now = last || (step + 1) % eval_every == 0;
        if eval_now || checkpoint_now {
            trainee.sync_host(model)?;
        }
        if eval_now {
            last_eval = Some(log_eval(spec, model, ctx, step + 1)?);
        }
        let last_rate = last_eval.as_ref().map_or(f64::NAN, |e| e.desirable_rate);
        bar.set_message(progress_message(&recent, last_rate));
        bar.inc(1);
        if checkpoint_now {
            if let Some(periodic) = &ctx.checkpoints {
                // The records the checkpoint follows must be on disk before it is.
                ctx.log.sync()?;
                let optimizer = trainee.host_optimizer(model)?;
                StageCheckpoint::save(
                    &periodic.path,
                    spec,
                    step + 1,
                    model,
                    &optimizer,
                    &losses,
                    ctx.log.records().len(),
                )?;
            }
        }
    }
    bar.finish();
    trainee.sync_host(model)?;
    ctx.log.flush()?;
    // The last step always evaluates, so only a stage of zero steps gets here without a report.
    let final_eval = match last_eval {
        Some(report) => report,
        None => evaluate(model, ctx.tokenizer, ctx.eval_prompts)?,
    };
    let tail = (losses.len() / 10).max(1).min(losses.len());
    let final_loss = if tail == 0 {
        f64::NAN
    } else {
        losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64
    };
    Ok(StageResult {
        final_eval,
        final_loss,
        losses,
    })
}

fn log_eval(
    spec: &StageSpec,
    model: &Gpt,
    ctx: &mut StageContext<'_>,
    step: usize,
) -> Result<EvalReport> {
    let report = evaluate(model, ctx.tokenizer, ctx.eval_prompts)?;
    ctx.log.log(MetricRecord {
        stage: spec.name.to_string(),
        step,
        global_step: spec.first_global_step + step,
        values: vec![
            ("eval/desirable_rate".into(), report.desirable_rate),
            ("eval/wrong_rate".into(), report.wrong_rate),
            ("eval/garbled_rate".into(), report.garbled_rate),
        ],
    })?;
    Ok(report)
}

fn progress_bar(spec: &StageSpec, visible: bool) -> ProgressBar {
    let bar = ProgressBar::new(spec.steps as u64);
    if !visible {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:25}] {pos}/{len} {elapsed} {msg}")
        .expect("static template is valid")
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(spec.name);
    bar
}

/// Running means (last 20 steps) of the metrics the issue asks to see, plus the last evaluation.
fn progress_message(recent: &VecDeque<Vec<(String, f64)>>, eval_rate: f64) -> String {
    let mean = |name: &str| -> Option<f64> {
        let values: Vec<f64> = recent
            .iter()
            .filter_map(|v| v.iter().find(|(n, _)| n == name).map(|&(_, x)| x))
            .collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    let mut parts = Vec::new();
    for (label, name) in [
        ("loss", "loss"),
        ("kl", "kl"),
        ("r/chosen", "rewards/chosen"),
        ("r/rejected", "rewards/rejected"),
        ("margins", "rewards/margins"),
    ] {
        if let Some(v) = mean(name) {
            parts.push(format!("{label} {v:.4}"));
        }
    }
    if eval_rate.is_finite() {
        parts.push(format!("desirable {eval_rate:.3}"));
    }
    parts.join(" | ")
}
