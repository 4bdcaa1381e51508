//! Errors raised while resolving, configuring and loading models.

use burn::tensor::FloatDType;
use std::path::PathBuf;

/// Everything that can go wrong between a model reference and a ready module.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` (or another JSON file) is not valid JSON or does not have the expected shape.
    #[error("{path}:{line}:{column}: {message}")]
    Config {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A configuration value is present but not supported or inconsistent.
    #[error("{path}: field `{field}`: {message}")]
    InvalidConfig {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// The model type in `config.json` is not one Resonance implements.
    #[error("{path}: model_type `{model_type}` is not supported (supported: {supported})")]
    UnsupportedModelType {
        path: PathBuf,
        model_type: String,
        supported: String,
    },
    /// The device cannot compute in the requested dtype.
    #[error("{dtype:?} is not supported by the {device} device")]
    UnsupportedDtype { dtype: FloatDType, device: String },
    /// No weights were found in a model directory.
    #[error("{dir}: no model.safetensors or model.safetensors.index.json found")]
    NoWeights { dir: PathBuf },
    /// A safetensors file could not be opened or parsed.
    #[error("{path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// Loading weights left parameters without values, found tensors nobody uses, or met a wrong
    /// shape.
    #[error("{dir}: checkpoint does not match the model:{details}")]
    WeightMismatch { dir: PathBuf, details: String },
    /// A model reference is neither a local directory nor a hub id available in the cache.
    #[error("cannot resolve model `{reference}`: {message}")]
    Resolve { reference: String, message: String },
    /// Processor (tokenizer, template, image) failure.
    #[error(transparent)]
    Core(#[from] resonance_core::CoreError),
    /// The inputs given to a model call are inconsistent.
    #[error("invalid input: {0}")]
    Input(String),
}

impl ModelError {
    /// Builds a [`ModelError::Config`] from a serde_json error.
    pub fn from_json(path: impl Into<PathBuf>, err: &serde_json::Error) -> Self {
        ModelError::Config {
            path: path.into(),
            line: err.line(),
            column: err.column(),
            message: err.to_string(),
        }
    }

    /// Images given to a text-only model.
    pub fn text_only() -> Self {
        ModelError::Input("this model is text-only and cannot take images".into())
    }
}

/// Shorthand result type of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
