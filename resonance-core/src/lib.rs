//! `resonance-core`: the processor layer of Resonance, with no Burn code.
//!
//! * [`tokenizer`]: Hugging Face tokenizers with their special-token configuration.
//! * [`chat_template`]: the model's Jinja chat template, rendered as transformers renders it.
//! * [`image`]: image loading and CLIP-style preprocessing matching transformers' processors.
//! * [`processor`]: helpers shared by the vision-language processors.
//! * [`error`]: the error type, naming the file (and line/field) at fault.
//! * [`data`]: dataset formats, loaders and the mixture sampler.
//! * [`config`]: the experiment configuration (TOML).

pub mod chat_template;
pub mod config;
pub mod data;
pub mod error;
pub mod image;
pub mod processor;
mod pyfmt;
pub mod tokenizer;

pub use chat_template::ChatTemplate;
pub use error::{CoreError, Result};
pub use image::{
    center_crop, decode_image, load_image, load_image_with, pad_to_square, resize,
    shortest_edge_output_size, AlphaMode, ClipImageProcessor, ImageProcessorConfig, LoadOptions,
    PixelValues, ProcessorBackend, Resample, ResizeTarget, RgbImage,
};
pub use processor::expand_image_tokens;
pub use tokenizer::{ConfigBosEos, SpecialTokens, TextTokenizer, TokenizerOptions};
