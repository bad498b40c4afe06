//! The emulated cuBLAS (issue 12): `kernels/emulation/cublas_api.cpp` linked into
//! `$OUT_DIR/libhalo_cublas_emulated.so`, soname `libcublas.so`, so that cudarc's own
//! `dlopen("libcublas.so")` resolves to it once `src/emulation` has loaded it by absolute path
//! (`HALO_EMULATED_CUBLAS_LIB`, set here). Its GEMM lives in the emulated driver library
//! (`cublas_gemm.cpp`, built by `host_emulation.rs`), on the emulated device memory.

use std::path::{Path, PathBuf};

const LIB_NAME: &str = "libhalo_cublas_emulated.so";
const SONAME: &str = "libcublas.so";

pub fn build() {
    let kernels = Path::new("kernels");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .cargo_metadata(false)
        .file(kernels.join("emulation/cublas_api.cpp"))
        .flag("-std=c++17")
        .flag_if_supported("-Wall")
        .flag_if_supported("-Wextra")
        .opt_level(2);
    let objects = build.compile_intermediates();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let lib = out_dir.join(LIB_NAME);
    super::host_emulation::link_shared(&build, &objects, &lib, SONAME, &["-pthread", "-ldl"]);
    println!("cargo:rustc-env=HALO_EMULATED_CUBLAS_LIB={}", lib.display());
}
