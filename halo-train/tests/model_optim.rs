//! AdamW against a plain f64 transcription of `torch.optim.AdamW`, gradient clipping, schedules.

// Finite-difference loops index several parallel arrays by the same j: clearer than zipped iterators.
#![allow(clippy::needless_range_loop)]

use halo_train::autograd::Gradients;
use halo_train::model::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use halo_train::model::{Gpt, GptConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn model() -> Gpt {
    let cfg = GptConfig {
        n_layer: 1,
        n_head: 1,
        n_embd: 4,
        vocab_size: 5,
        n_ctx: 3,
        dropout: 0.0,
    };
    Gpt::new(cfg, 0).unwrap()
}

#[test]
fn adamw_matches_pytorch_formula() {
    let mut model = model();
    let start = model.clone();
    let cfg = AdamWConfig {
        lr: 0.0,
        betas: (0.8, 0.95),
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(&model, cfg);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let n = model.parameters().len();
    let skipped = 3; // this parameter never gets a gradient
    let lrs = [1e-2f32, 5e-3, 2e-2];
    let mut history: Vec<Gradients> = Vec::new();
    for &lr in &lrs {
        let mut grads = Gradients::new();
        for (i, p) in model.parameters().iter().enumerate() {
            if i != skipped {
                grads
                    .add(
                        i,
                        (0..p.data.len())
                            .map(|_| rng.gen_range(-1.0..1.0))
                            .collect(),
                    )
                    .unwrap();
            }
        }
        opt.step(&mut model, &grads, lr).unwrap();
        history.push(grads);
    }
    assert_eq!(opt.steps(), 3);
    for i in 0..n {
        let p0 = &start.parameters()[i];
        let got = &model.parameters()[i].data;
        if i == skipped {
            assert_eq!(got, &p0.data);
            continue;
        }
        let decays = p0.shape.len() >= 2;
        for j in 0..p0.data.len() {
            let (mut p, mut m, mut v) = (p0.data[j] as f64, 0.0f64, 0.0f64);
            for (t, (&lr, g)) in lrs.iter().zip(&history).enumerate() {
                let (lr, g, t) = (lr as f64, g.get(i).unwrap()[j] as f64, (t + 1) as i32);
                if decays {
                    p *= 1.0 - lr * 0.1;
                }
                m = 0.8 * m + 0.2 * g;
                v = 0.95 * v + 0.05 * g * g;
                let m_hat = m / (1.0 - 0.8f64.powi(t));
                let v_hat = v / (1.0 - 0.95f64.powi(t));
                p -= lr * m_hat / (v_hat.sqrt() + 1e-6);
            }
            assert!(
                (got[j] as f64 - p).abs() < 1e-5,
                "{}[{j}]: {} vs {p}",
                p0.name,
                got[j]
            );
        }
    }
}

#[test]
fn adamw_rejects_gradients_of_another_shape() {
    let mut model = model();
    let mut opt = AdamW::new(&model, AdamWConfig::default());
    let mut grads = Gradients::new();
    grads.add(0, vec![1.0; 3]).unwrap();
    assert!(opt.step(&mut model, &grads, 1e-3).is_err());
    let mut grads = Gradients::new();
    grads.add(1000, vec![1.0; 3]).unwrap();
    assert!(opt.step(&mut model, &grads, 1e-3).is_err());
}

#[test]
fn clipping_scales_to_max_norm_only_when_above() {
    let mut grads = Gradients::new();
    grads.add(0, vec![3.0, 0.0]).unwrap();
    grads.add(2, vec![0.0, 4.0, 0.0]).unwrap();
    assert!((grads.global_norm() - 5.0).abs() < 1e-6);
    let before = clip_grad_norm(&mut grads, 10.0);
    assert!((before - 5.0).abs() < 1e-6);
    assert_eq!(grads.get(0).unwrap(), &[3.0, 0.0]);
    let before = clip_grad_norm(&mut grads, 1.0);
    assert!((before - 5.0).abs() < 1e-6);
    assert!((grads.global_norm() - 1.0).abs() < 1e-5);
    assert!((grads.get(2).unwrap()[1] - 0.8).abs() < 1e-5);
    assert!(grads.get(1).is_none());
}

#[test]
fn schedules_warm_up_then_decay() {
    let s = LrSchedule::cosine(1.0, 0.1, 4, 104);
    assert!((s.lr_at(0) - 0.25).abs() < 1e-6);
    assert!((s.lr_at(3) - 1.0).abs() < 1e-6);
    assert!((s.lr_at(4) - 1.0).abs() < 1e-6);
    assert!((s.lr_at(54) - 0.55).abs() < 1e-5);
    assert!((s.lr_at(104) - 0.1).abs() < 1e-6);
    assert!((s.lr_at(10_000) - 0.1).abs() < 1e-6);
    let mut prev = f32::INFINITY;
    for step in 4..110 {
        assert!(s.lr_at(step) <= prev);
        prev = s.lr_at(step);
    }
    let l = LrSchedule::linear(2.0, 0.0, 0, 10);
    assert!((l.lr_at(5) - 1.0).abs() < 1e-6);
    assert_eq!(LrSchedule::constant(0.3).lr_at(12345), 0.3);
}
