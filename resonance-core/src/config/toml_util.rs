//! TOML helpers: locating keys by byte span, and editing a TOML tree for `--set` overrides.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::{Table, Value};

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    // Step back to a char boundary so slicing cannot fail.
    let mut off = offset;
    while off > 0 && !text.is_char_boundary(off) {
        off -= 1;
    }
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

struct Entry {
    path: String,
    key_span: Option<Range<usize>>,
    value_span: Range<usize>,
}

/// Where each key of a TOML document is: dotted path → spans.
pub(crate) struct KeyIndex<'a> {
    text: &'a str,
    entries: Vec<Entry>,
}

impl<'a> KeyIndex<'a> {
    /// Indexes `text`; `None` if it is not valid TOML.
    pub(crate) fn build(text: &'a str) -> Option<Self> {
        let doc = DeTable::parse(text).ok()?;
        let mut entries = Vec::new();
        walk_table(doc.get_ref(), "", &mut entries);
        Some(KeyIndex { text, entries })
    }

    /// The 1-based line where `path` (`section.key`, `data.datasets[1].path`) is written.
    pub(crate) fn line_of(&self, path: &str) -> Option<usize> {
        let e = self.entries.iter().find(|e| e.path == path)?;
        let start = e.key_span.as_ref().map_or(e.value_span.start, |s| s.start);
        Some(line_col(self.text, start).0)
    }

    /// The innermost key whose key or value span contains `offset`.
    pub(crate) fn path_at(&self, offset: usize) -> Option<String> {
        let mut best: Option<(usize, &Entry)> = None;
        for e in &self.entries {
            for span in e.key_span.iter().chain(std::iter::once(&e.value_span)) {
                if span.start <= offset && offset < span.end.max(span.start + 1) {
                    let len = span.end - span.start;
                    if best.is_none_or(|(l, _)| len < l) {
                        best = Some((len, e));
                    }
                }
            }
        }
        best.map(|(_, e)| e.path.clone())
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn walk_table(table: &DeTable<'_>, prefix: &str, out: &mut Vec<Entry>) {
    for (k, v) in table.iter() {
        let path = join(prefix, k.get_ref());
        out.push(Entry {
            path: path.clone(),
            key_span: Some(k.span()),
            value_span: v.span(),
        });
        walk_value(v.get_ref(), &path, out);
    }
}

fn walk_value(v: &DeValue<'_>, path: &str, out: &mut Vec<Entry>) {
    match v {
        DeValue::Table(t) => walk_table(t, path, out),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let p = format!("{path}[{i}]");
                out.push(Entry {
                    path: p.clone(),
                    key_span: None,
                    value_span: item.span(),
                });
                walk_value(item.get_ref(), &p, out);
            }
        }
        _ => {}
    }
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Parses `train.lr`, `data.datasets[0].weight` or `data.datasets.0.weight`.
pub(crate) fn parse_key_path(key: &str) -> Result<Vec<Seg>, String> {
    let mut segs = Vec::new();
    if key.is_empty() {
        return Err("empty key".into());
    }
    for part in key.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if name.is_empty() && rest.is_empty() {
            return Err("empty key segment".into());
        }
        if !name.is_empty() {
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(format!("invalid key segment `{name}`"));
            }
            match name.parse::<usize>() {
                Ok(i) if !segs.is_empty() => segs.push(Seg::Index(i)),
                _ => segs.push(Seg::Key(name.to_string())),
            }
        }
        while !rest.is_empty() {
            let close = rest
                .find(']')
                .ok_or_else(|| format!("unclosed `[` in `{part}`"))?;
            let idx = rest[1..close]
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("invalid index `{}` in `{part}`", &rest[1..close]))?;
            segs.push(Seg::Index(idx));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(format!("unexpected `{rest}` in `{part}`"));
            }
        }
    }
    if !matches!(segs.first(), Some(Seg::Key(_))) {
        return Err("a key must start with a section name".into());
    }
    Ok(segs)
}

/// The canonical display of a key path: `data.datasets[0].weight`.
pub(crate) fn display_path(segs: &[Seg]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Parses an override value as a TOML value; text that is not valid TOML is taken as a string
/// (so `--set model.path=/models/llava` needs no quotes).
pub(crate) fn parse_value(raw: &str) -> Value {
    let raw = raw.trim();
    let doc = format!("v = {raw}\n");
    match doc.parse::<Table>() {
        Ok(mut t) if t.len() == 1 => t.remove("v").unwrap_or_else(|| Value::String(raw.into())),
        _ => Value::String(raw.to_string()),
    }
}

/// Sets `segs` in `root` (a table) to `value`. Intermediate tables must exist (they are the
/// sections and datasets); an array index may be one past the end to append a new entry.
pub(crate) fn set_in_tree(root: &mut Value, segs: &[Seg], value: Value) -> Result<(), String> {
    let Some((last, init)) = segs.split_last() else {
        return Err("empty key".into());
    };
    let mut cur = root;
    for (depth, seg) in init.iter().enumerate() {
        let here = display_path(&segs[..depth]);
        let next = display_path(&segs[..=depth]);
        cur = match (seg, cur) {
            (Seg::Key(k), Value::Table(t)) => t
                .get_mut(k.as_str())
                .ok_or_else(|| format!("unknown key `{next}`"))?,
            (Seg::Index(i), Value::Array(a)) => {
                if *i == a.len() {
                    a.push(Value::Table(Table::new()));
                }
                let len = a.len();
                a.get_mut(*i)
                    .ok_or_else(|| format!("index {i} out of range: `{here}` has {len} entries"))?
            }
            (Seg::Key(_), _) => return Err(format!("`{here}` is not a table")),
            (Seg::Index(_), _) => return Err(format!("`{here}` is not a list")),
        };
    }
    let here = display_path(init);
    match (last, cur) {
        (Seg::Key(k), Value::Table(t)) => {
            t.insert(k.clone(), value);
            Ok(())
        }
        (Seg::Index(i), Value::Array(a)) => {
            if *i < a.len() {
                a[*i] = value;
                Ok(())
            } else if *i == a.len() {
                a.push(value);
                Ok(())
            } else {
                Err(format!(
                    "index {i} out of range: `{here}` has {} entries",
                    a.len()
                ))
            }
        }
        (Seg::Key(_), _) => Err(format!("`{here}` is not a table")),
        (Seg::Index(_), _) => Err(format!("`{here}` is not a list")),
    }
}

/// Flattens a table into dotted key paths; arrays of tables contribute `name[].key` paths from
/// their first element.
pub(crate) fn flatten_keys(table: &Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in table {
        let path = join(prefix, k);
        match v {
            Value::Table(t) => flatten_keys(t, &path, out),
            Value::Array(a) if a.first().is_some_and(Value::is_table) => {
                if let Some(Value::Table(t)) = a.first() {
                    flatten_keys(t, &format!("{path}[]"), out);
                }
            }
            _ => out.push(path),
        }
    }
}

/// Levenshtein distance (for "did you mean" suggestions).
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths() {
        assert_eq!(
            parse_key_path("data.datasets[1].weight").unwrap(),
            vec![
                Seg::Key("data".into()),
                Seg::Key("datasets".into()),
                Seg::Index(1),
                Seg::Key("weight".into())
            ]
        );
        assert_eq!(
            parse_key_path("data.datasets.1.weight").unwrap(),
            parse_key_path("data.datasets[1].weight").unwrap()
        );
        assert_eq!(
            display_path(&parse_key_path("data.datasets.1.weight").unwrap()),
            "data.datasets[1].weight"
        );
        assert!(parse_key_path("").is_err());
        assert!(parse_key_path("a..b").is_err());
        assert!(parse_key_path("a[x]").is_err());
        assert!(parse_key_path("a[1").is_err());
        assert!(parse_key_path("a b").is_err());
    }

    #[test]
    fn values() {
        assert_eq!(parse_value("1e-5"), Value::Float(1e-5));
        assert_eq!(parse_value("3"), Value::Integer(3));
        assert_eq!(parse_value("true"), Value::Boolean(true));
        assert_eq!(parse_value("\"x\""), Value::String("x".into()));
        assert_eq!(
            parse_value("/models/llava"),
            Value::String("/models/llava".into())
        );
        assert!(matches!(parse_value("[\"q_proj\", \"v_proj\"]"), Value::Array(a) if a.len() == 2));
        // A value that would smuggle in a second key is a plain string.
        assert_eq!(parse_value("1\nlr = 2"), Value::String("1\nlr = 2".into()));
    }

    #[test]
    fn index_locates_keys_and_spans() {
        let text = "[train]\nseed = 1\n\n[[data.datasets]]\npath = \"a\"\n\n[[data.datasets]]\npath = \"b\"\nweight = 2.0\n";
        let idx = KeyIndex::build(text).unwrap();
        assert_eq!(idx.line_of("train.seed"), Some(2));
        assert_eq!(idx.line_of("data.datasets[1].weight"), Some(9));
        let off = text.find("weight").unwrap();
        assert_eq!(idx.path_at(off).as_deref(), Some("data.datasets[1].weight"));
        assert_eq!(line_col(text, off), (9, 1));
    }

    #[test]
    fn distance() {
        assert_eq!(edit_distance("rank", "rnak"), 2);
        assert_eq!(edit_distance("lr", "lr"), 0);
        assert_eq!(edit_distance("", "ab"), 2);
    }
}
