//! Host round trips of a training step, counted on the emulated device (`emulation::call_counts`):
//! every synchronize and synchronous device-to-host copy is a point where the host waits for the
//! device, which on a GPU costs a round trip (~10 µs, dominant at small shapes). The counts are
//! printed and held to an upper bound so that a new wait in the launch chain fails here.
//!
//! Emulated device only: the counters live in the emulated driver.

use half::bf16;
use halo_kernels::cpu::SequenceLayout;
use halo_kernels::cuda::{
    CudaBackend, CudaKlInput, CudaKtoStepInputs, CudaLogits, CudaPairReference,
};
use halo_kernels::emulation::{call_counts, CallCounts};
use halo_kernels::losses::{DpoConfig, KtoConfig};
use rand::{Rng, SeedableRng};

/// Host waits of one `CudaBackend::kto_step`: the whole chain is queued, then the kernels' status,
/// the loss's outputs and the sums are read together (one copy, one wait). Was 6 (the forward's
/// status, the sequence sums, the loss's outputs and gradient, the broadcast's check, the
/// backward's status, each its own blocking read).
const KTO_STEP_MAX_HOST_WAITS: u64 = 1;
/// The same for `CudaBackend::dpo_step` (was 8: also the DPO kernel's status and both halves of
/// its gradient).
const DPO_STEP_MAX_HOST_WAITS: u64 = 1;
/// Device-to-host copies of a step: the one packed read.
const STEP_MAX_DEVICE_TO_HOST_COPIES: u64 = 1;

const VOCAB: usize = 37;
const SEQ: usize = 5;
const IGNORE: i32 = -100;

fn backend() -> CudaBackend {
    CudaBackend::emulated().expect("the emulated device (feature `emulation`) loads")
}

fn random_rows(batch: usize, seed: u64) -> (Vec<bf16>, Vec<i32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let rows = batch * SEQ;
    let logits = (0..rows * VOCAB)
        .map(|_| bf16::from_f32(rng.gen_range(-4.0f32..4.0)))
        .collect();
    // The first row of every sequence is prompt (ignored), the rest completion.
    let labels = (0..rows)
        .map(|r| {
            if r % SEQ == 0 {
                IGNORE
            } else {
                rng.gen_range(0..VOCAB as i32)
            }
        })
        .collect();
    (logits, labels)
}

/// Counts of `f` alone: zeroed before, read after.
fn counted<R>(f: impl FnOnce() -> R) -> (R, CallCounts) {
    call_counts(true).expect("counters readable");
    let out = f();
    (out, call_counts(true).expect("counters readable"))
}

#[test]
fn the_counters_count_what_they_say() {
    let d = backend();
    let host = vec![1.5f32; 64];
    let (buf, up) = counted(|| d.htod(&host).unwrap());
    assert_eq!(up.host_to_device_copies, 1, "{up:?}");
    assert_eq!(up.device_to_host_copies, 0, "{up:?}");
    let (back, down) = counted(|| d.dtoh(&buf).unwrap());
    assert_eq!(back, host);
    assert_eq!(down.device_to_host_copies, 1, "{down:?}");
    assert_eq!(down.host_waits, 1, "one read, one wait: {down:?}");
    assert_eq!(down.kernel_launches, 0, "{down:?}");
}

#[test]
fn kto_step_host_round_trips() {
    let d = backend();
    let batch = 4;
    let (logits, labels) = random_rows(batch, 7);
    let mut logits = d.htod(&logits).unwrap();
    let labels = d.htod(&labels).unwrap();
    let reference = d.htod(&[-9.0f32, -8.5, -10.0, -9.5]).unwrap();
    let desirable = d.htod(&[1u8, 0, 1, 0]).unwrap();
    let kl_policy = d.htod(&[-9.1f32, -8.7, -9.9, -9.4]).unwrap();
    let kl_reference = d.htod(&[-9.0f32, -8.8, -10.1, -9.6]).unwrap();
    let (step, counts) = counted(|| {
        d.kto_step(
            &KtoConfig::default(),
            CudaLogits {
                logits: &mut logits,
                labels: &labels,
                vocab: VOCAB,
                ignore_index: IGNORE,
                layout: SequenceLayout::Padded { batch, seq: SEQ },
            },
            &CudaKtoStepInputs {
                reference_logps: reference.as_view(),
                is_desirable: desirable.as_view(),
                kl: Some(CudaKlInput::LogProbs {
                    policy: kl_policy.as_view(),
                    reference: kl_reference.as_view(),
                }),
            },
        )
    });
    let step = step.expect("a valid KTO step");
    assert!(step.loss.loss.is_finite());
    println!(
        "KTO step ({batch}×{SEQ} rows, vocab {VOCAB}): {} host waits, {} device-to-host copies, \
         {} launches, {} allocations",
        counts.host_waits, counts.device_to_host_copies, counts.kernel_launches, counts.allocations
    );
    assert!(
        counts.host_waits >= 1,
        "the loss must reach the host: {counts:?}"
    );
    assert!(
        counts.device_to_host_copies <= STEP_MAX_DEVICE_TO_HOST_COPIES,
        "{counts:?}"
    );
    assert!(
        counts.host_waits <= KTO_STEP_MAX_HOST_WAITS,
        "a KTO step waits for the device {} times (bound {KTO_STEP_MAX_HOST_WAITS}): {counts:?}",
        counts.host_waits
    );
}

#[test]
fn dpo_step_host_round_trips() {
    let d = backend();
    let batch = 4; // 2 chosen, then 2 rejected
    let (logits, labels) = random_rows(batch, 8);
    let mut logits = d.htod(&logits).unwrap();
    let labels = d.htod(&labels).unwrap();
    let chosen = d.htod(&[-9.0f32, -8.5]).unwrap();
    let rejected = d.htod(&[-10.0f32, -9.5]).unwrap();
    let (step, counts) = counted(|| {
        d.dpo_step(
            &DpoConfig::default(),
            CudaLogits {
                logits: &mut logits,
                labels: &labels,
                vocab: VOCAB,
                ignore_index: IGNORE,
                layout: SequenceLayout::Padded { batch, seq: SEQ },
            },
            &CudaPairReference {
                chosen_logps: chosen.as_view(),
                rejected_logps: rejected.as_view(),
            },
        )
    });
    let step = step.expect("a valid DPO step");
    assert!(step.loss.loss.is_finite());
    println!(
        "DPO step ({batch}×{SEQ} rows, vocab {VOCAB}): {} host waits, {} device-to-host copies, \
         {} launches, {} allocations",
        counts.host_waits, counts.device_to_host_copies, counts.kernel_launches, counts.allocations
    );
    assert!(
        counts.host_waits >= 1,
        "the loss must reach the host: {counts:?}"
    );
    assert!(
        counts.device_to_host_copies <= STEP_MAX_DEVICE_TO_HOST_COPIES,
        "{counts:?}"
    );
    assert!(
        counts.host_waits <= DPO_STEP_MAX_HOST_WAITS,
        "a DPO step waits for the device {} times (bound {DPO_STEP_MAX_HOST_WAITS}): {counts:?}",
        counts.host_waits
    );
}

// ---- errors: the device step's are the CPU step's, in the CPU's order ----------------------------
//
// The device step checks what its kernels found only after the whole chain has run (one read), so
// these cases put several faults in one step and hold the device's error to the CPU step's (the
// independent reference: `halo_kernels::step`, which stops at the first failing op).

use half::f16;
use halo_kernels::cuda::CudaLogit;
use halo_kernels::losses::{DpoLossType, KlInput};
use halo_kernels::step::{self, KtoStepInputs, Logits, PairReference};
use halo_kernels::HaloError;

/// A KTO step's host inputs (4 sequences of `SEQ` rows).
struct KtoCase<T> {
    config: KtoConfig,
    logits: Vec<T>,
    labels: Vec<i32>,
    batch: usize,
    reference: Vec<f32>,
    desirable: Vec<bool>,
    kl: Option<(Vec<f32>, Vec<f32>)>,
}

fn kto_case(seed: u64) -> KtoCase<bf16> {
    let (logits, labels) = random_rows(4, seed);
    KtoCase {
        config: KtoConfig::default(),
        logits,
        labels,
        batch: 4,
        reference: vec![-9.0, -8.5, -10.0, -9.5],
        desirable: vec![true, false, true, false],
        kl: Some((vec![-9.1, -8.7, -9.9, -9.4], vec![-9.0, -8.8, -10.1, -9.6])),
    }
}

/// The device step's result (its error, or `None`) and its host waits, beside the CPU step's error.
fn kto_errors<T: CudaLogit>(
    d: &CudaBackend,
    c: &KtoCase<T>,
) -> (Option<HaloError>, Option<HaloError>, u64) {
    let layout = SequenceLayout::Padded {
        batch: c.batch,
        seq: SEQ,
    };
    let cpu = step::kto_step(
        &c.config,
        &Logits {
            logits: &c.logits,
            labels: &c.labels,
            vocab: VOCAB,
            ignore_index: IGNORE,
            layout,
        },
        &KtoStepInputs {
            reference_logps: &c.reference,
            is_desirable: &c.desirable,
            kl: c.kl.as_ref().map(|(p, r)| KlInput::LogProbs {
                policy: p,
                reference: r,
            }),
        },
    )
    .err();
    let mut logits = d.htod(&c.logits).unwrap();
    let labels = d.htod(&c.labels).unwrap();
    let reference = d.htod(&c.reference).unwrap();
    let desirable: Vec<u8> = c.desirable.iter().map(|&b| u8::from(b)).collect();
    let desirable = d.htod(&desirable).unwrap();
    let kl =
        c.kl.as_ref()
            .map(|(p, r)| (d.htod(p).unwrap(), d.htod(r).unwrap()));
    let (device, counts) = counted(|| {
        d.kto_step(
            &c.config,
            CudaLogits {
                logits: &mut logits,
                labels: &labels,
                vocab: VOCAB,
                ignore_index: IGNORE,
                layout,
            },
            &CudaKtoStepInputs {
                reference_logps: reference.as_view(),
                is_desirable: desirable.as_view(),
                kl: kl.as_ref().map(|(p, r)| CudaKlInput::LogProbs {
                    policy: p.as_view(),
                    reference: r.as_view(),
                }),
            },
        )
    });
    (device.err(), cpu, counts.host_waits)
}

#[test]
fn kto_step_errors_are_the_cpu_steps_in_its_order() {
    let d = backend();
    let mut cases: Vec<(&str, KtoCase<bf16>)> = Vec::new();
    cases.push(("valid", kto_case(11)));
    let mut c = kto_case(12);
    c.labels[7] = VOCAB as i32 + 3;
    cases.push(("bad label", c));
    let mut c = kto_case(13);
    c.logits[12 * VOCAB + 5] = bf16::NAN;
    c.labels[12] = 1;
    cases.push(("NaN logit", c));
    let mut c = kto_case(14);
    c.labels[9] = -7;
    c.config.beta = -1.0;
    cases.push(("bad label before a bad config", c));
    let mut c = kto_case(15);
    c.config.beta = 0.0;
    cases.push(("bad config", c));
    let mut c = kto_case(16);
    c.kl = None;
    cases.push(("missing KL pairs", c));
    let mut c = kto_case(17);
    c.kl = None;
    c.logits[3 * VOCAB] = bf16::INFINITY;
    c.labels[3] = 2;
    cases.push(("infinite logit before missing KL pairs", c));
    let mut c = kto_case(18);
    c.batch = 3;
    cases.push(("layout that does not cover the rows", c));
    let mut c = kto_case(19);
    c.batch = 3;
    c.labels[2] = VOCAB as i32;
    cases.push(("bad label before a bad layout", c));
    let mut c = kto_case(20);
    c.reference[2] = f32::NAN;
    cases.push(("NaN reference log-prob", c));
    let mut c = kto_case(21);
    c.reference.pop();
    c.desirable.pop();
    cases.push(("short reference", c));
    let mut c = kto_case(22);
    c.config.beta = 1e30;
    cases.push(("valid with a huge beta", c));
    for (what, case) in &cases {
        let (device, cpu, waits) = kto_errors(&d, case);
        assert_eq!(device, cpu, "{what}: device vs CPU");
        assert_eq!(
            what.starts_with("valid"),
            cpu.is_none(),
            "{what}: the case is what it says: {cpu:?}"
        );
        if cpu.is_none() {
            assert_eq!(waits, 1, "{what}: a valid step waits once");
        }
    }
}

/// A DPO step's host inputs (2 pairs: sequences 0, 1 chosen, 2, 3 rejected).
struct DpoCase<T> {
    config: DpoConfig,
    logits: Vec<T>,
    labels: Vec<i32>,
    batch: usize,
    chosen: Vec<f32>,
    rejected: Vec<f32>,
}

fn dpo_case<T: CudaLogit>(seed: u64) -> DpoCase<T> {
    let (logits, labels) = random_rows(4, seed);
    DpoCase {
        config: DpoConfig::default(),
        logits: logits.iter().map(|&v| T::from_f32(v.to_f32())).collect(),
        labels,
        batch: 4,
        chosen: vec![-9.0, -8.5],
        rejected: vec![-10.0, -9.5],
    }
}

fn dpo_errors<T: CudaLogit>(
    d: &CudaBackend,
    c: &DpoCase<T>,
) -> (Option<HaloError>, Option<HaloError>, u64) {
    let layout = SequenceLayout::Padded {
        batch: c.batch,
        seq: SEQ,
    };
    let cpu = step::dpo_step(
        &c.config,
        &Logits {
            logits: &c.logits,
            labels: &c.labels,
            vocab: VOCAB,
            ignore_index: IGNORE,
            layout,
        },
        &PairReference {
            chosen_logps: &c.chosen,
            rejected_logps: &c.rejected,
        },
    )
    .err();
    let mut logits = d.htod(&c.logits).unwrap();
    let labels = d.htod(&c.labels).unwrap();
    let chosen = d.htod(&c.chosen).unwrap();
    let rejected = d.htod(&c.rejected).unwrap();
    let (device, counts) = counted(|| {
        d.dpo_step(
            &c.config,
            CudaLogits {
                logits: &mut logits,
                labels: &labels,
                vocab: VOCAB,
                ignore_index: IGNORE,
                layout,
            },
            &CudaPairReference {
                chosen_logps: chosen.as_view(),
                rejected_logps: rejected.as_view(),
            },
        )
    });
    (device.err(), cpu, counts.host_waits)
}

#[test]
fn dpo_step_errors_are_the_cpu_steps_in_its_order() {
    let d = backend();
    let mut cases: Vec<(&str, DpoCase<bf16>)> = Vec::new();
    cases.push(("valid", dpo_case(31)));
    let mut c = dpo_case(32);
    c.labels[13] = VOCAB as i32 + 1;
    cases.push(("bad label", c));
    let mut c = dpo_case(33);
    c.logits[6 * VOCAB + 1] = bf16::NEG_INFINITY;
    c.labels[6] = 0;
    cases.push(("infinite logit", c));
    let mut c = dpo_case(34);
    c.config.loss_type = DpoLossType::Ipo;
    for label in &mut c.labels[SEQ..2 * SEQ] {
        *label = IGNORE;
    }
    cases.push(("IPO with an empty sequence", c));
    let mut c = dpo_case(35);
    c.config.label_smoothing = 2.0;
    c.labels[4] = VOCAB as i32;
    cases.push(("bad label before a bad label smoothing", c));
    let mut c = dpo_case(36);
    c.config.label_smoothing = 2.0;
    cases.push(("bad label smoothing", c));
    let mut c = dpo_case(37);
    c.rejected[1] = f32::INFINITY;
    cases.push(("infinite reference log-prob", c));
    let mut c = dpo_case(38);
    c.batch = 5;
    cases.push(("layout that does not cover the rows", c));
    for (what, case) in &cases {
        let (device, cpu, waits) = dpo_errors(&d, case);
        assert_eq!(device, cpu, "{what}: device vs CPU");
        assert_eq!(
            what.starts_with("valid"),
            cpu.is_none(),
            "{what}: the case is what it says: {cpu:?}"
        );
        if cpu.is_none() {
            assert_eq!(waits, 1, "{what}: a valid step waits once");
        }
    }
}

#[test]
fn a_gradient_the_dtype_cannot_hold_is_the_cpu_steps_error() {
    // Hinge with a huge β: ∂L/∂logp = ∓β/n on every counted token, beyond f16's 65504 — found by
    // the backward (the last kernel of the chain), after a forward and a loss that pass.
    let d = backend();
    let mut c = dpo_case::<f16>(41);
    c.config.loss_type = DpoLossType::Hinge;
    c.config.beta = 1e6;
    let (device, cpu, _) = dpo_errors(&d, &c);
    assert!(cpu.is_some(), "the CPU step refuses it");
    assert_eq!(device, cpu);
}

#[test]
fn a_step_on_a_non_blocking_stream_waits_once_and_agrees() {
    // `with_stream(ctx.new_stream())`: a CU_STREAM_NON_BLOCKING stream (cudarc's event tracking on,
    // as the context is then in multi-stream mode). Same chain, same single wait, same loss.
    let d = backend();
    let stream = d.context().new_stream().expect("a non-blocking stream");
    let nb = CudaBackend::with_stream(stream).expect("a backend on it");
    let case = kto_case(51);
    let run = |d: &CudaBackend| {
        let layout = SequenceLayout::Padded {
            batch: case.batch,
            seq: SEQ,
        };
        let mut logits = d.htod(&case.logits).unwrap();
        let labels = d.htod(&case.labels).unwrap();
        let reference = d.htod(&case.reference).unwrap();
        let desirable: Vec<u8> = case.desirable.iter().map(|&b| u8::from(b)).collect();
        let desirable = d.htod(&desirable).unwrap();
        let (p, r) = case.kl.as_ref().unwrap();
        let (p, r) = (d.htod(p).unwrap(), d.htod(r).unwrap());
        let (step, counts) = counted(|| {
            d.kto_step(
                &case.config,
                CudaLogits {
                    logits: &mut logits,
                    labels: &labels,
                    vocab: VOCAB,
                    ignore_index: IGNORE,
                    layout,
                },
                &CudaKtoStepInputs {
                    reference_logps: reference.as_view(),
                    is_desirable: desirable.as_view(),
                    kl: Some(CudaKlInput::LogProbs {
                        policy: p.as_view(),
                        reference: r.as_view(),
                    }),
                },
            )
        });
        (
            step.unwrap().loss.loss,
            d.dtoh(&logits).unwrap(),
            counts.host_waits,
        )
    };
    let (loss, grad, waits) = run(&nb);
    let (want_loss, want_grad, _) = run(&d);
    assert_eq!(waits, 1);
    assert_eq!(loss, want_loss);
    assert_eq!(grad, want_grad);
}

#[test]
fn a_packed_step_waits_once_too() {
    // The packed layout uploads its offsets (host-to-device copies, which do not wait).
    let d = backend();
    let (logits, labels) = random_rows(4, 61);
    let cu_seqlens = [0u32, 5, 10, 15, 20];
    let mut logits = d.htod(&logits).unwrap();
    let labels = d.htod(&labels).unwrap();
    let chosen = d.htod(&[-9.0f32, -8.5]).unwrap();
    let rejected = d.htod(&[-10.0f32, -9.5]).unwrap();
    let (step, counts) = counted(|| {
        d.dpo_step(
            &DpoConfig {
                loss_type: DpoLossType::Ipo,
                ..DpoConfig::default()
            },
            CudaLogits {
                logits: &mut logits,
                labels: &labels,
                vocab: VOCAB,
                ignore_index: IGNORE,
                layout: SequenceLayout::Packed {
                    cu_seqlens: &cu_seqlens,
                },
            },
            &CudaPairReference {
                chosen_logps: chosen.as_view(),
                rejected_logps: rejected.as_view(),
            },
        )
    });
    assert!(step.expect("a valid IPO step").loss.loss.is_finite());
    assert_eq!(counts.host_waits, 1, "{counts:?}");
    assert_eq!(counts.device_to_host_copies, 1, "{counts:?}");
}
