//! Checkpoint key layout of decoder-only models (`model.*`, `lm_head.*`).

use std::path::Path;

use burn::tensor::{DType, Device};

use super::config::TextConfig;
use super::model::CausalLm;
use crate::error::Result;
use crate::load::{has_value_head, load_weights, read_config, KeyMap, DEFAULT_INITIALIZER_RANGE};

/// Key map of `*ForCausalLM` checkpoints; they already use the module's names.
pub fn causal_lm_key_map(config: &TextConfig) -> KeyMap {
    let mut ignore_unused = vec![r"rotary_emb\.inv_freq$".to_string()];
    if config.tie_word_embeddings {
        ignore_unused.push(r"^lm_head\.weight$".to_string());
    }
    KeyMap {
        renames: Vec::new(),
        ignore_unused,
        allow_missing: Vec::new(),
    }
}

/// Loads a decoder-only checkpoint directory onto `device`.
pub fn load_causal_lm(dir: &Path, device: &Device) -> Result<(CausalLm, TextConfig)> {
    let value = read_config(dir)?;
    let config = TextConfig::from_value(&value, &dir.join("config.json"))?;
    let mut model = CausalLm::new(&config, device);
    let mut keys = causal_lm_key_map(&config);
    if has_value_head(dir)? {
        // A reward model (`*ForSequenceClassification`): transformers saves no `lm_head`.
        model.attach_value_head(DEFAULT_INITIALIZER_RANGE, device);
        keys.allow_missing.push(r"^lm_head\.".to_string());
    }
    load_weights(&mut model, dir, &keys, DType::F32)?;
    Ok((model, config))
}
