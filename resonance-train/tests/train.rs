//! The SFT training loop end to end on the tiny LLaVA fixture and the demo data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use resonance_core::config::ExperimentConfig;
use resonance_models::llava::model::Llava;
use resonance_models::processor::Processor;
use resonance_models::registry::{AnyModel, Images, ModelInputs};
use resonance_models::trainable::TrainableModel;
use resonance_train::checkpoint::{attach_peft_adapter, list_checkpoints, read_adapter_config};
use resonance_train::trainer::{merge_lora, train, Resume, TrainOptions};
use safetensors::SafeTensors;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A config over the demo data with the tiny LLaVA; `extra` is appended TOML.
fn config(out: &Path, steps: u64, extra: &str) -> ExperimentConfig {
    let r = root();
    let text = format!(
        r#"
[model]
path = "{model}"
[data]
max_length = 128
on_error = "skip"
[[data.datasets]]
path = "{data}/llava.json"
format = "llava"
image_root = "{data}/images"
[[data.datasets]]
path = "{data}/vlquery.jsonl"
format = "vlquery_json"
image_root = "{data}/images"
[[data.datasets]]
path = "{data}/flamingo.jsonl"
format = "flamingo"
image_root = "{data}/images"
[[data.datasets]]
path = "{data}/text.jsonl"
format = "text"
[optim]
lr = 2e-3
[schedule]
kind = "constant"
[train]
max_steps = {steps}
batch_size = 4
save_every = 0
output_dir = "{out}"
{extra}
"#,
        model = r.join("fixtures/tiny-llava").display(),
        data = r.join("data/demo/sft").display(),
        out = out.display(),
    );
    let config = ExperimentConfig::from_str(&text).expect("test config parses");
    config.validate().expect("test config is valid");
    config
}

/// The CPU backend's random generator (dropout masks, LoRA initialisation) is process-wide:
/// runs of the tests in this file take turns so that each is reproducible.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(
    config: &ExperimentConfig,
    options: &TrainOptions,
) -> resonance_train::trainer::TrainSummary {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    train(config, options, &Device::flex()).expect("training runs")
}

fn tensors(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect()
}

fn mean(values: &[(u64, f64)]) -> f64 {
    values.iter().map(|v| v.1).sum::<f64>() / values.len() as f64
}

#[test]
fn full_fine_tune_lowers_the_loss_and_leaves_frozen_groups_bit_exact() {
    let out = tempfile::tempdir().unwrap();
    // Vision tower and projector frozen: only the language model may change.
    let mut cfg = config(
        out.path(),
        30,
        "freeze_vision = true\nfreeze_projector = true\nfreeze_lm = false",
    );
    // Evaluation on (a copy of) the LLaVA-format training file: its loss must fall too.
    let mut eval = cfg.data.datasets[0].clone();
    eval.name = Some("eval".into());
    cfg.data.eval_datasets.push(eval);
    cfg.train.eval_every = 10;
    cfg.validate().unwrap();
    let summary = run(&cfg, &TrainOptions::default());
    let metrics = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    let evals: Vec<(u64, f64)> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("eval_loss")?.as_f64()?)))
        .collect();
    assert_eq!(
        evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![10, 20, 30]
    );
    assert!(evals[2].1 < evals[0].1, "eval loss did not fall: {evals:?}");
    assert_eq!(summary.losses.len(), 30);
    let first = mean(&summary.losses[..5]);
    let last = mean(&summary.losses[25..]);
    assert!(
        last < 0.6 * first,
        "loss did not fall enough: first 5 steps {first:.4}, last 5 {last:.4}"
    );

    let final_dir = summary.final_dir.expect("the run finished");
    for file in [
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "processor_config.json",
    ] {
        assert!(final_dir.join(file).is_file(), "{file} not exported");
    }
    let before = tensors(&root().join("fixtures/tiny-llava/model.safetensors"));
    let after = tensors(&final_dir.join("model.safetensors"));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the export has transformers' tensor names"
    );
    let mut changed = 0;
    for (name, data) in &before {
        let same = after[name] == *data;
        if name.starts_with("vision_tower.") || name.starts_with("multi_modal_projector.") {
            assert!(same, "frozen tensor {name} changed");
        } else if !same {
            changed += 1;
        }
    }
    assert!(
        changed > 10,
        "only {changed} language-model tensors changed"
    );

    // The exported directory loads back as a model.
    AnyModel::load(&final_dir, &Device::flex()).expect("the export loads");
}

#[test]
fn resume_reproduces_the_uninterrupted_losses() {
    // LoRA with dropout and gradient accumulation: the RNG, the adapters, the optimizer moments
    // and the data position must all come back.
    let extra = "grad_accumulation = 2\n[lora]\nenabled = true\nrank = 4\ndropout = 0.1";
    let whole_dir = tempfile::tempdir().unwrap();
    let whole = run(
        &config(whole_dir.path(), 6, extra),
        &TrainOptions::default(),
    );

    let split_dir = tempfile::tempdir().unwrap();
    let cfg = config(split_dir.path(), 6, extra);
    let first = run(
        &cfg,
        &TrainOptions {
            stop_after: Some(3),
            ..TrainOptions::default()
        },
    );
    assert_eq!(first.global_step, 3);
    assert!(first.final_dir.is_none());
    assert_eq!(list_checkpoints(split_dir.path()).len(), 1);
    let resumed = run(
        &cfg,
        &TrainOptions {
            resume: Some(Resume::Latest),
            ..TrainOptions::default()
        },
    );
    assert_eq!(resumed.losses.len(), 6);
    for (a, b) in whole.losses.iter().zip(&resumed.losses) {
        assert_eq!(a.0, b.0);
        assert_eq!(
            a.1.to_bits(),
            b.1.to_bits(),
            "step {}: uninterrupted {} vs resumed {}",
            a.0,
            a.1,
            b.1
        );
    }
    // metrics.jsonl has each step once.
    let metrics = std::fs::read_to_string(split_dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
}

fn logits_of<M: TrainableModel>(model: &M, processor: &Processor, device: &Device) -> Tensor<3> {
    let text = processor
        .render_prompt("What colour is the shape?", 1)
        .unwrap();
    let ids = processor.prompt_ids(&text, 1).unwrap();
    let image = root().join("data/demo/sft/images/red_circle_white.png");
    let pixels = processor.pixel_values(&[image], device).unwrap();
    model
        .forward_inputs(
            ModelInputs {
                input_ids: std::slice::from_ref(&ids),
                attention_mask: &[vec![true; ids.len()]],
                images: Images::pixels(pixels),
            },
            device,
        )
        .unwrap()
}

#[test]
fn lora_changes_only_adapters_and_the_peft_adapter_round_trips() {
    let out = tempfile::tempdir().unwrap();
    let cfg = config(
        out.path(),
        8,
        "[lora]\nenabled = true\nrank = 4\nalpha = 8.0",
    );
    let summary = run(&cfg, &TrainOptions::default());
    assert!(summary.trainable_parameters < summary.total_parameters / 4);
    let adapter_dir = summary.final_dir.expect("finished");

    // The adapter file: LoRA factors of the LM and the (fully trained) projector, PEFT names.
    let adapter = tensors(&adapter_dir.join("adapter_model.safetensors"));
    assert!(adapter
        .keys()
        .any(|k| k
            == "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(adapter
        .keys()
        .any(|k| k == "base_model.model.model.multi_modal_projector.linear_1.weight"));
    assert!(adapter
        .keys()
        .all(|k| k.contains("lora_")
            || k.starts_with("base_model.model.model.multi_modal_projector.")));
    assert!(!adapter.keys().any(|k| k.contains("vision_tower")));
    let config = read_adapter_config(&adapter_dir).unwrap();
    assert_eq!((config.r, config.lora_alpha), (4, 8.0));
    assert_eq!(
        config.modules_to_save,
        Some(vec!["multi_modal_projector".to_string()])
    );

    // Merged into the base, only adapted layers (and the projector) differ from the base.
    let merged_dir = out.path().join("merged");
    merge_lora(
        root().join("fixtures/tiny-llava").to_str().unwrap(),
        &adapter_dir,
        &merged_dir,
        &Device::flex(),
    )
    .unwrap();
    let before = tensors(&root().join("fixtures/tiny-llava/model.safetensors"));
    let after = tensors(&merged_dir.join("model.safetensors"));
    let targets = resonance_train::trainer::AUTO_LM_TARGETS;
    for (name, data) in &before {
        let adapted = name.starts_with("language_model.model.layers.")
            && targets
                .iter()
                .any(|t| name.contains(&format!(".{t}.weight")));
        let projector = name.starts_with("multi_modal_projector.");
        if adapted || projector {
            assert_ne!(after[name], *data, "{name} should have been trained");
        } else {
            assert_eq!(after[name], *data, "{name} changed but has no adapter");
        }
    }

    // Base + adapter gives the logits of the merged model.
    let device = Device::flex();
    let base_dir = root().join("fixtures/tiny-llava");
    let AnyModel::Llava(base, _) = AnyModel::load(&base_dir, &device).unwrap() else {
        panic!("llava expected")
    };
    let processor = Processor::from_config_dir(&base_dir).unwrap();
    let mut with_adapter: Llava = *base;
    attach_peft_adapter(&mut with_adapter, &adapter_dir, &device).unwrap();
    let AnyModel::Llava(merged, _) = AnyModel::load(&merged_dir, &device).unwrap() else {
        panic!("llava expected")
    };
    let a = logits_of(&with_adapter, &processor, &device);
    let b = logits_of(&*merged, &processor, &device);
    let diff = (a - b).abs().max().into_scalar::<f32>();
    assert!(diff < 1e-4, "adapter vs merged logits differ by {diff}");
}

#[test]
fn qlora_trains_with_a_quantized_base() {
    let out = tempfile::tempdir().unwrap();
    let cfg = config(
        out.path(),
        12,
        "[lora]\nenabled = true\nrank = 4\nqlora = true",
    );
    let summary = run(&cfg, &TrainOptions::default());
    let first = mean(&summary.losses[..3]);
    let last = mean(&summary.losses[9..]);
    assert!(last < first, "QLoRA loss did not fall: {first} -> {last}");
    assert!(summary
        .final_dir
        .unwrap()
        .join("adapter_model.safetensors")
        .is_file());
}

#[test]
fn save_total_limit_keeps_the_newest_checkpoints() {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = config(out.path(), 5, "");
    cfg.train.save_every = 1;
    cfg.train.save_total_limit = 2;
    run(&cfg, &TrainOptions::default());
    let steps: Vec<u64> = list_checkpoints(out.path()).iter().map(|c| c.0).collect();
    assert_eq!(steps, vec![4, 5]);
    assert!(out.path().join("config.toml").is_file());
}

#[test]
fn gradient_checkpointing_gives_the_same_losses() {
    let mut losses = Vec::new();
    for checkpointing in [false, true] {
        let out = tempfile::tempdir().unwrap();
        let mut cfg = config(out.path(), 4, "");
        cfg.train.gradient_checkpointing = checkpointing;
        losses.push(run(&cfg, &TrainOptions::default()).losses);
    }
    assert_eq!(losses[0].len(), 4);
    for (a, b) in losses[0].iter().zip(&losses[1]) {
        assert!((a.1 - b.1).abs() < 1e-5, "{losses:?}");
    }
}

#[test]
fn bf16_training_keeps_f32_master_weights_learns_and_resumes_exactly() {
    use resonance_core::config::Dtype;
    // Full SFT of the projector and the language model, the vision tower frozen (the default).
    let half = |out: &Path| {
        let mut cfg = config(out, 8, "");
        cfg.model.dtype = Dtype::Bf16;
        cfg
    };
    let whole_dir = tempfile::tempdir().unwrap();
    let whole = run(&half(whole_dir.path()), &TrainOptions::default());
    let frozen = whole.total_parameters - whole.trainable_parameters;
    assert!(frozen > 0);
    assert_eq!(
        whole.parameters_by_dtype,
        BTreeMap::from([
            ("bf16".to_string(), frozen),
            ("f32".to_string(), whole.trainable_parameters),
        ]),
        "frozen weights in bf16, trained ones as f32 master weights"
    );
    let losses: Vec<f64> = whole.losses.iter().map(|(_, l)| *l).collect();
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    assert!(
        mean(&losses[5..]) < mean(&losses[..3]) - 0.3,
        "bf16 SFT losses: {losses:?}"
    );

    // The same run in f32 starts from nearly the same loss.
    let f32_dir = tempfile::tempdir().unwrap();
    let full = run(&config(f32_dir.path(), 1, ""), &TrainOptions::default());
    let (first_half, first_full) = (losses[0], full.losses[0].1);
    assert!(
        (first_half - first_full).abs() < 0.02 && first_half != first_full,
        "step-1 loss bf16 {first_half} vs f32 {first_full}"
    );

    // Interrupted and resumed, every loss is the same to the bit.
    let split_dir = tempfile::tempdir().unwrap();
    let cfg = half(split_dir.path());
    run(
        &cfg,
        &TrainOptions {
            stop_after: Some(3),
            ..TrainOptions::default()
        },
    );
    let resumed = run(
        &cfg,
        &TrainOptions {
            resume: Some(Resume::Latest),
            ..TrainOptions::default()
        },
    );
    assert_eq!(resumed.losses.len(), whole.losses.len());
    for (a, b) in whole.losses.iter().zip(&resumed.losses) {
        assert_eq!(
            a.1.to_bits(),
            b.1.to_bits(),
            "step {}: {} vs {}",
            a.0,
            a.1,
            b.1
        );
    }

    // The export is f32 throughout and loads back.
    let final_dir = whole.final_dir.expect("exported");
    let bytes = std::fs::read(final_dir.join("model.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    assert!(tensors
        .tensors()
        .iter()
        .all(|(_, t)| t.dtype() == safetensors::Dtype::F32));
    AnyModel::load(&final_dir, &Device::flex()).expect("the export loads");
}
