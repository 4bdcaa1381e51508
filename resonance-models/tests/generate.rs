//! Greedy decoding with the KV cache reproduces transformers' `generate` ids.

mod common;

use burn::tensor::Device;
use common::fixtures;
use resonance_models::generate::{generate, SamplingConfig};
use resonance_models::processor::Processor;
use resonance_models::registry::AnyModel;
use serde_json::Value;

fn check_cases(name: &str) {
    let device = Device::flex();
    let dir = fixtures().join(name);
    let model = AnyModel::load(&dir, &device).expect("fixture loads");
    let processor = Processor::from_dir(&dir, &model).expect("processor loads");
    let text = std::fs::read_to_string(dir.join("generate_expected.json")).expect("fixture");
    let expected: Value = serde_json::from_str(&text).expect("json");
    let cases = expected["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let images: Vec<_> = case
            .get("image")
            .and_then(Value::as_str)
            .map(|p| dir.join(p))
            .into_iter()
            .collect();
        let prompt_text = processor
            .render_prompt(prompt, images.len())
            .expect("template");
        assert_eq!(
            prompt_text,
            case["prompt_text"].as_str().expect("prompt_text")
        );
        let prompt_ids = processor
            .prompt_ids(&prompt_text, images.len())
            .expect("ids");
        let want_prompt: Vec<u32> =
            serde_json::from_value(case["prompt_ids"].clone()).expect("ids");
        assert_eq!(prompt_ids, want_prompt, "{name}: prompt ids of {prompt:?}");
        let pixels = processor.pixel_values(&images, &device).expect("pixels");
        let config = SamplingConfig {
            max_new_tokens: case["max_new_tokens"].as_u64().expect("max") as usize,
            ..Default::default()
        };
        let eos = processor.tokenizer.eos_token_ids();
        let ids = generate(&model, &prompt_ids, pixels, &eos, &config, &device, |_| {})
            .expect("generation");
        let want: Vec<u32> = serde_json::from_value(case["new_ids"].clone()).expect("new ids");
        assert_eq!(ids, want, "{name}: greedy ids for {prompt:?}");
    }
}

#[test]
fn greedy_generation_matches_transformers_for_llama() {
    check_cases("tiny-llama");
}

#[test]
fn greedy_generation_matches_transformers_for_llava() {
    check_cases("tiny-llava");
}
