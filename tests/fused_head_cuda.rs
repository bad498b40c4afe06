//! The fused LM head through one test body on every device: the CPU op ([`Cpu`]) and the CUDA twin
//! (`CudaBackend`, on the real GPU when present, else the emulated device and its emulated
//! cuBLAS), each against the materialized path (an f64 matmul in the test, then the crate's
//! existing token ops) and f64 references at awkward sizes — V not a multiple of the tile, H odd,
//! one row, all-ignored rows, bias on and off, f32 / bf16 / f16 — plus finite differences on a
//! small case, the same bits on two runs, and the CPU op's errors for bad input.

mod device_support;
mod fused_support;

use device_support::cuda;
use fused_support::{grad_logp, logits_f64, logprobs_f64, materialized, max_abs_diff, Problem};
use half::{bf16, f16};
use halo_kernels::cuda::{CudaBackend, CudaFusedSaved, CudaLmHead, CudaLogit};
use halo_kernels::fused_head::{
    fused_linear_token_logprobs, fused_linear_token_logprobs_backward, FusedChunks, FusedHeadGrads,
    FusedTokenLogprobs,
};
use halo_kernels::{HaloError, Result, IGNORE_INDEX};

/// The fused head's forward and backward with host slices in and out.
trait FusedDevice {
    fn forward<T: CudaLogit>(
        &self,
        p: &Problem<T>,
        labels: &[i32],
        chunks: Option<FusedChunks>,
    ) -> Result<FusedTokenLogprobs>;
    #[allow(clippy::too_many_arguments)]
    fn backward<T: CudaLogit>(
        &self,
        p: &Problem<T>,
        labels: &[i32],
        row_max: &[f32],
        ln_sum: &[f32],
        grad: &[f32],
        chunks: Option<FusedChunks>,
    ) -> Result<FusedHeadGrads>;
}

struct Cpu;

impl FusedDevice for Cpu {
    fn forward<T: CudaLogit>(
        &self,
        p: &Problem<T>,
        labels: &[i32],
        chunks: Option<FusedChunks>,
    ) -> Result<FusedTokenLogprobs> {
        fused_linear_token_logprobs(&p.hidden, &p.head(), labels, IGNORE_INDEX, chunks)
    }
    fn backward<T: CudaLogit>(
        &self,
        p: &Problem<T>,
        labels: &[i32],
        row_max: &[f32],
        ln_sum: &[f32],
        grad: &[f32],
        chunks: Option<FusedChunks>,
    ) -> Result<FusedHeadGrads> {
        fused_linear_token_logprobs_backward(
            &p.hidden,
            &p.head(),
            labels,
            IGNORE_INDEX,
            row_max,
            ln_sum,
            grad,
            chunks,
        )
    }
}

impl FusedDevice for CudaBackend {
    fn forward<T: CudaLogit>(
        &self,
        p: &Problem<T>,
        labels: &[i32],
        chunks: Option<FusedChunks>,
    ) -> Result<FusedTokenLogprobs> {
        let (hidden, weight) = (self.htod(&p.hidden)?, self.htod(&p.weight)?);
        let bias = p.bias.as_deref().map(|b| self.htod(b)).transpose()?;
        let head = CudaLmHead {
            weight: &weight,
            bias: bias.as_ref(),
            vocab: p.vocab,
            hidden_size: p.h,
        };
        let out = self.fused_linear_token_logprobs(&hidden, &head, labels, IGNORE_INDEX, chunks)?;
        Ok(FusedTokenLogprobs {
            logp: self.dtoh(&out.logp)?,
            lse: self.dtoh(&out.lse)?,
            row_max: self.dtoh(&out.row_max)?,
            ln_sum: self.dtoh(&out.ln_sum)?,
        })
    }
    fn backward<T: CudaLogit>(
        &self,
        p: &Problem<T>,
        labels: &[i32],
        row_max: &[f32],
        ln_sum: &[f32],
        grad: &[f32],
        chunks: Option<FusedChunks>,
    ) -> Result<FusedHeadGrads> {
        let (hidden, weight) = (self.htod(&p.hidden)?, self.htod(&p.weight)?);
        let bias = p.bias.as_deref().map(|b| self.htod(b)).transpose()?;
        let head = CudaLmHead {
            weight: &weight,
            bias: bias.as_ref(),
            vocab: p.vocab,
            hidden_size: p.h,
        };
        let (m, l, g) = (self.htod(row_max)?, self.htod(ln_sum)?, self.htod(grad)?);
        let saved = CudaFusedSaved {
            row_max: &m,
            ln_sum: &l,
            grad_logp: &g,
        };
        let out = self.fused_linear_token_logprobs_backward(
            &hidden,
            &head,
            labels,
            IGNORE_INDEX,
            saved,
            chunks,
        )?;
        Ok(FusedHeadGrads {
            hidden: self.dtoh(&out.hidden)?,
            weight: self.dtoh(&out.weight)?,
            bias: out.bias.map(|b| self.dtoh(&b)).transpose()?,
        })
    }
}

macro_rules! fused_device_tests {
    ($($body:ident),* $(,)?) => {
        $(
            mod $body {
                #[test]
                fn cpu() {
                    super::$body(&super::Cpu);
                }
                #[test]
                fn cuda() {
                    super::$body(super::cuda());
                }
            }
        )*
    };
}

fused_device_tests!(
    f32_matches_the_materialized_path_and_f64,
    bf16_matches_the_materialized_path_and_f64,
    f16_matches_the_materialized_path_and_f64,
    gradients_match_finite_differences,
    all_rows_ignored_give_zeros,
    ignored_rows_are_not_read,
    two_runs_give_the_same_bits,
    bad_input_is_the_cpu_error,
);

fn chunks(row_tile: usize, vocab_tile: usize) -> Option<FusedChunks> {
    Some(FusedChunks {
        row_tile,
        vocab_tile,
        vocab_groups: 2,
    })
}

/// (rows, vocab, h, chunks): V not a multiple of the tile, H odd, one row, tiles larger than the
/// problem, the default tiling.
fn shapes() -> Vec<(usize, usize, usize, Option<FusedChunks>)> {
    vec![
        (5, 13, 7, chunks(2, 4)),
        (1, 13, 7, chunks(2, 4)),
        (9, 31, 33, chunks(4, 8)),
        (3, 5, 1, chunks(64, 64)),
        (7, 301, 9, None),
        (37, 517, 17, chunks(16, 128)),
    ]
}

fn against_materialized<T: CudaLogit, D: FusedDevice>(d: &D, tol: f64) {
    for (i, (rows, vocab, h, chunks)) in shapes().into_iter().enumerate() {
        for bias in [false, true] {
            let p = Problem::<T>::random(i as u64 * 2 + bias as u64, rows, vocab, h, bias, 3);
            let g = grad_logp(99 + i as u64, &p.labels);
            let f = d.forward(&p, &p.labels, chunks).unwrap();
            let (logp, dh, dw, db) = materialized(&p, &g);
            let (logp64, lse64) = logprobs_f64(&p.logits_f64(), &p.labels, vocab);
            let ctx = format!("{:?} rows {rows} vocab {vocab} h {h} bias {bias}", T::DTYPE);
            let as64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let e = max_abs_diff(as64(&f.logp), as64(&logp));
            assert!(e < tol, "{ctx}: logp vs materialized {e}");
            let e = max_abs_diff(as64(&f.logp), logp64.iter().copied());
            assert!(e < tol, "{ctx}: logp vs f64 {e}");
            let e = max_abs_diff(as64(&f.lse), lse64.iter().copied());
            assert!(e < tol, "{ctx}: lse vs f64 {e}");
            // The saved pair is the lse split in two.
            let e = max_abs_diff(
                f.row_max
                    .iter()
                    .zip(&f.ln_sum)
                    .map(|(&m, &l)| m as f64 + l as f64),
                lse64.iter().copied(),
            );
            assert!(e < tol, "{ctx}: row_max + ln_sum vs f64 lse {e}");
            for (r, &y) in p.labels.iter().enumerate() {
                if y == IGNORE_INDEX {
                    assert_eq!((f.logp[r], f.lse[r]), (0.0, 0.0), "{ctx}: ignored row {r}");
                }
            }
            let grads = d
                .backward(&p, &p.labels, &f.row_max, &f.ln_sum, &g, chunks)
                .unwrap();
            let e = max_abs_diff(as64(&grads.hidden), dh);
            assert!(e < tol, "{ctx}: ∂hidden {e}");
            let e = max_abs_diff(as64(&grads.weight), dw);
            assert!(e < tol, "{ctx}: ∂weight {e}");
            match grads.bias {
                Some(b) => {
                    assert!(bias, "{ctx}: a bias gradient without a bias");
                    let e = max_abs_diff(as64(&b), db);
                    assert!(e < tol, "{ctx}: ∂bias {e}");
                }
                None => assert!(!bias, "{ctx}: no bias gradient"),
            }
        }
    }
}

fn f32_matches_the_materialized_path_and_f64<D: FusedDevice>(d: &D) {
    against_materialized::<f32, D>(d, 2e-5);
}

fn bf16_matches_the_materialized_path_and_f64<D: FusedDevice>(d: &D) {
    // Inputs are bf16, but every side computes from the same stored values in ≥ f32.
    against_materialized::<bf16, D>(d, 2e-5);
}

fn f16_matches_the_materialized_path_and_f64<D: FusedDevice>(d: &D) {
    against_materialized::<f16, D>(d, 2e-5);
}

/// `L = Σ_r c_r logp_r` in f64 from the raw parameters.
fn loss_f64(p: &Problem<f32>, hid: &[f64], w: &[f64], b: Option<&[f64]>, c: &[f32]) -> f64 {
    let z = logits_f64(hid, w, b, p.rows, p.vocab, p.h);
    let (logp, _) = logprobs_f64(&z, &p.labels, p.vocab);
    logp.iter().zip(c).map(|(l, &c)| l * c as f64).sum()
}

fn gradients_match_finite_differences<D: FusedDevice>(d: &D) {
    for (seed, bias) in [(1u64, true), (2, false)] {
        let p = Problem::<f32>::random(seed, 5, 13, 7, bias, 4);
        let c = grad_logp(seed + 10, &p.labels);
        let ch = chunks(2, 5);
        let f = d.forward(&p, &p.labels, ch).unwrap();
        let grads = d
            .backward(&p, &p.labels, &f.row_max, &f.ln_sum, &c, ch)
            .unwrap();
        let (hid, w) = (
            Problem::<f32>::f64s(&p.hidden),
            Problem::<f32>::f64s(&p.weight),
        );
        let b = p.bias.as_deref().map(Problem::<f32>::f64s);
        let eps = 1e-5;
        let fd = |which: usize, i: usize| {
            let (mut hp, mut wp, mut bp) = (hid.clone(), w.clone(), b.clone());
            let mut eval = |delta: f64| {
                match which {
                    0 => hp[i] = hid[i] + delta,
                    1 => wp[i] = w[i] + delta,
                    _ => bp.as_mut().unwrap()[i] = b.as_ref().unwrap()[i] + delta,
                }
                loss_f64(&p, &hp, &wp, bp.as_deref(), &c)
            };
            (eval(eps) - eval(-eps)) / (2.0 * eps)
        };
        for i in 0..hid.len() {
            let (want, got) = (fd(0, i), grads.hidden[i] as f64);
            assert!(
                (want - got).abs() < 1e-5,
                "∂hidden[{i}]: fd {want} vs {got}"
            );
        }
        for i in 0..w.len() {
            let (want, got) = (fd(1, i), grads.weight[i] as f64);
            assert!(
                (want - got).abs() < 1e-5,
                "∂weight[{i}]: fd {want} vs {got}"
            );
        }
        if let Some(gb) = &grads.bias {
            for (i, &got) in gb.iter().enumerate() {
                let want = fd(2, i);
                assert!(
                    (want - got as f64).abs() < 1e-5,
                    "∂bias[{i}]: fd {want} vs {got}"
                );
            }
        }
    }
}

fn all_rows_ignored_give_zeros<D: FusedDevice>(d: &D) {
    let mut p = Problem::<f32>::random(5, 4, 11, 3, true, 0);
    p.labels = vec![IGNORE_INDEX; 4];
    let f = d.forward(&p, &p.labels, None).unwrap();
    assert!(f.logp.iter().chain(&f.lse).all(|&x| x == 0.0));
    let g = vec![0.0f32; 4];
    let grads = d
        .backward(&p, &p.labels, &f.row_max, &f.ln_sum, &g, None)
        .unwrap();
    assert!(grads.hidden.iter().chain(&grads.weight).all(|&x| x == 0.0));
    assert!(grads.bias.unwrap().iter().all(|&x| x == 0.0));
}

fn ignored_rows_are_not_read<D: FusedDevice>(d: &D) {
    let clean = Problem::<f32>::random(6, 6, 17, 5, false, 2);
    let mut dirty = Problem::<f32>::random(6, 6, 17, 5, false, 2);
    for (r, &y) in dirty.labels.iter().enumerate() {
        if y == IGNORE_INDEX {
            dirty.hidden[r * 5..(r + 1) * 5].fill(f32::NAN);
        }
    }
    let ch = chunks(4, 6);
    let (a, b) = (
        d.forward(&clean, &clean.labels, ch).unwrap(),
        d.forward(&dirty, &dirty.labels, ch).unwrap(),
    );
    assert_eq!(a, b);
    let g = grad_logp(3, &clean.labels);
    let ga = d
        .backward(&clean, &clean.labels, &a.row_max, &a.ln_sum, &g, ch)
        .unwrap();
    // The saved values of ignored rows are not read either.
    let (mut m, mut l) = (b.row_max.clone(), b.ln_sum.clone());
    for (r, &y) in dirty.labels.iter().enumerate() {
        if y == IGNORE_INDEX {
            (m[r], l[r]) = (f32::NAN, f32::INFINITY);
        }
    }
    let gb = d.backward(&dirty, &dirty.labels, &m, &l, &g, ch).unwrap();
    assert_eq!(ga, gb);
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn two_runs_give_the_same_bits<D: FusedDevice>(d: &D) {
    let p = Problem::<bf16>::random(8, 29, 203, 19, true, 5);
    let g = grad_logp(4, &p.labels);
    let ch = chunks(8, 64);
    let run = || {
        let f = d.forward(&p, &p.labels, ch).unwrap();
        let grads = d
            .backward(&p, &p.labels, &f.row_max, &f.ln_sum, &g, ch)
            .unwrap();
        (
            bits(&f.logp),
            bits(&f.lse),
            bits(&grads.hidden),
            bits(&grads.weight),
            bits(grads.bias.as_deref().unwrap()),
        )
    };
    assert_eq!(run(), run());
}

/// Bad input: the CPU op's error, on every device.
fn bad_input_is_the_cpu_error<D: FusedDevice>(d: &D) {
    let p = Problem::<f32>::random(7, 4, 9, 3, true, 0);
    let f = Cpu.forward(&p, &p.labels, None).unwrap();
    let g = vec![1.0f32; 4];
    // A label out of range.
    let labels = [0, 9, 1, 2];
    let e = d.forward(&p, &labels, None).unwrap_err();
    assert!(
        matches!(
            e,
            HaloError::LabelOutOfRange {
                row: 1,
                label: 9,
                ..
            }
        ),
        "{e}"
    );
    // Zero chunk fields.
    let bad = Some(FusedChunks {
        row_tile: 0,
        vocab_tile: 4,
        vocab_groups: 1,
    });
    assert!(matches!(
        d.forward(&p, &p.labels, bad).unwrap_err(),
        HaloError::InvalidShape(_)
    ));
    // Wrong lengths.
    let e = d.forward(&p, &p.labels[..3], None).unwrap_err();
    assert!(
        matches!(e, HaloError::LengthMismatch { what: "hidden", .. }),
        "{e}"
    );
    let e = d
        .backward(&p, &p.labels, &f.row_max[..3], &f.ln_sum, &g, None)
        .unwrap_err();
    assert!(
        matches!(
            e,
            HaloError::LengthMismatch {
                what: "row_max",
                ..
            }
        ),
        "{e}"
    );
    // Non-finite inputs, named as the CPU names them.
    let mut q = Problem::<f32>::random(7, 4, 9, 3, true, 0);
    q.hidden[2 * 3 + 1] = f32::INFINITY;
    let e = d.forward(&q, &q.labels, None).unwrap_err();
    assert!(
        matches!(
            e,
            HaloError::NonFinite {
                what: "hidden",
                row: 2
            }
        ),
        "{e}"
    );
    let mut q = Problem::<f32>::random(7, 4, 9, 3, true, 0);
    q.weight[5 * 3] = f32::NAN;
    let e = d.forward(&q, &q.labels, None).unwrap_err();
    assert!(
        matches!(
            e,
            HaloError::NonFinite {
                what: "weight",
                row: 5
            }
        ),
        "{e}"
    );
    let mut q = Problem::<f32>::random(7, 4, 9, 3, true, 0);
    q.bias.as_mut().unwrap()[7] = f32::NAN;
    let e = d.forward(&q, &q.labels, None).unwrap_err();
    assert!(
        matches!(
            e,
            HaloError::NonFinite {
                what: "bias",
                row: 7
            }
        ),
        "{e}"
    );
    let mut bad_g = g.clone();
    bad_g[3] = f32::NAN;
    let e = d
        .backward(&p, &p.labels, &f.row_max, &f.ln_sum, &bad_g, None)
        .unwrap_err();
    assert!(
        matches!(
            e,
            HaloError::NonFinite {
                what: "grad_logp",
                row: 3
            }
        ),
        "{e}"
    );
    let mut bad_m = f.row_max.clone();
    bad_m[1] = f32::INFINITY;
    let e = d
        .backward(&p, &p.labels, &bad_m, &f.ln_sum, &g, None)
        .unwrap_err();
    assert!(
        matches!(
            e,
            HaloError::NonFinite {
                what: "row_max",
                row: 1
            }
        ),
        "{e}"
    );
}
