//! `resonance bench`: the Rust side of the benchmark against PyTorch + transformers + TRL
//! (`bench/README.md`, `bench/reference.py`).
//!
//! Both sides read `bench/workloads.json`, load the same weights (`bench/.cache/model`, written by
//! `bench/reference.py --write-weights`) and build the same synthetic inputs from its formulas, so
//! the step-0 numbers (losses, log-probs, greedy ids) must agree and the times compare the same
//! work. Each workload runs through the code paths `resonance train` / `score` / `generate` use:
//!
//! * `sft`: the rows in shards, one per compute thread ([`sharded_gradients`], as the trainer),
//!   each [`TrainableModel::target_logits`] → [`sft_loss`] → `backward` →
//!   `GradientsParams::from_grads`, then the trainer's AdamW ([`build_optimizer`]); the vision
//!   tower frozen through [`prepare_params`];
//! * `dpo`: LoRA attached by the trainer's [`attach_lora`], the pairs in shards as for `sft`, per
//!   shard the policy's
//!   [`TrainableModel::target_logits`] over the pairs (each image encoded once for chosen and
//!   rejected, their shared prefix run once), the
//!   reference = the same model under [`AdaptersDisabled`] without gradients, [`pair_loss`];
//! * `generate_*`: [`generate`] (one sequence, `resonance generate`'s path) for batch 1 and
//!   [`generate_greedy_batch`] (all rows in one KV-cached decode) for larger batches;
//! * `score`: [`AnyModel::forward`] and [`token_logprobs`], as `resonance score`.
//!
//! The functions here run one workload in the current process ([`run_workload`]) and format
//! results ([`print_table`], [`compare_table`]); the CLI runs each workload in a child process
//! so that the peak RSS is per workload.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Distribution, FloatDType, Tensor, TensorData};
use resonance_core::config::{ExperimentConfig, TargetModules};
use resonance_models::generate::{generate, generate_greedy_batch, SamplingConfig};
use resonance_models::llava::config::LlavaConfig;
use resonance_models::llava::model::Llava;
use resonance_models::nn::linear::{flat_linear, AdaptersDisabled};
use resonance_models::packing::SharedPrefixPacking;
use resonance_models::registry::{AnyModel, Images, ModelInputs};
use resonance_models::trainable::{Component, TrainableModel};
use resonance_models::vision::clip::vision_tower_calls;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::dpo::pair_loss;
use crate::error::{Result, TrainError};
use crate::logprobs::{compact_targets, sequence_logps, token_logprobs};
use crate::losses::{DpoLossConfig, DpoLossType};
use crate::params::{is_lora_path, param_table, parameters_by_dtype, prepare_params};
use crate::sft::sft_loss;
use crate::shards::{shard_count, shard_ranges, sharded_gradients};
use crate::trainer::{apply_precision, attach_lora, build_optimizer};

/// Version of the result JSON (shared with `bench/reference.py`).
pub const SCHEMA_VERSION: u64 = 1;

/// The command that writes the benchmark weights.
pub const WRITE_WEIGHTS_COMMAND: &str =
    "python bench/reference.py --model-dir bench/model --write-weights --no-run";

fn input_error(message: impl Into<String>) -> TrainError {
    TrainError::Input(message.into())
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a workload does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Sft,
    Dpo,
    Generate,
    Score,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Sft => "sft",
            WorkloadKind::Dpo => "dpo",
            WorkloadKind::Generate => "generate",
            WorkloadKind::Score => "score",
        }
    }
}

/// `optimizer` of a training workload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OptimizerSpec {
    pub name: String,
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

/// `lora` of the DPO workload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LoraSpecJson {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
    pub scope: String,
}

/// One workload of `workloads.json` (free-text keys are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Workload {
    pub kind: WorkloadKind,
    #[serde(default)]
    pub batch: Option<usize>,
    #[serde(default)]
    pub batch_pairs: Option<usize>,
    #[serde(default)]
    pub text_tokens: Option<usize>,
    pub prompt_text_tokens: usize,
    #[serde(default = "one")]
    pub images_per_sample: usize,
    #[serde(default)]
    pub new_tokens: Option<usize>,
    #[serde(default)]
    pub optimizer: Option<OptimizerSpec>,
    #[serde(default)]
    pub beta: Option<f64>,
    #[serde(default)]
    pub loss_type: Option<String>,
    #[serde(default)]
    pub lora: Option<LoraSpecJson>,
}

fn one() -> usize {
    1
}

impl Workload {
    fn need<T: Copy>(&self, name: &str, key: &str, value: Option<T>) -> Result<T> {
        value.ok_or_else(|| {
            input_error(format!(
                "workload `{name}` ({}): `{key}` is required",
                self.kind.as_str()
            ))
        })
    }

    /// Rows of a batch (`batch`, or `batch_pairs` for DPO).
    pub fn rows(&self, name: &str) -> Result<usize> {
        match self.kind {
            WorkloadKind::Dpo => self.need(name, "batch_pairs", self.batch_pairs),
            _ => self.need(name, "batch", self.batch),
        }
    }

    /// Completion tokens per sequence (`text_tokens - prompt_text_tokens`).
    pub fn completion_tokens(&self, name: &str) -> Result<usize> {
        let text = self.need(name, "text_tokens", self.text_tokens)?;
        if text <= self.prompt_text_tokens {
            return Err(input_error(format!(
                "workload `{name}`: text_tokens ({text}) must exceed prompt_text_tokens ({})",
                self.prompt_text_tokens
            )));
        }
        Ok(text - self.prompt_text_tokens)
    }

    fn validate(&self, name: &str) -> Result<()> {
        if self.images_per_sample != 1 {
            return Err(input_error(format!(
                "workload `{name}`: only images_per_sample = 1 is supported"
            )));
        }
        if self.prompt_text_tokens == 0 {
            return Err(input_error(format!(
                "workload `{name}`: prompt_text_tokens must be ≥ 1 (it counts BOS)"
            )));
        }
        if self.rows(name)? == 0 {
            return Err(input_error(format!("workload `{name}`: empty batch")));
        }
        match self.kind {
            WorkloadKind::Sft | WorkloadKind::Dpo => {
                self.completion_tokens(name)?;
                let o = self.optimizer.as_ref().ok_or_else(|| {
                    input_error(format!("workload `{name}`: `optimizer` is required"))
                })?;
                if o.name != "adamw" {
                    return Err(input_error(format!(
                        "workload `{name}`: optimizer `{}` (only adamw)",
                        o.name
                    )));
                }
                if self.kind == WorkloadKind::Dpo {
                    let lora = self.lora.as_ref().ok_or_else(|| {
                        input_error(format!("workload `{name}`: `lora` is required"))
                    })?;
                    if lora.scope != "language_model" {
                        return Err(input_error(format!(
                            "workload `{name}`: lora.scope `{}` (only language_model)",
                            lora.scope
                        )));
                    }
                }
            }
            WorkloadKind::Score => {
                self.completion_tokens(name)?;
            }
            WorkloadKind::Generate => {
                self.need(name, "new_tokens", self.new_tokens)?;
            }
        }
        Ok(())
    }
}

/// Salts of the token formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Salts {
    pub prompt: u64,
    pub completion: u64,
    pub rejected: u64,
}

#[derive(Deserialize)]
struct RawSpec {
    schema_version: u64,
    model: RawModel,
    inputs: RawInputs,
    defaults: RawDefaults,
    workloads: Map<String, Value>,
}

#[derive(Deserialize)]
struct RawModel {
    config_dir: String,
    weights_dir: String,
    seed: u64,
    dtype: String,
}

#[derive(Deserialize)]
struct RawInputs {
    first_text_id: u32,
    salts: Salts,
}

#[derive(Deserialize)]
struct RawDefaults {
    steps: usize,
    warmup: usize,
}

/// `bench/workloads.json`, parsed.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub path: PathBuf,
    pub sha256: String,
    pub config_dir: String,
    /// As written in the file (relative to the repository root).
    pub weights_dir: PathBuf,
    pub seed: u64,
    pub first_text_id: u32,
    pub salts: Salts,
    pub steps: usize,
    pub warmup: usize,
    /// In file order.
    pub workloads: Vec<(String, Workload)>,
}

impl BenchSpec {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(io_error(path))?;
        let raw: RawSpec = serde_json::from_slice(&bytes)
            .map_err(|e| input_error(format!("{}: {e}", path.display())))?;
        if raw.schema_version != SCHEMA_VERSION {
            return Err(input_error(format!(
                "{}: schema_version {} (this build reads {SCHEMA_VERSION})",
                path.display(),
                raw.schema_version
            )));
        }
        if raw.model.dtype != "float32" {
            return Err(input_error(format!(
                "{}: model.dtype `{}` (only float32)",
                path.display(),
                raw.model.dtype
            )));
        }
        // serde_json keeps object order here (`preserve_order`, enabled by resonance-core).
        let mut workloads = Vec::new();
        for (name, value) in raw.workloads {
            let w: Workload = serde_json::from_value(value)
                .map_err(|e| input_error(format!("{}: workload `{name}`: {e}", path.display())))?;
            w.validate(&name)?;
            workloads.push((name, w));
        }
        Ok(BenchSpec {
            path: path.to_path_buf(),
            sha256: hex_sha256(&bytes),
            config_dir: raw.model.config_dir,
            weights_dir: PathBuf::from(raw.model.weights_dir),
            seed: raw.model.seed,
            first_text_id: raw.inputs.first_text_id,
            salts: raw.inputs.salts,
            steps: raw.defaults.steps,
            warmup: raw.defaults.warmup,
            workloads,
        })
    }

    pub fn workload(&self, name: &str) -> Result<&Workload> {
        self.workloads
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, w)| w)
            .ok_or_else(|| {
                let known: Vec<&str> = self.workloads.iter().map(|(n, _)| n.as_str()).collect();
                input_error(format!(
                    "unknown workload `{name}`; {} has: {}",
                    self.path.display(),
                    known.join(", ")
                ))
            })
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// sha256 of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The weights file of a weights dir, or an error that says how to make it.
pub fn weights_file(weights_dir: &Path) -> Result<PathBuf> {
    let file = weights_dir.join("model.safetensors");
    if !file.is_file() || !weights_dir.join("config.json").is_file() {
        return Err(input_error(format!(
            "{} is missing: build the benchmark weights first (from the repository root, with \
             the Python environment of bench/requirements.txt):\n    {WRITE_WEIGHTS_COMMAND}",
            file.display()
        )));
    }
    Ok(file)
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// The synthetic inputs of `workloads.json` `inputs`, for one model.
#[derive(Debug, Clone)]
pub struct Inputs {
    first: u32,
    salts: Salts,
    vocab: u64,
    bos: u32,
    image_id: u32,
    image_size: usize,
    image_tokens: usize,
}

impl Inputs {
    pub fn new(spec: &BenchSpec, config: &LlavaConfig) -> Result<Self> {
        let bos = config
            .text
            .bos_token_id
            .ok_or_else(|| input_error("the model config has no bos_token_id"))?;
        let v = &config.vision;
        let image_tokens = (v.image_size / v.patch_size).pow(2);
        if config.tokens_per_image() != image_tokens {
            return Err(input_error(
                "the benchmark needs vision_feature_select_strategy = \"default\" (CLS dropped)",
            ));
        }
        if config.text.vocab_size as u32 <= spec.first_text_id {
            return Err(input_error("the vocabulary is smaller than first_text_id"));
        }
        Ok(Inputs {
            first: spec.first_text_id,
            salts: spec.salts,
            vocab: config.text.vocab_size as u64,
            bos,
            image_id: config.image_token_id,
            image_size: v.image_size,
            image_tokens,
        })
    }

    /// `first + (b·7919 + t·104729 + salt·15485863) mod (vocab − first)` for `t < n`.
    pub fn text_ids(&self, b: usize, n: usize, salt: u64) -> Vec<u32> {
        let modulus = self.vocab - self.first as u64;
        (0..n as u64)
            .map(|t| {
                self.first + ((b as u64 * 7919 + t * 104_729 + salt * 15_485_863) % modulus) as u32
            })
            .collect()
    }

    /// `[BOS] + [<image>]·tokens + prompt ids (prompt_text_tokens − 1) + completion ids`.
    pub fn sequence(
        &self,
        b: usize,
        prompt_text_tokens: usize,
        completion_tokens: usize,
        salt: u64,
    ) -> Vec<u32> {
        let mut ids = vec![self.bos];
        ids.extend(std::iter::repeat_n(self.image_id, self.image_tokens));
        ids.extend(self.text_ids(b, prompt_text_tokens - 1, self.salts.prompt));
        ids.extend(self.text_ids(b, completion_tokens, salt));
        ids
    }

    /// Positions before the completion: BOS + image tokens + the prompt text.
    pub fn prompt_len(&self, prompt_text_tokens: usize) -> usize {
        1 + self.image_tokens + prompt_text_tokens - 1
    }

    /// `((b·31 + c·17 + y·7 + x·3) mod 255) / 127.5 − 1`, `[batch, 3, size, size]`, f32 as torch
    /// computes it.
    pub fn pixels(&self, batch: usize, device: &Device) -> Tensor<4> {
        self.pixels_of(0..batch, device)
    }

    /// [`Self::pixels`] of the rows `rows` only.
    pub fn pixels_of(&self, rows: std::ops::Range<usize>, device: &Device) -> Tensor<4> {
        let s = self.image_size;
        let batch = rows.len();
        let mut values = Vec::with_capacity(batch * 3 * s * s);
        for b in rows {
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        let v = ((b * 31 + c * 17 + y * 7 + x * 3) % 255) as f32;
                        values.push(v / 127.5f32 - 1.0f32);
                    }
                }
            }
        }
        Tensor::from_data(TensorData::new(values, [batch, 3, s, s]), device)
    }

    pub fn image_tokens(&self) -> usize {
        self.image_tokens
    }
}

/// `(position, token)` targets of the completion: the token at `p ≥ start` predicted from `p − 1`.
fn completion_targets(rows: &[Vec<u32>], start: usize) -> Vec<Vec<(usize, u32)>> {
    rows.iter()
        .map(|ids| (start..ids.len()).map(|p| (p - 1, ids[p])).collect())
        .collect()
}

/// One shard of a training batch, built once before the timed steps: the rows of its images
/// (`pixels`), its token rows, their mask, the head's positions and the renumbered targets
/// ([`compact_targets`]), and each row's completion length.
struct ShardRows {
    pixels: std::ops::Range<usize>,
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<bool>>,
    positions: Vec<Vec<usize>>,
    targets: Vec<Vec<(usize, u32)>>,
    lengths: Vec<f32>,
}

impl ShardRows {
    /// The rows `rows` of a batch (`ids`, `mask`, `targets` indexed by row) whose images are
    /// the rows `pixels` of [`Inputs::pixels`].
    fn new(
        pixels: std::ops::Range<usize>,
        rows: &[usize],
        ids: &[Vec<u32>],
        mask: &[Vec<bool>],
        targets: &[Vec<(usize, u32)>],
    ) -> Self {
        let targets: Vec<Vec<(usize, u32)>> = rows.iter().map(|&r| targets[r].clone()).collect();
        let lengths = targets.iter().map(|t| t.len() as f32).collect();
        let (positions, targets) = compact_targets(&targets);
        ShardRows {
            pixels,
            ids: rows.iter().map(|&r| ids[r].clone()).collect(),
            mask: rows.iter().map(|&r| mask[r].clone()).collect(),
            positions,
            targets,
            lengths,
        }
    }

    fn inputs(&self, images: Images) -> ModelInputs<'_> {
        ModelInputs {
            input_ids: &self.ids,
            attention_mask: &self.mask,
            images: Some(images),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Analytic FLOPs (bench/README.md; the same formulas as bench/reference.py)

#[derive(Debug, Clone, Copy, Default)]
struct FlopParts {
    vision: f64,
    projector: f64,
    lm: f64,
    lm_attn: f64,
}

impl FlopParts {
    fn total(&self) -> f64 {
        self.vision + self.projector + self.lm + self.lm_attn
    }
}

/// Matmul FLOPs of one forward by component (`analytic_forward_flops` of reference.py);
/// `vision_layers` = the tower layers that run.
fn forward_flops(
    c: &LlavaConfig,
    n_seqs: usize,
    seq_len: usize,
    n_images: usize,
    lm_head_positions: usize,
    vision_layers: usize,
) -> FlopParts {
    let v = &c.vision;
    let (dv, iv, lv) = (
        v.hidden_size as f64,
        v.intermediate_size as f64,
        vision_layers as f64,
    );
    let patches = ((v.image_size / v.patch_size) as f64).powi(2);
    let tv = patches + 1.0;
    let ni = n_images as f64;
    let p = v.patch_size as f64;
    let vision = ni
        * (2.0 * patches * 3.0 * p * p * dv + lv * 2.0 * tv * (4.0 * dv * dv + 2.0 * dv * iv))
        + ni * lv * 4.0 * tv * tv * dv;
    let t = &c.text;
    let (d, i, l) = (
        t.hidden_size as f64,
        t.intermediate_size as f64,
        t.num_layers as f64,
    );
    let q = (t.num_heads * t.head_dim) as f64;
    let kv = (t.num_kv_heads * t.head_dim) as f64;
    let projector = ni * patches * 2.0 * (dv * d + d * d);
    let (ns, sl) = (n_seqs as f64, seq_len as f64);
    let lm = ns * l * 2.0 * sl * (d * q + 2.0 * d * kv + q * d + 3.0 * d * i)
        + 2.0 * lm_head_positions as f64 * d * t.vocab_size as f64;
    let lm_attn = ns * l * 4.0 * sl * sl * q;
    FlopParts {
        vision,
        projector,
        lm,
        lm_attn,
    }
}

fn lora_flops(c: &LlavaConfig, tokens: usize, r: usize) -> f64 {
    let t = &c.text;
    let (d, i) = (t.hidden_size, t.intermediate_size);
    let q = t.num_heads * t.head_dim;
    let kv = t.num_kv_heads * t.head_dim;
    let shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)];
    t.num_layers as f64
        * shapes
            .iter()
            .map(|&(a, b)| 2.0 * tokens as f64 * r as f64 * (a + b) as f64)
            .sum::<f64>()
}

/// The analytic FLOPs of one step. `own = false`: reference.py's formula (the work the PyTorch
/// side does: every tower layer, the DPO images encoded per sequence and forward, the LM head as
/// TRL's fused head applies it). `own = true`: the work this implementation does (the tower stops
/// at the feature layer, DPO encodes each image once per step for the policy and the reference
/// and runs the tokens a pair's rows share once, the training head projects the completion
/// positions only).
fn analytic_flops(
    c: &LlavaConfig,
    w: &Workload,
    name: &str,
    image_tokens: usize,
    own: bool,
) -> Result<(f64, &'static str)> {
    let all_layers = c.vision.num_hidden_layers;
    let run_layers = c
        .feature_layer_indices()
        .into_iter()
        .max()
        .unwrap_or(0)
        .min(all_layers);
    let vl = if own { run_layers } else { all_layers };
    Ok(match w.kind {
        WorkloadKind::Sft => {
            let b = w.rows(name)?;
            let seq = w.need(name, "text_tokens", w.text_tokens)? + image_tokens;
            let completion = w.completion_tokens(name)?;
            let head = if own { b * completion } else { b * (seq - 1) };
            let f = forward_flops(c, b, seq, b, head, vl);
            (
                f.vision + 3.0 * (f.projector + f.lm) + 3.5 * f.lm_attn,
                "vision + 3 * (projector + lm) + 3.5 * lm_attn   [tower frozen: forward only]",
            )
        }
        WorkloadKind::Dpo => {
            let pairs = w.rows(name)?;
            let n = 2 * pairs;
            let seq = w.need(name, "text_tokens", w.text_tokens)? + image_tokens;
            let r = w.lora.as_ref().map_or(0, |l| l.r);
            let completion = w.completion_tokens(name)?;
            let head = if own { n * completion } else { n * (seq - 1) };
            let images = if own { pairs } else { n };
            // Own: one decoder row per pair, the image and prompt once, then both answers
            // (shared-prefix packing; the LM head projects the completion positions of both).
            let shared = image_tokens + w.prompt_text_tokens;
            let (rows, row_len) = if own {
                (pairs, shared + 2 * (seq - shared))
            } else {
                (n, seq)
            };
            let f = forward_flops(c, rows, row_len, images, head, vl);
            let lora = lora_flops(c, rows * row_len, r);
            let policy = f.vision + f.projector + 2.0 * f.lm + 3.5 * f.lm_attn + 3.0 * lora;
            if own {
                // The reference takes the policy's image features.
                (
                    policy + f.lm + f.lm_attn,
                    "policy: vision + projector + 2 * lm + 3.5 * lm_attn + 3 * lora; reference: \
                     lm + lm_attn   [images encoded once per pair, for both]",
                )
            } else {
                (
                    policy + f.vision + f.projector + f.lm + f.lm_attn,
                    "policy: vision + projector + 2 * lm + 3.5 * lm_attn + 3 * lora; reference: \
                     vision + projector + lm + lm_attn   [over 2 * batch_pairs sequences and \
                     images]",
                )
            }
        }
        WorkloadKind::Score => {
            let b = w.rows(name)?;
            let seq = w.need(name, "text_tokens", w.text_tokens)? + image_tokens;
            (
                forward_flops(c, b, seq, b, b * seq, vl).total(),
                "vision + projector + lm + lm_attn",
            )
        }
        WorkloadKind::Generate => {
            let b = w.rows(name)?;
            let p = 1 + image_tokens + w.prompt_text_tokens - 1;
            let head = if own { b * p } else { b };
            let mut total = forward_flops(c, b, p, b, head, vl).total();
            let q = (c.text.num_heads * c.text.head_dim) as f64;
            let one_token = forward_flops(c, b, 1, 0, b, vl).lm;
            for k in 1..w.need(name, "new_tokens", w.new_tokens)? {
                total += one_token + (b * c.text.num_layers) as f64 * 4.0 * (p + k) as f64 * q;
            }
            (
                total,
                "prefill forward (LM head on the last position) + (new_tokens - 1) one-token \
                 forwards over the KV cache (attention 4 * context * q_dim per layer)",
            )
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Memory

fn status_kib(field: &str) -> Option<f64> {
    let text = fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
}

/// Current resident set size in MiB (`VmRSS`), `None` where `/proc` is unavailable.
pub fn rss_mb() -> Option<f64> {
    status_kib("VmRSS:").map(|k| k / 1024.0)
}

/// Peak resident set size of this process in MiB: `VmHWM`, or `VmRSS` when that is higher (the
/// kernel updates the high-water mark lazily, so right after a thread's allocations the current
/// size can read above it).
pub fn peak_rss_mb() -> Option<f64> {
    let peak = status_kib("VmHWM:")?;
    Some(peak.max(status_kib("VmRSS:").unwrap_or(0.0)) / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// Running a workload

/// How many steps to run.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub steps: usize,
    pub warmup: usize,
    /// The compute threads of the backend (recorded; set through `RAYON_NUM_THREADS`).
    pub threads: usize,
    /// The precision, as `model.dtype` sets it for training (frozen weights and activations in
    /// it, trained weights f32) and `--dtype` for scoring and generation (all weights in it).
    pub dtype: FloatDType,
}

/// The name the result JSON gives a dtype (PyTorch's spelling, as `reference.py` writes it).
pub fn dtype_name(dtype: FloatDType) -> &'static str {
    match dtype {
        FloatDType::F64 => "float64",
        FloatDType::F32 | FloatDType::Flex32 => "float32",
        FloatDType::F16 => "float16",
        FloatDType::BF16 => "bfloat16",
    }
}

/// The model of a scoring or generation workload in `dtype` (every weight in it).
fn in_precision(
    model: Llava,
    config: &LlavaConfig,
    dtype: FloatDType,
    device: &Device,
) -> Result<Llava> {
    let any = AnyModel::Llava(Box::new(model), Box::new(config.clone()));
    match any
        .into_precision(dtype, device)
        .map_err(|e| input_error(format!("--dtype {}: {e}", dtype_name(dtype))))?
    {
        AnyModel::Llava(model, _) => Ok(*model),
        AnyModel::Text(..) => Err(input_error("the benchmark needs a LLaVA model")),
    }
}

/// What one step reports.
#[derive(Debug, Default)]
struct StepOutput {
    /// Loss (training) or mean summed log-prob (score).
    value: Option<f64>,
    /// Named phases in seconds.
    phases: Vec<(&'static str, f64)>,
    /// Greedy ids of row 0 (generate).
    first_ids: Option<Vec<u32>>,
}

type StepFn<'a> = Box<dyn FnMut() -> Result<StepOutput> + 'a>;

fn sync(device: &Device) -> Result<()> {
    device
        .sync()
        .map_err(|e| input_error(format!("device sync failed: {e:?}")))
}

/// Seconds since `start`, after the device has finished the queued work.
fn lap(device: &Device, start: &mut Instant) -> Result<f64> {
    sync(device)?;
    let now = Instant::now();
    let seconds = (now - *start).as_secs_f64();
    *start = now;
    Ok(seconds)
}

fn load_llava(weights_dir: &Path, device: &Device) -> Result<(Llava, LlavaConfig)> {
    weights_file(weights_dir)?;
    match AnyModel::load(weights_dir, device)? {
        AnyModel::Llava(model, config) => Ok((*model, *config)),
        AnyModel::Text(..) => Err(input_error(format!(
            "{}: the benchmark needs a LLaVA model",
            weights_dir.display()
        ))),
    }
}

fn experiment_config(w: &Workload, seed: u64) -> ExperimentConfig {
    let mut config = ExperimentConfig::default();
    if let Some(o) = &w.optimizer {
        config.optim.lr = o.lr;
        config.optim.betas = o.betas;
        config.optim.eps = o.eps;
        config.optim.weight_decay = o.weight_decay;
    }
    config.optim.max_grad_norm = 0.0;
    config.train.seed = seed;
    config.train.freeze_vision = Some(true);
    if let Some(l) = &w.lora {
        config.lora.enabled = true;
        config.lora.rank = l.r;
        config.lora.alpha = l.alpha;
        config.lora.dropout = l.dropout;
        config.lora.target_modules = TargetModules::Names(l.target_modules.clone());
        config.lora.apply_to_lm = true;
        config.lora.apply_to_vision = false;
        config.train.freeze_projector = Some(true);
    }
    config
}

/// Runs workload `name` of `spec` in this process: loads the weights from `weights_dir` onto
/// `device`, builds the inputs, runs `max(warmup, 1)` untimed and `steps` timed steps, and returns
/// its entry of the result JSON (without `fraction_of_peak` and `wall_s`, which the caller adds).
pub fn run_workload(
    spec: &BenchSpec,
    name: &str,
    weights_dir: &Path,
    options: &RunOptions,
    device: &Device,
) -> Result<Map<String, Value>> {
    let w = spec.workload(name)?.clone();
    let rss_start = rss_mb();
    let mut notes: Vec<String> = Vec::new();
    let mut extra = Map::new();
    let tower_calls_before = vision_tower_calls();
    // `config` is needed for FLOPs and inputs whatever the kind.
    let (config, tokens, mut step): (LlavaConfig, usize, StepFn) = match w.kind {
        WorkloadKind::Sft => {
            let device = device.clone().autodiff();
            let (model, config) = load_llava(weights_dir, &device)?;
            let inputs = Inputs::new(spec, &config)?;
            let b = w.rows(name)?;
            let completion = w.completion_tokens(name)?;
            let ids: Vec<Vec<u32>> = (0..b)
                .map(|i| {
                    inputs.sequence(i, w.prompt_text_tokens, completion, spec.salts.completion)
                })
                .collect();
            let mask = vec![vec![true; ids[0].len()]; b];
            let targets = completion_targets(&ids, inputs.prompt_len(w.prompt_text_tokens));
            let normalizer = targets.iter().map(Vec::len).sum::<usize>() as f64;
            let trained = |path: &str| Llava::component_of(path) != Component::Vision;
            let model = prepare_params(model, &trained);
            let setting = format!("--dtype {}", dtype_name(options.dtype));
            let model = apply_precision(model, options.dtype, &device, &trained, &setting)?;
            let table = param_table(&model);
            extra.insert(
                "trainable_params".into(),
                json!(table
                    .iter()
                    .filter(|(p, _)| trained(p))
                    .map(|(_, i)| i.numel)
                    .sum::<usize>()),
            );
            extra.insert("images_encoded_per_step".into(), json!(b));
            extra.insert(
                "parameters_by_dtype".into(),
                json!(parameters_by_dtype(&table)),
            );
            let experiment = experiment_config(&w, spec.seed);
            let mut optimizer = build_optimizer(&experiment)?;
            let lr = experiment.optim.lr;
            notes.push(
                "trainer path: TrainableModel::target_logits (the LM head at the completion \
                 positions), sft_loss (mean NLL of the completion tokens), backward, \
                 GradientsParams::from_grads, the trainer's AdamW (build_optimizer); no gradient \
                 clipping (as reference.py)"
                    .into(),
            );
            let tokens = b * ids[0].len();
            let shards: Vec<ShardRows> = shard_ranges(b, shard_count(&device, b))
                .into_iter()
                .map(|range| {
                    let rows: Vec<usize> = range.clone().collect();
                    ShardRows::new(range, &rows, &ids, &mask, &targets)
                })
                .collect();
            if shards.len() > 1 {
                notes.push(format!(
                    "the batch's rows in {} shards, one per compute thread, each forward and \
                     backward on its own thread (resonance_train::shards)",
                    shards.len()
                ));
            }
            extra.insert("shards".into(), json!(shards.len()));
            let mut model = Some(model);
            let step: StepFn = Box::new(move || {
                let m = model
                    .take()
                    .ok_or_else(|| input_error("the model was lost in a failed step"))?;
                let mut t = Instant::now();
                let (losses, grads) =
                    sharded_gradients(&m, &device, shards.iter().collect(), |replica, shard| {
                        let pixels = inputs.pixels_of(shard.pixels.clone(), &device);
                        let logits = replica.target_logits(
                            shard.inputs(Images::Pixels(pixels)),
                            1,
                            &shard.positions,
                            &device,
                        )?;
                        let loss = sft_loss(logits, &shard.targets, normalizer);
                        let value = loss.clone().into_scalar::<f64>();
                        Ok((loss, value))
                    })?;
                let value: f64 = losses.iter().sum();
                let forward_backward = lap(&device, &mut t)?;
                model = Some(optimizer.step(lr, m, grads));
                let optim = lap(&device, &mut t)?;
                Ok(StepOutput {
                    value: Some(value),
                    phases: vec![("forward_backward", forward_backward), ("optimizer", optim)],
                    first_ids: None,
                })
            });
            (config, tokens, step)
        }
        WorkloadKind::Dpo => {
            let device = device.clone().autodiff();
            let plain = device.clone().inner();
            let (mut model, config) = load_llava(weights_dir, &device)?;
            let inputs = Inputs::new(spec, &config)?;
            let pairs = w.rows(name)?;
            let completion = w.completion_tokens(name)?;
            let seq =
                |i: usize, salt: u64| inputs.sequence(i, w.prompt_text_tokens, completion, salt);
            let ids: Vec<Vec<u32>> = (0..pairs)
                .map(|i| seq(i, spec.salts.completion))
                .chain((0..pairs).map(|i| seq(i, spec.salts.rejected)))
                .collect();
            let mask = vec![vec![true; ids[0].len()]; ids.len()];
            let targets = completion_targets(&ids, inputs.prompt_len(w.prompt_text_tokens));
            let experiment = experiment_config(&w, spec.seed);
            device.seed(spec.seed);
            let adapted = attach_lora(&mut model, &experiment, &device)?;
            let model = prepare_params(model, &is_lora_path);
            let setting = format!("--dtype {}", dtype_name(options.dtype));
            let model = apply_precision(model, options.dtype, &device, &is_lora_path, &setting)?;
            let table = param_table(&model);
            extra.insert(
                "trainable_params".into(),
                json!(table
                    .iter()
                    .filter(|(p, _)| is_lora_path(p))
                    .map(|(_, i)| i.numel)
                    .sum::<usize>()),
            );
            extra.insert("lora_layers".into(), json!(adapted.len()));
            extra.insert(
                "parameters_by_dtype".into(),
                json!(parameters_by_dtype(&table)),
            );
            extra.insert("images_encoded_per_step".into(), json!(pairs));
            let loss_type: DpoLossType = serde_json::from_value(Value::String(
                w.loss_type.clone().unwrap_or_else(|| "sigmoid".into()),
            ))
            .map_err(|e| input_error(format!("workload `{name}`: loss_type: {e}")))?;
            let loss_configs = vec![(
                1.0,
                DpoLossConfig {
                    loss_type,
                    beta: w.beta.unwrap_or(0.1),
                    ..DpoLossConfig::default()
                },
            )];
            let mut optimizer = build_optimizer(&experiment)?;
            let lr = experiment.optim.lr;
            let tokens = ids.len() * ids[0].len();
            let packed = SharedPrefixPacking::plan(&ids, &mask, 2, Some(config.image_token_id))
                .map_or(tokens, |p| p.packed_positions());
            extra.insert("decoder_positions_per_forward".into(), json!(packed));
            notes.push(format!(
                "trainer path: each of the {pairs} images encoded once per step, its features \
                 serving the chosen and rejected rows of the policy and of the reference; \
                 target_logits over the pairs (the tokens a pair's rows share run once: {packed} \
                 decoder positions per forward for {tokens} sequence positions) for the policy, \
                 and again for the reference (adapters disabled, no autodiff), the LM head at the \
                 completion positions; sequence_logps, dpo::pair_loss, backward, the trainer's \
                 AdamW"
            ));
            // A shard's rows: its pairs' chosen rows, then their rejected rows.
            let shards: Vec<ShardRows> = shard_ranges(pairs, shard_count(&device, pairs))
                .into_iter()
                .map(|range| {
                    let rows: Vec<usize> = range
                        .clone()
                        .chain(range.clone().map(|i| pairs + i))
                        .collect();
                    ShardRows::new(range, &rows, &ids, &mask, &targets)
                })
                .collect();
            if shards.len() > 1 {
                notes.push(format!(
                    "the pairs in {} shards, one per compute thread, each forward (policy and \
                     reference) and backward on its own thread (resonance_train::shards)",
                    shards.len()
                ));
            }
            extra.insert("shards".into(), json!(shards.len()));
            let mut model = Some(model);
            let step: StepFn = Box::new(move || {
                let m = model
                    .take()
                    .ok_or_else(|| input_error("the model was lost in a failed step"))?;
                let mut t = Instant::now();
                let (losses, grads) =
                    sharded_gradients(&m, &device, shards.iter().collect(), |replica, shard| {
                        let pixels = inputs.pixels_of(shard.pixels.clone(), &device);
                        // The tower and projector are frozen and have no adapters: their
                        // features serve the policy and the reference (the trainer's path).
                        let features = replica.encode_images(pixels)?;
                        let policy_logits = replica.target_logits(
                            shard.inputs(Images::Encoded(features.clone())),
                            2,
                            &shard.positions,
                            &device,
                        )?;
                        let policy = sequence_logps(policy_logits, &shard.targets);
                        let reference = {
                            let _off = AdaptersDisabled::new();
                            let frozen = replica.valid();
                            let logits = frozen.target_logits(
                                shard.inputs(Images::Encoded(features.inner())),
                                2,
                                &shard.positions,
                                &plain,
                            )?;
                            let values = sequence_logps(logits, &shard.targets);
                            Tensor::<1>::from_data(values.into_data(), &device)
                        };
                        let (out, _) =
                            pair_loss(policy, reference, None, &shard.lengths, &loss_configs)?;
                        let loss = out.losses.sum().div_scalar(pairs as f64);
                        let value = loss.clone().into_scalar::<f64>();
                        Ok((loss, value))
                    })?;
                let value: f64 = losses.iter().sum();
                let forward_backward = lap(&device, &mut t)?;
                model = Some(optimizer.step(lr, m, grads));
                let optim = lap(&device, &mut t)?;
                Ok(StepOutput {
                    value: Some(value),
                    phases: vec![("forward_backward", forward_backward), ("optimizer", optim)],
                    first_ids: None,
                })
            });
            (config, tokens, step)
        }
        WorkloadKind::Generate => {
            let (model, config) = load_llava(weights_dir, device)?;
            let model = in_precision(model, &config, options.dtype, device)?;
            let inputs = Inputs::new(spec, &config)?;
            let b = w.rows(name)?;
            let n = w.need(name, "new_tokens", w.new_tokens)?;
            let prompts: Vec<Vec<u32>> = (0..b)
                .map(|i| inputs.sequence(i, w.prompt_text_tokens, 0, spec.salts.completion))
                .collect();
            extra.insert("prompt_tokens".into(), json!(prompts[0].len()));
            extra.insert("new_tokens_per_step".into(), json!(b * n));
            let model = AnyModel::Llava(Box::new(model), Box::new(config.clone()));
            let device = device.clone();
            let step: StepFn = if b == 1 {
                notes.push(
                    "resonance_models::generate::generate (the `resonance generate` path): one \
                     sequence, greedy, KV cache, EOS ignored"
                        .into(),
                );
                let sampling = SamplingConfig {
                    max_new_tokens: n,
                    ..SamplingConfig::default()
                };
                Box::new(move || {
                    let pixels = inputs.pixels(1, &device);
                    let out = generate(
                        &model,
                        &prompts[0],
                        Some(pixels),
                        &[],
                        &sampling,
                        &device,
                        |_| {},
                    )?;
                    sync(&device)?;
                    Ok(StepOutput {
                        first_ids: Some(out),
                        ..StepOutput::default()
                    })
                })
            } else {
                notes.push(format!(
                    "resonance_models::generate::generate_greedy_batch: the {b} rows decoded \
                     together ([{b}, 1] per step) with one KV cache, EOS ignored"
                ));
                Box::new(move || {
                    let pixels = inputs.pixels(b, &device);
                    let out =
                        generate_greedy_batch(&model, &prompts, Some(pixels), &[], n, &device)?;
                    sync(&device)?;
                    Ok(StepOutput {
                        first_ids: out.into_iter().next(),
                        ..StepOutput::default()
                    })
                })
            };
            (config, b * n, step)
        }
        WorkloadKind::Score => {
            let (model, config) = load_llava(weights_dir, device)?;
            let model = in_precision(model, &config, options.dtype, device)?;
            let inputs = Inputs::new(spec, &config)?;
            let b = w.rows(name)?;
            let completion = w.completion_tokens(name)?;
            let ids: Vec<Vec<u32>> = (0..b)
                .map(|i| {
                    inputs.sequence(i, w.prompt_text_tokens, completion, spec.salts.completion)
                })
                .collect();
            let mask = vec![vec![true; ids[0].len()]; b];
            let targets = completion_targets(&ids, inputs.prompt_len(w.prompt_text_tokens));
            let tokens = b * ids[0].len();
            let model = AnyModel::Llava(Box::new(model), Box::new(config.clone()));
            let device = device.clone();
            notes.push(
                "the `resonance score` path: AnyModel::forward (full logits), token_logprobs \
                 (log_softmax + gather), summed on the host"
                    .into(),
            );
            let step: StepFn = Box::new(move || {
                let logits = model.forward(
                    ModelInputs {
                        input_ids: &ids,
                        attention_mask: &mask,
                        images: Some(Images::Pixels(inputs.pixels(b, &device))),
                    },
                    None,
                    &device,
                )?;
                let logps = token_logprobs(logits, &targets);
                let mean = logps
                    .iter()
                    .map(|row| row.iter().map(|&v| v as f64).sum::<f64>())
                    .sum::<f64>()
                    / b as f64;
                Ok(StepOutput {
                    value: Some(mean),
                    ..StepOutput::default()
                })
            });
            (config, tokens, step)
        }
    };
    let rss_setup = rss_mb();

    let mut outputs = Vec::new();
    for _ in 0..options.warmup.max(1) {
        outputs.push(step()?);
    }
    let tower_calls_warmup = vision_tower_calls();
    let mut times = Vec::new();
    let mut phases: Vec<(&'static str, Vec<f64>)> = Vec::new();
    for _ in 0..options.steps {
        let start = Instant::now();
        let out = step()?;
        times.push(start.elapsed().as_secs_f64());
        for (k, (phase, seconds)) in out.phases.iter().enumerate() {
            match phases.get_mut(k) {
                Some(slot) => slot.1.push(*seconds),
                None => phases.push((phase, vec![*seconds])),
            }
        }
        outputs.push(out);
    }
    drop(step);
    if times.is_empty() {
        return Err(input_error("--steps must be ≥ 1"));
    }
    let med = median(&times);
    let image_tokens = (config.vision.image_size / config.vision.patch_size).pow(2);
    let (flops_ref, formula) = analytic_flops(&config, &w, name, image_tokens, false)?;
    let (flops_own, _) = analytic_flops(&config, &w, name, image_tokens, true)?;

    let mut res = Map::new();
    res.insert("kind".into(), json!(w.kind.as_str()));
    res.insert("ok".into(), json!(true));
    res.insert("times_s".into(), json!(times));
    res.insert("median_s".into(), json!(med));
    res.insert(
        "min_s".into(),
        json!(times.iter().cloned().fold(f64::INFINITY, f64::min)),
    );
    res.insert("tokens_per_step".into(), json!(tokens));
    res.insert("tokens_per_s".into(), json!(tokens as f64 / med));
    res.insert("flops_per_step".into(), json!(flops_own.floor() as u64));
    res.insert(
        "flops_source".into(),
        json!("analytic, this implementation's own work (tower layers that run, images encoded as here, LM head only where the step reads logits)"),
    );
    res.insert("gflops_per_s".into(), json!(flops_own / med / 1e9));
    res.insert(
        "flops_analytic_per_step".into(),
        json!(flops_ref.floor() as u64),
    );
    res.insert("flops_analytic_formula".into(), json!(formula));
    res.insert(
        "gflops_per_s_effective".into(),
        json!(flops_ref / med / 1e9),
    );
    // The sizes read on the way count too: the high-water mark may not have caught up with them.
    let peak = [peak_rss_mb(), rss_start, rss_setup]
        .into_iter()
        .flatten()
        .reduce(f64::max);
    if let Some(v) = peak {
        res.insert("peak_rss_mb".into(), json!(v));
    }
    if let Some(v) = rss_start {
        res.insert("rss_before_load_mb".into(), json!(v));
    }
    if let Some(v) = rss_setup {
        res.insert("rss_after_setup_mb".into(), json!(v));
    }
    res.insert("threads".into(), json!(options.threads));
    if !phases.is_empty() {
        let mut p = Map::new();
        for (phase, values) in &phases {
            p.insert(phase.to_string(), json!(median(values)));
        }
        res.insert("phases_median_s".into(), Value::Object(p));
    }
    let warmup_steps = options.warmup.max(1);
    let tower_calls = (tower_calls_warmup - tower_calls_before) / warmup_steps;
    match w.kind {
        WorkloadKind::Sft | WorkloadKind::Dpo => {
            res.insert("loss_first".into(), json!(outputs[0].value));
            res.insert(
                "loss_last".into(),
                json!(outputs.last().and_then(|o| o.value)),
            );
            res.insert("vision_tower_calls_per_step".into(), json!(tower_calls));
        }
        WorkloadKind::Score => {
            res.insert("completion_logp_sum_mean".into(), json!(outputs[0].value));
        }
        WorkloadKind::Generate => {
            let ids: Vec<u32> = outputs[0]
                .first_ids
                .clone()
                .unwrap_or_default()
                .into_iter()
                .take(16)
                .collect();
            res.insert("first_new_ids_sample0".into(), json!(ids));
            let same = outputs.iter().all(|o| o.first_ids == outputs[0].first_ids);
            if !same {
                notes.push("the greedy ids differed between steps".into());
            }
        }
    }
    res.extend(extra);
    if !notes.is_empty() {
        res.insert("notes".into(), json!(notes));
    }
    Ok(res)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        // statistics.median: the mean of the two middle values
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------------
// The parent's parts of the report

/// Median GFLOP/s of an `n × n` matmul in `dtype` on `device` (`repeats` runs after `warmup`).
pub fn matmul_peak(
    device: &Device,
    n: usize,
    repeats: usize,
    warmup: usize,
    dtype: FloatDType,
) -> Result<Value> {
    let random = || Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let (a, b) = (random(), random());
    sync(device)?;
    let mut times = Vec::new();
    for k in 0..warmup + repeats {
        let start = Instant::now();
        // The product the model's linear layers run (on the CPU backend the system's OpenBLAS
        // when installed, else `gemm`), not flex's own matmul.
        let c = flat_linear(a.clone(), b.clone(), None);
        sync(device)?;
        let dt = start.elapsed().as_secs_f64();
        drop(c);
        if k >= warmup {
            times.push(dt);
        }
    }
    let med = median(&times);
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let flops = 2.0 * (n as f64).powi(3);
    Ok(json!({
        "n": n, "dtype": dtype_name(dtype), "op": "flat_linear (the linear layers' product)",
        "product_library": product_library(device), "repeats": repeats,
        "median_s": med, "gflops": flops / med / 1e9, "best_gflops": flops / best / 1e9,
    }))
}

/// What runs the linear layers' f32 products on `device`.
pub fn product_library(device: &Device) -> String {
    if device.clone().inner() == Device::flex() {
        resonance_models::nn::blas::product_library()
    } else {
        "the backend's matmul".to_string()
    }
}

/// `model.params` from `bench_weights.json` next to the weights, when there.
pub fn weights_info(weights_dir: &Path) -> Option<Value> {
    let text = fs::read_to_string(weights_dir.join("bench_weights.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The first `model name` of `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// `/proc/loadavg`'s three load averages.
pub fn load_avg() -> Vec<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| {
            t.split_whitespace()
                .take(3)
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The build profile of this binary, as recorded in the results.
pub fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "dev (workspace opt-level 1, dependencies opt-level 2, debug assertions on)"
    } else {
        "release"
    }
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// The result table of one implementation's JSON.
pub fn print_table(result: &Value) -> String {
    let mut out = String::new();
    let peak = result
        .pointer("/matmul_peak/gflops")
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN);
    let _ = writeln!(
        out,
        "{} ({}), {} threads, matmul peak {peak:.1} GFLOP/s",
        result["implementation"].as_str().unwrap_or("?"),
        result["backend"].as_str().unwrap_or("?"),
        result.pointer("/machine/threads").unwrap_or(&Value::Null),
    );
    let header = format!(
        "{:<12} {:>9} {:>10} {:>11} {:>8} {:>7} {:>12}  extra",
        "workload", "median s", "tokens/s", "GFLOP/step", "GFLOP/s", "% peak", "peak RSS MB"
    );
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "{}", "-".repeat(header.len()));
    if let Some(workloads) = result["workloads"].as_object() {
        for (name, r) in workloads {
            if r["ok"] != json!(true) {
                let error = r["error"].as_str().unwrap_or("");
                let tail: String = error
                    .chars()
                    .rev()
                    .take(200)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                let _ = writeln!(out, "{name:<12} FAILED: {}", tail.replace('\n', " | "));
                continue;
            }
            let extra = match r["kind"].as_str() {
                Some("sft" | "dpo") => {
                    format!("loss {:.6}", num(r, "loss_first").unwrap_or(f64::NAN))
                }
                Some("score") => format!(
                    "logp sum {:.4}",
                    num(r, "completion_logp_sum_mean").unwrap_or(f64::NAN)
                ),
                Some("generate") => format!("ids {}", r["first_new_ids_sample0"]),
                _ => String::new(),
            };
            let gflops = num(r, "gflops_per_s").unwrap_or(f64::NAN);
            let _ = writeln!(
                out,
                "{name:<12} {:>9.3} {:>10.1} {:>11.1} {:>8.1} {:>6.1}% {:>12.0}  {extra}",
                num(r, "median_s").unwrap_or(f64::NAN),
                num(r, "tokens_per_s").unwrap_or(f64::NAN),
                num(r, "flops_per_step").unwrap_or(f64::NAN) / 1e9,
                gflops,
                100.0 * gflops / peak,
                num(r, "peak_rss_mb").unwrap_or(f64::NAN),
            );
        }
    }
    out
}

fn rel_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

/// Relative tolerance of the step-0 agreement checks.
pub const AGREEMENT_RTOL: f64 = 1e-3;

/// The comparison of a Resonance result with a PyTorch one, paired by workload name: ratios
/// Resonance / PyTorch of the median time, tokens/s and peak RSS, and whether the step-0
/// numbers agree (losses and the score log-prob sum within [`AGREEMENT_RTOL`] relative, the
/// greedy ids equal). Returns the table and whether every check passed.
pub fn compare_table(resonance: &Value, pytorch: &Value) -> (String, bool) {
    let mut out = String::new();
    let mut all_ok = true;
    for (label, pointer) in [
        ("weights sha256", "/model/weights_sha256"),
        ("workloads sha256", "/settings/workloads_sha256"),
    ] {
        let (a, b) = (resonance.pointer(pointer), pytorch.pointer(pointer));
        if a != b {
            all_ok = false;
            let _ = writeln!(
                out,
                "WARNING: {label} differs: resonance {a:?}, pytorch {b:?}"
            );
        }
    }
    let dtypes = (
        resonance.pointer("/model/dtype").and_then(Value::as_str),
        pytorch.pointer("/model/dtype").and_then(Value::as_str),
    );
    // Different precisions give different step-0 numbers by design: shown, not checked.
    let checked = dtypes.0 == dtypes.1;
    if !checked {
        let _ = writeln!(
            out,
            "dtype: resonance {}, pytorch {}: step-0 numbers shown, not checked",
            dtypes.0.unwrap_or("?"),
            dtypes.1.unwrap_or("?")
        );
    }
    let _ = writeln!(
        out,
        "matmul peak GFLOP/s: resonance {:.1} (burn, {}), pytorch {:.1}; threads {} / {}",
        resonance
            .pointer("/matmul_peak/gflops")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN),
        resonance["backend"].as_str().unwrap_or("?"),
        pytorch
            .pointer("/matmul_peak/gflops")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN),
        resonance
            .pointer("/machine/threads")
            .unwrap_or(&Value::Null),
        pytorch.pointer("/machine/threads").unwrap_or(&Value::Null),
    );
    let header = format!(
        "{:<12} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7} {:>8} {:>8} {:>6}  {}",
        "workload",
        "R med s",
        "P med s",
        "time×",
        "R tok/s",
        "P tok/s",
        "tok/s×",
        "R RSS MB",
        "P RSS MB",
        "RSS×",
        "step-0 check"
    );
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "{}", "-".repeat(header.len()));
    let empty = Map::new();
    let r_all = resonance["workloads"].as_object().unwrap_or(&empty);
    let p_all = pytorch["workloads"].as_object().unwrap_or(&empty);
    let names: Vec<&String> = {
        let mut seen = BTreeSet::new();
        r_all
            .keys()
            .chain(p_all.keys())
            .filter(|k| seen.insert(k.as_str()))
            .collect()
    };
    for name in names {
        let (Some(r), Some(p)) = (r_all.get(name.as_str()), p_all.get(name.as_str())) else {
            let _ = writeln!(out, "{name:<12} only on one side");
            continue;
        };
        if r["ok"] != json!(true) || p["ok"] != json!(true) {
            all_ok = false;
            let _ = writeln!(
                out,
                "{name:<12} failed: resonance ok={}, pytorch ok={}",
                r["ok"], p["ok"]
            );
            continue;
        }
        let ratio = |key: &str| num(r, key).unwrap_or(f64::NAN) / num(p, key).unwrap_or(f64::NAN);
        let (check, ok) = match r["kind"].as_str() {
            Some("sft" | "dpo") => {
                let (a, b) = (
                    num(r, "loss_first").unwrap_or(f64::NAN),
                    num(p, "loss_first").unwrap_or(f64::NAN),
                );
                let d = rel_diff(a, b);
                (
                    format!("loss {a:.6} vs {b:.6} (rel {d:.1e})"),
                    d <= AGREEMENT_RTOL,
                )
            }
            Some("score") => {
                let (a, b) = (
                    num(r, "completion_logp_sum_mean").unwrap_or(f64::NAN),
                    num(p, "completion_logp_sum_mean").unwrap_or(f64::NAN),
                );
                let d = rel_diff(a, b);
                (
                    format!("logp {a:.4} vs {b:.4} (rel {d:.1e})"),
                    d <= AGREEMENT_RTOL,
                )
            }
            Some("generate") => {
                let same = r["first_new_ids_sample0"] == p["first_new_ids_sample0"];
                (
                    if same {
                        "greedy ids equal".to_string()
                    } else {
                        format!(
                            "ids differ: {} vs {}",
                            r["first_new_ids_sample0"], p["first_new_ids_sample0"]
                        )
                    },
                    same,
                )
            }
            _ => (String::new(), true),
        };
        let (ok, verdict) = match (checked, ok) {
            (false, _) => (true, "shown"),
            (true, true) => (true, "OK"),
            (true, false) => (false, "MISMATCH"),
        };
        all_ok &= ok;
        let _ = writeln!(
            out,
            "{name:<12} {:>9.3} {:>9.3} {:>7.2} {:>9.1} {:>9.1} {:>7.2} {:>8.0} {:>8.0} {:>6.2}  {} {check}",
            num(r, "median_s").unwrap_or(f64::NAN),
            num(p, "median_s").unwrap_or(f64::NAN),
            ratio("median_s"),
            num(r, "tokens_per_s").unwrap_or(f64::NAN),
            num(p, "tokens_per_s").unwrap_or(f64::NAN),
            ratio("tokens_per_s"),
            num(r, "peak_rss_mb").unwrap_or(f64::NAN),
            num(p, "peak_rss_mb").unwrap_or(f64::NAN),
            ratio("peak_rss_mb"),
            verdict,
        );
    }
    let _ = writeln!(
        out,
        "time× = Resonance / PyTorch median step time (< 1: Resonance faster); tok/s× likewise \
         for throughput (> 1: Resonance faster); step-0 checks at {AGREEMENT_RTOL:.0e} relative"
    );
    (out, all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_matches_python_statistics() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn analytic_flops_equal_reference_py_on_the_bench_config() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let spec = BenchSpec::load(&root.join("bench/workloads.json")).unwrap();
        let dir = root.join("bench/model");
        let value = resonance_models::load::read_config(&dir).unwrap();
        let config = LlavaConfig::from_value(&value, &dir.join("config.json")).unwrap();
        // bench/reference.py's analytic_flops on the same config and workloads.
        let expected = [
            ("sft", 772_639_215_616u64),
            ("dpo", 1_722_974_388_224),
            ("generate_b1", 45_344_367_616),
            ("generate_b8", 362_754_940_928),
            ("score", 268_305_469_440),
        ];
        for (name, want) in expected {
            let w = spec.workload(name).unwrap();
            let (got, _) = analytic_flops(&config, w, name, 256, false).unwrap();
            assert!(
                (got - want as f64).abs() <= 1.0,
                "{name}: {got} vs reference.py {want}"
            );
        }
    }

    #[test]
    fn compare_flags_a_loss_mismatch() {
        let side = |loss: f64| {
            json!({"implementation": "x", "workloads": {"sft": {
                "kind": "sft", "ok": true, "median_s": 2.0, "tokens_per_s": 10.0,
                "peak_rss_mb": 100.0, "loss_first": loss}}})
        };
        let (table, ok) = compare_table(&side(6.31), &side(6.3101));
        assert!(ok, "{table}");
        let (table, ok) = compare_table(&side(6.31), &side(6.5));
        assert!(!ok && table.contains("MISMATCH"), "{table}");
        // A bf16 run against PyTorch's f32: the loss is shown, and its difference accepted.
        let mut half = side(6.5);
        half["model"] = json!({"dtype": "bfloat16"});
        let mut full = side(6.31);
        full["model"] = json!({"dtype": "float32"});
        let (table, ok) = compare_table(&half, &full);
        assert!(
            ok && table.contains("shown") && table.contains("bfloat16"),
            "{table}"
        );
    }
}
