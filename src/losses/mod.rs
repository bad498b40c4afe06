//! Human-aware losses on per-sequence log-probs: KTO (and APO-zero unpaired), the DPO family
//! (sigmoid/cDPO, robust, hinge, IPO, APO-zero), SimPO and ORPO.
//!
//! Every loss takes per-sequence policy (and, where used, reference) log-probs summed over each
//! completion's tokens (f32, as [`crate::cpu::sequence_sums()`] produces them; token counts `u32`
//! where a loss length-normalises) and returns, in one call:
//! - `loss`: the mean batch loss, **f64**;
//! - the gradient of `loss` w.r.t. each SUMMED policy log-prob, **f32** (feed it to
//!   [`crate::cpu::broadcast_sequence_grad`]);
//! - [`LossMetrics`], f64, named and defined as TRL logs them.
//!
//! All arithmetic is f64 internally; reference log-probs and KTO's reference point are constants
//! (no gradient). Formulas follow TRL (`trl/trainer/{kto,dpo,cpo,orpo}_trainer.py`); each module
//! cites its function and documents any deliberate difference.
//!
//! Zero-token sequences: summed losses (KTO, DPO sigmoid/robust/hinge/apo_zero) accept them (their
//! log-prob is 0); length-normalised ones (IPO, SimPO, ORPO) return `HaloError::EmptySequence`.
//!
//! No loss ever returns a NaN or infinite loss or gradient: inputs are validated, and an output
//! that would still overflow is reported as `HaloError::NonFinite`.
//!
//! ```
//! use halo_kernels::losses::{kto_loss, KlInput, KtoBatch, KtoConfig, ReferencePointPartial};
//!
//! // Per-sequence summed log-probs (e.g. `cpu::sequence_sums(...).sums`) of 3 examples.
//! let policy = [-12.5f32, -30.0, -7.25];
//! let reference = [-13.0f32, -28.0, -7.5];
//! // KL pairs of this device; on several devices all-reduce `sum` and `count` first.
//! let partial = ReferencePointPartial::from_kl_logps(&[-20.0, -9.0], &[-21.0, -9.5])?;
//! let out = kto_loss(
//!     &KtoConfig::default(),
//!     &KtoBatch {
//!         policy_logps: &policy,
//!         reference_logps: &reference,
//!         is_desirable: &[true, false, true],
//!         kl: Some(KlInput::Partial(partial)),
//!     },
//! )?;
//! assert!(out.loss > 0.0 && out.z0 == 0.75);
//! assert_eq!(out.grad_policy_logps.len(), 3); // → cpu::broadcast_sequence_grad
//! # Ok::<(), halo_kernels::HaloError>(())
//! ```
//!
//! With the `test-utils` feature, `reference` holds plain f64 transcriptions of every formula, for
//! tests (this crate's, and a downstream crate's own).

pub mod dpo;
pub mod f_divergence;
pub mod kto;
pub mod metrics;
pub mod orpo;
pub mod pairs;
#[cfg(feature = "test-utils")]
pub mod reference;
mod reference_free;
pub mod reference_point;
pub mod sigmoid;
pub mod simpo;
pub(crate) mod validate;
pub mod weights;

pub use dpo::{dpo_loss, DpoConfig, DpoLossType};
pub use f_divergence::FDivergence;
pub use kto::{kto_loss, KlInput, KtoBatch, KtoConfig, KtoLossType, KtoOutput};
pub use metrics::LossMetrics;
pub use orpo::{orpo_loss, OrpoConfig};
pub use pairs::{PairBatch, PairLossOutput, ReferenceFreePairBatch};
pub use reference_point::ReferencePointPartial;
pub use simpo::{simpo_loss, SimpoConfig};
pub use weights::{
    check_kto_weights, suggest_kto_weights, KtoWeightCheck, KtoWeights, KTO_WEIGHT_RATIO_MAX,
    KTO_WEIGHT_RATIO_MIN,
};
