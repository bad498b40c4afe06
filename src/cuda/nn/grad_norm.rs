//! The global gradient norm and torch's clip factor on the device (kernels `nn_grad_sum_squares_f32`
//! and `nn_grad_norm_finish_f32` in `kernels/nn_grad_norm.cu`): the CUDA twin of halo-train's
//! `Gradients::global_norm` and `model::optim::clip_grad_norm`, over many device buffers (one per
//! parameter) with no host read.
//!
//! A [`CudaGradNorm`] is planned once for the parameters' lengths: it owns an f64 scratch with a
//! fixed number of partial sums per buffer. [`CudaBackend::grad_norm_clip`] queues one kernel per
//! buffer (each block writes Σ g² over its share, in f64 as the CPU sums) and one finish kernel that
//! adds every partial in a fixed order and writes `[norm, clip factor]` to a two-element slot the
//! caller gives: typically a view into its own small "step readout" buffer, so that the norm comes
//! back with the loss and the status in the step's one device→host copy. The factor stays on the
//! device for [`CudaBackend::adamw_step_clipped`], which scales each gradient by it.
//!
//! Deterministic (no atomics, fixed block counts and orders); matches the CPU's sequential f64 sum
//! to ~1e-16 relative before the cast to f32, so the norm is the CPU's f32 but for a rare 1-ulp tie.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::super::device::{cuda_err, CudaBackend};
use super::super::launch::{blocks_launch, check_aligned};
use crate::error::{HaloError, Result};
use crate::validate::check_len;

/// Threads per block of both kernels (`HALO_GRAD_NORM_THREADS` in the kernel).
const GRAD_NORM_THREADS: u32 = 256;

/// At most this many blocks (so partial sums) per gradient buffer; larger buffers are covered by a
/// grid-stride loop. Fixed (not from the device's SM count) so every device gives the same bits.
const MAX_BLOCKS_PER_BUFFER: usize = 1024;

/// Index of the norm in the two-element output of [`CudaBackend::grad_norm_clip`].
pub const GRAD_NORM_OUT_NORM: usize = 0;
/// Index of the clip factor (1 when nothing is clipped) in that output.
pub const GRAD_NORM_OUT_CLIP_FACTOR: usize = 1;
/// Length of the output of [`CudaBackend::grad_norm_clip`]: `[norm, clip factor]`.
pub const GRAD_NORM_OUT_LEN: usize = 2;

/// The device scratch of a global gradient norm over a fixed list of buffers (one per parameter),
/// from [`CudaBackend::grad_norm_plan`]; reused every step.
#[derive(Debug)]
pub struct CudaGradNorm {
    /// Elements of each buffer, in parameter order.
    lens: Vec<usize>,
    /// Each buffer's first slot in `partials`.
    first: Vec<usize>,
    /// Blocks (= partial sums) of each buffer; 0 for an empty buffer.
    blocks: Vec<usize>,
    /// One f64 partial sum of squares per block, buffer after buffer.
    partials: CudaSlice<f64>,
}

impl CudaGradNorm {
    /// Elements of each buffer this plan was made for, in order.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
}

impl CudaBackend {
    /// A plan (and its device scratch) for the norm of `lens.len()` gradient buffers of these
    /// lengths, in parameter order. Empty buffers are allowed (they add nothing).
    pub fn grad_norm_plan(&self, lens: &[usize]) -> Result<CudaGradNorm> {
        let mut first = Vec::with_capacity(lens.len());
        let mut blocks = Vec::with_capacity(lens.len());
        let mut total = 0usize;
        for &n in lens {
            let b = n
                .div_ceil(GRAD_NORM_THREADS as usize)
                .min(MAX_BLOCKS_PER_BUFFER);
            first.push(total);
            blocks.push(b);
            total = total.checked_add(b).ok_or_else(|| {
                HaloError::InvalidShape("too many gradient buffers for one norm".into())
            })?;
        }
        i64::try_from(total).map_err(|_| {
            HaloError::InvalidShape("too many gradient buffers for one norm".into())
        })?;
        Ok(CudaGradNorm {
            lens: lens.to_vec(),
            first,
            blocks,
            partials: self.alloc_zeros(total)?,
        })
    }

    /// Queues the global L2 norm of `grads` (the CPU's `Gradients::global_norm`: every element of
    /// every present gradient, squares summed in f64; `None` is an absent gradient, i.e. zero) and,
    /// with `max_norm`, torch's clip factor `max_norm / (norm + 1e-6)` when that is below 1 (the
    /// CPU's `clip_grad_norm`), else 1; without `max_norm` the factor is 1. Writes
    /// `out = [norm, factor]` ([`GRAD_NORM_OUT_NORM`], [`GRAD_NORM_OUT_CLIP_FACTOR`]) on the device
    /// and returns without waiting: read `out` with the step's other results, and pass the factor
    /// (a view of `out[1..2]`) to [`CudaBackend::adamw_step_clipped`].
    ///
    /// Errors: `grads` not one per planned buffer or of other lengths, `out` not of
    /// [`GRAD_NORM_OUT_LEN`] elements (`LengthMismatch`); a NaN or ±inf `max_norm`
    /// (`InvalidHyperParameter`; "no clipping" is `None`). Any finite `max_norm` is accepted, as
    /// the CPU accepts it (≤ 0 scales every gradient by a factor ≤ 0, as there).
    pub fn grad_norm_clip<G: DevicePtr<f32>>(
        &self,
        plan: &mut CudaGradNorm,
        grads: &[Option<&G>],
        max_norm: Option<f32>,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_len("gradient buffers", plan.lens.len(), grads.len())?;
        for (g, &n) in grads.iter().zip(&plan.lens) {
            if let Some(g) = g {
                check_len("gradient", n, g.len())?;
            }
        }
        check_len("grad_norm output", GRAD_NORM_OUT_LEN, out.len())?;
        if let Some(m) = max_norm {
            if !m.is_finite() {
                return Err(HaloError::InvalidHyperParameter {
                    name: "max_norm",
                    value: m as f64,
                    reason: "must be finite (no clipping is `None`)",
                });
            }
        }
        let stream = self.stream();
        for (i, g) in grads.iter().enumerate() {
            let (first, blocks) = (plan.first[i], plan.blocks[i]);
            if blocks == 0 {
                continue;
            }
            let mut slots = plan.partials.slice_mut(first..first + blocks);
            let Some(g) = g else {
                stream
                    .memset_zeros(&mut slots)
                    .map_err(cuda_err("zero grad_norm partials"))?;
                continue;
            };
            let func = self.function("nn_grad_sum_squares_f32")?;
            let (grad_ptr, _r0) = g.device_ptr(stream);
            let (partials_ptr, _w0) = slots.device_ptr_mut(stream);
            check_aligned::<f32>("gradient", grad_ptr)?;
            let n = plan.lens[i] as i64;
            let mut launch = stream.launch_builder(func);
            launch.arg(&grad_ptr).arg(&n).arg(&partials_ptr);
            // SAFETY: arguments follow `nn_grad_sum_squares_f32` in kernels/README.md; `gradient`
            // holds `n` elements (checked) and `slots` one f64 per block of the grid.
            unsafe { launch.launch(blocks_launch(blocks, GRAD_NORM_THREADS)?) }
                .map_err(cuda_err("launch nn_grad_sum_squares_f32"))?;
        }
        let func = self.function("nn_grad_norm_finish_f32")?;
        let count = plan.partials.len() as i64;
        let (partials_ptr, _r0) = plan.partials.device_ptr(stream);
        let (out_ptr, _w0) = out.device_ptr_mut(stream);
        check_aligned::<f32>("grad_norm output", out_ptr)?;
        let max = max_norm.unwrap_or(1.0);
        let clip = i32::from(max_norm.is_some());
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&partials_ptr)
            .arg(&count)
            .arg(&max)
            .arg(&clip)
            .arg(&out_ptr);
        // SAFETY: arguments follow `nn_grad_norm_finish_f32` in kernels/README.md; `partials` holds
        // `count` f64 (an empty plan's is a valid 1-element allocation never read), `out` 2 floats.
        unsafe { launch.launch(blocks_launch(1, GRAD_NORM_THREADS)?) }
            .map_err(cuda_err("launch nn_grad_norm_finish_f32"))?;
        Ok(())
    }
}
