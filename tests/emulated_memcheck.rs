//! The emulated device's memory checker, as compute-sanitizer's memcheck would report: kernel
//! accesses outside an allocation, misaligned 16-byte vector accesses, copies outside an allocation,
//! and poisoned fresh allocations. Fault-injection kernels of the emulation
//! (`halo_selftest_*` in kernels/emulation/kernel_registry.cpp) do one bad access each; the launch
//! must fail with the device's error code and a message naming the kernel and the address, and the
//! device must stay usable afterwards.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{sys::CUresult, CudaFunction, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use halo_kernels::cuda::{CudaBackend, CudaSlice};
use halo_kernels::emulation;

fn backend() -> &'static CudaBackend {
    static B: OnceLock<CudaBackend> = OnceLock::new();
    B.get_or_init(|| CudaBackend::emulated().expect("the emulated device"))
}

fn selftest(name: &str) -> CudaFunction {
    static MODULE: OnceLock<Arc<cudarc::driver::CudaModule>> = OnceLock::new();
    let module = MODULE.get_or_init(|| {
        let ptx: String = [
            "halo_selftest_write_at",
            "halo_selftest_read_at",
            "halo_selftest_vector_load_at",
        ]
        .iter()
        .map(|n| format!(".visible .entry {n}()\n{{\n}}\n"))
        .collect();
        backend()
            .context()
            .load_module(Ptx::from_src(ptx))
            .expect("load the self-test kernels")
    });
    module.load_function(name).expect("self-test kernel")
}

fn one_thread() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn buffer(n: usize) -> CudaSlice<f32> {
    backend()
        .htod(&(0..n).map(|i| i as f32).collect::<Vec<_>>())
        .unwrap()
}

/// Runs `halo_selftest_write_at(buf, index, 7)`.
fn write_at(buf: &mut CudaSlice<f32>, index: i64) -> Result<(), DriverError> {
    let f = selftest("halo_selftest_write_at");
    let stream = backend().stream();
    let value = 7.0f32;
    let mut launch = stream.launch_builder(&f);
    launch.arg(buf).arg(&index).arg(&value);
    // SAFETY: the arguments match the kernel's signature; out-of-bounds indices are the point.
    unsafe { launch.launch(one_thread()) }.map(|_| ())
}

/// The launch failed with `code`, and the emulation's message names the kernel and says `where_`.
fn assert_fault(result: Result<(), DriverError>, code: CUresult, kernel: &str, where_: &str) {
    let err = result.expect_err("the bad access must fail the launch");
    assert_eq!(err.0, code, "error code");
    let detail = emulation::take_last_error().expect("the emulation recorded a detail");
    assert!(detail.contains(kernel), "names the kernel: {detail}");
    assert!(detail.contains(where_), "says where: {detail}");
}

/// After a fault the device still works: a correct write lands, and nothing else moved.
fn assert_still_usable(buf: &mut CudaSlice<f32>, n: usize) {
    write_at(buf, 0).expect("an in-bounds write");
    let host = backend().dtoh(buf).unwrap();
    assert_eq!(host[0], 7.0);
    assert!(
        host[1..]
            .iter()
            .enumerate()
            .all(|(i, &v)| v == (i + 1) as f32),
        "untouched"
    );
    assert_eq!(host.len(), n);
}

#[test]
fn write_one_past_the_end_is_an_illegal_address() {
    // 13 floats = 52 bytes: the element just past the end lies in the padding before the guard
    // page, caught by its canary after the launch.
    let mut buf = buffer(13);
    assert_fault(
        write_at(&mut buf, 13),
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        "halo_selftest_write_at",
        "0 bytes past the end of the 52-byte allocation",
    );
    assert_still_usable(&mut buf, 13);
}

#[test]
fn write_far_past_the_end_hits_the_guard_page() {
    let mut buf = buffer(16);
    assert_fault(
        write_at(&mut buf, 16 + 100),
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        "halo_selftest_write_at",
        "400 bytes past the end of the 64-byte allocation",
    );
    assert_still_usable(&mut buf, 16);
}

#[test]
fn write_before_the_start_is_an_illegal_address() {
    let mut buf = buffer(8);
    assert_fault(
        write_at(&mut buf, -1),
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        "halo_selftest_write_at",
        "4 bytes before the start of the 32-byte allocation",
    );
    assert_still_usable(&mut buf, 8);
}

#[test]
fn read_past_the_end_is_an_illegal_address() {
    let buf = buffer(16);
    let mut out = buffer(1);
    let f = selftest("halo_selftest_read_at");
    let index = 16i64 + 3;
    let stream = backend().stream();
    let mut launch = stream.launch_builder(&f);
    launch.arg(&buf).arg(&index).arg(&mut out);
    // SAFETY: matches the kernel's signature; the read past the end is the point.
    let result = unsafe { launch.launch(one_thread()) }.map(|_| ());
    assert_fault(
        result,
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        "halo_selftest_read_at",
        "12 bytes past the end of the 64-byte allocation",
    );
    assert_eq!(
        backend().dtoh(&out).unwrap(),
        vec![0.0],
        "the faulting launch wrote nothing"
    );
}

#[test]
fn misaligned_vector_load_is_a_misaligned_address() {
    let buf = buffer(64);
    let mut out = buffer(1);
    let f = selftest("halo_selftest_vector_load_at");
    let stream = backend().stream();
    for (offset, ok) in [(16i64, true), (4, false), (8, false)] {
        let mut launch = stream.launch_builder(&f);
        launch.arg(&buf).arg(&offset).arg(&mut out);
        // SAFETY: matches the kernel's signature; in bounds; misalignment is the point.
        let result = unsafe { launch.launch(one_thread()) }.map(|_| ());
        if ok {
            result.expect("an aligned 16-byte load");
            assert_eq!(backend().dtoh(&out).unwrap(), vec![4.0]);
        } else {
            assert_fault(
                result,
                CUresult::CUDA_ERROR_MISALIGNED_ADDRESS,
                "halo_selftest_vector_load_at",
                &format!("byte {offset} of the 256-byte allocation"),
            );
        }
    }
}

#[test]
fn fresh_allocations_are_poisoned_with_nan_bytes() {
    // SAFETY: read back without being written: exactly what the poison is for.
    let fresh = unsafe { backend().stream().alloc::<f32>(37) }.unwrap();
    let host = backend().dtoh(&fresh).unwrap();
    assert!(
        host.iter().all(|v| v.to_bits() == 0xffff_ffff),
        "every byte 0xff (NaN)"
    );
    let zeros = backend().alloc_zeros::<f32>(37).unwrap();
    assert!(backend().dtoh(&zeros).unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn copies_outside_an_allocation_are_refused() {
    let buf = buffer(4);
    // A view that claims more than the allocation holds, as a wrapper bug would build.
    let stream = backend().stream();
    let mut host = vec![0.0f32; 5];
    let (ptr, _guard) = cudarc::driver::DevicePtr::device_ptr(&buf, stream);
    // SAFETY: the copy is checked by the emulated driver, which is what this test is about.
    let result = unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut host, ptr) };
    let err = result.expect_err("a 20-byte copy out of a 16-byte allocation");
    assert_eq!(err.0, CUresult::CUDA_ERROR_INVALID_VALUE);
    let detail = emulation::take_last_error().unwrap();
    assert!(
        detail.contains("4 bytes past the end of the 16-byte allocation"),
        "{detail}"
    );
}

#[test]
fn a_kernel_the_emulation_lacks_is_refused_at_load() {
    // A kernel that the PTX names but the emulation lacks is refused at load, by name.
    let ptx = Ptx::from_src(".visible .entry no_such_kernel_anywhere()\n{\n}\n");
    let err = backend()
        .context()
        .load_module(ptx)
        .expect_err("unknown kernel");
    assert_eq!(err.0, CUresult::CUDA_ERROR_NOT_FOUND);
    let detail = emulation::take_last_error().unwrap();
    assert!(
        detail.contains("`no_such_kernel_anywhere` has no host-compiled twin"),
        "{detail}"
    );
}
