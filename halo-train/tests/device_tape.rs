//! The tape on the emulated CUDA device against the same tape on the CPU: every op the CUDA
//! device runs gives the CPU's values and gradients (f32 both, different summation orders:
//! 1e-4 relative). Parameters live on the device and are borrowed by the tape.

use halo_train::autograd::{Device, Gradients, Storage, StorageRef, Tape};

/// The real GPU when there is one (scripts/gpu_check.sh runs these tests there; not with
/// `HALO_CUDA_EMULATED=1`), else the emulated device, which the test build always has.
fn emulated() -> Device {
    Device::cuda()
        .or_else(|_| Device::cuda_emulated())
        .expect("the emulated CUDA device (feature `emulation`) must load")
}

/// Deterministic values in [-1, 1), never all zero.
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            ((h >> 8) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

fn host_grads(device: &Device, g: &Gradients, n: usize) -> Vec<Option<Vec<f32>>> {
    (0..n)
        .map(|i| g.get_storage(i).map(|s| device.to_host(s).unwrap()))
        .collect()
}

/// `sum(token_logprobs(x·w + b))` and `sum(x·w₂ᵀ)`: linear both ways, bias, token log-probs with
/// the in-place backward, sum, on both devices.
#[test]
fn linear_token_logprobs_and_sum_match_the_cpu() {
    let gpu = emulated();
    let (n, k, m) = (5, 7, 11);
    let x = values(n * k, 1);
    let w = values(k * m, 2);
    let b = values(m, 3);
    let w2 = values(m * k, 4);
    let labels: Vec<i32> = vec![3, -100, 10, 0, 5];
    let run = |device: &Device| {
        let params: Vec<Storage> = [&w, &b, &w2]
            .iter()
            .map(|p| device.upload(p).unwrap())
            .collect();
        let mut tape = Tape::new().on(device.clone());
        let xv = tape.constant(&x, &[n, k]).unwrap();
        let wv = tape.param_storage(0, params[0].as_ref(), &[k, m]).unwrap();
        let bv = tape.param_storage(1, params[1].as_ref(), &[m]).unwrap();
        let w2v = tape.param_storage(2, params[2].as_ref(), &[m, k]).unwrap();
        let logits = tape.linear(xv, wv, Some(bv)).unwrap();
        let logp = tape.token_logprobs(logits, &labels).unwrap();
        let s1 = tape.sum(logp).unwrap();
        let y2 = tape.linear_transposed(xv, w2v, None).unwrap();
        let s2 = tape.sum(y2).unwrap();
        let out = (tape.to_host(s1).unwrap(), tape.to_host(s2).unwrap());
        let grads = tape.backward_many(&[(s1, &[1.0]), (s2, &[0.5])]).unwrap();
        (out, host_grads(device, &grads, 3))
    };
    let (cpu_out, cpu_grads) = run(&Device::Cpu);
    let (gpu_out, gpu_grads) = run(&gpu);
    assert_close("sum logp", &gpu_out.0, &cpu_out.0, 1e-5);
    assert_close("sum x·w2ᵀ", &gpu_out.1, &cpu_out.1, 1e-5);
    for (i, (g, c)) in gpu_grads.iter().zip(&cpu_grads).enumerate() {
        let (g, c) = (g.as_ref().unwrap(), c.as_ref().unwrap());
        assert_close(&format!("grad {i}"), g, c, 1e-5);
    }
}

/// A host parameter on a CUDA tape (or the other way round) is a clear error, not a copy.
#[test]
fn a_tensor_on_the_wrong_device_is_refused() {
    let gpu = emulated();
    let w = values(6, 5);
    let mut tape = Tape::new().on(gpu.clone());
    let err = tape.param(0, &w, &[2, 3]).unwrap_err().to_string();
    assert!(err.contains("host tensor") && err.contains("cuda"), "{err}");
    let on_gpu = gpu.upload(&w).unwrap();
    let mut cpu_tape = Tape::new();
    let err = cpu_tape
        .param_storage(0, on_gpu.as_ref(), &[2, 3])
        .unwrap_err()
        .to_string();
    assert!(err.contains("CUDA tensor") && err.contains("cpu"), "{err}");
    // A host upstream gradient into a CUDA tape's backward_from.
    let mut tape = Tape::new().on(gpu.clone());
    let p = tape.param_storage(0, on_gpu.as_ref(), &[2, 3]).unwrap();
    let s = tape.sum(p).unwrap();
    let err = tape
        .backward_from(&[(s, StorageRef::Host(&[1.0]))])
        .unwrap_err()
        .to_string();
    assert!(err.contains("upstream"), "{err}");
}
