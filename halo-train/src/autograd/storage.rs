//! Where a tensor's values live: the [`Device`] a tape computes on, and [`Storage`], a buffer in
//! host memory or in CUDA device memory.
//!
//! The tape and the model never look inside a [`Storage`]: they pass it to the ops of
//! `device_ops`, which run the CPU kernel ([`cpu`](super::cpu)) or the CUDA
//! one (`halo_kernels::cuda::CudaBackend`) for the device that holds it — candle's design (one
//! storage enum, one match per op), which keeps every layer above the ops device-free.

use std::sync::Arc;

use super::pool::Buffer;
use halo_kernels::cuda::{CudaBackend, CudaSlice};
use halo_kernels::error::{HaloError, Result};

/// The device a [`Tape`](super::Tape) computes on.
#[derive(Clone, Debug, Default)]
pub enum Device {
    /// Host memory and the CPU kernels of [`cpu`](super::cpu) (rayon across rows).
    #[default]
    Cpu,
    /// A CUDA device (a GPU, or the emulated device of `halo_kernels`' `emulation` feature) and
    /// the crate's CUDA kernels; the matmuls through cuBLAS.
    Cuda(Arc<CudaBackend>),
}

impl Device {
    /// GPU 0 (`halo_kernels::cuda::CudaBackend::new`): an error, never a panic, without one.
    pub fn cuda() -> Result<Self> {
        Ok(Self::Cuda(Arc::new(CudaBackend::new()?)))
    }

    /// The emulated CUDA device (tests on machines without a GPU; needs `halo_kernels`'
    /// `emulation` feature).
    pub fn cuda_emulated() -> Result<Self> {
        Ok(Self::Cuda(Arc::new(CudaBackend::emulated()?)))
    }

    /// `"cpu"` or `"cuda"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda(_) => "cuda",
        }
    }

    /// Whether this is [`Device::Cpu`].
    pub fn is_cpu(&self) -> bool {
        matches!(self, Self::Cpu)
    }

    /// `len` zeros on this device.
    pub fn zeros(&self, len: usize) -> Result<Storage> {
        match self {
            Self::Cpu => Ok(Storage::Host(Buffer::zeroed(len))),
            Self::Cuda(gpu) => Ok(Storage::Cuda(gpu.alloc_zeros(len)?)),
        }
    }

    /// `len` elements with unspecified values, for an output an op writes in full.
    pub(crate) fn for_overwrite(&self, len: usize) -> Result<Storage> {
        match self {
            Self::Cpu => Ok(Storage::Host(Buffer::for_overwrite(len))),
            // Zeroed: a stream-ordered memset costs little beside the kernel that follows, and a
            // kernel that fails to write an element then leaves a 0, never stale memory.
            Self::Cuda(gpu) => Ok(Storage::Cuda(gpu.alloc_zeros(len)?)),
        }
    }

    /// A copy of host values on this device.
    pub fn upload(&self, host: &[f32]) -> Result<Storage> {
        match self {
            Self::Cpu => Ok(Storage::Host(Buffer::copied(host))),
            Self::Cuda(gpu) => Ok(Storage::Cuda(gpu.htod(host)?)),
        }
    }

    /// A copy of `src` (which must live on this device).
    pub(crate) fn copy(&self, src: StorageRef<'_>) -> Result<Storage> {
        match (self, src) {
            (Self::Cpu, StorageRef::Host(s)) => Ok(Storage::Host(Buffer::copied(s))),
            (Self::Cuda(gpu), StorageRef::Cuda(s)) => {
                let mut out = gpu.alloc_zeros::<f32>(s.len())?;
                gpu.copy_dtod(s, &mut out)?;
                Ok(Storage::Cuda(out))
            }
            _ => Err(self.mismatch(src, "copy")),
        }
    }

    /// The values of `src` in host memory (a device→host copy that waits, for a CUDA buffer).
    pub fn to_host(&self, src: StorageRef<'_>) -> Result<Vec<f32>> {
        match (self, src) {
            (_, StorageRef::Host(s)) => Ok(s.to_vec()),
            (Self::Cuda(gpu), StorageRef::Cuda(s)) => gpu.dtoh(s),
            (Self::Cpu, StorageRef::Cuda(_)) => Err(self.mismatch(src, "to_host")),
        }
    }

    /// The error for a buffer that lives elsewhere than this device.
    pub(crate) fn mismatch(&self, src: StorageRef<'_>, what: &str) -> HaloError {
        HaloError::Autograd(format!(
            "{what}: a {} tensor given to an op on the {} device (tensors of one tape live on \
             its device; move the model with `to_device`)",
            src.device_name(),
            self.name()
        ))
    }
}

/// A tensor's values: an owned buffer in host memory (from the [`pool`](super::pool)) or on a
/// CUDA device.
#[derive(Debug)]
pub enum Storage {
    /// Host memory.
    Host(Buffer),
    /// CUDA device memory (freed on the backend's stream when dropped).
    Cuda(CudaSlice<f32>),
}

impl Default for Storage {
    fn default() -> Self {
        Self::Host(Buffer::default())
    }
}

impl From<Buffer> for Storage {
    fn from(b: Buffer) -> Self {
        Self::Host(b)
    }
}

impl From<Vec<f32>> for Storage {
    fn from(v: Vec<f32>) -> Self {
        Self::Host(v.into())
    }
}

impl Storage {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.as_ref().len()
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A borrowed view.
    pub fn as_ref(&self) -> StorageRef<'_> {
        match self {
            Self::Host(b) => StorageRef::Host(b),
            Self::Cuda(s) => StorageRef::Cuda(s),
        }
    }

    /// The host values, if it lives on the host.
    pub fn host(&self) -> Option<&[f32]> {
        match self {
            Self::Host(b) => Some(b),
            Self::Cuda(_) => None,
        }
    }

    /// The host values, mutably; an error for a device buffer.
    pub(crate) fn host_mut(&mut self) -> Result<&mut [f32]> {
        match self {
            Self::Host(b) => Ok(b),
            Self::Cuda(_) => Err(HaloError::Autograd(
                "a CUDA buffer given to a CPU op".into(),
            )),
        }
    }

    /// The device buffer, mutably; an error for a host buffer.
    pub(crate) fn cuda_mut(&mut self) -> Result<&mut CudaSlice<f32>> {
        match self {
            Self::Cuda(s) => Ok(s),
            Self::Host(_) => Err(HaloError::Autograd(
                "a host buffer given to a CUDA op".into(),
            )),
        }
    }
}

/// A borrowed [`Storage`] (or a model parameter, which the tape borrows instead of copying).
#[derive(Clone, Copy, Debug)]
pub enum StorageRef<'a> {
    /// Host memory.
    Host(&'a [f32]),
    /// CUDA device memory.
    Cuda(&'a CudaSlice<f32>),
}

impl<'a> StorageRef<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::Host(s) => s.len(),
            Self::Cuda(s) => s.len(),
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The host values, if it lives on the host.
    pub fn host(&self) -> Option<&'a [f32]> {
        match self {
            Self::Host(s) => Some(s),
            Self::Cuda(_) => None,
        }
    }

    /// The host values; an error for a device buffer.
    pub(crate) fn host_or_err(&self) -> Result<&'a [f32]> {
        self.host()
            .ok_or_else(|| HaloError::Autograd("a CUDA buffer given to a CPU op".into()))
    }

    /// The device buffer; an error for a host buffer.
    pub(crate) fn cuda_or_err(&self) -> Result<&'a CudaSlice<f32>> {
        match self {
            Self::Cuda(s) => Ok(s),
            Self::Host(_) => Err(HaloError::Autograd(
                "a host buffer given to a CUDA op".into(),
            )),
        }
    }

    fn device_name(&self) -> &'static str {
        match self {
            Self::Host(_) => "host",
            Self::Cuda(_) => "CUDA",
        }
    }
}
