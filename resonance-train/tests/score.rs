//! `score` end to end, from image files and text to log-probs, against transformers.

use std::path::PathBuf;

use burn::tensor::Device;
use resonance_models::processor::Processor;
use resonance_models::registry::AnyModel;
use resonance_train::score::{read_score_records, score_records};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Returns the largest |Δ| of summed log-probs over records with and without images.
fn check(name: &str, batch_size: usize) -> (f64, f64) {
    let device = Device::flex();
    let dir = fixtures().join(name);
    let model = AnyModel::load(&dir, &device).expect("fixture loads");
    let processor = Processor::from_dir(&dir, &model).expect("processor");
    let records = read_score_records(&dir.join("score_input.jsonl")).expect("records");
    let outputs = score_records(
        &model,
        &processor,
        &records,
        &dir,
        batch_size,
        &device,
        |_| {},
    )
    .expect("scores");
    let expected: Vec<Value> = std::fs::read_to_string(dir.join("score_expected.jsonl"))
        .expect("expected")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(outputs.len(), expected.len());
    let (mut with_images, mut text_only) = (0.0f64, 0.0f64);
    for ((record, out), want) in records.iter().zip(&outputs).zip(&expected) {
        let encoded = processor
            .encode_pair(&record.prompt, &record.response, record.image_paths().len())
            .expect("encode");
        let want_prompt: Vec<u32> = serde_json::from_value(want["prompt_ids"].clone()).unwrap();
        let want_response: Vec<u32> = serde_json::from_value(want["response_ids"].clone()).unwrap();
        assert_eq!(
            encoded.prompt_ids, want_prompt,
            "prompt ids of {:?}",
            record.prompt
        );
        assert_eq!(
            encoded.response_ids, want_response,
            "response ids of {:?}",
            record.response
        );
        assert_eq!(
            out.num_tokens,
            want["num_tokens"].as_u64().unwrap() as usize
        );
        let diff = (out.logprob - want["logprob"].as_f64().unwrap()).abs();
        for (a, b) in out
            .token_logprobs
            .iter()
            .zip(want["token_logprobs"].as_array().unwrap())
        {
            let d = (*a as f64 - b.as_f64().unwrap()).abs();
            if record.image_paths().is_empty() {
                text_only = text_only.max(d);
            } else {
                with_images = with_images.max(d);
            }
        }
        if record.image_paths().is_empty() {
            text_only = text_only.max(diff);
        } else {
            with_images = with_images.max(diff);
        }
    }
    println!("{name}: max |Δlogprob| with images {with_images:.3e}, text only {text_only:.3e}");
    (with_images, text_only)
}

#[test]
fn llava_scores_match_transformers_from_image_files() {
    let (with_images, text_only) = check("tiny-llava", 2);
    assert!(with_images <= 5e-3, "with images: {with_images}");
    assert!(text_only <= 1e-4, "text only: {text_only}");
}

#[test]
fn llama_scores_match_transformers() {
    let (_, text_only) = check("tiny-llama", 3);
    assert!(text_only <= 1e-4, "text only: {text_only}");
}

#[test]
fn batch_size_does_not_change_scores() {
    let device = Device::flex();
    let dir = fixtures().join("tiny-llava");
    let model = AnyModel::load(&dir, &device).unwrap();
    let processor = Processor::from_dir(&dir, &model).unwrap();
    let records = read_score_records(&dir.join("score_input.jsonl")).unwrap();
    let one = score_records(&model, &processor, &records, &dir, 1, &device, |_| {}).unwrap();
    let all = score_records(&model, &processor, &records, &dir, 8, &device, |_| {}).unwrap();
    for (a, b) in one.iter().zip(&all) {
        assert!(
            (a.logprob - b.logprob).abs() < 1e-4,
            "{} vs {}",
            a.logprob,
            b.logprob
        );
    }
}

#[test]
fn malformed_line_is_reported_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\"}\n",
    )
    .unwrap();
    let err = read_score_records(&path).unwrap_err().to_string();
    assert!(
        err.contains("bad.jsonl:2:") && err.contains("response"),
        "{err}"
    );
    std::fs::write(
        &path,
        "{\"prompt\": \"a\", \"response\": \"b\", \"imgae\": \"x.png\"}\n",
    )
    .unwrap();
    let err = read_score_records(&path).unwrap_err().to_string();
    assert!(
        err.contains("bad.jsonl:1:") && err.contains("imgae"),
        "{err}"
    );
}
