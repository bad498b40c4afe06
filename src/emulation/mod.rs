//! The emulated CUDA device: a CUDA driver library built by this crate (`kernels/emulation/`,
//! `build/host_emulation.rs`) whose "device memory" is host memory and whose `cuLaunchKernel` runs
//! the host-compiled build of the very same `kernels/*.cu`. [`crate::cuda::CudaBackend`] runs on it
//! unchanged: every op has one host wrapper, in `src/cuda`, whichever device it runs on.
//!
//! It is opt-in, never a shadow: it is used only after [`crate::cuda::CudaBackend::emulated`] (or
//! `CudaBackend::new()` with `HALO_CUDA_EMULATED=1`). Loading it by absolute path before cudarc's
//! first driver call makes cudarc's own `dlopen("libcuda.so")` resolve to it (its soname); from then
//! on this process has no access to a real GPU, and asking for one is an error (and the other way
//! round: once the real driver is in use, the emulated one is refused).
//!
//! What it checks, as compute-sanitizer's memcheck would: a kernel access past the end of an
//! allocation (a guard page after each one), a write into the red zone around it (canaries checked
//! after every launch), a misaligned 16-byte vector access; each fails the launch with
//! `CUDA_ERROR_ILLEGAL_ADDRESS` / `CUDA_ERROR_MISALIGNED_ADDRESS` and a message naming the kernel and
//! the address, through the wrapper's normal error path. Fresh allocations are filled with `0xff`
//! bytes (NaN in every float dtype), so an output left unwritten shows. Copies outside an
//! allocation fail with `CUDA_ERROR_INVALID_VALUE`.
//!
//! What it is not: no timing (events record the host clock), no concurrency (every call finishes
//! before it returns; launches are serialized process-wide), 1-D launches only, and slow — a CUDA
//! thread is a fiber. Errors are not sticky, unlike a real context after an illegal address.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use libloading::os::unix::Library;

use crate::error::{HaloError, Result};

mod cublas;
pub(crate) use cublas::load_cublas;
pub use cublas::{cublas_path, take_last_cublas_error, BUILT_CUBLAS_LIB, CUBLAS_LIB_ENV};

/// Environment variable naming a build of the emulated driver library (default: the one this
/// crate's build wrote with the `emulation` feature, [`BUILT_DRIVER_LIB`]).
pub const DRIVER_LIB_ENV: &str = "HALO_EMULATED_DRIVER_LIB";

/// Environment variable that makes [`crate::cuda::CudaBackend::new`] use the emulated device
/// (`1`, `true` or `yes`).
pub const USE_EMULATED_ENV: &str = "HALO_CUDA_EMULATED";

/// The emulated driver library built with this crate (an absolute path in `target/`); `None`
/// without the `emulation` feature.
pub const BUILT_DRIVER_LIB: Option<&str> = option_env!("HALO_EMULATED_DRIVER_LIB");

/// Which CUDA driver this process uses; fixed by the first backend created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Driver {
    Real,
    Emulated,
}

static CHOSEN: Mutex<Option<Driver>> = Mutex::new(None);
static LIBRARY: OnceLock<Library> = OnceLock::new();

/// `true` when `HALO_CUDA_EMULATED` asks for the emulated device.
pub fn requested_by_env() -> bool {
    std::env::var(USE_EMULATED_ENV)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

/// The emulated driver library this process loads (or would load): `HALO_EMULATED_DRIVER_LIB`,
/// else the one built with the `emulation` feature; `None` when there is neither.
pub fn driver_path() -> Option<PathBuf> {
    match std::env::var_os(DRIVER_LIB_ENV) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => BUILT_DRIVER_LIB.map(PathBuf::from),
    }
}

/// The library to load, or why there is none.
fn driver_path_or_error() -> Result<PathBuf> {
    driver_path().ok_or_else(|| {
        HaloError::CudaUnavailable(format!(
            "this build of halo-kernels has no emulated CUDA device: enable its `emulation` \
             feature (or set {DRIVER_LIB_ENV} to a built libhalo_cuda_emulated.so)"
        ))
    })
}

/// `true` once this process has loaded the emulated driver.
pub fn is_loaded() -> bool {
    LIBRARY.get().is_some()
}

/// Records that the real driver is in use (called by the backend before its first driver call);
/// an error when the emulated one was loaded first.
pub(crate) fn choose_real() -> Result<()> {
    let mut chosen = CHOSEN.lock().unwrap_or_else(|e| e.into_inner());
    match *chosen {
        Some(Driver::Emulated) => Err(HaloError::CudaUnavailable(format!(
            "this process loaded the emulated CUDA device, so the real driver cannot be used \
             beside it; run the GPU work in another process, without {USE_EMULATED_ENV}"
        ))),
        _ => {
            *chosen = Some(Driver::Real);
            Ok(())
        }
    }
}

/// Loads the emulated driver (once per process) so that cudarc's `dlopen("libcuda.so")` finds it.
pub(crate) fn choose_emulated() -> Result<()> {
    let mut chosen = CHOSEN.lock().unwrap_or_else(|e| e.into_inner());
    if *chosen == Some(Driver::Real) {
        return Err(HaloError::CudaUnavailable(
            "the real CUDA driver is already in use in this process, so the emulated device \
             cannot be loaded beside it; use it from another process"
                .into(),
        ));
    }
    if LIBRARY.get().is_none() {
        let path = driver_path_or_error()?;
        refuse_if_real_driver_loaded()?;
        // SAFETY: our own library; its initialisers only set up static tables.
        let lib =
            unsafe { Library::open(Some(&path), libloading::os::unix::RTLD_NOW) }.map_err(|e| {
                HaloError::CudaUnavailable(format!(
                    "cannot load the emulated CUDA driver {}: {e} (rebuild the crate, or set \
                     {DRIVER_LIB_ENV})",
                    path.display()
                ))
            })?;
        // SAFETY: looks a symbol up; it is not called.
        if unsafe { lib.get::<unsafe extern "C" fn() -> c_int>(b"halo_emu_is_emulated_driver") }
            .is_err()
        {
            return Err(HaloError::CudaUnavailable(format!(
                "{} is not the emulated CUDA driver of this crate",
                path.display()
            )));
        }
        let _ = LIBRARY.set(lib);
    }
    *chosen = Some(Driver::Emulated);
    Ok(())
}

/// A real `libcuda` already mapped into this process would keep cudarc's lookups from reaching
/// the emulated one: refuse rather than run on an unexpected device.
fn refuse_if_real_driver_loaded() -> Result<()> {
    for name in ["libcuda.so", "libcuda.so.1"] {
        let flags = libloading::os::unix::RTLD_LAZY | libc::RTLD_NOLOAD;
        // SAFETY: RTLD_NOLOAD never loads anything; it only returns an already loaded library.
        if let Ok(lib) = unsafe { Library::open(Some(name), flags) } {
            // SAFETY: a lookup only.
            let ours = unsafe {
                lib.get::<unsafe extern "C" fn() -> c_int>(b"halo_emu_is_emulated_driver")
            }
            .is_ok();
            if !ours {
                return Err(HaloError::CudaUnavailable(format!(
                    "a real CUDA driver ({name}) is already loaded in this process, so the \
                     emulated device cannot be used beside it"
                )));
            }
        }
    }
    Ok(())
}

fn library() -> Result<&'static Library> {
    LIBRARY.get().ok_or_else(|| {
        HaloError::CudaUnavailable(
            "the emulated CUDA device is not loaded (CudaBackend::emulated loads it)".into(),
        )
    })
}

/// The detail the emulated driver recorded for the last failing call of this thread (then
/// forgotten), e.g. "CUDA_ERROR_ILLEGAL_ADDRESS: kernel `…`: out-of-bounds access at …".
/// `None` when the emulated device is not loaded or nothing failed. The crate's wrappers append it
/// to their errors already; this is for code that calls cudarc directly.
pub fn take_last_error() -> Option<String> {
    let lib = LIBRARY.get()?;
    // SAFETY: the signature of `halo_emu_take_last_error` in kernels/emulation/driver_api.cpp.
    let take = unsafe {
        lib.get::<unsafe extern "C" fn(*mut c_char, usize) -> usize>(b"halo_emu_take_last_error")
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

/// What the calling thread asked of the emulated device (see [`call_counts`]). The emulated device
/// runs every call on the calling thread, so the counts of a step run on one thread are that step's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// Calls after which the host holds the device's results: stream, context and event
    /// synchronizes and synchronous device-to-host copies. On a GPU each is a host round trip.
    pub host_waits: u64,
    /// Device-to-host copies, queued or synchronous.
    pub device_to_host_copies: u64,
    /// Host-to-device copies.
    pub host_to_device_copies: u64,
    /// Kernel launches.
    pub kernel_launches: u64,
    /// Device allocations.
    pub allocations: u64,
}

/// This thread's [`CallCounts`] since its first emulated call or the last `reset`; with `reset`
/// they are zeroed after reading. Errors when the emulated device is not loaded.
pub fn call_counts(reset: bool) -> Result<CallCounts> {
    let lib = library()?;
    // SAFETY: the signature of `halo_emu_call_counts` in kernels/emulation/driver_api.cpp.
    let counts = unsafe { lib.get::<unsafe extern "C" fn(*mut u64, i32)>(b"halo_emu_call_counts") }
        .map_err(|e| HaloError::CudaUnavailable(format!("emulated driver: {e}")))?;
    let mut raw = [0u64; 5];
    // SAFETY: `raw` holds the five u64s the function writes.
    unsafe { counts(raw.as_mut_ptr(), i32::from(reset)) };
    Ok(CallCounts {
        host_waits: raw[0],
        device_to_host_copies: raw[1],
        host_to_device_copies: raw[2],
        kernel_launches: raw[3],
        allocations: raw[4],
    })
}

/// Every kernel the emulated device has, by name (what a module may define).
pub(crate) fn kernel_names() -> Result<Vec<String>> {
    let lib = library()?;
    // SAFETY: the signature of `halo_emu_kernel_names` in kernels/emulation/kernel_registry.cpp.
    let names = unsafe {
        lib.get::<unsafe extern "C" fn(*mut c_char, usize) -> usize>(b"halo_emu_kernel_names")
    }
    .map_err(|e| HaloError::CudaUnavailable(format!("emulated driver: {e}")))?;
    // SAFETY: a null buffer only asks for the length.
    let len = unsafe { names(std::ptr::null_mut(), 0) };
    let mut buf = vec![0u8; len + 1];
    // SAFETY: `buf` holds `len + 1` bytes.
    unsafe { names(buf.as_mut_ptr().cast(), buf.len()) };
    let text = String::from_utf8_lossy(&buf[..len]).into_owned();
    Ok(text.lines().map(str::to_string).collect())
}

/// Looks up one of the library's own (non-CUDA) entry points, loading the library if needed.
fn symbol<T: Copy>(name: &str) -> Result<T> {
    choose_emulated()?;
    let lib = library()?;
    // SAFETY: callers name a symbol of kernels/emulation/*.cpp with its exact signature.
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| HaloError::CudaUnavailable(format!("emulated driver: {e}")))
}

/// The C compiler's view of the kernel ABI: `"sizeof HaloTokenParams"`, `"HaloTokenParams.vocab"`
/// (field offset) or a constant such as `"HALO_STATUS_OK"`. `None` for an unknown name. Loads the
/// emulated device.
pub fn abi_query(name: &str) -> Result<Option<i64>> {
    let query: unsafe extern "C" fn(*const c_char) -> i64 = symbol("halo_emu_abi_query")?;
    let Ok(c_name) = CString::new(name) else {
        return Ok(None);
    };
    // SAFETY: a NUL-terminated string that outlives the call.
    let value = unsafe { query(c_name.as_ptr()) };
    Ok((value >= 0).then_some(value))
}

/// `halo_token_rows_per_block(vocab)` as compiled from `kernels/halo_abi.h`.
pub fn c_token_rows_per_block(vocab: usize) -> Result<i32> {
    let f: unsafe extern "C" fn(i64) -> i32 = symbol("halo_emu_token_rows_per_block")?;
    // SAFETY: pure function of its argument.
    Ok(unsafe { f(vocab as i64) })
}

/// Self-tests of the emulation runtime itself (conversions and warp primitives), for
/// `tests/emulated_runtime.rs`. Each loads the emulated device.
pub mod runtime_selftest {
    use super::symbol;
    use crate::error::Result;

    /// `__float2bfloat16_rn` as emulated, as raw bits.
    pub fn float_to_bf16_bits(x: f32) -> Result<u16> {
        let f: unsafe extern "C" fn(f32) -> u16 = symbol("halo_emu_float2bfloat16_rn")?;
        // SAFETY: pure function.
        Ok(unsafe { f(x) })
    }
    /// `__bfloat162float` as emulated.
    pub fn bf16_bits_to_float(x: u16) -> Result<f32> {
        let f: unsafe extern "C" fn(u16) -> f32 = symbol("halo_emu_bfloat162float")?;
        // SAFETY: pure function.
        Ok(unsafe { f(x) })
    }
    /// `__float2half_rn` as emulated, as raw bits.
    pub fn float_to_f16_bits(x: f32) -> Result<u16> {
        let f: unsafe extern "C" fn(f32) -> u16 = symbol("halo_emu_float2half_rn")?;
        // SAFETY: pure function.
        Ok(unsafe { f(x) })
    }
    /// `__half2float` as emulated.
    pub fn f16_bits_to_float(x: u16) -> Result<f32> {
        let f: unsafe extern "C" fn(u16) -> f32 = symbol("halo_emu_half2float")?;
        // SAFETY: pure function.
        Ok(unsafe { f(x) })
    }
    /// Runs the warp-primitive self-test kernel: 8 ints per thread (see kernel_registry.cpp).
    pub fn warp_primitives(grid: u32, block: u32) -> Result<Vec<i32>> {
        let f: unsafe extern "C" fn(u32, u32, *mut i32) = symbol("halo_emu_warp_selftest")?;
        let mut out = vec![i32::MIN; 8 * (grid * block) as usize];
        // SAFETY: `out` holds 8 ints per launched thread.
        unsafe { f(grid, block, out.as_mut_ptr()) };
        Ok(out)
    }
}
