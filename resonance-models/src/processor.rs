//! The model-aware processor: chat template + tokenizer + image preprocessing + image-token
//! expansion, turning `(prompt, response, images)` into the ids and pixels a model consumes.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use resonance_core::{
    expand_image_tokens, load_image_with, AlphaMode, ChatTemplate, ClipImageProcessor, LoadOptions,
    TextTokenizer,
};
use serde_json::{json, Value};

use crate::error::{ModelError, Result};
use crate::registry::AnyModel;

/// Everything needed to turn text and image files into model inputs.
pub struct Processor {
    pub tokenizer: TextTokenizer,
    pub template: Option<ChatTemplate>,
    pub image_processor: Option<ClipImageProcessor>,
    /// `(image token id, feature tokens per image)` for vision-language models.
    pub image_tokens: Option<(u32, usize)>,
}

/// Token ids of one prompt/response pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    /// Prompt ids with every image token expanded.
    pub prompt_ids: Vec<u32>,
    /// Response ids followed by EOS.
    pub response_ids: Vec<u32>,
}

impl Processor {
    /// Loads the tokenizer, chat template and (for VLMs) image processor of a model directory.
    pub fn from_dir(dir: &Path, model: &AnyModel) -> Result<Self> {
        Self::with_image_tokens(dir, model.image_tokens())
    }

    /// Like [`from_dir`](Self::from_dir) without loading weights: the image-token settings
    /// are read from `config.json`.
    pub fn from_config_dir(dir: &Path) -> Result<Self> {
        Self::with_image_tokens(dir, crate::registry::image_tokens_of(dir)?)
    }

    fn with_image_tokens(dir: &Path, image_tokens: Option<(u32, usize)>) -> Result<Self> {
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let template = ChatTemplate::from_dir(dir)?;
        let image_processor = match image_tokens {
            Some(_) => Some(ClipImageProcessor::from_dir(dir)?),
            None => None,
        };
        Ok(Processor {
            tokenizer,
            template,
            image_processor,
            image_tokens,
        })
    }

    /// The user turn with `n_images` image parts before the text, rendered with the model's chat
    /// template and the generation prompt. Without a template the prompt is used verbatim
    /// (after one image token per image).
    pub fn render_prompt(&self, prompt: &str, n_images: usize) -> Result<String> {
        match &self.template {
            Some(template) => {
                let mut content: Vec<Value> =
                    (0..n_images).map(|_| json!({"type": "image"})).collect();
                content.push(json!({"type": "text", "text": prompt}));
                let messages = json!([{"role": "user", "content": content}]);
                Ok(template.render(&messages, true, None)?)
            }
            None => {
                let image = match (n_images, self.image_token_text()) {
                    (0, _) => String::new(),
                    (_, Some(token)) => format!("{token}\n").repeat(n_images),
                    (_, None) => {
                        return Err(ModelError::Input(
                            "images were given to a model without an image token".into(),
                        ))
                    }
                };
                Ok(format!("{image}{prompt}"))
            }
        }
    }

    fn image_token_text(&self) -> Option<String> {
        self.image_tokens
            .and_then(|(id, _)| self.tokenizer.id_to_token(id))
    }

    /// Tokenizes a rendered prompt with the tokenizer's own special-token rule and expands each
    /// image token to the model's feature count.
    pub fn prompt_ids(&self, prompt_text: &str, n_images: usize) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode(prompt_text, true)?;
        match self.image_tokens {
            Some((image_id, per_image)) => Ok(expand_image_tokens(
                &ids,
                image_id,
                &vec![per_image; n_images],
            )?),
            None if n_images > 0 => Err(ModelError::text_only()),
            None => Ok(ids),
        }
    }

    /// Response tokens without special tokens, then EOS (TRL's completion contract).
    pub fn response_ids(&self, response: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(response, false)?;
        let eos = self.tokenizer.eos_token_id().ok_or_else(|| {
            ModelError::Input("the tokenizer defines no eos_token to end the response".into())
        })?;
        ids.push(eos);
        Ok(ids)
    }

    /// Prompt and response ids of one record.
    pub fn encode_pair(
        &self,
        prompt: &str,
        response: &str,
        n_images: usize,
    ) -> Result<EncodedPair> {
        let text = self.render_prompt(prompt, n_images)?;
        Ok(EncodedPair {
            prompt_ids: self.prompt_ids(&text, n_images)?,
            response_ids: self.response_ids(response)?,
        })
    }

    /// Loads and preprocesses image files into `[n, 3, h, w]`, or `None` for no images.
    pub fn pixel_values(&self, images: &[PathBuf], device: &Device) -> Result<Option<Tensor<4>>> {
        if images.is_empty() {
            return Ok(None);
        }
        let processor = self
            .image_processor
            .as_ref()
            .ok_or_else(ModelError::text_only)?;
        let mut data = Vec::new();
        let mut size = None;
        for path in images {
            // The image processor's `do_convert_rgb` composites transparent images onto white
            // (transformers 5's `convert_to_rgb`), which is what a PIL image from a dataset meets.
            let options = LoadOptions {
                alpha: if processor.config().do_convert_rgb {
                    AlphaMode::CompositeOnWhite
                } else {
                    AlphaMode::Drop
                },
                ..LoadOptions::default()
            };
            let pixels = processor.preprocess(&load_image_with(path, &options)?)?;
            let shape = (pixels.channels, pixels.height, pixels.width);
            if *size.get_or_insert(shape) != shape {
                return Err(ModelError::Input(format!(
                    "{}: preprocessed to {shape:?}, other images to {:?}",
                    path.display(),
                    size.unwrap_or(shape)
                )));
            }
            data.extend(pixels.data);
        }
        let (c, h, w) = size.unwrap_or((3, 0, 0));
        Ok(Some(Tensor::from_data(
            TensorData::new(data, [images.len(), c, h, w]),
            device,
        )))
    }
}
