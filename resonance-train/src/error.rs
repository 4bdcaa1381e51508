//! Errors of training-side operations.

use std::path::PathBuf;

/// What can go wrong while scoring or training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data record is malformed.
    #[error("{path}:{line}: {message}")]
    Record {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(transparent)]
    Model(#[from] resonance_models::ModelError),
    #[error("{0}")]
    Input(String),
    /// Writing or reading a checkpoint, adapter or exported model failed.
    #[error("{0}")]
    Checkpoint(String),
}

/// Shorthand result type of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
