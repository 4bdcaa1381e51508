//! DPO end to end on the tiny LLaVA and the demo preference pairs.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use resonance_core::config::ExperimentConfig;
use resonance_models::vision::clip::vision_tower_calls;
use resonance_train::trainer::{train, TrainOptions, TrainSummary};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Training runs share the process-wide RNG and the vision-call counter: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config(data: &Path, out: &Path, extra: &str) -> ExperimentConfig {
    let text = format!(
        r#"
[model]
path = "{model}"
[data]
max_length = 128
[[data.datasets]]
path = "{data}"
format = "plain_dpo"
image_root = "{images}"
[method]
name = "dpo"
beta = 0.1
[optim]
lr = 3e-3
[train]
batch_size = 4
save_every = 0
output_dir = "{out}"
{extra}
"#,
        model = root().join("fixtures/tiny-llava").display(),
        data = data.display(),
        images = root().join("data/demo/sft/images").display(),
        out = out.display(),
    );
    let config = ExperimentConfig::from_str(&text).expect("parses");
    config.validate().expect("valid");
    config
}

/// `configs/demo_dpo.toml` with its paths made absolute.
fn demo_config() -> ExperimentConfig {
    let mut cfg = ExperimentConfig::load(root().join("configs/demo_dpo.toml"), &[] as &[&str])
        .expect("the demo config loads");
    for d in &mut cfg.data.datasets {
        d.path = root().join(&d.path);
        d.image_root = d.image_root.as_ref().map(|r| root().join(r));
    }
    cfg.model.path = root().join(&cfg.model.path).display().to_string();
    cfg
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn run(config: &ExperimentConfig) -> TrainSummary {
    train(config, &TrainOptions::default(), &Device::flex()).expect("trains")
}

#[test]
fn demo_dpo_starts_at_ln2_and_learns_the_preferences() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().unwrap();
    let mut cfg = demo_config();
    cfg.train.output_dir = out.path().to_path_buf();
    run(&cfg);
    let m = metrics(out.path());
    // Step 1 reports the initial weights: policy = reference (adapters off).
    let first = &m[0];
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6);
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins"] {
        assert!(first[key].as_f64().unwrap().abs() < 1e-5, "{key}: {first}");
    }
    let mean = |rows: &[serde_json::Value], key: &str| {
        rows.iter().map(|r| r[key].as_f64().unwrap()).sum::<f64>() / rows.len() as f64
    };
    let last = &m[m.len() - 40..];
    let accuracy = mean(last, "rewards/accuracies");
    assert!(
        accuracy > 0.9,
        "rewards/accuracies over the last 40 steps: {accuracy}"
    );
    assert!(mean(last, "rewards/margins") > mean(&m[..20], "rewards/margins") + 0.5);
    for key in [
        "logps/chosen",
        "logps/rejected",
        "rewards/chosen",
        "rewards/rejected",
    ] {
        assert!(first.get(key).is_some(), "{key} not logged");
    }
}

#[test]
fn bf16_dpo_starts_at_ln2_and_learns_the_preferences() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().unwrap();
    let mut cfg = demo_config();
    cfg.model.dtype = resonance_core::config::Dtype::Bf16;
    cfg.train.epochs = Some(8);
    cfg.train.output_dir = out.path().to_path_buf();
    let summary = run(&cfg);
    // The frozen base (the reference, adapters off) is bf16; only the adapters are f32.
    assert_eq!(
        summary.parameters_by_dtype.get("f32"),
        Some(&summary.trainable_parameters)
    );
    assert_eq!(
        summary.parameters_by_dtype.get("bf16"),
        Some(&(summary.total_parameters - summary.trainable_parameters))
    );
    let m = metrics(out.path());
    // Policy and reference run the same bf16 operations on the same weights at step 1.
    let first = &m[0];
    assert!(
        (first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6,
        "{first}"
    );
    let mean = |rows: &[serde_json::Value], key: &str| {
        rows.iter().map(|r| r[key].as_f64().unwrap()).sum::<f64>() / rows.len() as f64
    };
    let last = &m[m.len() - 20..];
    assert!(
        mean(last, "rewards/margins") > mean(&m[..20], "rewards/margins") + 0.5,
        "margins did not grow"
    );
    assert!(mean(last, "loss") < mean(&m[..20], "loss") - 0.1);
}

#[test]
fn each_image_is_encoded_once_per_pair() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        r#"{"image": "red_circle_white.png", "prompt": "Colour?", "chosen": "red.", "rejected": "blue."}
{"images": ["blue_square_black.png", "red_circle_white.png"], "prompt": "<image><image>Same?", "chosen": "no.", "rejected": "yes."}
"#,
    )
    .unwrap();
    for (extra, reference_free, reference_passes) in [
        // LoRA only: the reference is the policy with adapters off, whose tower and projector
        // are the policy's: it takes the policy's features.
        (
            "max_steps = 2\nfreeze_projector = true\n[lora]\nenabled = true\ndropout = 0.0",
            false,
            0,
        ),
        // The projector trains: the reference (a frozen copy) encodes with its own.
        (
            "max_steps = 2\n[lora]\nenabled = true\ndropout = 0.0",
            false,
            1,
        ),
        // Reference-free: no reference pass at all.
        ("max_steps = 2\n", true, 0),
    ] {
        let mut cfg = config(&data, &dir.path().join("run"), extra);
        cfg.train.batch_size = 2;
        cfg.method.reference_free = reference_free;
        let before = vision_tower_calls();
        let summary = run(&cfg);
        let calls = vision_tower_calls() - before;
        // One policy encoding (+ one reference encoding when the reference's encoder is not the
        // policy's) of the images per step and shard (the pairs run in shards, one per compute
        // thread, each encoding its own pairs' images); encoding chosen and rejected separately
        // would double it.
        let shards = resonance_train::shards::shard_count(&Device::flex(), 2) as u64;
        assert_eq!(
            calls as u64,
            summary.global_step * shards * (1 + reference_passes),
            "{extra}"
        );
    }
}

#[test]
fn frozen_copy_reference_and_length_normalised_losses() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("data/demo/dpo/pairs.jsonl");
    // Full fine-tune: the reference is a frozen copy; step 1 is still exactly ln 2.
    let cfg = config(&data, &dir.path().join("copy"), "max_steps = 3");
    run(&cfg);
    let m = metrics(&dir.path().join("copy"));
    assert!((m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6);
    assert!(m[2]["loss"].as_f64().unwrap() != m[0]["loss"].as_f64().unwrap());
    // IPO uses the answer lengths; it runs and starts at (1/(2β))² = 25.
    let mut cfg = config(&data, &dir.path().join("ipo"), "max_steps = 2");
    cfg.method.loss_type =
        resonance_core::config::DpoLossTypes::one(resonance_core::config::DpoLossType::Ipo);
    run(&cfg);
    let m = metrics(&dir.path().join("ipo"));
    assert!(
        (m[0]["loss"].as_f64().unwrap() - 25.0).abs() < 1e-3,
        "{}",
        m[0]
    );
}

#[test]
fn rpo_adds_the_chosen_nll() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("data/demo/dpo/pairs.jsonl");
    let mut cfg = config(&data, dir.path(), "max_steps = 2");
    cfg.method.rpo_alpha = Some(0.5);
    cfg.validate().unwrap();
    run(&cfg);
    let m = metrics(dir.path());
    let nll = m[0]["nll_loss"].as_f64().expect("nll_loss logged");
    assert!(nll > 1.0, "the random model's NLL is large: {nll}");
    let loss = m[0]["loss"].as_f64().unwrap();
    assert!(
        (loss - (std::f64::consts::LN_2 + 0.5 * nll)).abs() < 1e-5,
        "{loss} vs {nll}"
    );
}

#[test]
fn weighted_loss_types_add_up() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("data/demo/dpo/pairs.jsonl");
    let mut cfg = config(&data, dir.path(), "max_steps = 1");
    cfg.apply_override(r#"method.loss_type=["sigmoid", "ipo"]"#)
        .unwrap();
    cfg.apply_override("method.loss_weights=[0.5, 2.0]")
        .unwrap();
    cfg.validate().unwrap();
    run(&cfg);
    // At the initial weights: 0.5·ln 2 + 2·(1/(2β))² = 0.5·ln 2 + 50.
    let loss = metrics(dir.path())[0]["loss"].as_f64().unwrap();
    assert!(
        (loss - (0.5 * std::f64::consts::LN_2 + 50.0)).abs() < 1e-3,
        "{loss}"
    );
    cfg.method.loss_weights = Some(vec![1.0]);
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("loss_weights"));
}

#[test]
fn ddpo_starts_at_ln2_and_learns_with_a_lora_reference() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("data/demo/dpo/pairs.jsonl");
    let lora = "freeze_projector = true\n[lora]\nenabled = true\ndropout = 0.0";
    let out = dir.path().join("ddpo");
    let mut cfg = config(&data, &out, &format!("max_steps = 150\n{lora}"));
    cfg.apply_override(r#"method.loss_type="ddpo""#).unwrap();
    cfg.validate().unwrap();
    run(&cfg);
    let m = metrics(&out);
    // Step 1: the reference is the policy with its adapters off, so the weighted log-ratios are
    // 0 and the loss is −logσ(0) = ln 2, with zero rewards.
    let first = &m[0];
    assert!(
        (first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6,
        "{first}"
    );
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins"] {
        assert!(first[key].as_f64().unwrap().abs() < 1e-5, "{key}: {first}");
    }
    let mean = |rows: &[serde_json::Value], key: &str| {
        rows.iter().map(|r| r[key].as_f64().unwrap()).sum::<f64>() / rows.len() as f64
    };
    // Single steps are noisy (batches of 4, a few weighted tokens each): compare 20-step means.
    let (early, late) = (mean(&m[..20], "loss"), mean(&m[m.len() - 20..], "loss"));
    assert!(
        late < early - 0.1,
        "the DDPO loss did not fall: {early} -> {late}"
    );
    assert!(mean(&m[m.len() - 20..], "rewards/margins") > 0.0);

    // In a list, the other types keep the plain log-probs: at the start both terms are ln 2.
    let out = dir.path().join("mixed");
    let mut cfg = config(&data, &out, &format!("max_steps = 1\n{lora}"));
    cfg.apply_override(r#"method.loss_type=["sigmoid", "ddpo"]"#)
        .unwrap();
    cfg.apply_override("method.loss_weights=[1.0, 0.5]")
        .unwrap();
    cfg.validate().unwrap();
    run(&cfg);
    let loss = metrics(&out)[0]["loss"].as_f64().unwrap();
    assert!((loss - 1.5 * std::f64::consts::LN_2).abs() < 1e-5, "{loss}");
}

/// `log σ(x)`, stable.
fn log_sigmoid(x: f64) -> f64 {
    -((-x).exp().ln_1p())
}

#[test]
fn simpo_and_orpo_follow_their_formulas_and_learn() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("data/demo/dpo/pairs.jsonl");
    for method in ["simpo", "orpo"] {
        let out = dir.path().join(method);
        let mut cfg = config(&data, &out, "max_steps = 60");
        cfg.apply_override(&format!("method.name={method}"))
            .unwrap();
        cfg.train.batch_size = 1;
        cfg.validate().unwrap();
        run(&cfg);
        let m = metrics(&out);
        let first = &m[0];
        let loss = first["loss"].as_f64().unwrap();
        let margin = first["rewards/margins"].as_f64().unwrap();
        let expected = if method == "simpo" {
            // −logσ(β·avg_c − β·avg_r − γ), γ = 0.5.
            -log_sigmoid(margin - 0.5)
        } else {
            // NLL(chosen) − β·logσ(log-odds).
            first["nll_loss"].as_f64().unwrap()
                - 0.1 * log_sigmoid(first["log_odds_chosen"].as_f64().unwrap())
        };
        assert!(
            (loss - expected).abs() < 1e-5,
            "{method}: {loss} vs {expected}"
        );
        let mean = |rows: &[serde_json::Value], key: &str| {
            rows.iter().map(|r| r[key].as_f64().unwrap()).sum::<f64>() / rows.len() as f64
        };
        assert!(
            mean(&m[50..], "loss") < mean(&m[..10], "loss"),
            "{method}: the loss did not fall"
        );
    }
}

#[test]
fn kto_starts_at_one_half_and_separates_desirable_from_undesirable() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("data/demo/kto/unpaired.jsonl");
    let text = std::fs::read_to_string(root().join("configs/demo_kto.toml")).unwrap();
    let mut cfg = ExperimentConfig::from_str(&text).unwrap();
    cfg.model.path = root().join(&cfg.model.path).display().to_string();
    cfg.data.datasets[0].path = data;
    cfg.data.datasets[0].image_root = Some(root().join("data/demo/sft/images"));
    cfg.train.output_dir = dir.path().to_path_buf();
    cfg.train.epochs = None;
    cfg.train.max_steps = Some(120);
    cfg.validate().unwrap();
    run(&cfg);
    let m = metrics(dir.path());
    // Policy = reference at the first step: every example's loss is 1 − σ(0) = ½, KL 0.
    assert!(
        (m[0]["loss"].as_f64().unwrap() - 0.5).abs() < 1e-6,
        "{}",
        m[0]
    );
    // The policy runs under autodiff, the reference without: flex's fused LayerNorm (plain) and
    // Burn's composed one (autodiff) differ in the last bits of the vision tower's activations,
    // so the KL of summed log-probs is 0 up to f32 rounding rather than exactly.
    let kl = m[0]["kl"].as_f64().unwrap();
    assert!(kl.abs() < 1e-5, "step-0 KL {kl}");
    let mean = |rows: &[serde_json::Value], key: &str| {
        rows.iter().filter_map(|r| r[key].as_f64()).sum::<f64>() / rows.len() as f64
    };
    assert!(mean(&m[100..], "loss") < mean(&m[..20], "loss"));
    assert!(
        mean(&m[100..], "rewards/margins") > mean(&m[..20], "rewards/margins") + 0.2,
        "margins: {} -> {}",
        mean(&m[..20], "rewards/margins"),
        mean(&m[100..], "rewards/margins")
    );
}

#[test]
fn dpo_needs_preference_data() {
    let text = r#"
[model]
path = "x"
[[data.datasets]]
path = "a.json"
format = "llava"
[method]
name = "dpo"
"#;
    let err = ExperimentConfig::from_str(text).unwrap_err().to_string();
    assert!(
        err.contains("data.datasets[0].format") && err.contains("plain_dpo"),
        "{err}"
    );
}

fn losses_of(run: &Path) -> Vec<f64> {
    metrics(run)
        .iter()
        .map(|l| l["loss"].as_f64().unwrap())
        .collect()
}

/// The demo pairs with `ref_chosen_logps` / `ref_rejected_logps` from `reference`, as
/// `resonance score --pairs plain_dpo` writes them.
fn pairs_with_reference(reference: &Path, out: &Path) -> PathBuf {
    use resonance_models::processor::Processor;
    use resonance_models::registry::AnyModel;
    use resonance_train::score::{pair_reference_logps, with_reference_logps, PairScoring};
    let device = Device::flex();
    let model = AnyModel::load(reference, &device).unwrap();
    let processor = Processor::from_dir(reference, &model).unwrap();
    let data = root().join("data/demo/dpo/pairs.jsonl");
    let values = pair_reference_logps(
        &model,
        &processor,
        &data,
        &PairScoring {
            format: resonance_core::data::DataFormat::PlainDpo,
            image_root: Some(root().join("data/demo/sft/images")),
            max_length: 128,
            max_prompt_length: None,
        },
        8,
        &device,
        |_| {},
    )
    .expect("scores the pairs");
    assert_eq!(values.len(), 78);
    let path = out.join("pairs_ref.jsonl");
    std::fs::write(&path, with_reference_logps(&data, &values).unwrap()).unwrap();
    path
}

#[test]
fn precomputed_and_named_references_train_like_the_model_they_come_from() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("fixtures/tiny-llava");
    let plain_data = root().join("data/demo/dpo/pairs.jsonl");
    let steps = "max_steps = 6\n";

    // Full fine-tuning: the reference is a frozen copy of the initial weights...
    let copy_run = dir.path().join("copy");
    run(&config(&plain_data, &copy_run, steps));
    // ... or the same values precomputed into the data (`ref_chosen_logps` / ...).
    let with_ref = pairs_with_reference(&model, dir.path());
    let precomputed_run = dir.path().join("precomputed");
    run(&config(&with_ref, &precomputed_run, steps));
    let (a, b) = (losses_of(&copy_run), losses_of(&precomputed_run));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4, "copy {a:?} vs precomputed {b:?}");
    }

    // The precomputed values are what the loss reads: chosen references raised by 1 give the
    // first step −logσ(β·(0 − 1)) instead of ln 2.
    let shifted: Vec<String> = std::fs::read_to_string(&with_ref)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let c = v["ref_chosen_logps"].as_f64().unwrap();
            v["ref_chosen_logps"] = serde_json::json!(c + 1.0);
            v.to_string()
        })
        .collect();
    let shifted_data = dir.path().join("shifted.jsonl");
    std::fs::write(&shifted_data, shifted.join("\n") + "\n").unwrap();
    let shifted_run = dir.path().join("shifted");
    run(&config(&shifted_data, &shifted_run, "max_steps = 1\n"));
    let first = losses_of(&shifted_run)[0];
    assert!((first - (1.0 + 0.1f64.exp()).ln()).abs() < 1e-5, "{first}");

    // LoRA: the adapters-off reference (which takes the policy's image features), or the same
    // base named in [method.reference] (which encodes the images itself).
    let lora = "max_steps = 4\nfreeze_projector = true\n[lora]\nenabled = true\nrank = 8\n\
                alpha = 16.0\n";
    let off_run = dir.path().join("off");
    run(&config(&plain_data, &off_run, lora));
    let named_run = dir.path().join("named");
    let mut named = config(&plain_data, &named_run, lora);
    named.method.reference = Some(resonance_core::config::ReferenceConfig {
        model: model.display().to_string(),
    });
    run(&named);
    let (a, b) = (losses_of(&off_run), losses_of(&named_run));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "adapters off {a:?} vs named {b:?}");
    }

    // A reference of another architecture, and data with references on some records only,
    // are refused with named errors.
    let mut wrong = config(&plain_data, &dir.path().join("wrong"), steps);
    wrong.method.reference = Some(resonance_core::config::ReferenceConfig {
        model: root().join("fixtures/tiny-llama").display().to_string(),
    });
    let err = train(&wrong, &TrainOptions::default(), &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(err.contains("method.reference.model"), "{err}");
    let text = std::fs::read_to_string(&with_ref).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[4] = std::fs::read_to_string(&plain_data)
        .unwrap()
        .lines()
        .nth(4)
        .unwrap()
        .to_string();
    let mixed = dir.path().join("mixed.jsonl");
    std::fs::write(&mixed, lines.join("\n") + "\n").unwrap();
    let err = train(
        &config(&mixed, &dir.path().join("mixed"), steps),
        &TrainOptions::default(),
        &Device::flex(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("mixed.jsonl:5") && err.contains("ref_chosen_logps"),
        "{err}"
    );
}

#[test]
fn preference_evaluation_reports_the_method_loss_and_metrics() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("data/demo/dpo/pairs.jsonl");
    // With lr ≈ 0 the policy stays the reference: the eval loss is ln 2 and the margins 0.
    let eval = format!(
        "max_steps = 2\neval_every = 1\n[[data.eval_datasets]]\npath = \"{}\"\nformat = \"plain_dpo\"\nimage_root = \"{}\"\n",
        root().join("data/demo/reward/heldout.jsonl").display(),
        root().join("data/demo/sft/images").display()
    );
    let mut cfg = config(&data, dir.path(), &eval);
    cfg.optim.lr = 1e-12;
    run(&cfg);
    let m = metrics(dir.path());
    for line in &m {
        let loss = line["eval_loss"].as_f64().expect("eval_loss");
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{line}");
        assert!(line["eval_rewards/margins"].as_f64().unwrap().abs() < 1e-5);
        assert!(line["eval_rewards/accuracies"].is_number());
    }
}

/// A batch's DPO and SimPO loss and metrics are the means over its pairs, whether the pairs run
/// together or in shards on separate threads (`resonance_train::shards`; with two or more
/// compute threads the batch of 4 runs as shards): the first step of a batch of 4 equals the
/// mean of the first 4 single-pair steps taken with a learning rate too small to move anything.
#[test]
fn a_batch_loss_is_the_mean_of_its_pairs_losses_in_shards_or_not() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("data/demo/dpo/pairs.jsonl");
    for method in ["dpo", "simpo"] {
        let first_steps = |batch: usize, steps: u64| {
            let out = dir.path().join(format!("{method}-{batch}"));
            let mut cfg = config(&data, &out, &format!("max_steps = {steps}"));
            cfg.apply_override(&format!("method.name={method}"))
                .unwrap();
            cfg.apply_override("optim.lr=1e-12").unwrap();
            cfg.train.batch_size = batch;
            cfg.validate().unwrap();
            run(&cfg);
            metrics(&out)
        };
        let whole = first_steps(4, 1);
        let single = first_steps(1, 4);
        for key in ["loss", "rewards/margins", "rewards/accuracies"] {
            let batch = whole[0][key].as_f64().unwrap();
            let mean = single[..4]
                .iter()
                .map(|m| m[key].as_f64().unwrap())
                .sum::<f64>()
                / 4.0;
            assert!(
                (batch - mean).abs() <= 1e-5 * mean.abs().max(1.0),
                "{method} {key}: batch {batch} against the mean of its pairs {mean}"
            );
        }
    }
}
