//! Helpers shared by the parity tests: fixture paths and reading expected tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use resonance_models::registry::{AnyModel, Images, ModelInputs};
use safetensors::{Dtype, SafeTensors};

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A tensor read from a fixture file, as f64 values or i64 values.
pub struct Expected {
    pub shape: Vec<usize>,
    pub floats: Vec<f32>,
    pub ints: Vec<i64>,
}

/// Reads every tensor of a safetensors file.
pub fn read_tensors(path: &PathBuf) -> HashMap<String, Expected> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors fixture");
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let (floats, ints) = match view.dtype() {
            Dtype::F32 => (
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Vec::new(),
            ),
            Dtype::I64 => (
                Vec::new(),
                data.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            other => panic!("unexpected dtype {other:?} for {name}"),
        };
        out.insert(
            name,
            Expected {
                shape: view.shape().to_vec(),
                floats,
                ints,
            },
        );
    }
    out
}

/// Logits of `model` on the inputs of a fixture's `expected.safetensors` (`input_ids`,
/// `attention_mask`, and `pixel_values` when present), placed on `device`.
pub fn fixture_logits(
    model: &AnyModel,
    expected: &HashMap<String, Expected>,
    device: &Device,
) -> resonance_models::Result<Tensor<3>> {
    let ids = rows_u32(&expected["input_ids"]);
    let mask = rows_bool(&expected["attention_mask"]);
    model.forward(
        ModelInputs {
            input_ids: &ids,
            attention_mask: &mask,
            images: Images::pixels(expected.get("pixel_values").map(|p| tensor4(p, device))),
        },
        None,
        device,
    )
}

/// Rows of an `[b, t]` integer tensor.
pub fn rows_u32(e: &Expected) -> Vec<Vec<u32>> {
    e.ints
        .chunks(e.shape[1])
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect()
}

/// Rows of an `[b, t]` 0/1 mask.
pub fn rows_bool(e: &Expected) -> Vec<Vec<bool>> {
    e.ints
        .chunks(e.shape[1])
        .map(|r| r.iter().map(|&v| v != 0).collect())
        .collect()
}

/// A 4-D float tensor on `device`.
pub fn tensor4(e: &Expected, device: &Device) -> Tensor<4> {
    let shape: [usize; 4] = e.shape.clone().try_into().expect("4-D tensor");
    Tensor::from_data(TensorData::new(e.floats.clone(), shape), device)
}

/// Largest |a - b| over positions where `mask[b][t]` holds, for `[b, t, v]` logits.
pub fn max_masked_diff(actual: &[f32], expected: &[f32], mask: &[Vec<bool>], vocab: usize) -> f32 {
    assert_eq!(actual.len(), expected.len(), "logit sizes differ");
    let mut worst = 0.0f32;
    let t = mask[0].len();
    for (b, row) in mask.iter().enumerate() {
        for (i, &valid) in row.iter().enumerate() {
            if !valid {
                continue;
            }
            let start = (b * t + i) * vocab;
            for k in start..start + vocab {
                worst = worst.max((actual[k] - expected[k]).abs());
            }
        }
    }
    worst
}

/// Reads a tensor back to the host.
pub fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32 tensor")
}
