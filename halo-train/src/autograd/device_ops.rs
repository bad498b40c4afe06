//! Every op of the tape on whichever [`Device`] holds its tensors: the CPU arm calls the kernels
//! of [`cpu`](super::cpu), the CUDA arm the core's `CudaBackend` (its model ops in
//! `halo_kernels::cuda::nn`, its token ops, cuBLAS through `CudaGemm`). Same arguments and the same
//! semantics on both: forwards return new buffers on the device, backwards *accumulate* (`+=`)
//! into the gradients they are given. The CUDA arms only queue work: nothing here waits for the
//! device: the token ops' label and finiteness checks land in [`DeviceChecks`], which the host
//! reads once per step with the loss.
//!
//! The tape validates every shape before calling in; these functions trust them.

use super::cpu::attention::{attention_backward, attention_forward, AttentionShape};
use super::cpu::elementwise as ew;
use super::cpu::embedding::{embedding_backward, embedding_forward};
use super::cpu::gelu::{gelu_backward, gelu_forward};
use super::cpu::layernorm::{layernorm_backward, layernorm_forward};
use super::cpu::matmul::{linear_backward, linear_forward};
use super::device_checks::DeviceChecks;
use super::pool::Buffer;
use super::storage::{Device, Storage, StorageRef};
use halo_kernels::cpu::SavedLse;
use halo_kernels::cuda::nn::{AttentionDims, CudaTokenIds};
use halo_kernels::cuda::{CudaBackend, CudaSlice, FusedBackwardStatus, GemmShape, KernelStatus};
use std::sync::Arc;

use halo_kernels::error::{HaloError, Result};
use halo_kernels::IGNORE_INDEX;

/// `(host input, …)` or the error for a device/host mix.
fn host(s: StorageRef<'_>) -> Result<&[f32]> {
    s.host_or_err()
}

fn host_opt(s: Option<&mut Storage>) -> Result<Option<&mut [f32]>> {
    s.map(|s| s.host_mut()).transpose()
}

fn cuda_opt(s: Option<&mut Storage>) -> Result<Option<&mut CudaSlice<f32>>> {
    s.map(|s| s.cuda_mut()).transpose()
}

/// Token ids on the device that will read them (the embedding's input), validated by the tape.
#[derive(Debug)]
pub(crate) enum SavedIds {
    Host(Vec<u32>),
    /// Uploaded once, with the grouping the deterministic backward needs.
    Cuda(CudaTokenIds),
}

impl SavedIds {
    pub(crate) fn new(dev: &Device, ids: &[u32], table_rows: usize) -> Result<Self> {
        match dev {
            Device::Cpu => Ok(Self::Host(ids.to_vec())),
            Device::Cuda(gpu) => Ok(Self::Cuda(gpu.upload_token_ids(ids, table_rows)?)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Host(v) => v.len(),
            Self::Cuda(ids) => ids.len(),
        }
    }
}

/// Labels of a token op: on the host always (the CPU ops, the CUDA fused head and the error
/// reports read them there) and on the device for the CUDA token kernels.
#[derive(Debug)]
pub(crate) struct SavedLabels {
    pub(crate) host: Vec<i32>,
    pub(crate) device: Option<CudaSlice<i32>>,
}

impl SavedLabels {
    pub(crate) fn new(dev: &Device, labels: &[i32]) -> Result<Self> {
        let device = match dev {
            Device::Cpu => None,
            Device::Cuda(gpu) => Some(gpu.htod(labels)?),
        };
        Ok(Self {
            host: labels.to_vec(),
            device,
        })
    }

    fn device(&self) -> Result<&CudaSlice<i32>> {
        self.device
            .as_ref()
            .ok_or_else(|| HaloError::Autograd("labels were not uploaded to the device".into()))
    }
}

pub(crate) fn embedding_fwd(
    dev: &Device,
    table: StorageRef<'_>,
    ids: &SavedIds,
    dim: usize,
) -> Result<Storage> {
    let mut y = dev.for_overwrite(ids.len() * dim)?;
    match (dev, ids) {
        (Device::Cpu, SavedIds::Host(ids)) => {
            embedding_forward(host(table)?, ids, dim, y.host_mut()?);
        }
        (Device::Cuda(gpu), SavedIds::Cuda(ids)) => {
            gpu.embedding_forward(table.cuda_or_err()?, ids, dim, y.cuda_mut()?)?
        }
        _ => return Err(ids_mismatch()),
    }
    Ok(y)
}

fn ids_mismatch() -> HaloError {
    HaloError::Autograd("token ids saved on another device than the tape's".into())
}

pub(crate) fn embedding_bwd(
    dev: &Device,
    dy: StorageRef<'_>,
    ids: &SavedIds,
    dim: usize,
    dtable: &mut Storage,
) -> Result<()> {
    match (dev, ids) {
        (Device::Cpu, SavedIds::Host(ids)) => {
            embedding_backward(host(dy)?, ids, dim, dtable.host_mut()?);
            Ok(())
        }
        (Device::Cuda(gpu), SavedIds::Cuda(ids)) => {
            gpu.embedding_backward(dy.cuda_or_err()?, ids, dim, dtable.cuda_mut()?)
        }
        _ => Err(ids_mismatch()),
    }
}

/// `y = x·w (+ b)`, `x: [n, k]`, `w: [k, m]` or `[m, k]` when `transpose_w`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_fwd(
    dev: &Device,
    x: StorageRef<'_>,
    w: StorageRef<'_>,
    b: Option<StorageRef<'_>>,
    n: usize,
    k: usize,
    m: usize,
    transpose_w: bool,
) -> Result<Storage> {
    let mut y = dev.for_overwrite(n * m)?;
    match dev {
        Device::Cpu => linear_forward(
            host(x)?,
            host(w)?,
            b.map(|b| host(b)).transpose()?,
            n,
            k,
            m,
            transpose_w,
            y.host_mut()?,
        ),
        Device::Cuda(gpu) => {
            let gemm = gpu.gemm()?;
            let shape = GemmShape::packed(n, m, k, false, transpose_w);
            let (x, w) = (x.cuda_or_err()?, w.cuda_or_err()?);
            match b {
                // x·w, then every row plus the bias (the CPU's order: the product rounded, then
                // the bias added), without a host buffer of ones per call.
                Some(b) => {
                    let mut xw = gpu.alloc_zeros::<f32>(n * m)?;
                    gemm.gemm(&shape, 1.0, x, w, 0.0, &mut xw)?;
                    gpu.add_bias_forward(&xw, b.cuda_or_err()?, y.cuda_mut()?)?;
                }
                None => gemm.gemm(&shape, 1.0, x, w, 0.0, y.cuda_mut()?)?,
            }
        }
    }
    Ok(y)
}

/// Backward of [`linear_fwd`]: `dx += dy·wᵀ`, `dw += xᵀ·dy` (`dyᵀ·x` transposed), `db += Σ dy`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bwd(
    dev: &Device,
    x: StorageRef<'_>,
    w: StorageRef<'_>,
    dy: StorageRef<'_>,
    n: usize,
    k: usize,
    m: usize,
    transpose_w: bool,
    dx: Option<&mut Storage>,
    dw: Option<&mut Storage>,
    db: Option<&mut Storage>,
) -> Result<()> {
    match dev {
        Device::Cpu => {
            linear_backward(
                host(x)?,
                host(w)?,
                host(dy)?,
                n,
                k,
                m,
                transpose_w,
                host_opt(dx)?,
                host_opt(dw)?,
                host_opt(db)?,
            );
            Ok(())
        }
        Device::Cuda(gpu) => {
            let gemm = gpu.gemm()?;
            let (x, w, dy) = (x.cuda_or_err()?, w.cuda_or_err()?, dy.cuda_or_err()?);
            if let Some(dx) = dx {
                // dx[n, k] += dy[n, m] · op(w)ᵀ: w stored [k, m] → transposed; [m, k] → as is.
                let shape = GemmShape::packed(n, k, m, false, !transpose_w);
                gemm.gemm(&shape, 1.0, dy, w, 1.0, dx.cuda_mut()?)?;
            }
            if let Some(dw) = dw {
                if transpose_w {
                    // dw[m, k] += dyᵀ · x
                    let shape = GemmShape::packed(m, k, n, true, false);
                    gemm.gemm(&shape, 1.0, dy, x, 1.0, dw.cuda_mut()?)?;
                } else {
                    // dw[k, m] += xᵀ · dy
                    let shape = GemmShape::packed(k, m, n, true, false);
                    gemm.gemm(&shape, 1.0, x, dy, 1.0, dw.cuda_mut()?)?;
                }
            }
            if let Some(db) = db {
                gpu.bias_backward(dy, db.cuda_mut()?)?;
            }
            Ok(())
        }
    }
}

/// `y = x + b` with `b` broadcast over rows.
pub(crate) fn add_bias_fwd(dev: &Device, x: StorageRef<'_>, b: StorageRef<'_>) -> Result<Storage> {
    let mut y = dev.for_overwrite(x.len())?;
    match dev {
        Device::Cpu => ew::add_bias_forward(host(x)?, host(b)?, y.host_mut()?),
        Device::Cuda(gpu) => {
            gpu.add_bias_forward(x.cuda_or_err()?, b.cuda_or_err()?, y.cuda_mut()?)?
        }
    }
    Ok(y)
}

/// `db += Σ_rows dy`.
pub(crate) fn bias_bwd(dev: &Device, dy: StorageRef<'_>, db: &mut Storage) -> Result<()> {
    match dev {
        Device::Cpu => ew::bias_backward(host(dy)?, db.host_mut()?),
        Device::Cuda(gpu) => gpu.bias_backward(dy.cuda_or_err()?, db.cuda_mut()?)?,
    }
    Ok(())
}

/// `y = a + b`.
pub(crate) fn add_fwd(dev: &Device, a: StorageRef<'_>, b: StorageRef<'_>) -> Result<Storage> {
    let mut y = dev.for_overwrite(a.len())?;
    match dev {
        Device::Cpu => {
            for ((o, &x), &z) in y.host_mut()?.iter_mut().zip(host(a)?).zip(host(b)?) {
                *o = x + z;
            }
        }
        Device::Cuda(gpu) => gpu.add(a.cuda_or_err()?, b.cuda_or_err()?, y.cuda_mut()?)?,
    }
    Ok(y)
}

/// `y = factor · x`.
pub(crate) fn scale_fwd(dev: &Device, x: StorageRef<'_>, factor: f32) -> Result<Storage> {
    let mut y = dev.for_overwrite(x.len())?;
    match dev {
        Device::Cpu => {
            for (o, &v) in y.host_mut()?.iter_mut().zip(host(x)?) {
                *o = v * factor;
            }
        }
        Device::Cuda(gpu) => gpu.scale(x.cuda_or_err()?, factor, y.cuda_mut()?)?,
    }
    Ok(y)
}

/// The sum of all elements, one element (f64 on the CPU; a fixed-order reduction on CUDA).
pub(crate) fn sum_fwd(dev: &Device, x: StorageRef<'_>) -> Result<Storage> {
    match dev {
        Device::Cpu => {
            let s = host(x)?.iter().map(|&v| v as f64).sum::<f64>() as f32;
            Ok(vec![s].into())
        }
        Device::Cuda(gpu) => {
            let mut y = dev.zeros(1)?;
            gpu.sum(x.cuda_or_err()?, y.cuda_mut()?)?;
            Ok(y)
        }
    }
}

/// `dx += dy[0]` for every element (the backward of [`sum_fwd`]).
pub(crate) fn sum_bwd(dev: &Device, dy: StorageRef<'_>, dx: &mut Storage) -> Result<()> {
    match dev {
        Device::Cpu => {
            let g = host(dy)?[0];
            dx.host_mut()?.iter_mut().for_each(|d| *d += g);
        }
        // The scalar broadcast on the device: no read back.
        Device::Cuda(gpu) => gpu.accumulate_broadcast(dx.cuda_mut()?, dy.cuda_or_err()?)?,
    }
    Ok(())
}

/// `dst += src`.
pub(crate) fn accumulate(dev: &Device, dst: &mut Storage, src: StorageRef<'_>) -> Result<()> {
    match dev {
        Device::Cpu => ew::accumulate(dst.host_mut()?, host(src)?),
        Device::Cuda(gpu) => gpu.accumulate(dst.cuda_mut()?, src.cuda_or_err()?)?,
    }
    Ok(())
}

/// `dst += factor · src`.
pub(crate) fn accumulate_scaled(
    dev: &Device,
    dst: &mut Storage,
    src: StorageRef<'_>,
    factor: f32,
) -> Result<()> {
    match dev {
        Device::Cpu => ew::accumulate_scaled(dst.host_mut()?, host(src)?, factor),
        Device::Cuda(gpu) => gpu.accumulate_scaled(dst.cuda_mut()?, src.cuda_or_err()?, factor)?,
    }
    Ok(())
}

/// Layer norm over rows of `gamma.len()`: `(y, mean, rstd)`.
pub(crate) fn layernorm_fwd(
    dev: &Device,
    x: StorageRef<'_>,
    gamma: StorageRef<'_>,
    beta: StorageRef<'_>,
    eps: f32,
    rows: usize,
) -> Result<(Storage, Storage, Storage)> {
    let mut y = dev.for_overwrite(x.len())?;
    let mut mean = dev.for_overwrite(rows)?;
    let mut rstd = dev.for_overwrite(rows)?;
    match dev {
        Device::Cpu => layernorm_forward(
            host(x)?,
            host(gamma)?,
            host(beta)?,
            eps,
            y.host_mut()?,
            mean.host_mut()?,
            rstd.host_mut()?,
        ),
        Device::Cuda(gpu) => gpu.layernorm_forward(
            x.cuda_or_err()?,
            gamma.cuda_or_err()?,
            beta.cuda_or_err()?,
            eps,
            y.cuda_mut()?,
            mean.cuda_mut()?,
            rstd.cuda_mut()?,
        )?,
    }
    Ok((y, mean, rstd))
}

/// Backward of [`layernorm_fwd`], accumulating into the gradients given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_bwd(
    dev: &Device,
    x: StorageRef<'_>,
    gamma: StorageRef<'_>,
    mean: StorageRef<'_>,
    rstd: StorageRef<'_>,
    dy: StorageRef<'_>,
    dx: Option<&mut Storage>,
    dgamma: Option<&mut Storage>,
    dbeta: Option<&mut Storage>,
) -> Result<()> {
    match dev {
        Device::Cpu => layernorm_backward(
            host(x)?,
            host(gamma)?,
            host(mean)?,
            host(rstd)?,
            host(dy)?,
            host_opt(dx)?,
            host_opt(dgamma)?,
            host_opt(dbeta)?,
        ),
        Device::Cuda(gpu) => gpu.layernorm_backward(
            x.cuda_or_err()?,
            gamma.cuda_or_err()?,
            mean.cuda_or_err()?,
            rstd.cuda_or_err()?,
            dy.cuda_or_err()?,
            cuda_opt(dx)?,
            cuda_opt(dgamma)?,
            cuda_opt(dbeta)?,
        )?,
    }
    Ok(())
}

/// `y = gelu(x)` (tanh form).
pub(crate) fn gelu_fwd(dev: &Device, x: StorageRef<'_>) -> Result<Storage> {
    let mut y = dev.for_overwrite(x.len())?;
    match dev {
        Device::Cpu => gelu_forward(host(x)?, y.host_mut()?),
        Device::Cuda(gpu) => gpu.gelu_forward(x.cuda_or_err()?, y.cuda_mut()?)?,
    }
    Ok(y)
}

/// `dx += gelu'(x) · dy`.
pub(crate) fn gelu_bwd(
    dev: &Device,
    x: StorageRef<'_>,
    dy: StorageRef<'_>,
    dx: &mut Storage,
) -> Result<()> {
    match dev {
        Device::Cpu => gelu_backward(host(x)?, host(dy)?, dx.host_mut()?),
        Device::Cuda(gpu) => {
            gpu.gelu_backward(x.cuda_or_err()?, dy.cuda_or_err()?, dx.cuda_mut()?)?
        }
    }
    Ok(())
}

/// The core's twin of [`AttentionShape`].
fn dims(shape: AttentionShape) -> AttentionDims {
    AttentionDims {
        batch: shape.batch,
        seq: shape.seq,
        n_head: shape.n_head,
        dim: shape.dim,
    }
}

/// Causal self-attention: `(out, probs)`.
pub(crate) fn attention_fwd(
    dev: &Device,
    qkv: StorageRef<'_>,
    shape: AttentionShape,
) -> Result<(Storage, Storage)> {
    let AttentionShape {
        batch,
        seq,
        n_head,
        dim,
    } = shape;
    let mut out = dev.for_overwrite(batch * seq * dim)?;
    let mut probs = dev.for_overwrite(batch * n_head * seq * seq)?;
    match dev {
        Device::Cpu => attention_forward(host(qkv)?, shape, out.host_mut()?, probs.host_mut()?),
        Device::Cuda(gpu) => gpu.attention_forward(
            qkv.cuda_or_err()?,
            dims(shape),
            out.cuda_mut()?,
            probs.cuda_mut()?,
        )?,
    }
    Ok((out, probs))
}

/// Backward of [`attention_fwd`], accumulating into `dqkv`.
pub(crate) fn attention_bwd(
    dev: &Device,
    qkv: StorageRef<'_>,
    probs: StorageRef<'_>,
    dout: StorageRef<'_>,
    shape: AttentionShape,
    dqkv: &mut Storage,
) -> Result<()> {
    match dev {
        Device::Cpu => attention_backward(
            host(qkv)?,
            host(probs)?,
            host(dout)?,
            shape,
            dqkv.host_mut()?,
        ),
        Device::Cuda(gpu) => gpu.attention_backward(
            qkv.cuda_or_err()?,
            probs.cuda_or_err()?,
            dout.cuda_or_err()?,
            dims(shape),
            dqkv.cuda_mut()?,
        )?,
    }
    Ok(())
}

/// `y = x ⊙ m`.
pub(crate) fn multiply(dev: &Device, x: StorageRef<'_>, m: StorageRef<'_>) -> Result<Storage> {
    let mut y = dev.for_overwrite(x.len())?;
    match dev {
        Device::Cpu => ew::multiply(host(x)?, host(m)?, y.host_mut()?),
        Device::Cuda(gpu) => gpu.multiply(x.cuda_or_err()?, m.cuda_or_err()?, y.cuda_mut()?)?,
    }
    Ok(y)
}

/// `dst += a ⊙ b`.
pub(crate) fn accumulate_product(
    dev: &Device,
    dst: &mut Storage,
    a: StorageRef<'_>,
    b: StorageRef<'_>,
) -> Result<()> {
    match dev {
        Device::Cpu => ew::accumulate_product(dst.host_mut()?, host(a)?, host(b)?),
        Device::Cuda(gpu) => {
            gpu.accumulate_product(dst.cuda_mut()?, a.cuda_or_err()?, b.cuda_or_err()?)?
        }
    }
    Ok(())
}

/// Per-row log-probs of the labels: `(logp, lse, lse_residual)`. On a CUDA device the kernel's
/// checks (labels, finite logits) go to `checks`, read with the step's other values.
pub(crate) fn token_logprobs_fwd(
    dev: &Device,
    logits: StorageRef<'_>,
    labels: &SavedLabels,
    vocab: usize,
    checks: &mut DeviceChecks,
) -> Result<(Storage, Storage, Storage)> {
    match dev {
        Device::Cpu => {
            let out = halo_kernels::cpu::token_logprobs(
                host(logits)?,
                &labels.host,
                vocab,
                IGNORE_INDEX,
            )?;
            Ok((out.logp.into(), out.lse.into(), out.lse_residual.into()))
        }
        Device::Cuda(gpu) => {
            let rows = labels.host.len();
            let mut status = gpu.new_status()?;
            let mut out: [CudaSlice<f32>; 3] = [
                gpu.alloc_zeros(rows)?,
                gpu.alloc_zeros(rows)?,
                gpu.alloc_zeros(rows)?,
            ];
            let [logp, lse, residual] = &mut out;
            gpu.enqueue_token_logprobs(
                logits.cuda_or_err()?,
                labels.device()?,
                vocab,
                IGNORE_INDEX,
                logp,
                lse,
                residual,
                &mut status,
            )?;
            let host_labels = labels.host.clone();
            checks.push(status, move |word| {
                word.token_forward_error(|row| Ok(host_labels[row]), vocab, IGNORE_INDEX)
            });
            let [logp, lse, residual] = out;
            Ok((
                Storage::Cuda(logp),
                Storage::Cuda(lse),
                Storage::Cuda(residual),
            ))
        }
    }
}

/// The check of a queued token log-prob backward: its status word turned into the CPU op's error
/// (the lse, which the error names, read back only then).
fn push_backward_check(
    gpu: &Arc<CudaBackend>,
    checks: &mut DeviceChecks,
    status: KernelStatus,
    labels: &SavedLabels,
    lse: Storage,
    vocab: usize,
) -> Result<()> {
    let Storage::Cuda(lse) = lse else {
        return Err(dev_mismatch("saved lse"));
    };
    let (gpu, host_labels) = (gpu.clone(), labels.host.clone());
    checks.push(status, move |word| {
        word.token_backward_error(
            |row| Ok(host_labels[row]),
            |row| Ok(gpu.dtoh(&lse.slice(row..row + 1))?[0]),
            vocab,
            IGNORE_INDEX,
            halo_kernels::dtype::DType::F32,
        )
    });
    Ok(())
}

fn dev_mismatch(what: &str) -> HaloError {
    HaloError::Autograd(format!("{what}: a host buffer on a CUDA tape"))
}

/// `∂L/∂logits` of [`token_logprobs_fwd`] into a new buffer (`saved`: its lse and residual).
pub(crate) fn token_logprobs_bwd(
    dev: &Device,
    logits: StorageRef<'_>,
    labels: &SavedLabels,
    saved: (Storage, Storage),
    dy: StorageRef<'_>,
    vocab: usize,
    checks: &mut DeviceChecks,
) -> Result<Storage> {
    let mut dz = dev.zeros(logits.len())?;
    match dev {
        Device::Cpu => halo_kernels::cpu::token_logprobs_backward(
            host(logits)?,
            &labels.host,
            SavedLse::new(host(saved.0.as_ref())?, host(saved.1.as_ref())?),
            host(dy)?,
            vocab,
            IGNORE_INDEX,
            dz.host_mut()?,
        )?,
        Device::Cuda(gpu) => {
            let mut status = gpu.new_status()?;
            gpu.enqueue_token_logprobs_backward(
                logits.cuda_or_err()?,
                labels.device()?,
                SavedLse::new(
                    saved.0.as_ref().cuda_or_err()?,
                    saved.1.as_ref().cuda_or_err()?,
                ),
                dy.cuda_or_err()?,
                vocab,
                IGNORE_INDEX,
                dz.cuda_mut()?,
                &mut status,
            )?;
            push_backward_check(gpu, checks, status, labels, saved.0, vocab)?;
        }
    }
    Ok(dz)
}

/// [`token_logprobs_bwd`] overwriting the logits with their gradient (no second buffer).
pub(crate) fn token_logprobs_bwd_inplace(
    dev: &Device,
    logits: &mut Storage,
    labels: &SavedLabels,
    saved: (Storage, Storage),
    dy: StorageRef<'_>,
    vocab: usize,
    checks: &mut DeviceChecks,
) -> Result<()> {
    match dev {
        Device::Cpu => halo_kernels::cpu::token_logprobs_backward_inplace(
            logits.host_mut()?,
            &labels.host,
            SavedLse::new(host(saved.0.as_ref())?, host(saved.1.as_ref())?),
            host(dy)?,
            vocab,
            IGNORE_INDEX,
        ),
        Device::Cuda(gpu) => {
            let mut status = gpu.new_status()?;
            gpu.enqueue_token_logprobs_backward_inplace(
                logits.cuda_mut()?,
                labels.device()?,
                SavedLse::new(
                    saved.0.as_ref().cuda_or_err()?,
                    saved.1.as_ref().cuda_or_err()?,
                ),
                dy.cuda_or_err()?,
                vocab,
                IGNORE_INDEX,
                &mut status,
            )?;
            push_backward_check(gpu, checks, status, labels, saved.0, vocab)
        }
    }
}

/// The fused LM head's per-token log-probs of `hidden · weightᵀ`: `(logp, row_max, ln_sum)`.
pub(crate) fn fused_head_fwd(
    dev: &Device,
    hidden: StorageRef<'_>,
    weight: StorageRef<'_>,
    labels: &SavedLabels,
    vocab: usize,
    hidden_size: usize,
    checks: &mut DeviceChecks,
) -> Result<(Storage, Storage, Storage)> {
    match dev {
        Device::Cpu => {
            let head = halo_kernels::fused_head::LmHead {
                weight: host(weight)?,
                bias: None,
                vocab,
                hidden_size,
            };
            let out = halo_kernels::fused_head::fused_linear_token_logprobs(
                host(hidden)?,
                &head,
                &labels.host,
                IGNORE_INDEX,
                None,
            )?;
            Ok((out.logp.into(), out.row_max.into(), out.ln_sum.into()))
        }
        Device::Cuda(gpu) => {
            let head = halo_kernels::cuda::CudaLmHead {
                weight: weight.cuda_or_err()?,
                bias: None,
                vocab,
                hidden_size,
            };
            let mut status = gpu.new_status()?;
            let out = gpu.enqueue_fused_linear_token_logprobs(
                hidden.cuda_or_err()?,
                &head,
                &labels.host,
                IGNORE_INDEX,
                None,
                &mut status,
            )?;
            let host_labels = labels.host.clone();
            checks.push(status, move |word| {
                word.fused_forward_error(&host_labels, IGNORE_INDEX)
            });
            Ok((
                Storage::Cuda(out.logp),
                Storage::Cuda(out.row_max),
                Storage::Cuda(out.ln_sum),
            ))
        }
    }
}

/// Backward of [`fused_head_fwd`]: new `(∂hidden, ∂weight)` buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused_head_bwd(
    dev: &Device,
    hidden: StorageRef<'_>,
    weight: StorageRef<'_>,
    labels: &SavedLabels,
    saved: (StorageRef<'_>, StorageRef<'_>),
    dy: StorageRef<'_>,
    vocab: usize,
    hidden_size: usize,
    checks: &mut DeviceChecks,
) -> Result<(Storage, Storage)> {
    match dev {
        Device::Cpu => {
            let head = halo_kernels::fused_head::LmHead {
                weight: host(weight)?,
                bias: None,
                vocab,
                hidden_size,
            };
            let g = halo_kernels::fused_head::fused_linear_token_logprobs_backward(
                host(hidden)?,
                &head,
                &labels.host,
                IGNORE_INDEX,
                host(saved.0)?,
                host(saved.1)?,
                host(dy)?,
                None,
            )?;
            Ok((g.hidden.into(), g.weight.into()))
        }
        Device::Cuda(gpu) => {
            let head = halo_kernels::cuda::CudaLmHead {
                weight: weight.cuda_or_err()?,
                bias: None,
                vocab,
                hidden_size,
            };
            let mut status = gpu.new_fused_backward_status()?;
            let g = gpu.enqueue_fused_linear_token_logprobs_backward(
                hidden.cuda_or_err()?,
                &head,
                &labels.host,
                IGNORE_INDEX,
                halo_kernels::cuda::CudaFusedSaved {
                    row_max: saved.0.cuda_or_err()?,
                    ln_sum: saved.1.cuda_or_err()?,
                    grad_logp: dy.cuda_or_err()?,
                },
                None,
                &mut status,
            )?;
            let FusedBackwardStatus { tiles, grads } = status;
            let host_labels = labels.host.clone();
            checks.push(tiles, move |word| {
                word.fused_backward_tiles_error(&host_labels, IGNORE_INDEX)
            });
            checks.push(grads, |word| word.fused_gradient_sums_error());
            Ok((Storage::Cuda(g.hidden), Storage::Cuda(g.weight)))
        }
    }
}

/// A dropout mask drawn on the host (the same draws on every device, so runs match), then
/// placed on the device.
pub(crate) fn dropout_mask(
    dev: &Device,
    len: usize,
    p: f32,
    rng: &mut impl rand::Rng,
) -> Result<Storage> {
    let mut mask = Buffer::for_overwrite(len);
    ew::dropout_mask(&mut mask, p, rng);
    match dev {
        Device::Cpu => Ok(mask.into()),
        Device::Cuda(_) => dev.upload(&mask),
    }
}
