//! Backend-agnostic Burn modules of the vision-language models Resonance trains, with the
//! checkpoint loading that maps Hugging Face weights onto them.

pub mod error;
pub mod generate;
pub mod llava;
pub mod load;
pub mod nn;
pub mod packing;
pub mod processor;
pub mod registry;
pub mod text;
pub mod trainable;
pub mod vision;

pub use error::{ModelError, Result};
