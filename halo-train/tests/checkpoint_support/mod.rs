//! Shared by the checkpoint tests: raw safetensors files written tensor by tensor (to build the
//! malformed or hand-made checkpoints a loader must refuse or accept).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use halo_train::model::Gpt;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Writes `tensors` (name → (shape, f32 data)) with optional metadata.
pub fn write_raw(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: Option<HashMap<String, String>>,
) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| bytemuck::cast_slice(d).to_vec())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &metadata, path).unwrap();
}

/// Every parameter of `model` as (name, shape, data).
pub fn as_raw(model: &Gpt) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    model
        .parameters()
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone(), p.data.clone()))
        .collect()
}
