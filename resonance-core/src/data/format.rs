//! The supported dataset formats and their conversion into [`Conversation`]s.
//!
//! Every converter works on one already-parsed JSON record and reports problems as a
//! [`RecordProblem`] naming the field; the loader adds the file and line.
//!
//! # Image placement
//!
//! Image parts are put where the source puts them: at each `<image>` placeholder (LLaVA,
//! `vlquery_json`, string content of the `text` format), at each `<img_path>path<img_path>`
//! span (Instruct-Flamingo), or at each `{"type": "image"}` item (`text` format). Around a
//! placeholder, one newline directly after it and one directly before it are dropped (LLaVA writes
//! `"<image>\nWhat is ...?"`; the model's chat template re-inserts its own separator), and
//! whitespace-only text left between placeholders is dropped. Other text is kept verbatim.
//!
//! If a record has images but no placeholder at all, its images are put, in order, at the start
//! of the first user turn. For reference, LLaVA's own training code (`llava/train/train.py`,
//! `preprocess_multimodal`) does two related things: (1) in every turn that contains `<image>` it
//! removes the placeholder and re-inserts a single `"<image>\n"` at the *start of that turn*, and
//! (2) a record that has an `image` but no `<image>` in any turn gets no image token at all, so
//! the image features are silently dropped by `prepare_inputs_labels_for_multimodal` (it
//! concatenates a zero-length slice of them). We keep placeholders where the data puts them (a
//! chat template that renders images first, like llava-1.5-hf's, moves them anyway) and, instead
//! of dropping images without a placeholder, place them at the start of the first user turn,
//! which is where LLaVA's data puts `<image>` in almost every record.
//!
//! The number of image parts must equal the number of images, else the record is rejected
//! ([`RecordErrorKind::ImageCount`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::RecordErrorKind;
use super::preference;
use super::record::{Message, Part, Role};

/// The placeholder LLaVA-style formats use for an image inside the text.
pub const IMAGE_PLACEHOLDER: &str = "<image>";
/// The delimiter Instruct-Flamingo uses around an inline image path.
pub const FLAMINGO_IMAGE_DELIMITER: &str = "<img_path>";

/// A dataset file format. Serde / config names are snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// LLaVA: `{"id", "image": "a.jpg" | ["a.jpg", ...], "conversations": [{"from":
    /// "human"|"gpt"|"system", "value"}]}` with `<image>` placeholders in the values.
    #[default]
    Llava,
    /// `{"image", "conversations": [{"from": "user"|"assistant", "value"}]}`; `<image>`
    /// placeholders are honoured like in LLaVA.
    VlqueryJson,
    /// Instruct-Flamingo: `{"input", "output"}` with images inline in `input` as
    /// `<img_path>path<img_path>`.
    Flamingo,
    /// OpenAI / TRL conversations: `{"messages": [{"role", "content"}], "images": [...]}`, where
    /// `content` is a string (with optional `<image>` placeholders) or a list of
    /// `{"type": "image"}` / `{"type": "text", "text": ...}` items.
    Text,
    /// Preference pairs: `{"image": "a.png" | [...] (optional; or "images"), "prompt",
    /// "chosen", "rejected"}`; `<image>` placeholders in the prompt are honoured, otherwise the
    /// images open it. Read as a conversation `[user: prompt, assistant: chosen]` with the
    /// rejected answer beside it.
    PlainDpo,
    /// Unpaired preference data (KTO): `{"image" | "images" (optional), "prompt",
    /// "completion", "label": true | false}`; read as `[user: prompt, assistant: completion]`
    /// with the label beside it. TRL's conversational form is accepted too: `prompt` a list of
    /// `{"role", "content"}` messages (system and earlier turns allowed, ending with a user
    /// turn) and `completion` a list holding one assistant message.
    Unpaired,
    /// VLFeedback as published (`MMInstruction/VLFeedback`): `{"id", "prompt", "models",
    /// "completions": [{"annotations": {"Helpfulness": {"Rating", "Rationale"}, "Visual
    /// Faithfulness": {..}, "Ethical Considerations": {..}}, "model", "response"}], "img_path"}`.
    /// The completions are turned into preference pairs as VL-RLHF does (see
    /// [`super::preference`]); one record can give several pairs, selected by the dataset's
    /// `score_margin`.
    VlfeedbackPaired,
    /// RLHF-V as published (`openbmb/RLHF-V-Dataset`): `{"ds_name", "image": {"bytes",
    /// "path"}, "text": "{\"question\": .., \"chosen\": .., \"rejected\": ..}",
    /// "origin_dataset", "origin_split", "idx", "image_path"}`, where `text` is a JSON string.
    Rlhfv,
    /// TRL's conversational preference format: `{"prompt": [messages], "chosen": [assistant
    /// message], "rejected": [assistant message], "images": [...] (optional)}`, messages being
    /// `{"role", "content"}` with `content` as in the `text` format. Multi-turn prompts (with a
    /// system turn) and several images are allowed; without `prompt`, the prompt is the common
    /// leading part of `chosen` and `rejected` (TRL's implicit prompt).
    ConversationalPreference,
    /// Ranked answers for a reward model: `{"image" | "images" (optional), "prompt",
    /// "responses": [best, ..., worst]}` (two or more), or with `"scores": [...]` (one per
    /// response, higher is better; the order is then by score, ties refused); or
    /// Vision-LLM-Alignment's layout `{"id", "image", "conversations": [{"from": "human",
    /// "value": question}, {"from": "gpt", "value": [best, ..., worst]}]}`. Read as
    /// `[user: prompt, assistant: best]`, the second answer as `rejected`, the rest in
    /// `ranked_below`.
    Ranked,
}

impl DataFormat {
    /// The snake_case name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Llava => "llava",
            DataFormat::VlqueryJson => "vlquery_json",
            DataFormat::Flamingo => "flamingo",
            DataFormat::Text => "text",
            DataFormat::PlainDpo => "plain_dpo",
            DataFormat::Unpaired => "unpaired",
            DataFormat::VlfeedbackPaired => "vlfeedback_paired",
            DataFormat::Rlhfv => "rlhfv",
            DataFormat::ConversationalPreference => "conversational_preference",
            DataFormat::Ranked => "ranked",
        }
    }

    /// Every format, in declaration order.
    pub const ALL: [DataFormat; 10] = [
        DataFormat::Llava,
        DataFormat::VlqueryJson,
        DataFormat::Flamingo,
        DataFormat::Text,
        DataFormat::PlainDpo,
        DataFormat::Unpaired,
        DataFormat::VlfeedbackPaired,
        DataFormat::Rlhfv,
        DataFormat::ConversationalPreference,
        DataFormat::Ranked,
    ];

    /// Whether records of this format are preference pairs (a chosen and a rejected answer).
    pub fn is_paired(self) -> bool {
        matches!(
            self,
            DataFormat::PlainDpo
                | DataFormat::VlfeedbackPaired
                | DataFormat::Rlhfv
                | DataFormat::ConversationalPreference
        )
    }

    /// Whether one source record can give several conversations (`vlfeedback_paired`).
    pub fn is_one_to_many(self) -> bool {
        matches!(self, DataFormat::VlfeedbackPaired)
    }
}

impl std::fmt::Display for DataFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A problem with one record, before the file and line are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordProblem {
    /// The category.
    pub kind: RecordErrorKind,
    /// The field at fault (`conversations[1].from`), if any.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl RecordProblem {
    pub(super) fn new(
        kind: RecordErrorKind,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        RecordProblem {
            kind,
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(RecordErrorKind::InvalidField, field, message)
    }
}

/// A converted record: everything of a [`Conversation`](super::Conversation) but its source.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRecord {
    /// The record id, if any.
    pub id: Option<String>,
    /// Resolved image paths.
    pub images: Vec<PathBuf>,
    /// For each image, the field it was read from (for error messages).
    pub image_fields: Vec<String>,
    /// The turns.
    pub messages: Vec<Message>,
    /// The rejected answer of a preference record.
    pub rejected: Option<String>,
    /// The label of an unpaired preference record: `true` when the answer is desirable.
    pub label: Option<bool>,
    /// Ranked lists: the answers ranked below `rejected`, best first.
    pub ranked_below: Vec<String>,
    /// Precomputed reference log-probs `[chosen, rejected]` (TRL's `ref_chosen_logps` /
    /// `ref_rejected_logps` columns).
    pub reference_logps: Option<[f64; 2]>,
}

pub(super) type Res<T> = Result<T, RecordProblem>;

/// Per-dataset options of the conversion (from the dataset's config entry).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParseOptions {
    /// `vlfeedback_paired`: keep the pairs whose score gap is at least this; `-1`: keep, per
    /// record, the pairs with the largest gap. Default `-1` (VL-RLHF's default).
    pub score_margin: f64,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            score_margin: LARGEST_GAP,
        }
    }
}

/// The `score_margin` that selects the largest-gap pairs of each record.
pub const LARGEST_GAP: f64 = -1.0;

/// Converts one JSON record of `format` into a conversation; relative image paths are joined to
/// `image_root`. Does not check that image files exist.
///
/// For a format that can give several conversations per record (`vlfeedback_paired`, see
/// [`DataFormat::is_one_to_many`]), this is the first of [`parse_records`] under the default
/// options.
pub fn parse_record(format: DataFormat, value: &Value, image_root: &Path) -> Res<ParsedRecord> {
    let mut all = parse_records(format, value, image_root, &ParseOptions::default())?;
    if all.is_empty() {
        // parse_records reports a record without a conversation as a problem.
        return Err(RecordProblem {
            kind: RecordErrorKind::NoPair,
            field: None,
            message: "no conversation".into(),
        });
    }
    Ok(all.swap_remove(0))
}

/// Converts one JSON record of `format` into its conversations: one for every format but
/// `vlfeedback_paired`, which gives one per selected preference pair (a record without any is a
/// [`RecordErrorKind::NoPair`] problem, never an empty list).
pub fn parse_records(
    format: DataFormat,
    value: &Value,
    image_root: &Path,
    options: &ParseOptions,
) -> Res<Vec<ParsedRecord>> {
    let obj = value.as_object().ok_or_else(|| RecordProblem {
        kind: RecordErrorKind::InvalidField,
        field: None,
        message: format!("expected a JSON object, found {}", json_type(value)),
    })?;
    let mut recs = match format {
        DataFormat::Llava => vec![parse_from_value(obj, image_root, "image", &LLAVA_ROLES)?],
        DataFormat::VlqueryJson => {
            vec![parse_from_value(obj, image_root, "image", &VLQUERY_ROLES)?]
        }
        DataFormat::Flamingo => vec![parse_flamingo(obj, image_root)?],
        DataFormat::Text => vec![parse_text(obj, image_root)?],
        DataFormat::PlainDpo => vec![parse_plain_dpo(obj, image_root)?],
        DataFormat::Unpaired => vec![parse_unpaired(obj, image_root)?],
        DataFormat::VlfeedbackPaired => {
            preference::parse_vlfeedback(obj, image_root, options.score_margin)?
        }
        DataFormat::Rlhfv => vec![preference::parse_rlhfv(obj, image_root)?],
        DataFormat::ConversationalPreference => {
            vec![preference::parse_conversational(obj, image_root)?]
        }
        DataFormat::Ranked => vec![parse_ranked(obj, image_root)?],
    };
    let id = parse_id(obj)?;
    if matches!(
        format,
        DataFormat::PlainDpo | DataFormat::Rlhfv | DataFormat::ConversationalPreference
    ) {
        let reference_logps = parse_reference_logps(obj)?;
        for rec in &mut recs {
            rec.reference_logps = reference_logps;
        }
    }
    let prompt_is_list = obj.get("prompt").is_some_and(Value::is_array);
    for rec in &mut recs {
        if id.is_some() {
            rec.id.clone_from(&id);
        }
        let last = rec.messages.len().saturating_sub(1);
        let field = |i: usize| role_field(format, i, last, prompt_is_list);
        check_roles(&rec.messages, &field)?;
    }
    Ok(recs)
}

/// TRL's precomputed reference columns, `ref_chosen_logps` and `ref_rejected_logps` (both or
/// neither; finite numbers).
fn parse_reference_logps(obj: &Map<String, Value>) -> Res<Option<[f64; 2]>> {
    let read = |key: &str| -> Res<Option<f64>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| {
                    RecordProblem::invalid(
                        key,
                        format!("expected a finite number, found {}", json_type(v)),
                    )
                }),
        }
    };
    match (read("ref_chosen_logps")?, read("ref_rejected_logps")?) {
        (Some(c), Some(r)) => Ok(Some([c, r])),
        (None, None) => Ok(None),
        (Some(_), None) => Err(RecordProblem::invalid(
            "ref_rejected_logps",
            "missing while ref_chosen_logps is given",
        )),
        (None, Some(_)) => Err(RecordProblem::invalid(
            "ref_chosen_logps",
            "missing while ref_rejected_logps is given",
        )),
    }
}

/// The field holding the role of message `i` (of `last + 1`), for role errors.
fn role_field(format: DataFormat, i: usize, last: usize, prompt_is_list: bool) -> String {
    let pick = |first: &str, second: &str| if i == 0 { first } else { second }.to_string();
    match format {
        DataFormat::Llava | DataFormat::VlqueryJson => format!("conversations[{i}].from"),
        DataFormat::Flamingo => pick("input", "output"),
        DataFormat::PlainDpo => pick("prompt", "chosen"),
        DataFormat::Unpaired if prompt_is_list && i < last => format!("prompt[{i}].role"),
        DataFormat::Unpaired => pick("prompt", "completion"),
        DataFormat::Text => format!("messages[{i}].role"),
        DataFormat::VlfeedbackPaired => pick("prompt", "completions"),
        DataFormat::Rlhfv => pick("text.question", "text.chosen"),
        DataFormat::ConversationalPreference if i < last && prompt_is_list => {
            format!("prompt[{i}].role")
        }
        // Implicit prompt: the prompt messages are the leading ones of `chosen`.
        DataFormat::ConversationalPreference if i < last => format!("chosen[{i}].role"),
        DataFormat::ConversationalPreference => "chosen".to_string(),
        DataFormat::Ranked => pick("prompt", "responses"),
    }
}

pub(super) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_id(obj: &Map<String, Value>) -> Res<Option<String>> {
    match obj.get("id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(RecordProblem::invalid(
            "id",
            format!("expected a string or a number, found {}", json_type(other)),
        )),
    }
}

pub(super) fn get_str<'a>(obj: &'a Map<String, Value>, key: &str, field: &str) -> Res<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        None => Err(RecordProblem::invalid(field, "missing")),
        Some(other) => Err(RecordProblem::invalid(
            field,
            format!("expected a string, found {}", json_type(other)),
        )),
    }
}

pub(super) fn get_array<'a>(obj: &'a Map<String, Value>, key: &str) -> Res<&'a Vec<Value>> {
    match obj.get(key) {
        Some(Value::Array(a)) => Ok(a),
        None => Err(RecordProblem::invalid(key, "missing")),
        Some(other) => Err(RecordProblem::invalid(
            key,
            format!("expected an array, found {}", json_type(other)),
        )),
    }
}

pub(super) fn resolve(image_root: &Path, raw: &str, field: &str) -> Res<PathBuf> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(RecordProblem::invalid(field, "empty image path"));
    }
    if raw.starts_with("http://") || raw.starts_with("https://") {
        return Err(RecordProblem::invalid(
            field,
            format!("remote image `{raw}` is not supported; download it and use a local path"),
        ));
    }
    let p = Path::new(raw);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        image_root.join(p)
    })
}

/// Reads an image field that is absent/null (no image), one image, or an array of images. An
/// image is a path string or an HF `Image` value `{"bytes": null, "path": "a.png"}` (Parquet
/// rows with embedded bytes arrive here already as the path of the cached file, see
/// [`super::parquet`]).
pub(super) fn parse_image_list(
    obj: &Map<String, Value>,
    key: &str,
    image_root: &Path,
) -> Res<(Vec<PathBuf>, Vec<String>)> {
    let mut paths = Vec::new();
    let mut fields = Vec::new();
    match obj.get(key) {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let field = format!("{key}[{i}]");
                paths.push(resolve(image_root, image_path_of(item, &field)?, &field)?);
                fields.push(field);
            }
        }
        Some(one) => {
            paths.push(resolve(image_root, image_path_of(one, key)?, key)?);
            fields.push(key.to_string());
        }
    }
    Ok((paths, fields))
}

/// The path of one image value: a string, or an HF `Image` object whose `bytes` are null.
pub(super) fn image_path_of<'a>(value: &'a Value, field: &str) -> Res<&'a str> {
    match value {
        Value::String(s) => Ok(s),
        Value::Object(o) if o.contains_key("path") || o.contains_key("bytes") => {
            if o.get("bytes").is_some_and(|b| !b.is_null()) {
                return Err(RecordProblem::invalid(
                    format!("{field}.bytes"),
                    "embedded image bytes are only read from Parquet files; give the image as a \
                     path",
                ));
            }
            match o.get("path") {
                Some(Value::String(p)) => Ok(p),
                None | Some(Value::Null) => Err(RecordProblem::invalid(
                    format!("{field}.path"),
                    "the image has neither bytes nor a path",
                )),
                Some(other) => Err(RecordProblem::invalid(
                    format!("{field}.path"),
                    format!("expected a string, found {}", json_type(other)),
                )),
            }
        }
        other => Err(RecordProblem::invalid(
            field,
            format!(
                "expected an image path (or a list of image paths), found {}",
                json_type(other)
            ),
        )),
    }
}

/// Splits `text` at `placeholder` into text and image parts (see the module docs for the
/// whitespace rule).
pub fn split_placeholders(text: &str, placeholder: &str) -> Vec<Part> {
    let pieces: Vec<&str> = text.split(placeholder).collect();
    let mut parts = Vec::with_capacity(pieces.len() * 2);
    let last = pieces.len() - 1;
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            parts.push(Part::Image);
        }
        push_text_between(&mut parts, piece, i > 0, i < last);
    }
    parts
}

/// Pushes a text segment that may have an image before (`after_image`) and/or after
/// (`before_image`) it.
fn push_text_between(parts: &mut Vec<Part>, piece: &str, after_image: bool, before_image: bool) {
    let mut s = piece;
    if after_image {
        s = s
            .strip_prefix("\r\n")
            .or_else(|| s.strip_prefix('\n'))
            .unwrap_or(s);
    }
    if before_image {
        s = s
            .strip_suffix("\r\n")
            .or_else(|| s.strip_suffix('\n'))
            .unwrap_or(s);
    }
    let between_images = after_image || before_image;
    if s.is_empty() || (between_images && s.trim().is_empty()) {
        return;
    }
    parts.push(Part::Text(s.to_string()));
}

pub(super) struct RoleTable {
    /// Field holding the role in each turn.
    key: &'static str,
    /// (name in the data, role)
    names: &'static [(&'static str, Role)],
}

const LLAVA_ROLES: RoleTable = RoleTable {
    key: "from",
    names: &[
        ("human", Role::User),
        ("gpt", Role::Assistant),
        ("system", Role::System),
        ("user", Role::User),
        ("assistant", Role::Assistant),
    ],
};

const VLQUERY_ROLES: RoleTable = RoleTable {
    key: "from",
    names: &[
        ("user", Role::User),
        ("assistant", Role::Assistant),
        ("system", Role::System),
        ("human", Role::User),
        ("gpt", Role::Assistant),
    ],
};

pub(super) const TEXT_ROLES: RoleTable = RoleTable {
    key: "role",
    names: &[
        ("user", Role::User),
        ("assistant", Role::Assistant),
        ("system", Role::System),
    ],
};

pub(super) fn parse_role(table: &RoleTable, name: &str, field: String) -> Res<Role> {
    table
        .names
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, r)| *r)
        .ok_or_else(|| {
            let known: Vec<String> = table.names.iter().map(|(n, _)| format!("`{n}`")).collect();
            RecordProblem::new(
                RecordErrorKind::UnknownRole,
                field,
                format!(
                    "unknown role `{name}` (expected one of {})",
                    known.join(", ")
                ),
            )
        })
}

/// LLaVA and vlquery_json: `conversations: [{from, value}]` with `<image>` placeholders.
fn parse_from_value(
    obj: &Map<String, Value>,
    image_root: &Path,
    image_key: &str,
    roles: &RoleTable,
) -> Res<ParsedRecord> {
    let (images, image_fields) = parse_image_list(obj, image_key, image_root)?;
    let turns = get_array(obj, "conversations")?;
    let mut messages = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let field = format!("conversations[{i}]");
        let t = turn.as_object().ok_or_else(|| {
            RecordProblem::invalid(
                &field,
                format!("expected an object, found {}", json_type(turn)),
            )
        })?;
        let role_name = get_str(t, roles.key, &format!("{field}.{}", roles.key))?;
        let role = parse_role(roles, role_name, format!("{field}.{}", roles.key))?;
        let value = get_str(t, "value", &format!("{field}.value"))?;
        messages.push(Message {
            role,
            content: split_placeholders(value, IMAGE_PLACEHOLDER),
        });
    }
    let mut rec = ParsedRecord {
        id: None,
        images,
        image_fields,
        messages,
        rejected: None,
        label: None,
        ranked_below: Vec::new(),
        reference_logps: None,
    };
    place_images(&mut rec, image_key, IMAGE_PLACEHOLDER)?;
    Ok(rec)
}

/// The answer text of `field`, which may not hold image placeholders.
pub(super) fn get_answer<'a>(obj: &'a Map<String, Value>, field: &str) -> Res<&'a str> {
    let text = get_str(obj, field, field)?;
    if text.contains(IMAGE_PLACEHOLDER) {
        return Err(RecordProblem::invalid(
            field,
            format!("answers cannot hold images (`{IMAGE_PLACEHOLDER}`)"),
        ));
    }
    Ok(text)
}

/// A single-turn preference record: `image` or `images` (optional), `prompt` with optional
/// `<image>` placeholders, and `answer` as the assistant turn.
pub(super) fn prompt_answer_record(
    obj: &Map<String, Value>,
    image_root: &Path,
    answer: &str,
    rejected: Option<String>,
    label: Option<bool>,
) -> Res<ParsedRecord> {
    let image_key = if obj.contains_key("images") && !obj.contains_key("image") {
        "images"
    } else {
        "image"
    };
    let (images, image_fields) = parse_image_list(obj, image_key, image_root)?;
    let prompt = get_str(obj, "prompt", "prompt")?;
    let mut rec = ParsedRecord {
        id: None,
        images,
        image_fields,
        messages: vec![
            Message {
                role: Role::User,
                content: split_placeholders(prompt, IMAGE_PLACEHOLDER),
            },
            Message::text(Role::Assistant, answer),
        ],
        rejected,
        label,
        ranked_below: Vec::new(),
        reference_logps: None,
    };
    place_images(&mut rec, image_key, IMAGE_PLACEHOLDER)?;
    Ok(rec)
}

/// `{image | images, prompt, chosen, rejected}`.
fn parse_plain_dpo(obj: &Map<String, Value>, image_root: &Path) -> Res<ParsedRecord> {
    let chosen = get_answer(obj, "chosen")?;
    let rejected = get_answer(obj, "rejected")?;
    prompt_answer_record(obj, image_root, chosen, Some(rejected.to_string()), None)
}

/// `{image | images, prompt, responses [, scores]}` or Vision-LLM-Alignment's
/// `{image, conversations: [{from: human, value}, {from: gpt, value: [answers]}]}`.
fn parse_ranked(obj: &Map<String, Value>, image_root: &Path) -> Res<ParsedRecord> {
    let text_list = |value: &Value, field: &str| -> Res<Vec<String>> {
        let items = value.as_array().ok_or_else(|| {
            RecordProblem::invalid(
                field,
                format!("expected a list of answers, found {}", json_type(value)),
            )
        })?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let text = item.as_str().ok_or_else(|| {
                RecordProblem::invalid(
                    format!("{field}[{i}]"),
                    format!("expected a string, found {}", json_type(item)),
                )
            })?;
            if text.contains(IMAGE_PLACEHOLDER) {
                return Err(RecordProblem::invalid(
                    format!("{field}[{i}]"),
                    format!("answers cannot hold images (`{IMAGE_PLACEHOLDER}`)"),
                ));
            }
            out.push(text.to_string());
        }
        if out.len() < 2 {
            return Err(RecordProblem::invalid(
                field,
                format!(
                    "a ranked list needs at least two answers, found {}",
                    out.len()
                ),
            ));
        }
        Ok(out)
    };
    let (question, answers) = if let Some(turns) = obj.get("conversations") {
        let turns = turns.as_array().filter(|t| t.len() == 2).ok_or_else(|| {
            RecordProblem::invalid(
                "conversations",
                "expected [{\"from\": \"human\", ...}, {\"from\": \"gpt\", \"value\": [answers]}]",
            )
        })?;
        let question = turns[0]
            .get("value")
            .and_then(Value::as_str)
            .ok_or_else(|| RecordProblem::invalid("conversations[0].value", "expected a string"))?;
        let value = turns[1]
            .get("value")
            .ok_or_else(|| RecordProblem::invalid("conversations[1].value", "missing"))?;
        let answers = text_list(value, "conversations[1].value")?;
        (question.to_string(), answers)
    } else {
        let value = obj
            .get("responses")
            .ok_or_else(|| RecordProblem::invalid("responses", "missing"))?;
        let mut answers = text_list(value, "responses")?;
        if let Some(scores) = obj.get("scores") {
            let scores: Vec<f64> = scores
                .as_array()
                .map(|s| s.iter().filter_map(Value::as_f64).collect())
                .filter(|s: &Vec<f64>| s.len() == answers.len() && s.iter().all(|v| v.is_finite()))
                .ok_or_else(|| {
                    RecordProblem::invalid(
                        "scores",
                        format!(
                            "expected {} finite numbers, one per response",
                            answers.len()
                        ),
                    )
                })?;
            let mut order: Vec<usize> = (0..answers.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            if order.windows(2).any(|w| scores[w[0]] == scores[w[1]]) {
                return Err(RecordProblem::invalid(
                    "scores",
                    "two responses have the same score; a ranking needs distinct scores",
                ));
            }
            answers = order.into_iter().map(|i| answers[i].clone()).collect();
        }
        let prompt = get_str(obj, "prompt", "prompt")?;
        (prompt.to_string(), answers)
    };
    let mut prompt_obj = obj.clone();
    prompt_obj.insert("prompt".into(), Value::String(question));
    let mut rest = answers.into_iter();
    let best = rest.next().unwrap_or_default();
    let second = rest.next();
    let mut rec = prompt_answer_record(&prompt_obj, image_root, &best, second, None)?;
    rec.ranked_below = rest.collect();
    Ok(rec)
}

/// `{image | images, prompt, completion, label}`.
fn parse_unpaired(obj: &Map<String, Value>, image_root: &Path) -> Res<ParsedRecord> {
    let conversational = ["prompt", "completion"]
        .iter()
        .any(|k| obj.get(*k).is_some_and(Value::is_array));
    if conversational {
        let label = parse_label(obj)?;
        return preference::parse_conversational_unpaired(obj, image_root, label);
    }
    let completion = get_answer(obj, "completion")?;
    let label = parse_label(obj)?;
    prompt_answer_record(obj, image_root, completion, None, Some(label))
}

/// The `label` of an unpaired record.
fn parse_label(obj: &Map<String, Value>) -> Res<bool> {
    Ok(match obj.get("label") {
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(RecordProblem::invalid(
                "label",
                format!("expected true or false, found {}", json_type(other)),
            ))
        }
        None => {
            return Err(RecordProblem::invalid(
                "label",
                "missing (true for a desirable completion, false for an undesirable one)",
            ))
        }
    })
}

/// Instruct-Flamingo: `{input, output}`, images inline in `input` as `<img_path>p<img_path>`.
fn parse_flamingo(obj: &Map<String, Value>, image_root: &Path) -> Res<ParsedRecord> {
    let input = get_str(obj, "input", "input")?;
    let output = get_str(obj, "output", "output")?;
    let mut images = Vec::new();
    let mut image_fields = Vec::new();
    let mut user = Vec::new();
    let pieces: Vec<&str> = input.split(FLAMINGO_IMAGE_DELIMITER).collect();
    if pieces.len().is_multiple_of(2) {
        return Err(RecordProblem::invalid(
            "input",
            format!(
                "unbalanced `{FLAMINGO_IMAGE_DELIMITER}`: {} delimiters, expected pairs \
                 `{FLAMINGO_IMAGE_DELIMITER}path{FLAMINGO_IMAGE_DELIMITER}`",
                pieces.len() - 1
            ),
        ));
    }
    // pieces alternate text, path, text, path, ..., text
    let n_text = pieces.len().div_ceil(2);
    for (i, piece) in pieces.iter().enumerate() {
        if i % 2 == 1 {
            let k = images.len();
            images.push(resolve(image_root, piece, &format!("input (image {k})"))?);
            image_fields.push(format!("input (image {k})"));
            user.push(Part::Image);
        } else {
            let ti = i / 2;
            push_text_between(&mut user, piece, ti > 0, ti + 1 < n_text);
        }
    }
    if output.contains(FLAMINGO_IMAGE_DELIMITER) {
        return Err(RecordProblem::invalid(
            "output",
            format!("images (`{FLAMINGO_IMAGE_DELIMITER}`) are only supported in `input`"),
        ));
    }
    Ok(ParsedRecord {
        id: None,
        images,
        image_fields,
        messages: vec![
            Message {
                role: Role::User,
                content: user,
            },
            Message::text(Role::Assistant, output),
        ],
        rejected: None,
        label: None,
        ranked_below: Vec::new(),
        reference_logps: None,
    })
}

/// OpenAI / TRL style `{messages: [{role, content}], images}`.
fn parse_text(obj: &Map<String, Value>, image_root: &Path) -> Res<ParsedRecord> {
    let (paths, fields) = parse_image_list(obj, "images", image_root)?;
    let mut images = Images { paths, fields };
    let has_list = obj.get("images").is_some_and(|v| !v.is_null());
    let turns = get_array(obj, "messages")?;
    let mut messages = Vec::with_capacity(turns.len());
    let mut inline = InlineImages::default();
    for (i, turn) in turns.iter().enumerate() {
        let field = format!("messages[{i}]");
        messages.push(parse_message(
            turn,
            &field,
            image_root,
            &mut inline,
            &mut images,
        )?);
    }
    inline.check(has_list)?;
    let mut rec = ParsedRecord {
        id: None,
        images: images.paths,
        image_fields: images.fields,
        messages,
        rejected: None,
        label: None,
        ranked_below: Vec::new(),
        reference_logps: None,
    };
    place_images(&mut rec, "images", IMAGE_PLACEHOLDER)?;
    Ok(rec)
}

/// One `{"role", "content"}` message (`text` format and TRL's conversational formats), at
/// `field` (`messages[2]`); `content` is a string with optional `<image>` placeholders or a list
/// of content items. Inline image paths are added to `images`.
pub(super) fn parse_message(
    turn: &Value,
    field: &str,
    image_root: &Path,
    inline: &mut InlineImages,
    images: &mut Images,
) -> Res<Message> {
    let t = turn.as_object().ok_or_else(|| {
        RecordProblem::invalid(
            field,
            format!("expected an object, found {}", json_type(turn)),
        )
    })?;
    let role_name = get_str(t, "role", &format!("{field}.role"))?;
    let role = parse_role(&TEXT_ROLES, role_name, format!("{field}.role"))?;
    let content = match t.get("content") {
        Some(Value::String(s)) => split_placeholders(s, IMAGE_PLACEHOLDER),
        Some(Value::Array(items)) => parse_content_items(items, field, image_root, inline, images)?,
        None => {
            return Err(RecordProblem::invalid(
                format!("{field}.content"),
                "missing",
            ))
        }
        Some(other) => {
            return Err(RecordProblem::invalid(
                format!("{field}.content"),
                format!(
                    "expected a string or a list of content items, found {}",
                    json_type(other)
                ),
            ))
        }
    };
    Ok(Message { role, content })
}

/// Image parts of `text`-format content lists, with or without an inline path.
#[derive(Default)]
pub(super) struct InlineImages {
    with_path: usize,
    without_path: usize,
}

impl InlineImages {
    /// Rejects a record mixing inline image paths with an `images` list or with path-less image
    /// items.
    pub(super) fn check(&self, has_list: bool) -> Res<()> {
        if self.with_path > 0 && (has_list || self.without_path > 0) {
            return Err(RecordProblem::new(
                RecordErrorKind::ImageCount,
                "images",
                "image paths are given both inline in content items and in the `images` list \
                 (or only some items have one); use one or the other",
            ));
        }
        Ok(())
    }
}

/// Image paths collected so far, with the field each came from.
#[derive(Default)]
pub(super) struct Images {
    pub(super) paths: Vec<PathBuf>,
    pub(super) fields: Vec<String>,
}

/// Parses a `text`-format content list (`[{"type": "image"}, {"type": "text", "text": ..}]`).
pub(super) fn parse_content_items(
    items: &[Value],
    field: &str,
    image_root: &Path,
    inline: &mut InlineImages,
    images: &mut Images,
) -> Res<Vec<Part>> {
    let mut parts = Vec::with_capacity(items.len());
    for (j, item) in items.iter().enumerate() {
        let f = format!("{field}.content[{j}]");
        let it = item.as_object().ok_or_else(|| {
            RecordProblem::invalid(&f, format!("expected an object, found {}", json_type(item)))
        })?;
        match get_str(it, "type", &format!("{f}.type"))? {
            "text" => {
                let text = get_str(it, "text", &format!("{f}.text"))?;
                parts.push(Part::Text(text.to_string()));
            }
            "image" => {
                let path = ["image", "path"]
                    .into_iter()
                    .find_map(|k| it.get(k).map(|v| (k, v)));
                match path {
                    Some((k, Value::String(p))) => {
                        let pf = format!("{f}.{k}");
                        images.paths.push(resolve(image_root, p, &pf)?);
                        images.fields.push(pf);
                        inline.with_path += 1;
                    }
                    Some((_, Value::Null)) | None => inline.without_path += 1,
                    Some((k, other)) => {
                        return Err(RecordProblem::invalid(
                            format!("{f}.{k}"),
                            format!("expected an image path string, found {}", json_type(other)),
                        ))
                    }
                }
                parts.push(Part::Image);
            }
            other => {
                return Err(RecordProblem::invalid(
                    format!("{f}.type"),
                    format!("unknown content type `{other}` (expected `text` or `image`)"),
                ))
            }
        }
    }
    Ok(parts)
}

/// Checks the image-part count against the images; inserts images at the start of the first user
/// turn when the record has no placeholder at all.
pub(super) fn place_images(
    rec: &mut ParsedRecord,
    image_field: &str,
    placeholder: &str,
) -> Res<()> {
    let parts: usize = rec.messages.iter().map(Message::num_images).sum();
    let n = rec.images.len();
    if parts == 0 && n > 0 {
        if let Some(first_user) = rec.messages.iter_mut().find(|m| m.role == Role::User) {
            first_user
                .content
                .splice(0..0, std::iter::repeat_n(Part::Image, n));
            return Ok(());
        }
        // No user turn: the role check reports it.
        return Ok(());
    }
    if parts != n {
        return Err(RecordProblem::new(
            RecordErrorKind::ImageCount,
            image_field,
            format!(
                "{n} image{} but {parts} image placeholder{} (`{placeholder}`) in the turns",
                if n == 1 { "" } else { "s" },
                if parts == 1 { "" } else { "s" },
            ),
        ));
    }
    Ok(())
}

/// Checks the turn structure: an optional system turn first, then user / assistant alternating,
/// starting with user, with at least one assistant turn. A final user turn (without an answer) is
/// allowed.
pub fn check_roles(messages: &[Message], field: &dyn Fn(usize) -> String) -> Res<()> {
    if messages.is_empty() {
        return Err(RecordProblem::new(
            RecordErrorKind::RoleOrder,
            field(0).split('[').next().unwrap_or("messages").to_string(),
            "no turns",
        ));
    }
    let mut expected = Role::User;
    for (i, m) in messages.iter().enumerate() {
        match m.role {
            Role::System if i == 0 => continue,
            Role::System => {
                return Err(RecordProblem::new(
                    RecordErrorKind::RoleOrder,
                    field(i),
                    "a system turn is only allowed as the first turn",
                ))
            }
            role if role != expected => {
                let msg = if expected == Role::User
                    && (i == 0 || (i == 1 && messages[0].role == Role::System))
                {
                    format!("the first non-system turn must be from the user, found {role}")
                } else {
                    format!(
                        "turns must alternate user/assistant: expected {expected}, found {role}"
                    )
                };
                return Err(RecordProblem::new(
                    RecordErrorKind::RoleOrder,
                    field(i),
                    msg,
                ));
            }
            _ => {}
        }
        expected = if expected == Role::User {
            Role::Assistant
        } else {
            Role::User
        };
    }
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        let last = messages.len() - 1;
        return Err(RecordProblem::new(
            RecordErrorKind::RoleOrder,
            field(last),
            "no assistant turn: nothing to train on",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn root() -> PathBuf {
        PathBuf::from("/data/img")
    }

    #[test]
    fn placeholders_split_with_llava_newline_rule() {
        assert_eq!(
            split_placeholders("<image>\nWhat is it?", "<image>"),
            vec![Part::Image, Part::Text("What is it?".into())]
        );
        assert_eq!(
            split_placeholders("What is it?\n<image>", "<image>"),
            vec![Part::Text("What is it?".into()), Part::Image]
        );
        assert_eq!(
            split_placeholders("Compare <image> and <image>.", "<image>"),
            vec![
                Part::Text("Compare ".into()),
                Part::Image,
                Part::Text(" and ".into()),
                Part::Image,
                Part::Text(".".into())
            ]
        );
        assert_eq!(
            split_placeholders("<image>\n<image>\nBoth?", "<image>"),
            vec![Part::Image, Part::Image, Part::Text("Both?".into())]
        );
        assert_eq!(
            split_placeholders("no image\n", "<image>"),
            vec![Part::Text("no image\n".into())]
        );
    }

    #[test]
    fn llava_single_and_multi_image() {
        let v = json!({"id": 7, "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": "A cat."}]});
        let r = parse_record(DataFormat::Llava, &v, &root()).unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(r.images, vec![PathBuf::from("/data/img/a.png")]);
        assert_eq!(r.messages[0].content[0], Part::Image);
        assert_eq!(r.messages[1].role, Role::Assistant);

        let v = json!({"image": ["a.png", "/abs/b.png"], "conversations": [
            {"from": "human", "value": "First <image> then <image>?"},
            {"from": "gpt", "value": "Yes."}]});
        let r = parse_record(DataFormat::Llava, &v, &root()).unwrap();
        assert_eq!(r.images[1], PathBuf::from("/abs/b.png"));
        assert_eq!(r.messages[0].num_images(), 2);
    }

    #[test]
    fn images_without_placeholder_go_to_first_user_turn() {
        let v = json!({"image": "a.png", "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": "What is it?"},
            {"from": "assistant", "value": "A dog."}]});
        let r = parse_record(DataFormat::VlqueryJson, &v, &root()).unwrap();
        assert_eq!(
            r.messages[1].content,
            vec![Part::Image, Part::Text("What is it?".into())]
        );
    }

    #[test]
    fn image_count_mismatch_names_the_field() {
        let v = json!({"image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": "A cat."}]});
        let e = parse_record(DataFormat::Llava, &v, &root()).unwrap_err();
        assert_eq!(e.kind, RecordErrorKind::ImageCount);
        assert_eq!(e.field.as_deref(), Some("image"));
        assert!(
            e.message.contains("2 images but 1 image placeholder"),
            "{}",
            e.message
        );

        let v = json!({"conversations": [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": "A cat."}]});
        let e = parse_record(DataFormat::Llava, &v, &root()).unwrap_err();
        assert_eq!(e.kind, RecordErrorKind::ImageCount);
    }

    #[test]
    fn role_errors() {
        let v = json!({"conversations": [
            {"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]});
        let e = parse_record(DataFormat::Llava, &v, &root()).unwrap_err();
        assert_eq!(e.kind, RecordErrorKind::UnknownRole);
        assert_eq!(e.field.as_deref(), Some("conversations[1].from"));
        assert!(e.message.contains("`bot`"));

        let v = json!({"conversations": [
            {"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]});
        let e = parse_record(DataFormat::Llava, &v, &root()).unwrap_err();
        assert_eq!(e.kind, RecordErrorKind::RoleOrder);
        assert_eq!(e.field.as_deref(), Some("conversations[0].from"));

        let v = json!({"conversations": [
            {"from": "human", "value": "a"}, {"from": "human", "value": "b"},
            {"from": "gpt", "value": "c"}]});
        let e = parse_record(DataFormat::Llava, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("conversations[1].from"));
        assert!(e.message.contains("alternate"));

        let v = json!({"messages": [{"role": "user", "content": "a"}]});
        let e = parse_record(DataFormat::Text, &v, &root()).unwrap_err();
        assert_eq!(e.kind, RecordErrorKind::RoleOrder);
        assert!(e.message.contains("no assistant turn"));

        let v = json!({"messages": [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}]});
        let e = parse_record(DataFormat::Text, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("messages[2].role"));
    }

    #[test]
    fn flamingo_inline_images() {
        let v = json!({"input": "<img_path>a.png<img_path>\nWhat is left of <img_path>sub/b.png<img_path>?",
                       "output": "A tree."});
        let r = parse_record(DataFormat::Flamingo, &v, &root()).unwrap();
        assert_eq!(
            r.images,
            vec![
                PathBuf::from("/data/img/a.png"),
                PathBuf::from("/data/img/sub/b.png")
            ]
        );
        assert_eq!(
            r.messages[0].content,
            vec![
                Part::Image,
                Part::Text("What is left of ".into()),
                Part::Image,
                Part::Text("?".into())
            ]
        );
        let v = json!({"input": "<img_path>a.png", "output": "x"});
        let e = parse_record(DataFormat::Flamingo, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("input"));
        assert!(e.message.contains("unbalanced"));
    }

    #[test]
    fn text_format_parts_and_inline_paths() {
        let v = json!({"images": ["a.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A cat."}]});
        let r = parse_record(DataFormat::Text, &v, &root()).unwrap();
        assert_eq!(r.messages[0].content.len(), 2);
        assert_eq!(r.images.len(), 1);

        let v = json!({"messages": [
            {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]});
        let r = parse_record(DataFormat::Text, &v, &root()).unwrap();
        assert_eq!(r.images, vec![PathBuf::from("/data/img/x.png")]);
        assert_eq!(
            r.image_fields,
            vec!["messages[0].content[0].image".to_string()]
        );

        let v = json!({"messages": [
            {"role": "user", "content": [{"type": "video"}]},
            {"role": "assistant", "content": "b"}]});
        let e = parse_record(DataFormat::Text, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("messages[0].content[0].type"));
    }

    #[test]
    fn wrong_types_name_the_field() {
        let v = json!({"conversations": [{"from": "human", "value": 3}]});
        let e = parse_record(DataFormat::Llava, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("conversations[0].value"));
        assert!(e.message.contains("expected a string, found a number"));
        let v = json!({"image": 5, "conversations": []});
        let e = parse_record(DataFormat::Llava, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("image"));
        let e = parse_record(DataFormat::Llava, &json!([1]), &root()).unwrap_err();
        assert!(e.message.contains("expected a JSON object"));
        let v = json!({"input": "x"});
        let e = parse_record(DataFormat::Flamingo, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("output"));
        assert_eq!(e.message, "missing");
    }
}
