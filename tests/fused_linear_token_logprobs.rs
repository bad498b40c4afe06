//! The fused LM head's forward and backward against the materialized path (an f64 matmul in the
//! test, then the existing `cpu::token_logprobs` / backward), f64 references and finite
//! differences, at awkward sizes; determinism across thread counts; bad input.

mod fused_support;

use fused_support::{grad_logp, logits_f64, logprobs_f64, materialized, max_abs_diff, Problem};
use half::{bf16, f16};
use halo_kernels::fused_head::{
    fused_linear_token_logprobs, fused_linear_token_logprobs_backward, FusedChunks, FusedHeadGrads,
    FusedTokenLogprobs, LmHead,
};
use halo_kernels::{HaloError, LogitElement, IGNORE_INDEX};

fn forward<T: LogitElement>(p: &Problem<T>, chunks: Option<FusedChunks>) -> FusedTokenLogprobs {
    fused_linear_token_logprobs(&p.hidden, &p.head(), &p.labels, IGNORE_INDEX, chunks).unwrap()
}

fn backward<T: LogitElement>(
    p: &Problem<T>,
    f: &FusedTokenLogprobs,
    g: &[f32],
    chunks: Option<FusedChunks>,
) -> FusedHeadGrads {
    fused_linear_token_logprobs_backward(
        &p.hidden,
        &p.head(),
        &p.labels,
        IGNORE_INDEX,
        &f.row_max,
        &f.ln_sum,
        g,
        chunks,
    )
    .unwrap()
}

/// (rows, vocab, h, chunks): V not a multiple of the tile, H odd, one row, tiles larger than the
/// problem, the default tiling over more than one vocab tile.
fn shapes() -> Vec<(usize, usize, usize, Option<FusedChunks>)> {
    let c = |row_tile, vocab_tile, vocab_groups| {
        Some(FusedChunks {
            row_tile,
            vocab_tile,
            vocab_groups,
        })
    };
    vec![
        (5, 13, 7, c(2, 4, 3)),
        (1, 13, 7, c(2, 4, 2)),
        (9, 31, 33, c(4, 8, 8)),
        (3, 5, 1, c(64, 64, 1)),
        (7, 2053, 9, None),
        (37, 4099, 17, None),
    ]
}

fn against_materialized<T: LogitElement>(tol_logp: f64, tol_grad: f64) {
    for (i, (rows, vocab, h, chunks)) in shapes().into_iter().enumerate() {
        for bias in [false, true] {
            let p = Problem::<T>::random(i as u64 * 2 + bias as u64, rows, vocab, h, bias, 3);
            let g = grad_logp(99 + i as u64, &p.labels);
            let f = forward(&p, chunks);
            let (logp, dh, dw, db) = materialized(&p, &g);
            let (logp64, lse64) = logprobs_f64(&p.logits_f64(), &p.labels, vocab);
            let ctx = format!("{:?} rows {rows} vocab {vocab} h {h} bias {bias}", T::DTYPE);
            let d = max_abs_diff(
                f.logp.iter().map(|&x| x as f64),
                logp.iter().map(|&x| x as f64),
            );
            assert!(d < tol_logp, "{ctx}: logp vs materialized {d}");
            let d = max_abs_diff(f.logp.iter().map(|&x| x as f64), logp64.iter().copied());
            assert!(d < tol_logp, "{ctx}: logp vs f64 {d}");
            let d = max_abs_diff(f.lse.iter().map(|&x| x as f64), lse64.iter().copied());
            assert!(d < tol_logp, "{ctx}: lse vs f64 {d}");
            for (r, &y) in p.labels.iter().enumerate() {
                if y == IGNORE_INDEX {
                    assert_eq!((f.logp[r], f.lse[r]), (0.0, 0.0), "{ctx}: ignored row {r}");
                }
            }
            let grads = backward(&p, &f, &g, chunks);
            let d = max_abs_diff(grads.hidden.iter().map(|&x| x as f64), dh);
            assert!(d < tol_grad, "{ctx}: ∂hidden {d}");
            let d = max_abs_diff(grads.weight.iter().map(|&x| x as f64), dw);
            assert!(d < tol_grad, "{ctx}: ∂weight {d}");
            match grads.bias {
                Some(b) => {
                    assert!(bias);
                    let d = max_abs_diff(b.iter().map(|&x| x as f64), db);
                    assert!(d < tol_grad, "{ctx}: ∂bias {d}");
                }
                None => assert!(!bias),
            }
        }
    }
}

#[test]
fn f32_matches_the_materialized_path_and_f64() {
    against_materialized::<f32>(2e-5, 2e-5);
}

#[test]
fn bf16_matches_the_materialized_path_and_f64() {
    // Inputs are bf16, but both sides compute from the same stored values in ≥ f32.
    against_materialized::<bf16>(2e-5, 2e-5);
}

#[test]
fn f16_matches_the_materialized_path_and_f64() {
    against_materialized::<f16>(2e-5, 2e-5);
}

/// `L = Σ_r c_r logp_r` in f64 from the raw parameters.
fn loss_f64(
    hidden: &[f64],
    weight: &[f64],
    bias: Option<&[f64]>,
    labels: &[i32],
    c: &[f32],
    vocab: usize,
    h: usize,
) -> f64 {
    let z = logits_f64(hidden, weight, bias, labels.len(), vocab, h);
    let (logp, _) = logprobs_f64(&z, labels, vocab);
    logp.iter().zip(c).map(|(l, &c)| l * c as f64).sum()
}

#[test]
fn gradients_match_finite_differences() {
    for (seed, bias) in [(1u64, true), (2, false)] {
        let p = Problem::<f32>::random(seed, 5, 13, 7, bias, 4);
        let c = grad_logp(seed + 10, &p.labels);
        let chunks = Some(FusedChunks {
            row_tile: 2,
            vocab_tile: 5,
            vocab_groups: 2,
        });
        let grads = backward(&p, &forward(&p, chunks), &c, chunks);
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
                loss_f64(&hp, &wp, bp.as_deref(), &p.labels, &c, p.vocab, p.h)
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

#[test]
fn large_logits_keep_their_precision() {
    // Logits near 1000 (a bias of 1000): one f32 lse there is only good to ~6e-5; with the row
    // max and log-sum kept apart the log-probs and the softmax recompute stay at f32 precision.
    // Values on a coarse grid, so that every logit is exact in f32 as in f64: what is measured is
    // the op's arithmetic, not the rounding of the logits themselves (ulp(1000) = 6e-5).
    let mut p = Problem::<f32>::random(5, 6, 37, 11, true, 0);
    let grid =
        |v: &mut Vec<f32>, step: f32| v.iter_mut().for_each(|x| *x = (*x / step).round() * step);
    grid(&mut p.hidden, 0.5);
    grid(&mut p.weight, 0.25);
    let bias = p.bias.as_mut().unwrap();
    grid(bias, 1.0 / 16.0);
    bias.iter_mut().for_each(|b| *b += 1000.0);
    let g = grad_logp(6, &p.labels);
    let f = forward(
        &p,
        Some(FusedChunks {
            row_tile: 4,
            vocab_tile: 8,
            vocab_groups: 3,
        }),
    );
    let z = p.logits_f64();
    let (logp64, _) = logprobs_f64(&z, &p.labels, p.vocab);
    let d = max_abs_diff(f.logp.iter().map(|&x| x as f64), logp64);
    assert!(d < 3e-6, "logp at 1000: {d}");
    let grads = backward(&p, &f, &g, None);
    // ∂bias_v = Σ_r g_r (1[v = y_r] − p_rv), in f64.
    let mut db = vec![0.0f64; p.vocab];
    for (r, &y) in p.labels.iter().enumerate() {
        let row = &z[r * p.vocab..(r + 1) * p.vocab];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|x| (x - m).exp()).sum();
        for v in 0..p.vocab {
            db[v] += g[r] as f64 * ((v as i32 == y) as u8 as f64 - (row[v] - m).exp() / s);
        }
    }
    let d = max_abs_diff(grads.bias.unwrap().iter().map(|&x| x as f64), db);
    assert!(d < 1e-6, "∂bias at 1000: {d}");
}

#[test]
fn ignored_rows_are_not_read_and_get_no_gradient() {
    let mut p = Problem::<f32>::random(7, 6, 19, 5, true, 2);
    // Rows 0, 2, 4 are ignored: garbage there must change nothing.
    for r in [0, 2, 4] {
        p.hidden[r * 5..(r + 1) * 5].fill(f32::NAN);
    }
    let g = grad_logp(8, &p.labels);
    let f = forward(&p, None);
    assert!(f.logp.iter().chain(&f.lse).all(|x| x.is_finite()));
    let mut row_max = f.row_max.clone();
    row_max[0] = f32::NAN; // saved values of ignored rows are not read either
    let grads = fused_linear_token_logprobs_backward(
        &p.hidden,
        &p.head(),
        &p.labels,
        IGNORE_INDEX,
        &row_max,
        &f.ln_sum,
        &g,
        None,
    )
    .unwrap();
    assert!(grads
        .weight
        .iter()
        .chain(&grads.hidden)
        .all(|x| x.is_finite()));
    for r in [0, 2, 4] {
        assert!(grads.hidden[r * 5..(r + 1) * 5].iter().all(|&x| x == 0.0));
    }
}

#[test]
fn all_rows_ignored_give_zeros() {
    let mut p = Problem::<bf16>::random(9, 4, 11, 3, true, 1);
    p.hidden.fill(bf16::NAN);
    let f = forward(&p, None);
    assert!(f.logp.iter().chain(&f.lse).all(|&x| x == 0.0));
    let grads = backward(&p, &f, &[0.0; 4], None);
    assert!(grads
        .hidden
        .iter()
        .chain(&grads.weight)
        .chain(grads.bias.as_ref().unwrap())
        .all(|&x| x == 0.0));
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn same_bits_for_any_thread_count() {
    let p = Problem::<bf16>::random(11, 67, 3001, 24, true, 5);
    let g = grad_logp(12, &p.labels);
    let run = |threads: usize, chunks: Option<FusedChunks>| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let f = forward(&p, chunks);
            let b = backward(&p, &f, &g, chunks);
            (
                bits(&f.logp),
                bits(&f.lse),
                bits(&b.hidden),
                bits(&b.weight),
                bits(b.bias.as_ref().unwrap()),
            )
        })
    };
    for chunks in [
        None,
        Some(FusedChunks {
            row_tile: 8,
            vocab_tile: 256,
            vocab_groups: 5,
        }),
    ] {
        let one = run(1, chunks);
        for threads in [2, 3, 8] {
            assert!(one == run(threads, chunks), "{threads} threads, {chunks:?}");
        }
        assert!(one == run(1, chunks), "run to run");
    }
}

#[test]
fn bad_input_is_an_error() {
    let p = Problem::<f32>::random(13, 4, 9, 3, true, 0);
    let head = p.head();
    let call = |hidden: &[f32], head: &LmHead<'_, f32>, labels: &[i32], chunks| {
        fused_linear_token_logprobs(hidden, head, labels, IGNORE_INDEX, chunks).unwrap_err()
    };
    assert!(matches!(
        call(&p.hidden[1..], &head, &p.labels, None),
        HaloError::LengthMismatch { what: "hidden", .. }
    ));
    let short = LmHead {
        weight: &p.weight[1..],
        ..head
    };
    assert!(matches!(
        call(&p.hidden, &short, &p.labels, None),
        HaloError::LengthMismatch { what: "weight", .. }
    ));
    let bias = LmHead {
        bias: Some(&p.weight[..3]),
        ..head
    };
    assert!(matches!(
        call(&p.hidden, &bias, &p.labels, None),
        HaloError::LengthMismatch { what: "bias", .. }
    ));
    let zero = LmHead { vocab: 0, ..head };
    assert!(matches!(
        call(&p.hidden, &zero, &p.labels, None),
        HaloError::InvalidShape(_)
    ));
    let zero_h = LmHead {
        hidden_size: 0,
        ..head
    };
    assert!(matches!(
        call(&[], &zero_h, &p.labels, None),
        HaloError::InvalidShape(_)
    ));
    assert!(matches!(
        call(&p.hidden, &head, &[0, 9, 1, 2], None),
        HaloError::LabelOutOfRange {
            row: 1,
            label: 9,
            ..
        }
    ));
    let bad_chunks = Some(FusedChunks {
        row_tile: 0,
        vocab_tile: 4,
        vocab_groups: 1,
    });
    assert!(matches!(
        call(&p.hidden, &head, &p.labels, bad_chunks),
        HaloError::InvalidShape(_)
    ));

    let mut hidden = p.hidden.clone();
    hidden[2 * 3 + 1] = f32::INFINITY;
    assert_eq!(
        call(&hidden, &head, &p.labels, None),
        HaloError::NonFinite {
            what: "hidden",
            row: 2
        }
    );
    let mut weight = p.weight.clone();
    weight[5 * 3] = f32::NAN;
    let w = LmHead {
        weight: &weight,
        ..head
    };
    assert_eq!(
        call(&p.hidden, &w, &p.labels, None),
        HaloError::NonFinite {
            what: "weight",
            row: 5
        }
    );
    let mut b = p.bias.clone().unwrap();
    b[7] = f32::NEG_INFINITY;
    let bh = LmHead {
        bias: Some(&b),
        ..head
    };
    assert_eq!(
        call(&p.hidden, &bh, &p.labels, None),
        HaloError::NonFinite {
            what: "bias",
            row: 7
        }
    );
    // Finite inputs whose product overflows f32.
    let huge: Vec<f32> = p.hidden.iter().map(|x| x.signum() * 1e30).collect();
    let big_w: Vec<f32> = p.weight.iter().map(|x| x.signum() * 1e30).collect();
    let hw = LmHead {
        weight: &big_w,
        ..head
    };
    assert!(matches!(
        call(&huge, &hw, &p.labels, None),
        HaloError::NonFinite {
            what: "logits (hidden · weightᵀ + bias)",
            row: 0
        }
    ));

    // Backward: the saved values and ∂L/∂logp of counted rows.
    let f = forward(&p, None);
    let mut g = vec![0.5f32; 4];
    g[3] = f32::NAN;
    let err = fused_linear_token_logprobs_backward(
        &p.hidden,
        &head,
        &p.labels,
        IGNORE_INDEX,
        &f.row_max,
        &f.ln_sum,
        &g,
        None,
    );
    assert_eq!(
        err.unwrap_err(),
        HaloError::NonFinite {
            what: "grad_logp",
            row: 3
        }
    );
    let err = fused_linear_token_logprobs_backward(
        &p.hidden,
        &head,
        &p.labels,
        IGNORE_INDEX,
        &f.row_max[1..],
        &f.ln_sum,
        &g,
        None,
    );
    assert!(matches!(
        err.unwrap_err(),
        HaloError::LengthMismatch {
            what: "row_max",
            ..
        }
    ));
    let err = fused_linear_token_logprobs_backward(
        &hidden,
        &head,
        &p.labels,
        IGNORE_INDEX,
        &f.row_max,
        &f.ln_sum,
        &[0.5; 4],
        None,
    );
    assert_eq!(
        err.unwrap_err(),
        HaloError::NonFinite {
            what: "hidden",
            row: 2
        }
    );
}
