//! Shared by the fused-head tests: random problems, and the materialized path computed in the test
//! (logits by an f64 matmul, then the crate's existing token ops), as the independent reference.
#![allow(dead_code)]

use halo_kernels::cpu::{token_logprobs, token_logprobs_backward};
use halo_kernels::fused_head::LmHead;
use halo_kernels::{LogitElement, IGNORE_INDEX};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A head problem in storage dtype `T`: hidden `[rows, h]`, weight `[vocab, h]`, bias, labels.
pub struct Problem<T> {
    pub rows: usize,
    pub vocab: usize,
    pub h: usize,
    pub hidden: Vec<T>,
    pub weight: Vec<T>,
    pub bias: Option<Vec<T>>,
    pub labels: Vec<i32>,
}

impl<T: LogitElement> Problem<T> {
    /// Logits of size ~N(0, scale²) per entry; every `ignore_every`-th row ignored (0: none).
    pub fn random(
        seed: u64,
        rows: usize,
        vocab: usize,
        h: usize,
        bias: bool,
        ignore_every: usize,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut gen = |n: usize, s: f32| -> Vec<T> {
            (0..n).map(|_| T::from_f32(rng.gen_range(-s..s))).collect()
        };
        let scale = (3.0 / h as f32).sqrt() * 2.0;
        let hidden = gen(rows * h, 1.5);
        let weight = gen(vocab * h, scale);
        let bias = bias.then(|| gen(vocab, 1.0));
        let labels = (0..rows)
            .map(|r| {
                if ignore_every > 0 && r % ignore_every == 0 {
                    IGNORE_INDEX
                } else {
                    rng.gen_range(0..vocab as i32)
                }
            })
            .collect();
        Problem {
            rows,
            vocab,
            h,
            hidden,
            weight,
            bias,
            labels,
        }
    }

    pub fn head(&self) -> LmHead<'_, T> {
        LmHead {
            weight: &self.weight,
            bias: self.bias.as_deref(),
            vocab: self.vocab,
            hidden_size: self.h,
        }
    }

    /// The values as f64 (exactly the stored ones).
    pub fn f64s(v: &[T]) -> Vec<f64> {
        v.iter().map(|x| x.to_f32() as f64).collect()
    }

    /// `hidden · weightᵀ + bias` in f64, `[rows, vocab]`.
    pub fn logits_f64(&self) -> Vec<f64> {
        logits_f64(
            &Self::f64s(&self.hidden),
            &Self::f64s(&self.weight),
            self.bias.as_deref().map(Self::f64s).as_deref(),
            self.rows,
            self.vocab,
            self.h,
        )
    }
}

pub fn logits_f64(
    hidden: &[f64],
    weight: &[f64],
    bias: Option<&[f64]>,
    rows: usize,
    vocab: usize,
    h: usize,
) -> Vec<f64> {
    let mut z = vec![0.0; rows * vocab];
    for r in 0..rows {
        for v in 0..vocab {
            let dot: f64 = (0..h).map(|k| hidden[r * h + k] * weight[v * h + k]).sum();
            z[r * vocab + v] = dot + bias.map_or(0.0, |b| b[v]);
        }
    }
    z
}

/// f64 per-token log-prob and logsumexp (0 for ignored rows).
pub fn logprobs_f64(z: &[f64], labels: &[i32], vocab: usize) -> (Vec<f64>, Vec<f64>) {
    let mut logp = vec![0.0; labels.len()];
    let mut lse = vec![0.0; labels.len()];
    for (r, &y) in labels.iter().enumerate() {
        if y == IGNORE_INDEX {
            continue;
        }
        let row = &z[r * vocab..(r + 1) * vocab];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        lse[r] = l;
        logp[r] = row[y as usize] - l;
    }
    (logp, lse)
}

/// The materialized path: f32 logits (rounded from f64), `cpu::token_logprobs`, then
/// `cpu::token_logprobs_backward` and the two products in f64 → (logp, ∂hidden, ∂weight, ∂bias).
pub fn materialized<T: LogitElement>(
    p: &Problem<T>,
    grad_logp: &[f32],
) -> (Vec<f32>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let z: Vec<f32> = p.logits_f64().iter().map(|&x| x as f32).collect();
    let fwd = token_logprobs(&z, &p.labels, p.vocab, IGNORE_INDEX).unwrap();
    let mut dz = vec![0.0f32; z.len()];
    token_logprobs_backward(
        &z,
        &p.labels,
        fwd.saved_lse(),
        grad_logp,
        p.vocab,
        IGNORE_INDEX,
        &mut dz,
    )
    .unwrap();
    let (hid, w) = (Problem::<T>::f64s(&p.hidden), Problem::<T>::f64s(&p.weight));
    let (rows, vocab, h) = (p.rows, p.vocab, p.h);
    let mut dh = vec![0.0; rows * h];
    let mut dw = vec![0.0; vocab * h];
    let mut db = vec![0.0; vocab];
    for r in 0..rows {
        for v in 0..vocab {
            let g = dz[r * vocab + v] as f64;
            db[v] += g;
            for k in 0..h {
                dh[r * h + k] += g * w[v * h + k];
                dw[v * h + k] += g * hid[r * h + k];
            }
        }
    }
    (fwd.logp, dh, dw, db)
}

/// Largest |a − b| over two equal-length lists.
pub fn max_abs_diff(a: impl IntoIterator<Item = f64>, b: impl IntoIterator<Item = f64>) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Random per-row upstream gradient (0 on ignored rows, as a step would give).
pub fn grad_logp(seed: u64, labels: &[i32]) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    labels
        .iter()
        .map(|&y| {
            if y == IGNORE_INDEX {
                0.0
            } else {
                rng.gen_range(-1.0..1.0)
            }
        })
        .collect()
}
