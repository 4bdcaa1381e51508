//! `resonance bench`'s code path on the tiny fixture model: every workload kind for one step,
//! the result fields of bench/README.md's schema, and cross-checks between the workloads
//! (the SFT loss through the trainer's autodiff path against `resonance score`'s log-probs; DPO
//! at ln 2 before any update; batched greedy decoding against one-sequence decoding).

use std::path::PathBuf;

use burn::tensor::{Device, FloatDType};
use resonance_train::bench::{compare_table, run_workload, BenchSpec, RunOptions};
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

const COMPLETION: usize = 8;

fn tiny_workloads(weights_dir: &str) -> String {
    let adamw = r#"{"name": "adamw", "lr": 1e-05, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.0}"#;
    format!(
        r#"{{
  "schema_version": 1,
  "model": {{"config_dir": "fixtures/tiny-llava", "weights_dir": {weights_dir:?}, "seed": 0, "dtype": "float32"}},
  "inputs": {{"first_text_id": 9, "salts": {{"prompt": 0, "completion": 1, "rejected": 2}}}},
  "defaults": {{"steps": 1, "warmup": 1}},
  "workloads": {{
    "sft": {{"kind": "sft", "batch": 2, "text_tokens": 12, "prompt_text_tokens": 4, "images_per_sample": 1,
             "labels": "free text is ignored", "optimizer": {adamw}}},
    "dpo": {{"kind": "dpo", "batch_pairs": 2, "text_tokens": 12, "prompt_text_tokens": 4, "beta": 0.1,
             "loss_type": "sigmoid", "optimizer": {adamw},
             "lora": {{"r": 4, "alpha": 8, "dropout": 0.0, "scope": "language_model",
                      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}}},
    "generate_b1": {{"kind": "generate", "batch": 1, "prompt_text_tokens": 4, "new_tokens": 6}},
    "generate_b3": {{"kind": "generate", "batch": 3, "prompt_text_tokens": 4, "new_tokens": 6}},
    "score": {{"kind": "score", "batch": 2, "text_tokens": 12, "prompt_text_tokens": 4}}
  }}
}}"#
    )
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

#[test]
fn every_workload_kind_runs_one_step_on_the_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let weights_dir = root().join("fixtures/tiny-llava");
    let path = tmp.path().join("workloads.json");
    std::fs::write(&path, tiny_workloads(weights_dir.to_str().unwrap())).unwrap();
    let spec = BenchSpec::load(&path).unwrap();
    let names: Vec<&str> = spec.workloads.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["sft", "dpo", "generate_b1", "generate_b3", "score"],
        "file order is kept"
    );
    let device = Device::flex();
    let options = RunOptions {
        steps: 1,
        warmup: 1,
        threads: 1,
        dtype: FloatDType::F32,
    };
    let mut results = serde_json::Map::new();
    for name in names {
        let r = run_workload(&spec, name, &weights_dir, &options, &device)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = Value::Object(r);
        assert_eq!(r["ok"], json!(true));
        assert_eq!(r["times_s"].as_array().map(Vec::len), Some(1), "{name}");
        for key in [
            "median_s",
            "min_s",
            "tokens_per_s",
            "gflops_per_s",
            "gflops_per_s_effective",
        ] {
            assert!(f(&r, key) > 0.0, "{name}: {key} = {}", r[key]);
        }
        for key in [
            "tokens_per_step",
            "flops_per_step",
            "flops_analytic_per_step",
        ] {
            assert!(r[key].as_u64().is_some_and(|v| v > 0), "{name}: {key}");
        }
        if cfg!(target_os = "linux") {
            assert!(
                f(&r, "peak_rss_mb") >= f(&r, "rss_before_load_mb"),
                "{name}"
            );
        }
        results.insert(name.to_string(), r);
    }
    let sft = &results["sft"];
    let dpo = &results["dpo"];
    let score = &results["score"];
    // 2 rows × (BOS + 25 image tokens + 3 prompt + 8 completion tokens).
    assert_eq!(sft["tokens_per_step"], json!(2 * (1 + 25 + 3 + COMPLETION)));
    assert_eq!(sft["kind"], json!("sft"));
    // The rows run in shards, one per compute thread (at most one per row), each encoding
    // its own images once.
    let shards = sft["shards"].as_u64().unwrap();
    assert!((1..=2).contains(&shards), "{shards} shards");
    assert_eq!(sft["vision_tower_calls_per_step"], json!(shards));
    let phases = sft["phases_median_s"].as_object().unwrap();
    assert_eq!(
        phases.keys().map(String::as_str).collect::<Vec<_>>(),
        ["forward_backward", "optimizer"]
    );

    // The SFT loss (autodiff device, TrainableModel::forward_inputs + sft_loss) is the mean NLL
    // of the completion tokens; `score` (plain device, AnyModel::forward + token_logprobs, the
    // `resonance score` path) sums the same log-probs: loss = −Σ / completion tokens.
    let loss = f(sft, "loss_first");
    let logp = f(score, "completion_logp_sum_mean");
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
    let from_score = -logp / COMPLETION as f64;
    assert!(
        (loss - from_score).abs() <= 1e-4 * from_score.abs(),
        "sft loss {loss} vs −score/{COMPLETION} {from_score}"
    );
    assert!(f(sft, "loss_last").is_finite());

    // DPO with fresh adapters (B = 0): policy = reference, loss = ln 2; LoRA only on the LM.
    assert!((f(dpo, "loss_first") - std::f64::consts::LN_2).abs() < 1e-6);
    assert_eq!(dpo["lora_layers"], json!(2 * 7));
    // Per shard of pairs: one encoding, whose features serve the policy and the reference.
    let dpo_shards = dpo["shards"].as_u64().unwrap();
    assert!((1..=2).contains(&dpo_shards), "{dpo_shards} shards");
    assert_eq!(dpo["vision_tower_calls_per_step"], json!(dpo_shards));
    assert_eq!(dpo["images_encoded_per_step"], json!(2));
    // Each pair's BOS, image and prompt run once, then both answers: 2 × (1 + 25 + 3 + 2 · 8)
    // decoder positions instead of 4 × 37.
    assert_eq!(dpo["tokens_per_step"], json!(4 * (1 + 25 + 3 + COMPLETION)));
    assert_eq!(
        dpo["decoder_positions_per_forward"],
        json!(2 * (1 + 25 + 3 + 2 * COMPLETION))
    );

    // Greedy decoding: all rows at once give row 0 the ids of the one-sequence decode.
    let b1 = results["generate_b1"]["first_new_ids_sample0"].clone();
    assert_eq!(b1.as_array().map(Vec::len), Some(6));
    assert_eq!(results["generate_b3"]["first_new_ids_sample0"], b1);
    assert_eq!(results["generate_b3"]["tokens_per_step"], json!(18));

    // The comparison of a result with itself agrees everywhere.
    let result = json!({"implementation": "resonance", "workloads": results});
    let (table, ok) = compare_table(&result, &result);
    assert!(ok, "{table}");
}

#[test]
fn a_missing_weights_dir_says_how_to_build_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("workloads.json");
    let missing = tmp.path().join("no-model");
    std::fs::write(&path, tiny_workloads(missing.to_str().unwrap())).unwrap();
    let spec = BenchSpec::load(&path).unwrap();
    let options = RunOptions {
        steps: 1,
        warmup: 1,
        threads: 1,
        dtype: FloatDType::F32,
    };
    let err = run_workload(&spec, "score", &missing, &options, &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--write-weights"), "{err}");
}

/// `--dtype bf16`: the training workloads keep trained weights in f32 and store the frozen ones
/// in bf16, scoring stores every weight in bf16; the numbers move by bf16 rounding only, DPO
/// still starts at ln 2 (policy and reference see the same bf16 weights), and the matmul peak
/// and the comparison name the dtype.
#[test]
fn bf16_workloads_train_and_score_in_half_precision() {
    let tmp = tempfile::tempdir().unwrap();
    let weights_dir = root().join("fixtures/tiny-llava");
    let path = tmp.path().join("workloads.json");
    std::fs::write(&path, tiny_workloads(weights_dir.to_str().unwrap())).unwrap();
    let spec = BenchSpec::load(&path).unwrap();
    let device = Device::flex();
    let run = |name: &str, dtype| {
        let options = RunOptions {
            steps: 1,
            warmup: 1,
            threads: 1,
            dtype,
        };
        Value::Object(run_workload(&spec, name, &weights_dir, &options, &device).unwrap())
    };
    let (sft32, sft16) = (run("sft", FloatDType::F32), run("sft", FloatDType::BF16));
    assert_eq!(sft32["parameters_by_dtype"].as_object().unwrap().len(), 1);
    let by_dtype = sft16["parameters_by_dtype"].as_object().unwrap();
    assert!(by_dtype["bf16"].as_u64().unwrap() > 0, "{by_dtype:?}");
    assert_eq!(by_dtype["f32"], sft16["trainable_params"], "{by_dtype:?}");
    let (a, b) = (f(&sft32, "loss_first"), f(&sft16, "loss_first"));
    assert!(
        a != b && (a - b).abs() < 0.02 * a,
        "sft loss f32 {a} vs bf16 {b}"
    );

    let dpo = run("dpo", FloatDType::BF16);
    assert!((f(&dpo, "loss_first") - std::f64::consts::LN_2).abs() < 1e-6);
    let by_dtype = dpo["parameters_by_dtype"].as_object().unwrap();
    assert_eq!(
        by_dtype["f32"], dpo["trainable_params"],
        "LoRA factors stay f32"
    );

    let (score32, score16) = (
        run("score", FloatDType::F32),
        run("score", FloatDType::BF16),
    );
    let (a, b) = (
        f(&score32, "completion_logp_sum_mean"),
        f(&score16, "completion_logp_sum_mean"),
    );
    assert!(
        a != b && (a - b).abs() < 0.05 * a.abs(),
        "score f32 {a} vs bf16 {b}"
    );

    let peak = resonance_train::bench::matmul_peak(&device, 64, 1, 0, FloatDType::BF16).unwrap();
    assert_eq!(peak["dtype"], json!("bfloat16"));
}
