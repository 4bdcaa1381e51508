//! The architectures Resonance implements, and loading any of them from a checkpoint directory.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, FloatDType, Tensor};

use crate::error::{ModelError, Result};
use crate::llava::config::LlavaConfig;
use crate::llava::model::Llava;
use crate::llava::weights::load_llava;
use crate::load::{model_type, read_config};
use crate::nn::attention::KvCache;
use crate::nn::precision::{cast_params, ensure_supported};
use crate::text::config::{DecoderFamily, TextConfig};
use crate::text::model::CausalLm;
use crate::text::weights::load_causal_lm;
use crate::trainable::TrainableModel;

/// One supported architecture, as `resonance models` lists it.
#[derive(Debug, Clone)]
pub struct Architecture {
    /// transformers class name.
    pub name: &'static str,
    /// `model_type` values of `config.json` it accepts.
    pub model_types: Vec<&'static str>,
    /// What it is.
    pub description: &'static str,
}

/// Every architecture this build can load.
pub fn architectures() -> Vec<Architecture> {
    vec![
        Architecture {
            name: "LlavaForConditionalGeneration",
            model_types: vec!["llava"],
            description: "LLaVA-1.5: CLIP ViT tower + MLP projector + Llama/Mistral/Qwen2 decoder",
        },
        Architecture {
            name: "LlamaForCausalLM",
            model_types: vec!["llama", "vicuna"],
            description:
                "LLaMA 1/2/3 and Vicuna decoders (rope scaling: linear, dynamic, llama3, yarn)",
        },
        Architecture {
            name: "MistralForCausalLM",
            model_types: vec!["mistral"],
            description: "Mistral decoder with sliding-window attention",
        },
        Architecture {
            name: "Qwen2ForCausalLM",
            model_types: vec!["qwen2"],
            description: "Qwen2 decoder (q/k/v bias, optional sliding window)",
        },
    ]
}

/// `(image token id, feature tokens per image)` of the model in `dir`, from its `config.json`
/// alone (`None` for text-only models).
pub fn image_tokens_of(dir: &Path) -> Result<Option<(u32, usize)>> {
    let value = read_config(dir)?;
    if model_type(&value, dir)? == "llava" {
        let config = LlavaConfig::from_value(&value, &dir.join("config.json"))?;
        return Ok(Some((config.image_token_id, config.tokens_per_image())));
    }
    Ok(None)
}

/// A loaded model of any supported architecture.
#[derive(Debug)]
pub enum AnyModel {
    /// A text-only decoder.
    Text(Box<CausalLm>, Box<TextConfig>),
    /// LLaVA.
    Llava(Box<Llava>, Box<LlavaConfig>),
}

/// Token ids, mask and images of one forward pass.
pub struct ModelInputs<'a> {
    pub input_ids: &'a [Vec<u32>],
    pub attention_mask: &'a [Vec<bool>],
    /// The batch's images in the order their tokens appear, `None` for a text-only batch.
    pub images: Option<Images>,
}

/// A batch's images as a forward pass takes them.
#[derive(Debug, Clone)]
pub enum Images {
    /// Preprocessed pixels `[n, channels, height, width]`, which the model encodes.
    Pixels(Tensor<4>),
    /// Images the model already encoded: the features `[n, tokens, hidden]`
    /// [`TrainableModel::encode_images`](crate::trainable::TrainableModel::encode_images) gave.
    /// A frozen encoder without adapters gives the same features to every forward pass of a
    /// step (a preference step's policy and reference), so they are computed once.
    Encoded(Tensor<3>),
}

impl Images {
    /// `pixels` as images to encode.
    pub fn pixels(pixels: Option<Tensor<4>>) -> Option<Images> {
        pixels.map(Images::Pixels)
    }
}

impl AnyModel {
    /// Loads the checkpoint in `dir` (already resolved, see [`crate::load::resolve_model`]).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = read_config(dir)?;
        let kind = model_type(&config, dir)?;
        if kind == "llava" {
            let (model, config) = load_llava(dir, device)?;
            return Ok(AnyModel::Llava(Box::new(model), Box::new(config)));
        }
        if DecoderFamily::from_model_type(&kind).is_some() {
            let (model, config) = load_causal_lm(dir, device)?;
            return Ok(AnyModel::Text(Box::new(model), Box::new(config)));
        }
        let supported: Vec<&str> = architectures()
            .iter()
            .flat_map(|a| a.model_types.clone())
            .collect();
        Err(ModelError::UnsupportedModelType {
            path: PathBuf::from(dir).join("config.json"),
            model_type: kind,
            supported: supported.join(", "),
        })
    }

    /// The whole model in `dtype` for inference: every float parameter converted and the
    /// activations computed in it (logits still come out in f32). An error if the device lacks
    /// the dtype.
    pub fn into_precision(self, dtype: FloatDType, device: &Device) -> Result<Self> {
        if dtype == FloatDType::F32 {
            return Ok(self);
        }
        ensure_supported(device, dtype)?;
        fn convert<M: TrainableModel>(model: M, dtype: FloatDType) -> Box<M> {
            let mut model = cast_params(model, dtype);
            model.set_compute_dtype(dtype);
            Box::new(model)
        }
        Ok(match self {
            AnyModel::Text(model, config) => AnyModel::Text(convert(*model, dtype), config),
            AnyModel::Llava(model, config) => AnyModel::Llava(convert(*model, dtype), config),
        })
    }

    /// The decoder that produces logits.
    pub fn language_model(&self) -> &CausalLm {
        match self {
            AnyModel::Text(m, _) => m,
            AnyModel::Llava(m, _) => &m.language_model,
        }
    }

    /// The decoder configuration.
    pub fn text_config(&self) -> &TextConfig {
        match self {
            AnyModel::Text(_, c) => c,
            AnyModel::Llava(_, c) => &c.text,
        }
    }

    /// `(image token id, feature tokens per image)` for models that take images.
    pub fn image_tokens(&self) -> Option<(u32, usize)> {
        match self {
            AnyModel::Text(..) => None,
            AnyModel::Llava(m, _) => Some((m.settings.image_token_id, m.settings.tokens_per_image)),
        }
    }

    /// Logits `[b, t, vocab]`. With a cache, the keys/values of the tokens are kept for decoding.
    pub fn forward(
        &self,
        inputs: ModelInputs,
        cache: Option<&mut KvCache>,
        device: &Device,
    ) -> Result<Tensor<3>> {
        match self {
            AnyModel::Text(model, _) => {
                if inputs.images.is_some() {
                    return Err(ModelError::text_only());
                }
                let embeds = model.embed(inputs.input_ids, device);
                Ok(model.forward_embeds(embeds, inputs.attention_mask, cache))
            }
            AnyModel::Llava(model, _) => model.forward(inputs, cache, device),
        }
    }
}
