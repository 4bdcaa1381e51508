//! Checkpoint key layout of LLaVA: llava-hf (transformers 4.x and 5.x) and the original LLaVA
//! repository's names, all mapped onto [`Llava`]'s field paths.

use std::path::Path;

use burn::tensor::{DType, Device};

use super::config::LlavaConfig;
use super::model::Llava;
use crate::error::Result;
use crate::load::{has_value_head, load_weights, read_config, KeyMap, DEFAULT_INITIALIZER_RANGE};

/// The key map from any known LLaVA checkpoint layout to module paths.
pub fn llava_key_map(config: &LlavaConfig) -> KeyMap {
    let rename = |a: &str, b: &str| (a.to_string(), b.to_string());
    let mut ignore_unused = vec![
        r"rotary_emb\.inv_freq$".to_string(),
        r"embeddings\.position_ids$".to_string(),
    ];
    if config.text.tie_word_embeddings {
        ignore_unused.push(r"^language_model\.lm_head\.weight$".to_string());
    }
    KeyMap {
        renames: vec![
            // Original LLaVA repository (`LlavaLlamaForCausalLM`).
            rename(
                r"^model\.mm_projector\.0\.",
                "multi_modal_projector.linear_1.",
            ),
            rename(
                r"^model\.mm_projector\.2\.",
                "multi_modal_projector.linear_2.",
            ),
            rename(r"^model\.mm_projector\.", "multi_modal_projector.linear_1."),
            // transformers ≥ 4.52 in-memory names.
            rename(r"^model\.language_model\.", "language_model.model."),
            rename(r"^model\.vision_tower\.", "vision_tower."),
            rename(r"^vision_tower\.vision_tower\.", "vision_tower."),
            rename(r"^model\.multi_modal_projector\.", "multi_modal_projector."),
            rename(
                r"^model\.(embed_tokens|layers|norm)\.",
                "language_model.model.$1.",
            ),
            rename(r"^lm_head\.", "language_model.lm_head."),
            // A reward model's value head.
            rename(r"^score\.", "language_model.score."),
            // A CLIPVisionTransformer saved without its `vision_model` wrapper.
            rename(
                r"^vision_tower\.(embeddings|encoder|pre_layrnorm|post_layernorm)\.",
                "vision_tower.vision_model.$1.",
            ),
        ],
        ignore_unused,
        // LLaVA never reads the tower's final layernorm; some exports drop it.
        allow_missing: vec![r"^vision_tower\.vision_model\.post_layernorm\.".to_string()],
    }
}

/// Loads a LLaVA checkpoint directory onto `device`.
pub fn load_llava(dir: &Path, device: &Device) -> Result<(Llava, LlavaConfig)> {
    let value = read_config(dir)?;
    let config = LlavaConfig::from_value(&value, &dir.join("config.json"))?;
    let mut model = Llava::new(&config, device)?;
    let mut keys = llava_key_map(&config);
    if has_value_head(dir)? {
        model
            .language_model
            .attach_value_head(DEFAULT_INITIALIZER_RANGE, device);
        keys.allow_missing
            .push(r"^language_model\.lm_head\.".to_string());
    }
    load_weights(&mut model, dir, &keys, DType::F32)?;
    Ok((model, config))
}
