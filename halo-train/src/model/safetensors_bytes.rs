//! The bytes of a safetensors file, deterministically.
//!
//! The `safetensors` crate (0.4) serialises its `__metadata__` from a `HashMap`, whose iteration
//! order changes from process to process, so identical weights gave files with different bytes.
//! This writer builds the header itself: the format is an 8-byte little-endian header length, a
//! JSON header (`{"__metadata__": {...}, "<name>": {"dtype", "shape", "data_offsets"}, ...}`)
//! padded with spaces to a multiple of 8, then the tensor data back to back. JSON objects are
//! `serde_json::Map`, a `BTreeMap` (no `preserve_order` feature), so keys come out sorted and the
//! same input always gives the same bytes. Data is laid out in the order the tensors are given.

use std::collections::BTreeMap;

use safetensors::Dtype;
use serde_json::{json, Map, Value};

use halo_kernels::error::{HaloError, Result};

/// One tensor to write: its name, shape, element type and little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorBytes<'a> {
    /// Tensor name (the header key).
    pub name: &'a str,
    /// Shape; the product times the element size must equal `data.len()`.
    pub shape: &'a [usize],
    /// Element type.
    pub dtype: Dtype,
    /// Little-endian element bytes.
    pub data: &'a [u8],
}

fn dtype_name(dtype: Dtype) -> Result<(&'static str, usize)> {
    match dtype {
        Dtype::F32 => Ok(("F32", 4)),
        Dtype::BF16 => Ok(("BF16", 2)),
        Dtype::F16 => Ok(("F16", 2)),
        other => Err(HaloError::Checkpoint(format!(
            "cannot write dtype {other:?}: only F32, BF16 and F16 are written"
        ))),
    }
}

/// The complete file: header and data. Errors on a duplicate name, a reserved name
/// (`__metadata__`) or data whose length does not match its shape.
pub fn safetensors_bytes(
    tensors: &[TensorBytes<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        header.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut offset = 0usize;
    for t in tensors {
        let (dtype, size) = dtype_name(t.dtype)?;
        let expected = t
            .shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                HaloError::Checkpoint(format!(
                    "tensor `{}`: shape {:?} overflows",
                    t.name, t.shape
                ))
            })?;
        if expected != t.data.len() {
            return Err(HaloError::Checkpoint(format!(
                "tensor `{}`: shape {:?} of {dtype} needs {expected} bytes, got {}",
                t.name,
                t.shape,
                t.data.len()
            )));
        }
        let end = offset + t.data.len();
        let entry = json!({ "dtype": dtype, "shape": t.shape, "data_offsets": [offset, end] });
        if t.name == "__metadata__" || header.insert(t.name.to_string(), entry).is_some() {
            return Err(HaloError::Checkpoint(format!(
                "tensor name `{}` is reserved or given twice",
                t.name
            )));
        }
        offset = end;
    }
    let mut header = Value::Object(header).to_string().into_bytes();
    // Pad with spaces (valid JSON whitespace) so the data starts 8-byte aligned.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut bytes = Vec::with_capacity(8 + header.len() + offset);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    for t in tensors {
        bytes.extend_from_slice(t.data);
    }
    Ok(bytes)
}
