//! Python-compatible formatting used by chat templates: `json.dumps`, `repr`, float `repr` and
//! `time.strftime`, so that rendered text matches what transformers' Jinja environment produces.

use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Value};

/// Options of Python's `json.dumps` as HF's `tojson` filter exposes them.
#[derive(Debug, Clone)]
pub(crate) struct JsonOptions {
    pub ensure_ascii: bool,
    /// `None`: single line; `Some(s)`: one item per line, `s` repeated per nesting level.
    pub indent: Option<String>,
    pub item_separator: String,
    pub key_separator: String,
    pub sort_keys: bool,
}

impl JsonOptions {
    /// Python's defaults for the given indent: `(", ", ": ")` without indent, `(",", ": ")` with.
    pub fn new(indent: Option<String>) -> Self {
        let item_separator = if indent.is_some() { "," } else { ", " }.to_string();
        JsonOptions {
            ensure_ascii: false,
            indent,
            item_separator,
            key_separator: ": ".to_string(),
            sort_keys: false,
        }
    }
}

fn not_serializable(what: &str) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("Object of type {what} is not JSON serializable"),
    )
}

/// Serialises a template value as Python's `json.dumps` would.
pub(crate) fn json_dumps(value: &Value, opts: &JsonOptions) -> Result<String, Error> {
    let mut out = String::new();
    dump(value, opts, 0, &mut out)?;
    Ok(out)
}

fn newline_indent(opts: &JsonOptions, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn dump(value: &Value, opts: &JsonOptions, level: usize, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined => return Err(not_serializable("Undefined")),
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone()).map_err(|_| not_serializable("number"))?;
                out.push_str(&json_float(f));
            }
        }
        ValueKind::String => {
            json_string(value.as_str().unwrap_or_default(), opts.ensure_ascii, out)
        }
        ValueKind::Bytes => return Err(not_serializable("bytes")),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            newline_indent(opts, level + 1, out);
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_separator);
                    newline_indent(opts, level + 1, out);
                }
                dump(item, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            newline_indent(opts, level + 1, out);
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_separator);
                    newline_indent(opts, level + 1, out);
                }
                json_string(k, opts.ensure_ascii, out);
                out.push_str(&opts.key_separator);
                dump(v, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push('}');
        }
        _ => return Err(not_serializable("object")),
    }
    Ok(())
}

/// JSON object keys as Python converts them: strings as-is, numbers/bools/None to text.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => {
            let f = f64::try_from(key.clone()).map_err(|_| not_serializable("number"))?;
            json_float(f)
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "keys must be str, int, float, bool or None",
            ))
        }
    })
}

fn json_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".to_string()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
    } else {
        py_float_repr(f)
    }
}

/// Python's `json` string encoding (`ensure_ascii` escapes everything outside `' '..='~'`).
fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, scientific notation outside
/// `1e-4 <= |x| < 1e16`, always a `.0` or exponent so it reads as a float.
pub(crate) fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "1.2345e-5".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let body = if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{}{}.0", digits, "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

/// Python's `repr` of a string (quote choice and escapes as CPython does).
fn py_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// How Python's `str()` prints a value at the top level of `{{ ... }}`: strings as-is, `None`,
/// `True`/`False`, float repr, and `repr` for lists and dicts.
pub(crate) fn py_str(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::String => out.push_str(value.as_str().unwrap_or_default()),
        _ => py_repr(value, out),
    }
}

/// Python's `repr` of a template value.
pub(crate) fn py_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                match f64::try_from(value.clone()) {
                    Ok(f) => out.push_str(&py_float_repr(f)),
                    Err(_) => out.push_str(&value.to_string()),
                }
            }
        }
        ValueKind::String => py_str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq => match value.try_iter() {
            Ok(iter) => {
                out.push('[');
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&item, out);
                }
                out.push(']');
            }
            Err(_) => out.push_str(&value.to_string()),
        },
        ValueKind::Map => match value.try_iter() {
            Ok(iter) => {
                out.push('{');
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&key, out);
                    out.push_str(": ");
                    let item = value.get_item(&key).unwrap_or(Value::UNDEFINED);
                    py_repr(&item, out);
                }
                out.push('}');
            }
            Err(_) => out.push_str(&value.to_string()),
        },
        _ => out.push_str(&value.to_string()),
    }
}

/// A civil date-time in UTC.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    weekday: u32, // 0 = Monday
    yday: u32,    // 1-based day of the year
}

fn civil_from_unix(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = if month <= 2 { y + 1 } else { y };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + u32::from(leap && month > 2);
    // 1970-01-01 was a Thursday (weekday 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as u32;
    Civil {
        year,
        month,
        day,
        hour: (sod / 3600) as u32,
        minute: ((sod % 3600) / 60) as u32,
        second: (sod % 60) as u32,
        weekday,
        yday,
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// `time.strftime(fmt)` for a UTC timestamp, C/POSIX locale. Supports the common directives
/// (`%Y %y %m %d %e %H %I %M %S %p %b %h %B %a %A %j %F %T %D %R %Z %z %%`) and glibc's `%-X`
/// (no padding). Unknown directives are kept verbatim, as glibc does.
pub(crate) fn strftime_utc(fmt: &str, unix_secs: i64) -> String {
    let t = civil_from_unix(unix_secs);
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        let hour12 = if t.hour.is_multiple_of(12) {
            12
        } else {
            t.hour % 12
        };
        let piece = match d {
            'Y' => t.year.to_string(),
            'y' => num(t.year.rem_euclid(100), 2),
            'm' => num(i64::from(t.month), 2),
            'd' => num(i64::from(t.day), 2),
            'e' => {
                if no_pad {
                    t.day.to_string()
                } else {
                    format!("{:>2}", t.day)
                }
            }
            'H' => num(i64::from(t.hour), 2),
            'I' => num(i64::from(hour12), 2),
            'M' => num(i64::from(t.minute), 2),
            'S' => num(i64::from(t.second), 2),
            'p' => (if t.hour < 12 { "AM" } else { "PM" }).to_string(),
            'b' | 'h' => MONTHS[(t.month - 1) as usize][..3].to_string(),
            'B' => MONTHS[(t.month - 1) as usize].to_string(),
            'a' => DAYS[t.weekday as usize][..3].to_string(),
            'A' => DAYS[t.weekday as usize].to_string(),
            'j' => num(i64::from(t.yday), 3),
            'F' => format!("{}-{:02}-{:02}", t.year, t.month, t.day),
            'T' => format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second),
            'R' => format!("{:02}:{:02}", t.hour, t.minute),
            'D' => format!("{:02}/{:02}/{:02}", t.month, t.day, t.year.rem_euclid(100)),
            'Z' => "UTC".to_string(),
            'z' => "+0000".to_string(),
            '%' => "%".to_string(),
            other => {
                if no_pad {
                    format!("%-{other}")
                } else {
                    format!("%{other}")
                }
            }
        };
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases: [(f64, &str); 16] = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123456789.0, "123456789.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.234e20, "1.234e+20"),
            (0.48145466, "0.48145466"),
            (1.0 / 3.0, "0.3333333333333333"),
            (2.0f64.powi(70), "1.1805916207174113e+21"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (100.5, "100.5"),
        ];
        for (x, want) in cases {
            assert_eq!(py_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn json_dumps_matches_python_layouts() {
        let v = Value::from_serialize(serde_json::json!({
            "name": "get_weather", "n": 3, "x": 0.5, "ok": true, "none": null,
            "list": [1, "é", []], "obj": {}
        }));
        let compact = json_dumps(&v, &JsonOptions::new(None)).unwrap();
        assert_eq!(
            compact,
            r#"{"name": "get_weather", "n": 3, "x": 0.5, "ok": true, "none": null, "list": [1, "é", []], "obj": {}}"#
        );
        let indented = json_dumps(&v, &JsonOptions::new(Some("  ".into()))).unwrap();
        assert_eq!(
            indented,
            "{\n  \"name\": \"get_weather\",\n  \"n\": 3,\n  \"x\": 0.5,\n  \"ok\": true,\n  \"none\": null,\n  \"list\": [\n    1,\n    \"é\",\n    []\n  ],\n  \"obj\": {}\n}"
        );
        let mut ascii = JsonOptions::new(None);
        ascii.ensure_ascii = true;
        ascii.sort_keys = true;
        let v = Value::from_serialize(serde_json::json!({"b": "é😀\u{7f}", "a": "<&>\n"}));
        assert_eq!(
            json_dumps(&v, &ascii).unwrap(),
            r#"{"a": "<&>\n", "b": "\u00e9\ud83d\ude00\u007f"}"#
        );
    }

    #[test]
    fn repr_matches_python() {
        let v = Value::from_serialize(serde_json::json!({"a": [1, 2.0, null, true], "b": "it's"}));
        let mut s = String::new();
        py_repr(&v, &mut s);
        assert_eq!(s, r#"{'a': [1, 2.0, None, True], 'b': "it's"}"#);
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-07-26 13:05:09 UTC was a Friday.
        let t = 1_721_999_109;
        assert_eq!(strftime_utc("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime_utc("%A %B %-d, %Y %H:%M:%S %p %j %%", t),
            "Friday July 26, 2024 13:05:09 PM 208 %"
        );
        assert_eq!(
            strftime_utc("%F %T %y %I %e %Q", 0),
            "1970-01-01 00:00:00 70 12  1 %Q"
        );
        // Leap day.
        assert_eq!(
            strftime_utc("%Y-%m-%d %a %j", 951_782_400),
            "2000-02-29 Tue 060"
        );
    }
}
