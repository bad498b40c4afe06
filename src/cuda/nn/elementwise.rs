//! CUDA twins of halo-train's `autograd::cpu::elementwise` (`accumulate`, `accumulate_scaled`,
//! `add_bias_forward`, `bias_backward`, `multiply`, `accumulate_product`) and of the forwards of the
//! tape's `Add`, `Scale` and `Sum` ([`CudaBackend::add`], [`CudaBackend::scale`],
//! [`CudaBackend::sum`]; their backwards are [`CudaBackend::accumulate`],
//! [`CudaBackend::accumulate_scaled`] and [`CudaBackend::accumulate_broadcast`]). Kernels in
//! `kernels/nn_elementwise.cu`.
//!
//! Every method checks lengths on the host and queues its kernel(s) without waiting. Empty inputs
//! are a no-op (except [`CudaBackend::sum`], which writes 0). The column sums
//! ([`CudaBackend::bias_backward`], also layer norm's dγ/dβ) and the total sum reduce in a fixed
//! order that depends on the shape alone: the same bits every run, on every device.

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::super::device::{cuda_err, CudaBackend};
use super::super::launch::{blocks_launch, check_aligned, check_len};
use crate::error::{HaloError, Result};

/// Threads of the flat (grid-stride) kernels.
const FLAT_THREADS: u32 = 256;
/// Most blocks of a grid-stride launch (a flat op's result does not depend on the grid).
const FLAT_MAX_BLOCKS: usize = 4096;
/// Most blocks of a row kernel; more rows are taken grid-stride (one block per row at a time).
/// Several waves of a large GPU's resident blocks (an H200 holds ~1000 blocks of 256 threads).
const ROW_MAX_BLOCKS: usize = 4096;
/// Most threads of a row kernel (`__launch_bounds__` of the row kernels).
const ROW_MAX_THREADS: usize = 256;
/// Rows per chunk of the column sums at least: chunks = ⌈rows / rows_per_chunk⌉ ≤ 512.
const COLUMN_MIN_ROWS_PER_CHUNK: usize = 4;
const COLUMN_MAX_CHUNKS: usize = 512;
/// Elements per block of the total sum at least, and its most blocks (the split depends on n).
const SUM_MIN_PER_BLOCK: usize = 2048;
const SUM_MAX_BLOCKS: usize = 1024;

/// `n` as the kernels' `int64_t`.
pub(super) fn as_i64(n: usize) -> i64 {
    n as i64
}

/// A grid-stride launch over `n > 0` elements.
pub(super) fn flat_launch(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(FLAT_THREADS as usize).min(FLAT_MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (FLAT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads of a row kernel over rows of `cols` elements: `cols` rounded up to a warp, at most
/// 256 (so a 128-wide row does not leave half a block idle).
pub(super) fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(32) * 32).clamp(32, ROW_MAX_THREADS) as u32
}

/// One block per row (`rows > 0`), grid-stride beyond [`ROW_MAX_BLOCKS`].
pub(super) fn row_launch(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.min(ROW_MAX_BLOCKS) as u32, 1, 1),
        block_dim: (row_threads(cols), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `rows / cols` for a `[rows, cols]` buffer of `len` elements (`cols > 0`, `len % cols == 0`).
pub(super) fn rows_of(what: &'static str, len: usize, cols: usize, op: &str) -> Result<usize> {
    if cols == 0 {
        return Err(HaloError::InvalidShape(format!(
            "{op}: `{what}` has 0 columns (the row length must be positive)"
        )));
    }
    if !len.is_multiple_of(cols) {
        return Err(HaloError::InvalidShape(format!(
            "{op}: `{what}` has {len} elements, not a whole number of rows of {cols}"
        )));
    }
    Ok(len / cols)
}

/// The split of a column sum over `rows > 0` rows: `(rows_per_chunk, chunks)`, from the shape only.
pub(super) fn column_chunks(rows: usize) -> (usize, usize) {
    let rows_per_chunk = rows
        .div_ceil(COLUMN_MAX_CHUNKS)
        .max(COLUMN_MIN_ROWS_PER_CHUNK);
    (rows_per_chunk, rows.div_ceil(rows_per_chunk))
}

/// The grid of a column-partials kernel: one block per (chunk, tile of `row_threads(cols)` columns).
pub(super) fn column_partials_launch(chunks: usize, cols: usize) -> Result<LaunchConfig> {
    let threads = row_threads(cols);
    let tiles = cols.div_ceil(threads as usize);
    let blocks = chunks.checked_mul(tiles).ok_or_else(|| {
        HaloError::InvalidShape(format!("{chunks} chunks × {tiles} column tiles overflow"))
    })?;
    blocks_launch(blocks, threads)
}

/// Device address of element `index` of a buffer at `base`.
pub(super) fn element_ptr<E>(base: u64, index: usize) -> u64 {
    base + (index * std::mem::size_of::<E>()) as u64
}

/// Queues the flat kernel `$name` over `$n > 0` elements with the arguments in order.
macro_rules! launch_flat {
    ($backend:expr, $name:expr, $n:expr $(, $arg:expr)*) => {{
        let mut launch = $backend.stream().launch_builder($backend.function($name)?);
        $(launch.arg($arg);)*
        // SAFETY: each caller passes the arguments of `$name` (kernels/nn_elementwise.cu) in
        // order, every buffer holding at least `$n` elements (checked); outputs are borrowed
        // mutably, so they cannot alias an input.
        unsafe { launch.launch(flat_launch($n)) }.map_err(cuda_err("launch nn elementwise"))?;
        Ok(())
    }};
}

impl CudaBackend {
    /// `dst += src` (the backward of a sum; halo-train's `cpu::elementwise::accumulate`).
    pub fn accumulate(
        &self,
        dst: &mut impl DevicePtrMut<f32>,
        src: &impl DevicePtr<f32>,
    ) -> Result<()> {
        check_len("src", dst.len(), src.len())?;
        let n = dst.len();
        if n == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (src_ptr, _r) = src.device_ptr(stream);
        let (dst_ptr, _w) = dst.device_ptr_mut(stream);
        check_aligned::<f32>("src", src_ptr)?;
        check_aligned::<f32>("dst", dst_ptr)?;
        let n_arg = as_i64(n);
        launch_flat!(self, "nn_accumulate", n, &dst_ptr, &src_ptr, &n_arg)
    }

    /// `dst += factor · src` (the backward of [`CudaBackend::scale`]; halo-train's
    /// `cpu::elementwise::accumulate_scaled`).
    pub fn accumulate_scaled(
        &self,
        dst: &mut impl DevicePtrMut<f32>,
        src: &impl DevicePtr<f32>,
        factor: f32,
    ) -> Result<()> {
        check_len("src", dst.len(), src.len())?;
        let n = dst.len();
        if n == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (src_ptr, _r) = src.device_ptr(stream);
        let (dst_ptr, _w) = dst.device_ptr_mut(stream);
        check_aligned::<f32>("src", src_ptr)?;
        check_aligned::<f32>("dst", dst_ptr)?;
        let n_arg = as_i64(n);
        launch_flat!(
            self,
            "nn_accumulate_scaled",
            n,
            &dst_ptr,
            &src_ptr,
            &factor,
            &n_arg
        )
    }

    /// `dst[i] += src[0]` for every `i`, `src` one element on the device: the backward of
    /// [`CudaBackend::sum`] (the tape's `Sum`: every input element receives the output's gradient).
    pub fn accumulate_broadcast(
        &self,
        dst: &mut impl DevicePtrMut<f32>,
        src: &impl DevicePtr<f32>,
    ) -> Result<()> {
        check_len("src", 1, src.len())?;
        let n = dst.len();
        if n == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (src_ptr, _r) = src.device_ptr(stream);
        let (dst_ptr, _w) = dst.device_ptr_mut(stream);
        check_aligned::<f32>("src", src_ptr)?;
        check_aligned::<f32>("dst", dst_ptr)?;
        let n_arg = as_i64(n);
        launch_flat!(
            self,
            "nn_accumulate_broadcast",
            n,
            &dst_ptr,
            &src_ptr,
            &n_arg
        )
    }

    /// `dst += a ⊙ b` (the backward of [`CudaBackend::multiply`]; halo-train's
    /// `cpu::elementwise::accumulate_product`).
    pub fn accumulate_product(
        &self,
        dst: &mut impl DevicePtrMut<f32>,
        a: &impl DevicePtr<f32>,
        b: &impl DevicePtr<f32>,
    ) -> Result<()> {
        check_len("a", dst.len(), a.len())?;
        check_len("b", dst.len(), b.len())?;
        let n = dst.len();
        if n == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (a_ptr, _r0) = a.device_ptr(stream);
        let (b_ptr, _r1) = b.device_ptr(stream);
        let (dst_ptr, _w) = dst.device_ptr_mut(stream);
        check_aligned::<f32>("a", a_ptr)?;
        check_aligned::<f32>("b", b_ptr)?;
        check_aligned::<f32>("dst", dst_ptr)?;
        let n_arg = as_i64(n);
        launch_flat!(
            self,
            "nn_accumulate_product",
            n,
            &dst_ptr,
            &a_ptr,
            &b_ptr,
            &n_arg
        )
    }

    /// `y = a + b`, same lengths (the forward of the tape's `Add`, the residual connection).
    /// Overwrites `y`.
    pub fn add(
        &self,
        a: &impl DevicePtr<f32>,
        b: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_len("b", a.len(), b.len())?;
        check_len("y", a.len(), y.len())?;
        self.binary("nn_add", a, b, y)
    }

    /// `y = x ⊙ m`, same lengths (dropout with a mask; halo-train's `cpu::elementwise::multiply`).
    /// Overwrites `y`.
    pub fn multiply(
        &self,
        x: &impl DevicePtr<f32>,
        m: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_len("m", x.len(), m.len())?;
        check_len("y", x.len(), y.len())?;
        self.binary("nn_multiply", x, m, y)
    }

    /// Queues `name(a, b, y, n)` (lengths checked by the caller).
    fn binary(
        &self,
        name: &'static str,
        a: &impl DevicePtr<f32>,
        b: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = y.len();
        if n == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (a_ptr, _r0) = a.device_ptr(stream);
        let (b_ptr, _r1) = b.device_ptr(stream);
        let (y_ptr, _w) = y.device_ptr_mut(stream);
        check_aligned::<f32>("a", a_ptr)?;
        check_aligned::<f32>("b", b_ptr)?;
        check_aligned::<f32>("y", y_ptr)?;
        let n_arg = as_i64(n);
        launch_flat!(self, name, n, &a_ptr, &b_ptr, &y_ptr, &n_arg)
    }

    /// `y = x · factor` (the forward of the tape's `Scale`). Overwrites `y`.
    pub fn scale(
        &self,
        x: &impl DevicePtr<f32>,
        factor: f32,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_len("y", x.len(), y.len())?;
        let n = y.len();
        if n == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let (x_ptr, _r) = x.device_ptr(stream);
        let (y_ptr, _w) = y.device_ptr_mut(stream);
        check_aligned::<f32>("x", x_ptr)?;
        check_aligned::<f32>("y", y_ptr)?;
        let n_arg = as_i64(n);
        launch_flat!(self, "nn_scale", n, &x_ptr, &factor, &y_ptr, &n_arg)
    }

    /// `y[r, c] = x[r, c] + b[c]` with `cols = b.len()` (halo-train's
    /// `cpu::elementwise::add_bias_forward`). Overwrites `y`. An empty `b` is an error unless `x`
    /// is empty too.
    pub fn add_bias_forward(
        &self,
        x: &impl DevicePtr<f32>,
        b: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        check_len("y", x.len(), y.len())?;
        if x.len() == 0 {
            return Ok(());
        }
        let cols = b.len();
        let rows = rows_of("x", x.len(), cols, "add_bias_forward")?;
        let stream = self.stream();
        let (x_ptr, _r0) = x.device_ptr(stream);
        let (b_ptr, _r1) = b.device_ptr(stream);
        let (y_ptr, _w) = y.device_ptr_mut(stream);
        check_aligned::<f32>("x", x_ptr)?;
        check_aligned::<f32>("b", b_ptr)?;
        check_aligned::<f32>("y", y_ptr)?;
        let (rows_arg, cols_arg) = (as_i64(rows), as_i64(cols));
        let mut launch = stream.launch_builder(self.function("nn_add_bias_forward")?);
        launch
            .arg(&x_ptr)
            .arg(&b_ptr)
            .arg(&rows_arg)
            .arg(&cols_arg)
            .arg(&y_ptr);
        // SAFETY: `nn_add_bias_forward(const float*, const float*, int64_t, int64_t, float*)`;
        // x and y hold rows · cols elements, b cols (checked); y is borrowed mutably.
        unsafe { launch.launch(row_launch(rows, cols)) }
            .map_err(cuda_err("launch nn_add_bias_forward"))?;
        Ok(())
    }

    /// `db[c] += Σ_r dy[r, c]` with `cols = db.len()` (halo-train's
    /// `cpu::elementwise::bias_backward`): deterministic column sums (partials per chunk of rows,
    /// then added in chunk order). An empty `db` is an error unless `dy` is empty too.
    pub fn bias_backward(
        &self,
        dy: &impl DevicePtr<f32>,
        db: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        if dy.len() == 0 {
            return Ok(());
        }
        let cols = db.len();
        let rows = rows_of("dy", dy.len(), cols, "bias_backward")?;
        let (rows_per_chunk, chunks) = column_chunks(rows);
        let mut partials = self.alloc_output::<f32>(chunks * cols)?;
        let stream = self.stream();
        {
            let (dy_ptr, _r) = dy.device_ptr(stream);
            let (partials_ptr, _w) = partials.device_ptr_mut(stream);
            check_aligned::<f32>("dy", dy_ptr)?;
            let (rows_arg, cols_arg, rpc_arg) =
                (as_i64(rows), as_i64(cols), as_i64(rows_per_chunk));
            let mut launch = stream.launch_builder(self.function("nn_column_sum_partials")?);
            launch
                .arg(&dy_ptr)
                .arg(&rows_arg)
                .arg(&cols_arg)
                .arg(&rpc_arg)
                .arg(&partials_ptr);
            // SAFETY: `nn_column_sum_partials(const float*, int64_t, int64_t, int64_t, float*)`;
            // dy holds rows · cols elements, partials chunks · cols; one block per (chunk, tile).
            unsafe { launch.launch(column_partials_launch(chunks, cols)?) }
                .map_err(cuda_err("launch nn_column_sum_partials"))?;
        }
        let (partials_ptr, _r) = partials.device_ptr(stream);
        let (db_ptr, _w) = db.device_ptr_mut(stream);
        check_aligned::<f32>("db", db_ptr)?;
        self.column_sums_finish(partials_ptr, chunks, cols, db_ptr)
    }

    /// Queues `out[c] += Σ_k partials[k·cols + c]` over `chunks` chunks in order (`cols > 0`).
    /// The caller holds the guards of both buffers (`partials`: chunks · cols, `out`: cols).
    pub(super) fn column_sums_finish(
        &self,
        partials_ptr: u64,
        chunks: usize,
        cols: usize,
        out_ptr: u64,
    ) -> Result<()> {
        let (chunks_arg, cols_arg) = (as_i64(chunks), as_i64(cols));
        let mut launch = self
            .stream()
            .launch_builder(self.function("nn_column_sums_finish")?);
        launch
            .arg(&partials_ptr)
            .arg(&chunks_arg)
            .arg(&cols_arg)
            .arg(&out_ptr);
        // SAFETY: `nn_column_sums_finish(const float*, int64_t, int64_t, float*)`; the caller
        // guarantees partials holds chunks · cols floats and out cols, and that they are distinct.
        unsafe { launch.launch(flat_launch(cols)) }
            .map_err(cuda_err("launch nn_column_sums_finish"))?;
        Ok(())
    }

    /// `out[0] = Σ x` (the forward of the tape's `Sum`, accumulated in f64 like it, rounded to
    /// f32), into a one-element device buffer, without reading it back. A fixed two-stage
    /// reduction (blocks of a size set by `x.len()` alone, then one block in order): the same bits
    /// every run. Overwrites `out`; an empty `x` gives 0.
    pub fn sum(&self, x: &impl DevicePtr<f32>, out: &mut impl DevicePtrMut<f32>) -> Result<()> {
        check_len("out", 1, out.len())?;
        let n = x.len();
        let per_block = n.div_ceil(SUM_MAX_BLOCKS).max(SUM_MIN_PER_BLOCK);
        let blocks = n.div_ceil(per_block);
        let mut partials = self.alloc_output::<f64>(blocks.max(1))?;
        let stream = self.stream();
        if blocks > 0 {
            let (x_ptr, _r) = x.device_ptr(stream);
            let (partials_ptr, _w) = partials.device_ptr_mut(stream);
            check_aligned::<f32>("x", x_ptr)?;
            let (n_arg, per_block_arg) = (as_i64(n), as_i64(per_block));
            let mut launch = stream.launch_builder(self.function("nn_sum_partials")?);
            launch
                .arg(&x_ptr)
                .arg(&n_arg)
                .arg(&per_block_arg)
                .arg(&partials_ptr);
            // SAFETY: `nn_sum_partials(const float*, int64_t, int64_t, double*)`; x holds n
            // floats, partials `blocks` = ⌈n / per_block⌉ doubles, one block each.
            unsafe { launch.launch(blocks_launch(blocks, FLAT_THREADS)?) }
                .map_err(cuda_err("launch nn_sum_partials"))?;
        }
        let (partials_ptr, _r) = partials.device_ptr(stream);
        let (out_ptr, _w) = out.device_ptr_mut(stream);
        check_aligned::<f32>("out", out_ptr)?;
        let blocks_arg = as_i64(blocks);
        let mut launch = stream.launch_builder(self.function("nn_sum_finish")?);
        launch.arg(&partials_ptr).arg(&blocks_arg).arg(&out_ptr);
        // SAFETY: `nn_sum_finish(const double*, int64_t, float*)`; partials holds `blocks`
        // doubles (none read when 0), out one float; a single block.
        unsafe { launch.launch(blocks_launch(1, FLAT_THREADS)?) }
            .map_err(cuda_err("launch nn_sum_finish"))?;
        Ok(())
    }
}
