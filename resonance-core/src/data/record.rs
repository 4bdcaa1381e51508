//! The normalised record type every dataset format is converted into.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Who speaks a turn of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A system prompt; only allowed before the first user turn.
    System,
    /// The human / user side; its tokens are never trained on in SFT.
    User,
    /// The model side; the SFT loss is computed on these turns only.
    Assistant,
}

impl Role {
    /// The name used by chat templates (`"system"`, `"user"`, `"assistant"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One piece of a message: an image slot or a run of text.
///
/// Image parts carry no path: the `k`-th image part of a [`Conversation`] (counting across all
/// messages, in order) stands for `Conversation::images[k]`. This is the shape of HF chat
/// templates' `{"type": "image"}` content items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "text", rename_all = "snake_case")]
pub enum Part {
    /// The next image of the conversation goes here.
    Image,
    /// Plain text.
    Text(String),
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// Text and image slots in order.
    pub content: Vec<Part>,
}

impl Message {
    /// A message made of a single text part.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: vec![Part::Text(text.into())],
        }
    }

    /// The number of image parts in this message.
    pub fn num_images(&self) -> usize {
        self.content
            .iter()
            .filter(|p| matches!(p, Part::Image))
            .count()
    }

    /// The concatenated text parts (image parts are skipped).
    pub fn text_content(&self) -> String {
        let mut out = String::new();
        for part in &self.content {
            if let Part::Text(t) = part {
                out.push_str(t);
            }
        }
        out
    }
}

/// Where a record came from: the data file and the 1-based line its record starts on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordSource {
    /// The data file (shared by all records of the file).
    pub file: Arc<Path>,
    /// 1-based line: the JSONL line, or the line on which the record's `{` stands in a JSON array.
    pub line: usize,
}

impl RecordSource {
    /// A source at `line` of `file`.
    pub fn new(file: impl Into<Arc<Path>>, line: usize) -> Self {
        RecordSource {
            file: file.into(),
            line,
        }
    }
}

impl fmt::Display for RecordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A supervised fine-tuning example in normalised form, whatever format it was read from.
///
/// Invariants (checked by the loaders): the number of [`Part::Image`] parts equals
/// `images.len()`; at most one system message, and only first; the first non-system message is a
/// user message; user and assistant turns alternate; at least one assistant turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// The record's `id`, when the format has one.
    pub id: Option<String>,
    /// Image files in the order of the image parts, relative paths already joined to the image
    /// root.
    pub images: Vec<PathBuf>,
    /// The turns.
    pub messages: Vec<Message>,
    /// Preference records: the rejected answer to the last user turn (the chosen one is the
    /// final assistant message).
    pub rejected: Option<String>,
    /// Ranked lists: the answers ranked below `rejected`, best first (empty for pairs).
    pub ranked_below: Vec<String>,
    /// Precomputed reference log-probs `[chosen, rejected]` of a preference pair (the dataset's
    /// `ref_chosen_logps` / `ref_rejected_logps`), used instead of a reference model.
    pub reference_logps: Option<[f64; 2]>,
    /// Unpaired preference records (KTO): whether the final answer is desirable.
    pub label: Option<bool>,
    /// File and line the record was read from.
    pub source: RecordSource,
}

impl Conversation {
    /// The number of image parts over all messages.
    pub fn num_image_parts(&self) -> usize {
        self.messages.iter().map(Message::num_images).sum()
    }

    /// The number of assistant turns (the turns an SFT loss is computed on).
    pub fn num_assistant_turns(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count()
    }
}
