//! Text tokenizer: a Hugging Face `tokenizer.json` plus the configuration files that say which
//! tokens are special and whether BOS/EOS are added.
//!
//! The behaviour follows transformers 5.x `TokenizersBackend` (the class behind
//! `PreTrainedTokenizerFast` / `AutoTokenizer` for checkpoints that ship a `tokenizer.json`):
//!
//! * **Special tokens** (`bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`,
//!   `cls_token`, `mask_token`) come from `tokenizer_config.json`. When that file has no
//!   `added_tokens_decoder` (older checkpoints), `special_tokens_map.json` overrides it, as HF's
//!   legacy loading path does. Values may be plain strings or AddedToken objects
//!   (`{"content": "<s>", ...}`); `null` means "not set". If no pad token is configured, the
//!   `padding.pad_token` of `tokenizer.json` is used.
//! * **`add_special_tokens = true`** applies the post-processor of `tokenizer.json`, as
//!   `tokenizer(text)` does. transformers 5 *ignores* `add_bos_token` / `add_eos_token` of
//!   `tokenizer_config.json` whenever a `tokenizer.json` exists (checked against 5.23), so a
//!   `tokenizer.json` without post-processor adds nothing there. Older Llama/Vicuna-style
//!   checkpoints relied on those flags (transformers 4's `LlamaTokenizerFast` rebuilt the
//!   post-processor from them), so by default ([`ConfigBosEos::WhenNoPostProcessor`]) a
//!   `tokenizer.json` *without* post-processor gets a `[bos] $A [eos]` template built from the
//!   flags, as HF's `update_post_processor` builds it. [`ConfigBosEos::Ignore`] reproduces
//!   transformers 5 exactly. A `tokenizer.json` post-processor is always used as stored.
//! * **Decoding** uses the `tokenizer.json` decoder; `clean_up_tokenization_spaces` from the
//!   config is honoured except for BPE models (transformers 5 skips it there).
//! * **Stop ids**: [`TextTokenizer::eos_token_ids`] is the tokenizer's EOS id followed by the
//!   `eos_token_id` (int or list) of `generation_config.json`, or of `config.json` (top level or
//!   `text_config`) when there is no generation config, without duplicates.
//!
//! Not reproduced: model-specific tokenizer classes of transformers 5 that rebuild the
//! normalizer/pre-tokenizer in Python code instead of using `tokenizer.json` as stored (for
//! common checkpoints the stored pipeline gives the same ids).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{ModelWrapper, Tokenizer};

use crate::error::{read_json_opt, CoreError, Result};

/// The named special tokens of a tokenizer, as HF's `special_tokens_map` exposes them.
///
/// These are the strings a chat template sees as `bos_token`, `eos_token`, ...
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token.
    pub bos_token: Option<String>,
    /// End-of-sequence token.
    pub eos_token: Option<String>,
    /// Unknown token.
    pub unk_token: Option<String>,
    /// Separator token.
    pub sep_token: Option<String>,
    /// Padding token.
    pub pad_token: Option<String>,
    /// Classification token.
    pub cls_token: Option<String>,
    /// Mask token.
    pub mask_token: Option<String>,
}

/// The attribute names of [`SpecialTokens`], in HF's `SPECIAL_TOKENS_ATTRIBUTES` order.
pub const SPECIAL_TOKEN_ATTRIBUTES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl SpecialTokens {
    /// Reads the special tokens of the checkpoint in `dir` from `tokenizer_config.json` and
    /// `special_tokens_map.json` (either may be absent), with HF's precedence (see the module
    /// documentation).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tc_path = dir.join("tokenizer_config.json");
        let stm_path = dir.join("special_tokens_map.json");
        let tc = read_json_opt(&tc_path)?;
        let stm = read_json_opt(&stm_path)?;
        Self::from_configs(tc.as_ref(), &tc_path, stm.as_ref(), &stm_path)
    }

    /// Like [`SpecialTokens::from_dir`] but from already-parsed files; the paths are only used
    /// in error messages.
    pub fn from_configs(
        tokenizer_config: Option<&Value>,
        tokenizer_config_path: &Path,
        special_tokens_map: Option<&Value>,
        special_tokens_map_path: &Path,
    ) -> Result<Self> {
        let mut out = SpecialTokens::default();
        if let Some(tc) = tokenizer_config {
            for name in SPECIAL_TOKEN_ATTRIBUTES {
                if let Some(v) = tc.get(name) {
                    *out.slot_mut(name) = token_string(v, tokenizer_config_path, name)?;
                }
            }
        }
        let legacy = tokenizer_config.is_none_or(|tc| tc.get("added_tokens_decoder").is_none());
        if legacy {
            if let Some(stm) = special_tokens_map {
                for name in SPECIAL_TOKEN_ATTRIBUTES {
                    if let Some(v) = stm.get(name) {
                        *out.slot_mut(name) = token_string(v, special_tokens_map_path, name)?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// The token stored under an attribute name such as `"bos_token"`.
    pub fn get(&self, name: &str) -> Option<&str> {
        match name {
            "bos_token" => self.bos_token.as_deref(),
            "eos_token" => self.eos_token.as_deref(),
            "unk_token" => self.unk_token.as_deref(),
            "sep_token" => self.sep_token.as_deref(),
            "pad_token" => self.pad_token.as_deref(),
            "cls_token" => self.cls_token.as_deref(),
            "mask_token" => self.mask_token.as_deref(),
            _ => None,
        }
    }

    /// The tokens that are set, as `(attribute name, token)` pairs in HF order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> + '_ {
        SPECIAL_TOKEN_ATTRIBUTES
            .iter()
            .filter_map(move |name| self.get(name).map(|t| (*name, t)))
    }

    fn slot_mut(&mut self, name: &str) -> &mut Option<String> {
        match name {
            "bos_token" => &mut self.bos_token,
            "eos_token" => &mut self.eos_token,
            "unk_token" => &mut self.unk_token,
            "sep_token" => &mut self.sep_token,
            "pad_token" => &mut self.pad_token,
            "cls_token" => &mut self.cls_token,
            _ => &mut self.mask_token,
        }
    }
}

/// Parses a special-token value: a string, an AddedToken object `{"content": ...}` or null.
fn token_string(v: &Value, path: &Path, field: &str) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(map) => match map.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(CoreError::invalid_field(
                path,
                format!("{field}.content"),
                "expected the token string in `content`",
            )),
        },
        other => Err(CoreError::invalid_field(
            path,
            field,
            format!("expected a string, an AddedToken object or null, got {other}"),
        )),
    }
}

fn opt_bool(cfg: Option<&Value>, path: &Path, field: &str) -> Result<Option<bool>> {
    match cfg.and_then(|c| c.get(field)) {
        None => Ok(None),
        // `null` counts as present-but-false, as HF's `kwargs.get(..., False)` does.
        Some(Value::Null) => Ok(Some(false)),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(CoreError::invalid_field(
            path,
            field,
            format!("expected a boolean, got {other}"),
        )),
    }
}

/// Parses `eos_token_id`-like fields: an integer, a list of integers, or null.
fn id_list(v: Option<&Value>, path: &Path, field: &str) -> Result<Vec<u32>> {
    let bad = |v: &Value| {
        CoreError::invalid_field(
            path,
            field,
            format!("expected a token id or a list of token ids, got {v}"),
        )
    };
    let one = |v: &Value| -> Result<u32> {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| bad(v))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(other) => Ok(vec![one(other)?]),
    }
}

/// How the `add_bos_token` / `add_eos_token` flags of `tokenizer_config.json` are used (see the
/// module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConfigBosEos {
    /// Build a BOS/EOS template from the flags when `tokenizer.json` has no post-processor
    /// (transformers 4 Llama-family behaviour; what older checkpoints expect).
    #[default]
    WhenNoPostProcessor,
    /// Never use the flags (transformers 5.x behaviour whenever `tokenizer.json` exists).
    Ignore,
}

/// Options for [`TextTokenizer::from_dir_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenizerOptions {
    /// Use of `add_bos_token` / `add_eos_token`.
    pub config_bos_eos: ConfigBosEos,
}

/// A Hugging Face tokenizer (`tokenizer.json`) with its special-token configuration.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    special: SpecialTokens,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    clean_up_tokenization_spaces: bool,
    extra_eos_ids: Vec<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `dir`, plus `tokenizer_config.json`,
    /// `special_tokens_map.json`, `generation_config.json` and `config.json` when present, with
    /// the default [`TokenizerOptions`].
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_with(dir, &TokenizerOptions::default())
    }

    /// Like [`TextTokenizer::from_dir`] with explicit options.
    pub fn from_dir_with(dir: &Path, options: &TokenizerOptions) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(CoreError::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| CoreError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;

        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_json_opt(&tc_path)?;
        let stm_path = dir.join("special_tokens_map.json");
        let stm = read_json_opt(&stm_path)?;
        let mut special =
            SpecialTokens::from_configs(tc.as_ref(), &tc_path, stm.as_ref(), &stm_path)?;
        let pad_configured = tc.as_ref().is_some_and(|c| c.get("pad_token").is_some())
            || special.pad_token.is_some();
        if !pad_configured {
            if let Some(p) = inner.get_padding() {
                special.pad_token = Some(p.pad_token.clone());
            }
        }

        let add_bos_token = opt_bool(tc.as_ref(), &tc_path, "add_bos_token")?;
        let add_eos_token = opt_bool(tc.as_ref(), &tc_path, "add_eos_token")?;
        let clean_up =
            opt_bool(tc.as_ref(), &tc_path, "clean_up_tokenization_spaces")?.unwrap_or(false);
        let clean_up_bpe_anyway = opt_bool(
            tc.as_ref(),
            &tc_path,
            "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
        )?
        .unwrap_or(false);
        let is_bpe = matches!(inner.get_model(), ModelWrapper::BPE(_));
        let clean_up_tokenization_spaces = clean_up && (!is_bpe || clean_up_bpe_anyway);

        // HF `update_post_processor`, for a tokenizer.json without post-processor.
        if options.config_bos_eos == ConfigBosEos::WhenNoPostProcessor
            && inner.get_post_processor().is_none()
            && (add_bos_token == Some(true) || add_eos_token == Some(true))
        {
            let processor = bos_eos_template(
                &inner,
                &path,
                special
                    .bos_token
                    .as_deref()
                    .filter(|_| add_bos_token == Some(true)),
                special
                    .eos_token
                    .as_deref()
                    .filter(|_| add_eos_token == Some(true)),
            )?;
            inner.with_post_processor(Some(processor));
        }

        // Extra stop ids: generation_config.json, else config.json.
        let gc_path = dir.join("generation_config.json");
        let extra_eos_ids = match read_json_opt(&gc_path)? {
            Some(gc) => id_list(gc.get("eos_token_id"), &gc_path, "eos_token_id")?,
            None => {
                let cfg_path = dir.join("config.json");
                match read_json_opt(&cfg_path)? {
                    Some(cfg) => {
                        let top = id_list(cfg.get("eos_token_id"), &cfg_path, "eos_token_id")?;
                        if top.is_empty() {
                            id_list(
                                cfg.get("text_config").and_then(|t| t.get("eos_token_id")),
                                &cfg_path,
                                "text_config.eos_token_id",
                            )?
                        } else {
                            top
                        }
                    }
                    None => Vec::new(),
                }
            }
        };

        Ok(TextTokenizer {
            inner,
            path,
            special,
            add_bos_token,
            add_eos_token,
            clean_up_tokenization_spaces,
            extra_eos_ids,
        })
    }

    fn tok_err(&self, e: impl std::fmt::Display) -> CoreError {
        CoreError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Encodes `text` into token ids. With `add_special_tokens`, the post-processor adds the
    /// model's special tokens (e.g. BOS), as HF's `tokenizer(text)` does; chat-template output
    /// is normally encoded with `add_special_tokens = false`, as `apply_chat_template` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.tok_err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Like [`encode`](Self::encode), also returning each token's byte span in `text`
    /// (special tokens added by the post-processor get an empty span).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<IdsWithOffsets> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.tok_err(e))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Decodes token ids into text, optionally dropping special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.tok_err(e))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// The id of a token (vocabulary or added token), if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The named special tokens (what chat templates see as `bos_token`, ...).
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The BOS token string, if configured.
    pub fn bos_token(&self) -> Option<String> {
        self.special.bos_token.clone()
    }

    /// The EOS token string, if configured.
    pub fn eos_token(&self) -> Option<String> {
        self.special.eos_token.clone()
    }

    /// The padding token string, if configured.
    pub fn pad_token(&self) -> Option<String> {
        self.special.pad_token.clone()
    }

    /// The unknown token string, if configured.
    pub fn unk_token(&self) -> Option<String> {
        self.special.unk_token.clone()
    }

    /// The id of the BOS token, if it is configured and in the vocabulary.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special
            .bos_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    /// The id of the (primary) EOS token of the tokenizer.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special
            .eos_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    /// All ids that end generation: the tokenizer's EOS id, then the `eos_token_id` entries of
    /// `generation_config.json` (or `config.json`), without duplicates.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for id in self
            .eos_token_id()
            .into_iter()
            .chain(self.extra_eos_ids.iter().copied())
        {
            if !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    /// The id of the padding token, if configured and in the vocabulary.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special
            .pad_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    /// The id of the unknown token, if configured and in the vocabulary.
    pub fn unk_token_id(&self) -> Option<u32> {
        self.special
            .unk_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    /// Size of the base vocabulary, without added tokens (HF's `tokenizer.vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(false)
    }

    /// Size of the vocabulary including added tokens (HF's `len(tokenizer)`).
    pub fn vocab_size_with_added_tokens(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `add_bos_token` from `tokenizer_config.json`, if present there.
    pub fn add_bos_token(&self) -> Option<bool> {
        self.add_bos_token
    }

    /// `add_eos_token` from `tokenizer_config.json`, if present there.
    pub fn add_eos_token(&self) -> Option<bool> {
        self.add_eos_token
    }

    /// The `tokenizer.json` this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying `tokenizers` tokenizer (with the post-processor this type installed).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// HF `update_post_processor`: `[bos:0] $A:0 [eos:0]` and the pair variant.
fn bos_eos_template(
    tok: &Tokenizer,
    path: &Path,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<TemplateProcessing> {
    let err = |message: String| CoreError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let id_of = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| err(format!("special token {t:?} is not in the vocabulary")))
    };
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some(b) = bos {
        specials.push((b.to_string(), id_of(b)?));
    }
    if let Some(e) = eos {
        if bos != Some(e) {
            specials.push((e.to_string(), id_of(e)?));
        }
    }
    if let Some(b) = bos {
        single.push(format!("{b}:0"));
        pair.push(format!("{b}:0"));
    }
    single.push("$A:0".to_string());
    pair.push("$A:0".to_string());
    if let Some(e) = eos {
        single.push(format!("{e}:0"));
        pair.push(format!("{e}:0"));
    }
    if let Some(b) = bos {
        pair.push(format!("{b}:1"));
    }
    pair.push("$B:1".to_string());
    if let Some(e) = eos {
        pair.push(format!("{e}:1"));
    }
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(|e| err(format!("cannot build the BOS/EOS template: {e}")))?
        .try_pair(pair)
        .map_err(|e| err(format!("cannot build the BOS/EOS template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| err(format!("cannot build the BOS/EOS template: {e}")))
}

/// Token ids and each token's byte span in the encoded text.
pub type IdsWithOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// HF's `clean_up_tokenization`: removes spaces before punctuation and English contractions.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A small WordLevel tokenizer.json: whitespace pre-tokenizer, a few specials, optional
    /// post-processor.
    pub(crate) fn tiny_tokenizer_json(post_processor: Value) -> Value {
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 3, "content": "<pad>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 4, "content": "<image>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": post_processor,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
            "model": {
                "type": "WordLevel",
                "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4,
                          "hello": 5, "world": 6, ".": 7, "it": 8, "'s": 9, "fine": 10},
                "unk_token": "<unk>"
            }
        })
    }

    pub(crate) fn write_dir(files: &[(&str, Value)]) -> PathBuf {
        // A fresh, empty directory of its own (kept after the test, as its files are small).
        let dir = tempfile::Builder::new()
            .prefix("resonance-core-tok-")
            .tempdir()
            .unwrap()
            .keep();
        for (name, v) in files {
            std::fs::write(dir.join(name), serde_json::to_string_pretty(v).unwrap()).unwrap();
        }
        dir
    }

    fn bos_template() -> Value {
        json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        })
    }

    #[test]
    fn post_processor_of_tokenizer_json_is_applied() {
        let dir = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(bos_template())),
            (
                "tokenizer_config.json",
                json!({"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}, "added_tokens_decoder": {}}),
            ),
        ]);
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![1, 5, 6]);
        assert_eq!(tok.encode("hello world", false).unwrap(), vec![5, 6]);
        assert_eq!(
            tok.encode("hello <image> world", false).unwrap(),
            vec![5, 4, 6]
        );
        assert_eq!(tok.bos_token().as_deref(), Some("<s>"));
        assert_eq!(tok.eos_token().as_deref(), Some("</s>"));
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_id(), Some(2));
        assert_eq!(tok.pad_token_id(), None);
        assert_eq!(tok.vocab_size(), 11);
        assert_eq!(tok.add_bos_token(), None);
    }

    #[test]
    fn add_bos_token_without_post_processor_prepends_bos() {
        let dir = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(Value::Null)),
            (
                "tokenizer_config.json",
                json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true, "add_eos_token": false}),
            ),
        ]);
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![1, 5, 6]);
        assert_eq!(tok.encode("hello world", false).unwrap(), vec![5, 6]);
        assert_eq!(tok.add_bos_token(), Some(true));
    }

    #[test]
    fn stored_post_processor_wins_over_flags_and_ignore_mode_matches_transformers_5() {
        // transformers 5 drops add_bos_token/add_eos_token when tokenizer.json exists.
        let dir = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(bos_template())),
            (
                "tokenizer_config.json",
                json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false, "add_eos_token": true}),
            ),
        ]);
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![1, 5, 6]);

        let dir = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(Value::Null)),
            (
                "tokenizer_config.json",
                json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true, "add_eos_token": true}),
            ),
        ]);
        let v5 = TokenizerOptions {
            config_bos_eos: ConfigBosEos::Ignore,
        };
        let tok = TextTokenizer::from_dir_with(&dir, &v5).unwrap();
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![5, 6]);
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![1, 5, 6, 2]);
    }

    #[test]
    fn no_post_processor_and_no_flags_adds_nothing() {
        let dir = write_dir(&[("tokenizer.json", tiny_tokenizer_json(Value::Null))]);
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![5, 6]);
        assert_eq!(tok.bos_token(), None);
        assert_eq!(tok.eos_token_ids(), Vec::<u32>::new());
    }

    #[test]
    fn special_tokens_map_overrides_only_without_added_tokens_decoder() {
        let legacy = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(Value::Null)),
            ("tokenizer_config.json", json!({"eos_token": "<s>"})),
            (
                "special_tokens_map.json",
                json!({"eos_token": {"content": "</s>"}, "pad_token": "<pad>"}),
            ),
        ]);
        let tok = TextTokenizer::from_dir(&legacy).unwrap();
        assert_eq!(tok.eos_token().as_deref(), Some("</s>"));
        assert_eq!(tok.pad_token_id(), Some(3));

        let modern = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(Value::Null)),
            (
                "tokenizer_config.json",
                json!({"eos_token": "<s>", "added_tokens_decoder": {}}),
            ),
            (
                "special_tokens_map.json",
                json!({"eos_token": "</s>", "pad_token": "<pad>"}),
            ),
        ]);
        let tok = TextTokenizer::from_dir(&modern).unwrap();
        assert_eq!(tok.eos_token().as_deref(), Some("<s>"));
        assert_eq!(tok.pad_token(), None);
    }

    #[test]
    fn eos_ids_merge_generation_config_list() {
        let dir = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(Value::Null)),
            ("tokenizer_config.json", json!({"eos_token": "</s>"})),
            (
                "generation_config.json",
                json!({"eos_token_id": [2, 10, 4]}),
            ),
            ("config.json", json!({"eos_token_id": 7})),
        ]);
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.eos_token_id(), Some(2));
        assert_eq!(tok.eos_token_ids(), vec![2, 10, 4]);

        // Without generation_config.json, config.json (or its text_config) is used.
        let dir = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(Value::Null)),
            ("tokenizer_config.json", json!({"eos_token": "</s>"})),
            ("config.json", json!({"text_config": {"eos_token_id": 7}})),
        ]);
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.eos_token_ids(), vec![2, 7]);
    }

    #[test]
    fn decode_skips_specials_and_cleans_up_when_configured() {
        let dir = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(bos_template())),
            (
                "tokenizer_config.json",
                json!({"bos_token": "<s>", "clean_up_tokenization_spaces": true}),
            ),
        ]);
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        let ids = tok.encode("hello world . it 's fine", true).unwrap();
        assert_eq!(ids, vec![1, 5, 6, 7, 8, 9, 10]);
        // WordLevel is not BPE, so the clean-up applies.
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello world. it's fine");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "<s> hello world. it's fine"
        );
    }

    #[test]
    fn pad_token_falls_back_to_tokenizer_json_padding() {
        let mut tj = tiny_tokenizer_json(Value::Null);
        tj["padding"] = json!({"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": null,
                               "pad_id": 3, "pad_type_id": 0, "pad_token": "<pad>"});
        let dir = write_dir(&[("tokenizer.json", tj)]);
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.pad_token_id(), Some(3));
    }

    #[test]
    fn errors_name_the_file() {
        let dir = write_dir(&[]);
        let err = TextTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, CoreError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("tokenizer.json"));

        let dir = write_dir(&[("tokenizer.json", json!({"model": 3}))]);
        let err = TextTokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, CoreError::Tokenizer { .. }), "{err:?}");
        assert!(err.to_string().contains("tokenizer.json: tokenizer error"));

        let dir = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(Value::Null)),
            ("tokenizer_config.json", json!({"bos_token": 5})),
        ]);
        let err = TextTokenizer::from_dir(&dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("tokenizer_config.json: field `bos_token`"),
            "{err}"
        );

        let dir = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(Value::Null)),
            (
                "tokenizer_config.json",
                json!({"bos_token": "<bos>", "add_bos_token": true}),
            ),
        ]);
        let err = TextTokenizer::from_dir(&dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("\"<bos>\" is not in the vocabulary"),
            "{err}"
        );

        let dir = write_dir(&[
            ("tokenizer.json", tiny_tokenizer_json(Value::Null)),
            ("generation_config.json", json!({"eos_token_id": "x"})),
        ]);
        let err = TextTokenizer::from_dir(&dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("generation_config.json: field `eos_token_id`"),
            "{err}"
        );
    }

    #[test]
    fn clean_up_matches_hf() {
        assert_eq!(
            clean_up_tokenization("it 's a test , is n't it ?"),
            "it's a test, isn't it?"
        );
    }
}
