//! The CUDA model ops of `halo_kernels::cuda::nn` for layer norm, GELU, the element-wise ops and
//! the embedding, on the emulated device (or a real GPU when there is one): each against its CPU
//! twin (`halo_train::autograd::cpu`, the definition) and against a plain f64 reference written
//! here; the backwards also against finite differences of the f64 forward; awkward sizes (one
//! row, dims that are not multiples of a warp, more rows than a grid's blocks); bit-equal reruns;
//! every refusal.
//!
//! Tolerances (|got − want| ≤ tol · max(1, |want|)): f32 kernel vs f32 CPU twin 1e-5 (the sums
//! are grouped differently; nvcc contracts a·b + c into one FMA), vs the f64 reference 2e-5, vs
//! central finite differences of the f64 forward (h = 1e-4, error ~h²) 1e-4. GELU forward: 1e-6
//! absolute against the CPU twin, as the brief asks. The embedding's copies and its scatter-add
//! (the same additions in the same order) must equal the CPU twin bit for bit.

use halo_kernels::cuda::{nn::CudaTokenIds, CudaBackend, CudaSlice, CudaView, CudaViewMut};
use halo_kernels::HaloError;
use halo_train::autograd::cpu::{elementwise, embedding, gelu, layernorm};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VS_CPU: f64 = 1e-5;
const VS_F64: f64 = 2e-5;
const VS_FD: f64 = 1e-4;
const FD_STEP: f64 = 1e-4;

/// The emulated device is always there in CI: failing to create a backend fails the test.
fn gpu() -> CudaBackend {
    CudaBackend::new()
        .or_else(|_| CudaBackend::emulated())
        .expect("no CUDA backend (not even the emulated device)")
}

fn random(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// A device buffer of `n` NaNs: an output element the kernel fails to write stays NaN.
fn poisoned(gpu: &CudaBackend, n: usize) -> CudaSlice<f32> {
    gpu.htod(&vec![f32::NAN; n]).unwrap()
}

fn host(gpu: &CudaBackend, buf: &CudaSlice<f32>) -> Vec<f32> {
    gpu.dtoh(buf).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[track_caller]
fn assert_close<W: Copy + Into<f64>>(what: &str, got: &[f32], want: &[W], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let w: f64 = w.into();
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w} (error {err:e}, tolerance {tol:e})"
        );
    }
}

#[track_caller]
fn assert_length_mismatch(result: Result<(), HaloError>, what: &str) {
    match result {
        Err(HaloError::LengthMismatch { what: w, .. }) if w == what => {}
        other => panic!("expected a length mismatch on `{what}`, got {other:?}"),
    }
}

#[track_caller]
fn assert_invalid_shape(result: Result<(), HaloError>, needle: &str) {
    match result {
        Err(HaloError::InvalidShape(msg)) if msg.contains(needle) => {}
        other => panic!("expected an invalid shape mentioning `{needle}`, got {other:?}"),
    }
}

// ---- layer norm ------------------------------------------------------------------------------

const EPS: f32 = 1e-5;

/// f64 layer norm of one row: (y, mean, rstd).
fn ln_row_f64(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> (Vec<f64>, f64, f64) {
    let d = x.len() as f64;
    let m = x.iter().sum::<f64>() / d;
    let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / d;
    let r = 1.0 / (var + eps).sqrt();
    let y = x
        .iter()
        .zip(gamma)
        .zip(beta)
        .map(|((v, g), b)| (v - m) * r * g + b)
        .collect();
    (y, m, r)
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `Σ dy ⊙ LN(x)` of one row in f64: the loss whose gradient the backward computes.
fn ln_row_loss(x: &[f64], gamma: &[f64], beta: &[f64], dy: &[f64]) -> f64 {
    let (y, _, _) = ln_row_f64(x, gamma, beta, EPS as f64);
    y.iter().zip(dy).map(|(a, b)| a * b).sum()
}

struct LnCase {
    dim: usize,
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

fn ln_case(rng: &mut ChaCha8Rng, rows: usize, dim: usize) -> LnCase {
    // An offset per row, so the mean is not ~0 (the two-pass variance matters).
    let mut x = random(rng, rows * dim, -2.0, 2.0);
    for (r, row) in x.chunks_mut(dim).enumerate() {
        let shift = (r % 5) as f32 - 2.0;
        row.iter_mut().for_each(|v| *v += shift);
    }
    LnCase {
        dim,
        x,
        gamma: random(rng, dim, 0.5, 1.5),
        beta: random(rng, dim, -0.5, 0.5),
    }
}

/// (rows, dim) pairs: one row, dims below / across / far from a warp and a block, many rows.
const LN_SHAPES: [(usize, usize); 7] = [
    (1, 1),
    (1, 7),
    (3, 33),
    (2, 128),
    (5, 100),
    (37, 257),
    (130, 768),
];

#[test]
fn layernorm_forward_matches_cpu_twin_and_f64() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (rows, dim) in LN_SHAPES {
        let c = ln_case(&mut rng, rows, dim);
        let (x, g, b) = (
            gpu.htod(&c.x).unwrap(),
            gpu.htod(&c.gamma).unwrap(),
            gpu.htod(&c.beta).unwrap(),
        );
        let (mut y, mut mean, mut rstd) = (
            poisoned(&gpu, rows * dim),
            poisoned(&gpu, rows),
            poisoned(&gpu, rows),
        );
        gpu.layernorm_forward(&x, &g, &b, EPS, &mut y, &mut mean, &mut rstd)
            .unwrap();
        let (yg, mg, rg) = (host(&gpu, &y), host(&gpu, &mean), host(&gpu, &rstd));

        let (mut yc, mut mc, mut rc) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
        layernorm::layernorm_forward(&c.x, &c.gamma, &c.beta, EPS, &mut yc, &mut mc, &mut rc);
        let tag = format!("{rows}x{dim}");
        assert_close(&format!("y {tag} vs cpu"), &yg, &yc, VS_CPU);
        assert_close(&format!("mean {tag} vs cpu"), &mg, &mc, VS_CPU);
        assert_close(&format!("rstd {tag} vs cpu"), &rg, &rc, VS_CPU);

        let (gamma, beta) = (to_f64(&c.gamma), to_f64(&c.beta));
        let (mut y64, mut m64, mut r64) = (Vec::new(), Vec::new(), Vec::new());
        for row in c.x.chunks(dim) {
            let (y, m, r) = ln_row_f64(&to_f64(row), &gamma, &beta, EPS as f64);
            y64.extend(y);
            m64.push(m);
            r64.push(r);
        }
        assert_close(&format!("y {tag} vs f64"), &yg, &y64, VS_F64);
        assert_close(&format!("mean {tag} vs f64"), &mg, &m64, VS_F64);
        // rstd of a one-column row is 1/√eps ≈ 316: relative error of f32, scaled.
        assert_close(&format!("rstd {tag} vs f64"), &rg, &r64, VS_F64);

        // A rerun gives the same bits.
        let (mut y2, mut mean2, mut rstd2) = (
            poisoned(&gpu, rows * dim),
            poisoned(&gpu, rows),
            poisoned(&gpu, rows),
        );
        gpu.layernorm_forward(&x, &g, &b, EPS, &mut y2, &mut mean2, &mut rstd2)
            .unwrap();
        assert_eq!(bits(&yg), bits(&host(&gpu, &y2)), "y {tag} rerun");
        assert_eq!(bits(&rg), bits(&host(&gpu, &rstd2)), "rstd {tag} rerun");
    }
}

#[test]
fn layernorm_forward_more_rows_than_blocks() {
    // 4096 blocks at most: the last rows are taken grid-stride.
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (rows, dim) = (4096 + 37, 3);
    let c = ln_case(&mut rng, rows, dim);
    let (x, g, b) = (
        gpu.htod(&c.x).unwrap(),
        gpu.htod(&c.gamma).unwrap(),
        gpu.htod(&c.beta).unwrap(),
    );
    let (mut y, mut mean, mut rstd) = (
        poisoned(&gpu, rows * dim),
        poisoned(&gpu, rows),
        poisoned(&gpu, rows),
    );
    gpu.layernorm_forward(&x, &g, &b, EPS, &mut y, &mut mean, &mut rstd)
        .unwrap();
    let (mut yc, mut mc, mut rc) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
    layernorm::layernorm_forward(&c.x, &c.gamma, &c.beta, EPS, &mut yc, &mut mc, &mut rc);
    assert_close("y", &host(&gpu, &y), &yc, VS_CPU);
    assert_close("rstd", &host(&gpu, &rstd), &rc, VS_CPU);
}

#[test]
fn layernorm_forward_into_views_at_odd_offsets() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (rows, dim) = (4, 19);
    let c = ln_case(&mut rng, rows, dim);
    let mut padded_x = vec![7.0f32];
    padded_x.extend(&c.x);
    let x_buf = gpu.htod(&padded_x).unwrap();
    let x: CudaView<'_, f32> = x_buf.slice(1..);
    let (g, b) = (gpu.htod(&c.gamma).unwrap(), gpu.htod(&c.beta).unwrap());
    let mut y_buf = poisoned(&gpu, rows * dim + 5);
    let (mut mean, mut rstd) = (poisoned(&gpu, rows), poisoned(&gpu, rows));
    {
        let mut y: CudaViewMut<'_, f32> = y_buf.slice_mut(3..3 + rows * dim);
        gpu.layernorm_forward(&x, &g, &b, EPS, &mut y, &mut mean, &mut rstd)
            .unwrap();
    }
    let yg = host(&gpu, &y_buf);
    let (mut yc, mut mc, mut rc) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
    layernorm::layernorm_forward(&c.x, &c.gamma, &c.beta, EPS, &mut yc, &mut mc, &mut rc);
    assert_close("y in view", &yg[3..3 + rows * dim], &yc, VS_CPU);
    assert!(yg[..3]
        .iter()
        .chain(&yg[3 + rows * dim..])
        .all(|v| v.is_nan()));
}

/// The gradients of `L = Σ dy ⊙ LN(x)` by central differences of the f64 forward:
/// (dx, dγ, dβ).
fn ln_finite_differences(c: &LnCase, dy: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let dim = c.dim;
    let (x, gamma, beta, dy) = (to_f64(&c.x), to_f64(&c.gamma), to_f64(&c.beta), to_f64(dy));
    let central = |f: &mut dyn FnMut(f64) -> f64| (f(FD_STEP) - f(-FD_STEP)) / (2.0 * FD_STEP);
    let mut dx = Vec::with_capacity(x.len());
    for (xr, dyr) in x.chunks(dim).zip(dy.chunks(dim)) {
        for i in 0..dim {
            dx.push(central(&mut |h| {
                let mut xp = xr.to_vec();
                xp[i] += h;
                ln_row_loss(&xp, &gamma, &beta, dyr)
            }));
        }
    }
    let total = |gamma: &[f64], beta: &[f64]| -> f64 {
        x.chunks(dim)
            .zip(dy.chunks(dim))
            .map(|(xr, dyr)| ln_row_loss(xr, gamma, beta, dyr))
            .sum()
    };
    let dgamma = (0..dim)
        .map(|i| {
            central(&mut |h| {
                let mut gp = gamma.clone();
                gp[i] += h;
                total(&gp, &beta)
            })
        })
        .collect();
    let dbeta = (0..dim)
        .map(|i| {
            central(&mut |h| {
                let mut bp = beta.clone();
                bp[i] += h;
                total(&gamma, &bp)
            })
        })
        .collect();
    (dx, dgamma, dbeta)
}

#[test]
fn layernorm_backward_matches_cpu_twin_and_finite_differences() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    // The FD costs dim² per row: the widest shape is left to the CPU-twin comparison below.
    for (rows, dim) in LN_SHAPES {
        let c = ln_case(&mut rng, rows, dim);
        let n = rows * dim;
        let dy = random(&mut rng, n, -1.0, 1.0);
        // Non-zero starting gradients: the backward accumulates.
        let (dx0, dg0, db0) = (
            random(&mut rng, n, -1.0, 1.0),
            random(&mut rng, dim, -1.0, 1.0),
            random(&mut rng, dim, -1.0, 1.0),
        );
        let (mut mc, mut rc) = (vec![0.0; rows], vec![0.0; rows]);
        layernorm::layernorm_forward(
            &c.x,
            &c.gamma,
            &c.beta,
            EPS,
            &mut vec![0.0; n],
            &mut mc,
            &mut rc,
        );
        let run = || {
            let (x, g, mean, rstd, dyd) = (
                gpu.htod(&c.x).unwrap(),
                gpu.htod(&c.gamma).unwrap(),
                gpu.htod(&mc).unwrap(),
                gpu.htod(&rc).unwrap(),
                gpu.htod(&dy).unwrap(),
            );
            let (mut dx, mut dg, mut db) = (
                gpu.htod(&dx0).unwrap(),
                gpu.htod(&dg0).unwrap(),
                gpu.htod(&db0).unwrap(),
            );
            gpu.layernorm_backward(
                &x,
                &g,
                &mean,
                &rstd,
                &dyd,
                Some(&mut dx),
                Some(&mut dg),
                Some(&mut db),
            )
            .unwrap();
            (host(&gpu, &dx), host(&gpu, &dg), host(&gpu, &db))
        };
        let (dxg, dgg, dbg) = run();
        let tag = format!("{rows}x{dim}");

        let (mut dxc, mut dgc, mut dbc) = (dx0.clone(), dg0.clone(), db0.clone());
        layernorm::layernorm_backward(
            &c.x,
            &c.gamma,
            &mc,
            &rc,
            &dy,
            Some(&mut dxc),
            Some(&mut dgc),
            Some(&mut dbc),
        );
        assert_close(&format!("dx {tag} vs cpu"), &dxg, &dxc, VS_CPU);
        assert_close(&format!("dgamma {tag} vs cpu"), &dgg, &dgc, VS_CPU);
        assert_close(&format!("dbeta {tag} vs cpu"), &dbg, &dbc, VS_CPU);

        if dim <= 257 {
            let (fdx, fdg, fdb) = ln_finite_differences(&c, &dy);
            let plus = |base: &[f32], d: &[f64]| -> Vec<f64> {
                base.iter().zip(d).map(|(&a, &b)| a as f64 + b).collect()
            };
            assert_close(&format!("dx {tag} vs fd"), &dxg, &plus(&dx0, &fdx), VS_FD);
            assert_close(
                &format!("dgamma {tag} vs fd"),
                &dgg,
                &plus(&dg0, &fdg),
                VS_FD,
            );
            assert_close(
                &format!("dbeta {tag} vs fd"),
                &dbg,
                &plus(&db0, &fdb),
                VS_FD,
            );
        }

        let (dx2, dg2, db2) = run();
        assert_eq!(bits(&dxg), bits(&dx2), "dx {tag} rerun");
        assert_eq!(bits(&dgg), bits(&dg2), "dgamma {tag} rerun");
        assert_eq!(bits(&dbg), bits(&db2), "dbeta {tag} rerun");
    }
}

#[test]
fn layernorm_backward_each_output_alone() {
    // Any subset of the three gradients; the others are untouched (not passed).
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (rows, dim) = (9, 45);
    let c = ln_case(&mut rng, rows, dim);
    let n = rows * dim;
    let dy = random(&mut rng, n, -1.0, 1.0);
    let (mut mc, mut rc) = (vec![0.0; rows], vec![0.0; rows]);
    let mut yc = vec![0.0; n];
    layernorm::layernorm_forward(&c.x, &c.gamma, &c.beta, EPS, &mut yc, &mut mc, &mut rc);
    let (mut dxc, mut dgc, mut dbc) = (vec![0.5; n], vec![0.25; dim], vec![-0.5; dim]);
    layernorm::layernorm_backward(
        &c.x,
        &c.gamma,
        &mc,
        &rc,
        &dy,
        Some(&mut dxc),
        Some(&mut dgc),
        Some(&mut dbc),
    );
    let (x, g, mean, rstd, dyd) = (
        gpu.htod(&c.x).unwrap(),
        gpu.htod(&c.gamma).unwrap(),
        gpu.htod(&mc).unwrap(),
        gpu.htod(&rc).unwrap(),
        gpu.htod(&dy).unwrap(),
    );
    let none = None::<&mut CudaSlice<f32>>;
    let mut dx = gpu.htod(&vec![0.5; n]).unwrap();
    gpu.layernorm_backward(
        &x,
        &g,
        &mean,
        &rstd,
        &dyd,
        Some(&mut dx),
        none,
        None::<&mut CudaSlice<f32>>,
    )
    .unwrap();
    assert_close("dx alone", &host(&gpu, &dx), &dxc, VS_CPU);
    let mut dg = gpu.htod(&vec![0.25; dim]).unwrap();
    gpu.layernorm_backward(
        &x,
        &g,
        &mean,
        &rstd,
        &dyd,
        None::<&mut CudaSlice<f32>>,
        Some(&mut dg),
        None::<&mut CudaSlice<f32>>,
    )
    .unwrap();
    assert_close("dgamma alone", &host(&gpu, &dg), &dgc, VS_CPU);
    let mut db = gpu.htod(&vec![-0.5; dim]).unwrap();
    gpu.layernorm_backward(
        &x,
        &g,
        &mean,
        &rstd,
        &dyd,
        None::<&mut CudaSlice<f32>>,
        None::<&mut CudaSlice<f32>>,
        Some(&mut db),
    )
    .unwrap();
    assert_close("dbeta alone", &host(&gpu, &db), &dbc, VS_CPU);
}

#[test]
fn layernorm_refusals() {
    let gpu = gpu();
    let buf = |n: usize| gpu.alloc_zeros::<f32>(n).unwrap();
    let (x, g, b) = (buf(12), buf(4), buf(4));
    let (mut y, mut m, mut r) = (buf(12), buf(3), buf(3));
    assert_length_mismatch(
        gpu.layernorm_forward(&x, &g, &buf(5), EPS, &mut y, &mut m, &mut r),
        "beta",
    );
    assert_length_mismatch(
        gpu.layernorm_forward(&x, &g, &b, EPS, &mut buf(11), &mut m, &mut r),
        "y",
    );
    assert_length_mismatch(
        gpu.layernorm_forward(&x, &g, &b, EPS, &mut y, &mut buf(4), &mut r),
        "mean",
    );
    assert_length_mismatch(
        gpu.layernorm_forward(&x, &g, &b, EPS, &mut y, &mut m, &mut buf(2)),
        "rstd",
    );
    assert_invalid_shape(
        gpu.layernorm_forward(&buf(10), &g, &b, EPS, &mut buf(10), &mut m, &mut r),
        "not a whole number of rows",
    );
    assert_invalid_shape(
        gpu.layernorm_forward(&x, &buf(0), &buf(0), EPS, &mut y, &mut m, &mut r),
        "0 columns",
    );
    for eps in [0.0, -1e-5, f32::NAN, f32::INFINITY] {
        match gpu.layernorm_forward(&x, &g, &b, eps, &mut y, &mut m, &mut r) {
            Err(HaloError::InvalidHyperParameter { name: "eps", .. }) => {}
            other => panic!("eps {eps}: {other:?}"),
        }
    }
    // Empty x: nothing to do.
    gpu.layernorm_forward(&buf(0), &g, &b, EPS, &mut buf(0), &mut buf(0), &mut buf(0))
        .unwrap();

    let (mean, rstd, dy) = (buf(3), buf(3), buf(12));
    let (mut dx, mut dg, mut db) = (buf(12), buf(4), buf(4));
    assert_length_mismatch(
        gpu.layernorm_backward(
            &x,
            &g,
            &mean,
            &rstd,
            &buf(11),
            Some(&mut dx),
            Some(&mut dg),
            Some(&mut db),
        ),
        "dy",
    );
    assert_length_mismatch(
        gpu.layernorm_backward(
            &x,
            &g,
            &buf(2),
            &rstd,
            &dy,
            Some(&mut dx),
            Some(&mut dg),
            Some(&mut db),
        ),
        "mean",
    );
    assert_length_mismatch(
        gpu.layernorm_backward(
            &x,
            &g,
            &mean,
            &buf(4),
            &dy,
            Some(&mut dx),
            Some(&mut dg),
            Some(&mut db),
        ),
        "rstd",
    );
    assert_length_mismatch(
        gpu.layernorm_backward(
            &x,
            &g,
            &mean,
            &rstd,
            &dy,
            Some(&mut buf(13)),
            Some(&mut dg),
            Some(&mut db),
        ),
        "dx",
    );
    assert_length_mismatch(
        gpu.layernorm_backward(
            &x,
            &g,
            &mean,
            &rstd,
            &dy,
            Some(&mut dx),
            Some(&mut buf(3)),
            Some(&mut db),
        ),
        "dgamma",
    );
    assert_length_mismatch(
        gpu.layernorm_backward(
            &x,
            &g,
            &mean,
            &rstd,
            &dy,
            Some(&mut dx),
            Some(&mut dg),
            Some(&mut buf(5)),
        ),
        "dbeta",
    );
    assert_invalid_shape(
        gpu.layernorm_backward(
            &buf(10),
            &g,
            &mean,
            &rstd,
            &buf(10),
            Some(&mut buf(10)),
            Some(&mut dg),
            Some(&mut db),
        ),
        "not a whole number of rows",
    );
}

// ---- GELU ------------------------------------------------------------------------------------

fn gelu_f64(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

#[test]
fn gelu_forward_and_backward_match_cpu_twin_f64_and_finite_differences() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for n in [1usize, 31, 257, 10_001] {
        // Mostly [-6, 6], where the tanh is not saturated, plus a few far out.
        let mut x = random(&mut rng, n, -6.0, 6.0);
        if n > 4 {
            x[1] = -30.0;
            x[2] = 25.0;
            x[3] = 0.0;
        }
        let dy = random(&mut rng, n, -1.0, 1.0);
        let dx0 = random(&mut rng, n, -1.0, 1.0);
        let xd = gpu.htod(&x).unwrap();
        let mut y = poisoned(&gpu, n);
        gpu.gelu_forward(&xd, &mut y).unwrap();
        let yg = host(&gpu, &y);
        let mut yc = vec![0.0; n];
        gelu::gelu_forward(&x, &mut yc);
        for (i, (&g, &c)) in yg.iter().zip(&yc).enumerate() {
            assert!((g - c).abs() <= 1e-6, "gelu({}) = {g}, cpu {c}", x[i]);
        }
        let y64: Vec<f64> = x.iter().map(|&v| gelu_f64(v as f64)).collect();
        assert_close(&format!("gelu n={n} vs f64"), &yg, &y64, VS_F64);

        let run = || {
            let mut dx = gpu.htod(&dx0).unwrap();
            gpu.gelu_backward(&xd, &gpu.htod(&dy).unwrap(), &mut dx)
                .unwrap();
            host(&gpu, &dx)
        };
        let dxg = run();
        let mut dxc = dx0.clone();
        gelu::gelu_backward(&x, &dy, &mut dxc);
        assert_close(&format!("gelu' n={n} vs cpu"), &dxg, &dxc, VS_CPU);
        let fd: Vec<f64> = x
            .iter()
            .zip(&dy)
            .zip(&dx0)
            .map(|((&v, &d), &d0)| {
                let v = v as f64;
                let slope = (gelu_f64(v + FD_STEP) - gelu_f64(v - FD_STEP)) / (2.0 * FD_STEP);
                d0 as f64 + d as f64 * slope
            })
            .collect();
        assert_close(&format!("gelu' n={n} vs fd"), &dxg, &fd, VS_FD);
        assert_eq!(bits(&dxg), bits(&run()), "gelu' n={n} rerun");
    }
}

#[test]
fn gelu_beyond_one_grid_of_blocks() {
    // 4096 blocks × 256 threads at most: the rest is taken grid-stride.
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let n = 4096 * 256 + 77;
    let x = random(&mut rng, n, -4.0, 4.0);
    let xd = gpu.htod(&x).unwrap();
    let mut y = poisoned(&gpu, n);
    gpu.gelu_forward(&xd, &mut y).unwrap();
    let mut yc = vec![0.0; n];
    gelu::gelu_forward(&x, &mut yc);
    assert_close("gelu big", &host(&gpu, &y), &yc, VS_CPU);
}

#[test]
fn gelu_refusals() {
    let gpu = gpu();
    let buf = |n: usize| gpu.alloc_zeros::<f32>(n).unwrap();
    assert_length_mismatch(gpu.gelu_forward(&buf(5), &mut buf(4)), "y");
    assert_length_mismatch(gpu.gelu_backward(&buf(5), &buf(4), &mut buf(5)), "dy");
    assert_length_mismatch(gpu.gelu_backward(&buf(5), &buf(5), &mut buf(6)), "dx");
    gpu.gelu_forward(&buf(0), &mut buf(0)).unwrap();
    gpu.gelu_backward(&buf(0), &buf(0), &mut buf(0)).unwrap();
}

// ---- element-wise ----------------------------------------------------------------------------

/// Awkward flat lengths: one element, below and across a block, many blocks (the grid-stride
/// beyond 4096 blocks: `accumulate_beyond_one_grid_of_blocks`, `gelu_beyond_one_grid_of_blocks`).
const FLAT_SIZES: [usize; 4] = [1, 33, 1000, 70_001];

#[test]
fn accumulate_beyond_one_grid_of_blocks() {
    // 4096 blocks × 256 threads at most (the loop every flat element-wise kernel shares).
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let n = 4096 * 256 + 3;
    let (d0, src) = (
        random(&mut rng, n, -3.0, 3.0),
        random(&mut rng, n, -3.0, 3.0),
    );
    let mut dst = gpu.htod(&d0).unwrap();
    gpu.accumulate_scaled(&mut dst, &gpu.htod(&src).unwrap(), 0.5)
        .unwrap();
    let want: Vec<f64> = d0
        .iter()
        .zip(&src)
        .map(|(&d, &s)| d as f64 + 0.5 * s as f64)
        .collect();
    assert_close(
        "accumulate_scaled big vs f64",
        &host(&gpu, &dst),
        &want,
        VS_F64,
    );
}

#[test]
fn flat_elementwise_ops_match_cpu_twins_and_f64() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for n in FLAT_SIZES {
        let a = random(&mut rng, n, -3.0, 3.0);
        let b = random(&mut rng, n, -3.0, 3.0);
        let d0 = random(&mut rng, n, -3.0, 3.0);
        let (ad, bd) = (gpu.htod(&a).unwrap(), gpu.htod(&b).unwrap());
        let factor = -0.7f32;
        let f64_of = |f: &dyn Fn(usize) -> f64| -> Vec<f64> { (0..n).map(f).collect() };
        let (a64, b64, d64) = (to_f64(&a), to_f64(&b), to_f64(&d0));

        // accumulate
        let mut dst = gpu.htod(&d0).unwrap();
        gpu.accumulate(&mut dst, &bd).unwrap();
        let mut cpu = d0.clone();
        elementwise::accumulate(&mut cpu, &b);
        let got = host(&gpu, &dst);
        assert_close("accumulate vs cpu", &got, &cpu, VS_CPU);
        assert_close(
            "accumulate vs f64",
            &got,
            &f64_of(&|i| d64[i] + b64[i]),
            VS_F64,
        );

        // accumulate_scaled
        let mut dst = gpu.htod(&d0).unwrap();
        gpu.accumulate_scaled(&mut dst, &bd, factor).unwrap();
        let mut cpu = d0.clone();
        elementwise::accumulate_scaled(&mut cpu, &b, factor);
        let got = host(&gpu, &dst);
        assert_close("accumulate_scaled vs cpu", &got, &cpu, VS_CPU);
        let f = factor as f64;
        assert_close(
            "accumulate_scaled vs f64",
            &got,
            &f64_of(&|i| d64[i] + f * b64[i]),
            VS_F64,
        );

        // accumulate_product
        let mut dst = gpu.htod(&d0).unwrap();
        gpu.accumulate_product(&mut dst, &ad, &bd).unwrap();
        let mut cpu = d0.clone();
        elementwise::accumulate_product(&mut cpu, &a, &b);
        let got = host(&gpu, &dst);
        assert_close("accumulate_product vs cpu", &got, &cpu, VS_CPU);
        assert_close(
            "accumulate_product vs f64",
            &got,
            &f64_of(&|i| d64[i] + a64[i] * b64[i]),
            VS_F64,
        );

        // multiply
        let mut y = poisoned(&gpu, n);
        gpu.multiply(&ad, &bd, &mut y).unwrap();
        let mut cpu = vec![0.0; n];
        elementwise::multiply(&a, &b, &mut cpu);
        let got = host(&gpu, &y);
        assert_close("multiply vs cpu", &got, &cpu, VS_CPU);
        assert_close(
            "multiply vs f64",
            &got,
            &f64_of(&|i| a64[i] * b64[i]),
            VS_F64,
        );

        // add (the tape's Add forward) and scale (its Scale forward)
        let mut y = poisoned(&gpu, n);
        gpu.add(&ad, &bd, &mut y).unwrap();
        assert_close(
            "add vs f64",
            &host(&gpu, &y),
            &f64_of(&|i| a64[i] + b64[i]),
            VS_F64,
        );
        let mut y = poisoned(&gpu, n);
        gpu.scale(&ad, factor, &mut y).unwrap();
        assert_close(
            "scale vs f64",
            &host(&gpu, &y),
            &f64_of(&|i| a64[i] * f),
            VS_F64,
        );

        // accumulate_broadcast (the Sum backward): dst += src[0]
        let mut dst = gpu.htod(&d0).unwrap();
        gpu.accumulate_broadcast(&mut dst, &gpu.htod(&[1.25f32]).unwrap())
            .unwrap();
        assert_close(
            "accumulate_broadcast vs f64",
            &host(&gpu, &dst),
            &f64_of(&|i| d64[i] + 1.25),
            VS_F64,
        );
    }
}

#[test]
fn sum_matches_f64_and_reruns_bit_equal() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for n in [0usize, 1, 255, 2049, 100_003, 700_001] {
        let x = random(&mut rng, n, -1.0, 2.0);
        let xd = gpu.htod(&x).unwrap();
        let run = || {
            let mut out = poisoned(&gpu, 1);
            gpu.sum(&xd, &mut out).unwrap();
            host(&gpu, &out)[0]
        };
        let got = run();
        let want: f64 = x.iter().map(|&v| v as f64).sum();
        // Both sums are f64 (ours grouped by blocks): they round to the same f32 within an ulp.
        let magnitude: f64 = x.iter().map(|&v| (v as f64).abs()).sum::<f64>().max(1.0);
        assert!(
            (got as f64 - want).abs() <= 1e-7 * magnitude,
            "sum of {n}: got {got}, want {want}"
        );
        assert_eq!(got.to_bits(), run().to_bits(), "sum of {n} rerun");
    }
}

#[test]
fn bias_ops_match_cpu_twins_and_f64() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    // Rows: one, fewer than a chunk, many chunks (2053 rows → 5 rows per chunk, 411 chunks), and
    // more than 512 × 4 rows with columns wider than a block.
    for (rows, cols) in [(1, 1), (3, 7), (2053, 65), (2100, 300)] {
        let n = rows * cols;
        let x = random(&mut rng, n, -2.0, 2.0);
        let b = random(&mut rng, cols, -2.0, 2.0);
        let db0 = random(&mut rng, cols, -2.0, 2.0);
        let (xd, bd) = (gpu.htod(&x).unwrap(), gpu.htod(&b).unwrap());
        let tag = format!("{rows}x{cols}");

        let mut y = poisoned(&gpu, n);
        gpu.add_bias_forward(&xd, &bd, &mut y).unwrap();
        let mut cpu = vec![0.0; n];
        elementwise::add_bias_forward(&x, &b, &mut cpu);
        let got = host(&gpu, &y);
        assert_close(&format!("add_bias {tag} vs cpu"), &got, &cpu, VS_CPU);
        let want: Vec<f64> = (0..n).map(|i| x[i] as f64 + b[i % cols] as f64).collect();
        assert_close(&format!("add_bias {tag} vs f64"), &got, &want, VS_F64);

        let run = || {
            let mut db = gpu.htod(&db0).unwrap();
            gpu.bias_backward(&xd, &mut db).unwrap();
            host(&gpu, &db)
        };
        let got = run();
        let mut cpu = db0.clone();
        elementwise::bias_backward(&x, &mut cpu);
        // A column sum of `rows` terms of size ~1: scale the tolerance by √rows (f32 rounding
        // of the CPU's sequential sum).
        let tol = VS_CPU * (rows as f64).sqrt().max(1.0);
        assert_close(&format!("bias_backward {tag} vs cpu"), &got, &cpu, tol);
        let want: Vec<f64> = (0..cols)
            .map(|c| db0[c] as f64 + (0..rows).map(|r| x[r * cols + c] as f64).sum::<f64>())
            .collect();
        assert_close(&format!("bias_backward {tag} vs f64"), &got, &want, tol);
        assert_eq!(bits(&got), bits(&run()), "bias_backward {tag} rerun");
    }
}

#[test]
fn elementwise_refusals() {
    let gpu = gpu();
    let buf = |n: usize| gpu.alloc_zeros::<f32>(n).unwrap();
    assert_length_mismatch(gpu.accumulate(&mut buf(4), &buf(5)), "src");
    assert_length_mismatch(gpu.accumulate_scaled(&mut buf(4), &buf(3), 2.0), "src");
    assert_length_mismatch(gpu.accumulate_broadcast(&mut buf(4), &buf(2)), "src");
    assert_length_mismatch(gpu.accumulate_broadcast(&mut buf(4), &buf(0)), "src");
    assert_length_mismatch(gpu.accumulate_product(&mut buf(4), &buf(3), &buf(4)), "a");
    assert_length_mismatch(gpu.accumulate_product(&mut buf(4), &buf(4), &buf(5)), "b");
    assert_length_mismatch(gpu.multiply(&buf(4), &buf(3), &mut buf(4)), "m");
    assert_length_mismatch(gpu.multiply(&buf(4), &buf(4), &mut buf(3)), "y");
    assert_length_mismatch(gpu.add(&buf(4), &buf(3), &mut buf(4)), "b");
    assert_length_mismatch(gpu.add(&buf(4), &buf(4), &mut buf(5)), "y");
    assert_length_mismatch(gpu.scale(&buf(4), 1.0, &mut buf(5)), "y");
    assert_length_mismatch(gpu.add_bias_forward(&buf(6), &buf(3), &mut buf(5)), "y");
    assert_invalid_shape(
        gpu.add_bias_forward(&buf(7), &buf(3), &mut buf(7)),
        "not a whole number of rows",
    );
    assert_invalid_shape(
        gpu.add_bias_forward(&buf(6), &buf(0), &mut buf(6)),
        "0 columns",
    );
    assert_invalid_shape(
        gpu.bias_backward(&buf(7), &mut buf(3)),
        "not a whole number of rows",
    );
    assert_invalid_shape(gpu.bias_backward(&buf(6), &mut buf(0)), "0 columns");
    assert_length_mismatch(gpu.sum(&buf(4), &mut buf(2)), "out");
    // Empty inputs: no-ops (sum writes 0).
    gpu.accumulate(&mut buf(0), &buf(0)).unwrap();
    gpu.add_bias_forward(&buf(0), &buf(0), &mut buf(0)).unwrap();
    gpu.bias_backward(&buf(0), &mut buf(3)).unwrap();
}

// ---- embedding -------------------------------------------------------------------------------

fn upload(gpu: &CudaBackend, ids: &[u32], rows: usize) -> CudaTokenIds {
    gpu.upload_token_ids(ids, rows).unwrap()
}

#[test]
fn embedding_matches_cpu_twin_bit_for_bit_with_repeated_ids() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // (table rows, dim, positions): one position, dims off the warp, many repeats of few ids.
    for (rows, dim, n) in [(1, 1, 1), (5, 3, 40), (50, 37, 300), (256, 300, 513)] {
        let table = random(&mut rng, rows * dim, -1.0, 1.0);
        // Skewed ids: id 0 and the last row repeat often, the middle rarely.
        let ids: Vec<u32> = (0..n)
            .map(|i| match i % 4 {
                0 => 0,
                1 => (rows - 1) as u32,
                _ => rng.gen_range(0..rows as u32),
            })
            .collect();
        let tokens = upload(&gpu, &ids, rows);
        assert_eq!((tokens.len(), tokens.table_rows()), (n, rows));
        let td = gpu.htod(&table).unwrap();
        let tag = format!("{rows}x{dim}, {n} ids");

        let mut y = poisoned(&gpu, n * dim);
        gpu.embedding_forward(&td, &tokens, dim, &mut y).unwrap();
        let mut cpu = vec![0.0; n * dim];
        embedding::embedding_forward(&table, &ids, dim, &mut cpu);
        let got = host(&gpu, &y);
        assert_eq!(bits(&got), bits(&cpu), "embedding forward {tag}");
        for (r, &id) in ids.iter().enumerate() {
            let start = id as usize * dim;
            assert_eq!(&got[r * dim..(r + 1) * dim], &table[start..start + dim]);
        }

        let dy = random(&mut rng, n * dim, -1.0, 1.0);
        let dt0 = random(&mut rng, rows * dim, -1.0, 1.0);
        let run = || {
            let mut dt = gpu.htod(&dt0).unwrap();
            gpu.embedding_backward(&gpu.htod(&dy).unwrap(), &tokens, dim, &mut dt)
                .unwrap();
            host(&gpu, &dt)
        };
        let got = run();
        let mut cpu = dt0.clone();
        embedding::embedding_backward(&dy, &ids, dim, &mut cpu);
        assert_eq!(bits(&got), bits(&cpu), "embedding backward {tag}");
        let mut want: Vec<f64> = to_f64(&dt0);
        for (r, &id) in ids.iter().enumerate() {
            for c in 0..dim {
                want[id as usize * dim + c] += dy[r * dim + c] as f64;
            }
        }
        assert_close(
            &format!("embedding backward {tag} vs f64"),
            &got,
            &want,
            VS_F64 * (n as f64).sqrt(),
        );
        assert_eq!(bits(&got), bits(&run()), "embedding backward {tag} rerun");
    }
}

#[test]
fn embedding_refusals() {
    let gpu = gpu();
    let buf = |n: usize| gpu.alloc_zeros::<f32>(n).unwrap();
    // The first bad id and its position are named.
    match gpu.upload_token_ids(&[0, 3, 4, 9, 4], 4) {
        Err(HaloError::InvalidShape(msg)) => {
            assert!(msg.contains("token id 4 at position 2"), "{msg}");
            assert!(msg.contains("4 rows"), "{msg}");
        }
        other => panic!("expected a bad-id error, got {other:?}"),
    }
    assert!(gpu.upload_token_ids(&[0], 0).is_err());

    let tokens = upload(&gpu, &[1, 2, 1], 4);
    let dim = 5;
    assert_length_mismatch(
        gpu.embedding_forward(&buf(3 * dim), &tokens, dim, &mut buf(3 * dim)),
        "table",
    );
    assert_length_mismatch(
        gpu.embedding_forward(&buf(4 * dim), &tokens, dim, &mut buf(2 * dim)),
        "y",
    );
    assert_invalid_shape(
        gpu.embedding_forward(&buf(0), &tokens, 0, &mut buf(0)),
        "dim must be positive",
    );
    assert_length_mismatch(
        gpu.embedding_backward(&buf(3 * dim), &tokens, dim, &mut buf(5 * dim)),
        "dtable",
    );
    assert_length_mismatch(
        gpu.embedding_backward(&buf(4 * dim), &tokens, dim, &mut buf(4 * dim)),
        "dy",
    );
    assert_invalid_shape(
        gpu.embedding_backward(&buf(0), &tokens, 0, &mut buf(0)),
        "dim must be positive",
    );
    // No ids: nothing to do.
    let empty = upload(&gpu, &[], 4);
    assert!(empty.is_empty());
    gpu.embedding_forward(&buf(4 * dim), &empty, dim, &mut buf(0))
        .unwrap();
    gpu.embedding_backward(&buf(0), &empty, dim, &mut buf(4 * dim))
        .unwrap();
}
