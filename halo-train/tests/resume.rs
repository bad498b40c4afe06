//! Resumable runs: a run killed (SIGKILL) at random moments and continued with `--resume` ends
//! with the same summary line, the same checkpoint bytes and the same metrics as an uninterrupted
//! run; and the run directory's rules (non-empty refused, `--overwrite`, changed flags refused).
//!
//! The killed runs are this test binary re-executed as a child (`child_process_entry`, which
//! runs the library pipeline when `HALO_RESUME_CHILD_ARGS` is set), so the test needs no other
//! binary to be built.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use halo_kernels::HaloError;
use halo_train::train::{run, RunManifest, TrainArgs};
use rand::{Rng, SeedableRng};

const CHILD_ARGS: &str = "HALO_RESUME_CHILD_ARGS";

/// A run of a few seconds: 1 block, 32 wide, operands below 20, 200 pretraining steps, 40 of SFT, KTO and DPO each, with
/// SFT, KTO and DPO; periodic checkpoints every 7 steps so that kills land inside stages.
fn tiny_flags(dir: &Path) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--operand-limit",
        "20",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--pretrain-steps",
        "200",
        "--sft-steps",
        "40",
        "--kto-steps",
        "40",
        "--pretrain-lines",
        "6000",
        "--sft-lines",
        "150",
        "--n-eval",
        "80",
        "--evals-per-stage",
        "2",
        "--pretrain-batch-size",
        "32",
        "--batch-size",
        "16",
        "--preference-data",
        "synthetic",
        "--run-dpo",
        "--checkpoint-every",
        "7",
    ]
    .map(String::from)
    .to_vec();
    flags.push("--output-dir".into());
    flags.push(dir.display().to_string());
    flags
}

fn parse(flags: &[String]) -> TrainArgs {
    TrainArgs::parse_from(std::iter::once("train_kto".to_string()).chain(flags.iter().cloned()))
}

/// In a child process (the env var set): run the pipeline with the given flags and print the
/// summary line. In the ordinary test run: nothing.
#[test]
fn child_process_entry() {
    let Ok(flags) = std::env::var(CHILD_ARGS) else {
        return;
    };
    let flags: Vec<String> = flags.split('\u{1f}').map(String::from).collect();
    match run(&parse(&flags), false) {
        Ok(summary) => println!("SUMMARY {}", summary.summary_line()),
        Err(e) => {
            eprintln!("CHILD ERROR {e}");
            std::process::exit(3);
        }
    }
}

fn spawn_child(flags: &[String]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ARGS, flags.join("\u{1f}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` and returns its summary line; panics with its output if it failed.
fn summary_of(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.split_once("SUMMARY ").map(|(_, line)| line))
        .unwrap_or_else(|| panic!("no summary line in {stdout}"))
        .to_string()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("halo-resume-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `summary.txt` without its `seconds:` line (the only thing that differs between runs).
fn summary_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("summary.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("seconds:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_run_killed_at_random_moments_resumes_to_the_uninterrupted_result() {
    let reference_dir = temp_dir("reference");
    let started = Instant::now();
    let reference = summary_of(spawn_child(&tiny_flags(&reference_dir)));
    let duration = started.elapsed();

    let seed: u64 = std::env::var("HALO_RESUME_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("kill delays from seed {seed} (HALO_RESUME_SEED); uninterrupted run {duration:?}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dir = temp_dir("killed");
    // `--resume` on a missing directory starts the run, so every attempt is the same command.
    let mut flags = tiny_flags(&dir);
    flags.push("--resume".into());
    // The first kill comes almost at once (directory creation, manifest); the others anywhere in
    // a run's length, so they land in every stage, in stage transitions and in checkpoint writes.
    // (A resumed attempt re-reads and re-judges the completed stages first, so later attempts
    // need less than a whole run's time to reach new ground.) Each attempt lives under 0.19 of an
    // uninterrupted run, so five of them together cannot finish it: at least five children are
    // killed on any machine, however fast (with up to 0.25 a fast machine finished in four).
    let mut delays = vec![Duration::from_millis(rng.gen_range(1..30))];
    for _ in 0..24 {
        delays.push(duration.mul_f64(rng.gen_range(0.03..0.19)));
    }
    let (mut kills, mut mid_stage) = (0, 0);
    for delay in delays {
        if RunManifest::read(&dir).unwrap().is_some_and(|m| m.finished) {
            break;
        }
        // A periodic checkpoint left by the previous kill: this attempt continues inside a stage.
        mid_stage += usize::from(dir.join("resume.safetensors").is_file());
        let mut child = spawn_child(&flags);
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        let _ = child.wait_with_output();
        let manifest = RunManifest::read(&dir).unwrap_or_else(|e| panic!("after a kill: {e}"));
        eprintln!(
            "killed after {delay:?}: periodic checkpoint {}, completed {:?}",
            dir.join("resume.safetensors").is_file(),
            manifest.map(|m| m
                .completed
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>())
        );
    }
    assert!(
        kills >= 5,
        "only {kills} of the children were still running when killed"
    );
    assert!(
        mid_stage >= 1,
        "no attempt resumed from a periodic checkpoint"
    );
    let resumed = summary_of(spawn_child(&flags));
    assert_eq!(resumed, reference, "summary line after {kills} kills");
    // Not only the line: the same checkpoints byte for byte, the same summary and metrics.
    for stage in ["base", "sft", "kto", "dpo"] {
        let file = format!("{stage}.safetensors");
        assert!(
            std::fs::read(dir.join(&file)).unwrap()
                == std::fs::read(reference_dir.join(&file)).unwrap(),
            "{file} differs from the uninterrupted run's"
        );
    }
    assert_eq!(summary_text(&dir), summary_text(&reference_dir));
    assert_eq!(
        std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(),
        std::fs::read_to_string(reference_dir.join("metrics.jsonl")).unwrap(),
        "metrics.jsonl differs from the uninterrupted run's"
    );
    // Nothing left behind: no temporary file, no periodic checkpoint, the run marked finished.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".halo-tmp-") || n == "resume.safetensors")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(RunManifest::read(&dir).unwrap().unwrap().finished);
    // Resuming a finished run reads everything back and gives the same line again.
    assert_eq!(summary_of(spawn_child(&flags)), reference);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&reference_dir).unwrap();
}

/// Same flags, much shorter: for the directory-rule tests, which do not care about the result.
fn quick_args(dir: &Path) -> TrainArgs {
    TrainArgs {
        pretrain_steps: 6,
        sft_steps: 3,
        kto_steps: 3,
        n_eval: 10,
        ..parse(&tiny_flags(dir))
    }
}

#[test]
fn a_non_empty_directory_is_refused_and_left_alone() {
    let dir = temp_dir("nonempty");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    let err = run(&quick_args(&dir), false).unwrap_err();
    assert!(
        matches!(&err, HaloError::InvalidShape(m) if m.contains("not empty") && m.contains("--resume") && m.contains("--overwrite")),
        "{err:?}"
    );
    // --overwrite does not delete a directory that is not a run.
    let overwrite = TrainArgs {
        overwrite: true,
        ..quick_args(&dir)
    };
    let err = run(&overwrite, false).unwrap_err();
    assert!(
        matches!(&err, HaloError::InvalidShape(m) if m.contains("does not look like a run directory")),
        "{err:?}"
    );
    // Nor does --resume touch it.
    let resume = TrainArgs {
        resume: true,
        ..quick_args(&dir)
    };
    assert!(run(&resume, false).is_err());
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["notes.txt"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_second_run_is_refused_then_overwrite_replaces_the_whole_first_run() {
    let dir = temp_dir("overwrite");
    let first = quick_args(&dir);
    run(&first, false).unwrap();
    let metrics_before = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let marker = dir.join("left-by-the-first-run.txt");
    std::fs::write(&marker, "old").unwrap();

    // A second run (other flags) into the same directory: refused, nothing touched.
    let second = TrainArgs {
        seed: 1,
        run_dpo: false,
        ..quick_args(&dir)
    };
    let err = run(&second, false).unwrap_err();
    assert!(
        matches!(&err, HaloError::InvalidShape(m) if m.contains("not empty")),
        "{err:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(),
        metrics_before
    );
    assert!(dir.join("dpo.safetensors").is_file());

    // With --overwrite: the first run's files are gone (no dpo checkpoint from it remains),
    // the metrics are the second run's only.
    let second = TrainArgs {
        overwrite: true,
        ..second
    };
    run(&second, false).unwrap();
    assert!(!marker.exists());
    assert!(!dir.join("dpo.safetensors").exists());
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(!metrics.contains("\"stage\":\"dpo\""));
    let pretrain_losses = metrics
        .lines()
        .filter(|l| l.contains("\"stage\":\"pretrain\"") && l.contains("\"loss\""))
        .count();
    assert_eq!(pretrain_losses, 6);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_with_changed_flags_is_refused_and_names_the_flag() {
    let dir = temp_dir("changed");
    run(&quick_args(&dir), false).unwrap();
    let manifest_before = std::fs::read_to_string(dir.join("run.json")).unwrap();
    let changed = TrainArgs {
        resume: true,
        beta: 0.5,
        ..quick_args(&dir)
    };
    let err = run(&changed, false).unwrap_err();
    assert!(
        matches!(&err, HaloError::InvalidShape(m) if m.contains("other flags") && m.contains("beta: 1.0") && m.contains("beta: 0.5")),
        "{err:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("run.json")).unwrap(),
        manifest_before
    );
    // Both at once is refused before anything is touched.
    let both = TrainArgs {
        resume: true,
        overwrite: true,
        ..quick_args(&dir)
    };
    let err = run(&both, false).unwrap_err();
    assert!(
        matches!(&err, HaloError::InvalidShape(m) if m.contains("pass one")),
        "{err:?}"
    );
    assert!(dir.join("kto.safetensors").is_file());
    // The interval of periodic checkpoints may change on resume: it does not change the result.
    let same = TrainArgs {
        resume: true,
        checkpoint_every: 2,
        ..quick_args(&dir)
    };
    run(&same, false).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stage_the_manifest_does_not_record_is_not_trusted() {
    let dir = temp_dir("manifest");
    run(&quick_args(&dir), false).unwrap();
    RunManifest::require_completed(&dir, "kto").unwrap();
    // A manifest of a run that died during KTO: a kto.safetensors there is not trusted.
    let text = std::fs::read_to_string(dir.join("run.json")).unwrap();
    let mut manifest: RunManifest = serde_json::from_str(&text).unwrap();
    manifest
        .completed
        .retain(|s| s.name == "base" || s.name == "sft");
    manifest.finished = false;
    std::fs::write(
        dir.join("run.json"),
        serde_json::to_string(&manifest).unwrap(),
    )
    .unwrap();
    let err = RunManifest::require_completed(&dir, "kto").unwrap_err();
    assert!(
        matches!(&err, HaloError::Checkpoint(m) if m.contains("`kto` did not complete") && m.contains("base, sft")),
        "{err:?}"
    );
    RunManifest::require_completed(&dir, "sft").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
