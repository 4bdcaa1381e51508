//! The same LLaVA forward on wgpu (Mesa lavapipe on CI) and on the CPU backend.
#![cfg(feature = "wgpu")]

mod common;

use burn::tensor::{Device, DeviceKind};
use common::*;
use resonance_models::registry::AnyModel;

#[test]
fn llava_on_wgpu_matches_cpu() {
    let dir = fixtures().join("tiny-llava");
    let expected = read_tensors(&dir.join("expected.safetensors"));
    let mask = rows_bool(&expected["attention_mask"]);
    let run = |device: &Device| {
        let model = AnyModel::load(&dir, device).expect("fixture loads");
        host(fixture_logits(&model, &expected, device).expect("forward"))
    };
    let cpu = run(&Device::flex());
    let gpu = run(&Device::wgpu(DeviceKind::DefaultDevice));
    let vocab = expected["logits"].shape[2];
    let diff = max_masked_diff(&gpu, &cpu, &mask, vocab);
    println!("wgpu vs cpu: max |Δlogits| = {diff:.3e}");
    assert!(diff <= 1e-4, "wgpu and cpu differ by {diff}");
}

/// f16 on wgpu (lavapipe has 16-bit float shaders) is as close to the f32 logits as transformers
/// in f16 is; bf16, which WGSL lacks, is refused with an error naming the dtype.
#[test]
fn f16_on_wgpu_matches_transformers_and_bf16_is_refused() {
    use burn::tensor::FloatDType;
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let dir = fixtures().join("tiny-llava");
    let expected = read_tensors(&dir.join("expected.safetensors"));
    let half = read_tensors(&fixtures().join("half/expected.safetensors"));
    let mask = rows_bool(&expected["attention_mask"]);
    let load = || AnyModel::load(&dir, &device).expect("fixture loads");
    if device.supports_dtype(FloatDType::BF16) {
        println!("this wgpu device has bf16: refusal not checked");
    } else {
        let err = load()
            .into_precision(FloatDType::BF16, &device)
            .expect_err("bf16 is refused");
        assert!(err.to_string().contains("BF16"), "{err}");
    }
    assert!(
        device.supports_dtype(FloatDType::F16),
        "the wgpu device has no f16 (lavapipe has it)"
    );
    let model = load()
        .into_precision(FloatDType::F16, &device)
        .expect("f16 on wgpu");
    let logits = fixture_logits(&model, &expected, &device).expect("forward");
    let vocab = expected["logits"].shape[2];
    let ours = host(logits);
    let our_error = max_masked_diff(&ours, &expected["logits"].floats, &mask, vocab);
    let transformers_error = half["tiny-llava.f32_error.f16"].floats[0];
    let to_transformers =
        max_masked_diff(&ours, &half["tiny-llava.f16.logits"].floats, &mask, vocab);
    println!(
        "wgpu f16: max |ours - f32| = {our_error:.3e}, transformers {transformers_error:.3e}, \
         |ours - transformers| = {to_transformers:.3e}"
    );
    assert!(our_error > 0.1 * transformers_error, "not computed in f16");
    assert!(our_error <= 2.0 * transformers_error);
    assert!(to_transformers <= 2.0 * transformers_error);
}
