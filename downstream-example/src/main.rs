//! A downstream user of the `halo-kernels` core: its own logits buffer (a batch of 4 sequences of
//! 6 tokens over a 50-token vocabulary, the first two positions of each a prompt), a frozen
//! reference's per-token log-probs, binary feedback, and KL pairs; out come the KTO loss, TRL's
//! metrics and ∂L/∂logits, on the CPU. The same calls exist on the GPU (`halo_kernels::cuda`).

use halo_kernels::cpu::{sequence_sums, SequenceLayout};
use halo_kernels::losses::{KlInput, KtoConfig, KtoOutput};
use halo_kernels::step::{kto_step, KtoStepInputs, Logits};
use halo_kernels::{Result, IGNORE_INDEX};

const BATCH: usize = 4;
const SEQ: usize = 6;
const VOCAB: usize = 50;

/// Everything one KTO step needs, in the caller's own buffers.
struct Inputs {
    logits: Vec<f32>,
    labels: Vec<i32>,
    reference_logp: Vec<f32>,
    desirable: Vec<bool>,
    kl_policy: Vec<f32>,
    kl_reference: Vec<f32>,
}

fn inputs() -> Inputs {
    // A small deterministic generator: no dependency beyond the core.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let logits = (0..BATCH * SEQ * VOCAB)
        .map(|_| next() * 8.0 - 4.0)
        .collect();
    let labels = (0..BATCH * SEQ)
        .map(|t| {
            if t % SEQ < 2 {
                IGNORE_INDEX
            } else {
                (next() * VOCAB as f32) as i32
            }
        })
        .collect();
    let reference_logp = (0..BATCH * SEQ)
        .map(|t| if t % SEQ < 2 { 0.0 } else { -3.0 - next() })
        .collect();
    Inputs {
        logits,
        labels,
        reference_logp,
        desirable: vec![true, false, true, false],
        kl_policy: (0..BATCH).map(|_| -15.0 - next()).collect(),
        kl_reference: (0..BATCH).map(|_| -15.5 - next()).collect(),
    }
}

/// The KTO loss and ∂L/∂logits for `logits` (the other inputs fixed): one call of the core.
fn kto_step_of(x: &Inputs, logits: &[f32]) -> Result<(KtoOutput, Vec<f32>)> {
    let layout = SequenceLayout::Padded {
        batch: BATCH,
        seq: SEQ,
    };
    // The reference's per-token log-probs, summed per sequence (no gradient).
    let reference = sequence_sums(&x.reference_logp, &x.labels, IGNORE_INDEX, layout)?;
    let step = kto_step(
        &KtoConfig::default(),
        &Logits {
            logits,
            labels: &x.labels,
            vocab: VOCAB,
            ignore_index: IGNORE_INDEX,
            layout,
        },
        &KtoStepInputs {
            reference_logps: &reference.sums,
            is_desirable: &x.desirable,
            kl: Some(KlInput::LogProbs {
                policy: &x.kl_policy,
                reference: &x.kl_reference,
            }),
        },
    )?;
    Ok((step.loss, step.grad_logits))
}

fn main() -> Result<()> {
    let x = inputs();
    let (out, grad) = kto_step_of(&x, &x.logits)?;
    let norm = grad.iter().map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt();
    println!(
        "kto loss {:.6}  z0 {:.4}  |dL/dlogits| {norm:.3e}",
        out.loss, out.z0
    );
    println!(
        "rewards/chosen {:?}  rewards/rejected {:?}",
        out.metrics.rewards_chosen, out.metrics.rewards_rejected
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gradient the core returns is the derivative of the loss it returns (central
    /// differences in the logits, z0 held fixed by keeping the KL pairs fixed).
    #[test]
    fn gradient_matches_finite_differences() {
        let x = inputs();
        let (_, grad) = kto_step_of(&x, &x.logits).unwrap();
        let h = 1e-2f32;
        for i in [
            2 * VOCAB + 7,
            3 * VOCAB + 1,
            9 * VOCAB + 49,
            20 * VOCAB + 13,
            23 * VOCAB,
        ] {
            let mut plus = x.logits.clone();
            let mut minus = x.logits.clone();
            plus[i] += h;
            minus[i] -= h;
            let lp = kto_step_of(&x, &plus).unwrap().0.loss;
            let lm = kto_step_of(&x, &minus).unwrap().0.loss;
            let fd = (lp - lm) / (2.0 * h as f64);
            assert!(
                (fd - grad[i] as f64).abs() <= 1e-4 * (1.0 + fd.abs()) + 2e-6,
                "logit {i}: {fd} vs {}",
                grad[i]
            );
        }
        // Prompt positions carry no gradient.
        assert!(grad[..VOCAB].iter().all(|&g| g == 0.0));
    }
}
