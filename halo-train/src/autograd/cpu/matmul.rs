//! Matrix products through `matrixmultiply::sgemm` (packed, vectorized). Transposes need no
//! copy: sgemm takes row and column strides for every operand. But it packs an operand fast only
//! in one layout (`a` column-major, `b` row-major), so a large operand in the other one is first
//! transposed into a pooled buffer (see `transpose.rs`): same bits, less time.
//!
//! One thread pool: matrixmultiply's own threading is off (its pool and rayon's woke each other,
//! issue 13); a large product is split into blocks of output rows or columns, one rayon task
//! each, each a single-threaded sgemm. Splitting the output does not change any element's
//! arithmetic (each is the same blocked dot product whichever task computes it), so the results
//! are the same bits as one call.

use rayon::prelude::*;

use super::transpose::transpose_into;
use crate::autograd::pool::Buffer;

/// A read-only matrix view: `rows × cols` at `data[offset + r*row_stride + c*col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// The backing buffer; the view may cover only part of it.
    pub data: &'a [f32],
    /// Index in `data` of element `(0, 0)`.
    pub offset: usize,
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance in elements between `(r, c)` and `(r + 1, c)`; [`gemm`] requires it `>= 0`.
    pub row_stride: isize,
    /// Distance in elements between `(r, c)` and `(r, c + 1)`; [`gemm`] requires it `>= 0`.
    pub col_stride: isize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            offset: 0,
            rows,
            cols,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The index one past the last element touched, for bounds checks.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.offset;
        }
        self.offset
            + (self.rows - 1) * self.row_stride as usize
            + (self.cols - 1) * self.col_stride as usize
            + 1
    }
}

/// A mutable matrix view, laid out like [`MatRef`].
#[derive(Debug)]
pub struct MatMut<'a> {
    /// The backing buffer; the view may cover only part of it.
    pub data: &'a mut [f32],
    /// Index in `data` of element `(0, 0)`.
    pub offset: usize,
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance in elements between `(r, c)` and `(r + 1, c)`; [`gemm`] requires it `>= 0`.
    pub row_stride: isize,
    /// Distance in elements between `(r, c)` and `(r, c + 1)`; [`gemm`] requires it `>= 0`.
    pub col_stride: isize,
}

impl<'a> MatMut<'a> {
    /// A dense row-major matrix.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            offset: 0,
            rows,
            cols,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.offset;
        }
        self.offset
            + (self.rows - 1) * self.row_stride as usize
            + (self.cols - 1) * self.col_stride as usize
            + 1
    }
}

/// Products with fewer multiply-adds than this run as one sgemm on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;
/// Rows (or columns) of the output per rayon task at least.
const PARALLEL_MIN_SPAN: usize = 32;

/// `c = alpha · a·b + beta · c`. Panics if the shapes disagree or a view leaves its buffer
/// (strides must be non-negative), which would be a bug in the caller, not bad user input.
///
/// A large product is cut into one block of output rows or columns per rayon thread, each one
/// single-threaded sgemm. Every task packs its own copy of the operand it shares with the
/// others (all of `b` for a cut by rows, all of `a` by columns), so the cut goes across the
/// longer side of the output, where the shared operand is the smaller one.
pub fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) {
    gemm_in_tasks(alpha, a, b, beta, c, rayon::current_num_threads());
}

/// [`gemm`] cut into at most `max_tasks` rayon tasks (1: one sgemm on the calling thread).
fn gemm_in_tasks(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: MatMut<'_>,
    max_tasks: usize,
) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    assert_eq!(
        (a.rows, b.cols),
        (c.rows, c.cols),
        "gemm: output shape differs"
    );
    assert!(a.row_stride >= 0 && a.col_stride >= 0 && b.row_stride >= 0 && b.col_stride >= 0);
    assert!(c.row_stride >= 0 && c.col_stride >= 0);
    assert!(a.extent() <= a.data.len(), "gemm: `a` view out of bounds");
    assert!(b.extent() <= b.data.len(), "gemm: `b` view out of bounds");
    assert!(c.extent() <= c.data.len(), "gemm: `c` view out of bounds");
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    // Operands sgemm would pack one element at a time, copied once (before the split, so that
    // no task packs them slowly) into the layout it packs fast; the bits stay the same.
    let a_copy = a_needs_relayout(&a).then(|| column_major_copy(a));
    let a = match &a_copy {
        Some(buf) => MatRef {
            data: buf,
            offset: 0,
            row_stride: 1,
            col_stride: a.rows as isize,
            ..a
        },
        None => a,
    };
    let b_copy = b_needs_relayout(&b).then(|| row_major_copy(b));
    let b = match &b_copy {
        Some(buf) => MatRef {
            data: buf,
            offset: 0,
            row_stride: b.cols as isize,
            col_stride: 1,
            ..b
        },
        None => b,
    };
    let (m, n) = (c.rows, c.cols);
    let (rsc, csc) = (c.row_stride as usize, c.col_stride as usize);
    // Tasks may only share `c` if no two elements of the view are the same memory.
    let rows_disjoint = rsc >= n.saturating_mul(csc) && csc >= 1;
    let cols_disjoint = csc >= m.saturating_mul(rsc) && rsc >= 1;
    let threads = max_tasks;
    let macs = m.saturating_mul(a.cols).saturating_mul(n);
    let by_columns = n > m;
    let span = if by_columns { n } else { m };
    let tasks = threads.min(span / PARALLEL_MIN_SPAN);
    if tasks < 2 || macs < PARALLEL_MIN_MACS || !(rows_disjoint || cols_disjoint) {
        // SAFETY: bounds checked above; `c` is borrowed mutably, so it aliases neither input.
        unsafe {
            sgemm_raw(
                alpha,
                a,
                b,
                beta,
                c.data.as_mut_ptr().add(c.offset),
                rsc,
                csc,
            )
        };
        return;
    }
    let per_task = span.div_ceil(tasks).div_ceil(16) * 16;
    let c_ptr = SharedOutput(unsafe { c.data.as_mut_ptr().add(c.offset) });
    (0..span.div_ceil(per_task))
        .into_par_iter()
        .for_each(|task| {
            let first = task * per_task;
            let len = per_task.min(span - first);
            let c_ptr = &c_ptr;
            // SAFETY: the blocks are disjoint sets of whole rows (or columns) of a view whose
            // elements are distinct memory (checked above), all inside `c` (its extent checked).
            unsafe {
                if by_columns {
                    let b_part = MatRef {
                        offset: b.offset + first * b.col_stride as usize,
                        cols: len,
                        ..b
                    };
                    sgemm_raw(alpha, a, b_part, beta, c_ptr.0.add(first * csc), rsc, csc);
                } else {
                    let a_part = MatRef {
                        offset: a.offset + first * a.row_stride as usize,
                        rows: len,
                        ..a
                    };
                    sgemm_raw(alpha, a_part, b, beta, c_ptr.0.add(first * rsc), rsc, csc);
                }
            }
        });
}

/// Operands smaller than this are packed as they are: the copy would not pay for its call.
const RELAYOUT_MIN_ELEMS: usize = 256;

/// Whether `a` is row-major (or a strided row-major view) and large enough to copy: sgemm packs
/// `a` fast only when it is column-major (`row_stride == 1`).
fn a_needs_relayout(a: &MatRef<'_>) -> bool {
    a.row_stride != 1
        && a.col_stride == 1
        && a.row_stride as usize >= a.cols
        && a.rows > 1
        && a.rows * a.cols >= RELAYOUT_MIN_ELEMS
}

/// Whether `b` is column-major (a transposed row-major matrix, e.g. `wᵀ`) and large enough to
/// copy: sgemm packs `b` fast only when it is row-major (`col_stride == 1`).
fn b_needs_relayout(b: &MatRef<'_>) -> bool {
    b.col_stride != 1
        && b.row_stride == 1
        && b.col_stride as usize >= b.rows
        && b.cols > 1
        && b.rows * b.cols >= RELAYOUT_MIN_ELEMS
}

/// `a` (with `col_stride == 1`) stored column-major, in a pooled buffer.
fn column_major_copy(a: MatRef<'_>) -> Buffer {
    let mut buf = Buffer::for_overwrite(a.rows * a.cols);
    transpose_into(
        a.data,
        a.offset,
        a.row_stride as usize,
        a.rows,
        a.cols,
        &mut buf,
    );
    buf
}

/// `b` (with `row_stride == 1`) stored row-major, in a pooled buffer: the transpose of `bᵀ`,
/// which is row-major with rows `col_stride` apart.
fn row_major_copy(b: MatRef<'_>) -> Buffer {
    let mut buf = Buffer::for_overwrite(b.rows * b.cols);
    transpose_into(
        b.data,
        b.offset,
        b.col_stride as usize,
        b.cols,
        b.rows,
        &mut buf,
    );
    buf
}

/// The output pointer handed to every task of one [`gemm`] (each writes its own block).
struct SharedOutput(*mut f32);
// SAFETY: the tasks write disjoint elements through it and `gemm` waits for all of them.
unsafe impl Sync for SharedOutput {}

/// One single-threaded sgemm into the `a.rows × b.cols` matrix at `c` (strides `rsc`, `csc`).
///
/// # Safety
/// `a`, `b` must lie inside their slices, the output inside memory the caller may write, not
/// overlapping `a` or `b`.
unsafe fn sgemm_raw(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: *mut f32,
    rsc: usize,
    csc: usize,
) {
    matrixmultiply::sgemm(
        a.rows,
        a.cols,
        b.cols,
        alpha,
        a.data.as_ptr().add(a.offset),
        a.row_stride,
        a.col_stride,
        b.data.as_ptr().add(b.offset),
        b.row_stride,
        b.col_stride,
        beta,
        c,
        rsc as isize,
        csc as isize,
    );
}

/// Forward of `y = x·w (+ b)` with `x: [n, k]`, `w: [k, m]` (Conv1D layout) or `w: [m, k]`
/// when `transpose_w` (the tied unembedding `h·wteᵀ`), `b: [m]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    n: usize,
    k: usize,
    m: usize,
    transpose_w: bool,
    y: &mut [f32],
) {
    let wv = weight_view(w, k, m, transpose_w);
    let beta = match b {
        Some(b) if m > 0 => {
            // In rayon tasks: one pass over all of `y`, on the thread that records the tape.
            y.par_chunks_mut(m * super::rows_per_task(m))
                .for_each(|rows| {
                    for row in rows.chunks_exact_mut(m) {
                        row.copy_from_slice(b);
                    }
                });
            1.0
        }
        _ => 0.0,
    };
    gemm(
        1.0,
        MatRef::row_major(x, n, k),
        wv,
        beta,
        MatMut::row_major(y, n, m),
    );
}

/// `w` seen as a `[k, m]` matrix whatever its storage.
fn weight_view(w: &[f32], k: usize, m: usize, transpose_w: bool) -> MatRef<'_> {
    if transpose_w {
        MatRef::row_major(w, m, k).t()
    } else {
        MatRef::row_major(w, k, m)
    }
}

/// Backward of [`linear_forward`]: `dx += dy·wᵀ`, `dw += xᵀ·dy` (or `dyᵀ·x` when transposed),
/// `db += Σ_rows dy`. Pass `None` for a gradient that is not needed.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    n: usize,
    k: usize,
    m: usize,
    transpose_w: bool,
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) {
    let dyv = MatRef::row_major(dy, n, m);
    let input_grad = |dx: &mut [f32], tasks: usize| {
        let wv = weight_view(w, k, m, transpose_w);
        gemm_in_tasks(1.0, dyv, wv.t(), 1.0, MatMut::row_major(dx, n, k), tasks);
    };
    let weight_grad = |dw: &mut [f32], tasks: usize| {
        let xv = MatRef::row_major(x, n, k);
        if transpose_w {
            gemm_in_tasks(1.0, dyv.t(), xv, 1.0, MatMut::row_major(dw, m, k), tasks);
        } else {
            gemm_in_tasks(1.0, xv.t(), dyv, 1.0, MatMut::row_major(dw, k, m), tasks);
        }
    };
    let threads = rayon::current_num_threads();
    match (dx, dw) {
        // Both products have n·k·m multiply-adds: run them side by side, each on half the
        // threads, rather than one after the other each cut across all of them. Fewer, larger
        // tasks: no operand is packed by two tasks, and one fork-join instead of two.
        // The bias's column sums go with the weight's product, not after both.
        (Some(dx), Some(dw)) if threads >= 2 && n * k * m >= PARALLEL_MIN_MACS => {
            rayon::join(
                || input_grad(dx, threads / 2),
                || {
                    weight_grad(dw, threads - threads / 2);
                    if let Some(db) = db {
                        super::elementwise::bias_backward(dy, db);
                    }
                },
            );
        }
        (dx, dw) => {
            if let Some(dx) = dx {
                input_grad(dx, threads);
            }
            if let Some(dw) = dw {
                weight_grad(dw, threads);
            }
            if let Some(db) = db {
                super::elementwise::bias_backward(dy, db);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `rows × cols` view of fresh values: row-major with `pad` extra columns, or (when
    /// `transposed`) the transpose of such a `cols × rows` matrix; starting at `offset`.
    fn operand(
        rows: usize,
        cols: usize,
        transposed: bool,
        pad: usize,
        seed: u32,
    ) -> (Vec<f32>, MatRef<'static>) {
        let (r, c) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let offset = 5;
        let len = offset + r * (c + pad);
        let data: Vec<f32> = (0..len as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        let leaked: &'static [f32] = Box::leak(data.clone().into_boxed_slice());
        let v = MatRef {
            data: leaked,
            offset,
            rows: r,
            cols: c,
            row_stride: (c + pad) as isize,
            col_stride: 1,
        };
        (data, if transposed { v.t() } else { v })
    }

    fn at(v: &MatRef<'_>, r: usize, c: usize) -> f32 {
        v.data[v.offset + r * v.row_stride as usize + c * v.col_stride as usize]
    }

    /// Every layout of `a` and `b` at awkward sizes: the same bits as one direct sgemm on the
    /// original views (the copies only move data), and close to an f64 product.
    #[test]
    fn relaid_out_operands_give_the_same_bits() {
        for &(m, k, n) in &[
            (1, 300, 1),
            (17, 33, 19),
            (40, 64, 70),
            (64, 260, 48),
            (130, 20, 257),
        ] {
            for (ta, tb, pad) in [
                (false, false, 0),
                (true, false, 3),
                (false, true, 0),
                (true, true, 2),
                (false, false, 7),
            ] {
                let (_, a) = operand(m, k, ta, pad, 1);
                let (_, b) = operand(k, n, tb, pad, 2);
                for &(alpha, beta) in &[(1.0f32, 0.0f32), (0.5, 1.0)] {
                    let init: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 * 0.25).collect();
                    let mut got = init.clone();
                    gemm_in_tasks(alpha, a, b, beta, MatMut::row_major(&mut got, m, n), 2);
                    let mut want = init.clone();
                    // SAFETY: views checked in bounds by `gemm_in_tasks` just above.
                    unsafe { sgemm_raw(alpha, a, b, beta, want.as_mut_ptr(), n, 1) };
                    for i in 0..m * n {
                        assert_eq!(
                            got[i].to_bits(),
                            want[i].to_bits(),
                            "{m}x{k}x{n} ta={ta} tb={tb} at {i}"
                        );
                        let (r, c) = (i / n, i % n);
                        let exact: f64 = (0..k)
                            .map(|l| at(&a, r, l) as f64 * at(&b, l, c) as f64)
                            .sum::<f64>()
                            * alpha as f64
                            + beta as f64 * init[i] as f64;
                        assert!(
                            (got[i] as f64 - exact).abs() <= 1e-5 * (k as f64).sqrt() * 4.0,
                            "{m}x{k}x{n}: {} vs {exact}",
                            got[i]
                        );
                    }
                }
            }
        }
    }

    /// `linear_forward` with a bias (filled in rayon tasks) and `linear_backward` with all three
    /// gradients (the bias's beside the weight's) against f64, at sizes that split into tasks.
    #[test]
    fn linear_with_bias_matches_f64() {
        let val = |i: usize, s: usize| ((i * 7919 + s * 104729) % 997) as f32 / 498.5 - 1.0;
        for &(n, k, m, transpose_w) in &[
            (300, 20, 64, false),
            (130, 33, 17, true),
            (64, 256, 96, false),
        ] {
            let x: Vec<f32> = (0..n * k).map(|i| val(i, 1)).collect();
            let w: Vec<f32> = (0..k * m).map(|i| val(i, 2)).collect();
            let b: Vec<f32> = (0..m).map(|i| val(i, 3)).collect();
            let dy: Vec<f32> = (0..n * m).map(|i| val(i, 4)).collect();
            let wt = |i: usize, j: usize| if transpose_w { w[j * k + i] } else { w[i * m + j] } as f64;
            let mut y = vec![f32::NAN; n * m];
            linear_forward(&x, &w, Some(&b), n, k, m, transpose_w, &mut y);
            let (mut dx, mut dw, mut db) =
                (vec![0.5f32; n * k], vec![0.25f32; k * m], vec![1.0f32; m]);
            linear_backward(
                &x,
                &w,
                &dy,
                n,
                k,
                m,
                transpose_w,
                Some(&mut dx),
                Some(&mut dw),
                Some(&mut db),
            );
            let close = |got: f32, want: f64, terms: usize| {
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * (terms as f64).sqrt() * 4.0,
                    "{n}x{k}x{m}: {got} vs {want}"
                );
            };
            for r in 0..n {
                for j in 0..m {
                    let want =
                        b[j] as f64 + (0..k).map(|i| x[r * k + i] as f64 * wt(i, j)).sum::<f64>();
                    close(y[r * m + j], want, k);
                }
                for i in 0..k {
                    let want = 0.5 + (0..m).map(|j| dy[r * m + j] as f64 * wt(i, j)).sum::<f64>();
                    close(dx[r * k + i], want, m);
                }
            }
            for i in 0..k {
                for j in 0..m {
                    let want = 0.25
                        + (0..n)
                            .map(|r| x[r * k + i] as f64 * dy[r * m + j] as f64)
                            .sum::<f64>();
                    let at = if transpose_w { j * k + i } else { i * m + j };
                    close(dw[at], want, n);
                }
            }
            for j in 0..m {
                close(
                    db[j],
                    1.0 + (0..n).map(|r| dy[r * m + j] as f64).sum::<f64>(),
                    n,
                );
            }
        }
    }
}
