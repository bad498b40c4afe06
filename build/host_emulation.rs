//! Host compilation of the CUDA kernels under the emulation header (`kernels/emulation/cuda_host.h`):
//! the very same `kernels/*.cu` sources, included by `kernels/emulation/emulation_shims.cpp`, built by
//! the system C++ compiler into a static library that `src/emulation` calls through FFI. It takes a
//! few seconds, so it always runs; cargo reruns it only when a kernel, header or shim changes.

use std::path::Path;

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

    cc::Build::new()
        .cpp(true)
        .file(kernels.join("emulation/emulation_shims.cpp"))
        .include(kernels)
        .define("HALO_HOST_EMULATION", None)
        .flag("-std=c++17")
        .flag("-pthread")
        // The kernels reinterpret 16-byte vectors as their elements, as CUDA code does.
        .flag("-fno-strict-aliasing")
        // `#pragma unroll` is nvcc's; the host compiler unrolls on its own.
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wall")
        .flag_if_supported("-Wextra")
        // Emulated kernels are the test suite's hot loop: optimise even in debug builds. Never
        // -ffast-math: the kernels detect NaN/inf with `x - x`, which it would fold to 0.
        .opt_level(2)
        .compile("halo_kernels_host_emulation");
    println!("cargo:rustc-link-lib=pthread");
}
