//! The one GEMM of the fused head: `C = β·C + A·B` on f32 tiles through `matrixmultiply::sgemm`,
//! single-threaded (the parallelism is rayon across tiles). Chosen over the `gemm` crate by a
//! measurement at the default tile (256 × 2048 × 1024, one core of this machine): 55 GFLOP/s
//! against 51, and no new dependency tree. Its k-loop order is fixed, so a product's bits do not
//! depend on threads.

/// A strided read-only matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// Row-major `[rows, cols]`.
    pub fn rows(data: &'a [f32], cols: usize) -> View<'a> {
        View {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// The transpose of a row-major `[rows, cols]` matrix (so `[cols, rows]`).
    pub fn transposed(data: &'a [f32], cols: usize) -> View<'a> {
        View {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }
    /// The largest index an `m × n` view reads, plus one (0 when empty).
    fn extent(&self, m: usize, n: usize) -> usize {
        if m == 0 || n == 0 {
            0
        } else {
            (m - 1) * self.row_stride + (n - 1) * self.col_stride + 1
        }
    }
}

/// `c[m × n] (row-major, row stride n) = beta · c + a[m × k] · b[k × n]`.
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: &mut [f32],
) {
    // The bounds sgemm relies on; they hold by construction at every call site.
    assert!(a.extent(m, k) <= a.data.len() && b.extent(k, n) <= b.data.len());
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every element sgemm reads (a: m × k, b: k × n) or writes (c: m × n, row stride n)
    // lies inside its slice (asserted above); the slices do not alias (c is &mut).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}
