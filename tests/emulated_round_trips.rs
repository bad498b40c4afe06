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

/// Host waits of one `CudaBackend::kto_step` as measured (each a blocking read: the forward's
/// status, the sequence sums, the loss's outputs and gradient, the backward's status). Lower it
/// when the chain loses one; the goal is 1 (status and loss read together).
const KTO_STEP_MAX_HOST_WAITS: u64 = 6;
/// The same for `CudaBackend::dpo_step` (also reads the token counts and both halves' sums).
const DPO_STEP_MAX_HOST_WAITS: u64 = 8;

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
        counts.host_waits <= DPO_STEP_MAX_HOST_WAITS,
        "a DPO step waits for the device {} times (bound {DPO_STEP_MAX_HOST_WAITS}): {counts:?}",
        counts.host_waits
    );
}
