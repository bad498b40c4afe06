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

/// Byte sizes of an entry point's parameters, read from its PTX declaration
/// (`.param .u64 NAME`, `.param .u32 NAME`, `.param .align A .b8 NAME[N]`).
fn ptx_param_sizes(ptx: &str, entry: &str) -> Option<Vec<usize>> {
    let start = ptx.find(&format!(".entry {entry}("))?;
    let body = &ptx[start..];
    let end = body.find(')')?;
    let sizes = body[..end]
        .lines()
        .filter(|l| l.trim_start().starts_with(".param"))
        .map(|l| {
            let l = l.trim().trim_end_matches(',');
            if let Some(open) = l.rfind('[') {
                l[open + 1..l.len() - 1]
                    .parse::<usize>()
                    .expect("array size")
            } else if l.contains(".u64")
                || l.contains(".s64")
                || l.contains(".f64")
                || l.contains(".b64")
            {
                8
            } else if l.contains(".u32")
                || l.contains(".s32")
                || l.contains(".f32")
                || l.contains(".b32")
            {
                4
            } else {
                panic!("unexpected PTX parameter: {l}")
            }
        })
        .collect();
    Some(sizes)
}

/// The argument lists the wrappers in `src/cuda` push (8-byte device pointers, `int64_t` and
/// `int32_t` scalars, ABI structs by value) against the compiled kernels' parameter lists: a
/// kernel signature change that the wrappers do not follow fails here, without a GPU.
#[test]
fn wrapper_argument_lists_match_the_compiled_kernels() {
    use halo_kernels::kernel_abi::{
        HaloClampParams, HaloDpoParams, HaloKtoParams, HaloSeqParams, HaloTokenParams,
    };
    use std::mem::size_of;
    if !ptx::KERNELS_COMPILED {
        return;
    }
    let ptrs = |n: usize, tail: &[usize]| -> Vec<usize> {
        let mut v = vec![8; n];
        v.extend_from_slice(tail);
        v
    };
    let token = size_of::<HaloTokenParams>();
    let seq = size_of::<HaloSeqParams>();
    let mut expected: Vec<(String, Vec<usize>)> = Vec::new();
    for dtype in ["f32", "bf16", "f16"] {
        expected.push((format!("token_logprobs_forward_{dtype}"), ptrs(6, &[token])));
        expected.push((
            format!("token_logprobs_backward_{dtype}"),
            ptrs(7, &[token]),
        ));
        expected.push((
            format!("token_logprobs_backward_inplace_{dtype}"),
            ptrs(6, &[token]),
        ));
        expected.push((format!("naive_log_softmax_{dtype}"), ptrs(2, &[8, 8])));
        expected.push((format!("naive_gather_{dtype}"), ptrs(3, &[8, 8, 4])));
    }
    expected.extend([
        ("sequence_sums_padded_f32".to_string(), ptrs(4, &[seq])),
        ("sequence_sums_packed_f32".to_string(), ptrs(5, &[seq])),
        (
            "sequence_logratio_sums_padded_f32".to_string(),
            ptrs(5, &[seq]),
        ),
        (
            "sequence_logratio_sums_packed_f32".to_string(),
            ptrs(6, &[seq]),
        ),
        (
            "broadcast_sequence_grad_padded_f32".to_string(),
            ptrs(3, &[seq]),
        ),
        (
            "broadcast_sequence_grad_packed_f32".to_string(),
            ptrs(4, &[seq]),
        ),
        (
            "humanline_grad_mask_f32".to_string(),
            ptrs(3, &[size_of::<HaloClampParams>()]),
        ),
        (
            "kto_loss_f32".to_string(),
            ptrs(7, &[size_of::<HaloKtoParams>()]),
        ),
        (
            "dpo_loss_f32".to_string(),
            ptrs(11, &[size_of::<HaloDpoParams>()]),
        ),
    ]);
    for (entry, sizes) in expected {
        let module = ptx::module_of(&entry)
            .unwrap_or_else(|| panic!("entry point `{entry}` is not in the compiled PTX"));
        let got = ptx_param_sizes(module.ptx, &entry)
            .unwrap_or_else(|| panic!("no declaration of `{entry}` in module {}", module.name));
        assert_eq!(got, sizes, "parameter sizes of `{entry}`");
    }
}
