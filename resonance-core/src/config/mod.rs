//! The experiment configuration: one TOML file per experiment.
//!
//! Every section is a struct with `#[serde(deny_unknown_fields)]` and a default for every field,
//! so a config file only needs the values that differ from the defaults, and a misspelt key is an
//! error naming the key and its line. `docs/CONFIG.md` documents every field.
//!
//! ```text
//! ExperimentConfig::from_file(path)        parse + validate
//! ExperimentConfig::load(path, &overrides) parse + `--set key=value` overrides + validate
//! ExperimentConfig::parse_str(text, name)  parse only (unknown keys, types)
//! config.apply_override("optim.lr=1e-5")   one override, not validated: call validate() after
//! config.validate()                        value ranges and conflicting options
//! config.to_toml_string()                  the resolved config, for the run directory
//! ```
//!
//! # Which groups are trained
//!
//! The model has three parameter groups: the vision tower, the projector and the language model
//! (LM). Each is either frozen, fully fine-tuned, or frozen with LoRA adapters trained on it
//! ([`GroupTraining`]). LoRA (`lora.enabled`) applies to the LM when `lora.apply_to_lm` (default)
//! and to the vision tower when `lora.apply_to_vision`; never to the projector.
//!
//! `train.freeze_vision`, `train.freeze_projector` and `train.freeze_lm` are optional; when
//! absent they resolve to: vision frozen, projector trained, LM frozen if LoRA applies to it and
//! trained otherwise. A group with LoRA whose freeze flag is explicitly `false` is a **conflict**
//! (LoRA and a full fine-tune of the same weights) and fails validation: with LoRA the base
//! weights of that group are always frozen.

mod error;
mod toml_util;
mod validate;

use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

pub use error::{ConfigError, Problem};

use crate::data::{
    load_dataset, DataError, DataFormat, Dataset, LoadOptions, Mixing, MixtureSampler, OnError,
};
use toml_util::{display_path, parse_key_path, parse_value, set_in_tree, KeyIndex};

/// The name used in messages for configs parsed from memory.
pub const STRING_ORIGIN: &str = "<string>";

/// A whole experiment: one field per TOML section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExperimentConfig {
    /// `[model]`: which checkpoint to start from.
    pub model: ModelConfig,
    /// `[data]`: training datasets and how they are mixed.
    pub data: DataConfig,
    /// `[method]`: the training objective.
    pub method: MethodConfig,
    /// `[lora]`: LoRA / QLoRA adapters.
    pub lora: LoraConfig,
    /// `[optim]`: the optimizer.
    pub optim: OptimConfig,
    /// `[schedule]`: the learning-rate schedule.
    pub schedule: ScheduleConfig,
    /// `[train]`: loop length, batch, checkpoints, freezing.
    pub train: TrainConfig,
    /// `[backend]`: where to compute.
    pub backend: BackendConfig,
}

// ---------------------------------------------------------------------------------------------
// [model]

/// Floating-point type of the model weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

/// `[model]`: the checkpoint to fine-tune.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A local model directory (HF layout: `config.json`, safetensors, tokenizer) or a hub id
    /// such as `llava-hf/llava-1.5-7b-hf` (resolved from the local HF cache). Required.
    pub path: String,
    /// Compute / storage dtype: `"f32"`, `"bf16"` or `"f16"`. Default `"f32"`.
    pub dtype: Dtype,
}

// ---------------------------------------------------------------------------------------------
// [data]

/// One dataset file of `[data]` (`[[data.datasets]]`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// The data file: JSON array or JSON lines (detected by content), or Parquet (a file ending
    /// in `.parquet`, read row by row; its images may be embedded). Relative paths are relative
    /// to the working directory. Required.
    pub path: PathBuf,
    /// Record format: SFT `"llava"`, `"vlquery_json"`, `"flamingo"`, `"text"`; preference pairs
    /// `"plain_dpo"`, `"vlfeedback_paired"`, `"rlhfv"`, `"conversational_preference"`; unpaired
    /// preference (KTO) `"unpaired"`. Default `"llava"`.
    pub format: DataFormat,
    /// Directory relative image paths are joined to. Default: the directory of the data file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_root: Option<PathBuf>,
    /// Sampling weight under `mixing = "ratio"` (default 1). Must not be set under `"sqrt"` or
    /// `"size"`, whose weights come from the dataset sizes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// A name for reports and metrics. Default: the file stem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `vlfeedback_paired` only: keep the pairs of completions whose mean-rating gap is at least
    /// this (`>= 0`), or `-1` to keep, per record, the pairs with the largest gap. Default `-1`
    /// (VL-RLHF's default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score_margin: Option<f64>,
}

impl DatasetConfig {
    /// The loader options for this dataset under the bad-record policy `on_error`.
    pub fn load_options(&self, on_error: OnError) -> LoadOptions {
        LoadOptions {
            format: self.format,
            image_root: self.image_root.clone(),
            on_error,
            check_images: true,
            score_margin: self.score_margin.unwrap_or(crate::data::LARGEST_GAP),
            image_cache: None,
        }
    }

    /// The display name: `name`, or the file stem.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.path.display().to_string())
        })
    }
}

/// `[data]`: the training datasets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// How datasets are mixed: `"size"` (probability ∝ size: a shuffled concatenation),
    /// `"ratio"` (∝ each dataset's `weight`) or `"sqrt"` (∝ √size, InstructBLIP). Default
    /// `"size"`.
    pub mixing: Mixing,
    /// Samples per epoch. Default: the total number of records of all datasets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_samples: Option<usize>,
    /// Maximum sequence length in tokens (prompt + answer, image tokens included). Records whose
    /// image tokens would be cut are refused, never silently truncated. Default 2048.
    pub max_length: usize,
    /// Maximum prompt length in tokens; must be below `max_length`. Default: no separate limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prompt_length: Option<usize>,
    /// Bad records: `"fail"` stops with an error naming file, line and field; `"skip"` skips and
    /// counts them. Default `"fail"`.
    pub on_error: OnError,
    /// The dataset files, `[[data.datasets]]` tables. At least one is required.
    pub datasets: Vec<DatasetConfig>,
    /// Held-out datasets, `[[data.eval_datasets]]` tables (same keys; `weight` unused). Their
    /// token-averaged loss is logged as `eval_loss` every `train.eval_every` steps and at the
    /// end. Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub eval_datasets: Vec<DatasetConfig>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            mixing: Mixing::Size,
            num_samples: None,
            max_length: 2048,
            max_prompt_length: None,
            on_error: OnError::Fail,
            datasets: Vec::new(),
            eval_datasets: Vec::new(),
        }
    }
}

impl DataConfig {
    /// Loads every dataset (names from `name` or the file stem).
    pub fn load_datasets(&self) -> Result<Vec<Dataset>, DataError> {
        self.load_all(&self.datasets)
    }

    /// Loads every evaluation dataset, like [`DataConfig::load_datasets`].
    pub fn load_eval_datasets(&self) -> Result<Vec<Dataset>, DataError> {
        self.load_all(&self.eval_datasets)
    }

    fn load_all(&self, configs: &[DatasetConfig]) -> Result<Vec<Dataset>, DataError> {
        configs
            .iter()
            .map(|d| {
                let mut ds = load_dataset(&d.path, &d.load_options(self.on_error))?;
                ds.name = d.display_name();
                Ok(ds)
            })
            .collect()
    }

    /// The mixture sampler over `datasets` (as returned by [`DataConfig::load_datasets`]).
    pub fn sampler(&self, datasets: &[Dataset], seed: u64) -> Result<MixtureSampler, DataError> {
        let sizes: Vec<usize> = datasets.iter().map(Dataset::len).collect();
        if let Some(d) = datasets.iter().find(|d| d.is_empty()) {
            return Err(DataError::Mixture(format!(
                "dataset `{}` ({}) has no valid record",
                d.name,
                d.path.display()
            )));
        }
        let weights: Option<Vec<f64>> = match self.mixing {
            Mixing::Ratio => Some(
                self.datasets
                    .iter()
                    .map(|d| d.weight.unwrap_or(1.0))
                    .collect(),
            ),
            _ => None,
        };
        MixtureSampler::new(
            &sizes,
            self.mixing,
            weights.as_deref(),
            self.num_samples,
            seed,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// [method]

/// The training objective. Preference and RL methods (`dpo`, `kto`, `orpo`, `simpo`, `reward`)
/// will be added as variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Supervised fine-tuning: cross-entropy on the assistant tokens.
    #[default]
    Sft,
    /// Direct preference optimisation (and its variants, `method.loss_type`) on preference
    /// pairs (any paired format, see [`DataFormat::is_paired`]).
    Dpo,
    /// SimPO (reference-free, length-averaged, margin `simpo_gamma`) on preference pairs.
    Simpo,
    /// ORPO (odds ratio + NLL of the chosen answers, reference-free) on preference pairs.
    Orpo,
    /// KTO on `unpaired` records (desirable / undesirable completions).
    Kto,
    /// A reward model: the model with a scalar value head on the last token of each answer,
    /// trained with the Bradley-Terry loss on preference pairs (or on ranked lists, see
    /// `method.ranking_loss`).
    Reward,
}

impl Method {
    /// Whether the method trains on preference data.
    pub fn is_preference(self) -> bool {
        !matches!(self, Method::Sft)
    }

    /// Whether the method trains on records of `format`: SFT on any (it trains on the final
    /// assistant turns, the chosen answers of preference records), DPO / SimPO / ORPO on the
    /// paired formats (`plain_dpo`, `vlfeedback_paired`, `rlhfv`,
    /// `conversational_preference`), KTO on `unpaired`.
    pub fn accepts(self, format: DataFormat) -> bool {
        match self {
            Method::Sft => true,
            Method::Kto => format == DataFormat::Unpaired,
            Method::Dpo | Method::Simpo | Method::Orpo => format.is_paired(),
            Method::Reward => format.is_paired() || format == DataFormat::Ranked,
        }
    }

    /// The formats the method accepts, for messages.
    pub fn accepted_formats(self) -> Vec<DataFormat> {
        DataFormat::ALL
            .into_iter()
            .filter(|f| self.accepts(*f))
            .collect()
    }
}

/// How a reward model learns from a list of answers ranked best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RankingLoss {
    /// Bradley-Terry on every pair `(i, j)`, `i` ranked above `j`, averaged over the pairs
    /// (InstructGPT's K-choose-2 comparisons; a single pair is TRL's `RewardTrainer` loss).
    #[default]
    Pairwise,
    /// Plackett-Luce: `−Σᵢ log softmax(r_i, …, r_K)ᵢ`, per list (Vision-LLM-Alignment's
    /// reward trainer). Equal to Bradley-Terry for two answers.
    PlackettLuce,
}

/// DPO loss variants; serde names are TRL's `loss_type` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// `−logσ(βΔ)`; with `label_smoothing` > 0 the conservative cDPO form (see `dpo_loss`).
    #[default]
    Sigmoid,
    /// Robust DPO: `(−(1−ε)logσ(βΔ) + ε logσ(−βΔ)) / (1 − 2ε)`.
    Robust,
    /// `relu(1 − βΔ)` (SLiC).
    Hinge,
    /// IPO on length-averaged log-ratios: `(lc/|y_c| − lr/|y_r| − 1/(2β))²`.
    Ipo,
    /// EXO-pref (K = 2) with label smoothing ε.
    ExoPair,
    /// NCA: `−logσ(βlc) − ½logσ(−βlc) − ½logσ(−βlr)`.
    NcaPair,
    /// BCO on pairs: `−logσ(βlc) − logσ(−βlr)` (TRL 1.16: no running-mean shift).
    BcoPair,
    /// SPPO with hard probabilities: `(lc − 1/(2β))² + (lr + 1/(2β))²`.
    SppoHard,
    /// APO-zero: `1 − σ(βlc) + σ(βlr)`.
    ApoZero,
    /// APO-down: `σ(βlc) + 1 − σ(β(lc − lr))`.
    ApoDown,
    /// DiscoPOP: `(1−m)·(−logσ(βΔ)) + m·exp(−βΔ)`, `m = σ(βΔ/τ)`.
    Discopop,
    /// Sigmoid on length-averaged log-ratios: `−logσ(β(lc/|y_c| − lr/|y_r|))`.
    SigmoidNorm,
    /// Dense DPO as VL-RLHF's `ddpo` (not a TRL type): `sigmoid` (cDPO with `label_smoothing`)
    /// on log-probs summed over the tokens of the spans where the chosen and rejected answers
    /// differ (difflib diff of the two label rows), for policy and reference alike.
    Ddpo,
}

impl DpoLossType {
    /// Every variant, in declaration order.
    pub const ALL: [DpoLossType; 13] = [
        Self::Sigmoid,
        Self::Robust,
        Self::Hinge,
        Self::Ipo,
        Self::ExoPair,
        Self::NcaPair,
        Self::BcoPair,
        Self::SppoHard,
        Self::ApoZero,
        Self::ApoDown,
        Self::Discopop,
        Self::SigmoidNorm,
        Self::Ddpo,
    ];

    /// TRL's name of the loss type (equal to the serde name; `ddpo` is VL-RLHF's name).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sigmoid => "sigmoid",
            Self::Robust => "robust",
            Self::Hinge => "hinge",
            Self::Ipo => "ipo",
            Self::ExoPair => "exo_pair",
            Self::NcaPair => "nca_pair",
            Self::BcoPair => "bco_pair",
            Self::SppoHard => "sppo_hard",
            Self::ApoZero => "apo_zero",
            Self::ApoDown => "apo_down",
            Self::Discopop => "discopop",
            Self::SigmoidNorm => "sigmoid_norm",
            Self::Ddpo => "ddpo",
        }
    }

    /// Whether the loss divides by completion lengths (the `lengths` argument of `dpo_loss`).
    pub fn needs_lengths(self) -> bool {
        matches!(self, Self::Ipo | Self::SigmoidNorm)
    }
}

/// One DPO loss type or several (`"sigmoid"` or `["sigmoid", "bco_pair"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpoLossTypes(pub Vec<DpoLossType>);

impl DpoLossTypes {
    /// A single loss type.
    pub fn one(kind: DpoLossType) -> Self {
        DpoLossTypes(vec![kind])
    }
}

impl Serialize for DpoLossTypes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for DpoLossTypes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(DpoLossType),
            Many(Vec<DpoLossType>),
        }
        match OneOrMany::deserialize(d)
            .map_err(|_| de::Error::custom("expected a DPO loss type name or a list of them"))?
        {
            OneOrMany::One(kind) => Ok(DpoLossTypes(vec![kind])),
            OneOrMany::Many(kinds) => Ok(DpoLossTypes(kinds)),
        }
    }
}

/// `[method]`: what is optimised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodConfig {
    /// The method: `"sft"`, `"dpo"`, `"simpo"`, `"orpo"`, `"kto"` or `"reward"`. Default `"sft"`.
    pub name: Method,
    /// DPO: inverse temperature β (τ for IPO), > 0. Default 0.1.
    pub beta: f64,
    /// DPO: the loss variant, TRL's `loss_type` names (`sigmoid`, `robust`, `hinge`, `ipo`,
    /// `exo_pair`, `nca_pair`, `bco_pair`, `sppo_hard`, `apo_zero`, `apo_down`, `discopop`,
    /// `sigmoid_norm`) or VL-RLHF's `ddpo` (dense DPO), or a list of them whose losses are
    /// added (MPO style, weighted by `loss_weights`). Default `"sigmoid"`.
    pub loss_type: DpoLossTypes,
    /// DPO: one weight per entry of a `loss_type` list. Default: 1 each.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_weights: Option<Vec<f64>>,
    /// DPO: ε — cDPO smoothing for `sigmoid`, flip rate for `robust` (in [0, 0.5)), EXO's ε.
    /// Default 0.
    pub label_smoothing: f64,
    /// DPO: ignore the reference model (its log-probs count as 0). Default `false`.
    pub reference_free: bool,
    /// KTO: weight λ_D of desirable examples. Default 1.
    pub desirable_weight: f64,
    /// KTO: weight λ_U of undesirable examples. Default 1.
    pub undesirable_weight: f64,
    /// SimPO: the target reward margin γ (TRL's `simpo_gamma`). Default 0.5.
    pub simpo_gamma: f64,
    /// DPO: RPO's weight α of the chosen answers' negative log-likelihood (token mean) added
    /// to the loss, ≥ 0, as TRL's `rpo_alpha` did. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpo_alpha: Option<f64>,
    /// Reward: the loss on ranked lists of more than two answers. Default `"pairwise"`.
    pub ranking_loss: RankingLoss,
    /// DPO / KTO: the reference model, when it is not the initial policy (TRL's `ref_model`).
    pub reference: Option<ReferenceConfig>,
    /// Reward: TRL's `center_rewards_coefficient`, the weight of `mean((r_chosen + r_rejected)²)`
    /// added to the loss to keep rewards centred on 0 (Eisenstein et al.). Default: none.
    pub center_rewards_coefficient: Option<f64>,
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig {
            name: Method::Sft,
            beta: 0.1,
            loss_type: DpoLossTypes(vec![DpoLossType::Sigmoid]),
            loss_weights: None,
            label_smoothing: 0.0,
            reference_free: false,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            simpo_gamma: 0.5,
            rpo_alpha: None,
            ranking_loss: RankingLoss::Pairwise,
            center_rewards_coefficient: None,
            reference: None,
        }
    }
}

/// `[method.reference]`: a reference model other than the policy's initial weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceConfig {
    /// A model directory in Hugging Face layout or a hub id, of the policy's architecture and
    /// vocabulary (e.g. the SFT checkpoint the policy started from, when the policy is loaded
    /// from elsewhere).
    pub model: String,
}

// ---------------------------------------------------------------------------------------------
// [lora]

/// Which linear layers get LoRA adapters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TargetModules {
    /// The attention and MLP projections of the LM (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
    /// `gate_proj`, `up_proj`, `down_proj` in Llama naming) and, with `apply_to_vision`, of the
    /// vision tower.
    #[default]
    Auto,
    /// Layers whose name (last path component, PEFT-style) is in the list.
    Names(Vec<String>),
}

impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetModules::Auto => s.serialize_str("auto"),
            TargetModules::Names(n) => n.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TargetModules;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\" or a list of module names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TargetModules, E> {
                if v == "auto" {
                    Ok(TargetModules::Auto)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TargetModules, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    names.push(n);
                }
                Ok(TargetModules::Names(names))
            }
        }
        d.deserialize_any(V)
    }
}

/// `[lora]`: low-rank adapters (and QLoRA).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Train LoRA adapters instead of the base weights of the groups they apply to. Default
    /// `false`.
    pub enabled: bool,
    /// Adapter rank `r` (> 0). Default 8.
    pub rank: usize,
    /// Scaling numerator: the update is `(alpha / rank) · B A` (> 0). Default 16.
    pub alpha: f64,
    /// Dropout on the adapter input, in `[0, 1)`. Default 0.05.
    pub dropout: f64,
    /// `"auto"` (attention + MLP projections) or a list of layer names such as
    /// `["q_proj", "v_proj"]`. Default `"auto"`.
    pub target_modules: TargetModules,
    /// Put adapters on the language model. Default `true`.
    pub apply_to_lm: bool,
    /// Put adapters on the vision tower too. Default `false`.
    pub apply_to_vision: bool,
    /// QLoRA: keep the base weights of the adapted groups quantized (4-bit) and frozen. Requires
    /// `enabled = true`. Default `false`.
    pub qlora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            enabled: false,
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: TargetModules::Auto,
            apply_to_lm: true,
            apply_to_vision: false,
            qlora: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// [optim]

/// The optimizer algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW (decoupled weight decay).
    #[default]
    Adamw,
}

/// `[optim]`: optimizer hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// The optimizer: `"adamw"`. Default `"adamw"`.
    pub name: OptimizerKind,
    /// Peak learning rate (> 0). Default 2e-5.
    pub lr: f64,
    /// Adam `[beta1, beta2]`, each in `[0, 1)`. Default `[0.9, 0.999]`.
    pub betas: [f64; 2],
    /// Adam epsilon (> 0). Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay (≥ 0). Default 0.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping. Default 1.0.
    pub max_grad_norm: f64,
    /// Learning rate of the vision tower (LLaVA's `mm_vision_tower_lr`). Default: `lr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vision_lr: Option<f64>,
    /// Learning rate of the projector. Default: `lr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projector_lr: Option<f64>,
    /// Learning rate of the language model. Default: `lr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lm_lr: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            name: OptimizerKind::Adamw,
            lr: 2e-5,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            vision_lr: None,
            projector_lr: None,
            lm_lr: None,
        }
    }
}

impl OptimConfig {
    /// The learning rate of each group, `(vision, projector, lm)`, with the per-group overrides
    /// applied.
    pub fn group_lrs(&self) -> (f64, f64, f64) {
        (
            self.vision_lr.unwrap_or(self.lr),
            self.projector_lr.unwrap_or(self.lr),
            self.lm_lr.unwrap_or(self.lr),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// [schedule]

/// The learning-rate curve after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Cosine decay from the peak to 0.
    #[default]
    Cosine,
    /// Linear decay from the peak to 0.
    Linear,
    /// Constant at the peak.
    Constant,
}

/// `[schedule]`: learning-rate schedule. Warmup is linear from 0 to the peak.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// `"cosine"`, `"linear"` or `"constant"`. Default `"cosine"`.
    pub kind: ScheduleKind,
    /// Warmup as a fraction of the total optimizer steps, in `[0, 1)`. Not together with
    /// `warmup_steps`. Default: no warmup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// Warmup in optimizer steps. Not together with `warmup_ratio`. Default: no warmup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
}

impl ScheduleConfig {
    /// Warmup steps for a run of `total_steps` optimizer steps (ratio rounded up, as
    /// transformers' `get_warmup_steps` does).
    pub fn warmup_steps_for(&self, total_steps: u64) -> u64 {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(s), _) => s.min(total_steps),
            (None, Some(r)) => ((total_steps as f64) * r).ceil() as u64,
            (None, None) => 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// [train]

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAt {
    /// A number of epochs over `data.num_samples` samples.
    Epochs(u32),
    /// A number of optimizer steps.
    Steps(u64),
}

/// `[train]`: the training loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Number of epochs. Not together with `max_steps`. Default: 1 when neither is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    /// Number of optimizer steps. Not together with `epochs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Samples per micro-batch (> 0). Default 1.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (> 0); the effective batch is
    /// `batch_size · grad_accumulation`. Default 1.
    pub grad_accumulation: usize,
    /// Seed of the data order, dropout and initialisation of new weights. Default 42.
    pub seed: u64,
    /// Log metrics every this many optimizer steps (> 0). Default 10.
    pub log_every: u64,
    /// Evaluate on `data.eval_datasets` every this many optimizer steps (and at the end); 0
    /// evaluates only at the end (when eval datasets are given). Default 0.
    pub eval_every: u64,
    /// Gradient checkpointing: recompute memory-bound activations during the backward pass
    /// instead of keeping them (Burn's balanced strategy), trading compute for peak memory.
    /// Default `false`.
    pub gradient_checkpointing: bool,
    /// Save a checkpoint every this many optimizer steps; 0 saves only at the end. Default 500.
    pub save_every: u64,
    /// Keep at most this many checkpoints (oldest deleted first); 0 keeps all. Default 0.
    pub save_total_limit: usize,
    /// The run directory: checkpoints, metrics, the resolved config. Default `"runs/sft"`.
    pub output_dir: PathBuf,
    /// Freeze the vision tower. Default (absent): frozen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_vision: Option<bool>,
    /// Freeze the projector. Default (absent): trained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_projector: Option<bool>,
    /// Freeze the language model. Default (absent): frozen when LoRA applies to it, trained
    /// otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_lm: Option<bool>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: None,
            max_steps: None,
            batch_size: 1,
            grad_accumulation: 1,
            seed: 42,
            log_every: 10,
            eval_every: 0,
            gradient_checkpointing: false,
            save_every: 500,
            save_total_limit: 0,
            output_dir: PathBuf::from("runs/sft"),
            freeze_vision: None,
            freeze_projector: None,
            freeze_lm: None,
        }
    }
}

impl TrainConfig {
    /// How long to train: `max_steps` if set, else `epochs` (default 1).
    pub fn stop_at(&self) -> StopAt {
        match (self.max_steps, self.epochs) {
            (Some(s), _) => StopAt::Steps(s),
            (None, Some(e)) => StopAt::Epochs(e),
            (None, None) => StopAt::Epochs(1),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// [backend]

/// The compute backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// CPU.
    #[default]
    Cpu,
    /// wgpu (Vulkan / Metal / DX12 through WGSL).
    Wgpu,
    /// CUDA.
    Cuda,
}

/// `[backend]`: where to run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// `"cpu"`, `"wgpu"` or `"cuda"` (must be compiled into the binary). Default `"cpu"`.
    pub kind: BackendKind,
}

// ---------------------------------------------------------------------------------------------
// Resolved training of each group.

/// How one parameter group is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupTraining {
    /// Not trained.
    Frozen,
    /// All weights trained.
    Full,
    /// Base weights frozen (quantized under QLoRA), LoRA adapters trained.
    Lora,
}

impl GroupTraining {
    /// Whether anything in the group is trained.
    pub fn is_trained(self) -> bool {
        self != GroupTraining::Frozen
    }
}

/// How each group is trained, after resolving defaults (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TrainableGroups {
    /// The vision tower.
    pub vision: GroupTraining,
    /// The projector.
    pub projector: GroupTraining,
    /// The language model.
    pub lm: GroupTraining,
}

// ---------------------------------------------------------------------------------------------

impl ExperimentConfig {
    /// Parses a config (syntax, unknown keys, types) **without** validating values. `origin`
    /// names the file in messages (`None`: `<string>`).
    pub fn parse_str(text: &str, origin: Option<&Path>) -> Result<Self, ConfigError> {
        let origin = origin_name(origin);
        toml::from_str::<ExperimentConfig>(text).map_err(|e| parse_error(text, &origin, &e))
    }

    /// Parses and validates a config held in memory.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str) -> Result<Self, ConfigError> {
        let cfg = Self::parse_str(text, None)?;
        cfg.validate_with(STRING_ORIGIN, Some(text), &[])?;
        Ok(cfg)
    }

    /// Reads, parses and validates a config file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::load(path, &[] as &[&str])
    }

    /// Reads a config file, applies `--set key=value` overrides in order, then validates.
    /// Validation problems name the key and, if it is written in the file (and not overridden),
    /// its line.
    pub fn load<S: AsRef<str>>(
        path: impl AsRef<Path>,
        overrides: &[S],
    ) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse_str(&text, Some(path))?;
        let mut overridden = Vec::new();
        for o in overrides {
            overridden.push(cfg.apply_override(o.as_ref())?);
        }
        cfg.validate_with(&origin_name(Some(path)), Some(&text), &overridden)?;
        Ok(cfg)
    }

    /// Applies one `key=value` override (`optim.lr=1e-5`, `data.datasets[0].weight=2`,
    /// `lora.target_modules=["q_proj","v_proj"]`). The value is parsed as TOML; text that is not
    /// valid TOML is taken as a string, so paths need no quotes. An index one past the end of
    /// `data.datasets` appends a dataset. The config is **not** validated: call
    /// [`validate`](Self::validate) after the last override. Returns the canonical key.
    pub fn apply_override(&mut self, arg: &str) -> Result<String, ConfigError> {
        let err = |key: &str, message: String| ConfigError::Override {
            arg: arg.to_string(),
            key: key.to_string(),
            message,
        };
        let Some((raw_key, raw_value)) = arg.split_once('=') else {
            return Err(err(
                arg.trim(),
                "expected `key=value`, e.g. `optim.lr=1e-5`".into(),
            ));
        };
        let raw_key = raw_key.trim();
        let segs = parse_key_path(raw_key).map_err(|m| err(raw_key, m))?;
        let key = display_path(&segs);
        let value = parse_value(raw_value);
        let mut tree =
            toml::Value::try_from(&*self).map_err(|e| ConfigError::Serialize(e.to_string()))?;
        set_in_tree(&mut tree, &segs, value).map_err(|m| err(&key, with_suggestion(&key, m)))?;
        let updated: ExperimentConfig = tree.try_into().map_err(|e: toml::de::Error| {
            err(&key, with_suggestion(&key, e.message().to_string()))
        })?;
        *self = updated;
        Ok(key)
    }

    /// Applies several overrides in order (see [`apply_override`](Self::apply_override)).
    pub fn apply_overrides<S: AsRef<str>>(&mut self, overrides: &[S]) -> Result<(), ConfigError> {
        for o in overrides {
            self.apply_override(o.as_ref())?;
        }
        Ok(())
    }

    /// Checks value ranges and conflicting options; every problem is reported, each naming its
    /// key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with(STRING_ORIGIN, None, &[])
    }

    fn validate_with(
        &self,
        origin: &str,
        text: Option<&str>,
        overridden: &[String],
    ) -> Result<(), ConfigError> {
        let mut problems = validate::problems(self);
        if problems.is_empty() {
            return Ok(());
        }
        if let Some(index) = text.and_then(KeyIndex::build) {
            for p in &mut problems {
                if !overridden.contains(&p.key) {
                    p.line = index.line_of(&p.key);
                }
            }
        }
        Err(ConfigError::Invalid {
            origin: origin.to_string(),
            problems,
        })
    }

    /// The config as TOML (every field, defaults included; unset optional fields omitted), to be
    /// written into the run directory. Parsing it back gives an equal config.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self).map_err(|e| ConfigError::Serialize(e.to_string()))
    }

    /// How each parameter group is trained, after resolving the `train.freeze_*` defaults.
    pub fn trainable_groups(&self) -> TrainableGroups {
        let lora = &self.lora;
        let resolve = |lora_here: bool, freeze: Option<bool>, default_frozen: bool| {
            if lora.enabled && lora_here {
                GroupTraining::Lora
            } else if freeze.unwrap_or(default_frozen) {
                GroupTraining::Frozen
            } else {
                GroupTraining::Full
            }
        };
        TrainableGroups {
            vision: resolve(lora.apply_to_vision, self.train.freeze_vision, true),
            projector: resolve(false, self.train.freeze_projector, false),
            lm: resolve(lora.apply_to_lm, self.train.freeze_lm, false),
        }
    }

    /// Every key a config can have, as dotted paths (`data.datasets[].weight`), sorted.
    pub fn known_keys() -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(toml::Value::Table(t)) = toml::Value::try_from(Self::fully_specified()) {
            toml_util::flatten_keys(&t, "", &mut out);
        }
        out
    }

    /// A config with every optional field set (used for [`known_keys`](Self::known_keys)).
    fn fully_specified() -> Self {
        let mut c = ExperimentConfig::default();
        c.data.num_samples = Some(1);
        c.data.max_prompt_length = Some(1);
        c.data.datasets.push(DatasetConfig {
            path: "x".into(),
            format: DataFormat::Llava,
            image_root: Some("x".into()),
            weight: Some(1.0),
            name: Some("x".into()),
            score_margin: Some(0.0),
        });
        c.data.eval_datasets.push(DatasetConfig {
            path: "x".into(),
            format: DataFormat::Llava,
            image_root: Some("x".into()),
            weight: None,
            name: Some("x".into()),
            score_margin: Some(0.0),
        });
        c.method.rpo_alpha = Some(1.0);
        c.method.loss_weights = Some(vec![1.0]);
        c.optim.vision_lr = Some(1.0);
        c.optim.projector_lr = Some(1.0);
        c.optim.lm_lr = Some(1.0);
        c.schedule.warmup_ratio = Some(0.0);
        c.schedule.warmup_steps = Some(0);
        c.train.epochs = Some(1);
        c.train.max_steps = Some(1);
        c.train.freeze_vision = Some(true);
        c.train.freeze_projector = Some(true);
        c.train.freeze_lm = Some(true);
        c
    }
}

impl std::str::FromStr for ExperimentConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ExperimentConfig::from_str(s)
    }
}

fn origin_name(origin: Option<&Path>) -> String {
    origin.map_or_else(|| STRING_ORIGIN.to_string(), |p| p.display().to_string())
}

/// Converts a toml error into a [`ConfigError::Parse`] with line, column and, when the span
/// falls on a key or value, the dotted key.
fn parse_error(text: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    let span = e.span();
    let (line, column) = span
        .as_ref()
        .map_or((1, 1), |s| toml_util::line_col(text, s.start));
    let key = span
        .as_ref()
        .and_then(|s| KeyIndex::build(text).and_then(|idx| idx.path_at(s.start)));
    let mut message = e.message().trim_end().to_string();
    if let Some(k) = &key {
        if message.starts_with("unknown field") {
            message = with_suggestion(k, message);
        }
    }
    ConfigError::Parse {
        origin: origin.to_string(),
        line,
        column,
        key,
        message,
    }
}

/// Appends "did you mean `x`?" when `key` looks like a misspelt or misplaced known key.
fn with_suggestion(key: &str, message: String) -> String {
    match suggest(key) {
        Some(s) => format!("{message} (did you mean `{s}`?)"),
        None => message,
    }
}

fn suggest(key: &str) -> Option<String> {
    let norm = strip_indices(key);
    let known = ExperimentConfig::known_keys();
    if known.contains(&norm) {
        return None;
    }
    let leaf = norm.rsplit('.').next().unwrap_or(&norm);
    // Same name in another section (`train.lr` → `optim.lr`).
    if let Some(k) = known.iter().find(|k| k.rsplit('.').next() == Some(leaf)) {
        return Some(k.clone());
    }
    // A close spelling in the same section.
    let section = norm.rsplit_once('.').map_or("", |(s, _)| s);
    known
        .iter()
        .filter(|k| k.rsplit_once('.').map_or("", |(s, _)| s) == section)
        .map(|k| {
            (
                toml_util::edit_distance(k.rsplit('.').next().unwrap_or(k), leaf),
                k,
            )
        })
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone())
}

/// `data.datasets[3].weight` → `data.datasets[].weight`.
fn strip_indices(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}
