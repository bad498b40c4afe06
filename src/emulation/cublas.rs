//! The emulated cuBLAS: a second library built with the emulated driver
//! (`kernels/emulation/cublas_api.cpp`, soname `libcublas.so`) exporting the cuBLAS entry points
//! [`crate::cuda::CudaGemm`] calls. Its GEMM runs inside the emulated driver library on the
//! emulated device memory, so a matrix that runs past its allocation is refused
//! (`CUBLAS_STATUS_EXECUTION_FAILED`, with the detail in [`take_last_cublas_error`]) as the driver
//! refuses an out-of-range copy. Loaded by absolute path before cudarc's first cuBLAS call, so
//! that cudarc's own `dlopen("libcublas.so")` resolves to it.

use std::ffi::{c_char, c_int, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

use libloading::os::unix::Library;

use super::is_loaded;
use crate::error::{HaloError, Result};

/// Environment variable naming a build of the emulated cuBLAS library (default: the one this
/// crate's build wrote with the `emulation` feature, [`BUILT_CUBLAS_LIB`]).
pub const CUBLAS_LIB_ENV: &str = "HALO_EMULATED_CUBLAS_LIB";

/// The emulated cuBLAS library built with this crate; `None` without the `emulation` feature.
pub const BUILT_CUBLAS_LIB: Option<&str> = option_env!("HALO_EMULATED_CUBLAS_LIB");

static CUBLAS: OnceLock<Library> = OnceLock::new();

/// The emulated cuBLAS library this process loads (or would load).
pub fn cublas_path() -> Option<PathBuf> {
    match std::env::var_os(CUBLAS_LIB_ENV) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => BUILT_CUBLAS_LIB.map(PathBuf::from),
    }
}

/// Loads the emulated cuBLAS (once per process). Only beside the emulated driver: a real
/// libcublas must never be shadowed for a real GPU.
pub(crate) fn load_cublas() -> Result<()> {
    if CUBLAS.get().is_some() {
        return Ok(());
    }
    if !is_loaded() {
        return Err(HaloError::CudaUnavailable(
            "the emulated cuBLAS needs the emulated CUDA device (CudaBackend::emulated)".into(),
        ));
    }
    let path = cublas_path().ok_or_else(|| {
        HaloError::CudaUnavailable(format!(
            "this build of halo-kernels has no emulated cuBLAS: enable its `emulation` feature \
             (or set {CUBLAS_LIB_ENV} to a built libhalo_cublas_emulated.so)"
        ))
    })?;
    // SAFETY: our own library; it has no initialisers beyond static tables.
    let lib =
        unsafe { Library::open(Some(&path), libloading::os::unix::RTLD_NOW) }.map_err(|e| {
            HaloError::CudaUnavailable(format!(
                "cannot load the emulated cuBLAS {}: {e}",
                path.display()
            ))
        })?;
    // SAFETY: a lookup only.
    if unsafe { lib.get::<unsafe extern "C" fn() -> c_int>(b"halo_emu_is_emulated_cublas") }
        .is_err()
    {
        return Err(HaloError::CudaUnavailable(format!(
            "{} is not the emulated cuBLAS of this crate",
            path.display()
        )));
    }
    let _ = CUBLAS.set(lib);
    Ok(())
}

/// The detail the emulated cuBLAS recorded for the last failing call of this thread (then
/// forgotten), e.g. "cublasGemmEx: leading dimension too small: …". `None` when the emulated
/// device is not loaded or nothing failed.
pub fn take_last_cublas_error() -> Option<String> {
    let lib = super::LIBRARY.get()?;
    // SAFETY: the signature of `halo_emu_cublas_take_last_error` in kernels/emulation/cublas_gemm.cpp.
    let take = unsafe {
        lib.get::<unsafe extern "C" fn(*mut c_char, usize) -> usize>(
            b"halo_emu_cublas_take_last_error",
        )
    }
    .ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` holds `len` bytes; the function writes a NUL-terminated string into it.
    let len = unsafe { take(buf.as_mut_ptr().cast(), buf.len()) };
    if len == 0 {
        return None;
    }
    let text = CStr::from_bytes_until_nul(&buf).ok()?;
    Some(text.to_string_lossy().into_owned())
}
