//! The CUDA backend on machines without a GPU, a driver or nvcc: it must say so with
//! `HaloError::CudaUnavailable`, never panic. These run everywhere (on a GPU machine the backend
//! is available and the "unavailable" checks do not apply).

use halo_kernels::cuda::{check_available, ptx, CudaBackend, HOW_TO_COMPILE_KERNELS};
use halo_kernels::HaloError;

fn driver_present() -> bool {
    // SAFETY: only tries to load the driver library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[test]
fn backend_creation_never_panics() {
    let result = std::panic::catch_unwind(CudaBackend::new);
    let result = result.expect("CudaBackend::new panicked");
    if let Err(e) = result {
        assert!(
            matches!(e, HaloError::CudaUnavailable(_)),
            "a backend that cannot start must be CudaUnavailable, got {e:?}"
        );
    }
}

#[test]
fn no_driver_means_unavailable() {
    if driver_present() {
        return; // a driver is installed here: covered by the GPU tests
    }
    match CudaBackend::new() {
        Err(HaloError::CudaUnavailable(msg)) => {
            assert!(
                msg.contains("libcuda"),
                "the message should name the driver library: {msg}"
            )
        }
        other => panic!("expected CudaUnavailable without a driver, got {other:?}"),
    }
    assert!(matches!(
        check_available(),
        Err(HaloError::CudaUnavailable(_))
    ));
    // Every ordinal, not only 0.
    assert!(matches!(
        CudaBackend::with_ordinal(3),
        Err(HaloError::CudaUnavailable(_))
    ));
}

#[test]
fn missing_kernels_explain_how_to_get_nvcc() {
    if ptx::KERNELS_COMPILED {
        // Built with nvcc: every kernel file became a module with entry points.
        assert!(
            !ptx::MODULES.is_empty(),
            "kernels compiled but no PTX module embedded"
        );
        for m in ptx::MODULES {
            assert!(m.ptx.contains(".entry"), "module {} has no kernel", m.name);
            assert!(
                !m.entries.is_empty(),
                "module {} lists no entry point",
                m.name
            );
        }
        assert!(
            ptx::NVCC_VERSION.contains("release"),
            "nvcc version: {}",
            ptx::NVCC_VERSION
        );
        return;
    }
    assert!(ptx::MODULES.is_empty());
    let msg = match check_available() {
        Err(HaloError::CudaUnavailable(msg)) => msg,
        other => panic!("kernels not compiled, but check_available gave {other:?}"),
    };
    assert!(
        msg.contains("scripts/install_nvcc.sh"),
        "no hint to install nvcc: {msg}"
    );
    assert!(msg.contains(HOW_TO_COMPILE_KERNELS), "{msg}");
    assert!(
        msg.contains(ptx::NOT_COMPILED_REASON),
        "the build's reason is missing: {msg}"
    );
}

#[test]
fn every_op_entry_point_is_compiled_for_every_dtype() {
    if !ptx::KERNELS_COMPILED {
        return; // nothing compiled: see missing_kernels_explain_how_to_get_nvcc
    }
    let mut expected: Vec<String> = Vec::new();
    for op in [
        "token_logprobs_forward",
        "token_logprobs_backward",
        "token_logprobs_backward_inplace",
    ] {
        for dtype in ["f32", "bf16", "f16"] {
            expected.push(format!("{op}_{dtype}"));
        }
    }
    for op in [
        "sequence_sums",
        "sequence_logratio_sums",
        "broadcast_sequence_grad",
    ] {
        for layout in ["padded", "packed"] {
            expected.push(format!("{op}_{layout}_f32"));
        }
    }
    expected.extend(["humanline_grad_mask_f32", "kto_loss_f32", "dpo_loss_f32"].map(String::from));
    for name in expected {
        assert!(
            ptx::module_of(&name).is_some(),
            "entry point `{name}` is not in the compiled PTX"
        );
    }
}
