//! The same LLaVA forward on wgpu (Mesa lavapipe on CI) and on the CPU backend.
#![cfg(feature = "wgpu")]

mod common;

use burn::tensor::{Device, DeviceKind};
use common::*;
use resonance_models::registry::{AnyModel, ModelInputs};

#[test]
fn llava_on_wgpu_matches_cpu() {
    let dir = fixtures().join("tiny-llava");
    let expected = read_tensors(&dir.join("expected.safetensors"));
    let ids = rows_u32(&expected["input_ids"]);
    let mask = rows_bool(&expected["attention_mask"]);
    let run = |device: &Device| {
        let model = AnyModel::load(&dir, device).expect("fixture loads");
        let logits = model
            .forward(
                ModelInputs {
                    input_ids: &ids,
                    attention_mask: &mask,
                    pixel_values: Some(tensor4(&expected["pixel_values"], device)),
                },
                None,
                device,
            )
            .expect("forward");
        host(logits)
    };
    let cpu = run(&Device::flex());
    let gpu = run(&Device::wgpu(DeviceKind::DefaultDevice));
    let vocab = expected["logits"].shape[2];
    let diff = max_masked_diff(&gpu, &cpu, &mask, vocab);
    println!("wgpu vs cpu: max |Δlogits| = {diff:.3e}");
    assert!(diff <= 1e-4, "wgpu and cpu differ by {diff}");
}
