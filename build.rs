//! Build script: compiles `kernels/*.cu` to PTX for the CUDA backend (when nvcc is found) and, with
//! the `emulation` feature, the emulated CUDA device (the same sources for the host under the CUDA
//! emulation header, plus an emulated driver library) and the emulated cuBLAS in front of it.

#[path = "build/host_cublas.rs"]
mod host_cublas;
#[path = "build/host_emulation.rs"]
mod host_emulation;
#[path = "build/ptx.rs"]
mod ptx;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    ptx::build();
    // The emulated CUDA device only when asked for (the crate's own tests and CI turn it on).
    if std::env::var_os("CARGO_FEATURE_EMULATION").is_some() {
        host_emulation::build();
        host_cublas::build();
    }
}
