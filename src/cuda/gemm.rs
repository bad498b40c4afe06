//! [`CudaGemm`]: a safe row-major GEMM on device buffers through cuBLAS (`cublasGemmEx`, via
//! cudarc's `cublas` feature, dynamically loaded): `C = α·op(A)·op(B) + β·C` with f32, bf16 or f16
//! inputs, f32 accumulation, and an f32 or input-dtype output.
//!
//! cuBLAS is column-major; a row-major matrix is the column-major view of its transpose, so
//! `C = op(A)·op(B)` (row-major) is asked of cuBLAS as `Cᵀ = op(B)ᵀ·op(A)ᵀ`: the operands swapped,
//! `m` and `n` swapped, the transpose flags and leading dimensions passed through unchanged.
//!
//! libcublas is loaded only after a presence check ([`CudaBackend::gemm`] returns
//! [`HaloError::CudaUnavailable`] without it: cudarc itself would panic); on the emulated device
//! the emulated cuBLAS is loaded first ([`crate::emulation`]), which runs the GEMM on the CPU over
//! the emulated device memory.
//!
//! ```
//! use halo_kernels::cuda::{CudaBackend, GemmShape};
//!
//! let Ok(gpu) = CudaBackend::new().or_else(|_| CudaBackend::emulated()) else { return Ok(()) };
//! let Ok(blas) = gpu.gemm() else { return Ok(()) }; // no libcublas on this machine
//! // [2, 3] · [3, 2]ᵀ-stored-as-[2, 3]: b is given transposed.
//! let a = gpu.htod(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?;
//! let b = gpu.htod(&[1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0])?;
//! let mut c = gpu.alloc_zeros::<f32>(4)?;
//! blas.gemm(&GemmShape::packed(2, 2, 3, false, true), 1.0, &a, &b, 0.0, &mut c)?;
//! assert_eq!(gpu.dtoh(&c)?, vec![4.0, 2.0, 10.0, 5.0]);
//! # Ok::<(), halo_kernels::HaloError>(())
//! ```

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::device::CudaBackend;
use super::launch::{check_aligned, CudaLogit};
use crate::dtype::DType;
use crate::emulation;
use crate::error::{HaloError, Result};

/// The shape of one row-major GEMM `C[m × n] = α·op(A)[m × k]·op(B)[k × n] + β·C`.
///
/// `A` is stored `[m, k]` (or `[k, m]` when `a_transposed`) with row stride `lda`; `B` is stored
/// `[k, n]` (or `[n, k]` when `b_transposed`) with row stride `ldb`; `C` is `[m, n]` with row
/// stride `ldc`. Each leading dimension must be at least its stored row length (and ≥ 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    /// Rows of `C` and of `op(A)`.
    pub m: usize,
    /// Columns of `C` and of `op(B)`.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// `A` is stored `[k, m]` (use `Aᵀ`).
    pub a_transposed: bool,
    /// `B` is stored `[n, k]` (use `Bᵀ`).
    pub b_transposed: bool,
    /// Row stride of `A` as stored.
    pub lda: usize,
    /// Row stride of `B` as stored.
    pub ldb: usize,
    /// Row stride of `C`.
    pub ldc: usize,
}

impl GemmShape {
    /// The shape with every matrix packed (leading dimension = its stored row length).
    pub fn packed(m: usize, n: usize, k: usize, a_transposed: bool, b_transposed: bool) -> Self {
        GemmShape {
            m,
            n,
            k,
            a_transposed,
            b_transposed,
            lda: (if a_transposed { m } else { k }).max(1),
            ldb: (if b_transposed { k } else { n }).max(1),
            ldc: n.max(1),
        }
    }

    /// Stored `(rows, cols)` of `A`, `B` and `C`.
    fn stored(&self) -> [(usize, usize); 3] {
        let a = if self.a_transposed {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let b = if self.b_transposed {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        [a, b, (self.m, self.n)]
    }

    /// Checks the dimensions (cuBLAS takes `i32`) and that each buffer holds its matrix.
    fn check(&self, lens: [usize; 3]) -> Result<()> {
        let fits = |x: usize| i32::try_from(x).is_ok();
        let dims = [self.m, self.n, self.k, self.lda, self.ldb, self.ldc];
        if !dims.iter().all(|&x| fits(x)) {
            return Err(HaloError::InvalidShape(format!(
                "gemm: every dimension and leading dimension must fit in i32 (cuBLAS), got {self:?}"
            )));
        }
        let names = ["a", "b", "c"];
        let lds = [self.lda, self.ldb, self.ldc];
        for (((name, (rows, cols)), ld), len) in names.iter().zip(self.stored()).zip(lds).zip(lens)
        {
            if ld < cols.max(1) {
                return Err(HaloError::InvalidShape(format!(
                    "gemm: `{name}` is stored [{rows}, {cols}] but its leading dimension is {ld} \
                     (must be >= {})",
                    cols.max(1)
                )));
            }
            let needed = if rows == 0 || cols == 0 {
                0
            } else {
                (rows - 1)
                    .checked_mul(ld)
                    .and_then(|x| x.checked_add(cols))
                    .ok_or_else(|| {
                        HaloError::InvalidShape(format!("gemm: `{name}` overflows usize"))
                    })?
            };
            if len < needed {
                return Err(HaloError::InvalidShape(format!(
                    "gemm: `{name}` ([{rows}, {cols}], leading dimension {ld}) needs {needed} \
                     elements, the buffer has {len}"
                )));
            }
        }
        Ok(())
    }
}

/// A cuBLAS handle bound to a backend's stream: every GEMM is queued on that stream, after the
/// backend's earlier work on the same buffers.
#[derive(Debug)]
pub struct CudaGemm {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
}

impl CudaBackend {
    /// This backend's cuBLAS handle, on its stream (created on first use: `cublasCreate` is
    /// costly, so every op reuses one). `CudaUnavailable` when libcublas cannot be loaded (no CUDA
    /// toolkit libraries on this machine), never a panic.
    pub fn gemm(&self) -> Result<&CudaGemm> {
        if let Some(handle) = self.blas.get() {
            return Ok(handle);
        }
        if self.is_emulated() {
            emulation::load_cublas()?;
        }
        // SAFETY: only tries to dlopen libcublas; no cuBLAS call is made.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(HaloError::CudaUnavailable(
                "libcublas could not be loaded (install the CUDA toolkit's cuBLAS, or put \
                 libcublas.so on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let blas = CudaBlas::new(self.stream().clone()).map_err(blas_err("cublasCreate"))?;
        // Another thread may have won the race: its handle is kept, this one dropped.
        let _ = self.blas.set(CudaGemm {
            blas,
            stream: self.stream().clone(),
        });
        self.blas
            .get()
            .ok_or_else(|| HaloError::Cuda("cuBLAS handle not stored".into()))
    }
}

impl CudaGemm {
    /// `c = alpha · op(a) · op(b) + beta · c`, row-major (see [`GemmShape`]); products accumulate
    /// in f32. `C` is f32 or the inputs' dtype. With `beta == 0`, `c` is not read (it may hold
    /// anything). Queued on the handle's stream, without waiting.
    ///
    /// Errors: `InvalidShape` (a buffer too short for its matrix, a leading dimension too small, a
    /// dimension beyond `i32`, an output dtype other than f32 or `T`), `InvalidHyperParameter` for a
    /// non-finite `alpha` / `beta`, `Cuda` when cuBLAS refuses the call.
    pub fn gemm<T: CudaLogit, C: CudaLogit>(
        &self,
        shape: &GemmShape,
        alpha: f32,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
        beta: f32,
        c: &mut impl DevicePtrMut<C>,
    ) -> Result<()> {
        for (name, value) in [("alpha", alpha), ("beta", beta)] {
            if !value.is_finite() {
                return Err(HaloError::InvalidHyperParameter {
                    name,
                    value: value as f64,
                    reason: "a GEMM scale must be finite",
                });
            }
        }
        if !(C::DTYPE == DType::F32 || C::DTYPE == T::DTYPE) {
            return Err(HaloError::InvalidShape(format!(
                "gemm: output dtype {:?} must be f32 or the inputs' dtype {:?}",
                C::DTYPE,
                T::DTYPE
            )));
        }
        shape.check([a.len(), b.len(), c.len()])?;
        if shape.m == 0 || shape.n == 0 {
            return Ok(());
        }
        let stream = &self.stream;
        let (a_ptr, _ra) = a.device_ptr(stream);
        let (b_ptr, _rb) = b.device_ptr(stream);
        let (c_ptr, _wc) = c.device_ptr_mut(stream);
        check_aligned::<T>("a", a_ptr)?;
        check_aligned::<T>("b", b_ptr)?;
        check_aligned::<C>("c", c_ptr)?;
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // SAFETY: the three pointers come from live device buffers of this context, each holding
        // its matrix (checked above); alpha and beta are host f32s (the handle's default pointer
        // mode) matching CUBLAS_COMPUTE_32F; the guards order the call after earlier writes and
        // record it for later users of the buffers. Row-major → column-major as the module says.
        unsafe {
            blas_result::gemm_ex(
                *self.blas.handle(),
                op(shape.b_transposed),
                op(shape.a_transposed),
                shape.n as i32,
                shape.m as i32,
                shape.k as i32,
                (&alpha as *const f32).cast::<c_void>(),
                b_ptr as *const c_void,
                data_type(T::DTYPE),
                shape.ldb as i32,
                a_ptr as *const c_void,
                data_type(T::DTYPE),
                shape.lda as i32,
                (&beta as *const f32).cast::<c_void>(),
                c_ptr as *mut c_void,
                data_type(C::DTYPE),
                shape.ldc as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(blas_err("cublasGemmEx"))
    }
}

fn data_type(dtype: DType) -> blas_sys::cudaDataType {
    match dtype {
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
    }
}

/// A cuBLAS status as [`HaloError::Cuda`], with the emulated cuBLAS's detail when there is one.
fn blas_err(what: &'static str) -> impl Fn(blas_result::CublasError) -> HaloError {
    move |e| {
        let detail = emulation::take_last_cublas_error()
            .map(|d| format!(" [emulated cuBLAS: {d}]"))
            .unwrap_or_default();
        HaloError::Cuda(format!("{what}: {e}{detail}"))
    }
}
