//! Errors of the dataset loaders.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// Why a record was rejected. Used both in [`DataError::Record`] and as the key of the skip
/// counts of a [`LoadReport`](super::LoadReport).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordErrorKind {
    /// A JSONL line is not valid JSON.
    MalformedJson,
    /// A field is missing or has the wrong type / shape.
    InvalidField,
    /// A `from` / `role` value the format does not know.
    UnknownRole,
    /// The turns do not alternate user / assistant, or there is no assistant turn.
    RoleOrder,
    /// The number of image placeholders differs from the number of images.
    ImageCount,
    /// An image file does not exist.
    MissingImage,
    /// A record with ratings (`vlfeedback_paired`) from which no preference pair can be formed
    /// (fewer than two completions with numeric ratings, all scored ones tie, or no score gap
    /// reaches `score_margin`). Such records are skipped and counted under any `on_error`.
    NoPair,
}

impl RecordErrorKind {
    /// A short snake_case name, as used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordErrorKind::MalformedJson => "malformed_json",
            RecordErrorKind::InvalidField => "invalid_field",
            RecordErrorKind::UnknownRole => "unknown_role",
            RecordErrorKind::RoleOrder => "role_order",
            RecordErrorKind::ImageCount => "image_count",
            RecordErrorKind::MissingImage => "missing_image",
            RecordErrorKind::NoPair => "no_pair",
        }
    }
}

impl fmt::Display for RecordErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong while loading a dataset or building a sampler.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The data file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The data file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The file as a whole is not usable: a JSON array with a syntax error (a JSON array cannot
    /// be resynchronised, so this is fatal even under `on_error = "skip"`), or a file that is
    /// neither a JSON array nor JSON lines.
    #[error("{}:{line}:{column}: {message}", path.display())]
    File {
        /// The data file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },

    /// One record is bad. Displayed as `file:line[:column]: field `f`: message`.
    #[error("{}:{line}{}: {}{message}", path.display(), Col(*column), Field(field.as_deref()))]
    Record {
        /// The data file.
        path: PathBuf,
        /// 1-based line where the record starts (JSONL: its line; JSON array: the line of its `{`;
        /// for malformed JSON, the line of the syntax error).
        line: usize,
        /// 1-based column of a syntax error, when known.
        column: Option<usize>,
        /// The field at fault, as a path into the record (`conversations[2].from`).
        field: Option<String>,
        /// The category, used for skip counts.
        kind: RecordErrorKind,
        /// What is wrong.
        message: String,
    },

    /// A Parquet file that cannot be read (not Parquet, an unsupported compression or encoding,
    /// a corrupt page). `row` is the 1-based row being read when the reader failed, if any.
    #[error("{}{}: Parquet: {message}", path.display(), Col(*row))]
    Parquet {
        /// The data file.
        path: PathBuf,
        /// 1-based row.
        row: Option<usize>,
        /// What the Parquet reader reported.
        message: String,
    },

    /// An image embedded in a Parquet row (HF `Image` column, `{bytes, path}`) could not be
    /// written to the image cache.
    #[error(
        "{}:{row}: field `{field}`: cannot write the embedded image to the cache directory {}: \
         {source}",
        path.display(),
        cache_dir.display()
    )]
    ImageCache {
        /// The data file.
        path: PathBuf,
        /// 1-based row.
        row: usize,
        /// The column holding the image (`image`, `images[1]`).
        field: String,
        /// The image cache directory.
        cache_dir: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Mixing / sampler configuration is inconsistent (e.g. an empty dataset, a non-positive
    /// weight).
    #[error("mixture: {0}")]
    Mixture(String),
}

impl DataError {
    /// The record error kind, for [`DataError::Record`].
    pub fn kind(&self) -> Option<RecordErrorKind> {
        match self {
            DataError::Record { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

struct Col(Option<usize>);

impl fmt::Display for Col {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(c) => write!(f, ":{c}"),
            None => Ok(()),
        }
    }
}

struct Field<'a>(Option<&'a str>);

impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(name) => write!(f, "field `{name}`: "),
            None => Ok(()),
        }
    }
}
