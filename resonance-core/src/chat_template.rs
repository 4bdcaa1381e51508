//! Chat templates: the model's own Jinja template, rendered with minijinja the way transformers
//! renders it.
//!
//! The environment mirrors transformers' `_compile_jinja_template`:
//! `trim_blocks = true`, `lstrip_blocks = true`, no trailing newline kept, the `loopcontrols`
//! extension (`break`/`continue`), Python string/dict/list methods (`.strip()`, `.split()`,
//! `.items()`, `.get()`, ... via minijinja-contrib's `pycompat`), and HF's extras:
//! `raise_exception(msg)`, `strftime_now(fmt)` and a `tojson` filter with `json.dumps`
//! semantics (`ensure_ascii=False`, optional `indent`, `separators`, `sort_keys`; first positional
//! argument is `ensure_ascii`, as in HF). `{{ value }}` prints values as Python's `str()` would
//! (`None`, `True`, `1e-05`, `['a', 'b']`, ...).
//!
//! The context matches `apply_chat_template`: `messages` (with `None`-valued keys dropped and the
//! reasoning aliases `reasoning_content`/`thinking` filled in, as transformers 5 does), `tools`
//! and `documents` (none unless given in the extra context), `add_generation_prompt`, and the
//! special tokens that are set (`bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`,
//! `cls_token`, `mask_token`). Extra context entries override special tokens.
//!
//! Differences from transformers, documented rather than hidden:
//! * `strftime_now` formats the current time in UTC (transformers uses local time; the two agree
//!   on machines running in UTC).
//! * `{% generation %}...{% endgeneration %}` (assistant-mask markers) render their body, as in
//!   transformers, but no assistant mask is produced.
//! * `continue_final_message` is not implemented.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, Value};
use serde_json::Value as Json;

use crate::error::{read_json_opt, read_text_opt, CoreError, Result};
use crate::pyfmt::{self, JsonOptions};
use crate::tokenizer::SpecialTokens;

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template plus the special tokens it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    origin: String,
    source: String,
    special_tokens: SpecialTokens,
    env: Arc<Environment<'static>>,
}

/// The error a template's `raise_exception(...)` produces, recognised after rendering.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

impl ChatTemplate {
    /// Finds the chat template of the checkpoint in `dir`, looking in this order:
    /// `chat_template.jinja`, `chat_template.json` (`{"chat_template": "..."}`),
    /// `processor_config.json` (`chat_template`), `tokenizer_config.json` (`chat_template`, a
    /// string or a list of `{"name", "template"}` from which `"default"` is taken).
    /// Processor-level files come first because for vision-language models they hold the
    /// multimodal template. Returns `Ok(None)` when none of them has a template.
    ///
    /// The special tokens are read from `tokenizer_config.json` / `special_tokens_map.json`
    /// (see [`SpecialTokens::from_dir`]).
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let special = SpecialTokens::from_dir(dir)?;

        let jinja = dir.join("chat_template.jinja");
        if let Some(text) = read_text_opt(&jinja)? {
            return Self::from_source(jinja.display().to_string(), text, special).map(Some);
        }

        let json_path = dir.join("chat_template.json");
        if let Some(v) = read_json_opt(&json_path)? {
            let t = match v.get("chat_template") {
                Some(Json::String(s)) => s.clone(),
                Some(other) => {
                    return Err(CoreError::invalid_field(
                        &json_path,
                        "chat_template",
                        format!("expected a string, got {}", kind_name(other)),
                    ))
                }
                None => {
                    return Err(CoreError::MissingField {
                        path: json_path,
                        field: "chat_template".into(),
                    })
                }
            };
            return Self::from_source(json_path.display().to_string(), t, special).map(Some);
        }

        for file in ["processor_config.json", "tokenizer_config.json"] {
            let path = dir.join(file);
            let Some(cfg) = read_json_opt(&path)? else {
                continue;
            };
            let Some(field) = cfg.get("chat_template") else {
                continue;
            };
            let origin = format!("{} (chat_template)", path.display());
            match field {
                Json::Null => continue,
                Json::String(s) => return Self::from_source(origin, s.clone(), special).map(Some),
                Json::Array(list) => {
                    let mut default = None;
                    for (i, entry) in list.iter().enumerate() {
                        let name = entry.get("name").and_then(Json::as_str);
                        let template = entry.get("template").and_then(Json::as_str);
                        match (name, template) {
                            (Some("default"), Some(t)) => default = Some(t.to_string()),
                            (Some(_), Some(_)) => {}
                            _ => {
                                return Err(CoreError::invalid_field(
                                    &path,
                                    format!("chat_template[{i}]"),
                                    "expected an object with string fields `name` and `template`",
                                ))
                            }
                        }
                    }
                    let Some(t) = default else {
                        return Err(CoreError::invalid_field(
                            &path,
                            "chat_template",
                            "several named templates but none is called \"default\"",
                        ));
                    };
                    let origin = format!("{} (chat_template \"default\")", path.display());
                    return Self::from_source(origin, t, special).map(Some);
                }
                other => {
                    return Err(CoreError::invalid_field(
                        &path,
                        "chat_template",
                        format!("expected a string or a list, got {}", kind_name(other)),
                    ))
                }
            }
        }
        Ok(None)
    }

    /// Compiles a template from its source text. `origin` names it in errors (a path, or any
    /// label). Syntax errors are reported here, with the line.
    pub fn from_source(
        origin: impl Into<String>,
        source: impl Into<String>,
        special_tokens: SpecialTokens,
    ) -> Result<Self> {
        let origin = origin.into();
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        let prepared = rewrite_generation_tags(&source);
        env.add_template_owned(TEMPLATE_NAME, prepared)
            .map_err(|e| template_error(&origin, &e))?;
        Ok(ChatTemplate {
            origin,
            source,
            special_tokens,
            env: Arc::new(env),
        })
    }

    /// Replaces the special tokens the template is rendered with.
    pub fn with_special_tokens(mut self, special_tokens: SpecialTokens) -> Self {
        self.special_tokens = special_tokens;
        self
    }

    /// The special tokens passed to the template.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// The template source, as read.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (used in error messages).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders a conversation.
    ///
    /// `messages` must be a JSON array of message objects (`{"role": ..., "content": ...}`;
    /// content may be a string or a list of parts such as `{"type": "image"}` /
    /// `{"type": "text", "text": ...}`). `extra_context`, if given, must be a JSON object whose
    /// entries are added to the template context (e.g. `tools`, `documents`, `date_string`,
    /// `enable_thinking`); it may override special tokens but not `messages` or
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        extra_context: Option<&Json>,
    ) -> Result<String> {
        let messages = prepare_messages(messages)?;
        let mut ctx = serde_json::Map::new();
        for (name, token) in self.special_tokens.iter() {
            ctx.insert(name.to_string(), Json::String(token.to_string()));
        }
        ctx.insert("messages".into(), messages);
        ctx.insert("tools".into(), Json::Null);
        ctx.insert("documents".into(), Json::Null);
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        match extra_context {
            None | Some(Json::Null) => {}
            Some(Json::Object(extra)) => {
                for (k, v) in extra {
                    if k == "messages" || k == "add_generation_prompt" {
                        return Err(CoreError::InvalidInput(format!(
                            "extra chat-template context may not set `{k}`; pass it as an argument"
                        )));
                    }
                    ctx.insert(k.clone(), v.clone());
                }
            }
            Some(other) => {
                return Err(CoreError::InvalidInput(format!(
                    "extra chat-template context must be a JSON object, got {}",
                    kind_name(other)
                )))
            }
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_error(&self.origin, &e))?;
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| match raised_message(&e) {
                Some(message) => CoreError::TemplateRaised {
                    origin: self.origin.clone(),
                    message,
                },
                None => template_error(&self.origin, &e),
            })
    }
}

fn kind_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

fn template_error(origin: &str, e: &Error) -> CoreError {
    let mut message = e.kind().to_string();
    if let Some(detail) = e.detail() {
        message.push_str(": ");
        message.push_str(detail);
    }
    CoreError::Template {
        origin: origin.to_string(),
        line: e.line(),
        message,
    }
}

fn raised_message(e: &Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(raised) = err.downcast_ref::<RaisedException>() {
            return Some(raised.0.clone());
        }
        cur = err.source();
    }
    None
}

/// HF's message normalisation: drop keys whose value is `None`, and alias reasoning fields
/// (`{"thinking": r, **message, "reasoning_content": r}` where `r` is the first non-null of
/// `reasoning_content`, `thinking`, `reasoning`).
fn prepare_messages(messages: &Json) -> Result<Json> {
    let Json::Array(list) = messages else {
        return Err(CoreError::InvalidInput(format!(
            "chat messages must be a JSON list of message objects, got {}",
            kind_name(messages)
        )));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Json::Object(map) = m else {
            return Err(CoreError::InvalidInput(format!(
                "chat message {i} must be a JSON object, got {}",
                kind_name(m)
            )));
        };
        let cleaned: serde_json::Map<String, Json> = map
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let reasoning = ["reasoning_content", "thinking", "reasoning"]
            .iter()
            .find_map(|k| cleaned.get(*k).cloned());
        let msg = match reasoning {
            Some(r) => {
                let mut aliased = serde_json::Map::new();
                aliased.insert("thinking".into(), r.clone());
                for (k, v) in cleaned {
                    aliased.insert(k, v);
                }
                aliased.insert("reasoning_content".into(), r);
                aliased
            }
            None => cleaned,
        };
        out.push(Json::Object(msg));
    }
    Ok(Json::Array(out))
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (transformers' assistant-mask extension,
/// unknown to minijinja) into `{% if true %}` / `{% endif %}`, which render the body and keep
/// the same whitespace-control behaviour.
fn rewrite_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &inner[inner.len() - 1..]),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(lead);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(trail);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `{{ value }}` output as Python's `str()` renders it.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &State,
    value: &Value,
) -> std::result::Result<(), Error> {
    match value.kind() {
        ValueKind::String | ValueKind::Undefined => minijinja::escape_formatter(out, state, value),
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            pyfmt::py_str(value, &mut s);
            out.write_str(&s).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// HF's `raise_exception(message)`.
fn raise_exception(message: Value) -> std::result::Result<Value, Error> {
    let text = match message.as_str() {
        Some(s) => s.to_string(),
        None => {
            let mut s = String::new();
            pyfmt::py_str(&message, &mut s);
            s
        }
    };
    Err(Error::new(ErrorKind::InvalidOperation, text.clone()).with_source(RaisedException(text)))
}

/// HF's `strftime_now(format)` (UTC, see the module documentation).
fn strftime_now(format: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    pyfmt::strftime_utc(format, now)
}

/// HF's `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`;
/// positional arguments follow that order, as in HF.
fn tojson_filter(value: &Value, args: Rest<Value>) -> std::result::Result<Value, Error> {
    let mut positional: Vec<Value> = args.0;
    let kwargs = match positional.last() {
        Some(last) if last.is_kwargs() => {
            let kw = positional.pop().unwrap_or_default();
            Kwargs::try_from(kw)?
        }
        _ => Kwargs::from_iter(std::iter::empty::<(String, Value)>()),
    };
    if positional.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 positional arguments",
        ));
    }
    let mut positional = positional.into_iter();
    let (ensure_ascii, indent, separators, sort_keys) = (
        positional.next(),
        positional.next(),
        positional.next(),
        positional.next(),
    );
    let pick =
        |positional: Option<Value>, name: &str| -> std::result::Result<Option<Value>, Error> {
            let kw: Option<Value> = kwargs.get(name)?;
            Ok(kw.or(positional))
        };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match pick(indent, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.kind() {
            ValueKind::String => v.as_str().unwrap_or_default().to_string(),
            ValueKind::Bool => " ".repeat(usize::from(v.is_true())),
            ValueKind::Number => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an integer",
                    )
                })?;
                " ".repeat(n.max(0) as usize)
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        }),
    };
    let mut opts = JsonOptions::new(indent);
    opts.ensure_ascii = ensure_ascii;
    if let Some(seps) = pick(separators, "separators")? {
        if !seps.is_none() && !seps.is_undefined() {
            let parts: Vec<Value> = seps.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    opts.item_separator = a.as_str().unwrap_or_default().to_string();
                    opts.key_separator = b.as_str().unwrap_or_default().to_string();
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
    }
    opts.sort_keys = pick(sort_keys, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    Ok(Value::from(pyfmt::json_dumps(value, &opts)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama_tokens() -> SpecialTokens {
        SpecialTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            unk_token: Some("<unk>".into()),
            ..Default::default()
        }
    }

    /// llava-hf/llava-1.5-7b-hf `chat_template.json` (note the `{% generation %}` tags).
    const LLAVA_15: &str = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

    /// meta-llama/Meta-Llama-3-8B-Instruct `tokenizer_config.json` chat_template.
    const LLAMA_3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    /// Qwen/Qwen2-VL-7B-Instruct chat template (ChatML with image/video parts).
    const QWEN2_VL: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    /// mistralai/Mistral-7B-Instruct-v0.2 chat template.
    const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    fn tmpl(src: &str) -> ChatTemplate {
        ChatTemplate::from_source("test", src, llama_tokens()).unwrap()
    }

    #[test]
    fn llava_15_renders_images_first_and_generation_tags() {
        let msgs = json!([
            {"role": "user", "content": [
                {"type": "text", "text": "What is shown in this image?"},
                {"type": "image"}
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}
        ]);
        let out = tmpl(LLAVA_15).render(&msgs, true, None).unwrap();
        assert_eq!(
            out,
            "USER: <image>\nWhat is shown in this image? ASSISTANT: A cat. USER: And its colour? ASSISTANT:"
        );
    }

    #[test]
    fn llama_3_instruct_exact_output() {
        let msgs = json!([
            {"role": "system", "content": "You are a pirate.  "},
            {"role": "user", "content": "  Who are you?\n"}
        ]);
        let t = ChatTemplate::from_source(
            "llama3",
            LLAMA_3,
            SpecialTokens {
                bos_token: Some("<|begin_of_text|>".into()),
                eos_token: Some("<|eot_id|>".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            t.render(&msgs, true, None).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a pirate.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(
            t.render(&msgs, false, None).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a pirate.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
        );
    }

    #[test]
    fn qwen2_vl_image_parts_and_vision_ids() {
        let msgs = json!([
            {"role": "user", "content": [
                {"type": "image", "image": "file:///a.png"},
                {"type": "text", "text": "Describe."}
            ]},
            {"role": "assistant", "content": "A dog."},
            {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Compare."}]}
        ]);
        let t = tmpl(QWEN2_VL);
        assert_eq!(
            t.render(&msgs, true, None).unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\nA dog.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>Compare.<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_ids = t
            .render(&msgs, false, Some(&json!({"add_vision_id": true})))
            .unwrap();
        assert!(
            with_ids.contains("Picture 1: <|vision_start|>"),
            "{with_ids}"
        );
        assert!(
            with_ids.contains("Picture 2: <|vision_start|>"),
            "{with_ids}"
        );
        assert!(
            with_ids.contains("Video 1: <|vision_start|><|video_pad|>"),
            "{with_ids}"
        );
        assert!(!with_ids.ends_with("assistant\n"));
    }

    #[test]
    fn mistral_alternation_and_raise_exception() {
        let t = tmpl(MISTRAL);
        let ok = json!([
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}
        ]);
        assert_eq!(
            t.render(&ok, false, None).unwrap(),
            "<s>[INST] Hi [/INST]Hello!</s>[INST] Bye [/INST]"
        );
        let bad = json!([
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": "Again"}
        ]);
        match t.render(&bad, false, None).unwrap_err() {
            CoreError::TemplateRaised { origin, message } => {
                assert_eq!(origin, "test");
                assert_eq!(
                    message,
                    "Conversation roles must alternate user/assistant/user/assistant/..."
                );
            }
            other => panic!("expected TemplateRaised, got {other:?}"),
        }
        let system = json!([{"role": "system", "content": "x"}]);
        let err = t.render(&system, false, None).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("raised an exception: Conversation roles must alternate user/assistant/user/assistant/..."),
            "{err}"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_like_hf() {
        // Block tags on their own lines leave no blank lines or indentation behind.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n<u>{{ m.content }}</u>\n    {% endif %}\n{% endfor %}\n";
        let out = tmpl(src)
            .render(
                &json!([{"role": "user", "content": "a"}, {"role": "x", "content": "b"}]),
                false,
                None,
            )
            .unwrap();
        assert_eq!(out, "<u>a</u>\n");
    }

    #[test]
    fn pycompat_methods_loop_controls_and_python_printing() {
        let src = "{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}[{{ m.content.strip().split(' ')[-1].upper() }}|{{ m.content.startswith('  he') }}]{% endfor %}{% for k, v in messages[0].items() %}{{ k }}={{ v|length }};{% endfor %}{{ none }} {{ 1e-5 }} {{ [1, 'a', none] }}";
        let msgs = json!([
            {"role": "user", "content": "  hello world  "},
            {"role": "assistant", "content": "x y z"},
            {"role": "user", "content": "never"}
        ]);
        assert_eq!(
            tmpl(src).render(&msgs, false, None).unwrap(),
            "[WORLD|True][Z|False]role=4;content=15;None 1e-05 [1, 'a', None]"
        );
    }

    #[test]
    fn tojson_follows_python_json_dumps() {
        let src = "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}|{{ {'é': 1} | tojson(ensure_ascii=true) }}|{{ {'b': 1, 'a': [1, 2]} | tojson(separators=(',', ':'), sort_keys=true) }}";
        let tools =
            json!([{"type": "function", "function": {"name": "f", "parameters": {"x": 1.5}}}]);
        let out = tmpl(src)
            .render(&json!([]), false, Some(&json!({"tools": tools})))
            .unwrap();
        assert_eq!(
            out,
            "[{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"x\": 1.5}}}]|{\n  \"type\": \"function\",\n  \"function\": {\n    \"name\": \"f\",\n    \"parameters\": {\n      \"x\": 1.5\n    }\n  }\n}|{\"\\u00e9\": 1}|{\"a\":[1,2],\"b\":1}"
        );
    }

    #[test]
    fn context_has_special_tokens_tools_and_messages_are_normalised() {
        let src = "{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|{{ tools is none }}|{{ messages[0].content is defined }}|{{ messages[0].thinking }}|{{ messages[0] | tojson }}";
        let msgs = json!([{"role": "assistant", "content": null, "reasoning": "hmm"}]);
        let out = tmpl(src).render(&msgs, false, None).unwrap();
        assert_eq!(
            out,
            "<s>|</s>|False|True|False|hmm|{\"thinking\": \"hmm\", \"role\": \"assistant\", \"reasoning\": \"hmm\", \"reasoning_content\": \"hmm\"}"
        );
        // Extra context overrides special tokens.
        let out = tmpl("{{ bos_token }}")
            .render(&json!([]), false, Some(&json!({"bos_token": "<B>"})))
            .unwrap();
        assert_eq!(out, "<B>");
    }

    #[test]
    fn strftime_now_is_available() {
        let out = tmpl("{{ strftime_now('%Y') }}")
            .render(&json!([]), false, None)
            .unwrap();
        assert_eq!(out.len(), 4);
        assert!(out.starts_with("20"), "{out}");
    }

    #[test]
    fn errors_name_origin_and_line() {
        let err = ChatTemplate::from_source(
            "dir/chat_template.jinja",
            "line one\n{% if %}",
            SpecialTokens::default(),
        )
        .unwrap_err();
        match &err {
            CoreError::Template { origin, line, .. } => {
                assert_eq!(origin, "dir/chat_template.jinja");
                assert_eq!(*line, Some(2));
            }
            other => panic!("{other:?}"),
        }
        let t = tmpl("a\nb\n{{ messages[0].content.nope.x }}");
        let err = t
            .render(&json!([{"role": "user", "content": "c"}]), false, None)
            .unwrap_err();
        assert!(
            matches!(err, CoreError::Template { line: Some(3), .. }),
            "{err:?}"
        );

        let err = tmpl("x")
            .render(&json!({"role": "user"}), false, None)
            .unwrap_err();
        assert!(matches!(err, CoreError::InvalidInput(_)));
        let err = tmpl("x")
            .render(&json!([]), false, Some(&json!({"messages": []})))
            .unwrap_err();
        assert!(matches!(err, CoreError::InvalidInput(_)));
    }

    #[test]
    fn generation_tags_are_rewritten_with_whitespace_control() {
        assert_eq!(
            rewrite_generation_tags(
                "a{%- generation -%}b{% endgeneration %}c{% if x %}{%+endgeneration+%}"
            ),
            "a{%- if true -%}b{% endif %}c{% if x %}{%+ endif +%}"
        );
        assert_eq!(
            rewrite_generation_tags("no tags {{ x }} {% unclosed"),
            "no tags {{ x }} {% unclosed"
        );
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    /// A fresh, empty directory of its own (kept after the test, as its files are small).
    fn temp_dir() -> std::path::PathBuf {
        tempfile::Builder::new()
            .prefix("resonance-core-ct-")
            .tempdir()
            .unwrap()
            .keep()
    }

    #[test]
    fn from_dir_precedence() {
        let d = temp_dir();
        assert!(ChatTemplate::from_dir(&d).unwrap().is_none());
        write(
            &d,
            "tokenizer_config.json",
            r#"{"bos_token": "<s>", "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]}"#,
        );
        let t = ChatTemplate::from_dir(&d).unwrap().unwrap();
        assert_eq!(t.render(&json!([]), false, None).unwrap(), "<s>D");
        assert!(t
            .origin()
            .ends_with("tokenizer_config.json (chat_template \"default\")"));
        write(&d, "processor_config.json", r#"{"chat_template": "P"}"#);
        assert_eq!(ChatTemplate::from_dir(&d).unwrap().unwrap().source(), "P");
        write(&d, "chat_template.json", r#"{"chat_template": "J"}"#);
        assert_eq!(ChatTemplate::from_dir(&d).unwrap().unwrap().source(), "J");
        write(&d, "chat_template.jinja", "K\n");
        let t = ChatTemplate::from_dir(&d).unwrap().unwrap();
        assert_eq!(t.source(), "K\n");
        // keep_trailing_newline = false, as in Jinja2's default.
        assert_eq!(t.render(&json!([]), false, None).unwrap(), "K");

        let bad = temp_dir();
        write(&bad, "chat_template.json", r#"{"template": "x"}"#);
        let err = ChatTemplate::from_dir(&bad).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("chat_template.json: missing field `chat_template`"),
            "{err}"
        );
        let bad = temp_dir();
        write(
            &bad,
            "tokenizer_config.json",
            r#"{"chat_template": [{"name": "x", "template": "y"}]}"#,
        );
        let err = ChatTemplate::from_dir(&bad).unwrap_err();
        assert!(
            err.to_string().contains("none is called \"default\""),
            "{err}"
        );
        let bad = temp_dir();
        write(&bad, "tokenizer_config.json", "{\"chat_template\": 3,}");
        assert!(matches!(
            ChatTemplate::from_dir(&bad).unwrap_err(),
            CoreError::Json { line: 1, .. }
        ));
    }
}
