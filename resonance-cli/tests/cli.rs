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
fn score_in_bf16_is_close_to_f32_and_a_bad_dtype_is_named() {
    let score = |dtype: &str| {
        resonance(&[
            "score",
            "--model",
            "fixtures/tiny-llava",
            "--data",
            "data/demo/score.jsonl",
            "--dtype",
            dtype,
        ])
    };
    let logprobs = |out: &str| -> Vec<f64> {
        out.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["logprob"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (ok, full, err) = score("f32");
    assert!(ok, "{err}");
    let (ok, half, err) = score("bf16");
    assert!(ok, "{err}");
    let (full, half) = (logprobs(&full), logprobs(&half));
    assert_eq!(full.len(), half.len());
    for (f, h) in full.iter().zip(&half) {
        // Sums of a few dozen bf16 log-probs: close, and not computed in f32.
        assert!(
            (f - h).abs() < 0.05 * f.abs() && f != h,
            "f32 {f} vs bf16 {h}"
        );
    }
    let (ok, _, err) = score("fp8");
    assert!(!ok);
    assert!(
        err.contains("--dtype") && err.contains("`fp8` is not a dtype"),
        "{err}"
    );
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

/// A demo-style config in a temporary directory; `extra` is appended.
fn write_config(dir: &std::path::Path, data: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[model]
path = "fixtures/tiny-llava"
[data]
max_length = 128
[[data.datasets]]
path = "{data}"
format = "llava"
image_root = "data/demo/sft/images"
[train]
max_steps = 3
batch_size = 2
output_dir = "{out}"
{extra}
"#,
        out = dir.join("run").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn demo_train_writes_a_model_metrics_and_a_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let (ok, out, err) = resonance(&[
        "train",
        "--config",
        "configs/demo_sft.toml",
        "--set",
        &format!("train.output_dir={}", run.display()),
        "--set",
        "train.epochs=1",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("output:"), "{out}");
    assert!(run.join("final/model.safetensors").is_file());
    assert!(run.join("config.toml").is_file());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in ["step", "loss", "lr", "grad_norm", "tokens_per_second"] {
        assert!(first.get(key).is_some(), "metrics lack {key}");
    }
    let (ok, _, err) = resonance(&["plot", run.to_str().unwrap()]);
    assert!(ok, "{err}");
    let png = image::open(run.join("curves.png")).unwrap();
    assert_eq!((png.width(), png.height()), (900, 600));
}

#[test]
fn data_check_reports_counts_lengths_and_marked_examples() {
    let (ok, out, err) = resonance(&["data", "check", "--config", "configs/demo_sft.toml"]);
    assert!(ok, "{err}");
    assert!(out.contains("usable records: 110 (0 refused)"), "{out}");
    assert!(out.contains("token lengths: min"), "{out}");
    assert!(out.contains("«"), "no trained tokens marked:\n{out}");
    assert!(out.contains("<image×25>"), "{out}");
}

#[test]
fn data_check_refuses_records_whose_image_tokens_would_be_cut() {
    let (ok, out, err) = resonance(&[
        "data",
        "check",
        "--config",
        "configs/demo_sft.toml",
        "--set",
        "data.max_length=40",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("refused `image tokens truncated`"), "{out}");
}

#[test]
fn train_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    // Unknown key.
    let config = write_config(tmp.path(), "data/demo/sft/llava.json", "learning_rate = 1");
    let (ok, _, err) = resonance(&["train", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("learning_rate"), "{err}");
    // LoRA on the LM and a full fine-tune of the LM at once.
    let config = write_config(
        tmp.path(),
        "data/demo/sft/llava.json",
        "freeze_lm = false\n[lora]\nenabled = true",
    );
    let (ok, _, err) = resonance(&["train", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("lora") && err.contains("freeze_lm"), "{err}");
    // A malformed JSON line.
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"image\": \"red_circle_white.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nhi\"}, {\"from\": \"gpt\", \"value\": \"red.\"}]}\n{\"image\": oops}\n",
    )
    .unwrap();
    let config = write_config(tmp.path(), data.to_str().unwrap(), "");
    let (ok, _, err) = resonance(&["train", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("bad.jsonl:2"), "{err}");
    // A missing image.
    std::fs::write(
        &data,
        "{\"image\": \"no_such.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nhi\"}, {\"from\": \"gpt\", \"value\": \"red.\"}]}\n",
    )
    .unwrap();
    let (ok, _, err) = resonance(&["train", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("bad.jsonl:1") && err.contains("no_such.png"),
        "{err}"
    );
}

/// The same training step on wgpu (Mesa lavapipe here) as on the CPU.
#[test]
fn train_on_wgpu_matches_cpu() {
    if !cfg!(feature = "wgpu") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut first_losses = Vec::new();
    let config = write_config(tmp.path(), "data/demo/sft/llava.json", "");
    for backend in ["cpu", "wgpu"] {
        let run = tmp.path().join(backend);
        let (ok, _, err) = resonance(&[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--backend",
            backend,
            "--set",
            &format!("train.output_dir={}", run.display()),
        ]);
        assert!(ok, "{backend}: {err}");
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let losses: Vec<f64> = metrics
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        first_losses.push(losses);
    }
    for (cpu, gpu) in first_losses[0].iter().zip(&first_losses[1]) {
        assert!((cpu - gpu).abs() < 1e-3, "cpu {cpu} vs wgpu {gpu}");
    }
}

#[test]
fn resume_merge_and_plot_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    // --resume with no checkpoint in the run directory.
    let config = write_config(tmp.path(), "data/demo/sft/llava.json", "");
    let (ok, _, err) = resonance(&["train", "--config", config.to_str().unwrap(), "--resume"]);
    assert!(!ok);
    assert!(err.contains("no checkpoint-*"), "{err}");
    // merge-lora with a folder that holds no adapter.
    let (ok, _, err) = resonance(&[
        "merge-lora",
        "--base",
        "fixtures/tiny-llava",
        "--adapter",
        tmp.path().to_str().unwrap(),
        "--output",
        tmp.path().join("merged").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("adapter_config.json"), "{err}");
    // plot on a run directory whose metrics have a broken line.
    std::fs::write(
        tmp.path().join("metrics.jsonl"),
        "{\"step\": 1, \"loss\": 2.0}\nnot json\n",
    )
    .unwrap();
    let (ok, _, err) = resonance(&["plot", tmp.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("metrics.jsonl:2"), "{err}");
}

#[test]
fn score_reward_prints_one_reward_per_record_and_refuses_a_model_without_a_head() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("records.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"hello\", \"response\": \"world\", \"id\": 7}\n{\"prompt\": \"a\", \"response\": \"b\"}\n",
    )
    .unwrap();
    let model = root().join("fixtures/reward/tiny-llama-reward");
    let (ok, stdout, stderr) = resonance(&[
        "score",
        "--reward",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["reward"].as_f64().unwrap().is_finite());
    assert_eq!(lines[0]["id"], 7);
    let plain = root().join("fixtures/tiny-llama");
    let (ok, _, stderr) = resonance(&[
        "score",
        "--reward",
        "--model",
        plain.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("score.weight"), "{stderr}");
}

#[test]
fn score_pairs_writes_reference_logps_into_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs_ref.jsonl");
    let (ok, _, stderr) = resonance(&[
        "score",
        "--pairs",
        "plain_dpo",
        "--model",
        root().join("fixtures/tiny-llava").to_str().unwrap(),
        "--data",
        root().join("data/demo/dpo/pairs.jsonl").to_str().unwrap(),
        "--image-root",
        root().join("data/demo/sft/images").to_str().unwrap(),
        "--max-length",
        "128",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let text = std::fs::read_to_string(&out).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 78);
    for r in &records {
        let (c, j) = (
            r["ref_chosen_logps"].as_f64().unwrap(),
            r["ref_rejected_logps"].as_f64().unwrap(),
        );
        assert!(c < 0.0 && j < 0.0, "{r}");
        assert!(r["prompt"].is_string());
    }
    // Too small a max_length for the run is refused, naming the record.
    let (ok, _, stderr) = resonance(&[
        "score",
        "--pairs",
        "plain_dpo",
        "--model",
        root().join("fixtures/tiny-llava").to_str().unwrap(),
        "--data",
        root().join("data/demo/dpo/pairs.jsonl").to_str().unwrap(),
        "--image-root",
        root().join("data/demo/sft/images").to_str().unwrap(),
        "--max-length",
        "20",
    ]);
    assert!(!ok && stderr.contains("pairs.jsonl:1"), "{stderr}");
}
