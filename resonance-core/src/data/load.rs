//! Reading dataset files (JSON arrays, JSON lines and Parquet) into [`Conversation`]s.
//!
//! A source record gives one conversation, except in `vlfeedback_paired`, where it gives one per
//! selected preference pair (each with the record's file and line). A record from which no pair
//! can be formed is skipped and counted under [`RecordErrorKind::NoPair`] whatever the
//! [`OnError`] policy: that is a property of the data, not a defect.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use super::error::{DataError, RecordErrorKind};
use super::format::{parse_records, DataFormat, ParseOptions, RecordProblem, LARGEST_GAP};
use super::parquet;
use super::record::{Conversation, RecordSource};

/// What to do with a bad record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop at the first bad record with an error naming the file, line and field.
    #[default]
    Fail,
    /// Skip bad records, count them per reason in the [`LoadReport`].
    Skip,
}

/// How many skipped records a [`LoadReport`] keeps as examples.
pub const MAX_SKIPPED_EXAMPLES: usize = 5;

/// How to read one dataset file.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// The record format.
    pub format: DataFormat,
    /// Directory relative image paths are joined to; `None`: the directory of the data file.
    pub image_root: Option<PathBuf>,
    /// What to do with bad records.
    pub on_error: OnError,
    /// Check that every image file exists (`true` by default).
    pub check_images: bool,
    /// `vlfeedback_paired`: the minimum score gap of a kept pair, or [`LARGEST_GAP`] (`-1`, the
    /// default) for the largest-gap pairs of each record. Ignored by the other formats.
    pub score_margin: f64,
    /// Where images embedded in Parquet rows are cached; `None`:
    /// [`default_image_cache_dir`](super::parquet::default_image_cache_dir).
    pub image_cache: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            format: DataFormat::default(),
            image_root: None,
            on_error: OnError::default(),
            check_images: true,
            score_margin: LARGEST_GAP,
            image_cache: None,
        }
    }
}

impl LoadOptions {
    /// Options for `format` with the other fields at their defaults.
    pub fn new(format: DataFormat) -> Self {
        LoadOptions {
            format,
            ..Self::default()
        }
    }

    /// Sets the image root.
    pub fn image_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.image_root = Some(root.into());
        self
    }

    /// Sets the bad-record policy.
    pub fn on_error(mut self, on_error: OnError) -> Self {
        self.on_error = on_error;
        self
    }

    /// Enables or disables the image existence check.
    pub fn check_images(mut self, check: bool) -> Self {
        self.check_images = check;
        self
    }

    /// Sets the `vlfeedback_paired` score margin.
    pub fn score_margin(mut self, margin: f64) -> Self {
        self.score_margin = margin;
        self
    }

    /// Sets the directory images embedded in Parquet rows are cached in.
    pub fn image_cache(mut self, dir: impl Into<PathBuf>) -> Self {
        self.image_cache = Some(dir.into());
        self
    }
}

/// One skipped record, kept as an example in the [`LoadReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedRecord {
    /// 1-based line (Parquet: row).
    pub line: usize,
    /// Why it was skipped.
    pub kind: RecordErrorKind,
    /// The full error message (with file, line and field).
    pub message: String,
}

/// What happened while loading one file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    /// The data file.
    pub path: PathBuf,
    /// Source records seen (good and bad): JSON lines / array elements / Parquet rows.
    pub read: usize,
    /// Source records that gave at least one conversation.
    pub loaded: usize,
    /// Conversations produced: `loaded`, except for formats that give several per record
    /// (`vlfeedback_paired`: one per preference pair).
    pub conversations: usize,
    /// Skipped records per reason.
    pub skipped: BTreeMap<RecordErrorKind, usize>,
    /// The first [`MAX_SKIPPED_EXAMPLES`] skipped records.
    pub first_skipped: Vec<SkippedRecord>,
}

impl LoadReport {
    /// The number of skipped records over all reasons.
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }

    fn skip(&mut self, err: &DataError) {
        let (line, kind) = match err {
            DataError::Record { line, kind, .. } => (*line, *kind),
            _ => return,
        };
        *self.skipped.entry(kind).or_insert(0) += 1;
        if self.first_skipped.len() < MAX_SKIPPED_EXAMPLES {
            self.first_skipped.push(SkippedRecord {
                line,
                kind,
                message: err.to_string(),
            });
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} records read, {} loaded",
            self.path.display(),
            self.read,
            self.loaded,
        )?;
        if self.conversations != self.loaded {
            write!(f, " ({} conversations)", self.conversations)?;
        }
        write!(f, ", {} skipped", self.skipped_total())?;
        if !self.skipped.is_empty() {
            let per: Vec<String> = self
                .skipped
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            write!(f, " ({})", per.join(", "))?;
            for s in &self.first_skipped {
                write!(f, "\n  {}", s.message)?;
            }
        }
        Ok(())
    }
}

/// The records of one file, with its load report.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// A display name (the file stem unless set by the caller).
    pub name: String,
    /// The data file.
    pub path: PathBuf,
    /// The records that loaded.
    pub records: Vec<Conversation>,
    /// Counts and skipped examples.
    pub report: LoadReport,
}

impl Dataset {
    /// The number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no record loaded.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Reads a dataset file. A file ending in `.parquet` is read as Parquet (see
/// [`super::parquet`]; its "lines" are 1-based row numbers); otherwise JSON array or JSON lines
/// is decided by the content (first non-blank character `[` or `{`), not the extension.
///
/// Errors: the file cannot be read (or is not readable Parquet), a JSON array has a syntax
/// error (fatal under any policy), the file has no record at all, an embedded image cannot be
/// cached, or (under [`OnError::Fail`]) the first bad record.
pub fn load_dataset(path: &Path, options: &LoadOptions) -> Result<Dataset, DataError> {
    if parquet::is_parquet(path) {
        return load_parquet(path, options);
    }
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_dataset(&text, path, options)
}

/// Like [`load_dataset`] on text already in memory; `path` is used for messages, the default
/// image root and the dataset name.
pub fn parse_dataset(text: &str, path: &Path, options: &LoadOptions) -> Result<Dataset, DataError> {
    let mut ctx = Ctx::new(path, options);
    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    let bom = text.len() - body.len();
    let first = body.char_indices().find(|(_, c)| !c.is_whitespace());
    match first {
        None => {
            return Err(DataError::File {
                path: path.to_path_buf(),
                line: 1,
                column: 1,
                message: "the file contains no records".into(),
            })
        }
        Some((_, '[')) => read_array(text, bom, &mut ctx)?,
        Some((_, '{')) => read_lines(body, &mut ctx)?,
        Some((i, c)) => {
            let (line, column) = line_col(text, bom + i);
            return Err(DataError::File {
                path: path.to_path_buf(),
                line,
                column,
                message: format!(
                    "expected a JSON array (`[`) or JSON lines (one `{{...}}` object per line), \
                     found `{c}`"
                ),
            });
        }
    }
    Ok(ctx.finish(path))
}

/// Reads a Parquet file row by row (see [`super::parquet`]).
fn load_parquet(path: &Path, options: &LoadOptions) -> Result<Dataset, DataError> {
    let mut ctx = Ctx::new(path, options);
    let cache = options
        .image_cache
        .clone()
        .unwrap_or_else(parquet::default_image_cache_dir);
    let rows = parquet::read_rows(path, &cache, |row, value| {
        let outcome = ctx.convert(&value, row);
        ctx.handle(outcome)
    })?;
    if rows == 0 {
        return Err(DataError::Parquet {
            path: path.to_path_buf(),
            row: None,
            message: "the file contains no rows".into(),
        });
    }
    Ok(ctx.finish(path))
}

struct Ctx<'a> {
    file: Arc<Path>,
    options: &'a LoadOptions,
    parse: ParseOptions,
    image_root: PathBuf,
    report: LoadReport,
    records: Vec<Conversation>,
}

impl<'a> Ctx<'a> {
    fn new(path: &Path, options: &'a LoadOptions) -> Self {
        let image_root = match &options.image_root {
            Some(r) => r.clone(),
            None => path.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        Ctx {
            file: Arc::from(path),
            options,
            parse: ParseOptions {
                score_margin: options.score_margin,
            },
            image_root,
            report: LoadReport {
                path: path.to_path_buf(),
                ..LoadReport::default()
            },
            records: Vec::new(),
        }
    }

    fn finish(self, path: &Path) -> Dataset {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Dataset {
            name,
            path: path.to_path_buf(),
            records: self.records,
            report: self.report,
        }
    }

    /// Handles the outcome of one source record according to the policy; records without a
    /// preference pair are skipped under any policy.
    fn handle(&mut self, outcome: Result<Vec<Conversation>, DataError>) -> Result<(), DataError> {
        self.report.read += 1;
        match outcome {
            Ok(c) => {
                self.report.loaded += 1;
                self.report.conversations += c.len();
                self.records.extend(c);
                Ok(())
            }
            Err(e) if e.kind() == Some(RecordErrorKind::NoPair) => {
                self.report.skip(&e);
                Ok(())
            }
            Err(e) => match self.options.on_error {
                OnError::Fail => Err(e),
                OnError::Skip => {
                    self.report.skip(&e);
                    Ok(())
                }
            },
        }
    }

    fn record_error(&self, line: usize, p: RecordProblem) -> DataError {
        DataError::Record {
            path: self.file.to_path_buf(),
            line,
            column: None,
            field: p.field,
            kind: p.kind,
            message: p.message,
        }
    }

    fn convert(&self, value: &Value, line: usize) -> Result<Vec<Conversation>, DataError> {
        let recs = parse_records(self.options.format, value, &self.image_root, &self.parse)
            .map_err(|p| self.record_error(line, p))?;
        let mut out = Vec::with_capacity(recs.len());
        for rec in recs {
            if self.options.check_images {
                for (img, field) in rec.images.iter().zip(&rec.image_fields) {
                    if !img.is_file() {
                        return Err(self.record_error(
                            line,
                            RecordProblem {
                                kind: RecordErrorKind::MissingImage,
                                field: Some(field.clone()),
                                message: format!("image file not found: {}", img.display()),
                            },
                        ));
                    }
                }
            }
            out.push(Conversation {
                id: rec.id,
                images: rec.images,
                messages: rec.messages,
                rejected: rec.rejected,
                ranked_below: rec.ranked_below,
                reference_logps: rec.reference_logps,
                label: rec.label,
                source: RecordSource::new(self.file.clone(), line),
            });
        }
        Ok(out)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

fn read_array(text: &str, bom: usize, ctx: &mut Ctx<'_>) -> Result<(), DataError> {
    let body = &text[bom..];
    let items: Vec<&RawValue> = serde_json::from_str(body).map_err(|e| {
        let (line, column) = (e.line(), e.column());
        let full = e.to_string();
        let message = match full.rfind(" at line ") {
            Some(pos) => full[..pos].to_string(),
            None => full,
        };
        DataError::File {
            path: ctx.file.to_path_buf(),
            line,
            column,
            message: format!("invalid JSON: {message}"),
        }
    })?;
    if items.is_empty() {
        return Err(DataError::File {
            path: ctx.file.to_path_buf(),
            line: 1,
            column: 1,
            message: "the JSON array contains no records".into(),
        });
    }
    // Line numbers from the raw slices' offsets, counted incrementally.
    let base = body.as_ptr() as usize;
    let mut counted_to = 0usize;
    let mut line = 1usize;
    for raw in items {
        let offset = (raw.get().as_ptr() as usize)
            .saturating_sub(base)
            .min(body.len());
        if offset >= counted_to {
            line += body
                .get(counted_to..offset)
                .map_or(0, |s| s.bytes().filter(|b| *b == b'\n').count());
            counted_to = offset;
        }
        let outcome = serde_json::from_str::<Value>(raw.get())
            .map_err(|e| DataError::Record {
                path: ctx.file.to_path_buf(),
                line,
                column: None,
                field: None,
                kind: RecordErrorKind::MalformedJson,
                message: e.to_string(),
            })
            .and_then(|v| ctx.convert(&v, line));
        ctx.handle(outcome)?;
    }
    Ok(())
}

fn read_lines(body: &str, ctx: &mut Ctx<'_>) -> Result<(), DataError> {
    let mut any = false;
    for (i, raw_line) in body.split('\n').enumerate() {
        let line_no = i + 1;
        let l = raw_line.trim();
        if l.is_empty() {
            continue;
        }
        any = true;
        let outcome = match serde_json::from_str::<Value>(l) {
            Ok(v) => ctx.convert(&v, line_no),
            Err(e) => {
                let full = e.to_string();
                let message = match full.rfind(" at line ") {
                    Some(pos) => full[..pos].to_string(),
                    None => full,
                };
                let lead = raw_line.len() - raw_line.trim_start().len();
                Err(DataError::Record {
                    path: ctx.file.to_path_buf(),
                    line: line_no,
                    column: Some(e.column() + raw_line[..lead].chars().count()),
                    field: None,
                    kind: RecordErrorKind::MalformedJson,
                    message: format!("invalid JSON: {message}"),
                })
            }
        };
        ctx.handle(outcome)?;
    }
    if !any {
        return Err(DataError::File {
            path: ctx.file.to_path_buf(),
            line: 1,
            column: 1,
            message: "the file contains no records".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> LoadOptions {
        LoadOptions::new(DataFormat::Llava)
            .image_root("/img")
            .check_images(false)
    }

    const REC: &str = r#"{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}"#;

    #[test]
    fn jsonl_and_array_lines() {
        let text = format!("{REC}\n\n{REC}\n");
        let d = parse_dataset(&text, Path::new("x/train.jsonl"), &opts()).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.name, "train");
        assert_eq!(d.records[1].source.line, 3);

        let text = format!("[\n  {REC},\n\n  {REC}\n]");
        let d = parse_dataset(&text, Path::new("x/train.json"), &opts()).unwrap();
        assert_eq!(d.records[0].source.line, 2);
        assert_eq!(d.records[1].source.line, 4);

        // Pretty-printed records: the line of the opening brace.
        let text = "[{\n \"conversations\": [\n {\"from\": \"human\", \"value\": \"a\"},\n {\"from\": \"gpt\", \"value\": \"b\"}]},\n{\"conversations\": []}]";
        let e = parse_dataset(text, Path::new("p.json"), &opts()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("p.json:5: field `conversations`: no turns"),
            "{e}"
        );
    }

    #[test]
    fn bom_and_crlf() {
        let text = format!("\u{feff}{REC}\r\n{REC}\r\n");
        let d = parse_dataset(&text, Path::new("t.jsonl"), &opts()).unwrap();
        assert_eq!(d.len(), 2);
        let text = format!("\u{feff}[{REC},\r\n{REC}]");
        let d = parse_dataset(&text, Path::new("t.json"), &opts()).unwrap();
        assert_eq!(d.records[1].source.line, 2);
    }

    #[test]
    fn malformed_line_fail_and_skip() {
        let text = format!("{REC}\n{{\"id\": \"b\", \n{REC}\n");
        let e = parse_dataset(&text, Path::new("m.jsonl"), &opts()).unwrap_err();
        assert_eq!(e.kind(), Some(RecordErrorKind::MalformedJson));
        assert!(e.to_string().starts_with("m.jsonl:2:"), "{e}");

        let d =
            parse_dataset(&text, Path::new("m.jsonl"), &opts().on_error(OnError::Skip)).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.report.read, 3);
        assert_eq!(d.report.skipped[&RecordErrorKind::MalformedJson], 1);
        assert_eq!(d.report.first_skipped[0].line, 2);
        assert!(d
            .report
            .to_string()
            .contains("1 skipped (malformed_json: 1)"));
    }

    #[test]
    fn array_syntax_error_is_fatal_with_line_and_column() {
        let text = format!("[\n{REC},\n{{\"id\": }}\n]");
        for policy in [OnError::Fail, OnError::Skip] {
            let e =
                parse_dataset(&text, Path::new("a.json"), &opts().on_error(policy)).unwrap_err();
            assert!(matches!(e, DataError::File { line: 3, .. }), "{e:?}");
            assert!(e.to_string().starts_with("a.json:3:"), "{e}");
        }
    }

    #[test]
    fn empty_and_garbage_files() {
        let e = parse_dataset("  \n", Path::new("e.jsonl"), &opts()).unwrap_err();
        assert!(e.to_string().contains("no records"));
        let e = parse_dataset("[]", Path::new("e.json"), &opts()).unwrap_err();
        assert!(e.to_string().contains("no records"));
        let e = parse_dataset("\n  id,text\n", Path::new("e.csv"), &opts()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("e.csv:2:3: expected a JSON array"),
            "{e}"
        );
    }

    #[test]
    fn line_col_counts_chars() {
        assert_eq!(line_col("ab\ncdé f", 8), (2, 5));
        assert_eq!(line_col("", 0), (1, 1));
    }
}
