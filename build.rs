//! Build script: compiles `kernels/*.cu` to PTX for the CUDA backend (when nvcc is found) and,
//! for tests, the same sources for the host under the CUDA emulation header.

#[path = "build/host_emulation.rs"]
mod host_emulation;
#[path = "build/ptx.rs"]
mod ptx;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    ptx::build();
    host_emulation::build();
}
