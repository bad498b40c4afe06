//! The emulated CUDA device: the CUDA kernels compiled for the host under the emulation header
//! (`kernels/emulation/cuda_host.h`) together with an emulated CUDA driver API
//! (`kernels/emulation/driver_api.cpp`), linked into one shared library,
//! `$OUT_DIR/libhalo_cuda_emulated.so`, whose soname is `libcuda.so`.
//!
//! `src/emulation` loads it by absolute path (`HALO_EMULATED_DRIVER_LIB`, set here for the crate)
//! before cudarc's first driver call; cudarc's own `dlopen("libcuda.so")` then resolves to it. It
//! takes a few seconds to build, so it always runs; cargo reruns it only when a kernel, header or
//! emulation source changes.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The library's file name and the soname cudarc's loader asks for.
const LIB_NAME: &str = "libhalo_cuda_emulated.so";
const SONAME: &str = "libcuda.so";

pub fn build() {
    let kernels = Path::new("kernels");
    let mut watched = Vec::new();
    for dir in [kernels.to_path_buf(), kernels.join("emulation")] {
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries.flatten() {
            let path = entry.path();
            let is_source = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("cu" | "cuh" | "h" | "cpp")
            );
            if is_source {
                watched.push(path);
            }
        }
    }
    watched.sort();
    for path in &watched {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-changed=kernels");

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .cargo_metadata(false)
        .file(kernels.join("emulation/kernel_registry.cpp"))
        .file(kernels.join("emulation/driver_api.cpp"))
        .file(kernels.join("emulation/device_memory.cpp"))
        // The emulated cuBLAS's GEMM (build/host_cublas.rs builds the library in front of it).
        .file(kernels.join("emulation/cublas_gemm.cpp"))
        .include(kernels)
        .define("HALO_HOST_EMULATION", None)
        .flag("-std=c++17")
        .flag("-pthread")
        // The kernels reinterpret 16-byte vectors as their elements, as CUDA code does.
        .flag("-fno-strict-aliasing")
        // Only the driver API and the halo_emu_* entry points are exported.
        .flag("-fvisibility-inlines-hidden")
        // `#pragma unroll` is nvcc's; the host compiler unrolls on its own.
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wall")
        .flag_if_supported("-Wextra")
        // Emulated kernels are the test suite's hot loop: optimise even in debug builds. Never
        // -ffast-math: the kernels detect NaN/inf with `x - x`, which it would fold to 0.
        .opt_level(2);
    let objects = build.compile_intermediates();

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let lib = out_dir.join(LIB_NAME);
    link_shared(&build, &objects, &lib, SONAME, &["-pthread"]);
    println!("cargo:rustc-env=HALO_EMULATED_DRIVER_LIB={}", lib.display());
}

/// Links `objects` into the shared library `out` with soname `soname`.
pub fn link_shared(
    build: &cc::Build,
    objects: &[PathBuf],
    out: &Path,
    soname: &str,
    libs: &[&str],
) {
    let compiler = build.get_compiler();
    let mut link: Command = compiler.to_command();
    link.arg("-shared")
        .arg("-o")
        .arg(out)
        .args(objects)
        .arg(format!("-Wl,-soname,{soname}"))
        .args(libs);
    let output = link
        .output()
        .unwrap_or_else(|e| panic!("could not run the C++ linker {link:?}: {e}"));
    if !output.status.success() {
        panic!(
            "linking {} failed ({}):\n$ {link:?}\n{}{}",
            out.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
