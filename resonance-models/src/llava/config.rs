//! `config.json` of `LlavaForConditionalGeneration` (llava-hf layout, with the fields of the
//! original LLaVA repository's checkpoints where they differ).

use serde_json::Value;
use std::path::Path;

use crate::error::{ModelError, Result};
use crate::text::config::{Activation, TextConfig};
use crate::vision::clip::ClipVisionConfig;

/// Which vision tokens LLaVA keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the class token.
    Default,
    /// Keep every token including the class token.
    Full,
}

/// Resolved LLaVA configuration.
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub text: TextConfig,
    pub vision: ClipVisionConfig,
    pub image_token_id: u32,
    /// Vision hidden-state indices (negative counts from the end), concatenated on features.
    pub vision_feature_layers: Vec<i64>,
    pub select: FeatureSelect,
    pub projector_activation: Activation,
    pub projector_bias: bool,
    /// `false` for the single-linear projector of early LLaVA checkpoints.
    pub projector_two_layers: bool,
}

impl LlavaConfig {
    /// Parses a LLaVA `config.json` value (`path` for messages).
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let invalid = |field: &str, message: String| ModelError::InvalidConfig {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let text_value = value
            .get("text_config")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"model_type": "llama"}));
        let mut text_value = text_value;
        if text_value.get("model_type").is_none() {
            text_value["model_type"] = Value::from("llama");
        }
        // A top-level tie flag applies to the language model when the text config has none.
        if text_value.get("tie_word_embeddings").is_none() {
            if let Some(tie) = value.get("tie_word_embeddings") {
                text_value["tie_word_embeddings"] = tie.clone();
            }
        }
        let text = TextConfig::from_value(&text_value, path)?;
        let vision_value = value
            .get("vision_config")
            .cloned()
            .ok_or_else(|| invalid("vision_config", "missing".into()))?;
        let mut vision_value = vision_value;
        if vision_value.get("model_type").is_none() {
            vision_value["model_type"] = Value::from("clip_vision_model");
        }
        let vision = ClipVisionConfig::from_value(&vision_value, path)?;

        let image_token_id = value
            .get("image_token_id")
            .or_else(|| value.get("image_token_index"))
            .and_then(Value::as_u64)
            .unwrap_or(32000) as u32;
        let vision_feature_layers = match value.get("vision_feature_layer") {
            None | Some(Value::Null) => vec![-2],
            Some(Value::Number(n)) => vec![n
                .as_i64()
                .ok_or_else(|| invalid("vision_feature_layer", "not an integer".into()))?],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_i64().ok_or_else(|| {
                        invalid("vision_feature_layer", "not an integer list".into())
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(other) => {
                return Err(invalid(
                    "vision_feature_layer",
                    format!("expected an integer or a list, found {other}"),
                ))
            }
        };
        let n_states = vision.num_hidden_layers as i64 + 1;
        for &layer in &vision_feature_layers {
            if layer >= n_states || layer < -n_states {
                return Err(invalid(
                    "vision_feature_layer",
                    format!(
                        "{layer} is out of range for a tower with {} layers",
                        vision.num_hidden_layers
                    ),
                ));
            }
        }
        let select = match value
            .get("vision_feature_select_strategy")
            .and_then(Value::as_str)
            .unwrap_or("default")
        {
            "default" => FeatureSelect::Default,
            "full" => FeatureSelect::Full,
            other => {
                return Err(invalid(
                    "vision_feature_select_strategy",
                    format!("`{other}` is not one of default, full"),
                ))
            }
        };
        let act_name = value
            .get("projector_hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        let projector_activation = Activation::parse(act_name).ok_or_else(|| {
            invalid(
                "projector_hidden_act",
                format!("activation `{act_name}` is not supported"),
            )
        })?;
        let projector_bias = value
            .get("multimodal_projector_bias")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let projector_two_layers = match value.get("mm_projector_type").and_then(Value::as_str) {
            None | Some("mlp2x_gelu") => true,
            Some("linear") => false,
            Some(other) => {
                return Err(invalid(
                    "mm_projector_type",
                    format!("`{other}` is not one of linear, mlp2x_gelu"),
                ))
            }
        };
        Ok(LlavaConfig {
            text,
            vision,
            image_token_id,
            vision_feature_layers,
            select,
            projector_activation,
            projector_bias,
            projector_two_layers,
        })
    }

    /// Hidden-state indices of the vision tower as non-negative numbers.
    pub fn feature_layer_indices(&self) -> Vec<usize> {
        let n_states = self.vision.num_hidden_layers as i64 + 1;
        self.vision_feature_layers
            .iter()
            .map(|&l| {
                if l < 0 {
                    (n_states + l) as usize
                } else {
                    l as usize
                }
            })
            .collect()
    }

    /// Feature tokens one image contributes (what each `<image>` expands to).
    pub fn tokens_per_image(&self) -> usize {
        match self.select {
            FeatureSelect::Default => self.vision.num_patches(),
            FeatureSelect::Full => self.vision.num_patches() + 1,
        }
    }
}
