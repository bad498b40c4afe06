//! Queued device twins of [`crate::step::kto_step_tokens`] and [`crate::step::dpo_step_tokens`]:
//! from per-token log-probs already on the device (a fused LM head's, inside a training step's
//! autograd) to the loss's per-sequence gradients broadcast back to `∂L/∂logp` per token — the
//! sums, the loss kernel and the broadcast queued without a host wait.
//!
//! The caller backpropagates [`CudaTokenStep::token_grad`] right away, reads
//! [`CudaTokenStep::values`] whenever it reads the rest of its step (one copy, one wait, e.g.
//! together with the model's checks and the gradient norm), and turns them into the loss and the
//! metrics with [`CudaTokenStep::finish_kto`] / [`CudaTokenStep::finish_dpo`], which return the
//! CPU step's errors for bad data (diagnosed from device copies only when something is wrong).

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

use super::device::CudaBackend;
use super::sequence_sums::CudaSequenceSums;
use super::status::{KernelStatus, StatusWord};
use super::step::{kto_batch, pair_batch, CudaKtoStepInputs, CudaPairReference};
use crate::cpu::SequenceLayout;
use crate::error::{HaloError, Result};
use crate::kernel_abi::STATUS_LEN;
use crate::losses::{DpoConfig, KtoConfig, KtoOutput, PairLossOutput};
use crate::validate::{check_finite, check_len};

/// Values of a queued step from token log-probs (see the module docs).
#[derive(Debug)]
pub struct CudaTokenStep {
    /// `∂L/∂logp` per row (0 on ignored rows): what the model backpropagates.
    pub token_grad: CudaSlice<f32>,
    /// The policy's summed log-probs and token counts per sequence.
    pub sums: CudaSequenceSums,
    /// The loss kernel's `out` array.
    out: CudaSlice<f32>,
    /// One gradient per sequence (DPO: chosen then rejected).
    grad_seq: CudaSlice<f32>,
    /// The loss kernel's status (DPO's empty-sequence check; untouched by KTO's kernel).
    status: KernelStatus,
}

/// The number of buffers [`CudaTokenStep::values`] returns.
pub const TOKEN_STEP_VALUES: usize = 4;

impl CudaBackend {
    /// [`crate::step::kto_step_tokens`] on the device, queued (see the module docs): the policy's
    /// token log-probs `token_logps` with their `labels`, the reference's sums, the labels of
    /// desirability and the KL input on the device. Argument and configuration errors now.
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_kto_step_tokens(
        &self,
        config: &KtoConfig,
        token_logps: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        inputs: &CudaKtoStepInputs<'_>,
    ) -> Result<CudaTokenStep> {
        let sums = self.enqueue_sequence_sums(token_logps, labels, ignore_index, layout)?;
        let launched = self.launch_kto_loss(config, &kto_batch(&sums, inputs))?;
        let status = self.new_status()?;
        self.broadcast_token_step(
            sums,
            launched.out,
            launched.grad,
            status,
            labels,
            ignore_index,
            layout,
        )
    }

    /// [`crate::step::dpo_step_tokens`] on the device, queued (sequences `0..n` chosen, `n..2n`
    /// rejected; see [`CudaBackend::enqueue_kto_step_tokens`]).
    pub fn enqueue_dpo_step_tokens(
        &self,
        config: &DpoConfig,
        token_logps: &impl DevicePtr<f32>,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
        reference: &CudaPairReference<'_>,
    ) -> Result<CudaTokenStep> {
        let sums = self.enqueue_sequence_sums(token_logps, labels, ignore_index, layout)?;
        let mut status = self.new_status()?;
        let launched = {
            let (status_ptr, _w) = status.buf.device_ptr_mut(self.stream());
            self.launch_dpo_loss(config, &pair_batch(&sums, reference)?, status_ptr)?
        };
        let grad_seq = launched.grads.concatenated(self)?;
        self.broadcast_token_step(
            sums,
            launched.out,
            grad_seq,
            status,
            labels,
            ignore_index,
            layout,
        )
    }

    /// Queues the broadcast of the per-sequence gradients to the tokens.
    #[allow(clippy::too_many_arguments)]
    fn broadcast_token_step(
        &self,
        sums: CudaSequenceSums,
        out: CudaSlice<f32>,
        grad_seq: CudaSlice<f32>,
        status: KernelStatus,
        labels: &impl DevicePtr<i32>,
        ignore_index: i32,
        layout: SequenceLayout<'_>,
    ) -> Result<CudaTokenStep> {
        let mut token_grad = self.alloc_zeros::<f32>(labels.len())?;
        if !grad_seq.is_empty() {
            self.launch_broadcast_sequence_grad(
                &grad_seq,
                labels,
                ignore_index,
                layout,
                &mut token_grad,
            )?;
        }
        Ok(CudaTokenStep {
            token_grad,
            sums,
            out,
            grad_seq,
            status,
        })
    }
}

impl CudaTokenStep {
    /// A copy of the loss kernel's status, queued (no wait): for a caller that gates a later
    /// kernel on its step's statuses (an optimizer update that must skip a step the loss refuses:
    /// DPO's zero-token sequence, a non-finite output). The error itself comes from
    /// [`finish_dpo`](Self::finish_dpo) / [`finish_kto`](Self::finish_kto).
    pub fn loss_status_copy(&self, gpu: &CudaBackend) -> Result<KernelStatus> {
        let mut copy = KernelStatus {
            buf: gpu.alloc_output::<i32>(STATUS_LEN)?,
        };
        gpu.copy_dtod(&self.status.buf, &mut copy.buf)?;
        Ok(copy)
    }

    /// The buffers the host must read, in this order: the loss kernel's `out`, the per-sequence
    /// gradients, the policy's sums, and the loss kernel's status (as f32 bits).
    pub fn values(&self) -> [CudaView<'_, f32>; TOKEN_STEP_VALUES] {
        // SAFETY: i32 and f32 have the same size and alignment; the host turns the bits back.
        let status = unsafe { self.status.buf.transmute::<f32>(STATUS_LEN) }
            .expect("a status buffer holds STATUS_LEN entries");
        [
            self.out.as_view(),
            self.grad_seq.as_view(),
            self.sums.sums.as_view(),
            status,
        ]
    }

    /// The KTO loss and metrics from the host copies of [`values`](Self::values) (same `inputs`
    /// as the enqueue), or the CPU step's error for this batch.
    pub fn finish_kto(
        &self,
        gpu: &CudaBackend,
        config: &KtoConfig,
        inputs: &CudaKtoStepInputs<'_>,
        read: &[Vec<f32>],
    ) -> Result<KtoOutput> {
        let (out, grads, sums, _) = self.split(read)?;
        check_sums(sums)?;
        let loss =
            gpu.finish_kto_loss(config, &kto_batch(&self.sums, inputs), out, grads.to_vec())?;
        check_finite("grad_seq", grads)?;
        Ok(loss)
    }

    /// The DPO-family loss and metrics from the host copies of [`values`](Self::values) (same
    /// `reference` as the enqueue), or the CPU step's error for this batch.
    pub fn finish_dpo(
        &self,
        gpu: &CudaBackend,
        config: &DpoConfig,
        reference: &CudaPairReference<'_>,
        read: &[Vec<f32>],
    ) -> Result<PairLossOutput> {
        let (out, grads, sums, status) = self.split(read)?;
        check_sums(sums)?;
        let n = grads.len() / 2;
        let loss = gpu.finish_dpo_loss(
            config,
            &pair_batch(&self.sums, reference)?,
            status,
            out,
            grads[..n].to_vec(),
            grads[n..].to_vec(),
        )?;
        check_finite("grad_seq", grads)?;
        Ok(loss)
    }

    fn split<'r>(&self, read: &'r [Vec<f32>]) -> Result<ReadBack<'r>> {
        let [out, grads, sums, status] = read else {
            return Err(HaloError::LengthMismatch {
                what: "token step values read back",
                expected: TOKEN_STEP_VALUES,
                got: read.len(),
            });
        };
        check_len("loss outputs read back", self.out.len(), out.len())?;
        check_len(
            "sequence gradients read back",
            self.grad_seq.len(),
            grads.len(),
        )?;
        check_len("sequence sums read back", self.sums.sums.len(), sums.len())?;
        check_len("loss status read back", STATUS_LEN, status.len())?;
        let mut word = [0i32; STATUS_LEN];
        for (w, s) in word.iter_mut().zip(status) {
            *w = s.to_bits() as i32;
        }
        Ok((out, grads, sums, StatusWord(word)))
    }
}

/// The host copies of [`CudaTokenStep::values`]: `out`, the per-sequence gradients, the sums and
/// the loss kernel's status.
type ReadBack<'r> = (&'r [f32], &'r [f32], &'r [f32], StatusWord);

/// A sum of finite token log-probs that is not finite (their checks passed, so an f32 overflow).
fn check_sums(sums: &[f32]) -> Result<()> {
    match sums.iter().position(|s| !s.is_finite()) {
        Some(row) => Err(HaloError::NonFinite {
            what: "summed policy log-probs of a sequence",
            row,
        }),
        None => Ok(()),
    }
}
