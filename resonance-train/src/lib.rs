//! Training methods, losses and the scoring that preference methods build on.

pub mod adamw;
pub mod bench;
pub mod checkpoint;
pub mod data_check;
pub mod difflib;
pub mod dpo;
pub mod error;
pub mod logprobs;
pub mod losses;
pub mod params;
pub mod reward;
pub mod schedule;
pub mod score;
pub mod sft;
pub mod shards;
pub mod trainer;

pub use error::{Result, TrainError};
