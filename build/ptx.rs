//! nvcc → PTX for the CUDA backend.
//!
//! Compiles every `kernels/*.cu` to PTX in `$OUT_DIR/ptx/` and writes `$OUT_DIR/halo_ptx.rs`, which
//! `src/cuda/ptx.rs` includes: the PTX text of each module (embedded with `include_str!`, as
//! candle-kernels does), the `extern "C"` entry points each module defines, and whether the kernels
//! were compiled at all.
//!
//! nvcc is looked up in this order:
//! 1. `HALO_NVCC` — a path to nvcc, or `none` / `off` / `0` / empty to build without kernels
//!    (a path that does not exist also means "no kernels", with a warning);
//! 2. `$CUDA_HOME/bin/nvcc`, then `$CUDA_PATH/bin/nvcc`;
//! 3. `nvcc` on `PATH`;
//! 4. the project-local install of `scripts/install_nvcc.sh`: `.tools/nvcc/nvidia/cu13/bin/nvcc`.
//!
//! Without nvcc the crate still builds: the generated file records why, and the CUDA backend
//! returns `HaloError::CudaUnavailable` with that reason. With nvcc, a kernel that fails to compile
//! fails the build (never silently skipped).
//!
//! `HALO_CUDA_ARCH` picks the virtual architecture (`80`, `sm_80` or `compute_80`; default
//! `compute_80`, i.e. Ampere and newer: the driver JIT-compiles the PTX for the GPU it runs on).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `scripts/install_nvcc.sh` puts nvcc, relative to the crate root.
const LOCAL_NVCC: &str = ".tools/nvcc/nvidia/cu13/bin/nvcc";
const DEFAULT_ARCH: &str = "compute_80";
const HOW_TO_GET_NVCC: &str = "run scripts/install_nvcc.sh (or set HALO_NVCC)";

pub fn build() {
    for var in ["HALO_NVCC", "CUDA_HOME", "CUDA_PATH", "HALO_CUDA_ARCH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let kernel_dir = manifest_dir.join("kernels");

    let sources = kernel_sources(&kernel_dir);
    watch_kernel_dir(&kernel_dir);

    let generated = match find_nvcc(&manifest_dir) {
        Err(reason) => {
            println!("cargo:warning=halo-kernels: CUDA kernels not compiled: {reason}; {HOW_TO_GET_NVCC}");
            not_compiled(&reason)
        }
        Ok(nvcc) => {
            let arch = virtual_arch();
            let version = nvcc_version(&nvcc);
            let modules = compile_all(&nvcc, &arch, &kernel_dir, &sources, &out_dir);
            compiled(&nvcc, &version, &arch, &modules)
        }
    };
    fs::write(out_dir.join("halo_ptx.rs"), generated).expect("write halo_ptx.rs");
}

/// Every `kernels/*.cu`, sorted (the generated table is stable from build to build).
fn kernel_sources(kernel_dir: &Path) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = match fs::read_dir(kernel_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect(),
        Err(_) => Vec::new(),
    };
    sources.sort();
    sources
}

/// Reruns the build when any kernel, header or the folder itself (a new file) changes.
fn watch_kernel_dir(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    println!("cargo:rerun-if-changed={}", dir.display());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if path.is_dir() {
            watch_kernel_dir(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

/// The nvcc to use, or why there is none.
fn find_nvcc(manifest_dir: &Path) -> Result<PathBuf, String> {
    if let Ok(value) = env::var("HALO_NVCC") {
        let value = value.trim();
        if value.is_empty()
            || ["none", "off", "0", "false"].contains(&value.to_lowercase().as_str())
        {
            return Err(format!("disabled by HALO_NVCC={value:?}"));
        }
        let path = PathBuf::from(value);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("HALO_NVCC={value:?} does not exist"))
        };
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(root) = env::var(var) {
            let nvcc = Path::new(&root).join("bin").join("nvcc");
            if nvcc.is_file() {
                return Ok(nvcc);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                return Ok(nvcc);
            }
        }
    }
    let local = manifest_dir.join(LOCAL_NVCC);
    if local.is_file() {
        // Reruns when the local install is replaced; when it does not exist there is nothing to
        // watch (a missing file would rerun this script on every build), so the install script
        // touches `build/ptx.rs` instead.
        println!("cargo:rerun-if-changed={}", local.display());
        return Ok(local);
    }
    Err("nvcc not found (HALO_NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, .tools/nvcc)".into())
}

/// `HALO_CUDA_ARCH` as nvcc's virtual architecture `compute_XY`.
fn virtual_arch() -> String {
    let raw = env::var("HALO_CUDA_ARCH").unwrap_or_default();
    let raw = raw.trim();
    if raw.is_empty() {
        return DEFAULT_ARCH.into();
    }
    let digits = raw.trim_start_matches("compute_").trim_start_matches("sm_");
    let valid = !digits.is_empty()
        && digits.chars().next().is_some_and(|c| c.is_ascii_digit())
        && digits.chars().all(|c| c.is_ascii_alphanumeric());
    if !valid {
        panic!("HALO_CUDA_ARCH={raw:?}: expected e.g. 80, sm_90 or compute_90");
    }
    format!("compute_{digits}")
}

/// First line of `nvcc --version` that names the release; fails the build when nvcc does not run.
fn nvcc_version(nvcc: &Path) -> String {
    let output = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("nvcc at {} could not be run: {e}", nvcc.display()));
    if !output.status.success() {
        panic!(
            "`{} --version` failed ({}):\n{}",
            nvcc.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown version")
        .trim()
        .to_string()
}

/// A compiled module: its name (the file stem), PTX path and entry points.
struct Module {
    name: String,
    ptx_path: PathBuf,
    entries: Vec<String>,
}

/// Compiles every source in parallel (one nvcc process per kernel file); panics with nvcc's
/// output on the first failure.
fn compile_all(
    nvcc: &Path,
    arch: &str,
    kernel_dir: &Path,
    sources: &[PathBuf],
    out_dir: &Path,
) -> Vec<Module> {
    let ptx_dir = out_dir.join("ptx");
    fs::create_dir_all(&ptx_dir).expect("create OUT_DIR/ptx");
    let include_dirs = cuda_include_dirs(nvcc);
    let results: Vec<Result<Module, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let include_dirs = &include_dirs;
                let ptx_dir = &ptx_dir;
                scope.spawn(move || compile_one(nvcc, arch, kernel_dir, include_dirs, src, ptx_dir))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("nvcc thread panicked".into()))
            })
            .collect()
    });
    let mut modules = Vec::new();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(m) => modules.push(m),
            Err(e) => failures.push(e),
        }
    }
    if !failures.is_empty() {
        panic!(
            "nvcc failed on {} kernel file(s) (set HALO_NVCC=none to build without kernels):\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    modules
}

fn compile_one(
    nvcc: &Path,
    arch: &str,
    kernel_dir: &Path,
    include_dirs: &[PathBuf],
    src: &Path,
    ptx_dir: &Path,
) -> Result<Module, String> {
    let name = src
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("kernel file name is not UTF-8: {}", src.display()))?
        .to_string();
    let ptx_path = ptx_dir.join(format!("{name}.ptx"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("-ptx")
        .arg("-O3")
        .arg(format!("-arch={arch}"))
        .arg("-std=c++17")
        // Source lines in the PTX: compute-sanitizer and profilers point at kernel lines.
        .arg("-lineinfo")
        .arg("-I")
        .arg(kernel_dir);
    for dir in include_dirs {
        cmd.arg("-I").arg(dir);
    }
    cmd.arg(src).arg("-o").arg(&ptx_path);
    let output = cmd
        .output()
        .map_err(|e| format!("{}: could not run nvcc: {e}", src.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} ({}):\n$ {:?}\n{}{}",
            src.display(),
            output.status,
            cmd,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let ptx = fs::read_to_string(&ptx_path)
        .map_err(|e| format!("{}: nvcc wrote no readable PTX: {e}", ptx_path.display()))?;
    Ok(Module {
        name,
        entries: ptx_entries(&ptx),
        ptx_path,
    })
}

/// `include/` and `include/cccl` next to nvcc's `bin/` (the PyPI layout and a toolkit's).
fn cuda_include_dirs(nvcc: &Path) -> Vec<PathBuf> {
    let Some(root) = nvcc.parent().and_then(|bin| bin.parent()) else {
        return Vec::new();
    };
    [root.join("include"), root.join("include").join("cccl")]
        .into_iter()
        .filter(|d| d.is_dir())
        .collect()
}

/// Names of the kernels a PTX module defines: the lines `.visible .entry NAME(` (or `.entry`).
fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|line| {
            let rest = line.trim_start();
            let rest = rest.strip_prefix(".visible").unwrap_or(rest).trim_start();
            let rest = rest.strip_prefix(".entry")?;
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

fn compiled(nvcc: &Path, version: &str, arch: &str, modules: &[Module]) -> String {
    let mut s = header();
    writeln!(s, "/// Whether nvcc compiled the kernels into this build.").unwrap();
    writeln!(s, "pub const KERNELS_COMPILED: bool = true;").unwrap();
    writeln!(
        s,
        "/// Why the kernels were not compiled (empty when they were)."
    )
    .unwrap();
    writeln!(s, "pub const NOT_COMPILED_REASON: &str = \"\";").unwrap();
    writeln!(s, "/// The nvcc that compiled them (empty when none).").unwrap();
    writeln!(
        s,
        "pub const NVCC: &str = {:?};",
        nvcc.display().to_string()
    )
    .unwrap();
    writeln!(
        s,
        "/// Its release line, e.g. \"Cuda compilation tools, release 13.0, V13.0.88\"."
    )
    .unwrap();
    writeln!(s, "pub const NVCC_VERSION: &str = {version:?};").unwrap();
    writeln!(
        s,
        "/// The PTX target, e.g. \"compute_80\" (empty when not compiled)."
    )
    .unwrap();
    writeln!(s, "pub const CUDA_ARCH: &str = {arch:?};").unwrap();
    writeln!(s, "/// Every compiled `kernels/*.cu`, by name.").unwrap();
    writeln!(s, "pub const MODULES: &[PtxModule] = &[").unwrap();
    for m in modules {
        writeln!(s, "    PtxModule {{").unwrap();
        writeln!(s, "        name: {:?},", m.name).unwrap();
        writeln!(
            s,
            "        ptx: include_str!({:?}),",
            m.ptx_path.display().to_string()
        )
        .unwrap();
        writeln!(s, "        entries: &{:?},", m.entries).unwrap();
        writeln!(s, "    }},").unwrap();
    }
    writeln!(s, "];").unwrap();
    s
}

fn not_compiled(reason: &str) -> String {
    let mut s = header();
    writeln!(s, "/// Whether nvcc compiled the kernels into this build.").unwrap();
    writeln!(s, "pub const KERNELS_COMPILED: bool = false;").unwrap();
    writeln!(
        s,
        "/// Why the kernels were not compiled (empty when they were)."
    )
    .unwrap();
    writeln!(s, "pub const NOT_COMPILED_REASON: &str = {reason:?};").unwrap();
    writeln!(s, "/// The nvcc that compiled them (empty when none).").unwrap();
    writeln!(s, "pub const NVCC: &str = \"\";").unwrap();
    writeln!(
        s,
        "/// Its release line, e.g. \"Cuda compilation tools, release 13.0, V13.0.88\"."
    )
    .unwrap();
    writeln!(s, "pub const NVCC_VERSION: &str = \"\";").unwrap();
    writeln!(
        s,
        "/// The PTX target, e.g. \"compute_80\" (empty when not compiled)."
    )
    .unwrap();
    writeln!(s, "pub const CUDA_ARCH: &str = \"\";").unwrap();
    writeln!(s, "/// Every compiled `kernels/*.cu`, by name.").unwrap();
    writeln!(s, "pub const MODULES: &[PtxModule] = &[];").unwrap();
    s
}

fn header() -> String {
    "// Generated by build/ptx.rs: do not edit.\n".to_string()
}
