//! LLaVA-1.5: CLIP tower → projector → image features placed at the `<image>` token positions of
//! a Llama-family decoder, as `LlavaForConditionalGeneration` does.

use crate::nn::linear::{join, Linear, LinearLayers};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::config::{FeatureSelect, LlavaConfig};
use crate::error::{ModelError, Result};
use crate::nn::attention::KvCache;
use crate::nn::precision::to_dtype;
use crate::registry::{Images, ModelInputs};
use crate::text::config::Activation;
use crate::text::model::{activate, CausalLm};
use crate::vision::clip::ClipVisionModel;

/// `multi_modal_projector`: `linear_2(act(linear_1(x)))`, or a single linear map.
#[derive(Module, Debug)]
pub struct Projector {
    pub linear_1: Linear,
    pub linear_2: Option<Linear>,
    #[module(skip)]
    pub activation: Activation,
}

impl Projector {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.linear_1.forward(x);
        match &self.linear_2 {
            Some(second) => second.forward(activate(h, self.activation)),
            None => h,
        }
    }
}

/// Which features to take from the tower, kept beside the module.
#[derive(Debug, Clone)]
pub struct LlavaSettings {
    pub image_token_id: u32,
    pub feature_layers: Vec<usize>,
    pub select: FeatureSelect,
    pub tokens_per_image: usize,
}

/// `LlavaForConditionalGeneration`.
#[derive(Module, Debug)]
pub struct Llava {
    pub vision_tower: ClipVisionModel,
    pub multi_modal_projector: Projector,
    pub language_model: CausalLm,
    #[module(skip)]
    pub settings: LlavaSettings,
}

struct LlavaIdsOnly<'a> {
    input_ids: &'a [Vec<u32>],
}

impl Llava {
    /// A model with fresh (lazy) parameters.
    pub fn new(config: &LlavaConfig, device: &Device) -> Result<Self> {
        let vision_hidden = config.vision.hidden_size * config.vision_feature_layers.len();
        let text_hidden = config.text.hidden_size;
        let projector = if config.projector_two_layers {
            Projector {
                linear_1: Linear::new(vision_hidden, text_hidden, config.projector_bias, device),
                linear_2: Some(Linear::new(
                    text_hidden,
                    text_hidden,
                    config.projector_bias,
                    device,
                )),
                activation: config.projector_activation,
            }
        } else {
            Projector {
                linear_1: Linear::new(vision_hidden, text_hidden, config.projector_bias, device),
                linear_2: None,
                activation: config.projector_activation,
            }
        };
        Ok(Llava {
            vision_tower: ClipVisionModel::new(&config.vision, device)?,
            multi_modal_projector: projector,
            language_model: CausalLm::new(&config.text, device),
            settings: LlavaSettings {
                image_token_id: config.image_token_id,
                feature_layers: config.feature_layer_indices(),
                select: config.select,
                tokens_per_image: config.tokens_per_image(),
            },
        })
    }

    /// Vision features before the projector: selected hidden states, `[n, tokens, hidden*layers]`.
    pub fn select_vision_features(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let up_to = self
            .settings
            .feature_layers
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        let pixel_values = to_dtype(pixel_values, self.language_model.compute_dtype.into());
        let states = self.vision_tower.hidden_states(pixel_values, up_to);
        let picked: Vec<Tensor<3>> = self
            .settings
            .feature_layers
            .iter()
            .map(|&i| {
                let s = states[i].clone();
                match self.settings.select {
                    FeatureSelect::Default => {
                        let [_, t, _] = s.dims();
                        s.narrow(1, 1, t - 1)
                    }
                    FeatureSelect::Full => s,
                }
            })
            .collect();
        Tensor::cat(picked, 2)
    }

    /// Projected image features `[n, tokens_per_image, text_hidden]`.
    pub fn image_features(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        self.multi_modal_projector
            .forward(self.select_vision_features(pixel_values))
    }

    /// The features of `images`: encoded here from pixels, or as already encoded.
    pub fn features_of(&self, images: Images) -> Tensor<3> {
        match images {
            Images::Pixels(pixels) => self.image_features(pixels),
            Images::Encoded(features) => features,
        }
    }

    /// Text embeddings with already computed image `features` (`[n, tokens, hidden]`, in the
    /// row-major order of the image tokens) placed at the image-token positions.
    pub fn embeddings_with_features(
        &self,
        input_ids: &[Vec<u32>],
        features: Option<Tensor<3>>,
        device: &Device,
    ) -> Result<Tensor<3>> {
        let inputs = LlavaIdsOnly { input_ids };
        let image_token = self.settings.image_token_id;
        let b = inputs.input_ids.len();
        let t = inputs.input_ids.first().map(Vec::len).unwrap_or(0);
        if inputs.input_ids.iter().any(|row| row.len() != t) {
            return Err(ModelError::Input(
                "rows of input_ids have different lengths".into(),
            ));
        }
        let n_image_tokens = inputs
            .input_ids
            .iter()
            .flatten()
            .filter(|&&id| id == image_token)
            .count();
        // Image tokens are overwritten below; embed a valid id in their place since some
        // checkpoints put the image token outside the embedding table.
        let text_ids: Vec<Vec<u32>> = inputs
            .input_ids
            .iter()
            .map(|row| {
                row.iter()
                    .map(|&id| if id == image_token { 0 } else { id })
                    .collect()
            })
            .collect();
        let text = self.language_model.embed(&text_ids, device);
        let Some(features) = features else {
            if n_image_tokens > 0 {
                return Err(ModelError::Input(format!(
                    "{n_image_tokens} image tokens but no images"
                )));
            }
            return Ok(text);
        };
        let [n, per_image, hidden] = features.dims();
        if n * per_image != n_image_tokens {
            return Err(ModelError::Input(format!(
                "image features and image tokens do not match: {n} images × {per_image} tokens = {} features, {n_image_tokens} image tokens in the text",
                n * per_image
            )));
        }
        let flat_text = text.reshape([b * t, hidden]);
        let flat_features = features.reshape([n * per_image, hidden]);
        let table = Tensor::cat(vec![flat_text, flat_features], 0);
        let mut next_feature = b * t;
        let index: Vec<i64> = inputs
            .input_ids
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, &id)| {
                if id == image_token {
                    next_feature += 1;
                    (next_feature - 1) as i64
                } else {
                    i as i64
                }
            })
            .collect();
        let index = Tensor::<1, Int>::from_data(TensorData::new(index, [b * t]), device);
        Ok(table.select(0, index).reshape([b, t, hidden]))
    }

    /// Logits `[b, t, vocab]` for a batch (`input_ids` with each `<image>` already expanded to
    /// `tokens_per_image` copies, the images in the order their tokens appear); with a cache
    /// this is the prefill of generation.
    pub fn forward(
        &self,
        inputs: ModelInputs,
        cache: Option<&mut KvCache>,
        device: &Device,
    ) -> Result<Tensor<3>> {
        let features = inputs.images.map(|images| self.features_of(images));
        let embeds = self.embeddings_with_features(inputs.input_ids, features, device)?;
        Ok(self
            .language_model
            .forward_embeds(embeds, inputs.attention_mask, cache))
    }
}

impl LinearLayers for Llava {
    fn visit_linears(&mut self, prefix: &str, visit: &mut dyn FnMut(&str, &mut Linear)) {
        self.vision_tower
            .visit_linears(&join(prefix, "vision_tower"), visit);
        let projector = join(prefix, "multi_modal_projector");
        visit(
            &join(&projector, "linear_1"),
            &mut self.multi_modal_projector.linear_1,
        );
        if let Some(second) = self.multi_modal_projector.linear_2.as_mut() {
            visit(&join(&projector, "linear_2"), second);
        }
        self.language_model
            .visit_linears(&join(prefix, "language_model"), visit);
    }
}
