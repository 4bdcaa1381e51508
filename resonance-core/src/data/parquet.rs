//! Parquet data files (the hub's layout), read row by row.
//!
//! Every row is converted into a JSON object (column name → value) and passed to the same
//! per-format parser as a JSON line, so a Parquet file holds the same fields as its JSON
//! equivalent. The conversion:
//!
//! * strings, booleans, integers and floats become their JSON counterparts (NaN and infinities
//!   become `null`); lists become arrays, structs and maps objects; dates, times, timestamps and
//!   decimals their display string; binary values that are valid UTF-8 strings, other binary
//!   values `null`.
//! * An HF `Image` value, a struct of exactly `{bytes: binary, path: string}`, becomes a path
//!   string: its bytes are written once to a content-addressed cache file
//!   `<cache>/<sha256>.<ext>` (the extension from the magic bytes; written to a temporary file
//!   and renamed, so a cache file is always complete) and the record refers to that file. If the
//!   bytes are null, the value is its `path`, resolved like any image path of the format
//!   (relative to the image root). The cache directory is `LoadOptions::image_cache`, else
//!   [`default_image_cache_dir`].
//!
//! For Parquet files, the "line" of a [`RecordSource`](super::RecordSource) and of errors is the
//! 1-based row number (over all row groups).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parquet::file::reader::SerializedFileReader;
use parquet::record::{Field, Row};
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};

use super::error::DataError;

/// Whether `path` is read as Parquet (its extension is `.parquet`, in any case).
pub fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// The directory embedded images are cached in: `$RESONANCE_CACHE/images` if `RESONANCE_CACHE`
/// is set, else `$XDG_CACHE_HOME/resonance/images`, else `~/.cache/resonance/images` (the
/// system temporary directory stands in for `~` if `HOME` is unset). Relative paths are made
/// absolute against the working directory.
pub fn default_image_cache_dir() -> PathBuf {
    let non_empty = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let root = non_empty("RESONANCE_CACHE")
        .or_else(|| non_empty("XDG_CACHE_HOME").map(|d| d.join("resonance")))
        .unwrap_or_else(|| {
            non_empty("HOME")
                .unwrap_or_else(std::env::temp_dir)
                .join(".cache/resonance")
        });
    absolute(&root.join("images"))
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Writes `bytes` to the content-addressed cache file in `dir` (if not there yet) and returns
/// its path: `<dir>/<sha256 hex>.<ext>`, the extension guessed from the magic bytes (`bin` if
/// unknown). The file is written to a temporary name and renamed, so concurrent loaders and
/// interrupted writes never leave a partial file under the final name.
pub fn cache_image_bytes(bytes: &[u8], dir: &Path) -> std::io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let ext = image::guess_format(bytes)
        .ok()
        .and_then(|f| f.extensions_str().first().copied())
        .unwrap_or("bin");
    let target = dir.join(format!("{hex}.{ext}"));
    if target.is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{hex}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&tmp, &target)) {
        Ok(()) => Ok(target),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Reads every row of the Parquet file `path` as a JSON object and hands it to `on_row` with
/// its 1-based row number. Returns the number of rows.
///
/// Errors: the file cannot be opened ([`DataError::Io`]), is not readable Parquet or a page
/// cannot be decoded ([`DataError::Parquet`]), an embedded image cannot be cached
/// ([`DataError::ImageCache`]), or whatever `on_row` returns.
pub(super) fn read_rows(
    path: &Path,
    cache_dir: &Path,
    mut on_row: impl FnMut(usize, Value) -> Result<(), DataError>,
) -> Result<usize, DataError> {
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| DataError::Parquet {
        path: path.to_path_buf(),
        row: None,
        message: e.to_string(),
    })?;
    let cache_dir = absolute(cache_dir);
    let mut n = 0usize;
    for (i, row) in reader.into_iter().enumerate() {
        let row_no = i + 1;
        let row = row.map_err(|e| DataError::Parquet {
            path: path.to_path_buf(),
            row: Some(row_no),
            message: e.to_string(),
        })?;
        let mut conv = Converter {
            path,
            row: row_no,
            cache_dir: &cache_dir,
        };
        let value = conv.row(&row, "")?;
        n += 1;
        on_row(row_no, value)?;
    }
    Ok(n)
}

struct Converter<'a> {
    path: &'a Path,
    row: usize,
    cache_dir: &'a Path,
}

impl Converter<'_> {
    fn row(&mut self, row: &Row, prefix: &str) -> Result<Value, DataError> {
        let mut obj = Map::new();
        for (name, field) in row.get_column_iter() {
            let f = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            obj.insert(name.clone(), self.field(field, &f)?);
        }
        Ok(Value::Object(obj))
    }

    fn field(&mut self, field: &Field, name: &str) -> Result<Value, DataError> {
        Ok(match field {
            Field::Null => Value::Null,
            Field::Bool(b) => Value::Bool(*b),
            Field::Byte(x) => Value::from(*x),
            Field::Short(x) => Value::from(*x),
            Field::Int(x) => Value::from(*x),
            Field::Long(x) => Value::from(*x),
            Field::UByte(x) => Value::from(*x),
            Field::UShort(x) => Value::from(*x),
            Field::UInt(x) => Value::from(*x),
            Field::ULong(x) => Value::from(*x),
            Field::Float16(x) => float(x.to_f64()),
            Field::Float(x) => float(f64::from(*x)),
            Field::Double(x) => float(*x),
            Field::Str(s) => Value::String(s.clone()),
            Field::Bytes(b) => match std::str::from_utf8(b.data()) {
                Ok(s) => Value::String(s.to_string()),
                Err(_) => Value::Null,
            },
            Field::Decimal(_)
            | Field::Date(_)
            | Field::TimeMillis(_)
            | Field::TimeMicros(_)
            | Field::TimestampMillis(_)
            | Field::TimestampMicros(_) => Value::String(field.to_string()),
            Field::Group(row) => match self.image(row, name)? {
                Some(v) => v,
                None => self.row(row, name)?,
            },
            Field::ListInternal(list) => Value::Array(
                list.elements()
                    .iter()
                    .enumerate()
                    .map(|(i, e)| self.field(e, &format!("{name}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Field::MapInternal(map) => {
                let mut obj = Map::new();
                for (k, v) in map.entries() {
                    let key = match k {
                        Field::Str(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let value = self.field(v, &format!("{name}.{key}"))?;
                    obj.insert(key, value);
                }
                Value::Object(obj)
            }
        })
    }

    /// An HF `Image` struct `{bytes, path}` → the path of its cached bytes, or its `path`;
    /// `None` if `row` is not such a struct.
    fn image(&mut self, row: &Row, name: &str) -> Result<Option<Value>, DataError> {
        let mut bytes = None;
        let mut path = None;
        for (k, v) in row.get_column_iter() {
            match (k.as_str(), v) {
                ("bytes", Field::Bytes(b)) => bytes = Some(Some(b.data())),
                ("bytes", Field::Null) => bytes = Some(None),
                ("path", Field::Str(p)) => path = Some(Value::String(p.clone())),
                ("path", Field::Null) => path = Some(Value::Null),
                _ => return Ok(None),
            }
        }
        let (Some(bytes), Some(path)) = (bytes, path) else {
            return Ok(None);
        };
        match bytes {
            Some(b) => cache_image_bytes(b, self.cache_dir)
                .map(|p| Some(Value::String(p.to_string_lossy().into_owned())))
                .map_err(|source| DataError::ImageCache {
                    path: self.path.to_path_buf(),
                    row: self.row,
                    field: name.to_string(),
                    cache_dir: self.cache_dir.to_path_buf(),
                    source,
                }),
            None => Ok(Some(path)),
        }
    }
}

fn float(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_content_addressed_with_magic_extension() {
        let dir = tempfile::tempdir().unwrap();
        let png = b"\x89PNG\r\n\x1a\n rest of a png";
        let a = cache_image_bytes(png, dir.path()).unwrap();
        let b = cache_image_bytes(png, dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.extension().unwrap(), "png");
        assert_eq!(std::fs::read(&a).unwrap(), png);
        let other = cache_image_bytes(b"\xff\xd8\xff\xe0 jpeg", dir.path()).unwrap();
        assert_eq!(other.extension().unwrap(), "jpg");
        let unknown = cache_image_bytes(b"???", dir.path()).unwrap();
        assert_eq!(unknown.extension().unwrap(), "bin");
        // Only the three cache files, no temporary left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn parquet_extension() {
        assert!(is_parquet(Path::new("a/train-00000.parquet")));
        assert!(is_parquet(Path::new("A.PARQUET")));
        assert!(!is_parquet(Path::new("a.jsonl")));
    }
}
