//! The PTX that `build/ptx.rs` compiled from `kernels/*.cu` (embedded in the binary), or the reason
//! it could not (no nvcc at build time).

/// One compiled kernel file.
#[derive(Debug, Clone, Copy)]
pub struct PtxModule {
    /// The file stem (`kernels/<name>.cu`).
    pub name: &'static str,
    /// The PTX text, JIT-compiled by the driver for the GPU it runs on.
    pub ptx: &'static str,
    /// The `extern "C"` kernels this module defines.
    pub entries: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/halo_ptx.rs"));

/// The module that defines kernel `entry`, if any.
pub fn module_of(entry: &str) -> Option<&'static PtxModule> {
    MODULES.iter().find(|m| m.entries.contains(&entry))
}
