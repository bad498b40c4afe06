//! The CUDA causal attention (`CudaBackend::attention_forward` / `attention_backward`, kernels in
//! `kernels/nn_attention.cu`) on the emulated device, against its definition (the CPU twin
//! `halo_train::autograd::cpu::attention`) and against a plain f64 reference written here, at
//! awkward sizes; the backward also against central finite differences of the kernel's own
//! forward. Every output is poisoned with NaN before a launch (so an element left unwritten fails).
//!
//! Tolerances (`|got − want| ≤ tol · (1 + |want|)`): against the CPU twin (both f32, other
//! summation orders, `expf` against `fast_exp`) 1e-5 for the forward and 2e-5 for the backward;
//! against the f64 reference the same; finite differences 2e-3 (f32 forward, step 1e-2).

use halo_kernels::cuda::nn::AttentionDims;
use halo_kernels::cuda::{CudaBackend, CudaSlice};
use halo_kernels::HaloError;
use halo_train::autograd::cpu::attention::{attention_backward, attention_forward, AttentionShape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FWD_TOL: f64 = 1e-5;
const BWD_TOL: f64 = 2e-5;
const FD_TOL: f64 = 2e-3;

fn backend() -> CudaBackend {
    // The real GPU when there is one (scripts/gpu_check.sh), else the emulated device.
    CudaBackend::new()
        .or_else(|_| CudaBackend::emulated())
        .expect("the emulated CUDA device is always available in tests")
}

fn dims(batch: usize, seq: usize, n_head: usize, head_dim: usize) -> AttentionDims {
    AttentionDims {
        batch,
        seq,
        n_head,
        dim: n_head * head_dim,
    }
}

fn cpu_shape(d: AttentionDims) -> AttentionShape {
    AttentionShape {
        batch: d.batch,
        seq: d.seq,
        n_head: d.n_head,
        dim: d.dim,
    }
}

fn qkv_len(d: AttentionDims) -> usize {
    d.batch * d.seq * 3 * d.dim
}
fn out_len(d: AttentionDims) -> usize {
    d.batch * d.seq * d.dim
}
fn probs_len(d: AttentionDims) -> usize {
    d.batch * d.n_head * d.seq * d.seq
}

/// Uniform in `[-range, range)`, never exactly 0.
fn random(rng: &mut ChaCha8Rng, n: usize, range: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x: f32 = rng.gen_range(-range..range);
            if x == 0.0 {
                0.5
            } else {
                x
            }
        })
        .collect()
}

fn poisoned(gpu: &CudaBackend, n: usize) -> CudaSlice<f32> {
    gpu.htod(&vec![f32::NAN; n]).unwrap()
}

/// The GPU forward: `(out, probs)` on the host.
fn gpu_forward(gpu: &CudaBackend, qkv: &[f32], d: AttentionDims) -> (Vec<f32>, Vec<f32>) {
    let qkv = gpu.htod(qkv).unwrap();
    let mut out = poisoned(gpu, out_len(d));
    let mut probs = poisoned(gpu, probs_len(d));
    gpu.attention_forward(&qkv, d, &mut out, &mut probs)
        .unwrap();
    (gpu.dtoh(&out).unwrap(), gpu.dtoh(&probs).unwrap())
}

/// The GPU backward accumulated onto `dqkv0`.
fn gpu_backward(
    gpu: &CudaBackend,
    qkv: &[f32],
    probs: &[f32],
    dout: &[f32],
    d: AttentionDims,
    dqkv0: &[f32],
) -> Vec<f32> {
    let qkv = gpu.htod(qkv).unwrap();
    let probs = gpu.htod(probs).unwrap();
    let dout = gpu.htod(dout).unwrap();
    let mut dqkv = gpu.htod(dqkv0).unwrap();
    gpu.attention_backward(&qkv, &probs, &dout, d, &mut dqkv)
        .unwrap();
    gpu.dtoh(&dqkv).unwrap()
}

/// Element `(token t, part, head h, column c)` of `qkv` (part 0 = q, 1 = k, 2 = v).
fn qkv_index(d: AttentionDims, t: usize, part: usize, h: usize, c: usize) -> usize {
    t * 3 * d.dim + part * d.dim + h * d.head_dim() + c
}

/// f64 reference forward, straight from the definition: `(out, probs)`.
fn reference_forward(qkv: &[f32], d: AttentionDims) -> (Vec<f64>, Vec<f64>) {
    let hd = d.head_dim();
    let scale = 1.0 / (hd as f64).sqrt();
    let x = |t, part, h, c| qkv[qkv_index(d, t, part, h, c)] as f64;
    let mut out = vec![0.0; out_len(d)];
    let mut probs = vec![0.0; probs_len(d)];
    for b in 0..d.batch {
        for h in 0..d.n_head {
            for i in 0..d.seq {
                let ti = b * d.seq + i;
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|c| x(ti, 0, h, c) * x(b * d.seq + j, 1, h, c))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                let prow = &mut probs[((b * d.n_head + h) * d.seq + i) * d.seq..][..d.seq];
                for (j, e) in exps.iter().enumerate() {
                    prow[j] = e / sum;
                }
                for c in 0..hd {
                    out[ti * d.dim + h * hd + c] =
                        (0..=i).map(|j| prow[j] * x(b * d.seq + j, 2, h, c)).sum();
                }
            }
        }
    }
    (out, probs)
}

/// f64 reference gradient of `qkv` (not accumulated) for output gradient `dout`, with `probs`
/// from [`reference_forward`]: `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = dS·K/√d`,
/// `dK = dSᵀ·Q/√d`, `dV = Pᵀ·dO`.
fn reference_backward(qkv: &[f32], probs: &[f64], dout: &[f32], d: AttentionDims) -> Vec<f64> {
    let hd = d.head_dim();
    let scale = 1.0 / (hd as f64).sqrt();
    let x = |t, part, h, c| qkv[qkv_index(d, t, part, h, c)] as f64;
    let g = |t: usize, h: usize, c: usize| dout[t * d.dim + h * hd + c] as f64;
    let mut dqkv = vec![0.0; qkv_len(d)];
    for b in 0..d.batch {
        for h in 0..d.n_head {
            let p = |i: usize, j: usize| probs[((b * d.n_head + h) * d.seq + i) * d.seq + j];
            for i in 0..d.seq {
                let ti = b * d.seq + i;
                let dp: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|c| g(ti, h, c) * x(b * d.seq + j, 2, h, c))
                            .sum()
                    })
                    .collect();
                let dot: f64 = (0..=i).map(|j| dp[j] * p(i, j)).sum();
                for (j, &dp_ij) in dp.iter().enumerate() {
                    let tj = b * d.seq + j;
                    let ds = p(i, j) * (dp_ij - dot);
                    for c in 0..hd {
                        dqkv[qkv_index(d, ti, 0, h, c)] += ds * x(tj, 1, h, c) * scale;
                        dqkv[qkv_index(d, tj, 1, h, c)] += ds * x(ti, 0, h, c) * scale;
                        dqkv[qkv_index(d, tj, 2, h, c)] += p(i, j) * g(ti, h, c);
                    }
                }
            }
        }
    }
    dqkv
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: impl IntoIterator<Item = f64>, tol: f64) {
    let want: Vec<f64> = want.into_iter().collect();
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol * (1.0 + w.abs()),
            "{what}[{k}]: got {g}, want {w} (error {err:e}, tolerance {tol:e})"
        );
    }
}

fn widen(x: &[f32]) -> impl Iterator<Item = f64> + '_ {
    x.iter().map(|&v| v as f64)
}

/// The awkward shapes of the comparisons: `(batch, seq, n_head, head_dim)`.
fn shapes() -> Vec<AttentionDims> {
    let mut all = Vec::new();
    for &batch in &[1, 3] {
        for &seq in &[1, 2, 7, 33, 65] {
            for &hd in &[1, 3, 16, 64] {
                all.push(dims(batch, seq, if batch == 1 { 3 } else { 2 }, hd));
            }
        }
    }
    // The widest head the kernel takes, and a sequence over the 128 threads of a block.
    all.push(dims(2, 33, 1, AttentionDims::MAX_HEAD_DIM));
    all.push(dims(1, 130, 2, 5));
    all
}

/// Forward against the CPU twin and the f64 reference; P exactly 0 above the diagonal.
fn check_forward(gpu: &CudaBackend, d: AttentionDims, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let qkv = random(&mut rng, qkv_len(d), 2.0);
    let (out, probs) = gpu_forward(gpu, &qkv, d);

    let mut cpu_out = vec![0.0; out_len(d)];
    let mut cpu_probs = vec![0.0; probs_len(d)];
    attention_forward(&qkv, cpu_shape(d), &mut cpu_out, &mut cpu_probs);
    assert_close(&format!("{d:?} out vs cpu"), &out, widen(&cpu_out), FWD_TOL);
    assert_close(
        &format!("{d:?} probs vs cpu"),
        &probs,
        widen(&cpu_probs),
        FWD_TOL,
    );

    let (ref_out, ref_probs) = reference_forward(&qkv, d);
    assert_close(&format!("{d:?} out vs f64"), &out, ref_out, FWD_TOL);
    assert_close(&format!("{d:?} probs vs f64"), &probs, ref_probs, FWD_TOL);

    for (r, row) in probs.chunks_exact(d.seq).enumerate() {
        let i = r % d.seq;
        assert!(
            row[i + 1..].iter().all(|&p| p.to_bits() == 0),
            "{d:?}: P row {r} (query {i}) has a non-zero entry above the diagonal: {row:?}"
        );
        let sum: f64 = widen(&row[..=i]).sum();
        assert!((sum - 1.0).abs() <= 1e-5, "{d:?}: P row {r} sums to {sum}");
    }
}

/// Backward (accumulated onto a non-zero `dqkv`) against the CPU twin and the f64 reference.
fn check_backward(gpu: &CudaBackend, d: AttentionDims, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let qkv = random(&mut rng, qkv_len(d), 2.0);
    let dout = random(&mut rng, out_len(d), 1.0);
    let dqkv0 = random(&mut rng, qkv_len(d), 1.0);
    let (_, probs) = gpu_forward(gpu, &qkv, d);
    let dqkv = gpu_backward(gpu, &qkv, &probs, &dout, d, &dqkv0);

    let mut cpu_dqkv = dqkv0.clone();
    attention_backward(&qkv, &probs, &dout, cpu_shape(d), &mut cpu_dqkv);
    assert_close(
        &format!("{d:?} dqkv vs cpu"),
        &dqkv,
        widen(&cpu_dqkv),
        BWD_TOL,
    );

    let (_, ref_probs) = reference_forward(&qkv, d);
    let grad = reference_backward(&qkv, &ref_probs, &dout, d);
    let want = dqkv0.iter().zip(grad).map(|(&a, g)| a as f64 + g);
    assert_close(&format!("{d:?} dqkv vs f64"), &dqkv, want, BWD_TOL);
}

#[test]
fn forward_matches_cpu_twin_and_f64_reference() {
    let gpu = backend();
    for (k, d) in shapes().into_iter().enumerate() {
        check_forward(&gpu, d, 100 + k as u64);
    }
}

#[test]
fn backward_accumulates_and_matches_cpu_twin_and_f64_reference() {
    let gpu = backend();
    for (k, d) in shapes().into_iter().enumerate() {
        check_backward(&gpu, d, 200 + k as u64);
    }
}

/// GPT-2's context and head size: 1024 tokens, heads of 64 (two heads: GPT-2 124M's twelve only
/// lengthen the grid, and each costs ~15 s on the emulator; all twelve: the ignored test below).
#[test]
fn gpt2_context_and_head_size() {
    let gpu = backend();
    let d = dims(1, AttentionDims::MAX_SEQ, 2, 64);
    check_forward(&gpu, d, 7);
    check_backward(&gpu, d, 8);
}

/// GPT-2 124M's attention exactly: 12 heads of 64 over a 1024-token context.
#[test]
#[ignore = "slow on the emulated device (~3 min); run with --ignored"]
fn gpt2_124m_shape() {
    let gpu = backend();
    let d = dims(1, AttentionDims::MAX_SEQ, 12, 64);
    check_forward(&gpu, d, 7);
    check_backward(&gpu, d, 8);
}

/// `L = Σ w ⊙ out`: the backward with `dout = w` against central differences of the GPU forward
/// in every coordinate of `qkv` (q, k and v of every head and token).
#[test]
fn backward_matches_finite_differences() {
    let gpu = backend();
    let d = dims(2, 4, 2, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let qkv = random(&mut rng, qkv_len(d), 1.0);
    let w = random(&mut rng, out_len(d), 1.0);
    let loss = |x: &[f32]| -> f64 {
        let (out, _) = gpu_forward(&gpu, x, d);
        out.iter().zip(&w).map(|(&o, &w)| o as f64 * w as f64).sum()
    };
    let (_, probs) = gpu_forward(&gpu, &qkv, d);
    let grad = gpu_backward(&gpu, &qkv, &probs, &w, d, &vec![0.0; qkv_len(d)]);
    let eps = 1e-2f32;
    let numeric: Vec<f64> = (0..qkv.len())
        .map(|k| {
            let mut x = qkv.clone();
            x[k] = qkv[k] + eps;
            let up = loss(&x);
            x[k] = qkv[k] - eps;
            let down = loss(&x);
            // The step actually taken, in f32.
            (up - down) / ((qkv[k] + eps) as f64 - (qkv[k] - eps) as f64)
        })
        .collect();
    assert_close("dqkv vs finite differences", &grad, numeric, FD_TOL);
    // Every part gets a gradient (a kernel that drops dq, dk or dv fails above; this guards the
    // test itself against a degenerate input).
    for part in 0..3 {
        let norm: f32 = (0..d.batch * d.seq)
            .flat_map(|t| (0..d.dim).map(move |c| t * 3 * d.dim + part * d.dim + c))
            .map(|k| grad[k].abs())
            .sum();
        assert!(norm > 1e-2, "part {part} has no gradient");
    }
}

#[test]
fn reruns_are_bit_equal() {
    let gpu = backend();
    let d = dims(3, 33, 2, 16);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let qkv = random(&mut rng, qkv_len(d), 2.0);
    let dout = random(&mut rng, out_len(d), 1.0);
    let dqkv0 = random(&mut rng, qkv_len(d), 1.0);
    let (out_a, probs_a) = gpu_forward(&gpu, &qkv, d);
    let (out_b, probs_b) = gpu_forward(&gpu, &qkv, d);
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out_a), bits(&out_b));
    assert_eq!(bits(&probs_a), bits(&probs_b));
    let dqkv_a = gpu_backward(&gpu, &qkv, &probs_a, &dout, d, &dqkv0);
    let dqkv_b = gpu_backward(&gpu, &qkv, &probs_a, &dout, d, &dqkv0);
    assert_eq!(bits(&dqkv_a), bits(&dqkv_b));
}

/// Outputs given as views into larger buffers: the same bits as whole buffers, nothing written
/// outside the views.
#[test]
fn views_are_accepted() {
    let gpu = backend();
    let d = dims(2, 7, 2, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let qkv = random(&mut rng, qkv_len(d), 2.0);
    let dout = random(&mut rng, out_len(d), 1.0);
    let (out, probs) = gpu_forward(&gpu, &qkv, d);
    let dqkv = gpu_backward(&gpu, &qkv, &probs, &dout, d, &vec![0.0; qkv_len(d)]);

    let pad = 5;
    let qkv_dev = gpu.htod(&[vec![9.0; pad], qkv.clone()].concat()).unwrap();
    let dout_dev = gpu.htod(&[vec![9.0; pad], dout.clone()].concat()).unwrap();
    let mut out_big = gpu.htod(&vec![7.0f32; out_len(d) + 2 * pad]).unwrap();
    let mut probs_big = gpu.htod(&vec![7.0f32; probs_len(d) + 2 * pad]).unwrap();
    let mut dqkv_big = gpu.htod(&vec![0.0f32; qkv_len(d) + 2 * pad]).unwrap();
    let qkv_view = qkv_dev.slice(pad..);
    gpu.attention_forward(
        &qkv_view,
        d,
        &mut out_big.slice_mut(pad..pad + out_len(d)),
        &mut probs_big.slice_mut(pad..pad + probs_len(d)),
    )
    .unwrap();
    let probs_view = probs_big.slice(pad..pad + probs_len(d));
    gpu.attention_backward(
        &qkv_view,
        &probs_view,
        &dout_dev.slice(pad..),
        d,
        &mut dqkv_big.slice_mut(pad..pad + qkv_len(d)),
    )
    .unwrap();
    let out_big = gpu.dtoh(&out_big).unwrap();
    let probs_big = gpu.dtoh(&probs_big).unwrap();
    let dqkv_big = gpu.dtoh(&dqkv_big).unwrap();
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out_big[pad..pad + out_len(d)]), bits(&out));
    assert_eq!(bits(&probs_big[pad..pad + probs_len(d)]), bits(&probs));
    assert_eq!(bits(&dqkv_big[pad..pad + qkv_len(d)]), bits(&dqkv));
    for big in [&out_big, &probs_big] {
        assert!(big[..pad]
            .iter()
            .chain(&big[big.len() - pad..])
            .all(|&v| v == 7.0));
    }
    assert!(dqkv_big[..pad]
        .iter()
        .chain(&dqkv_big[dqkv_big.len() - pad..])
        .all(|&v| v == 0.0));
}

/// Every refusal: a clear error, nothing written.
#[test]
fn bad_shapes_and_lengths_are_refused() {
    let gpu = backend();
    let d = dims(2, 3, 2, 4);
    let buf = |n: usize| gpu.htod(&vec![1.5f32; n]).unwrap();
    let (qkv, dout) = (buf(qkv_len(d)), buf(out_len(d)));
    let (mut out, mut probs, mut dqkv) = (buf(out_len(d)), buf(probs_len(d)), buf(qkv_len(d)));
    let short = |n: usize| buf(n - 1);

    let mismatch = |e: HaloError, what: &str| match e {
        HaloError::LengthMismatch { what: w, .. } => assert_eq!(w, what),
        other => panic!("expected a length mismatch of {what}, got {other:?}"),
    };
    let fwd = |qkv: &CudaSlice<f32>, out: &mut CudaSlice<f32>, probs: &mut CudaSlice<f32>| {
        gpu.attention_forward(qkv, d, out, probs).unwrap_err()
    };
    mismatch(fwd(&short(qkv_len(d)), &mut out, &mut probs), "qkv");
    mismatch(fwd(&qkv, &mut short(out_len(d)), &mut probs), "out");
    mismatch(fwd(&qkv, &mut out, &mut short(probs_len(d))), "probs");
    let bwd = |qkv: &CudaSlice<f32>,
               probs: &CudaSlice<f32>,
               dout: &CudaSlice<f32>,
               dqkv: &mut CudaSlice<f32>| {
        gpu.attention_backward(qkv, probs, dout, d, dqkv)
            .unwrap_err()
    };
    mismatch(bwd(&short(qkv_len(d)), &probs, &dout, &mut dqkv), "qkv");
    mismatch(bwd(&qkv, &short(probs_len(d)), &dout, &mut dqkv), "probs");
    mismatch(bwd(&qkv, &probs, &short(out_len(d)), &mut dqkv), "dout");
    mismatch(bwd(&qkv, &probs, &dout, &mut short(qkv_len(d))), "dqkv");

    let invalid = |bad: AttentionDims, needle: &str| {
        // The shape is checked before the lengths: any buffers do.
        let (q, o, p) = (buf(1), buf(1), buf(1));
        let (mut o2, mut p2, mut dq) = (buf(1), buf(1), buf(1));
        for e in [
            gpu.attention_forward(&q, bad, &mut o2, &mut p2)
                .unwrap_err(),
            gpu.attention_backward(&q, &p, &o, bad, &mut dq)
                .unwrap_err(),
        ] {
            match e {
                HaloError::InvalidShape(msg) => assert!(msg.contains(needle), "{bad:?}: {msg}"),
                other => panic!("{bad:?}: expected InvalidShape, got {other:?}"),
            }
        }
    };
    invalid(AttentionDims { n_head: 0, ..d }, "at least 1");
    invalid(AttentionDims { dim: 0, ..d }, "at least 1");
    invalid(AttentionDims { dim: 7, ..d }, "does not divide");
    invalid(dims(1, 2, 1, AttentionDims::MAX_HEAD_DIM + 1), "head size");
    invalid(dims(1, AttentionDims::MAX_SEQ + 1, 1, 1), "seq");
    invalid(dims(usize::MAX / 4, 2, 1, 8), "overflow");
    invalid(dims(1 << 22, 1024, 1, 1), "grid");

    // Nothing was written by any refused call.
    for (b, n) in [
        (&out, out_len(d)),
        (&probs, probs_len(d)),
        (&dqkv, qkv_len(d)),
    ] {
        assert_eq!(gpu.dtoh(b).unwrap(), vec![1.5; n]);
    }
}

/// No sequence or no token: every buffer is empty and the call is a no-op.
#[test]
fn empty_batches_are_no_ops() {
    let gpu = backend();
    for d in [dims(0, 5, 2, 4), dims(3, 0, 2, 4)] {
        let empty = gpu.alloc_zeros::<f32>(0).unwrap();
        let (mut out, mut probs, mut dqkv) = (
            gpu.alloc_zeros::<f32>(0).unwrap(),
            gpu.alloc_zeros::<f32>(0).unwrap(),
            gpu.alloc_zeros::<f32>(0).unwrap(),
        );
        gpu.attention_forward(&empty, d, &mut out, &mut probs)
            .unwrap();
        gpu.attention_backward(&empty, &empty, &empty, d, &mut dqkv)
            .unwrap();
        gpu.synchronize().unwrap();
    }
}
