//! Golden fixtures from PyTorch (`tests/fixtures/pytorch_token_ops.json`, written by
//! `scripts/conformance/make_fixtures.py`): our CPU token ops against
//! `torch.log_softmax(logits.double()).gather(...)` per-token log-probs with ignore index −100,
//! `F.cross_entropy(..., ignore_index=-100, reduction='none')`, autograd gradients of
//! `Σ_t w_t·logp_t` into the logits, and masked per-sequence sums. Cases cover vocab 1, 37, 257,
//! 1000, 4099, an all-ignored sequence, a batch of one, logits of ±1e4, and bf16- and f16-rounded
//! logits.
//!
//! Tolerances: the references are float64 on exactly our (f32 or bf16) input values, so the only
//! error left is our f32 arithmetic: relative 1e-5, plus an absolute term of a few f32 ulps of the
//! row's largest |logit| (a log-prob `z_y − lse` loses the digits of `lse` below that ulp;
//! unavoidable in f32 when |z| ~ 1e4). bf16/f16 gradients are stored in bf16/f16: half an ulp more.

mod conformance_common;

use conformance_common::*;
use half::bf16;
use halo_kernels::cpu::{
    sequence_sums, token_logprobs, token_logprobs_backward, token_logprobs_backward_inplace,
    SequenceLayout,
};
use halo_kernels::{LogitElement, IGNORE_INDEX};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    ignore_index: i32,
    versions: serde_json::Value,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    dtype: String,
    batch: usize,
    seq: usize,
    vocab: usize,
    logits: Vec<f64>,
    labels: Vec<i32>,
    grad_weights: Vec<f64>,
    logp: Vec<f64>,
    lse: Vec<f64>,
    cross_entropy: Vec<f64>,
    grad_logits: Vec<f64>,
    sequence_sums: Vec<f64>,
    sequence_counts: Vec<u32>,
    #[serde(default)]
    cross_entropy_torch_bf16: Option<Vec<f64>>,
    #[serde(default)]
    cross_entropy_torch_f16: Option<Vec<f64>>,
}

fn fixture() -> Fixture {
    let f: Fixture = load_fixture("pytorch_token_ops.json");
    assert_eq!(f.ignore_index, IGNORE_INDEX);
    assert!(f.cases.len() >= 8, "fixture lost cases");
    f
}

/// Largest |logit| of each row, at least 1: the scale of the f32 rounding in that row's lse.
fn row_scales(case: &Case) -> Vec<f64> {
    case.logits
        .chunks(case.vocab)
        .map(|row| {
            row.iter()
                .fold(1.0f64, |m, &z| m.max((z as f32).abs() as f64))
        })
        .collect()
}

const F32_EPS: f64 = f32::EPSILON as f64;
/// Half an ulp of bf16 relative to the value (8 significand bits).
const BF16_HALF_ULP: f64 = 1.0 / 256.0;
/// Half an ulp of f16 relative to the value (11 significand bits).
const F16_HALF_ULP: f64 = 1.0 / 2048.0;

fn check_case<T: LogitElement>(case: &Case) {
    let logits: Vec<T> = case.logits.iter().map(|&z| T::from_f32(z as f32)).collect();
    // The stored values are exactly representable in T (bf16 cases were rounded in torch).
    for (i, (&z, &stored)) in logits.iter().zip(&case.logits).enumerate() {
        assert_eq!(
            z.to_f32(),
            stored as f32,
            "{}: logit {i} not exact",
            case.name
        );
    }
    let rows = case.batch * case.seq;
    assert_eq!(case.labels.len(), rows);
    let scales = row_scales(case);
    let name = &case.name;

    // Forward: per-token log-probs, their logsumexp, and cross-entropy = −logp.
    let out = token_logprobs(&logits, &case.labels, case.vocab, IGNORE_INDEX).unwrap();
    let logp: Vec<f64> = out.logp.iter().map(|&x| x as f64).collect();
    let lse: Vec<f64> = out.lse.iter().map(|&x| x as f64).collect();
    let tol_row = |r: usize| 4.0 * F32_EPS * scales[r];
    let e_logp = assert_close(&format!("{name} logp"), &logp, &case.logp, 1e-5, tol_row);
    assert_close(&format!("{name} lse"), &lse, &case.lse, 1e-5, tol_row);
    let neg: Vec<f64> = logp.iter().map(|x| -x).collect();
    assert_close(
        &format!("{name} cross_entropy"),
        &neg,
        &case.cross_entropy,
        1e-5,
        tol_row,
    );
    // Ignored rows: exactly 0, as PyTorch's cross_entropy(ignore_index) gives.
    for (r, &y) in case.labels.iter().enumerate() {
        if y == IGNORE_INDEX {
            assert_eq!((out.logp[r], out.lse[r]), (0.0, 0.0), "{name} row {r}");
            assert_eq!(case.cross_entropy[r], 0.0, "{name} fixture row {r}");
        }
    }

    // Backward of Σ w_t·logp_t into the logits, against torch.autograd.
    let weights = to_f32(&case.grad_weights);
    let mut grad = vec![T::from_f32(0.0); logits.len()];
    token_logprobs_backward(
        &logits,
        &case.labels,
        out.saved_lse(),
        &weights,
        case.vocab,
        IGNORE_INDEX,
        &mut grad,
    )
    .unwrap();
    let ours: Vec<f64> = grad.iter().map(|g| g.to_f32() as f64).collect();
    let storage_rtol = match T::DTYPE {
        halo_kernels::DType::F32 => 1e-5,
        halo_kernels::DType::BF16 => BF16_HALF_ULP,
        halo_kernels::DType::F16 => F16_HALF_ULP,
    };
    let e_grad = assert_close(
        &format!("{name} grad_logits"),
        &ours,
        &case.grad_logits,
        storage_rtol,
        // softmax is computed as exp(z − lse): lse's f32 rounding becomes a relative error
        // on p of ~ulp(scale), times |w|.
        |i| {
            let r = i / case.vocab;
            4.0 * F32_EPS * scales[r] * (weights[r].abs() as f64) + 1e-30
        },
    );
    let mut inplace = logits.clone();
    token_logprobs_backward_inplace(
        &mut inplace,
        &case.labels,
        out.saved_lse(),
        &weights,
        case.vocab,
        IGNORE_INDEX,
    )
    .unwrap();
    assert!(
        inplace
            .iter()
            .zip(&grad)
            .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()),
        "{name}: in-place backward differs from the out-of-place one"
    );

    // Masked per-sequence sums (TRL's get_batch_logps `(logps * mask).sum(-1)`) and counts.
    let sums = sequence_sums(
        &out.logp,
        &case.labels,
        IGNORE_INDEX,
        SequenceLayout::Padded {
            batch: case.batch,
            seq: case.seq,
        },
    )
    .unwrap();
    assert_eq!(sums.counts, case.sequence_counts, "{name} counts");
    let sums64: Vec<f64> = sums.sums.iter().map(|&x| x as f64).collect();
    assert_close(
        &format!("{name} sequence_sums"),
        &sums64,
        &case.sequence_sums,
        1e-5,
        |b| {
            let tokens = b * case.seq..(b + 1) * case.seq;
            tokens.map(tol_row).sum::<f64>() + 1e-30
        },
    );

    if let Some(ce_bf16) = &case.cross_entropy_torch_bf16 {
        // torch's native bf16 cross_entropy rounds its output to bf16: agree to that precision.
        assert_close(
            &format!("{name} vs torch bf16"),
            &neg,
            ce_bf16,
            2.0 * BF16_HALF_ULP,
            |_| 1e-6,
        );
    }
    if let Some(ce_f16) = &case.cross_entropy_torch_f16 {
        assert_close(
            &format!("{name} vs torch f16"),
            &neg,
            ce_f16,
            2.0 * F16_HALF_ULP,
            |_| 1e-6,
        );
    }
    eprintln!(
        "{name}: max |Δ logp| {:.2e} (rel {:.2e}), max |Δ grad| {:.2e}",
        e_logp.abs, e_logp.rel, e_grad.abs
    );
}

#[test]
fn token_ops_match_pytorch_f32() {
    let f = fixture();
    eprintln!("fixture versions: {}", f.versions);
    let mut n = 0;
    for case in f.cases.iter().filter(|c| c.dtype == "f32") {
        check_case::<f32>(case);
        n += 1;
    }
    assert!(n >= 6);
}

#[test]
fn token_ops_match_pytorch_bf16() {
    let f = fixture();
    let mut n = 0;
    for case in f.cases.iter().filter(|c| c.dtype == "bf16") {
        check_case::<bf16>(case);
        n += 1;
    }
    assert!(n >= 2);
}

#[test]
fn token_ops_match_pytorch_f16() {
    let f = fixture();
    let mut n = 0;
    for case in f.cases.iter().filter(|c| c.dtype == "f16") {
        check_case::<half::f16>(case);
        n += 1;
    }
    assert!(n >= 2);
}

#[test]
fn fixture_covers_the_awkward_cases() {
    let f = fixture();
    let vocabs: Vec<usize> = f.cases.iter().map(|c| c.vocab).collect();
    for v in [1, 37, 1000] {
        assert!(vocabs.contains(&v), "no case with vocab {v}");
    }
    assert!(f.cases.iter().any(|c| c.batch == 1), "no batch of one");
    assert!(
        f.cases.iter().any(|c| c.sequence_counts.contains(&0)),
        "no all-ignored sequence"
    );
    assert!(
        f.cases
            .iter()
            .any(|c| c.logits.iter().any(|z| z.abs() >= 1e4)),
        "no extreme logits"
    );
}
