//! The CUDA AdamW step, global gradient norm and clip factor (`halo_kernels::cuda::nn`: kernels
//! `kernels/nn_adamw.cu`, `kernels/nn_grad_norm.cu`) on the emulated device (or a GPU: see
//! [`backend`]), against their CPU
//! definitions (`model::optim::AdamW::step`, `clip_grad_norm`, `Gradients::global_norm`) and
//! against plain f64 transcriptions of `torch.optim.AdamW` / `clip_grad_norm_` written here.
//!
//! Tolerances: the device AdamW rounds every operation as the CPU does, so parameters, moments and
//! written-back gradients are compared with the CPU **bitwise**; against the f64 reference
//! `|got − ref| ≤ 1e-6 · (|ref| + lr)` (the `lr` for a parameter that passes near 0). The norm is compared
//! with the CPU's and the f64 norm within 1e-6 relative; the clip factor with the f64 factor of
//! the device norm within 1e-6 relative.

use halo_kernels::cuda::nn::{AdamWScalars, GRAD_NORM_OUT_CLIP_FACTOR, GRAD_NORM_OUT_NORM};
use halo_kernels::cuda::CudaBackend;
use halo_kernels::cuda::{CudaSlice, DevicePtr};
use halo_kernels::error::HaloError;
use halo_train::autograd::Gradients;
use halo_train::model::optim::{clip_grad_norm, AdamW, AdamWConfig};
use halo_train::model::{Gpt, GptConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The real GPU when there is one (and `HALO_CUDA_EMULATED` is unset), else the emulated device,
/// as the core's device tests choose (`tests/device_support`): on a GPU the bitwise comparisons
/// also check that nvcc contracted nothing. With `HALO_REQUIRE_GPU=1` a missing GPU fails the test.
/// No backend at all fails the test (the emulated device is always built for the tests).
fn backend() -> CudaBackend {
    let require_gpu = std::env::var("HALO_REQUIRE_GPU").is_ok_and(|v| v == "1");
    CudaBackend::new()
        .or_else(|real| {
            if require_gpu {
                return Err(format!("HALO_REQUIRE_GPU=1 but no GPU: {real}"));
            }
            CudaBackend::emulated()
                .map_err(|emulated| format!("no GPU ({real}) and no emulated device ({emulated})"))
        })
        .unwrap_or_else(|e| panic!("no CUDA backend: {e}"))
}

/// Parameters of sizes 1, 3, 4, 1000 (wpe) and 65537 (wte) among others (`n_embd` 1), or 7, 147,
/// 196, ... (`n_embd` 7); random values, so no parameter starts at 0.
fn model(n_embd: usize, vocab_size: usize, n_ctx: usize, n_layer: usize, seed: u64) -> Gpt {
    let cfg = GptConfig {
        n_layer,
        n_head: 1,
        n_embd,
        vocab_size,
        n_ctx,
        dropout: 0.0,
    };
    let mut model = Gpt::new(cfg, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    for (_, data) in model.parameters_mut() {
        data.iter_mut().for_each(|x| *x = rng.gen_range(-1.0..1.0));
    }
    model
}

fn awkward_models() -> Vec<Gpt> {
    vec![model(1, 65537, 1000, 1, 1), model(7, 5, 3, 2, 2)]
}

/// Random gradients for every parameter but `skipped`, spread over `scale`.
fn random_grads(
    model: &Gpt,
    rng: &mut ChaCha8Rng,
    skipped: Option<usize>,
    scale: f32,
) -> Gradients {
    let mut grads = Gradients::new();
    for (i, p) in model.parameters().iter().enumerate() {
        if Some(i) != skipped {
            grads
                .add(
                    i,
                    (0..p.data.len())
                        .map(|_| scale * rng.gen_range(-1.0f32..1.0))
                        .collect(),
                )
                .unwrap();
        }
    }
    grads
}

fn grad_of(grads: &Gradients, i: usize) -> Option<&[f32]> {
    grads.iter().find(|(j, _)| *j == i).map(|(_, g)| g)
}

/// The model's parameters, moments and everything on the device, stepped like the CPU optimizer.
struct DeviceOptimizer {
    params: Vec<CudaSlice<f32>>,
    m: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    decays: Vec<bool>,
    config: AdamWConfig,
    step: u32,
}

impl DeviceOptimizer {
    fn new(backend: &CudaBackend, model: &Gpt, config: AdamWConfig) -> Self {
        let ps = model.parameters();
        Self {
            params: ps.iter().map(|p| backend.htod(&p.data).unwrap()).collect(),
            m: ps
                .iter()
                .map(|p| backend.alloc_zeros(p.data.len()).unwrap())
                .collect(),
            v: ps
                .iter()
                .map(|p| backend.alloc_zeros(p.data.len()).unwrap())
                .collect(),
            decays: ps.iter().map(|p| p.decays()).collect(),
            config,
            step: 0,
        }
    }

    fn scalars(&self, i: usize, lr: f32) -> AdamWScalars {
        let c = self.config;
        AdamWScalars::new(
            lr,
            c.betas,
            c.eps,
            c.weight_decay,
            self.decays[i],
            self.step,
        )
        .unwrap()
    }

    /// `clip`: the device clip factor (a one-element buffer) or none; `write_back`: leave the
    /// gradients scaled.
    fn step<C: DevicePtr<f32>>(
        &mut self,
        backend: &CudaBackend,
        grads: &mut [Option<CudaSlice<f32>>],
        lr: f32,
        clip: Option<&C>,
        write_back: bool,
    ) {
        self.step += 1;
        assert_eq!(grads.len(), self.params.len());
        for (i, g) in grads.iter_mut().enumerate() {
            let Some(g) = g.as_mut() else { continue };
            let s = self.scalars(i, lr);
            let (p, m, v) = (&mut self.params[i], &mut self.m[i], &mut self.v[i]);
            match (clip, write_back) {
                (None, _) => backend.adamw_step(p, g, m, v, &s).unwrap(),
                (Some(c), false) => backend.adamw_step_clipped(p, g, m, v, c, &s).unwrap(),
                (Some(c), true) => backend
                    .adamw_step_clipped_write_back(p, g, m, v, c, &s)
                    .unwrap(),
            }
        }
    }
}

fn upload_grads(
    backend: &CudaBackend,
    model: &Gpt,
    grads: &Gradients,
) -> Vec<Option<CudaSlice<f32>>> {
    (0..model.parameters().len())
        .map(|i| grad_of(grads, i).map(|g| backend.htod(g).unwrap()))
        .collect()
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}[{j}]: device {g} vs CPU {w}"
        );
    }
}

/// f64 `torch.optim.AdamW` state of one parameter.
#[derive(Clone)]
struct RefState {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl RefState {
    fn new(p: &[f32]) -> Self {
        Self {
            p: p.iter().map(|&x| x as f64).collect(),
            m: vec![0.0; p.len()],
            v: vec![0.0; p.len()],
        }
    }

    // One index over the parallel arrays p, m, v, g: clearer than zipped iterators.
    #[allow(clippy::needless_range_loop)]
    fn step(&mut self, g: &[f64], lr: f64, cfg: &AdamWConfig, decays: bool, t: i32) {
        let (b1, b2) = (cfg.betas.0 as f64, cfg.betas.1 as f64);
        let wd = if decays { cfg.weight_decay as f64 } else { 0.0 };
        for j in 0..self.p.len() {
            self.p[j] *= 1.0 - lr * wd;
            self.m[j] = b1 * self.m[j] + (1.0 - b1) * g[j];
            self.v[j] = b2 * self.v[j] + (1.0 - b2) * g[j] * g[j];
            let m_hat = self.m[j] / (1.0 - b1.powi(t));
            let v_hat = self.v[j] / (1.0 - b2.powi(t));
            self.p[j] -= lr * m_hat / (v_hat.sqrt() + cfg.eps as f64);
        }
    }
}

fn assert_close_f64(what: &str, got: &[f32], want: &[f64], lr: f32) {
    for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-6 * (w.abs() + lr as f64);
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}[{j}]: device {g} vs f64 {w} (tolerance {tol:e})"
        );
    }
}

fn f64_norm(buffers: &[Option<&[f32]>]) -> f64 {
    buffers
        .iter()
        .flatten()
        .flat_map(|b| b.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn adamw_matches_cpu_bitwise_and_f64_with_and_without_weight_decay() {
    let backend = backend();
    for weight_decay in [0.0, 0.1] {
        for mut model in awkward_models() {
            let config = AdamWConfig {
                lr: 0.0,
                betas: (0.8, 0.95),
                eps: 1e-6,
                weight_decay,
            };
            let mut cpu = AdamW::new(&model, config);
            let mut device = DeviceOptimizer::new(&backend, &model, config);
            let mut reference: Vec<RefState> = model
                .parameters()
                .iter()
                .map(|p| RefState::new(&p.data))
                .collect();
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let skipped = Some(2); // never has a gradient: untouched everywhere
            for (t, lr) in [1e-2f32, 5e-3, 2e-2, 1e-3].into_iter().enumerate() {
                let grads = random_grads(&model, &mut rng, skipped, 1.0);
                let mut dgrads = upload_grads(&backend, &model, &grads);
                device.step(&backend, &mut dgrads, lr, None::<&CudaSlice<f32>>, false);
                cpu.step(&mut model, &grads, lr).unwrap();
                for (i, r) in reference.iter_mut().enumerate() {
                    if let Some(g) = grad_of(&grads, i) {
                        let g: Vec<f64> = g.iter().map(|&x| x as f64).collect();
                        let decays = model.parameters()[i].decays();
                        r.step(&g, lr as f64, &config, decays, t as i32 + 1);
                    }
                }
            }
            let (cpu_m, cpu_v) = cpu.moments();
            for (i, p) in model.parameters().iter().enumerate() {
                let got = backend.dtoh(&device.params[i]).unwrap();
                assert_bits_eq(&p.name, &got, &p.data);
                assert_bits_eq("m", &backend.dtoh(&device.m[i]).unwrap(), &cpu_m[i]);
                assert_bits_eq("v", &backend.dtoh(&device.v[i]).unwrap(), &cpu_v[i]);
                assert_close_f64(&p.name, &got, &reference[i].p, 2e-2);
            }
        }
    }
}

#[test]
fn norm_over_many_buffers_matches_cpu_and_f64() {
    let backend = backend();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Sizes around the block and the per-buffer block cap (256 · 1024 = 262144, beyond which the
    // grid-stride loop takes over), an empty one and an absent one.
    let lens = [
        1usize, 7, 1000, 65537, 0, 255, 257, 262145, 600001, 3, 12345,
    ];
    let absent = 9;
    let host: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect())
        .collect();
    let mut cpu = Gradients::new();
    for (i, h) in host.iter().enumerate() {
        if i != absent {
            cpu.add(i, h.clone()).unwrap();
        }
    }
    let device: Vec<CudaSlice<f32>> = host.iter().map(|h| backend.htod(h).unwrap()).collect();
    let views: Vec<Option<&CudaSlice<f32>>> = device
        .iter()
        .enumerate()
        .map(|(i, d)| (i != absent).then_some(d))
        .collect();
    let mut plan = backend.grad_norm_plan(&lens).unwrap();
    // The norm lands in a caller's slot of a larger readout buffer (here [1..3] of 4).
    let mut readout = backend.htod(&[-7.0f32; 4]).unwrap();
    backend
        .grad_norm_clip(&mut plan, &views, None, &mut readout.slice_mut(1..3))
        .unwrap();
    let out = backend.dtoh(&readout).unwrap();
    let want = f64_norm(
        &host
            .iter()
            .enumerate()
            .map(|(i, h)| (i != absent).then_some(h.as_slice()))
            .collect::<Vec<_>>(),
    );
    let norm = out[1 + GRAD_NORM_OUT_NORM];
    assert!(
        ((norm as f64) - want).abs() <= 1e-6 * want,
        "norm {norm} vs f64 {want}"
    );
    let cpu_norm = cpu.global_norm();
    assert!(
        (norm - cpu_norm).abs() <= 1e-6 * cpu_norm,
        "norm {norm} vs CPU {cpu_norm}"
    );
    assert_eq!(out[1 + GRAD_NORM_OUT_CLIP_FACTOR], 1.0, "no clipping asked");
    assert_eq!((out[0], out[3]), (-7.0, -7.0), "outside the slot untouched");

    // Stale partials: the absent buffer's slots held a sum before, and must count as zero now.
    let all: Vec<Option<&CudaSlice<f32>>> = device.iter().map(Some).collect();
    let mut out2 = backend.alloc_zeros::<f32>(2).unwrap();
    backend
        .grad_norm_clip(&mut plan, &all, None, &mut out2)
        .unwrap();
    backend
        .grad_norm_clip(&mut plan, &views, None, &mut out2)
        .unwrap();
    assert_eq!(backend.dtoh(&out2).unwrap()[0].to_bits(), norm.to_bits());

    // No buffers at all: norm 0, factor 1 (the CPU: 0 and max/(1e-6) ≥ 1).
    let mut empty = backend.grad_norm_plan(&[]).unwrap();
    let none: [Option<&CudaSlice<f32>>; 0] = [];
    backend
        .grad_norm_clip(&mut empty, &none, Some(1.0), &mut out2)
        .unwrap();
    assert_eq!(backend.dtoh(&out2).unwrap(), vec![0.0, 1.0]);
}

/// The CPU step of a training loop: clip, then step; the device: norm + factor, then the clipped
/// step. Returns nothing; asserts parameters, gradients, norm and factor.
#[test]
fn clipped_step_matches_cpu_clip_then_step() {
    let backend = backend();
    // max_norm far below the norm (clips), far above (does not), 0 (the CPU scales by 0) and
    // negative (the CPU scales by a negative factor: accepted on both, as torch does).
    for (max_norm, write_back) in [
        (0.5f32, true),
        (0.5, false),
        (1e6, true),
        (0.0, true),
        (-1.0, true),
    ] {
        let mut model = model(7, 11, 5, 3, 3);
        let config = AdamWConfig::default();
        let mut cpu = AdamW::new(&model, config);
        let mut device = DeviceOptimizer::new(&backend, &model, config);
        let lens: Vec<usize> = model.parameters().iter().map(|p| p.data.len()).collect();
        let mut plan = backend.grad_norm_plan(&lens).unwrap();
        let mut readout = backend.alloc_zeros::<f32>(3).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for lr in [1e-2f32, 3e-3] {
            let mut grads = random_grads(&model, &mut rng, Some(4), 0.3);
            let host_grads = grads.try_clone().unwrap();
            let mut dgrads = upload_grads(&backend, &model, &grads);
            {
                let refs: Vec<Option<&CudaSlice<f32>>> =
                    dgrads.iter().map(|g| g.as_ref()).collect();
                backend
                    .grad_norm_clip(
                        &mut plan,
                        &refs,
                        Some(max_norm),
                        &mut readout.slice_mut(1..3),
                    )
                    .unwrap();
            }
            let factor_slot =
                readout.slice(1 + GRAD_NORM_OUT_CLIP_FACTOR..2 + GRAD_NORM_OUT_CLIP_FACTOR);
            // The factor goes straight from the readout slot to the step: no host read between.
            device.step(&backend, &mut dgrads, lr, Some(&factor_slot), write_back);
            let out = backend.dtoh(&readout).unwrap();
            let cpu_norm = clip_grad_norm(&mut grads, max_norm);
            cpu.step(&mut model, &grads, lr).unwrap();

            let (norm, factor) = (
                out[1 + GRAD_NORM_OUT_NORM],
                out[1 + GRAD_NORM_OUT_CLIP_FACTOR],
            );
            assert!(
                (norm - cpu_norm).abs() <= 1e-6 * cpu_norm,
                "norm {norm} vs CPU {cpu_norm}"
            );
            let host_refs: Vec<Option<&[f32]>> =
                (0..lens.len()).map(|i| grad_of(&host_grads, i)).collect();
            let want_norm = f64_norm(&host_refs);
            assert!(((norm as f64) - want_norm).abs() <= 1e-6 * want_norm);
            let want_factor = (max_norm as f64 / (norm as f64 + 1e-6)).min(1.0);
            assert!(
                (factor as f64 - want_factor).abs() <= 1e-6 * want_factor.abs().max(1e-30),
                "factor {factor} vs f64 {want_factor}"
            );
            assert_eq!(
                factor < 1.0,
                max_norm < 1.0,
                "clipping on exactly when the norm is above"
            );
            for (i, p) in model.parameters().iter().enumerate() {
                assert_bits_eq(&p.name, &backend.dtoh(&device.params[i]).unwrap(), &p.data);
                if let Some(g) = &dgrads[i] {
                    let want = if write_back {
                        grad_of(&grads, i)
                    } else {
                        grad_of(&host_grads, i)
                    };
                    assert_bits_eq(
                        "gradient after the step",
                        &backend.dtoh(g).unwrap(),
                        want.unwrap(),
                    );
                }
            }
        }
    }
}

#[test]
fn reruns_are_bit_equal() {
    let backend = backend();
    let model = model(1, 65537, 1000, 1, 9);
    let lens: Vec<usize> = model.parameters().iter().map(|p| p.data.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let grads = random_grads(&model, &mut rng, None, 1.0);
    let run = || {
        let mut device = DeviceOptimizer::new(&backend, &model, AdamWConfig::default());
        let mut plan = backend.grad_norm_plan(&lens).unwrap();
        let mut out = backend.alloc_zeros::<f32>(2).unwrap();
        let mut dgrads = upload_grads(&backend, &model, &grads);
        let mut history = Vec::new();
        for lr in [1e-2f32, 2e-2] {
            {
                let refs: Vec<Option<&CudaSlice<f32>>> =
                    dgrads.iter().map(|g| g.as_ref()).collect();
                backend
                    .grad_norm_clip(&mut plan, &refs, Some(10.0), &mut out)
                    .unwrap();
            }
            device.step(&backend, &mut dgrads, lr, Some(&out.slice(1..2)), true);
            history.push(backend.dtoh(&out).unwrap());
        }
        let params: Vec<Vec<f32>> = device
            .params
            .iter()
            .map(|p| backend.dtoh(p).unwrap())
            .collect();
        (history, params)
    };
    let (h1, p1) = run();
    let (h2, p2) = run();
    assert!(h1[0][1] < 1.0, "the first step clips");
    for (a, b) in h1.iter().flatten().zip(h2.iter().flatten()) {
        assert_eq!(a.to_bits(), b.to_bits());
    }
    for (a, b) in p1.iter().zip(&p2) {
        assert_bits_eq("rerun", a, b);
    }
}

fn len_mismatch(r: halo_kernels::error::Result<()>, what: &str) {
    match r {
        Err(HaloError::LengthMismatch { what: w, .. }) => {
            assert!(w.contains(what), "{w} vs {what}")
        }
        other => panic!("expected a length mismatch of {what}, got {other:?}"),
    }
}

#[test]
fn refusals() {
    let backend = backend();
    let s = AdamWScalars::new(1e-3, (0.9, 0.999), 1e-8, 0.01, true, 1).unwrap();
    let buf = |n: usize| backend.alloc_zeros::<f32>(n).unwrap();
    let (mut p, g, mut m, mut v, c) = (buf(10), buf(10), buf(10), buf(10), buf(1));
    len_mismatch(
        backend.adamw_step(&mut p, &buf(9), &mut m, &mut v, &s),
        "gradient",
    );
    len_mismatch(
        backend.adamw_step(&mut p, &g, &mut buf(11), &mut v, &s),
        "first moment",
    );
    len_mismatch(
        backend.adamw_step(&mut p, &g, &mut m, &mut buf(1), &s),
        "second moment",
    );
    len_mismatch(
        backend.adamw_step_clipped(&mut p, &g, &mut m, &mut v, &buf(2), &s),
        "clip_factor",
    );
    len_mismatch(
        backend.adamw_step_clipped_write_back(&mut p, &mut buf(3), &mut m, &mut v, &c, &s),
        "gradient",
    );
    // Zero elements: nothing to do, no error.
    let (mut e, mut em, mut ev) = (buf(0), buf(0), buf(0));
    backend
        .adamw_step(&mut e, &buf(0), &mut em, &mut ev, &s)
        .unwrap();

    let bad_scalar = |r: halo_kernels::error::Result<AdamWScalars>, name: &str| match r {
        Err(HaloError::InvalidHyperParameter { name: n, .. }) => assert_eq!(n, name),
        other => panic!("expected {name} refused, got {other:?}"),
    };
    bad_scalar(
        AdamWScalars::new(f32::NAN, (0.9, 0.999), 1e-8, 0.0, true, 1),
        "lr",
    );
    bad_scalar(
        AdamWScalars::new(f32::INFINITY, (0.9, 0.999), 1e-8, 0.0, true, 1),
        "lr",
    );
    bad_scalar(
        AdamWScalars::new(1e-3, (0.9, 0.999), f32::NAN, 0.0, true, 1),
        "eps",
    );
    bad_scalar(
        AdamWScalars::new(1e-3, (0.9, 0.999), 1e-8, f32::NEG_INFINITY, true, 1),
        "weight_decay",
    );
    bad_scalar(
        AdamWScalars::new(1e-3, (1.0, 0.999), 1e-8, 0.0, true, 1),
        "beta1",
    );
    bad_scalar(
        AdamWScalars::new(1e-3, (0.9, f32::NAN), 1e-8, 0.0, true, 1),
        "beta2",
    );
    bad_scalar(
        AdamWScalars::new(1e-3, (-0.1, 0.999), 1e-8, 0.0, true, 1),
        "beta1",
    );
    bad_scalar(
        AdamWScalars::new(1e-3, (0.9, 0.999), 1e-8, 0.0, true, 0),
        "step",
    );
    bad_scalar(
        AdamWScalars::new(1e-3, (0.9, 0.999), 1e-8, 0.0, true, u32::MAX),
        "step",
    );

    let mut plan = backend.grad_norm_plan(&[10, 3]).unwrap();
    let (g3, mut out) = (buf(3), buf(2));
    len_mismatch(
        backend.grad_norm_clip(&mut plan, &[Some(&g)], None, &mut out),
        "gradient buffers",
    );
    len_mismatch(
        backend.grad_norm_clip(&mut plan, &[Some(&g), Some(&g)], None, &mut out),
        "gradient",
    );
    len_mismatch(
        backend.grad_norm_clip(&mut plan, &[Some(&g), Some(&g3)], None, &mut buf(3)),
        "grad_norm output",
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        match backend.grad_norm_clip(&mut plan, &[Some(&g), None], Some(bad), &mut out) {
            Err(HaloError::InvalidHyperParameter {
                name: "max_norm", ..
            }) => {}
            other => panic!("max_norm {bad} accepted: {other:?}"),
        }
    }
    // A view works as the gradient and as the output.
    let whole = buf(13);
    let view = whole.slice(10..13);
    backend
        .grad_norm_clip(&mut plan, &[None, Some(&view)], Some(1.0), &mut out)
        .unwrap();
    assert_eq!(view.len(), 3);
}

#[test]
fn nonfinite_gradient_gives_the_cpus_norm_and_factor() {
    let backend = backend();
    for bad in [f32::NAN, f32::INFINITY] {
        let lens = [5usize, 300];
        let mut host: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.5; n]).collect();
        host[1][123] = bad;
        let mut cpu = Gradients::new();
        for (i, h) in host.iter().enumerate() {
            cpu.add(i, h.clone()).unwrap();
        }
        let cpu_norm = clip_grad_norm(&mut cpu, 1.0);
        let device: Vec<CudaSlice<f32>> = host.iter().map(|h| backend.htod(h).unwrap()).collect();
        let refs: Vec<Option<&CudaSlice<f32>>> = device.iter().map(Some).collect();
        let mut plan = backend.grad_norm_plan(&lens).unwrap();
        let mut out = backend.alloc_zeros::<f32>(2).unwrap();
        backend
            .grad_norm_clip(&mut plan, &refs, Some(1.0), &mut out)
            .unwrap();
        let out = backend.dtoh(&out).unwrap();
        // NaN: the CPU's factor is NaN, which is not < 1, so it scales nothing; +inf: the factor
        // max_norm / inf = 0 is < 1, so the CPU scales by 0. The device's factor must be the same.
        assert_eq!(
            out[0].is_nan(),
            cpu_norm.is_nan(),
            "norm {} vs CPU {cpu_norm}",
            out[0]
        );
        if !cpu_norm.is_nan() {
            assert_eq!(out[0], cpu_norm);
        }
        let cpu_factor = 1.0 / (cpu_norm + 1e-6);
        let want = if cpu_factor < 1.0 { cpu_factor } else { 1.0 };
        assert_eq!(
            out[1].to_bits(),
            want.to_bits(),
            "factor for a {bad} gradient"
        );
    }
}
