//! Logits of every fixture model against transformers (fixtures/generate.py), within 1e-4 in f32.

mod common;

use burn::tensor::Device;
use common::*;
use resonance_models::registry::AnyModel;

const TOLERANCE: f32 = 1e-4;

fn check_model(name: &str, device: &Device) -> f32 {
    check_model_against(name, name, device)
}

/// Loads `name` and compares with the expected outputs stored beside `reference`.
fn check_model_against(name: &str, reference: &str, device: &Device) -> f32 {
    let dir = fixtures().join(name);
    let expected = read_tensors(&fixtures().join(reference).join("expected.safetensors"));
    let mask = rows_bool(&expected["attention_mask"]);
    let model = AnyModel::load(&dir, device).unwrap_or_else(|e| panic!("{name}: {e}"));
    let logits =
        fixture_logits(&model, &expected, device).unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference = &expected["logits"];
    assert_eq!(
        logits.dims().to_vec(),
        reference.shape,
        "{name}: logits shape"
    );
    let vocab = reference.shape[2];
    let diff = max_masked_diff(&host(logits), &reference.floats, &mask, vocab);
    println!("{name}: max |Δlogits| = {diff:.3e}");
    assert!(
        diff <= TOLERANCE,
        "{name}: max |Δlogits| = {diff} > {TOLERANCE}"
    );
    diff
}

#[test]
fn llama_logits_match_transformers() {
    check_model("tiny-llama", &Device::flex());
}

#[test]
fn llama3_rope_logits_match_transformers() {
    check_model("tiny-llama3-rope", &Device::flex());
}

#[test]
fn linear_rope_logits_match_transformers() {
    check_model("tiny-llama-linear-rope", &Device::flex());
}

#[test]
fn mistral_sliding_window_logits_match_transformers() {
    check_model("tiny-mistral", &Device::flex());
}

#[test]
fn qwen2_logits_match_transformers() {
    check_model("tiny-qwen2", &Device::flex());
}

#[test]
fn llava_logits_match_transformers() {
    check_model("tiny-llava", &Device::flex());
}

#[test]
fn sharded_llava_logits_match_transformers() {
    // The sharded folder holds tiny-llava's exact weights split into shards.
    check_model_against("tiny-llava-sharded", "tiny-llava", &Device::flex());
}

#[test]
fn llava_full_strategy_qwen2_logits_match_transformers() {
    check_model("tiny-llava-full", &Device::flex());
}

#[test]
fn dynamic_rope_logits_match_transformers() {
    check_model("tiny-llama-dynamic-rope", &Device::flex());
}

/// DPO's policy runs under autodiff and its reference without; a reference that encodes its own
/// images (a frozen copy while the projector trains, a named reference) or a frozen copy of a
/// fully trained text model must give the policy's logits to the bit at step 0, or a zero margin
/// comes out as ±1 ulp and flips the reward accuracy. Every parameter of the tracked model
/// requires gradients, so every operation takes its autodiff path.
#[test]
fn logits_under_autodiff_equal_the_plain_ones_to_the_bit() {
    let plain = Device::flex();
    for name in [
        "tiny-llava",
        "tiny-llava-full",
        "tiny-llama",
        "tiny-llama3-rope",
        "tiny-mistral",
        "tiny-qwen2",
    ] {
        let dir = fixtures().join(name);
        let expected = read_tensors(&dir.join("expected.safetensors"));
        let bits = |device: &Device| -> Vec<u32> {
            let model = AnyModel::load(&dir, device).unwrap_or_else(|e| panic!("{name}: {e}"));
            let logits =
                fixture_logits(&model, &expected, device).unwrap_or_else(|e| panic!("{name}: {e}"));
            host(logits).into_iter().map(f32::to_bits).collect()
        };
        let (plain_bits, tracked_bits) = (bits(&plain), bits(&plain.clone().autodiff()));
        let differing = plain_bits
            .iter()
            .zip(&tracked_bits)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing,
            0,
            "{name}: {differing} of {} logits differ",
            plain_bits.len()
        );
    }
}
