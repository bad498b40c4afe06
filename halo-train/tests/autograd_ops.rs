//! Every autograd op: forward against a plain f64 reference, gradient against central finite
//! differences (f32 storage, f64 loss accumulation, relative tolerance), at awkward sizes.

// Finite-difference loops index several parallel arrays by the same j: clearer than zipped iterators.
#![allow(clippy::needless_range_loop)]

use halo_kernels::{HaloError, IGNORE_INDEX};
use halo_train::autograd::{Tape, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// Builds an op graph from parameter leaves (ids 0..inputs.len()) and returns its output.
type Build<'a> = dyn Fn(&mut Tape, &[Var]) -> Var + 'a;

fn forward(build: &Build<'_>, inputs: &[(Vec<f32>, Vec<usize>)]) -> Vec<f32> {
    let mut tape = Tape::with_seed(7);
    let vars: Vec<Var> = inputs
        .iter()
        .enumerate()
        .map(|(i, (v, s))| tape.param(i, v, s).unwrap())
        .collect();
    let out = build(&mut tape, &vars);
    tape.value(out).to_vec()
}

/// Checks `∂(Σ w·out)/∂input` from the tape against central differences for every input element.
fn grad_check(build: &Build<'_>, inputs: Vec<(Vec<f32>, Vec<usize>)>, eps: f32, rtol: f32) {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let out_len = forward(build, &inputs).len();
    let w = random(&mut rng, out_len, 1.0);
    let loss = |inputs: &[(Vec<f32>, Vec<usize>)]| -> f64 {
        forward(build, inputs)
            .iter()
            .zip(&w)
            .map(|(&o, &w)| o as f64 * w as f64)
            .sum()
    };
    let mut tape = Tape::with_seed(7);
    let vars: Vec<Var> = inputs
        .iter()
        .enumerate()
        .map(|(i, (v, s))| tape.param(i, v, s).unwrap())
        .collect();
    let out = build(&mut tape, &vars);
    let grads = tape.backward(out, &w).unwrap();
    for (p, (value, _)) in inputs.iter().enumerate() {
        let analytic = grads
            .get(p)
            .map(|g| g.to_vec())
            .unwrap_or_else(|| vec![0.0; value.len()]);
        assert_eq!(analytic.len(), value.len());
        let mut numeric = vec![0.0f64; value.len()];
        for j in 0..value.len() {
            let mut plus = inputs.clone();
            plus[p].0[j] += eps;
            let mut minus = inputs.clone();
            minus[p].0[j] -= eps;
            numeric[j] = (loss(&plus) - loss(&minus)) / (2.0 * eps as f64);
        }
        let scale = numeric.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
        for j in 0..value.len() {
            let (a, n) = (analytic[j] as f64, numeric[j]);
            assert!(
                (a - n).abs() <= rtol as f64 * (n.abs() + 0.1 * scale),
                "input {p} element {j}: analytic {a} vs numeric {n} (scale {scale})"
            );
        }
    }
}

fn assert_close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "element {i}: {g} vs {w}"
        );
    }
}

#[test]
fn linear_forward_and_grad() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (n, k, m) in [(1, 1, 1), (3, 5, 7), (6, 4, 3)] {
        let x = random(&mut rng, n * k, 1.0);
        let w = random(&mut rng, k * m, 1.0);
        let b = random(&mut rng, m, 1.0);
        let build = |t: &mut Tape, v: &[Var]| t.linear(v[0], v[1], Some(v[2])).unwrap();
        let inputs = vec![
            (x.clone(), vec![n, k]),
            (w.clone(), vec![k, m]),
            (b.clone(), vec![m]),
        ];
        let want: Vec<f64> = (0..n * m)
            .map(|idx| {
                let (r, c) = (idx / m, idx % m);
                b[c] as f64
                    + (0..k)
                        .map(|i| x[r * k + i] as f64 * w[i * m + c] as f64)
                        .sum::<f64>()
            })
            .collect();
        assert_close(&forward(&build, &inputs), &want, 1e-5);
        grad_check(&build, inputs, 1e-2, 1e-2);
    }
}

#[test]
fn linear_transposed_forward_and_grad() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (n, k, m) = (4, 3, 5);
    let x = random(&mut rng, n * k, 1.0);
    let w = random(&mut rng, m * k, 1.0); // [out, in]
    let build = |t: &mut Tape, v: &[Var]| t.linear_transposed(v[0], v[1], None).unwrap();
    let inputs = vec![(x.clone(), vec![n, k]), (w.clone(), vec![m, k])];
    let want: Vec<f64> = (0..n * m)
        .map(|idx| {
            let (r, c) = (idx / m, idx % m);
            (0..k)
                .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                .sum::<f64>()
        })
        .collect();
    assert_close(&forward(&build, &inputs), &want, 1e-5);
    grad_check(&build, inputs, 1e-2, 1e-2);
}

#[test]
fn embedding_forward_and_grad_with_repeated_ids() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (vocab, dim) = (5, 3);
    let table = random(&mut rng, vocab * dim, 1.0);
    let ids = [4u32, 0, 4, 2, 4];
    let build = |t: &mut Tape, v: &[Var]| t.embedding(v[0], &ids).unwrap();
    let inputs = vec![(table.clone(), vec![vocab, dim])];
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&id| {
            table[id as usize * dim..(id as usize + 1) * dim]
                .iter()
                .map(|&v| v as f64)
        })
        .collect();
    assert_close(&forward(&build, &inputs), &want, 0.0);
    grad_check(&build, inputs, 1e-2, 1e-2);
}

#[test]
fn embedding_rejects_out_of_range_id() {
    let mut tape = Tape::new();
    let table = tape.param(0, &[1.0; 6], &[3, 2]).unwrap();
    let err = tape.embedding(table, &[0, 3]).unwrap_err();
    assert!(
        matches!(err, HaloError::InvalidShape(ref m) if m.contains("id 3")),
        "{err}"
    );
}

#[test]
fn bias_add_residual_scale_sum_grads() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = random(&mut rng, 12, 1.0);
    let y = random(&mut rng, 12, 1.0);
    let b = random(&mut rng, 4, 1.0);
    let build = |t: &mut Tape, v: &[Var]| {
        let xb = t.add_bias(v[0], v[2]).unwrap();
        let s = t.add(xb, v[1]).unwrap();
        let s = t.add(s, s).unwrap(); // the same variable twice
        t.scale(s, -0.75).unwrap()
    };
    let inputs = vec![
        (x.clone(), vec![3, 4]),
        (y.clone(), vec![3, 4]),
        (b.clone(), vec![4]),
    ];
    let want: Vec<f64> = (0..12)
        .map(|i| -1.5 * (x[i] as f64 + b[i % 4] as f64 + y[i] as f64))
        .collect();
    assert_close(&forward(&build, &inputs), &want, 1e-6);
    grad_check(&build, inputs.clone(), 1e-2, 1e-2);
    let sum_build = |t: &mut Tape, v: &[Var]| t.sum(v[0]).unwrap();
    grad_check(&sum_build, inputs[..1].to_vec(), 1e-2, 1e-2);
}

fn layernorm_ref(x: &[f32], g: &[f32], b: &[f32], dim: usize) -> Vec<f64> {
    x.chunks(dim)
        .flat_map(|row| {
            let m = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            let var = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / dim as f64;
            let r = 1.0 / (var + 1e-5).sqrt();
            row.iter()
                .zip(g.iter().zip(b))
                .map(move |(&v, (&g, &b))| (v as f64 - m) * r * g as f64 + b as f64)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn layernorm_forward_and_grad() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (rows, dim) in [(1, 1), (1, 2), (4, 7), (3, 16)] {
        let x = random(&mut rng, rows * dim, 2.0);
        let g = random(&mut rng, dim, 1.5);
        let b = random(&mut rng, dim, 1.0);
        let build = |t: &mut Tape, v: &[Var]| t.layernorm(v[0], v[1], v[2], 1e-5).unwrap();
        let inputs = vec![
            (x.clone(), vec![rows, dim]),
            (g.clone(), vec![dim]),
            (b.clone(), vec![dim]),
        ];
        assert_close(
            &forward(&build, &inputs),
            &layernorm_ref(&x, &g, &b, dim),
            1e-5,
        );
        if dim > 2 {
            // (dim ≤ 2 normalizes every row to constants: the gradient is 0 up to rounding.)
            grad_check(&build, inputs, 1e-3, 2e-2);
        }
    }
}

#[test]
fn gelu_forward_and_grad() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut x = random(&mut rng, 37, 4.0);
    x.extend([0.0, -10.0, 10.0]);
    let build = |t: &mut Tape, v: &[Var]| t.gelu(v[0]).unwrap();
    let inputs = vec![(x.clone(), vec![40])];
    let want: Vec<f64> = x
        .iter()
        .map(|&v| {
            let v = v as f64;
            0.5 * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
        })
        .collect();
    assert_close(&forward(&build, &inputs), &want, 1e-5);
    grad_check(&build, inputs, 1e-3, 1e-2);
}

/// Plain f64 causal attention on `qkv: [batch·seq, 3C]`.
fn attention_ref(qkv: &[f32], batch: usize, seq: usize, n_head: usize, c: usize) -> Vec<f64> {
    let hd = c / n_head;
    let at = |b: usize, t: usize, part: usize, h: usize, d: usize| {
        qkv[(b * seq + t) * 3 * c + part * c + h * hd + d] as f64
    };
    let mut out = vec![0.0; batch * seq * c];
    for b in 0..batch {
        for h in 0..n_head {
            for i in 0..seq {
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|d| at(b, i, 0, h, d) * at(b, j, 1, h, d))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for d in 0..hd {
                    out[(b * seq + i) * c + h * hd + d] = (0..=i)
                        .map(|j| (scores[j] - max).exp() / total * at(b, j, 2, h, d))
                        .sum();
                }
            }
        }
    }
    out
}

#[test]
fn causal_attention_forward_and_grad() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (batch, seq, n_head, c) in [(1, 1, 1, 2), (2, 5, 2, 6), (1, 7, 3, 3), (3, 4, 1, 4)] {
        let qkv = random(&mut rng, batch * seq * 3 * c, 1.5);
        let build = move |t: &mut Tape, v: &[Var]| {
            t.causal_self_attention(v[0], batch, seq, n_head).unwrap()
        };
        let inputs = vec![(qkv.clone(), vec![batch * seq, 3 * c])];
        assert_close(
            &forward(&build, &inputs),
            &attention_ref(&qkv, batch, seq, n_head, c),
            1e-5,
        );
        grad_check(&build, inputs, 1e-2, 1e-2);
    }
}

#[test]
fn attention_ignores_future_tokens() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (seq, c) = (6, 4);
    let qkv = random(&mut rng, seq * 3 * c, 1.0);
    let mut changed = qkv.clone();
    for v in &mut changed[(seq - 1) * 3 * c..] {
        *v += 3.0; // only the last position changes
    }
    let run = |q: &[f32]| {
        let mut t = Tape::new();
        let x = t.constant(q, &[seq, 3 * c]).unwrap();
        let y = t.causal_self_attention(x, 1, seq, 2).unwrap();
        t.value(y).to_vec()
    };
    let (a, b) = (run(&qkv), run(&changed));
    assert_eq!(a[..(seq - 1) * c], b[..(seq - 1) * c]);
    assert_ne!(a[(seq - 1) * c..], b[(seq - 1) * c..]);
}

#[test]
fn token_logprobs_forward_and_grad() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (rows, vocab) in [(1, 1), (4, 7), (5, 33)] {
        let z = random(&mut rng, rows * vocab, 3.0);
        let labels: Vec<i32> = (0..rows)
            .map(|r| {
                if r == 1 {
                    IGNORE_INDEX
                } else {
                    rng.gen_range(0..vocab as i32)
                }
            })
            .collect();
        let lab = labels.clone();
        let build = move |t: &mut Tape, v: &[Var]| t.token_logprobs(v[0], &lab).unwrap();
        let inputs = vec![(z.clone(), vec![rows, vocab])];
        let want: Vec<f64> = (0..rows)
            .map(|r| {
                if labels[r] == IGNORE_INDEX {
                    return 0.0;
                }
                let row = &z[r * vocab..(r + 1) * vocab];
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&v| (v as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                row[labels[r] as usize] as f64 - lse
            })
            .collect();
        assert_close(&forward(&build, &inputs), &want, 1e-5);
        grad_check(&build, inputs, 1e-2, 1e-2);
    }
}

#[test]
fn dropout_scales_kept_values_and_grad_uses_same_mask() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let x = random(&mut rng, 400, 1.0);
    let build = |t: &mut Tape, v: &[Var]| t.dropout(v[0], 0.25).unwrap();
    let y = forward(&build, &[(x.clone(), vec![400])]);
    let dropped = y.iter().filter(|&&v| v == 0.0).count();
    assert!(
        (60..140).contains(&dropped),
        "dropped {dropped} of 400 at p = 0.25"
    );
    for (&yi, &xi) in y.iter().zip(&x) {
        assert!(yi == 0.0 || (yi - xi / 0.75).abs() < 1e-6);
    }
    grad_check(&build, vec![(x[..30].to_vec(), vec![30])], 1e-2, 1e-2);
    // Off on an inference tape: identity, no node recorded.
    let mut t = Tape::inference();
    let v = t.constant(&x, &[400]).unwrap();
    assert_eq!(t.dropout(v, 0.25).unwrap(), v);
    assert!(t.dropout(v, 1.0).is_err());
}

#[test]
fn composed_block_grad() {
    // ln → linear → gelu → linear → residual, the MLP half of a GPT-2 block.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (rows, c) = (3, 4);
    let inputs = vec![
        (random(&mut rng, rows * c, 1.0), vec![rows, c]),
        (random(&mut rng, c, 1.0), vec![c]),
        (random(&mut rng, c, 1.0), vec![c]),
        (random(&mut rng, c * 8, 0.5), vec![c, 8]),
        (random(&mut rng, 8, 0.5), vec![8]),
        (random(&mut rng, 8 * c, 0.5), vec![8, c]),
    ];
    let build = |t: &mut Tape, v: &[Var]| {
        let h = t.layernorm(v[0], v[1], v[2], 1e-5).unwrap();
        let f = t.linear(h, v[3], Some(v[4])).unwrap();
        let f = t.gelu(f).unwrap();
        let f = t.linear(f, v[5], None).unwrap();
        t.add(v[0], f).unwrap()
    };
    grad_check(&build, inputs, 1e-3, 2e-2);
}

#[test]
fn tape_misuse_is_an_error() {
    let mut t = Tape::new();
    let x = t.param(0, &[1.0, 2.0], &[2]).unwrap();
    let s = t.sum(x).unwrap();
    assert!(matches!(
        t.backward(s, &[1.0, 1.0]),
        Err(HaloError::LengthMismatch { .. })
    ));
    let g = t.backward_scalar(s).unwrap();
    assert_eq!(g.get(0).unwrap(), &[1.0, 1.0]);
    assert_eq!(t.value(s), &[3.0]); // the output stays readable
    assert!(t.value(x).is_empty()); // everything else was freed
    assert!(matches!(t.backward_scalar(s), Err(HaloError::Autograd(_))));
    assert!(t.param(1, &[1.0], &[2]).is_err());
    let mut other = Tape::new();
    assert!(matches!(
        other.sum(Var::from_index(5)),
        Err(HaloError::Autograd(_))
    ));
    let mut t = Tape::new();
    let a = t.constant(&[1.0; 6], &[2, 3]).unwrap();
    let b = t.constant(&[1.0; 6], &[3, 2]).unwrap();
    assert!(matches!(t.add(a, b), Err(HaloError::InvalidShape(_))));
    assert!(matches!(
        t.linear(a, a, None),
        Err(HaloError::InvalidShape(_))
    ));
}

#[test]
fn backward_many_sums_the_gradients_of_several_outputs() {
    let x = [0.5f32, -1.0, 2.0];
    let mut t = Tape::new();
    let v = t.param(0, &x, &[3]).unwrap();
    let a = t.scale(v, 2.0).unwrap();
    let g = t.gelu(v).unwrap();
    let b = t.sum(g).unwrap();
    let grads = t
        .backward_many(&[(a, &[1.0, 1.0, 1.0]), (b, &[3.0])])
        .unwrap();
    let mut single = Tape::new();
    let v1 = single.param(0, &x, &[3]).unwrap();
    let g1 = single.gelu(v1).unwrap();
    let b1 = single.sum(g1).unwrap();
    let gelu_grad = single.backward_scalar(b1).unwrap();
    for (j, &d) in grads.get(0).unwrap().iter().enumerate() {
        assert!((d - (2.0 + 3.0 * gelu_grad.get(0).unwrap()[j])).abs() < 1e-6);
    }
    assert_eq!(t.value(a).len(), 3);
    assert_eq!(t.value(b).len(), 1);
}

#[test]
fn token_logprobs_grad_when_logits_have_two_readers() {
    // Two readers: the backward cannot recycle the logits buffer and takes the copying path.
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (rows, vocab) = (3, 6);
    let z = random(&mut rng, rows * vocab, 2.0);
    let build = |t: &mut Tape, v: &[Var]| {
        let a = t.token_logprobs(v[0], &[1, IGNORE_INDEX, 5]).unwrap();
        let b = t.token_logprobs(v[0], &[0, 2, 5]).unwrap();
        t.add(a, b).unwrap()
    };
    grad_check(&build, vec![(z, vec![rows, vocab])], 1e-2, 1e-2);
}
