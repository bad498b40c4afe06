//! CUDA twin of halo-train's `autograd::cpu::embedding`: row `ids[r]` of a `[table_rows, dim]`
//! table, and the backward scatter-add (kernels `nn_embedding_forward`, `nn_embedding_backward`
//! in `kernels/nn_embedding.cu`).
//!
//! Token ids are host data (they come from batching), so they are validated and prepared on the
//! host once per step: [`CudaBackend::upload_token_ids`] checks every id against the table and
//! uploads, in one copy, the ids and their positions grouped by id (CSR: the distinct ids, the
//! offsets of their groups, the positions of each group in ascending order). The backward gives
//! each distinct id's row to one block, and each element of that row to one thread, which adds the
//! gradients of the id's positions in position order: no atomics, and the CPU twin's sums exactly.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::super::device::{cuda_err, CudaBackend};
use super::super::launch::{check_aligned, check_len};
use super::elementwise::{as_i64, element_ptr, row_launch};
use crate::error::{HaloError, Result};

/// Token ids on the device, checked against a table of `table_rows` rows, with what the
/// deterministic backward needs. Built by [`CudaBackend::upload_token_ids`]; used by
/// [`CudaBackend::embedding_forward`] and [`CudaBackend::embedding_backward`].
#[derive(Debug)]
pub struct CudaTokenIds {
    /// `[ids (len) | positions grouped by id (len) | distinct ids (groups) | group offsets
    /// (groups + 1)]`: one buffer, one upload.
    packed: CudaSlice<u32>,
    len: usize,
    groups: usize,
    table_rows: usize,
}

impl CudaTokenIds {
    /// Number of ids (positions).
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when there are no ids.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows of the table the ids were checked against.
    pub fn table_rows(&self) -> usize {
        self.table_rows
    }

    /// Number of distinct ids.
    pub fn distinct(&self) -> usize {
        self.groups
    }

    /// Element offsets of the four parts of `packed`: ids, positions, distinct ids, offsets.
    fn parts(&self) -> [usize; 4] {
        [0, self.len, 2 * self.len, 2 * self.len + self.groups]
    }
}

/// The host side of [`CudaBackend::upload_token_ids`]: every id checked, then the packed buffer
/// (ids, positions grouped by id in ascending order, distinct ids ascending, CSR offsets) and the
/// number of distinct ids.
fn pack_token_ids(ids: &[u32], table_rows: usize) -> Result<(Vec<u32>, usize)> {
    if let Some(pos) = ids.iter().position(|&id| id as usize >= table_rows) {
        return Err(HaloError::InvalidShape(format!(
            "embedding: token id {} at position {pos} is outside the table's {table_rows} rows",
            ids[pos]
        )));
    }
    let n = ids.len();
    if n > u32::MAX as usize {
        return Err(HaloError::InvalidShape(format!(
            "embedding: {n} token ids exceed the kernels' limit of {} positions",
            u32::MAX
        )));
    }
    // Positions sorted by (id, position): each id's group in ascending position order.
    let mut positions: Vec<u32> = (0..n as u32).collect();
    positions.sort_unstable_by_key(|&p| (ids[p as usize], p));
    let mut distinct = Vec::new();
    let mut offsets = Vec::new();
    for (k, &p) in positions.iter().enumerate() {
        let id = ids[p as usize];
        if distinct.last() != Some(&id) {
            distinct.push(id);
            offsets.push(k as u32);
        }
    }
    offsets.push(n as u32);
    let groups = distinct.len();
    let mut packed = Vec::with_capacity(2 * n + 2 * groups + 1);
    packed.extend_from_slice(ids);
    packed.extend_from_slice(&positions);
    packed.extend_from_slice(&distinct);
    packed.extend_from_slice(&offsets);
    Ok((packed, groups))
}

/// `table` must be `[table_rows, dim]` and `dim > 0`.
fn check_table(what: &'static str, table_len: usize, ids: &CudaTokenIds, dim: usize) -> Result<()> {
    if dim == 0 {
        return Err(HaloError::InvalidShape(
            "embedding: dim must be positive".to_string(),
        ));
    }
    let expected = ids.table_rows.checked_mul(dim).ok_or_else(|| {
        HaloError::InvalidShape(format!(
            "embedding: {} rows × dim {dim} overflow",
            ids.table_rows
        ))
    })?;
    check_len(what, expected, table_len)
}

impl CudaBackend {
    /// Checks every id against a table of `table_rows` rows (the first bad id and its position
    /// are named in an [`HaloError::InvalidShape`]) and uploads the ids with their positions
    /// grouped by id (computed here, on the host), in one copy. Once per step, for every
    /// embedding lookup of the same ids.
    pub fn upload_token_ids(&self, ids: &[u32], table_rows: usize) -> Result<CudaTokenIds> {
        let (packed, groups) = pack_token_ids(ids, table_rows)?;
        Ok(CudaTokenIds {
            packed: self.htod(&packed)?,
            len: ids.len(),
            groups,
            table_rows,
        })
    }

    /// `y[r, :] = table[ids[r], :]` (`table`: `[ids.table_rows(), dim]`, `y`: `[ids.len(), dim]`),
    /// like halo-train's `cpu::embedding::embedding_forward`. Overwrites `y`; no ids is a no-op;
    /// `dim == 0` is an error.
    pub fn embedding_forward(
        &self,
        table: &impl DevicePtr<f32>,
        ids: &CudaTokenIds,
        dim: usize,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_table("table", table.len(), ids, dim)?;
        check_len("y", ids.len * dim, y.len())?;
        if ids.is_empty() {
            return Ok(());
        }
        let stream = self.stream();
        let (table_ptr, _r0) = table.device_ptr(stream);
        let (packed_ptr, _r1) = ids.packed.device_ptr(stream);
        let (y_ptr, _w) = y.device_ptr_mut(stream);
        check_aligned::<f32>("table", table_ptr)?;
        check_aligned::<f32>("y", y_ptr)?;
        let (n_arg, dim_arg) = (as_i64(ids.len), as_i64(dim));
        let mut launch = stream.launch_builder(self.function("nn_embedding_forward")?);
        launch
            .arg(&table_ptr)
            .arg(&packed_ptr)
            .arg(&n_arg)
            .arg(&dim_arg)
            .arg(&y_ptr);
        // SAFETY: `nn_embedding_forward(const float* table, const uint32_t* ids, int64_t n,
        // int64_t dim, float* y)`; the ids (first n of `packed`) are < table_rows (checked at
        // upload), table holds table_rows · dim floats and y n · dim (checked).
        unsafe { launch.launch(row_launch(ids.len, dim)) }
            .map_err(cuda_err("launch nn_embedding_forward"))?;
        Ok(())
    }

    /// `dtable[ids[r], :] += dy[r, :]` (a scatter-add: a repeated id sums its positions'
    /// gradients in position order, as the CPU twin), like halo-train's
    /// `cpu::embedding::embedding_backward`. Accumulates into `dtable`; no ids is a no-op.
    pub fn embedding_backward(
        &self,
        dy: &impl DevicePtr<f32>,
        ids: &CudaTokenIds,
        dim: usize,
        dtable: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_table("dtable", dtable.len(), ids, dim)?;
        check_len("dy", ids.len * dim, dy.len())?;
        if ids.is_empty() {
            return Ok(());
        }
        let stream = self.stream();
        let (dy_ptr, _r0) = dy.device_ptr(stream);
        let (packed_ptr, _r1) = ids.packed.device_ptr(stream);
        let (dtable_ptr, _w) = dtable.device_ptr_mut(stream);
        check_aligned::<f32>("dy", dy_ptr)?;
        check_aligned::<f32>("dtable", dtable_ptr)?;
        let [_, positions, distinct, offsets] = ids.parts();
        let positions_ptr = element_ptr::<u32>(packed_ptr, positions);
        let distinct_ptr = element_ptr::<u32>(packed_ptr, distinct);
        let offsets_ptr = element_ptr::<u32>(packed_ptr, offsets);
        let (groups_arg, dim_arg) = (as_i64(ids.groups), as_i64(dim));
        let mut launch = stream.launch_builder(self.function("nn_embedding_backward")?);
        launch
            .arg(&dy_ptr)
            .arg(&distinct_ptr)
            .arg(&offsets_ptr)
            .arg(&positions_ptr)
            .arg(&groups_arg)
            .arg(&dim_arg)
            .arg(&dtable_ptr);
        // SAFETY: `nn_embedding_backward(const float* dy, const uint32_t* unique_ids, const
        // uint32_t* offsets, const uint32_t* positions, int64_t groups, int64_t dim, float*
        // dtable)`; the parts of `packed` were built by `pack_token_ids` (distinct ids <
        // table_rows, offsets non-decreasing up to n, positions < n); dtable holds table_rows · dim
        // floats and dy n · dim (checked). Distinct ids: no two blocks write the same row.
        unsafe { launch.launch(row_launch(ids.groups, dim)) }
            .map_err(cuda_err("launch nn_embedding_backward"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::pack_token_ids;

    #[test]
    fn groups_positions_by_id_in_order() {
        let (packed, groups) = pack_token_ids(&[3, 1, 3, 0, 1, 3], 4).unwrap();
        assert_eq!(groups, 3);
        let n = 6;
        assert_eq!(&packed[..n], &[3, 1, 3, 0, 1, 3]);
        assert_eq!(&packed[n..2 * n], &[3, 1, 4, 0, 2, 5]);
        assert_eq!(&packed[2 * n..2 * n + groups], &[0, 1, 3]);
        assert_eq!(&packed[2 * n + groups..], &[0, 1, 3, 6]);
    }

    #[test]
    fn names_the_first_bad_id() {
        let err = pack_token_ids(&[0, 5, 9], 5).unwrap_err().to_string();
        assert!(err.contains("id 5 at position 1"), "{err}");
    }
}
