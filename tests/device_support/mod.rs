//! One test body per op, run on every backend present (in the spirit of candle's `test_device!`):
//! the [`Device`] trait gives every op a host-slice signature (the CPU op's), implemented by the CPU
//! ops ([`Cpu`]) and by [`CudaBackend`] (upload, the device op, download). A body generic over
//! `D: Device` checks against f64 references or independent definitions, never against the device
//! itself; [`device_tests!`] instantiates it as `<body>::cpu` and `<body>::cuda`.
//!
//! `cuda` runs on the real GPU when one is present, else on the emulated CUDA device
//! ([`halo_kernels::emulation`]), so on a machine without a GPU the CUDA wrappers run, never skip.
//! `HALO_CUDA_EMULATED=1` forces the emulated device on a GPU machine.
#![allow(dead_code)]

use std::sync::OnceLock;

use halo_kernels::cpu::{
    self, LogRatioClamp, SavedLse, SequenceLayout, SequenceSums, TokenLogprobs,
};
use halo_kernels::cuda::{
    CudaBackend, CudaKlInput, CudaKtoBatch, CudaKtoStepInputs, CudaLogit, CudaLogits,
    CudaPairBatch, CudaPairReference, CudaSequenceSums, CudaStep, RowSplit,
};
use halo_kernels::losses::{
    self, DpoConfig, KlInput, KtoBatch, KtoConfig, KtoOutput, PairBatch, PairLossOutput,
};
use halo_kernels::step::{self, KtoStepInputs, Logits, LogitsStep, PairReference};
use halo_kernels::{LogitElement, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Every op with the CPU op's host-slice signature.
pub trait Device: Sync {
    /// "cpu", or the CUDA device's name.
    fn name(&self) -> String;

    fn token_logprobs<T: CudaLogit>(
        &self,
        logits: &[T],
        labels: &[i32],
        vocab: usize,
        ignore_index: i32,
    ) -> Result<TokenLogprobs>;

    #[allow(clippy::too_many_arguments)]
    fn token_logprobs_backward<T: CudaLogit>(
        &self,
        logits: &[T],
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
        ignore_index: i32,
        grad_logits: &mut [T],
    ) -> Result<()>;

    fn token_logprobs_backward_inplace<T: CudaLogit>(
        &self,
        logits: &mut [T],
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
        ignore_index: i32,
    ) -> Result<()>;

    fn sequence_sums(
        &self,
        token_values: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<SequenceSums>;

    fn sequence_logratio_sums(
        &self,
        policy_logp: &[f32],
        reference_logp: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        clamp: Option<LogRatioClamp>,
    ) -> Result<SequenceSums>;

    fn broadcast_sequence_grad(
        &self,
        grad_seq: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<Vec<f32>>;

    fn humanline_grad_mask(
        &self,
        policy_logp: &[f32],
        reference_logp: &[f32],
        clamp: LogRatioClamp,
        token_grad: &mut [f32],
    ) -> Result<()>;

    fn kto_loss(&self, config: &KtoConfig, batch: &KtoBatch<'_>) -> Result<KtoOutput>;

    fn dpo_loss(&self, config: &DpoConfig, batch: &PairBatch<'_>) -> Result<PairLossOutput>;

    /// [`halo_kernels::step::kto_step`]: logits → loss, metrics, ∂L/∂logits.
    fn kto_step<T: CudaLogit>(
        &self,
        config: &KtoConfig,
        policy: &Logits<'_, T>,
        inputs: &KtoStepInputs<'_>,
    ) -> Result<LogitsStep<KtoOutput, T>>;

    /// [`halo_kernels::step::dpo_step`]: logits → loss, metrics, ∂L/∂logits.
    fn dpo_step<T: CudaLogit>(
        &self,
        config: &DpoConfig,
        policy: &Logits<'_, T>,
        reference: &PairReference<'_>,
    ) -> Result<LogitsStep<PairLossOutput, T>>;
}

/// The CPU ops.
pub struct Cpu;

impl Device for Cpu {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn token_logprobs<T: CudaLogit>(
        &self,
        logits: &[T],
        labels: &[i32],
        vocab: usize,
        ignore_index: i32,
    ) -> Result<TokenLogprobs> {
        cpu::token_logprobs(logits, labels, vocab, ignore_index)
    }

    fn token_logprobs_backward<T: CudaLogit>(
        &self,
        logits: &[T],
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
        ignore_index: i32,
        grad_logits: &mut [T],
    ) -> Result<()> {
        cpu::token_logprobs_backward(
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
            grad_logits,
        )
    }

    fn token_logprobs_backward_inplace<T: CudaLogit>(
        &self,
        logits: &mut [T],
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
        ignore_index: i32,
    ) -> Result<()> {
        cpu::token_logprobs_backward_inplace(logits, labels, saved, grad_logp, vocab, ignore_index)
    }

    fn sequence_sums(
        &self,
        token_values: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<SequenceSums> {
        cpu::sequence_sums(token_values, labels, ignore_index, layout)
    }

    fn sequence_logratio_sums(
        &self,
        policy_logp: &[f32],
        reference_logp: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        clamp: Option<LogRatioClamp>,
    ) -> Result<SequenceSums> {
        cpu::sequence_logratio_sums(
            policy_logp,
            reference_logp,
            labels,
            ignore_index,
            layout,
            clamp,
        )
    }

    fn broadcast_sequence_grad(
        &self,
        grad_seq: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<Vec<f32>> {
        cpu::broadcast_sequence_grad(grad_seq, labels, ignore_index, layout)
    }

    fn humanline_grad_mask(
        &self,
        policy_logp: &[f32],
        reference_logp: &[f32],
        clamp: LogRatioClamp,
        token_grad: &mut [f32],
    ) -> Result<()> {
        cpu::humanline_grad_mask(policy_logp, reference_logp, clamp, token_grad)
    }

    fn kto_loss(&self, config: &KtoConfig, batch: &KtoBatch<'_>) -> Result<KtoOutput> {
        losses::kto_loss(config, batch)
    }

    fn dpo_loss(&self, config: &DpoConfig, batch: &PairBatch<'_>) -> Result<PairLossOutput> {
        losses::dpo_loss(config, batch)
    }

    fn kto_step<T: CudaLogit>(
        &self,
        config: &KtoConfig,
        policy: &Logits<'_, T>,
        inputs: &KtoStepInputs<'_>,
    ) -> Result<LogitsStep<KtoOutput, T>> {
        step::kto_step(config, policy, inputs)
    }

    fn dpo_step<T: CudaLogit>(
        &self,
        config: &DpoConfig,
        policy: &Logits<'_, T>,
        reference: &PairReference<'_>,
    ) -> Result<LogitsStep<PairLossOutput, T>> {
        step::dpo_step(config, policy, reference)
    }
}

/// A [`SavedLse`] uploaded to the device.
pub struct DeviceSavedLse {
    pub lse: halo_kernels::cuda::CudaSlice<f32>,
    pub residual: Option<halo_kernels::cuda::CudaSlice<f32>>,
}

impl DeviceSavedLse {
    pub fn as_saved(&self) -> SavedLse<&halo_kernels::cuda::CudaSlice<f32>> {
        SavedLse {
            lse: &self.lse,
            residual: self.residual.as_ref(),
        }
    }
}

/// Uploads the lse and its residual (if any).
pub fn upload_saved(gpu: &CudaBackend, saved: SavedLse<&[f32]>) -> Result<DeviceSavedLse> {
    Ok(DeviceSavedLse {
        lse: gpu.htod(saved.lse)?,
        residual: saved.residual.map(|r| gpu.htod(r)).transpose()?,
    })
}

/// The CUDA forward on host slices: upload, the op with `split`, download.
fn split_token_logprobs<T: CudaLogit>(
    gpu: &CudaBackend,
    split: RowSplit,
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
) -> Result<TokenLogprobs> {
    let out = gpu.token_logprobs_with_split(
        &gpu.htod(logits)?,
        &gpu.htod(labels)?,
        vocab,
        ignore_index,
        split,
    )?;
    Ok(TokenLogprobs {
        logp: gpu.dtoh(&out.logp)?,
        lse: gpu.dtoh(&out.lse)?,
        lse_residual: gpu.dtoh(&out.lse_residual)?,
    })
}

/// The CUDA backward on host slices. The output buffer starts as the caller's contents, as the
/// CPU op's `&mut` does.
#[allow(clippy::too_many_arguments)]
fn split_token_logprobs_backward<T: CudaLogit>(
    gpu: &CudaBackend,
    split: RowSplit,
    logits: &[T],
    labels: &[i32],
    saved: SavedLse<&[f32]>,
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
    grad_logits: &mut [T],
) -> Result<()> {
    let mut out = gpu.htod(grad_logits)?;
    gpu.token_logprobs_backward_with_split(
        &gpu.htod(logits)?,
        &gpu.htod(labels)?,
        upload_saved(gpu, saved)?.as_saved(),
        &gpu.htod(grad_logp)?,
        vocab,
        ignore_index,
        split,
        &mut out,
    )?;
    grad_logits.copy_from_slice(&gpu.dtoh(&out)?);
    Ok(())
}

/// The CUDA in-place backward on host slices.
#[allow(clippy::too_many_arguments)]
fn split_token_logprobs_backward_inplace<T: CudaLogit>(
    gpu: &CudaBackend,
    split: RowSplit,
    logits: &mut [T],
    labels: &[i32],
    saved: SavedLse<&[f32]>,
    grad_logp: &[f32],
    vocab: usize,
    ignore_index: i32,
) -> Result<()> {
    let mut buf = gpu.htod(logits)?;
    gpu.token_logprobs_backward_inplace_with_split(
        &mut buf,
        &gpu.htod(labels)?,
        upload_saved(gpu, saved)?.as_saved(),
        &gpu.htod(grad_logp)?,
        vocab,
        ignore_index,
        split,
    )?;
    logits.copy_from_slice(&gpu.dtoh(&buf)?);
    Ok(())
}

/// The CUDA backend the tests run on: the real GPU when present (and `HALO_CUDA_EMULATED` is
/// unset), else the emulated device — but not with `HALO_REQUIRE_GPU=1`, as
/// `scripts/gpu_check.sh` sets, where a missing GPU must not fall back silently.
pub fn cuda_backend() -> std::result::Result<CudaBackend, String> {
    let require_gpu = std::env::var("HALO_REQUIRE_GPU").is_ok_and(|v| v == "1");
    CudaBackend::new().or_else(|real| {
        if require_gpu {
            return Err(format!("HALO_REQUIRE_GPU=1 but no GPU: {real}"));
        }
        CudaBackend::emulated()
            .map_err(|emulated| format!("no GPU ({real}) and no emulated device ({emulated})"))
    })
}

/// [`cuda_backend`], shared by every test of the process. Panics, failing the test, when there is
/// none (the emulated device is built with the crate's tests, so that is a bug).
pub fn cuda() -> &'static CudaBackend {
    static BACKEND: OnceLock<std::result::Result<CudaBackend, String>> = OnceLock::new();
    match BACKEND.get_or_init(cuda_backend) {
        Ok(b) => b,
        Err(e) => panic!("no CUDA backend: {e}"),
    }
}

impl Device for CudaBackend {
    fn name(&self) -> String {
        self.device_name().unwrap_or_else(|e| format!("cuda ({e})"))
    }

    fn token_logprobs<T: CudaLogit>(
        &self,
        logits: &[T],
        labels: &[i32],
        vocab: usize,
        ignore_index: i32,
    ) -> Result<TokenLogprobs> {
        split_token_logprobs(self, RowSplit::Auto, logits, labels, vocab, ignore_index)
    }

    fn token_logprobs_backward<T: CudaLogit>(
        &self,
        logits: &[T],
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
        ignore_index: i32,
        grad_logits: &mut [T],
    ) -> Result<()> {
        split_token_logprobs_backward(
            self,
            RowSplit::Auto,
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
            grad_logits,
        )
    }

    fn token_logprobs_backward_inplace<T: CudaLogit>(
        &self,
        logits: &mut [T],
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
        ignore_index: i32,
    ) -> Result<()> {
        split_token_logprobs_backward_inplace(
            self,
            RowSplit::Auto,
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
        )
    }

    fn sequence_sums(
        &self,
        token_values: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<SequenceSums> {
        let out = CudaBackend::sequence_sums(
            self,
            &self.htod(token_values)?,
            &self.htod(labels)?,
            ignore_index,
            layout,
        )?;
        download_sums(self, &out)
    }

    fn sequence_logratio_sums(
        &self,
        policy_logp: &[f32],
        reference_logp: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        clamp: Option<LogRatioClamp>,
    ) -> Result<SequenceSums> {
        let out = CudaBackend::sequence_logratio_sums(
            self,
            &self.htod(policy_logp)?,
            &self.htod(reference_logp)?,
            &self.htod(labels)?,
            ignore_index,
            layout,
            clamp,
        )?;
        download_sums(self, &out)
    }

    fn broadcast_sequence_grad(
        &self,
        grad_seq: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<Vec<f32>> {
        let out = CudaBackend::broadcast_sequence_grad(
            self,
            &self.htod(grad_seq)?,
            &self.htod(labels)?,
            ignore_index,
            layout,
        )?;
        self.dtoh(&out)
    }

    fn humanline_grad_mask(
        &self,
        policy_logp: &[f32],
        reference_logp: &[f32],
        clamp: LogRatioClamp,
        token_grad: &mut [f32],
    ) -> Result<()> {
        let mut grad = self.htod(token_grad)?;
        CudaBackend::humanline_grad_mask(
            self,
            &self.htod(policy_logp)?,
            &self.htod(reference_logp)?,
            clamp,
            &mut grad,
        )?;
        token_grad.copy_from_slice(&self.dtoh(&grad)?);
        Ok(())
    }

    fn kto_loss(&self, config: &KtoConfig, batch: &KtoBatch<'_>) -> Result<KtoOutput> {
        let policy = self.htod(batch.policy_logps)?;
        let rest = KtoUploads::new(self, batch.reference_logps, batch.is_desirable, batch.kl)?;
        CudaBackend::kto_loss(
            self,
            config,
            &CudaKtoBatch {
                policy_logps: policy.as_view(),
                reference_logps: rest.reference.as_view(),
                is_desirable: rest.desirable.as_view(),
                kl: rest.kl(),
            },
        )
    }

    fn dpo_loss(&self, config: &DpoConfig, batch: &PairBatch<'_>) -> Result<PairLossOutput> {
        let pc = self.htod(batch.policy_chosen_logps)?;
        let pr = self.htod(batch.policy_rejected_logps)?;
        let rc = self.htod(batch.reference_chosen_logps)?;
        let rr = self.htod(batch.reference_rejected_logps)?;
        let cc = batch.chosen_counts.map(|c| self.htod(c)).transpose()?;
        let rcn = batch.rejected_counts.map(|c| self.htod(c)).transpose()?;
        CudaBackend::dpo_loss(
            self,
            config,
            &CudaPairBatch {
                policy_chosen_logps: pc.as_view(),
                policy_rejected_logps: pr.as_view(),
                reference_chosen_logps: rc.as_view(),
                reference_rejected_logps: rr.as_view(),
                chosen_counts: cc.as_ref().map(|c| c.as_view()),
                rejected_counts: rcn.as_ref().map(|c| c.as_view()),
            },
        )
    }

    fn kto_step<T: CudaLogit>(
        &self,
        config: &KtoConfig,
        policy: &Logits<'_, T>,
        inputs: &KtoStepInputs<'_>,
    ) -> Result<LogitsStep<KtoOutput, T>> {
        let mut logits = self.htod(policy.logits)?;
        let labels = self.htod(policy.labels)?;
        let rest = KtoUploads::new(self, inputs.reference_logps, inputs.is_desirable, inputs.kl)?;
        let out = CudaBackend::kto_step(
            self,
            config,
            CudaLogits {
                logits: &mut logits,
                labels: &labels,
                vocab: policy.vocab,
                ignore_index: policy.ignore_index,
                layout: policy.layout,
            },
            &CudaKtoStepInputs {
                reference_logps: rest.reference.as_view(),
                is_desirable: rest.desirable.as_view(),
                kl: rest.kl(),
            },
        )?;
        download_step(self, out, &logits)
    }

    fn dpo_step<T: CudaLogit>(
        &self,
        config: &DpoConfig,
        policy: &Logits<'_, T>,
        reference: &PairReference<'_>,
    ) -> Result<LogitsStep<PairLossOutput, T>> {
        let mut logits = self.htod(policy.logits)?;
        let labels = self.htod(policy.labels)?;
        let chosen = self.htod(reference.chosen_logps)?;
        let rejected = self.htod(reference.rejected_logps)?;
        let out = CudaBackend::dpo_step(
            self,
            config,
            CudaLogits {
                logits: &mut logits,
                labels: &labels,
                vocab: policy.vocab,
                ignore_index: policy.ignore_index,
                layout: policy.layout,
            },
            &CudaPairReference {
                chosen_logps: chosen.as_view(),
                rejected_logps: rejected.as_view(),
            },
        )?;
        download_step(self, out, &logits)
    }
}

/// Device sums and counts on the host.
fn download_sums(d: &CudaBackend, out: &CudaSequenceSums) -> Result<SequenceSums> {
    Ok(SequenceSums {
        sums: d.dtoh(&out.sums)?,
        counts: d.dtoh(&out.counts)?,
    })
}

/// A KTO batch's inputs besides the policy, uploaded: reference log-probs, feedback (as bytes),
/// and the KL pairs (when given as log-probs).
struct KtoUploads {
    reference: halo_kernels::cuda::CudaSlice<f32>,
    desirable: halo_kernels::cuda::CudaSlice<u8>,
    kl_partial: Option<halo_kernels::losses::ReferencePointPartial>,
    kl_logps: Option<(
        halo_kernels::cuda::CudaSlice<f32>,
        halo_kernels::cuda::CudaSlice<f32>,
    )>,
}

impl KtoUploads {
    fn new(
        d: &CudaBackend,
        reference: &[f32],
        is_desirable: &[bool],
        kl: Option<KlInput<'_>>,
    ) -> Result<Self> {
        let desirable: Vec<u8> = is_desirable.iter().map(|&x| x as u8).collect();
        let (kl_partial, kl_logps) = match kl {
            Some(KlInput::Partial(p)) => (Some(p), None),
            Some(KlInput::LogProbs { policy, reference }) => {
                (None, Some((d.htod(policy)?, d.htod(reference)?)))
            }
            None => (None, None),
        };
        Ok(KtoUploads {
            reference: d.htod(reference)?,
            desirable: d.htod(&desirable)?,
            kl_partial,
            kl_logps,
        })
    }

    fn kl(&self) -> Option<CudaKlInput<'_>> {
        match (&self.kl_partial, &self.kl_logps) {
            (Some(p), _) => Some(CudaKlInput::Partial(*p)),
            (None, Some((p, r))) => Some(CudaKlInput::LogProbs {
                policy: p.as_view(),
                reference: r.as_view(),
            }),
            (None, None) => None,
        }
    }
}

/// A device step's outputs on the host (the gradient is in the logits' buffer).
fn download_step<L, T: CudaLogit>(
    d: &CudaBackend,
    out: CudaStep<L>,
    grad_logits: &halo_kernels::cuda::CudaSlice<T>,
) -> Result<LogitsStep<L, T>> {
    Ok(LogitsStep {
        policy_logps: d.dtoh(&out.policy_logps)?,
        token_counts: d.dtoh(&out.token_counts)?,
        token_logps: d.dtoh(&out.token_logps)?,
        grad_logits: d.dtoh(grad_logits)?,
        loss: out.loss,
    })
}

/// `device_tests!(body_a, body_b, …)`: for each generic `fn body<D: Device>(d: &D)`, a module
/// `body` with the tests `cpu` and `cuda` (see [`cuda`] for which CUDA device).
#[macro_export]
macro_rules! device_tests {
    ($($body:ident),* $(,)?) => {
        $(
            mod $body {
                #[test]
                fn cpu() {
                    super::$body(&$crate::device_support::Cpu);
                }
                #[test]
                fn cuda() {
                    super::$body($crate::device_support::cuda());
                }
            }
        )*
    };
}

// ---- seeded random inputs and tolerant comparisons -----------------------------------------

pub const IGNORE: i32 = halo_kernels::IGNORE_INDEX;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Logits in [-scale, scale] (never all zero), stored in `T`.
pub fn random_logits<T: LogitElement>(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.gen_range(-scale..scale)))
        .collect()
}

/// Labels in 0..vocab with about `ignore_fraction` of them the ignore index.
pub fn random_labels(
    rng: &mut ChaCha8Rng,
    rows: usize,
    vocab: usize,
    ignore_fraction: f64,
) -> Vec<i32> {
    (0..rows)
        .map(|_| {
            if rng.gen_bool(ignore_fraction) {
                IGNORE
            } else {
                rng.gen_range(0..vocab as i32)
            }
        })
        .collect()
}

/// |a − b| ≤ abs + rel · max(|a|, |b|), element by element, with a useful message.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = abs + rel * g.abs().max(w.abs());
        assert!(
            (g - w).abs() <= tol || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: got {g}, want {w} (|diff| {} > tol {tol})",
            (g - w).abs()
        );
    }
}

pub fn to_f32<T: LogitElement>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// The CUDA backend with every token op forced to `split` blocks per row ([`RowSplit`]): the fuzz
/// targets' vocabularies are far below the size at which [`RowSplit::Auto`] splits, so without
/// this the split kernels (slices, the ordered merge, empty slices) would never see fuzzed input.
/// Every other op is the backend's own.
pub struct SplitCuda {
    pub split: RowSplit,
}

impl SplitCuda {
    fn gpu(&self) -> &'static CudaBackend {
        cuda()
    }
}

impl Device for SplitCuda {
    fn name(&self) -> String {
        format!("{} ({:?})", self.gpu().name(), self.split)
    }

    fn token_logprobs<T: CudaLogit>(
        &self,
        logits: &[T],
        labels: &[i32],
        vocab: usize,
        ignore_index: i32,
    ) -> Result<TokenLogprobs> {
        split_token_logprobs(self.gpu(), self.split, logits, labels, vocab, ignore_index)
    }

    fn token_logprobs_backward<T: CudaLogit>(
        &self,
        logits: &[T],
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
        ignore_index: i32,
        grad_logits: &mut [T],
    ) -> Result<()> {
        split_token_logprobs_backward(
            self.gpu(),
            self.split,
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
            grad_logits,
        )
    }

    fn token_logprobs_backward_inplace<T: CudaLogit>(
        &self,
        logits: &mut [T],
        labels: &[i32],
        saved: SavedLse<&[f32]>,
        grad_logp: &[f32],
        vocab: usize,
        ignore_index: i32,
    ) -> Result<()> {
        split_token_logprobs_backward_inplace(
            self.gpu(),
            self.split,
            logits,
            labels,
            saved,
            grad_logp,
            vocab,
            ignore_index,
        )
    }

    fn sequence_sums(
        &self,
        token_values: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<SequenceSums> {
        Device::sequence_sums(self.gpu(), token_values, labels, ignore_index, layout)
    }

    fn sequence_logratio_sums(
        &self,
        policy_logp: &[f32],
        reference_logp: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        clamp: Option<LogRatioClamp>,
    ) -> Result<SequenceSums> {
        Device::sequence_logratio_sums(
            self.gpu(),
            policy_logp,
            reference_logp,
            labels,
            ignore_index,
            layout,
            clamp,
        )
    }

    fn broadcast_sequence_grad(
        &self,
        grad_seq: &[f32],
        labels: &[i32],
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<Vec<f32>> {
        Device::broadcast_sequence_grad(self.gpu(), grad_seq, labels, ignore_index, layout)
    }

    fn humanline_grad_mask(
        &self,
        policy_logp: &[f32],
        reference_logp: &[f32],
        clamp: LogRatioClamp,
        token_grad: &mut [f32],
    ) -> Result<()> {
        Device::humanline_grad_mask(self.gpu(), policy_logp, reference_logp, clamp, token_grad)
    }

    fn kto_loss(&self, config: &KtoConfig, batch: &KtoBatch<'_>) -> Result<KtoOutput> {
        Device::kto_loss(self.gpu(), config, batch)
    }

    fn dpo_loss(&self, config: &DpoConfig, batch: &PairBatch<'_>) -> Result<PairLossOutput> {
        Device::dpo_loss(self.gpu(), config, batch)
    }

    fn kto_step<T: CudaLogit>(
        &self,
        config: &KtoConfig,
        policy: &Logits<'_, T>,
        inputs: &KtoStepInputs<'_>,
    ) -> Result<LogitsStep<KtoOutput, T>> {
        Device::kto_step(self.gpu(), config, policy, inputs)
    }

    fn dpo_step<T: CudaLogit>(
        &self,
        config: &DpoConfig,
        policy: &Logits<'_, T>,
        reference: &PairReference<'_>,
    ) -> Result<LogitsStep<PairLossOutput, T>> {
        Device::dpo_step(self.gpu(), config, policy, reference)
    }
}
