//! A small define-by-run reverse-mode autograd over `f32` tensors, in the spirit of micrograd and
//! llm.c: every op is a method on [`Tape`] that computes its value immediately and records what the
//! backward needs; [`Tape::backward`] walks the record in reverse once, accumulating gradients and
//! freeing each activation as soon as nothing later needs it.
//!
//! ```
//! use halo_train::autograd::Tape;
//! let mut tape = Tape::new();
//! let x = tape.constant(&[1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
//! let w = tape.param(0, &[0.5, -1.0, 2.0, 0.25], &[2, 2]).unwrap();
//! let y = tape.linear(x, w, None).unwrap(); // y = x·w, w in Conv1D layout [in, out]
//! let loss = tape.sum(y).unwrap();
//! let grads = tape.backward_scalar(loss).unwrap();
//! // ∂Σy/∂w[i, j] = Σ_r x[r, i]
//! assert_eq!(grads.get(0).unwrap(), &[4.0, 4.0, 6.0, 6.0]);
//! ```
//!
//! Layout: [`tape`] (variables, nodes, the backward sweep, [`Gradients`]), [`ops`] (the op
//! methods: shape checks + recording), [`pool`] (the per-thread free list every activation and
//! gradient buffer comes from, so a step reuses the previous step's memory), [`cpu`] (the
//! kernels — the device boundary: a CUDA backend adds a sibling module, the tape and the model
//! stay as they are). Parameters are borrowed by the tape ([`Tape::param`]), never copied.

pub mod cpu;
pub mod device_checks;
pub(crate) mod device_ops;
pub mod ops;
pub mod pool;
pub mod storage;
pub mod tape;

pub use cpu::attention::AttentionShape;
pub use device_checks::{DeviceChecks, StepReadout};
pub use storage::{Device, Storage, StorageRef};
pub use tape::{Gradients, Tape, Var};
