//! How the fused head splits its work: row tiles × vocab tiles, the vocab tiles in a fixed number
//! of groups. Chosen from the shapes only — never from the thread count — so that the results are
//! the same bits on any machine load and pool size.

use crate::error::{HaloError, Result};

/// Tile sizes of the fused LM head. [`FusedChunks::auto`] is what the ops use when given `None`.
///
/// Peak extra memory of the forward: one `row_tile × vocab_tile` f32 logits tile per running task
/// (at most one per thread; for a bf16 / f16 weight also the tile's `vocab_tile × H` weight rows
/// widened to f32), plus O(rows): the counted rows of `hidden` widened to f32. The backward adds
/// one `[counted rows, H]` f32 `∂hidden` partial per vocab group beyond the first (the groups run
/// in parallel, each owning its slice of `∂weight`, so no float is ever added by two threads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedChunks {
    /// Rows per tile (≥ 1).
    pub row_tile: usize,
    /// Vocabulary entries per tile (≥ 1).
    pub vocab_tile: usize,
    /// Groups of consecutive vocab tiles that run in parallel (≥ 1; capped at the tile count).
    pub vocab_groups: usize,
}

/// 256 × 2048 f32 = 2 MiB of logits per tile: large enough that sgemm runs near its peak
/// (measured: 55 GFLOP/s on one core here at 256 × 2048 × 1024), small enough for L2/L3 reuse.
const DEFAULT_ROW_TILE: usize = 256;
const DEFAULT_VOCAB_TILE: usize = 2048;
/// Parallelism of the backward (and of the forward over a single row tile).
const DEFAULT_VOCAB_GROUPS: usize = 8;

impl FusedChunks {
    /// The default split for `rows` counted rows, a vocabulary of `vocab` and hidden size `hidden`.
    pub fn auto(rows: usize, vocab: usize, hidden: usize) -> FusedChunks {
        let _ = hidden; // the defaults do not depend on it yet; kept for a future cost model
        let vocab_tile = DEFAULT_VOCAB_TILE.min(vocab.max(1));
        FusedChunks {
            row_tile: DEFAULT_ROW_TILE.min(rows.max(1)),
            vocab_tile,
            vocab_groups: DEFAULT_VOCAB_GROUPS.min(vocab.max(1).div_ceil(vocab_tile)),
        }
    }

    /// Errors: `InvalidShape` when a field is 0.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("row_tile", self.row_tile),
            ("vocab_tile", self.vocab_tile),
            ("vocab_groups", self.vocab_groups),
        ] {
            if value == 0 {
                return Err(HaloError::InvalidShape(format!(
                    "FusedChunks::{name} must be at least 1"
                )));
            }
        }
        Ok(())
    }

    /// The given chunks (validated) or the default for these shapes.
    pub(crate) fn resolve(
        chunks: Option<FusedChunks>,
        rows: usize,
        vocab: usize,
        hidden: usize,
    ) -> Result<FusedChunks> {
        match chunks {
            Some(c) => c.validate().map(|()| c),
            None => Ok(FusedChunks::auto(rows, vocab, hidden)),
        }
    }

    /// Row ranges of the tiles over `rows` rows.
    pub(crate) fn row_tiles(&self, rows: usize) -> Vec<std::ops::Range<usize>> {
        tiles(rows, self.row_tile)
    }

    /// Each vocab group's range of vocabulary ids, a whole number of vocab tiles; consecutive.
    pub(crate) fn vocab_group_ranges(&self, vocab: usize) -> Vec<std::ops::Range<usize>> {
        let n_tiles = vocab.div_ceil(self.vocab_tile);
        let groups = self.vocab_groups.min(n_tiles).max(1);
        (0..groups)
            .map(|g| {
                let (t0, t1) = (g * n_tiles / groups, (g + 1) * n_tiles / groups);
                (t0 * self.vocab_tile)..(t1 * self.vocab_tile).min(vocab)
            })
            .collect()
    }

    /// The vocab tiles inside one group's range.
    pub(crate) fn vocab_tiles(
        &self,
        group: std::ops::Range<usize>,
    ) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        tiles(group.end - group.start, self.vocab_tile)
            .into_iter()
            .map(move |t| group.start + t.start..group.start + t.end)
    }
}

fn tiles(n: usize, tile: usize) -> Vec<std::ops::Range<usize>> {
    (0..n.div_ceil(tile))
        .map(|i| i * tile..((i + 1) * tile).min(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_cover_the_vocabulary_in_whole_tiles() {
        for (vocab, tile, groups) in [
            (1, 1, 1),
            (10, 3, 2),
            (10, 3, 8),
            (32000, 2048, 8),
            (7, 7, 3),
        ] {
            let c = FusedChunks {
                row_tile: 1,
                vocab_tile: tile,
                vocab_groups: groups,
            };
            let ranges = c.vocab_group_ranges(vocab);
            assert_eq!(ranges.first().unwrap().start, 0);
            assert_eq!(ranges.last().unwrap().end, vocab);
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert_eq!(w[0].start % tile, 0);
            }
            assert!(ranges.iter().all(|r| r.end > r.start));
            let covered: usize = ranges
                .iter()
                .flat_map(|r| c.vocab_tiles(r.clone()))
                .map(|t| t.len())
                .sum();
            assert_eq!(covered, vocab);
        }
    }
}
