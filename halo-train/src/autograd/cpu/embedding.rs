//! Embedding lookup: row `ids[r]` of a `[vocab, dim]` table.

/// `y[r, :] = table[ids[r], :]`. Ids are checked by the tape.
pub fn embedding_forward(table: &[f32], ids: &[u32], dim: usize, y: &mut [f32]) {
    for (row, &id) in y.chunks_exact_mut(dim).zip(ids) {
        let start = id as usize * dim;
        row.copy_from_slice(&table[start..start + dim]);
    }
}

/// `dtable[ids[r], :] += dy[r, :]` (a scatter-add: repeated ids sum their gradients).
pub fn embedding_backward(dy: &[f32], ids: &[u32], dim: usize, dtable: &mut [f32]) {
    for (row, &id) in dy.chunks_exact(dim).zip(ids) {
        let start = id as usize * dim;
        super::elementwise::accumulate(&mut dtable[start..start + dim], row);
    }
}
