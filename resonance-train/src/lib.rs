//! Training methods, losses and the scoring that preference methods build on.

pub mod error;
pub mod logprobs;
pub mod losses;
pub mod score;

pub use error::{Result, TrainError};
