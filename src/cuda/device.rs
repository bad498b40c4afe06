//! [`CudaBackend`]: one GPU, its stream and the kernels loaded into it.
//!
//! Creating a backend never panics: it first checks that the kernels were compiled (nvcc at build
//! time) and that the driver library can be loaded (cudarc's `CudaContext::new` panics when
//! libcuda is missing), then maps every driver failure to [`HaloError::CudaUnavailable`] (no
//! usable GPU) or [`HaloError::Cuda`] (a call that failed on a working GPU).
//!
//! [`CudaBackend::emulated`] is the same backend on the emulated CUDA device ([`crate::emulation`]):
//! the same wrappers, launches and error paths, with host memory as device memory.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    result as cu, sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, DriverError, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::ptx;
use crate::emulation;
use crate::error::{HaloError, Result};

/// What to do when the kernels were not compiled into this build.
pub const HOW_TO_COMPILE_KERNELS: &str =
    "run scripts/install_nvcc.sh (or set HALO_NVCC to an nvcc) and rebuild";

/// A CUDA device with the halo kernels loaded and a stream to launch them on.
///
/// Every op is a method (`backend.token_logprobs(..)`) mirroring the CPU function of the same name
/// in [`crate::cpu`], taking device buffers ([`CudaSlice`], [`cudarc::driver::CudaView`], ...)
/// instead of host slices. Buffers may come from any stream of the same context: cudarc's event
/// tracking orders the launches (when the context uses several streams).
///
/// # Which stream
/// [`CudaBackend::new`] launches on the context's default (legacy) stream. A non-blocking stream
/// (`CU_STREAM_NON_BLOCKING`) is one call away — `CudaBackend::with_stream(ctx.new_stream()?)` —
/// but is not the default: in cudarc 0.19 any stream other than the default one puts the context
/// in multi-stream mode, which turns on its per-buffer event tracking (two events per allocation,
/// a record and a wait per buffer use), and turning that tracking off is not sound here, since the
/// backend hands out its context ([`CudaBackend::context`]) and its output buffers to code that may
/// use other streams. On the legacy stream, alone in its context, no event is recorded at all.
#[derive(Debug)]
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
    emulated: bool,
    /// The cuBLAS handle of [`CudaBackend::gemm`], created on first use (src/cuda/gemm.rs).
    pub(crate) blas: OnceLock<super::CudaGemm>,
    /// Streaming multiprocessors of the device (read once: it sizes the split-row launches).
    multiprocessors: usize,
}

impl CudaBackend {
    /// The backend on GPU 0, launching on its default stream; on the emulated device instead when
    /// the environment variable `HALO_CUDA_EMULATED` is `1` ([`CudaBackend::emulated`]).
    pub fn new() -> Result<Self> {
        Self::with_ordinal(0)
    }

    /// The backend on GPU `ordinal`, launching on its default stream (on the emulated device, which
    /// has one device, when `HALO_CUDA_EMULATED=1`).
    pub fn with_ordinal(ordinal: usize) -> Result<Self> {
        if emulation::requested_by_env() {
            emulation::choose_emulated()?;
            return Self::open(ordinal);
        }
        if emulation::is_loaded() {
            return Err(HaloError::CudaUnavailable(format!(
                "this process loaded the emulated CUDA device, so the real driver cannot be used \
                 beside it (set {} to use the emulated device through CudaBackend::new)",
                emulation::USE_EMULATED_ENV
            )));
        }
        check_available()?;
        emulation::choose_real()?;
        Self::open(ordinal)
    }

    /// The backend on the emulated CUDA device ([`crate::emulation`]): the host-compiled kernels
    /// behind the very same wrappers, for machines without a GPU (tests, CI). Refused once this
    /// process uses a real GPU; afterwards the real driver is refused in this process.
    pub fn emulated() -> Result<Self> {
        emulation::choose_emulated()?;
        Self::open(0)
    }

    /// `true` when this backend runs on the emulated device.
    pub fn is_emulated(&self) -> bool {
        self.emulated
    }

    /// A context and the kernels on device `ordinal` of the driver this process chose.
    fn open(ordinal: usize) -> Result<Self> {
        let count = CudaContext::device_count()
            .map_err(|e| HaloError::CudaUnavailable(format!("no usable CUDA device: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(HaloError::CudaUnavailable(format!(
                "CUDA device {ordinal} requested but {count} device(s) are visible"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            HaloError::CudaUnavailable(format!("cannot create a context on device {ordinal}: {e}"))
        })?;
        let stream = ctx.default_stream();
        Self::with_stream(stream)
    }

    /// A backend launching on `stream` (a stream the caller created, e.g. to overlap with its own
    /// work). Loads the kernels into the stream's context.
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let emulated = emulation::is_loaded();
        if !emulated {
            check_available()?;
        }
        let ctx = stream.context().clone();
        check_compute_capability(&ctx)?;
        let multiprocessors = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("multiprocessor count"))?
            .max(1) as usize;
        let functions = load_kernels(&ctx, emulated)?;
        Ok(CudaBackend {
            ctx,
            stream,
            functions,
            emulated,
            blas: OnceLock::new(),
            multiprocessors,
        })
    }

    /// The CUDA context the kernels are loaded in (to allocate, create streams or events).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op of this backend launches on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's streaming multiprocessors (132 on an H200 and on the emulated device): what
    /// [`super::RowSplit::Auto`] fills.
    pub fn multiprocessor_count(&self) -> usize {
        self.multiprocessors
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> Result<String> {
        self.ctx.name().map_err(cuda_err("device name"))
    }

    /// `(major, minor)` compute capability.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.ctx
            .compute_capability()
            .map_err(cuda_err("compute capability"))
    }

    /// Copies a host slice to a new device buffer.
    pub fn htod<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.empty();
        }
        self.stream
            .clone_htod(host)
            .map_err(cuda_err("copy host to device"))
    }

    /// Copies a device buffer (or view) to a new host vector; waits for the copy.
    pub fn dtoh<T: DeviceRepr>(&self, device: &impl DevicePtr<T>) -> Result<Vec<T>> {
        if device.len() == 0 {
            return Ok(Vec::new());
        }
        let host = self
            .stream
            .clone_dtoh(device)
            .map_err(cuda_err("copy device to host"))?;
        self.synchronize()?;
        Ok(host)
    }

    /// Overwrites `device` with `host` (same length).
    pub fn copy_htod<T: DeviceRepr>(
        &self,
        host: &[T],
        device: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        if device.len() != host.len() {
            return Err(HaloError::LengthMismatch {
                what: "device buffer",
                expected: host.len(),
                got: device.len(),
            });
        }
        if host.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(host, device)
            .map_err(cuda_err("copy host to device"))
    }

    /// Overwrites `dst` with `src` (same length), device to device, queued on the stream.
    pub fn copy_dtod<T: DeviceRepr>(
        &self,
        src: &impl DevicePtr<T>,
        dst: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        if dst.len() != src.len() {
            return Err(HaloError::LengthMismatch {
                what: "device copy destination",
                expected: src.len(),
                got: dst.len(),
            });
        }
        if src.len() == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(src, dst)
            .map_err(cuda_err("copy device to device"))
    }

    /// A new zero-filled device buffer of `len` elements.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        if len == 0 {
            return self.empty();
        }
        self.stream.alloc_zeros(len).map_err(cuda_err("alloc"))
    }

    /// A new device buffer of `len` elements whose contents are unspecified: only for outputs a
    /// kernel writes completely (every op here writes every element of its outputs).
    pub(crate) fn alloc_output<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        if len == 0 {
            return self.empty();
        }
        // SAFETY: the caller launches a kernel that writes all `len` elements before anything
        // reads them (outputs are poisoned with NaN in the tests to check this).
        unsafe { self.stream.alloc(len) }.map_err(cuda_err("alloc"))
    }

    /// An empty buffer. A 0-byte allocation is an error for `cuMemAlloc` (and unspecified for
    /// `cuMemAllocAsync`, which cudarc's `null()` uses): back it with a real 1-element allocation
    /// instead, which the returned slice owns and frees on drop.
    fn empty<T: DeviceRepr>(&self) -> Result<CudaSlice<T>> {
        // SAFETY: never read (length 0).
        let one = unsafe { self.stream.alloc::<T>(1) }.map_err(cuda_err("alloc (empty)"))?;
        let ptr = one.leak();
        // SAFETY: `ptr` is a live allocation of one `T` that nothing else owns; a length of 0
        // claims less than it holds.
        Ok(unsafe { self.stream.upgrade_device_ptr(ptr, 0) })
    }

    /// Waits until everything queued on the stream has finished; surfaces asynchronous errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cuda_err("stream synchronize"))
    }

    /// Reads one element of a device buffer (used to report the offending label of an error).
    pub(crate) fn read_element<T: DeviceRepr + Default + Copy>(
        &self,
        device: &impl DevicePtr<T>,
        index: usize,
    ) -> Result<T> {
        if index >= device.len() {
            return Err(HaloError::InvalidShape(format!(
                "read_element: index {index} outside a buffer of {} elements",
                device.len()
            )));
        }
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("bind context"))?;
        let mut out = [T::default()];
        {
            let (ptr, _read) = device.device_ptr(&self.stream);
            let offset = (index * std::mem::size_of::<T>()) as sys::CUdeviceptr;
            // SAFETY: `index < len`, so the byte range read is inside the buffer; the copy is
            // ordered on our stream, which the guard makes wait for earlier writes.
            unsafe { cu::memcpy_dtoh_async(&mut out, ptr + offset, self.stream.cu_stream()) }
                .map_err(cuda_err("read element"))?;
        }
        self.synchronize()?;
        Ok(out[0])
    }

    /// The loaded kernel `name`.
    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| {
            HaloError::CudaUnavailable(format!(
                "kernel `{name}` is not in the compiled PTX (modules: {:?}); rebuild with the current kernels/",
                ptx::MODULES.iter().map(|m| m.name).collect::<Vec<_>>()
            ))
        })
    }
}

/// `Ok` when this build has kernels and this machine has a CUDA driver library; otherwise every
/// reason it cannot run, as [`HaloError::CudaUnavailable`]. Creates no context.
pub fn check_available() -> Result<()> {
    let mut problems = Vec::new();
    if !ptx::KERNELS_COMPILED {
        problems.push(format!(
            "kernels were not compiled ({}): {HOW_TO_COMPILE_KERNELS}",
            ptx::NOT_COMPILED_REASON
        ));
    }
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made.
    if !unsafe { sys::is_culib_present() } {
        problems.push(
            "no CUDA driver: libcuda could not be loaded (no NVIDIA driver on this machine)".into(),
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(HaloError::CudaUnavailable(problems.join("; ")))
    }
}

/// The PTX targets `compute_XY`; the driver cannot JIT it for an older GPU.
fn check_compute_capability(ctx: &Arc<CudaContext>) -> Result<()> {
    let (major, minor) = ctx.compute_capability().map_err(|e| {
        HaloError::CudaUnavailable(format!("cannot query the compute capability: {e}"))
    })?;
    let digits: String = ptx::CUDA_ARCH
        .trim_start_matches("compute_")
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let needed: i32 = digits.parse().unwrap_or(0);
    if major * 10 + minor < needed {
        return Err(HaloError::CudaUnavailable(format!(
            "the GPU has compute capability {major}.{minor} but the kernels were compiled for {} \
             (set HALO_CUDA_ARCH and rebuild)",
            ptx::CUDA_ARCH
        )));
    }
    Ok(())
}

/// Loads every compiled module (the driver JIT-compiles the PTX) and looks up its entry points.
///
/// On the emulated device the PTX is checked against the host build (every entry must exist there,
/// with parameters of the same sizes). A build without nvcc has no PTX: the emulated device then
/// loads one module naming every kernel it has, so the kernels still run there.
fn load_kernels(ctx: &Arc<CudaContext>, emulated: bool) -> Result<HashMap<String, CudaFunction>> {
    let mut modules: Vec<(String, String, Vec<String>)> = ptx::MODULES
        .iter()
        .map(|m| {
            let entries = m.entries.iter().map(|e| e.to_string()).collect();
            (m.name.to_string(), m.ptx.to_string(), entries)
        })
        .collect();
    if emulated && !ptx::KERNELS_COMPILED {
        let names = emulation::kernel_names()?;
        let text: String = names
            .iter()
            .map(|n| format!(".visible .entry {n}()\n{{\n}}\n"))
            .collect();
        modules.push(("emulated".into(), text, names));
    }
    let mut functions = HashMap::new();
    for (name, text, entries) in modules {
        let loaded = ctx
            .load_module(Ptx::from_src(text))
            .map_err(|e| load_error(&name, e))?;
        for entry in entries {
            let function = loaded.load_function(&entry).map_err(|e| {
                HaloError::Cuda(format!(
                    "kernel `{entry}` of module `{name}`: {}",
                    driver_error_text(&e)
                ))
            })?;
            functions.insert(entry, function);
        }
    }
    Ok(functions)
}

fn load_error(module: &str, e: DriverError) -> HaloError {
    let mut driver_version = 0i32;
    // SAFETY: writes one int; the driver library is loaded (checked before).
    let _ = unsafe { sys::cuDriverGetVersion(&mut driver_version) };
    let hint = if e.0 == sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
        " — the driver is older than the nvcc that built the PTX: build with an nvcc no newer \
         than the driver's CUDA version (scripts/install_nvcc.sh pins 13.0)"
    } else {
        ""
    };
    let e = driver_error_text(&e);
    HaloError::CudaUnavailable(format!(
        "loading PTX module `{module}` (built by {} for {}) failed on driver {}.{}: {e}{hint}",
        ptx::NVCC_VERSION,
        ptx::CUDA_ARCH,
        driver_version / 1000,
        (driver_version % 1000) / 10
    ))
}

/// Maps a driver error to [`HaloError::Cuda`] naming the call that failed.
pub(crate) fn cuda_err(what: &'static str) -> impl Fn(DriverError) -> HaloError {
    move |e| HaloError::Cuda(format!("{what}: {}", driver_error_text(&e)))
}

/// The driver's error, and on the emulated device what it recorded about it (which kernel, which
/// address) when that record is about this error.
pub(crate) fn driver_error_text(e: &DriverError) -> String {
    let mut text = e.to_string();
    if let Some(detail) = emulation::take_last_error() {
        let same_error = e
            .error_name()
            .map(|name| detail.starts_with(&*name.to_string_lossy()))
            .unwrap_or(false);
        if same_error {
            text.push_str(&format!(" [emulated device: {detail}]"));
        }
    }
    text
}
