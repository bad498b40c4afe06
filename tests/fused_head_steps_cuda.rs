//! The CUDA loss heads from hidden states (`CudaBackend::kto_head_step` / `dpo_head_step`) against
//! the CPU heads (`fused_head::kto_head_step` / `dpo_head_step`, themselves tested against the
//! step from materialized logits in `tests/fused_head_steps.rs`): padded and packed, reference and
//! KL pairs given or from hidden states, bf16 too; and the CPU heads' errors.

mod device_support;
mod fused_support;

use device_support::cuda;
use fused_support::{max_abs_diff, Problem};
use half::bf16;
use halo_kernels::cpu::SequenceLayout;
use halo_kernels::cuda::{
    CudaBackend, CudaHeadStep, CudaHiddenBatch, CudaKlSource, CudaKtoHeadInputs, CudaLmHead,
    CudaLogit, CudaReferenceSource, CudaSlice,
};
use halo_kernels::fused_head::{
    dpo_head_step, kto_head_step, FusedChunks, HeadStep, HiddenBatch, KlSource, KtoHeadInputs,
    ReferenceSource,
};
use halo_kernels::losses::{DpoConfig, DpoLossType, KlInput, KtoConfig};
use halo_kernels::{HaloError, IGNORE_INDEX};

const CHUNKS: Option<FusedChunks> = Some(FusedChunks {
    row_tile: 5,
    vocab_tile: 7,
    vocab_groups: 2,
});

/// A problem's buffers on the device.
struct OnDevice<T: CudaLogit> {
    hidden: CudaSlice<T>,
    weight: CudaSlice<T>,
    bias: Option<CudaSlice<T>>,
}

impl<T: CudaLogit> OnDevice<T> {
    fn new(gpu: &CudaBackend, p: &Problem<T>) -> Self {
        OnDevice {
            hidden: gpu.htod(&p.hidden).unwrap(),
            weight: gpu.htod(&p.weight).unwrap(),
            bias: p.bias.as_deref().map(|b| gpu.htod(b).unwrap()),
        }
    }
    fn head(&self, p: &Problem<T>) -> CudaLmHead<'_, T> {
        CudaLmHead {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            vocab: p.vocab,
            hidden_size: p.h,
        }
    }
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-3f64, |m, &x| m.max(x.abs() as f64));
    let d = max_abs_diff(
        got.iter().map(|&x| x as f64),
        want.iter().map(|&x| x as f64),
    );
    assert!(d <= tol * scale, "{what}: max |diff| {d} (scale {scale})");
}

fn compare<L, M>(
    gpu: &CudaBackend,
    got: &CudaHeadStep<L>,
    want: &HeadStep<M>,
    loss: (f64, f64),
    ctx: &str,
) {
    assert!(
        (loss.0 - loss.1).abs() <= 1e-5 * (1.0 + loss.1.abs()),
        "{ctx}: loss {loss:?}"
    );
    close(
        &format!("{ctx}: policy_logps"),
        &got.policy_logps,
        &want.policy_logps,
        1e-5,
    );
    close(
        &format!("{ctx}: reference_logps"),
        &got.reference_logps,
        &want.reference_logps,
        1e-5,
    );
    assert_eq!(got.token_counts, want.token_counts, "{ctx}: token counts");
    let token_logps = gpu.dtoh(&got.token_logps).unwrap();
    close(
        &format!("{ctx}: token_logps"),
        &token_logps,
        &want.token_logps,
        1e-5,
    );
    let token_grad = gpu.dtoh(&got.token_grad).unwrap();
    close(
        &format!("{ctx}: token_grad"),
        &token_grad,
        &want.token_grad,
        1e-4,
    );
    let dh = gpu.dtoh(&got.grads.hidden).unwrap();
    close(&format!("{ctx}: ∂hidden"), &dh, &want.grads.hidden, 1e-4);
    let dw = gpu.dtoh(&got.grads.weight).unwrap();
    close(&format!("{ctx}: ∂weight"), &dw, &want.grads.weight, 1e-4);
    match (&got.grads.bias, &want.grads.bias) {
        (Some(g), Some(w)) => close(&format!("{ctx}: ∂bias"), &gpu.dtoh(g).unwrap(), w, 1e-4),
        (None, None) => {}
        _ => panic!("{ctx}: bias gradient present on one side only"),
    }
}

fn layouts(cu: &[u32]) -> [SequenceLayout<'_>; 2] {
    [
        SequenceLayout::Padded { batch: 4, seq: 6 },
        SequenceLayout::Packed { cu_seqlens: cu },
    ]
}

fn kto_against_the_cpu<T: CudaLogit>() {
    let gpu = cuda();
    let cu = [0u32, 4, 11, 17, 24];
    let policy = Problem::<T>::random(1, 24, 29, 9, true, 5);
    let mut reference = Problem::<T>::random(2, 24, 29, 9, false, 0);
    reference.labels = policy.labels.clone();
    let mut kl_policy = Problem::<T>::random(3, 24, 29, 9, false, 4);
    (kl_policy.weight, kl_policy.bias) = (policy.weight.clone(), policy.bias.clone());
    let mut kl_ref = Problem::<T>::random(4, 24, 29, 9, false, 0);
    kl_ref.weight = reference.weight.clone();
    kl_ref.labels = kl_policy.labels.clone();
    let is_desirable = [true, false, false, true];
    let config = KtoConfig {
        beta: 0.3,
        desirable_weight: 1.2,
        ..KtoConfig::default()
    };
    let (dp, dr, dkp, dkr) = (
        OnDevice::new(gpu, &policy),
        OnDevice::new(gpu, &reference),
        OnDevice::new(gpu, &kl_policy),
        OnDevice::new(gpu, &kl_ref),
    );
    for layout in layouts(&cu) {
        let batch = |p| host_batch(p, layout);
        let cpu_batch = batch(&policy);
        let want = kto_head_step(
            &config,
            &cpu_batch,
            &policy.head(),
            &KtoHeadInputs {
                reference: ReferenceSource::Hidden {
                    hidden: &reference.hidden,
                    head: reference.head(),
                },
                is_desirable: &is_desirable,
                kl: Some(KlSource::Hidden {
                    policy: batch(&kl_policy),
                    reference: ReferenceSource::Hidden {
                        hidden: &kl_ref.hidden,
                        head: kl_ref.head(),
                    },
                }),
            },
            CHUNKS,
        )
        .unwrap();
        let dbatch = |p, d| device_batch(p, d, layout);
        let got = gpu
            .kto_head_step(
                &config,
                &dbatch(&policy, &dp),
                &dp.head(&policy),
                &CudaKtoHeadInputs {
                    reference: CudaReferenceSource::Hidden {
                        hidden: &dr.hidden,
                        head: dr.head(&reference),
                    },
                    is_desirable: &is_desirable,
                    kl: Some(CudaKlSource::Hidden {
                        policy: dbatch(&kl_policy, &dkp),
                        reference: CudaReferenceSource::Hidden {
                            hidden: &dkr.hidden,
                            head: dkr.head(&kl_ref),
                        },
                    }),
                },
                CHUNKS,
            )
            .unwrap();
        let ctx = format!("kto {:?} {layout:?} from hidden", T::DTYPE);
        compare(gpu, &got, &want, (got.loss.loss, want.loss.loss), &ctx);
        assert!((got.loss.z0 - want.loss.z0).abs() < 1e-5, "{ctx}: z0");
        // Reference and KL pairs given as sums: the same step.
        let given = gpu
            .kto_head_step(
                &config,
                &dbatch(&policy, &dp),
                &dp.head(&policy),
                &CudaKtoHeadInputs {
                    reference: CudaReferenceSource::Sums(&want.reference_logps),
                    is_desirable: &is_desirable,
                    kl: Some(CudaKlSource::Given(KlInput::LogProbs {
                        policy: &kl_sums(&kl_policy, &kl_policy.head(), layout),
                        reference: &kl_sums(&kl_ref, &kl_ref.head(), layout),
                    })),
                },
                None,
            )
            .unwrap();
        let ctx = format!("kto {:?} {layout:?} given sums", T::DTYPE);
        compare(gpu, &given, &want, (given.loss.loss, want.loss.loss), &ctx);
    }
}

fn host_batch<'a, T: CudaLogit>(
    p: &'a Problem<T>,
    layout: SequenceLayout<'a>,
) -> HiddenBatch<'a, T> {
    HiddenBatch {
        hidden: &p.hidden,
        labels: &p.labels,
        ignore_index: IGNORE_INDEX,
        layout,
    }
}

fn device_batch<'a, T: CudaLogit>(
    p: &'a Problem<T>,
    d: &'a OnDevice<T>,
    layout: SequenceLayout<'a>,
) -> CudaHiddenBatch<'a, T> {
    CudaHiddenBatch {
        hidden: &d.hidden,
        labels: &p.labels,
        ignore_index: IGNORE_INDEX,
        layout,
    }
}

/// The KL pairs' summed log-probs through the CPU fused forward.
fn kl_sums<T: CudaLogit>(
    p: &Problem<T>,
    head: &halo_kernels::fused_head::LmHead<'_, T>,
    layout: SequenceLayout<'_>,
) -> Vec<f32> {
    let f = halo_kernels::fused_head::fused_linear_token_logprobs(
        &p.hidden,
        head,
        &p.labels,
        IGNORE_INDEX,
        None,
    )
    .unwrap();
    halo_kernels::cpu::sequence_sums(&f.logp, &p.labels, IGNORE_INDEX, layout)
        .unwrap()
        .sums
}

#[test]
fn kto_head_matches_the_cpu_head_f32() {
    kto_against_the_cpu::<f32>();
}

#[test]
fn kto_head_matches_the_cpu_head_bf16() {
    kto_against_the_cpu::<bf16>();
}

#[test]
fn dpo_head_matches_the_cpu_head() {
    let gpu = cuda();
    let cu = [0u32, 5, 12, 18, 24];
    let policy = Problem::<f32>::random(11, 24, 23, 5, true, 4);
    let mut reference = Problem::<f32>::random(12, 24, 23, 5, true, 0);
    reference.labels = policy.labels.clone();
    let (dp, dr) = (OnDevice::new(gpu, &policy), OnDevice::new(gpu, &reference));
    // Every loss type: the head passes both token counts (IPO and SFT read them; AOT sorts).
    for loss_type in DpoLossType::ALL {
        let config = DpoConfig {
            beta: 0.2,
            loss_type,
            // Used by sigmoid, robust, exo_pair (which needs ε > 0) and AOT; ignored otherwise.
            label_smoothing: 0.1,
            ..DpoConfig::default()
        };
        for layout in layouts(&cu) {
            let want = dpo_head_step(
                &config,
                &HiddenBatch {
                    hidden: &policy.hidden,
                    labels: &policy.labels,
                    ignore_index: IGNORE_INDEX,
                    layout,
                },
                &policy.head(),
                &ReferenceSource::Hidden {
                    hidden: &reference.hidden,
                    head: reference.head(),
                },
                CHUNKS,
            )
            .unwrap();
            let got = gpu
                .dpo_head_step(
                    &config,
                    &CudaHiddenBatch {
                        hidden: &dp.hidden,
                        labels: &policy.labels,
                        ignore_index: IGNORE_INDEX,
                        layout,
                    },
                    &dp.head(&policy),
                    &CudaReferenceSource::Hidden {
                        hidden: &dr.hidden,
                        head: dr.head(&reference),
                    },
                    CHUNKS,
                )
                .unwrap();
            let ctx = format!("dpo {loss_type:?} {layout:?}");
            compare(gpu, &got, &want, (got.loss.loss, want.loss.loss), &ctx);
        }
    }
}

#[test]
fn bad_input_is_the_cpu_heads_error() {
    let gpu = cuda();
    let policy = Problem::<f32>::random(21, 18, 11, 3, false, 0);
    let dp = OnDevice::new(gpu, &policy);
    let layout = SequenceLayout::Padded { batch: 3, seq: 6 };
    // An odd number of sequences for a pair loss.
    let cpu = dpo_head_step(
        &DpoConfig::default(),
        &HiddenBatch {
            hidden: &policy.hidden,
            labels: &policy.labels,
            ignore_index: IGNORE_INDEX,
            layout,
        },
        &policy.head(),
        &ReferenceSource::Sums(&[0.0; 3]),
        None,
    )
    .unwrap_err();
    let batch = CudaHiddenBatch {
        hidden: &dp.hidden,
        labels: &policy.labels,
        ignore_index: IGNORE_INDEX,
        layout,
    };
    let got = gpu
        .dpo_head_step(
            &DpoConfig::default(),
            &batch,
            &dp.head(&policy),
            &CudaReferenceSource::Sums(&[0.0; 3]),
            None,
        )
        .unwrap_err();
    assert_eq!(format!("{got}"), format!("{cpu}"));
    // KTO without KL pairs for the `kto` loss type.
    let e = gpu
        .kto_head_step(
            &KtoConfig::default(),
            &batch,
            &dp.head(&policy),
            &CudaKtoHeadInputs {
                reference: CudaReferenceSource::Sums(&[0.0; 3]),
                is_desirable: &[true, false, true],
                kl: None,
            },
            None,
        )
        .unwrap_err();
    assert!(matches!(e, HaloError::MissingKlPairs { .. }), "{e}");
}
