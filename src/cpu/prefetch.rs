//! A software prefetch hint for the row loops: asks for the cache line holding an address that
//! the loop will read soon. Only a hint: it never faults (any address, even past an allocation's
//! end, is fine) and it changes no result.

/// How far ahead of their reads the backward's loops prefetch the logits: the hardware
/// prefetcher runs only a short way ahead of a loop that reads and writes, and without the hint
/// the loop waits on memory between bursts of compute (measured on the Sapphire Rapids dev
/// machine: bf16 forward + in-place backward 60–68% of its ceiling without, 84–88% with;
/// docs/PERFORMANCE.md).
pub(crate) const PREFETCH_AHEAD_BYTES: usize = 4096;

/// Requests the cache line at `p` into L1 (x86-64's `prefetcht0`; nothing elsewhere).
#[inline(always)]
pub(crate) fn prefetch<E>(p: *const E) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` is part of the x86-64 baseline (SSE) and does not access memory
    // architecturally: it cannot fault whatever `p` is, and the pointer is never dereferenced.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
