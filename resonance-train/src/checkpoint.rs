//! Saving what training produces: full models in the Hugging Face layout, LoRA adapters in the
//! PEFT layout, and resumable checkpoints (weights + optimizer + scheduler + data position).
//!
//! Every directory is written under a temporary name and renamed into place, so a crash never
//! leaves a half-written checkpoint that looks complete.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::FloatDType;
use burn_store::{
    BurnToPyTorchAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, SafetensorsStore,
};
use resonance_models::nn::precision::cast_params;
use resonance_models::trainable::{rename_path, TrainableModel};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Result, TrainError};
use crate::params::is_lora_path;

/// File names of the layouts.
pub const MODEL_WEIGHTS: &str = "model.safetensors";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const TRAINABLE_WEIGHTS: &str = "trainable.safetensors";
pub const OPTIMIZER_STATE: &str = "optimizer.bpk";
pub const SCHEDULER_STATE: &str = "scheduler.bpk";
pub const TRAINER_STATE: &str = "trainer_state.json";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn store_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint(format!("{}: {e}", path.display()))
}

/// Files of a model directory that travel with its weights: config, generation config,
/// tokenizer files, chat template, processor configs and remote code.
fn is_model_file(name: &str) -> bool {
    const NAMES: [&str; 16] = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
        "processor_config.json",
        "preprocessor_config.json",
        "image_processor_config.json",
        "video_preprocessor_config.json",
    ];
    NAMES.contains(&name) || name.ends_with(".py") || name.ends_with(".tiktoken")
}

/// Copies the model files (see `is_model_file`) of `source` into `out`, marking `config.json`
/// as float32 (the dtype of the weights written), or leaving it out without `include_config`.
pub fn copy_model_files(source: &Path, out: &Path, include_config: bool) -> Result<()> {
    for entry in fs::read_dir(source).map_err(io_err(source))? {
        let entry = entry.map_err(io_err(source))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.path().is_file()
            || !is_model_file(&name)
            || (name == "config.json" && !include_config)
        {
            continue;
        }
        let target = out.join(&name);
        if name == "config.json" {
            let text = fs::read_to_string(entry.path()).map_err(io_err(&entry.path()))?;
            let mut config: Value =
                serde_json::from_str(&text).map_err(|e| store_err(&entry.path(), e))?;
            mark_float32(&mut config);
            let text = serde_json::to_string_pretty(&config).map_err(|e| store_err(&target, e))?;
            fs::write(&target, text + "\n").map_err(io_err(&target))?;
        } else {
            fs::copy(entry.path(), &target).map_err(io_err(&target))?;
        }
    }
    Ok(())
}

fn mark_float32(config: &mut Value) {
    if let Value::Object(map) = config {
        for key in ["torch_dtype", "dtype"] {
            if map.contains_key(key) {
                map.insert(key.to_string(), json!("float32"));
            }
        }
        for sub in ["text_config", "vision_config"] {
            if let Some(inner) = map.get_mut(sub) {
                mark_float32(inner);
            }
        }
    }
}

/// Writes `model` (LoRA adapters merged) as a transformers checkpoint in `out`: f32
/// `model.safetensors` with transformers' tensor names, plus the non-weight files of
/// `source_dir`.
pub fn save_hf_model<M: TrainableModel + ModuleSnapshot + Clone>(
    model: &M,
    source_dir: &Path,
    out: &Path,
) -> Result<()> {
    let mut merged = model.clone();
    merged.visit_linears("", &mut |_, linear| linear.merge_lora());
    // Frozen weights of a half-precision run are widened: the file is f32 throughout.
    let merged = cast_params(merged, FloatDType::F32);
    fs::create_dir_all(out).map_err(io_err(out))?;
    let path = out.join(MODEL_WEIGHTS);
    // A text reward model is written as transformers' `*ForSequenceClassification`, which has
    // no LM head (a multimodal one keeps it: transformers has no such class for it).
    let reward = model.decoder().score.is_some();
    fn keep(path: &str, _: &str) -> bool {
        !is_lora_path(path)
    }
    fn keep_reward(path: &str, _: &str) -> bool {
        !is_lora_path(path) && path != "lm_head.weight"
    }
    let mut store = SafetensorsStore::from_file(path.clone())
        .with_to_adapter(BurnToPyTorchAdapter)
        .with_predicate(if reward { keep_reward } else { keep })
        .metadata("format", "pt")
        .overwrite(true);
    for (from, to) in M::checkpoint_renames() {
        store = store.with_key_remapping(from, to);
    }
    store
        .collect_from(&merged)
        .map_err(|e| store_err(&path, e))?;
    copy_model_files(source_dir, out, true)?;
    if reward {
        mark_reward_config(&out.join("config.json"))?;
    }
    Ok(())
}

/// Marks an exported config as a one-label sequence classifier, as transformers writes a reward
/// model: `id2label` / `label2id` with one label and, for a text model, the
/// `*ForSequenceClassification` architecture.
fn mark_reward_config(path: &Path) -> Result<()> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| store_err(path, e))?;
    if let Value::Object(map) = &mut config {
        map.insert("id2label".into(), json!({"0": "LABEL_0"}));
        map.insert("label2id".into(), json!({"LABEL_0": 0}));
        if let Some(Value::Array(archs)) = map.get_mut("architectures") {
            for arch in archs.iter_mut() {
                if let Some(name) = arch.as_str().and_then(|a| a.strip_suffix("ForCausalLM")) {
                    *arch = json!(format!("{name}ForSequenceClassification"));
                }
            }
        }
    }
    let text = serde_json::to_string_pretty(&config).map_err(|e| store_err(path, e))?;
    fs::write(path, text + "\n").map_err(io_err(path))
}

/// What an adapter directory describes (PEFT's `adapter_config.json`, the fields we use).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// PEFT's task type (`SEQ_CLS` for a reward model, whose value head is saved whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
}

/// The name of a tensor in a PEFT adapter file, from its Burn-side name (after the PyTorch
/// adapter's renames, e.g. `...q_proj.lora.lora_a`).
fn peft_tensor_name<M: TrainableModel>(name: &str) -> String {
    let name = if let Some(module) = name.strip_suffix(".lora.lora_a") {
        format!("{module}.lora_A.weight")
    } else if let Some(module) = name.strip_suffix(".lora.lora_b") {
        format!("{module}.lora_B.weight")
    } else {
        name.to_string()
    };
    format!(
        "base_model.model.{}",
        rename_path(&name, &M::module_renames())
    )
}

/// Writes the LoRA factors of `model`, and the full weights of the modules in
/// `config.modules_to_save` (module-path prefixes, e.g. `multi_modal_projector`), as a PEFT
/// adapter directory.
pub fn save_peft_adapter<M: TrainableModel + ModuleSnapshot>(
    model: &M,
    config: &AdapterConfig,
    full_prefixes: &[String],
    out: &Path,
) -> Result<()> {
    fs::create_dir_all(out).map_err(io_err(out))?;
    let path = out.join(ADAPTER_WEIGHTS);
    let mut patterns = vec![r"\.lora\.lora_[ab]$".to_string()];
    patterns.extend(
        full_prefixes
            .iter()
            .map(|p| format!("^{}", regex::escape(p))),
    );
    let mut store = SafetensorsStore::from_file(path.clone())
        .with_to_adapter(BurnToPyTorchAdapter)
        .with_regexes(patterns)
        .metadata("format", "pt")
        .overwrite(true);
    for (ours, peft) in peft_names::<M>(model) {
        store = store.with_key_remapping(exact(&ours), peft);
    }
    store.collect_from(model).map_err(|e| store_err(&path, e))?;
    let config_path = out.join(ADAPTER_CONFIG);
    let mut value = serde_json::to_value(config).map_err(|e| store_err(&config_path, e))?;
    if let Value::Object(map) = &mut value {
        let task = config.task_type.as_deref().unwrap_or("CAUSAL_LM");
        map.insert("task_type".into(), json!(task));
        map.insert("inference_mode".into(), json!(true));
        map.insert("init_lora_weights".into(), json!(true));
    }
    let text = serde_json::to_string_pretty(&value).map_err(|e| store_err(&config_path, e))?;
    fs::write(&config_path, text + "\n").map_err(io_err(&config_path))?;
    Ok(())
}

/// `(our tensor name, PEFT tensor name)` of every tensor of `model` (our names after the
/// PyTorch adapter's renames, as they are written and read).
fn peft_names<M: TrainableModel + ModuleSnapshot>(model: &M) -> Vec<(String, String)> {
    model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), false)
        .iter()
        .map(|t| (t.name.clone(), peft_tensor_name::<M>(&t.name)))
        .collect()
}

/// A regex matching exactly `name`.
fn exact(name: &str) -> String {
    format!("^{}$", regex::escape(name))
}

/// Reads a PEFT adapter directory's config.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| {
        TrainError::Checkpoint(format!(
            "{}:{}:{}: {e}",
            path.display(),
            e.line(),
            e.column()
        ))
    })
}

/// Loads the tensors of a PEFT adapter file into `model`, whose adapters must already be
/// attached with the adapter's rank and targets. Every tensor of the file must land on a
/// parameter of the model.
pub fn load_peft_weights<M: TrainableModel + ModuleSnapshot>(
    model: &mut M,
    dir: &Path,
) -> Result<()> {
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.is_file() {
        return Err(TrainError::Checkpoint(format!(
            "{}: no adapter weights",
            path.display()
        )));
    }
    let mut store = SafetensorsStore::from_file(path.clone())
        .with_from_adapter(PyTorchToBurnAdapter)
        .allow_partial(true)
        .map_indices_contiguous(false)
        .validate(true);
    for (ours, peft) in peft_names::<M>(model) {
        store = store.with_key_remapping(exact(&peft), ours);
    }
    let result = model
        .load_from(&mut store)
        .map_err(|e| store_err(&path, e))?;
    let mut problems = Vec::new();
    problems.extend(
        result
            .unused
            .iter()
            .map(|k| format!("unexpected tensor {k}")),
    );
    problems.extend(result.errors.iter().map(|e| e.to_string()));
    if !problems.is_empty() {
        return Err(TrainError::Checkpoint(format!(
            "{}: the adapter does not fit the model:\n  {}",
            path.display(),
            problems.join("\n  ")
        )));
    }
    Ok(())
}

/// Writes the parameters whose module path satisfies `keep` under their module paths
/// (the exact-resume copy of what is being trained).
pub fn save_trainable<M: Module + ModuleSnapshot>(
    model: &M,
    regexes: Vec<String>,
    path: &Path,
) -> Result<()> {
    let mut store = SafetensorsStore::from_file(path.to_path_buf())
        .with_regexes(regexes)
        .overwrite(true);
    store.collect_from(model).map_err(|e| store_err(path, e))
}

/// Loads what [`save_trainable`] wrote; every tensor of the file must be used.
pub fn load_trainable<M: Module + ModuleSnapshot>(model: &mut M, path: &Path) -> Result<usize> {
    let mut store = SafetensorsStore::from_file(path.to_path_buf())
        .allow_partial(true)
        .map_indices_contiguous(false)
        .validate(true);
    let result = model
        .load_from(&mut store)
        .map_err(|e| store_err(path, e))?;
    if !result.unused.is_empty() || !result.errors.is_empty() {
        return Err(TrainError::Checkpoint(format!(
            "{}: does not fit the model (unexpected: {:?}, errors: {:?})",
            path.display(),
            result.unused,
            result
                .errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
        )));
    }
    Ok(result.applied.len())
}

/// Where training stands; `trainer_state.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: u64,
    /// Total optimizer steps of the run.
    pub total_steps: u64,
    /// The next sample to draw.
    pub epoch: u64,
    pub sample_index: usize,
    /// The seed of the run (dropout is reseeded from it at every step).
    pub seed: u64,
    /// `(step, loss)` of every step so far.
    pub losses: Vec<(u64, f64)>,
    /// Records refused so far, by reason.
    pub refused: BTreeMap<String, usize>,
}

/// `checkpoint-<step>` directories of a run, oldest first.
pub fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            let path = e.path();
            path.join(TRAINER_STATE).is_file().then_some((step, path))
        })
        .collect();
    out.sort();
    out
}

/// Writes a directory atomically: `fill` writes into `<dir>.tmp`, which is then renamed to
/// `dir` (replacing an older one).
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    fill(&tmp)?;
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    fs::rename(&tmp, dir).map_err(io_err(dir))
}

/// Deletes the oldest checkpoints beyond `limit` (0 keeps all).
pub fn rotate_checkpoints(run_dir: &Path, limit: usize) -> Result<()> {
    if limit == 0 {
        return Ok(());
    }
    let all = list_checkpoints(run_dir);
    if all.len() > limit {
        for (_, path) in &all[..all.len() - limit] {
            fs::remove_dir_all(path).map_err(io_err(path))?;
        }
    }
    Ok(())
}

/// Attaches the adapters described by a PEFT directory to `model` (every linear layer whose
/// name is in `target_modules`) and loads their weights, and those of `modules_to_save`.
/// Layers the file has no factors for keep `B = 0`, i.e. no change.
pub fn attach_peft_adapter<M: TrainableModel + ModuleSnapshot>(
    model: &mut M,
    dir: &Path,
    device: &burn::tensor::Device,
) -> Result<AdapterConfig> {
    let config = read_adapter_config(dir)?;
    if config.peft_type != "LORA" || config.use_dora || config.use_rslora || config.fan_in_fan_out {
        return Err(TrainError::Checkpoint(format!(
            "{}: only plain LoRA adapters are supported (peft_type LORA, no DoRA, no rsLoRA, \
             fan_in_fan_out false)",
            dir.join(ADAPTER_CONFIG).display()
        )));
    }
    let spec = resonance_models::nn::linear::LoraSpec {
        rank: config.r,
        alpha: config.lora_alpha,
        dropout: 0.0,
        quantize_base: false,
    };
    // A reward model's adapter carries its value head whole (PEFT `SEQ_CLS`): give the base
    // model a head for it to load into.
    if config.task_type.as_deref() == Some("SEQ_CLS") && model.decoder().score.is_none() {
        model
            .decoder_mut()
            .attach_value_head(resonance_models::load::DEFAULT_INITIALIZER_RANGE, device);
    }
    let targets = config.target_modules.clone();
    model.visit_linears("", &mut |path, linear| {
        let name = path.rsplit('.').next().unwrap_or(path);
        if targets.iter().any(|t| t == name || t == path) {
            linear.attach_lora(&spec, device);
        }
    });
    load_peft_weights(model, dir)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_rotation_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for step in [1u64, 2, 3] {
            let target = dir.path().join(format!("checkpoint-{step}"));
            write_dir_atomically(&target, |tmp| {
                fs::write(tmp.join(TRAINER_STATE), "{}").unwrap();
                Ok(())
            })
            .unwrap();
        }
        rotate_checkpoints(dir.path(), 2).unwrap();
        let left: Vec<u64> = list_checkpoints(dir.path()).iter().map(|c| c.0).collect();
        assert_eq!(left, vec![2, 3]);
        assert!(!dir.path().join("checkpoint-3.tmp").exists());
    }
}
