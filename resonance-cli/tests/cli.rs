//! The `resonance` binary end to end: the README's demo command, and clear errors on bad input.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn resonance(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_resonance"))
        .args(args)
        .current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", root().join("target/no-hub-cache"))
        .output()
        .expect("binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_score_writes_one_line_per_record() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("scores.jsonl");
    let (ok, _, err) = resonance(&[
        "score",
        "--model",
        "fixtures/tiny-llava",
        "--data",
        "data/demo/score.jsonl",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for line in &lines {
        let n = line["num_tokens"].as_u64().unwrap() as usize;
        let logps = line["token_logprobs"].as_array().unwrap();
        assert_eq!(logps.len(), n);
        let sum: f64 = logps.iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - line["logprob"].as_f64().unwrap()).abs() < 1e-3);
        assert!(line["logprob"].as_f64().unwrap() < 0.0);
    }
}

#[test]
fn generate_json_matches_transformers_greedy_ids() {
    let (ok, out, err) = resonance(&[
        "generate",
        "--model",
        "fixtures/tiny-llava",
        "--image",
        "fixtures/images/gradient_48x36.png",
        "--prompt",
        "What is in this image?",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    assert!(ok, "{err}");
    let value: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/tiny-llava/generate_expected.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(value["new_ids"], expected["new_ids"]);
}

#[test]
fn missing_image_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"image\": \"nope.png\", \"prompt\": \"a\", \"response\": \"b\"}\n",
    )
    .unwrap();
    let (ok, _, err) = resonance(&[
        "score",
        "--model",
        "fixtures/tiny-llava",
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("nope.png"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn image_for_a_text_only_model_is_refused() {
    let (ok, _, err) = resonance(&[
        "generate",
        "--model",
        "fixtures/tiny-llama",
        "--image",
        "fixtures/images/gradient_48x36.png",
        "--prompt",
        "hi",
    ]);
    assert!(!ok);
    assert!(err.contains("text-only"), "{err}");
}

#[test]
fn unknown_model_reference_is_explained() {
    let (ok, _, err) = resonance(&["generate", "--model", "nobody/nothing", "--prompt", "hi"]);
    assert!(!ok);
    assert!(
        err.contains("nobody/nothing") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

#[test]
fn models_lists_llava() {
    let (ok, out, _) = resonance(&["models"]);
    assert!(ok);
    assert!(out.contains("LlavaForConditionalGeneration") && out.contains("qwen2"));
}
