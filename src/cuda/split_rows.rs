//! Split rows: several blocks per row of a token kernel when the rows are too few to fill the
//! device (8 rows on a 132-SM H200 would leave 124 SMs idle). Each block scans a contiguous slice of
//! its row and publishes a partial; the block of the row that finishes last merges the partials in
//! slice order (`kernels/split_rows.cuh`), so the result is deterministic: the same bits every run
//! for the same split count (not the same bits as another split count: the sums are grouped
//! differently, within the kernels' usual f32 rounding).

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, SyncOnDrop};

use super::device::CudaBackend;
use crate::error::{HaloError, Result};
use crate::kernel_abi::{token_rows_per_block, TOKEN_THREADS};

/// Most slices per row (`HALO_MAX_ROW_SPLITS`: the merging block reads one partial per thread).
pub const MAX_ROW_SPLITS: usize = TOKEN_THREADS as usize;

/// The smallest slice [`RowSplit::Auto`] makes, in elements: at 8192 every thread of a block still
/// runs full trips of its four-vector loop (32 bf16 or 32 f32 per thread and trip at most), so the
/// block's fixed cost (its reduction, the publish and the merge) stays small beside its reads.
pub const MIN_SLICE_ELEMENTS: usize = 8192;

/// Blocks per multiprocessor [`RowSplit::Auto`] aims for: one 256-thread block keeps about 16 KiB
/// of loads in flight, an SM needs about twice that to reach its share of HBM bandwidth.
pub const BLOCKS_PER_MULTIPROCESSOR: usize = 2;

/// How many blocks share one row of the token kernels (forward, backward, backward in place).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RowSplit {
    /// Chosen from the device's multiprocessor count, the rows and the vocabulary
    /// ([`auto_row_splits`]): rows are split only when they are too few to fill the device.
    #[default]
    Auto,
    /// Exactly this many slices per row, `1..=MAX_ROW_SPLITS` (1: one block per row, as without
    /// splitting). For tests and benchmarks; slices may be empty when it exceeds the vocabulary.
    Fixed(usize),
}

/// The split [`RowSplit::Auto`] picks for `rows × vocab` on a device of `multiprocessors` SMs:
/// enough slices per row for [`BLOCKS_PER_MULTIPROCESSOR`] blocks per SM, no slice shorter than
/// [`MIN_SLICE_ELEMENTS`], 1 (no split) for rows that share a block (`vocab ≤ 4096`) or that
/// already fill the device.
pub fn auto_row_splits(rows: usize, vocab: usize, multiprocessors: usize) -> usize {
    if rows == 0 || token_rows_per_block(vocab) != 1 {
        return 1;
    }
    let wanted = (BLOCKS_PER_MULTIPROCESSOR * multiprocessors).div_ceil(rows);
    wanted
        .min(vocab / MIN_SLICE_ELEMENTS)
        .clamp(1, MAX_ROW_SPLITS)
}

/// The columns of slice `k` of a row of `vocab` split `splits` ways:
/// `⌊k·vocab/splits⌋ .. ⌊(k+1)·vocab/splits⌋` (as `row_slice` in `kernels/split_rows.cuh`).
pub fn row_slice(vocab: usize, splits: usize, k: usize) -> Range<usize> {
    let at = |k: usize| (k as u128 * vocab as u128 / splits.max(1) as u128) as usize;
    at(k)..at(k + 1)
}

impl RowSplit {
    /// The slices per row for a launch over `rows × vocab` on a device of `multiprocessors` SMs;
    /// an error for a fixed count outside `1..=MAX_ROW_SPLITS` or a grid beyond CUDA's limit.
    pub fn resolve(self, rows: usize, vocab: usize, multiprocessors: usize) -> Result<usize> {
        let splits = match self {
            RowSplit::Auto => auto_row_splits(rows, vocab, multiprocessors),
            RowSplit::Fixed(n) => n,
        };
        if !(1..=MAX_ROW_SPLITS).contains(&splits) {
            return Err(HaloError::InvalidShape(format!(
                "row split {splits}: must be in 1..={MAX_ROW_SPLITS}"
            )));
        }
        if splits > 1 {
            let blocks = rows.checked_mul(splits).filter(|&b| b <= i32::MAX as usize);
            let columns = vocab
                .checked_mul(splits)
                .filter(|&c| c <= i64::MAX as usize);
            if blocks.is_none() || columns.is_none() {
                return Err(HaloError::InvalidShape(format!(
                    "row split {splits} of {rows} rows × vocab {vocab}: the grid or the slice \
                     bounds exceed the CUDA kernels' limits"
                )));
            }
        }
        Ok(splits)
    }
}

impl CudaBackend {
    /// The slices per row that `split` gives a token kernel over `rows × vocab` on this device.
    pub fn row_splits(&self, split: RowSplit, rows: usize, vocab: usize) -> Result<usize> {
        split.resolve(rows, vocab, self.multiprocessor_count())
    }
}

/// Device scratch of one split launch: `HALO_SPLIT_PARTIAL_FLOATS` (4) floats per slice of every
/// row, then one arrival counter per row, all zero (the counters must start at 0).
pub(crate) struct SplitScratch {
    buf: CudaSlice<u32>,
    partial_words: usize,
}

/// Floats per partial (`HALO_SPLIT_PARTIAL_FLOATS`).
const PARTIAL_FLOATS: usize = 4;

impl SplitScratch {
    pub(crate) fn new(backend: &CudaBackend, rows: usize, splits: usize) -> Result<Self> {
        let partial_words = rows * splits * PARTIAL_FLOATS;
        Ok(SplitScratch {
            buf: backend.alloc_zeros::<u32>(partial_words + rows)?,
            partial_words,
        })
    }

    /// Device addresses of the partials and of the arrival counters, and the guard that orders
    /// the launch after the zeroing (keep it until the launch is queued).
    pub(crate) fn pointers<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, u64, SyncOnDrop<'a>) {
        let (ptr, guard) = self.buf.device_ptr_mut(stream);
        let arrivals = ptr + (self.partial_words * std::mem::size_of::<u32>()) as u64;
        (ptr, arrivals, guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_splits_small_batches_of_wide_rows_only() {
        // 8 rows × 128256 on 132 SMs: 33 wanted, 15 slices of ≥ 8192 elements.
        assert_eq!(auto_row_splits(8, 128_256, 132), 15);
        assert_eq!(auto_row_splits(4096, 128_256, 132), 1);
        assert_eq!(auto_row_splits(264, 128_256, 132), 1);
        assert_eq!(auto_row_splits(132, 128_256, 132), 2);
        assert_eq!(auto_row_splits(1, 4096, 132), 1); // rows share blocks below 4097
        assert_eq!(auto_row_splits(1, 16_383, 132), 1); // one slice of ≥ 8192 only
        assert_eq!(auto_row_splits(1, 16_384, 132), 2);
        assert_eq!(auto_row_splits(0, 128_256, 132), 1);
        assert_eq!(auto_row_splits(1, 1 << 30, 100), 200);
        assert_eq!(auto_row_splits(1, 1 << 30, 132), MAX_ROW_SPLITS); // 264 wanted
        assert_eq!(auto_row_splits(1, 1 << 30, 1000), MAX_ROW_SPLITS);
    }

    #[test]
    fn slices_cover_the_row_in_order() {
        for (vocab, splits) in [(10usize, 3usize), (7, 7), (5, 7), (128_256, 15), (1, 256)] {
            let mut next = 0;
            for k in 0..splits {
                let r = row_slice(vocab, splits, k);
                assert_eq!(r.start, next, "vocab {vocab} splits {splits} slice {k}");
                assert!(r.end >= r.start && r.end - r.start <= vocab.div_ceil(splits));
                next = r.end;
            }
            assert_eq!(next, vocab);
        }
    }

    #[test]
    fn fixed_splits_are_checked() {
        assert_eq!(RowSplit::Fixed(7).resolve(3, 100, 132), Ok(7));
        assert!(RowSplit::Fixed(0).resolve(3, 100, 132).is_err());
        assert!(RowSplit::Fixed(MAX_ROW_SPLITS + 1)
            .resolve(3, 100, 132)
            .is_err());
        assert!(RowSplit::Fixed(256)
            .resolve(i32::MAX as usize / 100, 100, 132)
            .is_err());
        assert_eq!(RowSplit::Auto.resolve(4096, 128_256, 132), Ok(1));
    }
}
