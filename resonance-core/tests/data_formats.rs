//! Loading the sample files of every format in `tests/data/`, and the errors of the broken ones.

use std::path::{Path, PathBuf};

use resonance_core::data::{
    load_dataset, DataError, DataFormat, LoadOptions, OnError, Part, RecordErrorKind, Role,
};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn opts(format: DataFormat) -> LoadOptions {
    LoadOptions::new(format).image_root(data_dir().join("images"))
}

fn img(name: &str) -> PathBuf {
    data_dir().join("images").join(name)
}

/// The error message, asserted to name the file, the line and (if given) the field.
fn expect_error(file: &str, format: DataFormat, line: usize, field: Option<&str>) -> DataError {
    let path = data_dir().join(file);
    let err = load_dataset(&path, &opts(format)).expect_err("the file must be rejected");
    let msg = err.to_string();
    let file_name = Path::new(file).file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(file_name), "no file name in: {msg}");
    assert!(
        msg.contains(&format!("{file_name}:{line}:")),
        "no line {line} in: {msg}"
    );
    if let Some(f) = field {
        assert!(
            msg.contains(&format!("field `{f}`")),
            "no field {f} in: {msg}"
        );
    }
    err
}

#[test]
fn llava_json_array() {
    let d = load_dataset(&data_dir().join("llava.json"), &opts(DataFormat::Llava)).unwrap();
    assert_eq!(d.name, "llava");
    assert_eq!(d.len(), 4);
    assert_eq!(d.report.read, 4);
    assert_eq!(d.report.skipped_total(), 0);

    let r = &d.records[0];
    assert_eq!(r.id.as_deref(), Some("llava-1"));
    assert_eq!(r.source.line, 2);
    assert!(r.source.file.ends_with("llava.json"));
    assert_eq!(r.images, vec![img("red.png")]);
    assert_eq!(r.messages.len(), 4);
    assert_eq!(
        r.messages[0].content,
        vec![Part::Image, Part::Text("What color is this square?".into())]
    );
    assert_eq!(r.num_assistant_turns(), 2);

    let r = &d.records[1];
    assert_eq!(r.images, vec![img("red.png"), img("blue.png")]);
    assert_eq!(
        r.messages[0].content,
        vec![
            Part::Text("Compare ".into()),
            Part::Image,
            Part::Text(" and ".into()),
            Part::Image,
            Part::Text(".".into()),
        ]
    );
    assert_eq!(r.source.line, 12);

    let r = &d.records[2];
    assert_eq!(r.id.as_deref(), Some("3"));
    assert!(r.images.is_empty());
    assert_eq!(r.messages[0].role, Role::System);

    // Image without a placeholder: at the start of the first user turn.
    let r = &d.records[3];
    assert_eq!(
        r.messages[0].content,
        vec![Part::Image, Part::Text("Describe the image.".into())]
    );
}

#[test]
fn vlquery_jsonl() {
    let d = load_dataset(
        &data_dir().join("vlquery.jsonl"),
        &opts(DataFormat::VlqueryJson),
    )
    .unwrap();
    assert_eq!(d.len(), 3);
    assert_eq!(
        d.records.iter().map(|r| r.source.line).collect::<Vec<_>>(),
        vec![1, 2, 4]
    );
    assert_eq!(d.records[1].messages[0].content[0], Part::Image);
    assert_eq!(d.records[2].messages[0].role, Role::System);
    assert_eq!(
        d.records[2].messages[1].content,
        vec![Part::Image, Part::Text("Color?".into())]
    );
}

#[test]
fn flamingo_jsonl() {
    let d = load_dataset(
        &data_dir().join("flamingo.jsonl"),
        &opts(DataFormat::Flamingo),
    )
    .unwrap();
    assert_eq!(d.len(), 3);
    let r = &d.records[1];
    assert_eq!(r.images, vec![img("green.png"), img("blue.png")]);
    assert_eq!(
        r.messages[0].content,
        vec![
            Part::Text("Left: ".into()),
            Part::Image,
            Part::Text(" Right: ".into()),
            Part::Image,
            Part::Text(" Which is blue?".into()),
        ]
    );
    assert_eq!(r.messages[1].text_content(), "The right one.");
    assert_eq!(d.records[2].id.as_deref(), Some("no-image"));
    assert!(d.records[2].images.is_empty());
}

#[test]
fn text_json() {
    let d = load_dataset(&data_dir().join("text.json"), &opts(DataFormat::Text)).unwrap();
    assert_eq!(d.len(), 3);
    assert_eq!(d.records[0].images, vec![img("blue.png")]);
    assert_eq!(d.records[1].messages.len(), 3);
    assert_eq!(d.records[2].images, vec![img("green.png")]);
    assert_eq!(
        d.records[2].messages[0].content,
        vec![Part::Text("Which is it?".into()), Part::Image]
    );
}

#[test]
fn format_is_detected_by_content_not_extension() {
    // A JSON array in a `.jsonl` file and JSON lines in a `.json` file.
    let dir = tempfile::tempdir().unwrap();
    let array = std::fs::read_to_string(data_dir().join("text.json")).unwrap();
    let lines = std::fs::read_to_string(data_dir().join("vlquery.jsonl")).unwrap();
    std::fs::write(dir.path().join("array.jsonl"), array).unwrap();
    std::fs::write(dir.path().join("lines.json"), lines).unwrap();
    let a = load_dataset(&dir.path().join("array.jsonl"), &opts(DataFormat::Text)).unwrap();
    assert_eq!(a.len(), 3);
    let l = load_dataset(
        &dir.path().join("lines.json"),
        &opts(DataFormat::VlqueryJson),
    )
    .unwrap();
    assert_eq!(l.len(), 3);
}

#[test]
fn default_image_root_is_the_data_file_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(img("red.png"), dir.path().join("red.png")).unwrap();
    let file = dir.path().join("d.jsonl");
    std::fs::write(
        &file,
        r#"{"image": "red.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Red."}]}"#,
    )
    .unwrap();
    let d = load_dataset(&file, &LoadOptions::new(DataFormat::Llava)).unwrap();
    assert_eq!(d.records[0].images, vec![dir.path().join("red.png")]);
}

#[test]
fn malformed_json_line() {
    let e = expect_error("broken/malformed.jsonl", DataFormat::Llava, 3, None);
    assert_eq!(e.kind(), Some(RecordErrorKind::MalformedJson));
    assert!(e.to_string().contains("invalid JSON"), "{e}");
}

#[test]
fn missing_image() {
    let e = expect_error(
        "broken/missing_image.json",
        DataFormat::Llava,
        10,
        Some("image[1]"),
    );
    assert_eq!(e.kind(), Some(RecordErrorKind::MissingImage));
    assert!(e.to_string().contains("does_not_exist.png"), "{e}");
}

#[test]
fn wrong_image_count() {
    let e = expect_error(
        "broken/image_count.jsonl",
        DataFormat::Llava,
        2,
        Some("image"),
    );
    assert_eq!(e.kind(), Some(RecordErrorKind::ImageCount));
    assert!(
        e.to_string().contains("1 image but 2 image placeholders"),
        "{e}"
    );
}

#[test]
fn unknown_role() {
    let e = expect_error(
        "broken/unknown_role.jsonl",
        DataFormat::Llava,
        3,
        Some("conversations[1].from"),
    );
    assert_eq!(e.kind(), Some(RecordErrorKind::UnknownRole));
    assert!(e.to_string().contains("unknown role `bot`"), "{e}");
}

#[test]
fn role_order() {
    let e = expect_error(
        "broken/role_order.json",
        DataFormat::Text,
        2,
        Some("messages[0].role"),
    );
    assert_eq!(e.kind(), Some(RecordErrorKind::RoleOrder));
    assert!(
        e.to_string()
            .contains("first non-system turn must be from the user"),
        "{e}"
    );
}

#[test]
fn wrong_format_gives_a_field_error() {
    // LLaVA records read as `text`: no `messages`.
    let e = expect_error("llava.json", DataFormat::Text, 2, Some("messages"));
    assert_eq!(e.kind(), Some(RecordErrorKind::InvalidField));
}

#[test]
fn skip_counts_every_reason() {
    let path = data_dir().join("broken/mixed.jsonl");
    let d = load_dataset(&path, &opts(DataFormat::Llava).on_error(OnError::Skip)).unwrap();
    assert_eq!(d.report.read, 7);
    assert_eq!(d.report.loaded, 2);
    assert_eq!(d.len(), 2);
    assert_eq!(
        d.records.iter().map(|r| r.source.line).collect::<Vec<_>>(),
        vec![1, 6]
    );
    let s = &d.report.skipped;
    assert_eq!(s[&RecordErrorKind::MalformedJson], 1);
    assert_eq!(s[&RecordErrorKind::MissingImage], 1);
    assert_eq!(s[&RecordErrorKind::UnknownRole], 1);
    assert_eq!(s[&RecordErrorKind::ImageCount], 1);
    assert_eq!(s[&RecordErrorKind::RoleOrder], 1);
    assert_eq!(d.report.skipped_total(), 5);
    let lines: Vec<usize> = d.report.first_skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, vec![2, 3, 4, 5, 7]);
    assert!(d.report.first_skipped[1]
        .message
        .contains("mixed.jsonl:3: field `image`"));
    let shown = d.report.to_string();
    assert!(
        shown.contains("7 records read, 2 loaded, 5 skipped"),
        "{shown}"
    );

    // The same file under `fail` stops at line 2.
    let e = load_dataset(&path, &opts(DataFormat::Llava)).unwrap_err();
    assert!(e.to_string().contains("mixed.jsonl:2:"), "{e}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let e = load_dataset(
        Path::new("/nonexistent/train.json"),
        &opts(DataFormat::Llava),
    )
    .unwrap_err();
    assert!(matches!(e, DataError::Io { .. }));
    assert!(
        e.to_string().starts_with("/nonexistent/train.json: "),
        "{e}"
    );
}

#[test]
fn image_check_can_be_disabled() {
    let path = data_dir().join("broken/missing_image.json");
    let d = load_dataset(&path, &opts(DataFormat::Llava).check_images(false)).unwrap();
    assert_eq!(d.len(), 2);
}

#[test]
fn plain_dpo_pairs() {
    let skip = opts(DataFormat::PlainDpo).on_error(OnError::Skip);
    let d = load_dataset(&data_dir().join("plain_dpo.jsonl"), &skip).unwrap();
    assert_eq!(d.len(), 3);
    let r = &d.records[0];
    assert_eq!(r.images, vec![img("red.png")]);
    assert_eq!(
        r.messages[0].content,
        vec![Part::Image, Part::Text("What color is this square?".into())]
    );
    assert_eq!(r.messages[1].role, Role::Assistant);
    assert_eq!(r.messages[1].text_content(), "Red.");
    assert_eq!(r.rejected.as_deref(), Some("Blue."));
    // Two images at their placeholders; a text-only pair.
    assert_eq!(d.records[1].images, vec![img("red.png"), img("blue.png")]);
    assert_eq!(d.records[1].num_image_parts(), 2);
    assert!(d.records[2].images.is_empty());
    // The bad `rejected` on line 4 is skipped and counted.
    assert_eq!(
        d.report.skipped.get(&RecordErrorKind::InvalidField),
        Some(&1)
    );
    let err = load_dataset(
        &data_dir().join("plain_dpo.jsonl"),
        &opts(DataFormat::PlainDpo),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("plain_dpo.jsonl:4:") && err.contains("rejected"),
        "{err}"
    );
}

#[test]
fn unpaired_records_carry_their_label() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kto.jsonl");
    std::fs::write(
        &path,
        format!(
            "{{\"image\": \"{}\", \"prompt\": \"Colour?\", \"completion\": \"red.\", \"label\": true}}\n{{\"prompt\": \"Hi\", \"completion\": \"no\", \"label\": \"yes\"}}\n",
            img("red.png").display()
        ),
    )
    .unwrap();
    let skip = opts(DataFormat::Unpaired).on_error(OnError::Skip);
    let d = load_dataset(&path, &skip).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d.records[0].label, Some(true));
    assert_eq!(d.records[0].messages[1].text_content(), "red.");
    let err = load_dataset(&path, &opts(DataFormat::Unpaired))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kto.jsonl:2:") && err.contains("label"),
        "{err}"
    );
}
