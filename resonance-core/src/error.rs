//! The error type of `resonance-core`.
//!
//! Every variant names the file (or template) it is about, and where it makes sense the line,
//! column or field, so that a message shown to a user points at the thing to fix.

use std::fmt;
use std::path::{Path, PathBuf};

/// Everything that can go wrong while loading or applying a tokenizer, a chat template or an
/// image processor.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A file could not be read (missing, unreadable, ...).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A file is not valid JSON.
    #[error("{}:{line}:{column}: invalid JSON: {message}", path.display())]
    Json {
        /// The file that failed to parse.
        path: PathBuf,
        /// 1-based line of the error (0 if unknown).
        line: usize,
        /// 1-based column of the error (0 if unknown).
        column: usize,
        /// What the parser said.
        message: String,
    },

    /// A required field is absent from a configuration file.
    #[error("{}: missing field `{field}`", path.display())]
    MissingField {
        /// The configuration file.
        path: PathBuf,
        /// The field that is missing (dotted path for nested fields).
        field: String,
    },

    /// A field of a configuration file has a value of the wrong type or out of range.
    #[error("{}: field `{field}`: {message}", path.display())]
    InvalidField {
        /// The configuration file.
        path: PathBuf,
        /// The offending field (dotted path for nested fields).
        field: String,
        /// What is wrong with it.
        message: String,
    },

    /// The `tokenizers` library failed to load a tokenizer or to encode/decode with it.
    #[error("{}: tokenizer error: {message}", path.display())]
    Tokenizer {
        /// The `tokenizer.json` the tokenizer was loaded from.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// A chat template failed to compile or to render.
    #[error("chat template {origin}{}: {message}", fmt_line(*line))]
    Template {
        /// Where the template came from, e.g. `dir/tokenizer_config.json (chat_template)`.
        origin: String,
        /// 1-based line in the template source, when known.
        line: Option<usize>,
        /// What went wrong.
        message: String,
    },

    /// A chat template called `raise_exception(message)` (as HF templates do to reject a
    /// conversation, e.g. roles that do not alternate).
    #[error("chat template {origin} raised an exception: {message}")]
    TemplateRaised {
        /// Where the template came from.
        origin: String,
        /// The message the template passed to `raise_exception`.
        message: String,
    },

    /// An image could not be decoded or converted.
    #[error("{}: {message}", path.display())]
    Image {
        /// The image file (or a description such as `<memory>` for in-memory images).
        path: PathBuf,
        /// What went wrong, e.g. `not a decodable image (...)`.
        message: String,
    },

    /// An argument passed by the caller is inconsistent (e.g. image-token counts that do not
    /// match the prompt).
    #[error("{0}")]
    InvalidInput(String),
}

fn fmt_line(line: Option<usize>) -> LineSuffix {
    LineSuffix(line)
}

struct LineSuffix(Option<usize>);

impl fmt::Display for LineSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, ", line {line}"),
            None => Ok(()),
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

impl CoreError {
    /// Builds an [`CoreError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds an [`CoreError::InvalidField`].
    pub fn invalid_field(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        CoreError::InvalidField {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn json(path: &Path, err: &serde_json::Error) -> Self {
        // serde_json appends " at line L column C" to its Display; keep only the message.
        let full = err.to_string();
        let message = match full.rfind(" at line ") {
            Some(pos) => full[..pos].to_string(),
            None => full,
        };
        CoreError::Json {
            path: path.to_path_buf(),
            line: err.line(),
            column: err.column(),
            message,
        }
    }
}

/// Reads a whole text file, naming the file in the error.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))
}

/// Reads and parses a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| CoreError::json(path, &e))
}

/// Reads and parses a JSON file if it exists; `Ok(None)` if it does not.
pub(crate) fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    read_json(path).map(Some)
}

/// Reads a text file if it exists; `Ok(None)` if it does not.
pub(crate) fn read_text_opt(path: &Path) -> Result<Option<String>> {
    if !path.is_file() {
        return Ok(None);
    }
    read_text(path).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_error_names_file_line_and_column() {
        let dir = std::env::temp_dir().join(format!("resonance-core-err-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.json");
        std::fs::write(&path, "{\n  \"a\": 1,\n  \"b\": ,\n}\n").unwrap();
        let err = read_json(&path).unwrap_err();
        match &err {
            CoreError::Json {
                line,
                column,
                message,
                ..
            } => {
                assert_eq!(*line, 3);
                assert_eq!(*column, 8);
                assert!(!message.contains("at line"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let shown = err.to_string();
        assert!(shown.contains("bad.json:3:8: invalid JSON"), "{shown}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn missing_file_is_io_error_naming_the_path() {
        let err = read_json(Path::new("/nonexistent/dir/config.json")).unwrap_err();
        assert!(matches!(err, CoreError::Io { .. }));
        assert!(err
            .to_string()
            .starts_with("/nonexistent/dir/config.json: "));
        assert_eq!(
            read_json_opt(Path::new("/nonexistent/x.json")).unwrap(),
            None
        );
    }

    #[test]
    fn template_error_display_includes_line() {
        let e = CoreError::Template {
            origin: "t.jinja".into(),
            line: Some(4),
            message: "boom".into(),
        };
        assert_eq!(e.to_string(), "chat template t.jinja, line 4: boom");
        let e = CoreError::Template {
            origin: "t.jinja".into(),
            line: None,
            message: "boom".into(),
        };
        assert_eq!(e.to_string(), "chat template t.jinja: boom");
    }
}
