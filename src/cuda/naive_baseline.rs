//! The unfused baseline the benches compare the fused forward with (`kernels/naive_baseline.cu`):
//! materialise `log_softmax(logits)` (`[rows, vocab]`, in the logits' dtype), then gather one entry
//! per row — what `torch.log_softmax(z, -1).gather(-1, y)` does. Not for training: it reports no
//! error (a label outside `0..vocab` gives NaN, non-finite logits propagate).

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::device::{cuda_err, CudaBackend};
use super::launch::{blocks_launch, check_len, check_token_shape, entry_name, CudaLogit};
use crate::error::Result;

/// Threads per block of both naive kernels (`NAIVE_THREADS` in the .cu file).
const NAIVE_THREADS: u32 = 256;

impl CudaBackend {
    /// Queues the two naive kernels: `log_probs = log_softmax(logits)` (a caller buffer of
    /// `rows * vocab` elements), then `logp[r] = log_probs[r, labels[r]]` (0 where ignored, NaN
    /// for a label outside `0..vocab`).
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_naive_token_logprobs<T: CudaLogit>(
        &self,
        logits: &impl DevicePtr<T>,
        labels: &impl DevicePtr<i32>,
        vocab: usize,
        ignore_index: i32,
        log_probs: &mut impl DevicePtrMut<T>,
        logp: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let rows = check_token_shape(logits.len(), labels.len(), vocab)?;
        check_len("log_probs", rows * vocab, log_probs.len())?;
        check_len("logp", rows, logp.len())?;
        if rows == 0 {
            return Ok(());
        }
        let softmax = self.function(&entry_name::<T>("naive_log_softmax"))?;
        let gather = self.function(&entry_name::<T>("naive_gather"))?;
        let (rows_i64, vocab_i64) = (rows as i64, vocab as i64);
        let stream = self.stream();
        let (logits_ptr, _r0) = logits.device_ptr(stream);
        let (labels_ptr, _r1) = labels.device_ptr(stream);
        let (log_probs_ptr, _w0) = log_probs.device_ptr_mut(stream);
        let (logp_ptr, _w1) = logp.device_ptr_mut(stream);
        let mut launch = stream.launch_builder(softmax);
        launch
            .arg(&logits_ptr)
            .arg(&log_probs_ptr)
            .arg(&rows_i64)
            .arg(&vocab_i64);
        // SAFETY: arguments follow `naive_log_softmax_T` (kernels/naive_baseline.cu); both
        // buffers hold `rows * vocab` elements; one block per row.
        unsafe { launch.launch(blocks_launch(rows, NAIVE_THREADS)?) }
            .map_err(cuda_err("launch naive_log_softmax"))?;
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(NAIVE_THREADS), 1, 1),
            block_dim: (NAIVE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(gather);
        launch
            .arg(&log_probs_ptr)
            .arg(&labels_ptr)
            .arg(&logp_ptr)
            .arg(&rows_i64)
            .arg(&vocab_i64)
            .arg(&ignore_index);
        // SAFETY: arguments follow `naive_gather_T`; `logp` and `labels` hold `rows` elements;
        // the kernel reads `log_probs` only for labels inside `0..vocab`.
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launch naive_gather"))?;
        Ok(())
    }
}
