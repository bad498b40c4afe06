//! A per-thread free list of `f32` buffers, so that the activations, saved tensors and gradients
//! of one training step reuse the memory of the previous one.
//!
//! Why: every step records the same shapes, and allocating each activation afresh made the
//! step pay for page faults and for glibc handing the large blocks back to the OS and faulting
//! them in again (about a fifth of a step on the CPU, issue 13). The [`Tape`](super::Tape)
//! takes its buffers from here and gives them back when it is dropped or as the backward frees
//! them; [`Gradients`](super::Gradients) gives its buffers back when dropped. All of that is one
//! type, [`Buffer`]: a `Vec<f32>` that returns to the pool when dropped. From the second step on,
//! a step of the same shapes finds every large buffer here ([`stats`] counts the misses).
//!
//! Buffers are kept by capacity class (`2^k · {1, 1.25, 1.5, 1.75}`, so a batch a few tokens
//! longer than the last still fits), small ones (under [`MIN_POOLED`] elements) are left to the
//! allocator, and a thread keeps at most [`MAX_RETAINED_BYTES`]; [`release`] frees them all.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};

use rayon::prelude::*;

/// Buffers with fewer elements than this bypass the pool (the allocator serves small blocks
/// from its own caches without the OS).
pub const MIN_POOLED: usize = 1024;

/// [`Buffer::zeroed`] fills buffers at least this long in rayon tasks (half as long each).
const PARALLEL_FILL_MIN: usize = 1 << 17;

/// The most a thread keeps in its free list; a buffer given back beyond it is freed.
pub const MAX_RETAINED_BYTES: usize = 2 << 30;

/// Counters of the calling thread's pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests for a pooled-size buffer served from the free list.
    pub hits: u64,
    /// Requests for a pooled-size buffer that had to allocate.
    pub misses: u64,
    /// Bytes held in the free list now.
    pub retained_bytes: usize,
}

#[derive(Default)]
struct Pool {
    /// Free buffers by capacity class: every buffer under key `c` has capacity `>= c`.
    free: BTreeMap<usize, Vec<Vec<f32>>>,
    stats: PoolStats,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// The smallest capacity class `>= len`.
fn class_ceil(len: usize) -> usize {
    let floor = class_floor(len);
    if floor == len {
        return len;
    }
    let top = usize::BITS - 1 - len.leading_zeros();
    let quarter = 1usize << (top - 2);
    floor + quarter
}

/// The largest capacity class `<= cap` (`cap >= 4`).
fn class_floor(cap: usize) -> usize {
    let top = usize::BITS - 1 - cap.leading_zeros();
    let quarter = 1usize << (top - 2);
    cap & !(quarter - 1)
}

impl Pool {
    fn take(&mut self, len: usize) -> Option<Vec<f32>> {
        let key = class_ceil(len);
        let bucket = self.free.get_mut(&key)?;
        let v = bucket.pop()?;
        if bucket.is_empty() {
            self.free.remove(&key);
        }
        self.stats.retained_bytes -= v.capacity() * size_of::<f32>();
        Some(v)
    }

    fn give(&mut self, v: Vec<f32>) {
        let bytes = v.capacity() * size_of::<f32>();
        if self.stats.retained_bytes + bytes > MAX_RETAINED_BYTES {
            return;
        }
        self.stats.retained_bytes += bytes;
        self.free
            .entry(class_floor(v.capacity()))
            .or_default()
            .push(v);
    }
}

/// A vector with room for `len` elements: from the free list when one fits (then still holding
/// its last values, at whatever length it had), else new and empty.
fn with_capacity(len: usize) -> Vec<f32> {
    if len < MIN_POOLED {
        return Vec::with_capacity(len);
    }
    let reused = POOL
        .try_with(|p| {
            let mut p = p.borrow_mut();
            let v = p.take(len);
            match v {
                Some(_) => p.stats.hits += 1,
                None => p.stats.misses += 1,
            }
            v
        })
        .ok()
        .flatten();
    reused.unwrap_or_else(|| Vec::with_capacity(class_ceil(len)))
}

/// An `f32` buffer that gives its memory back to the calling thread's pool when dropped (if it
/// came from the pool). Dereferences to `[f32]`.
#[derive(Debug, Default)]
pub struct Buffer {
    data: Vec<f32>,
    /// Whether the memory came from the pool (and so goes back to it). A vector made elsewhere
    /// (by the core's kernels) is freed as usual instead: adopting it would add a buffer to the
    /// pool on every step that no request may ever take back.
    pooled: bool,
}

impl Buffer {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let mut data = with_capacity(len);
        data.clear();
        if len >= PARALLEL_FILL_MIN {
            // The backward zero-fills a gradient buffer for every activation (it accumulates
            // into them), on the thread that walks the tape: split large fills across the pool.
            data.reserve(len);
            data.spare_capacity_mut()[..len]
                .par_chunks_mut(PARALLEL_FILL_MIN / 2)
                .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
            // SAFETY: the first `len` elements were just written (capacity >= len: reserved).
            unsafe { data.set_len(len) };
        } else {
            data.resize(len, 0.0);
        }
        Self { data, pooled: true }
    }

    /// `len` elements whose values are unspecified (a reused buffer's old values, zeros
    /// otherwise), for an output the caller writes in full: skips [`zeroed`](Self::zeroed)'s
    /// fill of every forward activation.
    pub fn for_overwrite(len: usize) -> Self {
        let mut data = with_capacity(len);
        data.truncate(len);
        data.resize(len, 0.0);
        Self { data, pooled: true }
    }

    /// A copy of `src`.
    pub fn copied(src: &[f32]) -> Self {
        let mut data = with_capacity(src.len());
        data.clear();
        data.extend_from_slice(src);
        Self { data, pooled: true }
    }

    /// The values as a plain vector, leaving the pool (for a caller that keeps them).
    pub fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.data)
    }
}

impl From<Vec<f32>> for Buffer {
    /// Wraps `v` without adopting it: it is freed, not pooled, when dropped.
    fn from(data: Vec<f32>) -> Self {
        Self {
            data,
            pooled: false,
        }
    }
}

impl PartialEq for Buffer {
    fn eq(&self, other: &Self) -> bool {
        self.data == other.data
    }
}

impl Clone for Buffer {
    fn clone(&self) -> Self {
        Self::copied(self)
    }
}

impl Deref for Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if self.pooled {
            recycle(std::mem::take(&mut self.data));
        }
    }
}

/// Gives `v` back for reuse (or frees it: small, or the thread's pool is full).
fn recycle(v: Vec<f32>) {
    if v.capacity() < MIN_POOLED {
        return;
    }
    // `try_with`: a buffer dropped while the thread is shutting down is simply freed.
    let _ = POOL.try_with(|p| p.borrow_mut().give(v));
}

/// The calling thread's counters.
pub fn stats() -> PoolStats {
    POOL.try_with(|p| p.borrow().stats).unwrap_or_default()
}

/// Frees every buffer the calling thread holds (the counters stay).
pub fn release() {
    let _ = POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        p.free.clear();
        p.stats.retained_bytes = 0;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GptWeights;

    #[test]
    fn classes_bracket_the_length() {
        for len in 4..5000usize {
            let (lo, hi) = (class_floor(len), class_ceil(len));
            assert!(lo <= len && len <= hi, "{len}: {lo} {hi}");
            // A class is its own floor and ceiling, and a step is at most a quarter octave.
            assert_eq!(class_floor(hi), hi, "{len}");
            assert_eq!(class_ceil(lo), lo, "{len}");
            assert!(hi as f64 <= len as f64 * 1.25 + 1.0, "{len}: {hi}");
        }
        assert_eq!(class_ceil(1024), 1024);
        assert_eq!(class_ceil(1025), 1280);
        assert_eq!(class_floor(1279), 1024);
        assert_eq!(class_floor(1792), 1792);
    }

    #[test]
    fn a_returned_buffer_is_reused_zeroed() {
        release();
        let mut a = Buffer::zeroed(3000);
        a.fill(7.0);
        let ptr = a.as_ptr();
        drop(a);
        let before = stats();
        // 2900 rounds to the same class as 3000 (3072).
        let b = Buffer::zeroed(2900);
        assert_eq!(b.as_ptr(), ptr);
        assert!(b.iter().all(|&v| v == 0.0));
        assert_eq!(b.len(), 2900);
        let after = stats();
        assert_eq!(after.hits, before.hits + 1);
        assert_eq!(after.misses, before.misses);
        let c = Buffer::copied(&[1.0; 2000]);
        assert_eq!(&*c, &[1.0; 2000][..]);
        assert_eq!(stats().misses, before.misses + 1);
        release();
        assert_eq!(stats().retained_bytes, 0);
    }

    #[test]
    fn a_large_reused_buffer_is_zeroed_in_full() {
        release();
        let len = PARALLEL_FILL_MIN * 3 + 17;
        let mut a = Buffer::zeroed(len);
        a.fill(7.0);
        drop(a);
        let b = Buffer::zeroed(len - 5);
        assert_eq!(b.len(), len - 5);
        assert!(b.iter().all(|&v| v == 0.0));
        release();
    }

    #[test]
    fn for_overwrite_has_the_length_asked_for() {
        release();
        let mut d = Buffer::for_overwrite(2900);
        assert_eq!(d.len(), 2900);
        d.fill(3.0);
        drop(d);
        // Same class (3072): the old buffer, its 2900 old values, then zeros.
        let e = Buffer::for_overwrite(3000);
        assert_eq!(e.len(), 3000);
        assert!(e[..2900].iter().all(|&v| v == 3.0) && e[2900..].iter().all(|&v| v == 0.0));
        drop(e);
        assert_eq!(Buffer::for_overwrite(2500).len(), 2500);
        release();
    }

    #[test]
    fn a_foreign_vector_is_not_adopted() {
        release();
        drop(Buffer::from(vec![0.0f32; 5000]));
        assert_eq!(stats().retained_bytes, 0);
        // A pooled buffer of a capacity that is not a class (a smaller length reusing a larger
        // class keeps that capacity): filed under the class below, which it can always serve.
        let mut pool = Pool::default();
        pool.give(Vec::with_capacity(1100));
        assert!(pool.take(1025).is_none());
        assert!(pool.take(1024).is_some_and(|v| v.capacity() >= 1100));
    }

    /// The point of the pool: from the second training step on (same shapes), the forward, the
    /// backward and the gradients find every large buffer in the free list.
    #[test]
    fn later_training_steps_allocate_no_large_buffer() {
        use crate::autograd::Tape;
        use crate::model::optim::{clip_grad_norm, AdamW, AdamWConfig};
        use crate::model::{Gpt, GptConfig};

        let config = GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 32,
            vocab_size: 64,
            n_ctx: 16,
            dropout: 0.1,
        };
        let (batch, seq) = (4, 16);
        let mut model = Gpt::new(config, 3).unwrap();
        let mut opt = AdamW::new(&model, AdamWConfig::default());
        let ids: Vec<u32> = (0..batch * seq).map(|i| (i * 7 % 64) as u32).collect();
        let targets: Vec<i32> = (0..batch * seq).map(|i| (i * 5 % 64) as i32).collect();
        let mut step = |model: &mut Gpt, fused: bool| {
            let mut tape = Tape::new();
            let mut grads = if fused {
                let logp = model
                    .token_logprobs_fused_head(&mut tape, &ids, &targets, batch, seq)
                    .unwrap();
                let upstream = vec![-0.01; batch * seq];
                tape.backward(logp, &upstream).unwrap()
            } else {
                let loss = model.nll(&mut tape, &ids, &targets, batch, seq).unwrap();
                tape.backward_scalar(loss).unwrap()
            };
            drop(tape);
            clip_grad_norm(&mut grads, 1.0);
            opt.step(model, &grads, 1e-3).unwrap();
        };
        for fused in [false, true] {
            step(&mut model, fused);
            let after_first = stats();
            step(&mut model, fused);
            step(&mut model, fused);
            let after_third = stats();
            assert!(after_third.hits > after_first.hits);
            assert_eq!(
                after_third.misses, after_first.misses,
                "fused = {fused}: steps 2 and 3 allocated"
            );
        }
        release();
    }
}
