//! Checkpoint discovery and weight loading: local directories in Hugging Face layout, hub ids
//! through the hf-hub cache (downloading when allowed), single or sharded safetensors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::DType;
use burn_store::{
    FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// Files a model directory may carry besides the weights; fetched when present on the hub.
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
];

/// The hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn default_hub_cache() -> PathBuf {
    if let Ok(dir) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Ok(home) = std::env::var("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

/// Whether hub downloads are forbidden (`HF_HUB_OFFLINE=1`).
pub fn hub_offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes")
    )
}

fn looks_like_hub_id(reference: &str) -> bool {
    let parts: Vec<&str> = reference.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// Resolves a model reference (a local directory or a hub id such as `llava-hf/llava-1.5-7b-hf`)
/// to a directory holding `config.json`. Hub ids are looked up in `cache`; missing files are
/// downloaded unless `allow_download` is false.
pub fn resolve_model_in(reference: &str, cache: &Path, allow_download: bool) -> Result<PathBuf> {
    let path = Path::new(reference);
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(ModelError::Resolve {
                reference: reference.into(),
                message: format!("{} has no config.json", path.display()),
            });
        }
        return Ok(path.to_path_buf());
    }
    if !looks_like_hub_id(reference) {
        return Err(ModelError::Resolve {
            reference: reference.into(),
            message: "not a directory and not a hub id of the form `owner/name`".into(),
        });
    }
    let repo = hf_hub::Cache::new(cache.to_path_buf()).model(reference.to_string());
    if let Some(config) = repo.get("config.json") {
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        if weight_files(&dir).is_ok() {
            return Ok(dir);
        }
    }
    if !allow_download {
        return Err(ModelError::Resolve {
            reference: reference.into(),
            message: format!(
                "not found in the hub cache {} and downloads are disabled (HF_HUB_OFFLINE)",
                cache.display()
            ),
        });
    }
    download(reference, cache)
}

/// Resolves with the default cache and the `HF_HUB_OFFLINE` setting.
pub fn resolve_model(reference: &str) -> Result<PathBuf> {
    resolve_model_in(reference, &default_hub_cache(), !hub_offline())
}

fn download(reference: &str, cache: &Path) -> Result<PathBuf> {
    let fail = |message: String| ModelError::Resolve {
        reference: reference.into(),
        message,
    };
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
        .with_progress(true)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let repo = api.model(reference.to_string());
    tracing::info!(model = reference, "downloading from the hub");
    let config = repo
        .get("config.json")
        .map_err(|e| fail(format!("config.json: {e}")))?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            for shard in shard_names(&index)? {
                repo.get(&shard)
                    .map_err(|e| fail(format!("{shard}: {e}")))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| fail(format!("model.safetensors: {e}")))?;
        }
    }
    for file in SIDE_FILES {
        // Optional files: a model without a chat template or processor config is fine.
        if let Err(e) = repo.get(file) {
            tracing::debug!(file, error = %e, "optional file not fetched");
        }
    }
    Ok(dir)
}

/// Reads a JSON file with errors that name it.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::from_json(path, &e))
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let value = read_json(index)?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::InvalidConfig {
            path: index.to_path_buf(),
            field: "weight_map".into(),
            message: "missing or not an object".into(),
        })?;
    let names: BTreeSet<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    Ok(names.into_iter().collect())
}

/// The safetensors files of a checkpoint directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let files: Vec<PathBuf> = shard_names(&index)?
            .into_iter()
            .map(|n| dir.join(n))
            .collect();
        for file in &files {
            if !file.is_file() {
                return Err(ModelError::Safetensors {
                    path: file.clone(),
                    message: format!("shard listed in {} is missing", index.display()),
                });
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::NoWeights {
        dir: dir.to_path_buf(),
    })
}

/// The tensor names of a checkpoint directory, read from the safetensors headers only (the
/// tensor data is not read).
pub fn checkpoint_tensor_names(dir: &Path) -> Result<BTreeSet<String>> {
    use std::io::Read;
    let mut names = BTreeSet::new();
    for file in weight_files(dir)? {
        let bad = |message: String| ModelError::Safetensors {
            path: file.clone(),
            message,
        };
        let mut reader = std::fs::File::open(&file).map_err(|source| ModelError::Io {
            path: file.clone(),
            source,
        })?;
        let mut len = [0u8; 8];
        reader
            .read_exact(&mut len)
            .map_err(|e| bad(format!("header length: {e}")))?;
        let len = u64::from_le_bytes(len);
        // The format caps headers at 100 MB; a larger value means a corrupt file.
        if len > 100_000_000 {
            return Err(bad(format!("header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        reader
            .read_exact(&mut header)
            .map_err(|e| bad(format!("header: {e}")))?;
        let header: serde_json::Map<String, Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        names.extend(
            header
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| k != "__metadata__"),
        );
    }
    Ok(names)
}

/// Whether a checkpoint carries a reward model's value head (`score.weight`, as transformers'
/// `*ForSequenceClassification` models name it).
pub fn has_value_head(dir: &Path) -> Result<bool> {
    Ok(checkpoint_tensor_names(dir)?.contains("score.weight"))
}

/// transformers' default `initializer_range` (the std of a freshly initialised value head).
pub const DEFAULT_INITIALIZER_RANGE: f64 = 0.02;

/// How checkpoint names map onto a module and which leftovers are expected.
#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    /// Regex → replacement, applied in order to every checkpoint key.
    pub renames: Vec<(String, String)>,
    /// Checkpoint keys (after renaming) that may be present without a parameter to receive them.
    pub ignore_unused: Vec<String>,
    /// Module parameters that may stay at their initial value when absent from the checkpoint.
    pub allow_missing: Vec<String>,
}

fn compile(patterns: &[String]) -> Vec<regex::Regex> {
    patterns
        .iter()
        .filter_map(|p| regex::Regex::new(p).ok())
        .collect()
}

/// Loads every weight of `module` from the checkpoint in `dir`, converting floats to `dtype`.
/// Missing parameters, unexpected tensors and shape mismatches are one error naming them all.
pub fn load_weights<M: Module + ModuleSnapshot>(
    module: &mut M,
    dir: &Path,
    keys: &KeyMap,
    dtype: DType,
) -> Result<()> {
    let files = weight_files(dir)?;
    let mut missing_everywhere: Option<BTreeSet<String>> = None;
    let mut unused: BTreeSet<String> = BTreeSet::new();
    let mut errors: Vec<String> = Vec::new();
    let mut applied: BTreeSet<String> = BTreeSet::new();
    for file in &files {
        let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(dtype));
        let mut store = SafetensorsStore::from_file(file.clone())
            .with_from_adapter(adapter)
            .allow_partial(true)
            .map_indices_contiguous(false)
            .validate(true);
        for (from, to) in &keys.renames {
            store = store.with_key_remapping(from.as_str(), to.as_str());
        }
        let result = module
            .load_from(&mut store)
            .map_err(|e| ModelError::Safetensors {
                path: file.clone(),
                message: e.to_string(),
            })?;
        let missing: BTreeSet<String> = result.missing.iter().map(|(p, _)| p.clone()).collect();
        missing_everywhere = Some(match missing_everywhere {
            None => missing,
            Some(prev) => prev.intersection(&missing).cloned().collect(),
        });
        unused.extend(result.unused.iter().cloned());
        applied.extend(result.applied.iter().cloned());
        errors.extend(result.errors.iter().map(|e| {
            format!(
                "{}: {e}",
                file.file_name().unwrap_or_default().to_string_lossy()
            )
        }));
    }
    let ignore = compile(&keys.ignore_unused);
    let allow = compile(&keys.allow_missing);
    let unused: Vec<String> = unused
        .into_iter()
        .filter(|k| !applied.contains(k) && !ignore.iter().any(|r| r.is_match(k)))
        .collect();
    let missing: Vec<String> = missing_everywhere
        .unwrap_or_default()
        .into_iter()
        .filter(|k| !allow.iter().any(|r| r.is_match(k)))
        .collect();
    if missing.is_empty() && unused.is_empty() && errors.is_empty() {
        return Ok(());
    }
    let mut details = String::new();
    let mut section = |title: &str, items: &[String]| {
        if items.is_empty() {
            return;
        }
        details.push_str(&format!("\n  {title} ({}):", items.len()));
        for item in items.iter().take(20) {
            details.push_str(&format!("\n    {item}"));
        }
        if items.len() > 20 {
            details.push_str(&format!("\n    ... and {} more", items.len() - 20));
        }
    };
    section("missing tensors", &missing);
    section("unexpected tensors", &unused);
    section("errors", &errors);
    Err(ModelError::WeightMismatch {
        dir: dir.to_path_buf(),
        details,
    })
}

/// Reads `config.json` of a directory.
pub fn read_config(dir: &Path) -> Result<Value> {
    read_json(&dir.join("config.json"))
}

/// The `model_type` of a config, with the directory named in the error when absent.
pub fn model_type(config: &Value, dir: &Path) -> Result<String> {
    config
        .get("model_type")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ModelError::InvalidConfig {
            path: dir.join("config.json"),
            field: "model_type".into(),
            message: "missing".into(),
        })
}

/// Tensor names and shapes stored in a checkpoint (for diagnostics and tests).
pub fn checkpoint_shapes(dir: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let mut out = BTreeMap::new();
    for file in weight_files(dir)? {
        let bytes = std::fs::read(&file).map_err(|source| ModelError::Io {
            path: file.clone(),
            source,
        })?;
        let tensors =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors {
                path: file.clone(),
                message: e.to_string(),
            })?;
        for (name, view) in tensors.tensors() {
            out.insert(name, view.shape().to_vec());
        }
    }
    Ok(out)
}
