//! A time-bounded fuzz harness on proptest (CI has no nightly toolchain, so no cargo-fuzz), shared
//! by the fuzz targets of both crates (`tests/fuzz_*.rs`, and `halo-train/tests/fuzz_*.rs` through
//! `#[path]`).
//!
//! A target is one `#[test]` that calls [`fuzz`] with a closure drawing one input from a [`Gen`]
//! (proptest strategies on a per-input seed) and classifying what the code under test did with it:
//! [`Outcome::Accepted`] (finite output), [`Outcome::Refused`] (a clean error) or
//! [`Outcome::NonFinite`] (an accepted input whose output holds a NaN or an infinity: a bug) or
//! [`Outcome::Wrong`] (finite, but not what the target's f64 reference says: a bug).
//! A panic is caught (`catch_unwind`) and counted. An abort (allocation failure, stack overflow,
//! a signal) would take the test process down with it, so the inputs run in a child process — the
//! test binary re-run on that one test — that writes the index of the input it is about to try to
//! a progress file; when the child dies, the parent reads the index, counts an abort, prints its
//! seed and goes on with the next input in a fresh child. The child's address space is capped
//! (`HALO_FUZZ_MEMORY_MB`, default 4096), so an input that asks for an absurd allocation aborts
//! there instead of pressing the machine.
//!
//! [`Outcome::Known`] marks a bug already reported and owned by other code (its message says
//! whose): it is counted in its own column and fails the target only with `HALO_FUZZ_STRICT=1`.
//!
//! Environment:
//! - `HALO_FUZZ_SECONDS` (default 4): wall-clock budget of each target.
//! - `HALO_FUZZ_SEED` (default 0): base seed; input `i` of a target uses `seed_of(base, i)`.
//! - `HALO_FUZZ_STRICT=1`: known bugs fail the target too.
//! - `HALO_FUZZ_REPRO=<seed>`: run only the input of that seed, in-process, without catching the
//!   panic, printing the input (`Gen::show`): how a failure printed by a run is reproduced.
//!
//! Each target prints one `fuzz-count` row (inputs tried, accepted, clean errors, panics, aborts,
//! non-finite outputs, wrong answers, known bugs) and fails when any of panics, aborts,
//! non-finite outputs or wrong answers is not 0. `scripts/fuzz.sh` collects
//! the rows of every target into one table.
#![allow(dead_code)]

use std::fmt::Debug;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// What the code under test did with one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Accepted, and every output is finite.
    Accepted,
    /// A clean error (`Err(..)`), the message.
    Refused(String),
    /// Accepted, but an output is NaN or infinite: what and where.
    NonFinite(String),
    /// Accepted and finite, but not what the f64 reference of the target says: what and where.
    Wrong(String),
    /// A bug already reported and owned elsewhere (the message says where): counted apart and
    /// printed, but failing the target only under `HALO_FUZZ_STRICT=1`, so that a fix landing
    /// elsewhere can be checked by turning it on.
    Known(String),
}

impl Outcome {
    /// `Refused` for an `Err`, else `check` of the value.
    pub fn of<T, E: std::fmt::Display>(
        result: Result<T, E>,
        check: impl FnOnce(&T) -> Outcome,
    ) -> Outcome {
        match result {
            Ok(value) => check(&value),
            Err(e) => Outcome::Refused(e.to_string()),
        }
    }

    /// `Accepted` when every value is finite, else `NonFinite` naming `what` and the index.
    pub fn finite(what: &str, values: impl IntoIterator<Item = f64>) -> Outcome {
        match values.into_iter().position(|v| !v.is_finite()) {
            None => Outcome::Accepted,
            Some(i) => Outcome::NonFinite(format!("{what}[{i}] is not finite")),
        }
    }

    /// The first non-`Accepted` of `self` and `next()`.
    pub fn and(self, next: impl FnOnce() -> Outcome) -> Outcome {
        match self {
            Outcome::Accepted => next(),
            other => other,
        }
    }
}

/// Draws the values of one input from proptest strategies, on the input's own seed.
pub struct Gen {
    runner: TestRunner,
    verbose: bool,
}

impl Gen {
    fn new(seed: u64, verbose: bool) -> Self {
        let mut bytes = [0u8; 32];
        let mut state = seed;
        for chunk in bytes.chunks_mut(8) {
            chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
        }
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        Gen {
            runner: TestRunner::new_with_rng(Config::default(), rng),
            verbose,
        }
    }

    /// One value of `strategy`.
    pub fn draw<S: Strategy>(&mut self, strategy: S) -> S::Value {
        strategy
            .new_tree(&mut self.runner)
            .expect("strategy failed to generate")
            .current()
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.draw(proptest::bool::weighted(p))
    }

    /// A size in `0..=max`, small most of the time.
    pub fn size(&mut self, max: usize) -> usize {
        if self.chance(0.8) {
            self.draw(0..=max.min(8))
        } else {
            self.draw(0..=max)
        }
    }

    /// One of `items`.
    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.draw(0..items.len())].clone()
    }

    /// A hostile size: 0, 1, a power of two up to 2^63, `usize::MAX`, or near one of them.
    pub fn hostile_usize(&mut self) -> usize {
        let base = match self.draw(0..6u8) {
            0 => 0,
            1 => 1,
            2 => usize::MAX,
            3 => u32::MAX as usize,
            4 => i32::MAX as usize,
            _ => 1usize << self.draw(0..64u32),
        };
        base.wrapping_add(self.draw(-2isize..=2) as usize)
    }

    /// A float: ordinary most of the time, else any bit pattern class (NaN, ±inf, subnormal,
    /// ±0, huge).
    pub fn f32_value(&mut self, ordinary: std::ops::Range<f32>, p_special: f64) -> f32 {
        if self.chance(p_special) {
            self.draw(proptest::num::f32::ANY)
        } else {
            self.draw(ordinary)
        }
    }

    /// `len` floats of [`Gen::f32_value`].
    pub fn f32_vec(
        &mut self,
        len: usize,
        ordinary: std::ops::Range<f32>,
        p_special: f64,
    ) -> Vec<f32> {
        // A whole vector of ordinary values in one draw when no special value is wanted.
        if !self.chance((p_special * len as f64).min(1.0)) {
            return self.draw(proptest::collection::vec(ordinary, len));
        }
        (0..len)
            .map(|_| self.f32_value(ordinary.clone(), p_special))
            .collect()
    }

    /// A hyper-parameter: an ordinary value in `ordinary` most of the time, else 0, a negative,
    /// NaN, ±inf, huge or tiny.
    pub fn hyper(&mut self, ordinary: std::ops::Range<f64>, p_hostile: f64) -> f64 {
        if self.chance(p_hostile) {
            self.pick(&[
                0.0,
                -0.0,
                -1.0,
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::MAX,
                f64::MIN_POSITIVE,
                1e-300,
                1e300,
                5e-324,
            ])
        } else {
            self.draw(ordinary)
        }
    }

    /// Prints `value` when reproducing one seed (`HALO_FUZZ_REPRO`).
    pub fn show(&self, label: &str, value: &impl Debug) {
        if self.verbose {
            eprintln!("{label}: {value:?}");
        }
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of input `index` of target `name` (distinct targets get distinct streams).
pub fn seed_of(base: u64, name: &str, index: u64) -> u64 {
    let mut state = base
        ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    state = state.wrapping_add(index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    splitmix64(&mut state)
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => parse_u64(&v).unwrap_or_else(|| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn parse_u64(v: &str) -> Option<u64> {
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Counts of one target (or one child's share of it).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Counts {
    /// Inputs tried.
    pub tried: u64,
    /// Accepted with finite output.
    pub accepted: u64,
    /// Clean errors.
    pub errors: u64,
    /// Panics (caught).
    pub panics: u64,
    /// Aborts (the child died).
    pub aborts: u64,
    /// Non-finite output from an accepted input.
    pub non_finite: u64,
    /// Finite output from an accepted input that disagrees with the target's reference.
    pub wrong: u64,
    /// Known bugs owned elsewhere ([`Outcome::Known`]).
    pub known: u64,
}

impl Counts {
    fn line(&self) -> String {
        format!(
            "tried={} accepted={} errors={} panics={} aborts={} non_finite={} wrong={} known={}",
            self.tried,
            self.accepted,
            self.errors,
            self.panics,
            self.aborts,
            self.non_finite,
            self.wrong,
            self.known
        )
    }

    fn parse(line: &str) -> Option<Counts> {
        let mut c = Counts::default();
        for field in line.split_whitespace() {
            let (key, value) = field.split_once('=')?;
            let value: u64 = value.parse().ok()?;
            match key {
                "tried" => c.tried = value,
                "accepted" => c.accepted = value,
                "errors" => c.errors = value,
                "panics" => c.panics = value,
                "aborts" => c.aborts = value,
                "non_finite" => c.non_finite = value,
                "wrong" => c.wrong = value,
                "known" => c.known = value,
                _ => return None,
            }
        }
        Some(c)
    }

    fn add(&mut self, other: Counts) {
        self.tried += other.tried;
        self.accepted += other.accepted;
        self.errors += other.errors;
        self.panics += other.panics;
        self.aborts += other.aborts;
        self.non_finite += other.non_finite;
        self.wrong += other.wrong;
        self.known += other.known;
    }

    fn failed(&self) -> bool {
        let strict = std::env::var("HALO_FUZZ_STRICT").is_ok_and(|v| v == "1");
        self.panics
            + self.aborts
            + self.non_finite
            + self.wrong
            + if strict { self.known } else { 0 }
            > 0
    }
}

const CHILD_ENV: &str = "HALO_FUZZ_CHILD";
const RESULT_TAG: &str = "HALO_FUZZ_RESULT ";
const FAIL_TAG: &str = "HALO_FUZZ_FAIL ";
/// Failures printed per kind and target (the counts hold them all).
const MAX_REPORTED: u64 = 5;

/// Message of the last caught panic of this thread (the hook records it instead of printing).
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Runs target `name` (the exact name of the calling `#[test]`): see the module docs.
pub fn fuzz(name: &str, target: impl Fn(&mut Gen) -> Outcome) {
    let base = env_u64("HALO_FUZZ_SEED", 0);
    if let Ok(seed) = std::env::var("HALO_FUZZ_REPRO") {
        let seed = parse_u64(&seed).expect("HALO_FUZZ_REPRO must be a number");
        let outcome = target(&mut Gen::new(seed, true));
        eprintln!("{name} seed {seed:#x}: {outcome:?}");
        assert!(
            !matches!(outcome, Outcome::NonFinite(_) | Outcome::Wrong(_)),
            "{outcome:?}"
        );
        return;
    }
    match std::env::var(CHILD_ENV) {
        Ok(child) if child == name => run_child(name, base, target),
        Ok(_) => {} // a child for another target: nothing to do here
        Err(_) => run_parent(name, base),
    }
}

/// In the child: inputs from `HALO_FUZZ_START` until the deadline; the counts on stdout.
fn run_child(name: &str, base: u64, target: impl Fn(&mut Gen) -> Outcome) {
    let start = env_u64("HALO_FUZZ_START", 0);
    let deadline = Instant::now() + Duration::from_millis(env_u64("HALO_FUZZ_MILLIS", 0));
    let progress = std::fs::OpenOptions::new()
        .write(true)
        .open(std::env::var("HALO_FUZZ_PROGRESS").expect("HALO_FUZZ_PROGRESS"))
        .expect("progress file");
    limit_address_space(env_u64("HALO_FUZZ_MEMORY_MB", 4096));
    std::panic::set_hook(Box::new(|info| {
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.to_string());
    }));
    let mut counts = Counts::default();
    let mut index = start;
    let mut out = std::io::stdout().lock();
    while Instant::now() < deadline {
        let seed = seed_of(base, name, index);
        // Before the input: its index and the counts so far, for the parent if the input aborts.
        progress
            .write_all_at(&progress_record(index, &counts), 0)
            .expect("progress write");
        counts.tried += 1;
        let outcome = catch_unwind(AssertUnwindSafe(|| target(&mut Gen::new(seed, false))));
        let (kind, message) = match outcome {
            Ok(Outcome::Accepted) => {
                counts.accepted += 1;
                (None, String::new())
            }
            Ok(Outcome::Refused(_)) => {
                counts.errors += 1;
                (None, String::new())
            }
            Ok(Outcome::NonFinite(what)) => {
                counts.non_finite += 1;
                (Some(("non-finite", counts.non_finite)), what)
            }
            Ok(Outcome::Wrong(what)) => {
                counts.wrong += 1;
                (Some(("wrong", counts.wrong)), what)
            }
            Ok(Outcome::Known(what)) => {
                counts.known += 1;
                (Some(("known", counts.known)), what)
            }
            Err(_) => {
                counts.panics += 1;
                let message = LAST_PANIC
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_default();
                (Some(("panic", counts.panics)), message)
            }
        };
        if let Some((kind, n)) = kind {
            if n <= MAX_REPORTED {
                let message = message.replace('\n', " | ");
                writeln!(out, "{FAIL_TAG}{kind} seed={seed:#x} {message}").unwrap();
            }
        }
        index += 1;
    }
    let _ = std::panic::take_hook();
    writeln!(out, "{RESULT_TAG}next={index} {}", counts.line()).unwrap();
    out.flush().unwrap();
}

fn progress_record(index: u64, c: &Counts) -> [u8; 64] {
    let mut record = [0u8; 64];
    let fields = [
        index,
        c.tried,
        c.accepted,
        c.errors,
        c.panics,
        c.non_finite,
        c.wrong,
        c.known,
    ];
    for (chunk, field) in record.chunks_mut(8).zip(fields) {
        chunk.copy_from_slice(&field.to_le_bytes());
    }
    record
}

fn read_progress(bytes: &[u8]) -> (u64, Counts) {
    let field = |i: usize| u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap());
    let counts = Counts {
        tried: field(1),
        accepted: field(2),
        errors: field(3),
        panics: field(4),
        aborts: 0,
        non_finite: field(5),
        wrong: field(6),
        known: field(7),
    };
    (field(0), counts)
}

/// Caps the child's address space so that an absurd allocation fails (and aborts) at once.
fn limit_address_space(megabytes: u64) {
    let bytes = megabytes.saturating_mul(1 << 20) as libc::rlim_t;
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: setrlimit reads the struct we pass; lowering our own limit cannot harm the parent.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) };
    if rc != 0 {
        // Not every Unix supports RLIMIT_AS (macOS refuses it): fuzz without the cap.
        eprintln!("fuzz child: setrlimit(RLIMIT_AS) failed; running without a memory cap");
    }
}

/// In the test process: children until the budget is spent, restarting after each abort.
fn run_parent(name: &str, base: u64) {
    let budget = Duration::from_secs_f64(
        std::env::var("HALO_FUZZ_SECONDS")
            .ok()
            .map(|v| {
                v.parse::<f64>()
                    .expect("HALO_FUZZ_SECONDS must be a number")
            })
            .unwrap_or(4.0),
    );
    let began = Instant::now();
    let progress_path: PathBuf = std::env::temp_dir().join(format!(
        "halo_fuzz_{}_{}.progress",
        std::process::id(),
        name.replace("::", "_")
    ));
    let mut counts = Counts::default();
    let mut failures = Vec::new();
    let mut start = 0u64;
    // At least one child, even with a budget of 0 (then it tries nothing).
    loop {
        let left = budget.saturating_sub(began.elapsed());
        std::fs::write(
            &progress_path,
            progress_record(u64::MAX, &Counts::default()),
        )
        .expect("progress file");
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                name,
                "--exact",
                "--include-ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, name)
            .env("HALO_FUZZ_START", start.to_string())
            .env("HALO_FUZZ_MILLIS", left.as_millis().to_string())
            .env("HALO_FUZZ_PROGRESS", &progress_path)
            .env_remove("HALO_FUZZ_REPRO")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the fuzz child");
        let mut stderr = child.stderr.take().unwrap();
        let stderr_thread = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let mut result = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.expect("child stdout");
            // libtest prints `test NAME ... ` before the test's own first line: find the tag.
            let tagged = |tag: &str| line.find(tag).map(|at| &line[at + tag.len()..]);
            if let Some(rest) = tagged(RESULT_TAG) {
                let (next, rest) = rest.split_once(' ').expect("result line");
                let next: u64 = next.strip_prefix("next=").unwrap().parse().unwrap();
                result = Some((next, Counts::parse(rest).expect("result counts")));
            } else if let Some(fail) = tagged(FAIL_TAG) {
                failures.push(fail.to_string());
            }
        }
        let status = child.wait().expect("wait for the fuzz child");
        let stderr_text = stderr_thread.join().unwrap_or_default();
        match result {
            Some((next, child_counts)) if status.success() => {
                counts.add(child_counts);
                start = next;
            }
            _ => {
                // The child died on an input: which one the progress file says.
                let bytes = std::fs::read(&progress_path).expect("progress file");
                let (index, before) = read_progress(&bytes);
                assert_ne!(
                    index,
                    u64::MAX,
                    "{name}: the fuzz child failed before its first input ({status}):\n{stderr_text}"
                );
                // The child's counts up to the fatal input, then that input.
                counts.add(before);
                counts.tried += 1;
                counts.aborts += 1;
                let seed = seed_of(base, name, index);
                let tail: String = stderr_text
                    .lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" | ");
                failures.push(format!("abort seed={seed:#x} ({status}) {tail}"));
                start = index + 1;
            }
        }
        if began.elapsed() >= budget || counts.aborts >= MAX_REPORTED {
            break;
        }
    }
    let _ = std::fs::remove_file(&progress_path);
    println!(
        "fuzz-count {name} {} seconds={:.1}",
        counts.line(),
        began.elapsed().as_secs_f64()
    );
    for failure in &failures {
        println!(
            "fuzz-failure {name} {failure}\n  reproduce: HALO_FUZZ_REPRO=<seed> cargo test --release --test <this file> {name} -- --exact --nocapture"
        );
    }
    assert!(
        !counts.failed(),
        "{name}: {} (failures above)",
        counts.line()
    );
    assert!(
        counts.tried > 0 || budget.is_zero(),
        "{name}: no input tried"
    );
}
