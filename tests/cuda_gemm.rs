//! The cuBLAS GEMM wrapper ([`halo_kernels::cuda::CudaGemm`]) on the CUDA device the tests use
//! (the real GPU when present, else the emulated device and its emulated cuBLAS), against an f64
//! matmul written here: odd sizes, every transpose combination, padded leading dimensions, alpha
//! and beta, f32 / bf16 / f16 inputs with f32 or input-dtype output; and the wrapper's refusals.

mod device_support;

use device_support::cuda;
use half::{bf16, f16};
use halo_kernels::cuda::{CudaLogit, GemmShape};
use halo_kernels::{HaloError, LogitElement};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Row-major storage `[rows, cols]` with row stride `ld`, padding filled with NaN (never read).
fn stored<T: LogitElement>(rng: &mut ChaCha8Rng, rows: usize, cols: usize, ld: usize) -> Vec<T> {
    let mut v = vec![T::from_f32(f32::NAN); if rows == 0 { 0 } else { (rows - 1) * ld + cols }];
    for r in 0..rows {
        for c in 0..cols {
            v[r * ld + c] = T::from_f32(rng.gen_range(-1.0f32..1.0));
        }
    }
    v
}

/// `alpha · op(A) · op(B) + beta · C` in f64 over the stored values.
#[allow(clippy::too_many_arguments)]
fn reference<T: LogitElement, C: LogitElement>(
    s: &GemmShape,
    alpha: f32,
    a: &[T],
    b: &[T],
    beta: f32,
    c: &[C],
) -> Vec<f64> {
    let at = |i: usize, p: usize| {
        let idx = if s.a_transposed {
            p * s.lda + i
        } else {
            i * s.lda + p
        };
        a[idx].to_f32() as f64
    };
    let bt = |p: usize, j: usize| {
        let idx = if s.b_transposed {
            j * s.ldb + p
        } else {
            p * s.ldb + j
        };
        b[idx].to_f32() as f64
    };
    let mut out = vec![0.0; s.m * s.n];
    for i in 0..s.m {
        for j in 0..s.n {
            let dot: f64 = (0..s.k).map(|p| at(i, p) * bt(p, j)).sum();
            let old = if beta == 0.0 {
                0.0
            } else {
                c[i * s.ldc + j].to_f32() as f64
            };
            out[i * s.n + j] = alpha as f64 * dot + beta as f64 * old;
        }
    }
    out
}

fn check_case<T: CudaLogit, C: CudaLogit>(
    seed: u64,
    s: GemmShape,
    alpha: f32,
    beta: f32,
    tol: f64,
) {
    let gpu = cuda();
    let blas = gpu.gemm().expect("cuBLAS (emulated or real)");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (ar, ac) = if s.a_transposed {
        (s.k, s.m)
    } else {
        (s.m, s.k)
    };
    let (br, bc) = if s.b_transposed {
        (s.n, s.k)
    } else {
        (s.k, s.n)
    };
    let a: Vec<T> = stored(&mut rng, ar, ac, s.lda);
    let b: Vec<T> = stored(&mut rng, br, bc, s.ldb);
    // With beta = 0 the old C is NaN: cuBLAS must not read it.
    let c0: Vec<C> = if beta == 0.0 {
        vec![C::from_f32(f32::NAN); (s.m - 1) * s.ldc + s.n]
    } else {
        stored(&mut rng, s.m, s.n, s.ldc)
    };
    let want = reference(&s, alpha, &a, &b, beta, &c0);
    let (da, db) = (gpu.htod(&a).unwrap(), gpu.htod(&b).unwrap());
    let mut dc = gpu.htod(&c0).unwrap();
    blas.gemm(&s, alpha, &da, &db, beta, &mut dc).unwrap();
    let got = gpu.dtoh(&dc).unwrap();
    for i in 0..s.m {
        for j in 0..s.n {
            let (g, w) = (got[i * s.ldc + j].to_f32() as f64, want[i * s.n + j]);
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{s:?} alpha {alpha} beta {beta}: C[{i},{j}] = {g}, want {w}"
            );
        }
        // The padding of C is left alone.
        for j in s.n..s.ldc {
            if i + 1 < s.m {
                let (g, w) = (got[i * s.ldc + j].to_f32(), c0[i * s.ldc + j].to_f32());
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "padding of C written"
                );
            }
        }
    }
}

/// Odd sizes, all four transpose combinations, packed and padded leading dimensions.
fn shapes() -> Vec<GemmShape> {
    let mut out = Vec::new();
    for (m, n, k) in [(1, 1, 1), (7, 5, 3), (13, 33, 17), (2, 65, 40), (31, 1, 9)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let packed = GemmShape::packed(m, n, k, ta, tb);
            out.push(packed);
            out.push(GemmShape {
                lda: packed.lda + 3,
                ldb: packed.ldb + 1,
                ldc: packed.ldc + 2,
                ..packed
            });
        }
    }
    out
}

#[test]
fn f32_matches_an_f64_matmul() {
    for (i, s) in shapes().into_iter().enumerate() {
        check_case::<f32, f32>(i as u64, s, 1.0, 0.0, 1e-5);
        check_case::<f32, f32>(100 + i as u64, s, -0.75, 1.0, 1e-5);
        check_case::<f32, f32>(200 + i as u64, s, 2.0, 0.5, 1e-5);
    }
}

#[test]
fn bf16_and_f16_accumulate_in_f32() {
    for (i, s) in shapes().into_iter().enumerate() {
        // f32 output: only the f32 accumulation's rounding.
        check_case::<bf16, f32>(300 + i as u64, s, 1.0, 1.0, 1e-5);
        check_case::<f16, f32>(400 + i as u64, s, 0.5, 0.0, 1e-5);
        // Output in the inputs' dtype: one rounding to it at the end.
        check_case::<bf16, bf16>(500 + i as u64, s, 1.0, 0.0, 8e-3);
        check_case::<f16, f16>(600 + i as u64, s, 1.0, 1.0, 1e-3);
    }
}

#[test]
fn empty_and_k_zero_products() {
    let gpu = cuda();
    let blas = gpu.gemm().unwrap();
    // k = 0: C = beta · C.
    let a = gpu.htod(&[0.0f32]).unwrap();
    let mut c = gpu.htod(&[1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let s = GemmShape::packed(2, 2, 0, false, false);
    blas.gemm(&s, 1.0, &a, &a, 0.5, &mut c).unwrap();
    assert_eq!(gpu.dtoh(&c).unwrap(), vec![0.5, 1.0, 1.5, 2.0]);
    // m = 0: nothing to do, nothing read.
    let s = GemmShape::packed(0, 2, 3, false, false);
    let b = gpu.htod(&[1.0f32; 6]).unwrap();
    blas.gemm(&s, 1.0, &a, &b, 0.0, &mut c).unwrap();
}

#[test]
fn bad_shapes_are_refused() {
    let gpu = cuda();
    let blas = gpu.gemm().unwrap();
    let a = gpu.htod(&[1.0f32; 6]).unwrap();
    let b = gpu.htod(&[1.0f32; 9]).unwrap();
    let mut c = gpu.htod(&[0.0f32; 4]).unwrap();
    let err = |r: halo_kernels::Result<()>| r.expect_err("must be refused");
    // a is 2 × 4 = 8 elements but holds 6.
    let e = err(blas.gemm(
        &GemmShape::packed(2, 2, 4, false, false),
        1.0,
        &a,
        &b,
        0.0,
        &mut c,
    ));
    assert!(
        matches!(e, HaloError::InvalidShape(ref m) if m.contains("`a`")),
        "{e}"
    );
    // A leading dimension below the row length.
    let s = GemmShape {
        lda: 2,
        ..GemmShape::packed(2, 2, 3, false, false)
    };
    let e = err(blas.gemm(&s, 1.0, &a, &b, 0.0, &mut c));
    assert!(
        matches!(e, HaloError::InvalidShape(ref m) if m.contains("leading dimension")),
        "{e}"
    );
    // c too short for 2 × 3.
    let e = err(blas.gemm(
        &GemmShape::packed(2, 3, 3, false, false),
        1.0,
        &a,
        &b,
        0.0,
        &mut c,
    ));
    assert!(
        matches!(e, HaloError::InvalidShape(ref m) if m.contains("`c`")),
        "{e}"
    );
    // Non-finite scale.
    let s = GemmShape::packed(2, 2, 3, false, true);
    let e = err(blas.gemm(&s, f32::NAN, &a, &b, 0.0, &mut c));
    assert!(
        matches!(e, HaloError::InvalidHyperParameter { name: "alpha", .. }),
        "{e}"
    );
    // An output dtype that is neither f32 nor the inputs'.
    let ab = gpu.htod(&[bf16::ONE; 6]).unwrap();
    let mut ch = gpu.htod(&[f16::ZERO; 4]).unwrap();
    let e = err(blas.gemm(&s, 1.0, &ab, &ab, 0.0, &mut ch));
    assert!(
        matches!(e, HaloError::InvalidShape(ref m) if m.contains("output dtype")),
        "{e}"
    );
    // Dimensions beyond i32.
    let s = GemmShape {
        m: 1 << 31,
        ..GemmShape::packed(2, 2, 3, false, false)
    };
    let e = err(blas.gemm(&s, 1.0, &a, &b, 0.0, &mut c));
    assert!(
        matches!(e, HaloError::InvalidShape(ref m) if m.contains("i32")),
        "{e}"
    );
}

#[test]
fn two_runs_give_the_same_bits() {
    let gpu = cuda();
    let blas = gpu.gemm().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let s = GemmShape::packed(17, 29, 63, false, true);
    let a: Vec<f32> = stored(&mut rng, 17, 63, 63);
    let b: Vec<f32> = stored(&mut rng, 29, 63, 63);
    let (da, db) = (gpu.htod(&a).unwrap(), gpu.htod(&b).unwrap());
    let run = || {
        let mut c = gpu.alloc_zeros::<f32>(17 * 29).unwrap();
        blas.gemm(&s, 1.0, &da, &db, 0.0, &mut c).unwrap();
        gpu.dtoh(&c)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

/// The emulated cuBLAS itself (below the wrapper, which refuses these first): cuBLAS's status
/// codes for bad arguments, and a matrix running past its allocation caught by the emulated
/// device memory. Only on the emulated device: on a GPU the last case would be a real fault.
#[test]
fn emulated_cublas_refuses_like_cublas() {
    use cudarc::cublas::{result, sys, CudaBlas};
    use std::ffi::c_void;
    let gpu = cuda();
    if !gpu.is_emulated() {
        return;
    }
    gpu.gemm().unwrap(); // loads the emulated cuBLAS
    let blas = CudaBlas::new(gpu.stream().clone()).unwrap();
    let a = gpu.htod(&[1.0f32; 6]).unwrap();
    let mut c = gpu.htod(&[0.0f32; 4]).unwrap();
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (n, t) = (
        sys::cublasOperation_t::CUBLAS_OP_N,
        sys::cublasOperation_t::CUBLAS_OP_T,
    );
    let f32t = sys::cudaDataType::CUDA_R_32F;
    let call = |m: i32, k: i32, lda: i32, c_type, c_ptr: u64, a_ptr: u64| {
        // SAFETY: the emulated cuBLAS range-checks every matrix against the emulated device
        // memory before touching it (that is what this test checks).
        unsafe {
            result::gemm_ex(
                *blas.handle(),
                n,
                t,
                m,
                2,
                k,
                (&alpha as *const f32).cast::<c_void>(),
                a_ptr as *const c_void,
                f32t,
                lda,
                a_ptr as *const c_void,
                f32t,
                2,
                (&beta as *const f32).cast::<c_void>(),
                c_ptr as *mut c_void,
                c_type,
                2,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
    };
    use halo_kernels::cuda::{DevicePtr, DevicePtrMut};
    let (a_ptr, _ra) = a.device_ptr(gpu.stream());
    let (c_ptr, _wc) = c.device_ptr_mut(gpu.stream());
    // lda below m: CUBLAS_STATUS_INVALID_VALUE.
    let e = call(2, 3, 1, f32t, c_ptr, a_ptr).unwrap_err();
    assert_eq!(e.0, sys::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE);
    assert!(halo_kernels::emulation::take_last_cublas_error()
        .is_some_and(|d| d.contains("leading dimension")));
    // f32 inputs with a bf16 output: not a supported combination.
    let e = call(2, 3, 2, sys::cudaDataType::CUDA_R_16BF, c_ptr, a_ptr).unwrap_err();
    assert_eq!(e.0, sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED);
    let _ = halo_kernels::emulation::take_last_cublas_error();
    // k = 4: A is 2 x 4 (8 floats) but the allocation holds 6: caught, nothing read.
    let e = call(2, 4, 2, f32t, c_ptr, a_ptr).unwrap_err();
    assert_eq!(e.0, sys::cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED);
    let detail = halo_kernels::emulation::take_last_cublas_error().unwrap_or_default();
    assert!(detail.contains("matrix A"), "{detail}");
    // The same call within bounds succeeds.
    call(2, 3, 2, f32t, c_ptr, a_ptr).unwrap();
}
