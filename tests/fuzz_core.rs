//! Fuzz targets of the core crate (harness: `fuzz_support`): the token forward and backward on the
//! CPU and on the CUDA device (the emulated one without a GPU) in f32/bf16/f16, the sequence sums (padded and
//! packed layouts), every loss (KTO with each KL input, the DPO family, ORPO, SimPO, the reference
//! point partials) and the step helpers from logits. Inputs are hostile on purpose: mismatched
//! lengths, absurd sizes, NaN/±inf and huge finite values, labels out of range, empty batches,
//! all-ignored rows, bad hyper-parameters. An accepted input must give finite output; the token
//! forward and the sums are also checked against an f64 reference written here.
//!
//! `HALO_FUZZ_SECONDS=60 cargo test --release --test fuzz_core -- --nocapture` fuzzes longer;
//! `scripts/fuzz.sh` prints the counts of every target as one table.

mod device_support;
mod fuzz_support;

use device_support::{cuda, Cpu, Device, SplitCuda};
use fuzz_support::{fuzz, Gen, Outcome};
use half::{bf16, f16};
use halo_kernels::cpu::{LogRatioClamp, SequenceLayout, SequenceSums, TokenLogprobs};
use halo_kernels::cuda::{CudaLogit, RowSplit};
use halo_kernels::losses::{
    self, DpoConfig, DpoLossType, FDivergence, KlInput, KtoBatch, KtoConfig, KtoLossType,
    LossMetrics, OrpoConfig, PairBatch, PairLossOutput, ReferenceFreePairBatch,
    ReferencePointPartial, SimpoConfig,
};
use halo_kernels::step::{self, KtoStepInputs, Logits, PairReference};
use halo_kernels::{LogitElement, IGNORE_INDEX};

// ---- shared input pieces ---------------------------------------------------------------------

/// Mostly the usual ignore index, sometimes another one (any `i32` is allowed).
fn ignore_index(g: &mut Gen) -> i32 {
    if g.chance(0.9) {
        IGNORE_INDEX
    } else {
        g.pick(&[-1, 0, 1, i32::MIN, i32::MAX])
    }
}

/// `rows` labels over `vocab`: ignored with probability 0.3, out of range now and then.
fn labels(g: &mut Gen, rows: usize, vocab: usize, ignore: i32) -> Vec<i32> {
    let all_ignored = g.chance(0.05);
    (0..rows)
        .map(|_| {
            if all_ignored || g.chance(0.3) {
                ignore
            } else if g.chance(0.02) || vocab == 0 {
                g.pick(&[
                    -1,
                    -100,
                    i32::MIN,
                    i32::MAX,
                    vocab.min(i32::MAX as usize) as i32,
                ])
            } else {
                g.draw(0..vocab.min(i32::MAX as usize) as i32)
            }
        })
        .collect()
}

/// A length that is `len`, or (with probability `p`) one off or empty.
fn maybe_wrong_len(g: &mut Gen, len: usize, p: f64) -> usize {
    if g.chance(p) {
        g.pick(&[0, len + 1, len.saturating_sub(1), len * 2 + 1])
    } else {
        len
    }
}

/// Log-prob-like values (≤ 0 mostly), some special, some huge.
fn logps(g: &mut Gen, len: usize) -> Vec<f32> {
    let range = if g.chance(0.05) {
        -3e38f32..3e38
    } else if g.chance(0.1) {
        -1e4..10.0
    } else {
        -60.0..0.0
    };
    g.f32_vec(len, range, 0.01)
}

fn finite_metrics(metrics: &LossMetrics) -> Outcome {
    let named = metrics.to_named();
    match named.iter().find(|(_, v)| !v.is_finite()) {
        Some((name, v)) => Outcome::NonFinite(format!("metric {name} = {v}")),
        None => Outcome::Accepted,
    }
}

fn f64s(values: &[f32]) -> impl Iterator<Item = f64> + '_ {
    values.iter().map(|&v| v as f64)
}

// ---- token forward ---------------------------------------------------------------------------

/// One token-forward input: logits `[rows, vocab]` in `T`, labels, vocab, ignore index.
fn token_forward_input<T: LogitElement>(g: &mut Gen) -> (Vec<T>, Vec<i32>, usize, i32) {
    let vocab = if g.chance(0.9) {
        g.pick(&[1, 2, 3, 7, 8, 9, 16, 31, 64, 100, 257])
    } else {
        g.pick(&[0, usize::MAX, 1 << 40, usize::MAX / 2 + 1])
    };
    let rows = g.size(40);
    let ignore = ignore_index(g);
    let labels = labels(g, rows, vocab, ignore);
    let len = if vocab > 1 << 20 {
        g.pick(&[0, 1, 3])
    } else {
        maybe_wrong_len(g, rows * vocab, 0.05)
    };
    let scale = g.pick(&[1.0f32, 10.0, 100.0, 1e3, 1e5, 3e38]);
    let logits = g
        .f32_vec(len, -scale..scale, 0.003)
        .into_iter()
        .map(T::from_f32)
        .collect();
    (logits, labels, vocab, ignore)
}

/// The forward of `T` on device `d`, checked against `log_softmax` in f64.
fn token_forward<T: CudaLogit, D: Device>(g: &mut Gen, d: &D) -> Outcome {
    let (logits, labels, vocab, ignore) = token_forward_input::<T>(g);
    g.show("vocab, ignore", &(vocab, ignore));
    g.show("labels", &labels);
    g.show("logits", &logits);
    let result = d.token_logprobs(&logits, &labels, vocab, ignore);
    Outcome::of(result, |out| {
        check_token_forward(&logits, &labels, vocab, ignore, out)
    })
}

fn check_token_forward<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    ignore: i32,
    out: &TokenLogprobs,
) -> Outcome {
    if out.logp.len() != labels.len() || out.lse.len() != labels.len() {
        return Outcome::Wrong(format!(
            "output lengths {} / {}",
            out.logp.len(),
            out.lse.len()
        ));
    }
    for (row, &label) in labels.iter().enumerate() {
        if label == ignore {
            if out.logp[row] != 0.0 || out.lse[row] != 0.0 {
                return Outcome::Wrong(format!("ignored row {row}: logp/lse not 0"));
            }
            continue;
        }
        let z: Vec<f64> = logits[row * vocab..(row + 1) * vocab]
            .iter()
            .map(|v| v.to_f32() as f64)
            .collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        let logp = z[label as usize] - lse;
        if !out.logp[row].is_finite() || !out.lse[row].is_finite() {
            if logp < f32::MIN as f64 {
                return Outcome::NonFinite(format!(
                    "row {row}: logp = z[y] - lse = {logp:e} is beyond f32 and stored as {}: \
                     must be the error NonFinite {{ what: \"logits\" }}",
                    out.logp[row]
                ));
            }
            return Outcome::NonFinite(format!(
                "row {row}: logp {} lse {}",
                out.logp[row], out.lse[row]
            ));
        }
        // f32 accumulation over `vocab` terms, relative to the magnitudes involved.
        let tol = 1e-4 + 1e-6 * (vocab as f64) + 4e-6 * (max.abs() + logp.abs());
        if (out.lse[row] as f64 - lse).abs() > tol || (out.logp[row] as f64 - logp).abs() > tol {
            return Outcome::Wrong(format!(
                "wrong answer at row {row}: logp {} lse {} vs f64 {logp} {lse}",
                out.logp[row], out.lse[row]
            ));
        }
    }
    Outcome::Accepted
}

#[test]
fn fuzz_token_forward_cpu_f32() {
    fuzz("fuzz_token_forward_cpu_f32", |g| {
        token_forward::<f32, _>(g, &Cpu)
    });
}

#[test]
fn fuzz_token_forward_cpu_bf16() {
    fuzz("fuzz_token_forward_cpu_bf16", |g| {
        token_forward::<bf16, _>(g, &Cpu)
    });
}

#[test]
fn fuzz_token_forward_cpu_f16() {
    fuzz("fuzz_token_forward_cpu_f16", |g| {
        token_forward::<f16, _>(g, &Cpu)
    });
}

/// Half the CUDA token inputs run with a forced row split (2 to 9 blocks per row, so slices of a
/// fuzzed row are small, sometimes empty): the automatic choice never splits rows this short.
fn forced_split(g: &mut Gen) -> Option<SplitCuda> {
    g.chance(0.5).then(|| {
        let split = RowSplit::Fixed(g.draw(2..10usize));
        g.show("row split", &split);
        SplitCuda { split }
    })
}

/// The CUDA forward, the emulated device without a GPU; one dtype per input.
#[test]
fn fuzz_token_forward_cuda() {
    fuzz("fuzz_token_forward_cuda", |g| {
        if let Some(split) = forced_split(g) {
            return match g.draw(0..3u8) {
                0 => token_forward::<f32, _>(g, &split),
                1 => token_forward::<bf16, _>(g, &split),
                _ => token_forward::<f16, _>(g, &split),
            };
        }
        match g.draw(0..3u8) {
            0 => token_forward::<f32, _>(g, cuda()),
            1 => token_forward::<bf16, _>(g, cuda()),
            _ => token_forward::<f16, _>(g, cuda()),
        }
    });
}

// ---- token backward --------------------------------------------------------------------------

/// The backward of `T` on device `d` (separate output or in place): logits and labels as for the
/// forward; the saved lse the CPU forward's (when it accepts them), shifted, replaced by NaN/±inf or
/// by any float, with or without its residual; `grad_logp` ordinary, huge or non-finite. An accepted
/// input must give finite gradients equal to `g (1[v = y] − exp(z − lse − residual))` (in f64) to the
/// storage dtype's rounding, and exact zeros in ignored rows.
fn token_backward<T: CudaLogit, D: Device>(g: &mut Gen, d: &D) -> Outcome {
    let (logits, labels, vocab, ignore) = token_forward_input::<T>(g);
    let rows = labels.len();
    let (mut lse, mut residual) =
        match halo_kernels::cpu::token_logprobs(&logits, &labels, vocab, ignore) {
            Ok(out) => (out.lse, out.lse_residual),
            Err(_) => (logps(g, rows), vec![0.0; rows]),
        };
    if g.chance(0.2) {
        let shift = g.pick(&[
            1e-4f32,
            -1e-4,
            1e-2,
            -0.5,
            3.0,
            -1e3,
            f32::NAN,
            f32::INFINITY,
        ]);
        let row = g.draw(0..rows.max(1));
        if let Some(v) = lse.get_mut(row) {
            *v += shift;
        }
    }
    if g.chance(0.05) {
        let len = maybe_wrong_len(g, rows, 0.3);
        lse = g.f32_vec(len, -1e4..1e4, 0.05);
    }
    if g.chance(0.05) {
        let len = maybe_wrong_len(g, rows, 0.3);
        residual = g.f32_vec(len, -1e-3..1e-3, 0.05);
    }
    let with_residual = g.chance(0.8);
    let grad_scale = g.pick(&[1.0f32, 1e3, 6e4, 1e5, 1e30, 3e38]);
    let len = maybe_wrong_len(g, rows, 0.05);
    let grad_logp = g.f32_vec(len, -grad_scale..grad_scale, 0.01);
    let in_place = g.chance(0.5);
    g.show(
        "vocab, ignore, in place, residual",
        &(vocab, ignore, in_place, with_residual),
    );
    g.show("labels", &labels);
    g.show("logits", &logits);
    g.show("lse, residual", &(&lse, &residual));
    g.show("grad_logp", &grad_logp);
    let saved = if with_residual {
        halo_kernels::cpu::SavedLse::new(&lse[..], &residual[..])
    } else {
        halo_kernels::cpu::SavedLse::bare(&lse[..])
    };
    let mut grad = logits.clone();
    let result = if in_place {
        d.token_logprobs_backward_inplace(&mut grad, &labels, saved, &grad_logp, vocab, ignore)
    } else {
        d.token_logprobs_backward(
            &logits, &labels, saved, &grad_logp, vocab, ignore, &mut grad,
        )
    };
    Outcome::of(result, |_| {
        let residual = if with_residual {
            &residual[..]
        } else {
            &[][..]
        };
        check_token_backward(
            &logits, &labels, vocab, ignore, &lse, residual, &grad_logp, &grad,
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn check_token_backward<T: LogitElement>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
    ignore: i32,
    lse: &[f32],
    residual: &[f32],
    grad_logp: &[f32],
    grad: &[T],
) -> Outcome {
    // One rounding to the storage dtype, plus f32 arithmetic on exp's argument.
    // f16 stores values below 6.1e-5 as subnormals, 2^-24 apart.
    let (storage_rel, storage_abs) = match T::DTYPE {
        halo_kernels::DType::F32 => (1e-5, 1e-30),
        halo_kernels::DType::BF16 => (1.0 / 128.0, 1e-30),
        halo_kernels::DType::F16 => (1.0 / 1024.0, 2f64.powi(-24)),
    };
    for (row, &label) in labels.iter().enumerate() {
        let got = &grad[row * vocab..(row + 1) * vocab];
        if label == ignore {
            if let Some(v) = got.iter().position(|x| x.to_f32() != 0.0) {
                return Outcome::Wrong(format!("ignored row {row}: gradient[{v}] not 0"));
            }
            continue;
        }
        let g = grad_logp[row] as f64;
        let shift = lse[row] as f64 + residual.get(row).map_or(0.0, |&r| r as f64);
        for (v, (x, z)) in got
            .iter()
            .zip(&logits[row * vocab..(row + 1) * vocab])
            .enumerate()
        {
            let x = x.to_f32() as f64;
            if !x.is_finite() {
                return Outcome::NonFinite(format!("row {row} column {v}: gradient {x}"));
            }
            let p = (z.to_f32() as f64 - shift).exp();
            let want = g * (if v == label as usize { 1.0 } else { 0.0 } - p);
            // exp's argument carries f32 rounding of |z| and |lse|: relative error ~1e-6 of them.
            let arg_err = 2e-6 * (1.0 + (z.to_f32() as f64).abs() + shift.abs()) * p * g.abs();
            if (x - want).abs() > storage_rel * want.abs() + arg_err + 1e-6 * g.abs() + storage_abs
            {
                return Outcome::Wrong(format!(
                    "row {row} column {v}: gradient {x} vs f64 {want} (p {p}, g {g})"
                ));
            }
        }
    }
    Outcome::Accepted
}

#[test]
fn fuzz_token_backward_cpu() {
    fuzz("fuzz_token_backward_cpu", |g| match g.draw(0..3u8) {
        0 => token_backward::<f32, _>(g, &Cpu),
        1 => token_backward::<bf16, _>(g, &Cpu),
        _ => token_backward::<f16, _>(g, &Cpu),
    });
}

/// The CUDA backward, the emulated device without a GPU; one dtype per input.
#[test]
fn fuzz_token_backward_cuda() {
    fuzz("fuzz_token_backward_cuda", |g| {
        if let Some(split) = forced_split(g) {
            return match g.draw(0..3u8) {
                0 => token_backward::<f32, _>(g, &split),
                1 => token_backward::<bf16, _>(g, &split),
                _ => token_backward::<f16, _>(g, &split),
            };
        }
        match g.draw(0..3u8) {
            0 => token_backward::<f32, _>(g, cuda()),
            1 => token_backward::<bf16, _>(g, cuda()),
            _ => token_backward::<f16, _>(g, cuda()),
        }
    });
}

// ---- sequence sums ---------------------------------------------------------------------------

/// A layout and its row count: consistent most of the time, else hostile.
fn layout(g: &mut Gen, offsets: &mut Vec<u32>) -> (bool, usize, usize) {
    // (packed, batch, seq) — for packed, `offsets` receives cu_seqlens.
    if g.chance(0.5) {
        if g.chance(0.1) {
            let mut batch = g.hostile_usize();
            // An allowed batch beyond 2^16 empty sequences is a real output of that size, built in
            // seconds: one such input would eat a target's budget. Past the limit (2^31 − 1) it
            // must be refused at once, whatever the size.
            if (1 << 16..=halo_kernels::cpu::MAX_SEQUENCES).contains(&batch) {
                batch = g.pick(&[1 << 16, halo_kernels::cpu::MAX_SEQUENCES + 1]);
            }
            let seq = if g.chance(0.7) { 0 } else { g.hostile_usize() };
            return (false, batch, seq);
        }
        return (false, g.size(6), g.size(8));
    }
    let batch = g.size(6);
    offsets.push(0);
    for _ in 0..batch {
        let len = g.size(6) as u32;
        offsets.push(offsets.last().unwrap() + len);
    }
    if g.chance(0.15) {
        match g.draw(0..5u8) {
            0 => offsets.clear(),
            1 => offsets.truncate(1),
            2 => {
                let i = g.draw(0..offsets.len());
                offsets[i] = g.pick(&[0, 1, u32::MAX, offsets[i].wrapping_add(3)]);
            }
            3 => offsets.reverse(),
            _ => offsets.push(u32::MAX),
        }
    }
    (true, batch, 0)
}

fn sums_reference(
    values: &[f64],
    labels: &[i32],
    ignore: i32,
    ranges: &[std::ops::Range<usize>],
) -> (Vec<f64>, Vec<u32>) {
    ranges
        .iter()
        .map(|r| {
            let counted: Vec<usize> = r.clone().filter(|&t| labels[t] != ignore).collect();
            (
                counted.iter().map(|&t| values[t]).sum::<f64>(),
                counted.len() as u32,
            )
        })
        .unzip()
}

fn check_sums(out: &SequenceSums, want: &(Vec<f64>, Vec<u32>), magnitude: &[f64]) -> Outcome {
    if out.counts != want.1 {
        return Outcome::Wrong(format!("wrong counts {:?} vs {:?}", out.counts, want.1));
    }
    for (i, (&got, &w)) in out.sums.iter().zip(&want.0).enumerate() {
        if !got.is_finite() {
            if w.abs() > f32::MAX as f64 {
                return Outcome::NonFinite(format!(
                    "sum {i} = {w:e} is beyond f32 and stored as {got}: must be the error \
                     `sequence sum (overflows f32)`"
                ));
            }
            return Outcome::NonFinite(format!("sums[{i}] = {got}"));
        }
        // One f32 rounding of an f64 sum, plus the f64 accumulation.
        if (got as f64 - w).abs() > 1e-6 * magnitude[i] + 1e-30 {
            return Outcome::Wrong(format!("wrong sum {i}: {got} vs f64 {w}"));
        }
    }
    Outcome::Accepted
}

/// One of the sequence ops (sums, log-ratio sums, broadcast, humanline mask) on a hostile layout.
fn sequence_ops<D: Device>(g: &mut Gen, d: &D) -> Outcome {
    let mut offsets = Vec::new();
    let (packed, batch, seq) = layout(g, &mut offsets);
    let layout = if packed {
        SequenceLayout::Packed {
            cu_seqlens: &offsets,
        }
    } else {
        SequenceLayout::Padded { batch, seq }
    };
    let true_rows = if packed {
        offsets.last().copied().unwrap_or(0) as usize
    } else {
        batch
            .checked_mul(seq)
            .filter(|&r| r <= 64)
            .unwrap_or(g.size(4))
    };
    let rows = maybe_wrong_len(g, true_rows.min(256), 0.05);
    let ignore = ignore_index(g);
    let len1 = maybe_wrong_len(g, rows, 0.03);
    let labels = labels(g, len1, 1000, ignore);
    let policy = logps(g, rows);
    let len1 = maybe_wrong_len(g, rows, 0.03);
    let reference = logps(g, len1);
    g.show("layout", &layout);
    g.show("labels", &labels);
    g.show("policy", &policy);
    g.show("reference", &reference);
    let ranges = layout.ranges(labels.len()).ok();
    let clamp = if g.chance(0.9) {
        let min = g.f32_value(-3.0..0.0, 0.05);
        let max = g.f32_value(0.0..3.0, 0.05);
        LogRatioClamp { min, max }
    } else {
        LogRatioClamp {
            min: 1.0,
            max: -1.0,
        }
    };
    match g.draw(0..4u8) {
        0 => {
            let out = d.sequence_sums(&policy, &labels, ignore, layout);
            Outcome::of(out, |out| {
                let Some(ranges) = &ranges else {
                    return Outcome::Wrong("accepted a layout that ranges() refuses".into());
                };
                let values: Vec<f64> = f64s(&policy).collect();
                let abs: Vec<f64> = values.iter().map(|v| v.abs()).collect();
                check_sums(
                    out,
                    &sums_reference(&values, &labels, ignore, ranges),
                    &sums_reference(&abs, &labels, ignore, ranges).0,
                )
            })
        }
        1 => {
            let clamp = g.chance(0.5).then_some(clamp);
            let out = d.sequence_logratio_sums(&policy, &reference, &labels, ignore, layout, clamp);
            Outcome::of(out, |out| {
                let Some(ranges) = &ranges else {
                    return Outcome::Wrong("accepted a layout that ranges() refuses".into());
                };
                let values: Vec<f64> = policy
                    .iter()
                    .zip(&reference)
                    .map(|(&p, &r)| {
                        let ratio = p as f64 - r as f64;
                        clamp.map_or(ratio, |c| ratio.clamp(c.min as f64, c.max as f64))
                    })
                    .collect();
                let abs: Vec<f64> = values.iter().map(|v| v.abs()).collect();
                check_sums(
                    out,
                    &sums_reference(&values, &labels, ignore, ranges),
                    &sums_reference(&abs, &labels, ignore, ranges).0,
                )
            })
        }
        2 => {
            let n = maybe_wrong_len(g, layout.batch().min(64), 0.05);
            let grad_seq = g.f32_vec(n, -10.0..10.0, 0.01);
            g.show("grad_seq", &grad_seq);
            let out = d.broadcast_sequence_grad(&grad_seq, &labels, ignore, layout);
            Outcome::of(out, |out| {
                let Some(ranges) = &ranges else {
                    return Outcome::Wrong("accepted a layout that ranges() refuses".into());
                };
                for (i, r) in ranges.iter().enumerate() {
                    for t in r.clone() {
                        let want = if labels[t] == ignore {
                            0.0
                        } else {
                            grad_seq[i]
                        };
                        if out[t] != want {
                            return Outcome::Wrong(format!("wrong grad at token {t}"));
                        }
                    }
                }
                Outcome::finite("token_grad", f64s(out))
            })
        }
        _ => {
            let len1 = maybe_wrong_len(g, policy.len(), 0.05);
            let mut grad = g.f32_vec(len1, -1.0..1.0, 0.0);
            let before = grad.clone();
            let out = d.humanline_grad_mask(&policy, &reference, clamp, &mut grad);
            Outcome::of(out, |_| {
                for (t, (&after, &was)) in grad.iter().zip(&before).enumerate() {
                    let ratio = policy[t] as f64 - reference[t] as f64;
                    // A NaN ratio (a padding row: the op has no labels) is not clamped.
                    let inside =
                        ratio.is_nan() || (clamp.min as f64..=clamp.max as f64).contains(&ratio);
                    let want = if inside { was } else { 0.0 };
                    if after != want {
                        return Outcome::Wrong(format!("wrong mask at token {t}"));
                    }
                }
                Outcome::Accepted
            })
        }
    }
}

#[test]
fn fuzz_sequence_ops_cpu() {
    fuzz("fuzz_sequence_ops_cpu", |g| sequence_ops(g, &Cpu));
}

#[test]
fn fuzz_sequence_ops_cuda() {
    fuzz("fuzz_sequence_ops_cuda", |g| sequence_ops(g, cuda()));
}

// ---- losses ----------------------------------------------------------------------------------

fn kto_config(g: &mut Gen) -> KtoConfig {
    KtoConfig {
        beta: g.hyper(0.01..2.0, 0.05),
        desirable_weight: g.hyper(0.0..3.0, 0.05),
        undesirable_weight: g.hyper(0.0..3.0, 0.05),
        loss_type: g.pick(&[KtoLossType::Kto, KtoLossType::ApoZeroUnpaired]),
    }
}

fn partial(g: &mut Gen) -> ReferencePointPartial {
    ReferencePointPartial {
        sum: g.hyper(-100.0..100.0, 0.2),
        count: g.pick(&[0, 1, 2, 7, u64::MAX, u64::MAX - 1, 1 << 53, 1 << 63]),
    }
}

fn finite_kto(out: &losses::KtoOutput) -> Outcome {
    Outcome::finite("loss", [out.loss, out.z0])
        .and(|| Outcome::finite("grad_policy_logps", f64s(&out.grad_policy_logps)))
        .and(|| finite_metrics(&out.metrics))
}

/// KTO with every KL input: this batch's pairs, an (all-reduced) partial, none.
#[test]
fn fuzz_kto_loss() {
    fuzz("fuzz_kto_loss", |g| {
        let config = kto_config(g);
        let n = g.size(24);
        let policy = logps(g, n);
        let len1 = maybe_wrong_len(g, n, 0.05);
        let reference = logps(g, len1);
        let desirable: Vec<bool> = (0..maybe_wrong_len(g, n, 0.05))
            .map(|_| g.chance(0.5))
            .collect();
        let m = g.size(24);
        let len1 = maybe_wrong_len(g, m, 0.05);
        let (kl_policy, kl_reference) = (logps(g, m), logps(g, len1));
        let kl = match g.draw(0..3u8) {
            0 => None,
            1 => Some(KlInput::LogProbs {
                policy: &kl_policy,
                reference: &kl_reference,
            }),
            _ => Some(KlInput::Partial(partial(g))),
        };
        g.show("config", &config);
        g.show(
            "policy, reference, desirable",
            &(&policy, &reference, &desirable),
        );
        g.show("kl", &kl);
        let batch = KtoBatch {
            policy_logps: &policy,
            reference_logps: &reference,
            is_desirable: &desirable,
            kl,
        };
        Outcome::of(losses::kto_loss(&config, &batch), finite_kto)
    });
}

/// The reference point partials: from log-probs or log-ratios, merged, and their z0.
#[test]
fn fuzz_reference_point() {
    fuzz("fuzz_reference_point", |g| {
        let m = g.size(16);
        let len1 = maybe_wrong_len(g, m, 0.05);
        let (p, r) = (logps(g, m), logps(g, len1));
        let first = match g.draw(0..3u8) {
            0 => ReferencePointPartial::from_kl_logps(&p, &r),
            1 => ReferencePointPartial::from_kl_logratios(&p),
            _ => Ok(partial(g)),
        };
        let mut merged = match first {
            Ok(partial) => partial,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        for _ in 0..g.size(4) {
            let other = partial(g);
            if let Err(e) = merged.add(other) {
                return Outcome::Refused(e.to_string());
            }
        }
        g.show("merged", &merged);
        Outcome::of(merged.z0(), |z0| Outcome::finite("z0", [*z0]))
    });
}

fn counts(g: &mut Gen, n: usize) -> Vec<u32> {
    (0..n)
        .map(|_| {
            if g.chance(0.05) {
                g.pick(&[0, u32::MAX])
            } else {
                g.draw(1..64u32)
            }
        })
        .collect()
}

fn finite_pair(out: &PairLossOutput) -> Outcome {
    Outcome::finite("loss", [out.loss])
        .and(|| Outcome::finite("grad_chosen", f64s(&out.grad_chosen)))
        .and(|| Outcome::finite("grad_rejected", f64s(&out.grad_rejected)))
        .and(|| finite_metrics(&out.metrics))
}

fn dpo_config(g: &mut Gen) -> DpoConfig {
    let alpha = g.hyper(-2.0..3.0, 0.05);
    DpoConfig {
        beta: g.hyper(0.01..2.0, 0.05),
        label_smoothing: g.hyper(0.0..0.5, 0.05),
        loss_type: g.pick(&DpoLossType::ALL),
        discopop_tau: g.hyper(0.01..2.0, 0.05),
        f_divergence: g.pick(&[
            FDivergence::ReverseKl,
            FDivergence::ReverseKl,
            FDivergence::ForwardKl,
            FDivergence::JsDivergence,
            FDivergence::Alpha { coef: alpha },
        ]),
    }
}

/// The DPO family (every TRL loss type), with and without token counts.
#[test]
fn fuzz_dpo_loss() {
    fuzz("fuzz_dpo_loss", |g| {
        let config = dpo_config(g);
        let n = g.size(16);
        let lists: Vec<Vec<f32>> = (0..4)
            .map(|i| {
                let len = if i == 0 {
                    n
                } else {
                    maybe_wrong_len(g, n, 0.03)
                };
                logps(g, len)
            })
            .collect();
        let len1 = maybe_wrong_len(g, n, 0.03);
        let (cc, rc) = (counts(g, len1), counts(g, n));
        let with_counts = g.chance(0.7);
        g.show("config", &config);
        g.show("lists", &lists);
        g.show("counts", &(with_counts, &cc, &rc));
        let batch = PairBatch {
            policy_chosen_logps: &lists[0],
            policy_rejected_logps: &lists[1],
            reference_chosen_logps: &lists[2],
            reference_rejected_logps: &lists[3],
            chosen_counts: with_counts.then_some(&cc[..]),
            rejected_counts: with_counts.then_some(&rc[..]),
        };
        Outcome::of(losses::dpo_loss(&config, &batch), finite_pair)
    });
}

/// The reference-free pair losses: ORPO and SimPO.
#[test]
fn fuzz_orpo_simpo_loss() {
    fuzz("fuzz_orpo_simpo_loss", |g| {
        let n = g.size(16);
        let chosen = logps(g, n);
        let len1 = maybe_wrong_len(g, n, 0.03);
        let rejected = logps(g, len1);
        let len1 = maybe_wrong_len(g, n, 0.03);
        let (cc, rc) = (counts(g, len1), counts(g, n));
        g.show("chosen, rejected", &(&chosen, &rejected));
        g.show("counts", &(&cc, &rc));
        let batch = ReferenceFreePairBatch {
            policy_chosen_logps: &chosen,
            policy_rejected_logps: &rejected,
            chosen_counts: &cc,
            rejected_counts: &rc,
        };
        if g.chance(0.5) {
            let config = OrpoConfig {
                beta: g.hyper(0.01..2.0, 0.05),
            };
            g.show("orpo", &config);
            Outcome::of(losses::orpo_loss(&config, &batch), finite_pair)
        } else {
            let config = SimpoConfig {
                beta: g.hyper(0.1..5.0, 0.05),
                gamma: g.hyper(0.0..3.0, 0.05),
                label_smoothing: g.hyper(0.0..0.5, 0.05),
                nll_weight: g.hyper(0.0..2.0, 0.05),
            };
            g.show("simpo", &config);
            Outcome::of(losses::simpo_loss(&config, &batch), finite_pair)
        }
    });
}

// ---- step helpers from logits ----------------------------------------------------------------

/// Logits, labels and a layout of `sequences` sequences (padded or packed).
struct StepLogits<T> {
    logits: Vec<T>,
    labels: Vec<i32>,
    vocab: usize,
    ignore: i32,
    offsets: Vec<u32>,
    padded: Option<(usize, usize)>,
}

impl<T: LogitElement> StepLogits<T> {
    fn draw(g: &mut Gen, sequences: usize) -> Self {
        let vocab = g.pick(&[1, 2, 5, 8, 17, 33]);
        let ignore = ignore_index(g);
        let mut offsets = vec![0u32];
        let padded = if g.chance(0.5) {
            let seq = g.size(6);
            Some((sequences, seq))
        } else {
            for _ in 0..sequences {
                let len = g.size(6) as u32;
                offsets.push(offsets.last().unwrap() + len);
            }
            None
        };
        let rows = padded.map_or(*offsets.last().unwrap() as usize, |(b, s)| b * s);
        let len1 = maybe_wrong_len(g, rows, 0.02);
        let labels = labels(g, len1, vocab, ignore);
        let scale = g.pick(&[1.0f32, 10.0, 100.0, 1e4, 1e5]);
        let len = maybe_wrong_len(g, rows * vocab, 0.02);
        let logits = g
            .f32_vec(len, -scale..scale, 0.002)
            .into_iter()
            .map(T::from_f32)
            .collect();
        StepLogits {
            logits,
            labels,
            vocab,
            ignore,
            offsets,
            padded,
        }
    }

    fn view(&self) -> Logits<'_, T> {
        Logits {
            logits: &self.logits,
            labels: &self.labels,
            vocab: self.vocab,
            ignore_index: self.ignore,
            layout: match self.padded {
                Some((batch, seq)) => SequenceLayout::Padded { batch, seq },
                None => SequenceLayout::Packed {
                    cu_seqlens: &self.offsets,
                },
            },
        }
    }
}

fn finite_step<L, T: LogitElement>(
    step: &step::LogitsStep<L, T>,
    loss: impl FnOnce(&L) -> Outcome,
) -> Outcome {
    loss(&step.loss)
        .and(|| Outcome::finite("policy_logps", f64s(&step.policy_logps)))
        .and(|| Outcome::finite("token_logps", f64s(&step.token_logps)))
        .and(|| {
            let grads = step.grad_logits.iter().map(|v| v.to_f32() as f64);
            // A gradient beyond the storage dtype's range must be GradientOverflow, never inf.
            Outcome::finite("grad_logits", grads)
        })
}

fn kto_step_of<T: LogitElement>(g: &mut Gen) -> Outcome {
    let config = kto_config(g);
    let n = g.size(6);
    let policy = StepLogits::<T>::draw(g, n);
    let len1 = maybe_wrong_len(g, n, 0.03);
    let reference = logps(g, len1);
    let desirable: Vec<bool> = (0..n).map(|_| g.chance(0.5)).collect();
    let (kl_p, kl_r) = (logps(g, n), logps(g, n));
    let kl = match g.draw(0..3u8) {
        0 => None,
        1 => Some(KlInput::LogProbs {
            policy: &kl_p,
            reference: &kl_r,
        }),
        _ => Some(KlInput::Partial(partial(g))),
    };
    g.show("config", &config);
    g.show("logits", &policy.view());
    g.show("inputs", &(&reference, &desirable, &kl));
    let inputs = KtoStepInputs {
        reference_logps: &reference,
        is_desirable: &desirable,
        kl,
    };
    Outcome::of(step::kto_step(&config, &policy.view(), &inputs), |s| {
        finite_step(s, finite_kto)
    })
}

fn dpo_step_of<T: LogitElement>(g: &mut Gen) -> Outcome {
    let config = dpo_config(g);
    let n = g.size(4);
    let sequences = if g.chance(0.95) { 2 * n } else { 2 * n + 1 };
    let policy = StepLogits::<T>::draw(g, sequences);
    let len1 = maybe_wrong_len(g, n, 0.03);
    let chosen = logps(g, len1);
    let rejected = logps(g, n);
    g.show("config", &config);
    g.show("logits", &policy.view());
    g.show("reference", &(&chosen, &rejected));
    let reference = PairReference {
        chosen_logps: &chosen,
        rejected_logps: &rejected,
    };
    Outcome::of(step::dpo_step(&config, &policy.view(), &reference), |s| {
        finite_step(s, finite_pair)
    })
}

/// `step::kto_step` from logits, one dtype per input.
#[test]
fn fuzz_kto_step() {
    fuzz("fuzz_kto_step", |g| match g.draw(0..3u8) {
        0 => kto_step_of::<f32>(g),
        1 => kto_step_of::<bf16>(g),
        _ => kto_step_of::<f16>(g),
    });
}

/// `step::dpo_step` from logits, one dtype per input.
#[test]
fn fuzz_dpo_step() {
    fuzz("fuzz_dpo_step", |g| match g.draw(0..3u8) {
        0 => dpo_step_of::<f32>(g),
        1 => dpo_step_of::<bf16>(g),
        _ => dpo_step_of::<f16>(g),
    });
}

// ---- the harness itself ----------------------------------------------------------------------

/// A target that aborts, panics, returns a non-finite output or accepts, by its input; run only by
/// [`harness_counts_aborts_panics_and_non_finite_with_their_seeds`].
#[test]
#[ignore = "a probe of the fuzz harness: fails by design"]
fn fuzz_harness_probe() {
    fuzz("fuzz_harness_probe", |g| match g.draw(0..8u8) {
        0 => std::process::abort(),
        1 => panic!("probe panic"),
        2 => Outcome::NonFinite("probe".into()),
        3 => Outcome::Refused("probe".into()),
        _ => Outcome::Accepted,
    });
}

/// The harness must see an abort (the child dies), a panic and a non-finite output, fail the
/// target, and print seeds that reproduce them.
#[test]
fn harness_counts_aborts_panics_and_non_finite_with_their_seeds() {
    let exe = std::env::current_exe().unwrap();
    let run = |envs: &[(&str, &str)]| {
        let mut command = std::process::Command::new(&exe);
        command.args([
            "fuzz_harness_probe",
            "--exact",
            "--include-ignored",
            "--nocapture",
        ]);
        command
            .env_remove("HALO_FUZZ_REPRO")
            .env_remove("HALO_FUZZ_CHILD");
        command.envs(envs.iter().copied()).output().unwrap()
    };
    let out = run(&[("HALO_FUZZ_SECONDS", "1")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "the probe target must fail:\n{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("fuzz-count fuzz_harness_probe"))
        .unwrap_or_else(|| panic!("no counts row:\n{stdout}"));
    let count = |key: &str| -> u64 {
        let field = row
            .split_whitespace()
            .find(|f| f.starts_with(&format!("{key}=")))
            .unwrap();
        field[key.len() + 1..].parse().unwrap()
    };
    assert!(count("aborts") >= 1, "{row}");
    assert!(count("panics") >= 1, "{row}");
    assert!(count("non_finite") >= 1, "{row}");
    assert!(
        count("tried") >= count("aborts") + count("panics") + count("non_finite") + count("errors")
    );
    // The printed seed of an abort reproduces it: the process dies of SIGABRT.
    let seed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("fuzz-failure fuzz_harness_probe abort seed="))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no abort seed printed:\n{stdout}"));
    let repro = run(&[("HALO_FUZZ_REPRO", seed)]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        repro.status.signal(),
        Some(6),
        "seed {seed} did not abort: {:?}",
        repro.status
    );
}
