//! `config.json` of decoder-only language models (Llama, Mistral, Qwen2 and their relatives).

use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

use crate::error::{ModelError, Result};
use crate::nn::rope::RopeScaling;

/// Families of decoder this crate implements; they differ only in a few switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderFamily {
    /// LLaMA 1/2/3, Vicuna, and checkpoints that declare `model_type = "llama"`.
    Llama,
    /// Mistral: Llama with an optional sliding attention window.
    Mistral,
    /// Qwen2: Llama with biases on the q/k/v projections.
    Qwen2,
}

impl DecoderFamily {
    /// The `model_type` strings accepted for each family.
    pub const SUPPORTED: &'static [(&'static str, DecoderFamily)] = &[
        ("llama", DecoderFamily::Llama),
        ("vicuna", DecoderFamily::Llama),
        ("mistral", DecoderFamily::Mistral),
        ("qwen2", DecoderFamily::Qwen2),
    ];

    /// Looks up the family of a `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::SUPPORTED
            .iter()
            .find(|(name, _)| *name == model_type)
            .map(|(_, family)| *family)
    }
}

/// Raw fields of a decoder `config.json` as transformers writes them. Unknown fields are ignored:
/// real checkpoints carry many that do not change the forward pass.
#[derive(Debug, Clone, Deserialize)]
pub struct RawTextConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default)]
    pub vocab_size: Option<usize>,
    #[serde(default)]
    pub hidden_size: Option<usize>,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    #[serde(default)]
    pub num_hidden_layers: Option<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default, deserialize_with = "present_or_null")]
    pub sliding_window: Option<usize>,
    /// Whether `sliding_window` appeared in the file at all (null means "no window", absent
    /// means the class default).
    #[serde(skip)]
    pub sliding_window_present: bool,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<Value>,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    #[serde(default)]
    pub pad_token_id: Option<Value>,
}

fn present_or_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<usize>, D::Error> {
    Option::<usize>::deserialize(d)
}

/// transformers' configuration-class defaults per family.
struct FamilyDefaults {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    sliding_window: Option<usize>,
    num_key_value_heads: Option<usize>,
}

impl FamilyDefaults {
    fn of(family: DecoderFamily) -> Self {
        match family {
            DecoderFamily::Llama => FamilyDefaults {
                vocab_size: 32000,
                hidden_size: 4096,
                intermediate_size: 11008,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                max_position_embeddings: 2048,
                sliding_window: None,
                num_key_value_heads: None,
            },
            DecoderFamily::Mistral => FamilyDefaults {
                vocab_size: 32000,
                hidden_size: 4096,
                intermediate_size: 14336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                max_position_embeddings: 4096 * 32,
                sliding_window: Some(4096),
                num_key_value_heads: Some(8),
            },
            DecoderFamily::Qwen2 => FamilyDefaults {
                vocab_size: 151936,
                hidden_size: 4096,
                intermediate_size: 22016,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                max_position_embeddings: 32768,
                sliding_window: Some(4096),
                num_key_value_heads: None,
            },
        }
    }
}

fn default_model_type() -> String {
    "llama".to_string()
}

/// Activation of the gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Gelu,
    GeluTanh,
    QuickGelu,
    Relu,
}

impl Activation {
    /// Parses the `hidden_act` names transformers uses.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "relu" => Activation::Relu,
            _ => return None,
        })
    }
}

/// Resolved, validated decoder configuration: every switch the forward pass needs.
#[derive(Debug, Clone)]
pub struct TextConfig {
    pub family: DecoderFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub activation: Activation,
    /// Attention window per layer (`None` = full causal attention).
    pub layer_windows: Vec<Option<usize>>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// Token ids in configs are an integer, a list of integers, or null.
pub fn token_ids(value: &Option<Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl TextConfig {
    /// Reads and validates a decoder `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::from_json(path, &e))?;
        Self::from_value(&value, path)
    }

    /// Validates a decoder config given as JSON (`path` is only used in error messages).
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let mut raw: RawTextConfig =
            serde_json::from_value(value.clone()).map_err(|e| ModelError::InvalidConfig {
                path: path.to_path_buf(),
                field: "text config".into(),
                message: e.to_string(),
            })?;
        raw.sliding_window_present = value.get("sliding_window").is_some();
        Self::from_raw(raw, path)
    }

    /// Resolves defaults and checks consistency.
    pub fn from_raw(raw: RawTextConfig, path: &Path) -> Result<Self> {
        let invalid = |field: &str, message: String| ModelError::InvalidConfig {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let family = DecoderFamily::from_model_type(&raw.model_type).ok_or_else(|| {
            ModelError::UnsupportedModelType {
                path: path.to_path_buf(),
                model_type: raw.model_type.clone(),
                supported: DecoderFamily::SUPPORTED
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })?;
        // Fields a config may omit take transformers' class defaults (older llava-hf configs carry
        // only a handful of `text_config` fields).
        let d = FamilyDefaults::of(family);
        let vocab_size = raw.vocab_size.unwrap_or(d.vocab_size);
        let hidden_size = raw.hidden_size.unwrap_or(d.hidden_size);
        let intermediate_size = raw.intermediate_size.unwrap_or(d.intermediate_size);
        let num_hidden_layers = raw.num_hidden_layers.unwrap_or(d.num_hidden_layers);
        let num_attention_heads = raw.num_attention_heads.unwrap_or(d.num_attention_heads);
        let sliding_window = match raw.sliding_window_present {
            true => raw.sliding_window,
            false => d.sliding_window,
        };
        if num_attention_heads == 0 {
            return Err(invalid("num_attention_heads", "must be positive".into()));
        }
        let num_kv_heads = raw
            .num_key_value_heads
            .or(d.num_key_value_heads)
            .unwrap_or(num_attention_heads);
        if num_kv_heads == 0 || !num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{num_kv_heads} does not divide num_attention_heads = {}",
                    num_attention_heads
                ),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None => {
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(invalid(
                        "hidden_size",
                        format!(
                            "{} is not divisible by num_attention_heads = {}",
                            hidden_size, num_attention_heads
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(
                "head_dim",
                format!("{head_dim} must be even for rotary embeddings"),
            ));
        }
        let activation_name = raw.hidden_act.clone().unwrap_or_else(|| "silu".into());
        let activation = Activation::parse(&activation_name).ok_or_else(|| {
            invalid(
                "hidden_act",
                format!("activation `{activation_name}` is not supported"),
            )
        })?;
        let max_position_embeddings = raw
            .max_position_embeddings
            .unwrap_or(d.max_position_embeddings);
        let default_theta = 10_000.0;
        let rope = RopeScaling::from_config(
            raw.rope_parameters.as_ref(),
            raw.rope_scaling.as_ref(),
            raw.rope_theta.unwrap_or(default_theta),
            raw.partial_rotary_factor.unwrap_or(1.0),
            head_dim,
            max_position_embeddings,
        )
        .map_err(|message| invalid("rope_scaling", message))?;

        let layer_windows = match (&raw.layer_types, family) {
            (Some(types), _) => {
                if types.len() != num_hidden_layers {
                    return Err(invalid(
                        "layer_types",
                        format!(
                            "has {} entries for {} layers",
                            types.len(),
                            num_hidden_layers
                        ),
                    ));
                }
                let mut windows = Vec::with_capacity(types.len());
                for kind in types {
                    windows.push(match kind.as_str() {
                        "full_attention" => None,
                        "sliding_attention" => Some(sliding_window.ok_or_else(|| {
                            invalid(
                                "sliding_window",
                                "layer_types asks for sliding attention but sliding_window is null"
                                    .into(),
                            )
                        })?),
                        other => {
                            return Err(invalid(
                                "layer_types",
                                format!("layer type `{other}` is not supported"),
                            ))
                        }
                    });
                }
                windows
            }
            (None, DecoderFamily::Mistral) => vec![sliding_window; num_hidden_layers],
            (None, DecoderFamily::Qwen2) => {
                let window = if raw.use_sliding_window.unwrap_or(false) {
                    sliding_window
                } else {
                    None
                };
                let first = raw.max_window_layers.unwrap_or(num_hidden_layers);
                (0..num_hidden_layers)
                    .map(|i| if i >= first { window } else { None })
                    .collect()
            }
            (None, DecoderFamily::Llama) => vec![None; num_hidden_layers],
        };

        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            DecoderFamily::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let first_id = |v: &Option<Value>| token_ids(v).first().copied();
        Ok(TextConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers: num_hidden_layers,
            num_heads: num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope,
            max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            activation,
            layer_windows,
            eos_token_ids: token_ids(&raw.eos_token_id),
            bos_token_id: first_id(&raw.bos_token_id),
            pad_token_id: first_id(&raw.pad_token_id),
        })
    }
}
