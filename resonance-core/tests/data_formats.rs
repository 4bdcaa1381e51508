//! Loading the sample files of every format (`tests/data/`, and the published preference layouts
//! in `data/samples/` written by `data/samples/make_samples.py`), and the errors of the broken ones.

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

// ---------------------------------------------------------------------------------------------
// Published preference layouts: the samples written by data/samples/make_samples.py.

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/samples")
}

fn sample_opts(format: DataFormat, cache: &Path) -> LoadOptions {
    LoadOptions::new(format).image_cache(cache)
}

/// (id, chosen, rejected) of every record.
fn triples(d: &resonance_core::data::Dataset) -> Vec<(String, String, String)> {
    d.records
        .iter()
        .map(|r| {
            assert_eq!(r.messages.len(), 2);
            assert_eq!(r.messages[1].role, Role::Assistant);
            (
                r.id.clone().unwrap_or_default(),
                r.messages[1].text_content(),
                r.rejected.clone().expect("a rejected answer"),
            )
        })
        .collect()
}

#[test]
fn vlfeedback_pairs_match_vl_rlhf_for_every_margin() {
    let cache = tempfile::tempdir().unwrap();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(samples().join("vlfeedback_expected.json")).unwrap(),
    )
    .unwrap();
    let expected = expected.as_object().unwrap();
    assert_eq!(expected.len(), 5);
    for (margin, pairs) in expected {
        let margin: f64 = margin.parse().unwrap();
        let want: Vec<(String, String, String)> = pairs
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let s = |k: &str| p[k].as_str().unwrap().to_string();
                (s("id"), s("chosen"), s("rejected"))
            })
            .collect();
        for file in ["vlfeedback.jsonl", "vlfeedback.parquet"] {
            let opts = sample_opts(DataFormat::VlfeedbackPaired, cache.path()).score_margin(margin);
            let d = load_dataset(&samples().join(file), &opts).unwrap();
            assert_eq!(triples(&d), want, "{file}, score_margin {margin}");
            let ids: std::collections::BTreeSet<&str> = want.iter().map(|t| t.0.as_str()).collect();
            // Records without a kept pair are skipped and counted, not errors.
            assert_eq!(d.report.read, 5);
            assert_eq!(d.report.loaded, ids.len());
            assert_eq!(d.report.conversations, want.len());
            assert_eq!(
                d.report.skipped.get(&RecordErrorKind::NoPair).copied(),
                Some(5 - ids.len())
            );
        }
    }
}

#[test]
fn vlfeedback_records_keep_source_image_and_prompt() {
    let cache = tempfile::tempdir().unwrap();
    let opts = sample_opts(DataFormat::VlfeedbackPaired, cache.path()).score_margin(0.0);
    for file in ["vlfeedback.jsonl", "vlfeedback.parquet"] {
        let d = load_dataset(&samples().join(file), &opts).unwrap();
        // vlf-1 (line / row 1) gives 6 pairs, vlf-2 (2) one, vlf-5 (5) three.
        let lines: Vec<usize> = d.records.iter().map(|r| r.source.line).collect();
        assert_eq!(lines, vec![1, 1, 1, 1, 1, 1, 2, 5, 5, 5], "{file}");
        let r = &d.records[0];
        assert!(r.source.file.ends_with(file));
        assert_eq!(r.images, vec![samples().join("images/cat.png")]);
        assert_eq!(
            r.messages[0].content,
            vec![Part::Image, Part::Text("What is the animal doing?".into())]
        );
        // `<image>\n` in the prompt: the image at the placeholder.
        let r = &d.records[6];
        assert_eq!(r.images, vec![samples().join("images/dog.png")]);
        assert_eq!(
            r.messages[0].content,
            vec![Part::Image, Part::Text("Describe the dog.".into())]
        );
        let shown = d.report.to_string();
        assert!(
            shown.contains("5 records read, 3 loaded (10 conversations), 2 skipped (no_pair: 2)"),
            "{shown}"
        );
        assert!(shown.contains(&format!("{file}:3: field `completions`: no preference pair: the 2 completions with numeric ratings all have the same score")), "{shown}");
        assert!(
            shown.contains(&format!(
                "{file}:4: field `completions`: no preference pair: 1 of 2 completions"
            )),
            "{shown}"
        );
    }
}

#[test]
fn vlfeedback_bad_rating_names_line_and_field() {
    let path = samples().join("broken/vlfeedback_bad_rating.jsonl");
    let cache = tempfile::tempdir().unwrap();
    let opts = sample_opts(DataFormat::VlfeedbackPaired, cache.path()).image_root(samples());
    let e = load_dataset(&path, &opts).unwrap_err().to_string();
    assert!(
        e.contains(
            "vlfeedback_bad_rating.jsonl:2: field `completions[2].annotations.Visual Faithfulness.Rating`: expected a rating"
        ),
        "{e}"
    );
    let d = load_dataset(&path, &opts.on_error(OnError::Skip)).unwrap();
    assert_eq!(d.report.loaded, 1);
    assert_eq!(d.report.skipped[&RecordErrorKind::InvalidField], 1);
}

fn assert_png(path: &Path, width: usize, height: usize) {
    let img = resonance_core::image::load_image(path).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (width, height),
        "{}",
        path.display()
    );
}

#[test]
fn rlhfv_parquet_with_embedded_images() {
    let cache = tempfile::tempdir().unwrap();
    let d = load_dataset(
        &samples().join("rlhfv.parquet"),
        &sample_opts(DataFormat::Rlhfv, cache.path()),
    )
    .unwrap();
    assert_eq!(d.len(), 5);
    assert_eq!(
        triples(&d)[1],
        (
            "1".into(),
            "A blue rectangle, taller than wide.".into(),
            "A blue car.".into()
        )
    );
    // The "line" of a Parquet record is its 1-based row.
    let rows: Vec<usize> = d.records.iter().map(|r| r.source.line).collect();
    assert_eq!(rows, vec![1, 2, 3, 4, 5]);
    let ids: Vec<&str> = d.records.iter().filter_map(|r| r.id.as_deref()).collect();
    assert_eq!(ids, vec!["0", "1", "2", "3", "4"]);
    // Embedded bytes: cached once per content, as decodable PNGs.
    let img = |i: usize| d.records[i].images[0].clone();
    for i in 0..4 {
        assert!(img(i).starts_with(cache.path()), "{}", img(i).display());
        assert_eq!(img(i).extension().unwrap(), "png");
    }
    assert_png(&img(0), 6, 4);
    assert_png(&img(1), 4, 6);
    assert_png(&img(2), 5, 5);
    assert_eq!(img(3), img(0));
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 3);
    // Null bytes: the image's path, against the image root.
    assert_eq!(img(4), samples().join("images/dog.png"));
    assert_png(&img(4), 8, 12);
    assert_eq!(
        d.records[0].messages[0].content,
        vec![Part::Image, Part::Text("What is in the image?".into())]
    );
    assert_eq!(
        d.records[2].messages[0].content,
        vec![Part::Image, Part::Text("What colour dominates?".into())]
    );
    // Loading again reuses the cache files.
    let again = load_dataset(
        &samples().join("rlhfv.parquet"),
        &sample_opts(DataFormat::Rlhfv, cache.path()),
    )
    .unwrap();
    assert_eq!(again.records[0].images, d.records[0].images);
}

#[test]
fn rlhfv_jsonl_uses_image_path() {
    let cache = tempfile::tempdir().unwrap();
    let d = load_dataset(
        &samples().join("rlhfv.jsonl"),
        &sample_opts(DataFormat::Rlhfv, cache.path()),
    )
    .unwrap();
    assert_eq!(
        triples(&d),
        vec![
            ("10".into(), "A cat.".into(), "A dog.".into()),
            ("11".into(), "A dog.".into(), "A cat.".into())
        ]
    );
    assert_eq!(d.records[0].images, vec![samples().join("images/cat.png")]);
    assert_eq!(d.records[1].images, vec![samples().join("images/dog.png")]);
}

#[test]
fn rlhfv_bad_row_names_file_row_and_field() {
    let path = samples().join("broken/rlhfv_bad_text.parquet");
    let cache = tempfile::tempdir().unwrap();
    let opts = sample_opts(DataFormat::Rlhfv, cache.path());
    let e = load_dataset(&path, &opts).unwrap_err();
    assert_eq!(e.kind(), Some(RecordErrorKind::InvalidField));
    let msg = e.to_string();
    assert!(
        msg.contains("rlhfv_bad_text.parquet:2: field `text`: expected a JSON string"),
        "{msg}"
    );
    let d = load_dataset(&path, &opts.on_error(OnError::Skip)).unwrap();
    assert_eq!(
        d.records.iter().map(|r| r.source.line).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert_eq!(d.report.first_skipped[0].line, 2);
}

#[test]
fn not_parquet_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.parquet");
    std::fs::write(&path, "{\"prompt\": \"x\"}\n").unwrap();
    let e = load_dataset(&path, &LoadOptions::new(DataFormat::Rlhfv)).unwrap_err();
    assert!(matches!(e, DataError::Parquet { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with(&format!("{}: Parquet: ", path.display())),
        "{e}"
    );
}

#[test]
fn conversational_preference_jsonl() {
    let cache = tempfile::tempdir().unwrap();
    let d = load_dataset(
        &samples().join("conversational_preference.jsonl"),
        &sample_opts(DataFormat::ConversationalPreference, cache.path()),
    )
    .unwrap();
    assert_eq!(d.len(), 4);
    let r = &d.records[0];
    assert_eq!(r.images, vec![samples().join("images/cat.png")]);
    assert_eq!(
        r.messages[0].content,
        vec![Part::Image, Part::Text("What animal is this?".into())]
    );
    assert_eq!(r.messages[1].text_content(), "A cat.");
    assert_eq!(r.rejected.as_deref(), Some("A dog."));

    // System turn, multi-turn prompt, two images.
    let r = &d.records[1];
    let roles: Vec<Role> = r.messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        vec![
            Role::System,
            Role::User,
            Role::Assistant,
            Role::User,
            Role::Assistant
        ]
    );
    assert_eq!(
        r.images,
        vec![
            samples().join("images/cat.png"),
            samples().join("images/dog.png")
        ]
    );
    assert_eq!(
        r.messages[1].content,
        vec![
            Part::Image,
            Part::Image,
            Part::Text("Compare the two pictures.".into())
        ]
    );
    assert_eq!(r.messages[4].text_content(), "The second.");
    assert_eq!(r.rejected.as_deref(), Some("The first."));

    // Implicit prompt.
    let r = &d.records[2];
    assert_eq!(r.messages.len(), 2);
    assert_eq!(
        r.messages[0].content,
        vec![Part::Image, Part::Text("What colour is the sign?".into())]
    );
    assert_eq!(
        (r.messages[1].text_content(), r.rejected.as_deref()),
        ("Green.".into(), Some("Red."))
    );
    assert!(d.records[3].images.is_empty());
}

#[test]
fn conversational_preference_parquet_zstd_with_embedded_images() {
    let cache = tempfile::tempdir().unwrap();
    let d = load_dataset(
        &samples().join("conversational_preference.parquet"),
        &sample_opts(DataFormat::ConversationalPreference, cache.path()),
    )
    .unwrap();
    assert_eq!(d.len(), 2);
    let r = &d.records[0];
    assert_eq!(r.images.len(), 2);
    assert_png(&r.images[0], 6, 4);
    assert_png(&r.images[1], 4, 6);
    assert_eq!(
        r.messages[0].content,
        vec![Part::Image, Part::Image, Part::Text("Which is red?".into())]
    );
    assert_eq!(
        (r.messages[1].text_content(), r.rejected.as_deref()),
        ("The first.".into(), Some("The second."))
    );
    assert_png(&d.records[1].images[0], 5, 5);
}

#[test]
fn conversational_bad_role_names_line_and_field() {
    let cache = tempfile::tempdir().unwrap();
    let e = load_dataset(
        &samples().join("broken/conversational_bad_role.jsonl"),
        &sample_opts(DataFormat::ConversationalPreference, cache.path()).image_root(samples()),
    )
    .unwrap_err();
    assert_eq!(e.kind(), Some(RecordErrorKind::RoleOrder));
    let msg = e.to_string();
    assert!(
        msg.contains("conversational_bad_role.jsonl:3: field `chosen[1].role`: the answer must be an assistant message"),
        "{msg}"
    );
}

#[test]
fn unpaired_reads_trl_conversational_form() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kto.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": [{\"role\": \"system\", \"content\": \"Be kind.\"}, {\"role\": \"user\", \"content\": \"Hi\"}], \"completion\": [{\"role\": \"assistant\", \"content\": \"Hello!\"}], \"label\": true}\n\
         {\"prompt\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"completion\": [{\"role\": \"assistant\", \"content\": \"Go.\"}, {\"role\": \"assistant\", \"content\": \"Away.\"}], \"label\": false}\n",
    )
    .unwrap();
    let d = load_dataset(
        &path,
        &LoadOptions::new(DataFormat::Unpaired).on_error(OnError::Skip),
    )
    .unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d.records[0].messages.len(), 3);
    assert_eq!(d.records[0].messages[2].text_content(), "Hello!");
    assert_eq!(d.records[0].label, Some(true));
    assert!(d.report.first_skipped[0]
        .message
        .contains("kto.jsonl:2: field `completion`: expected exactly one assistant message"));
}

#[test]
fn parquet_codecs() {
    for codec in ["gzip", "lz4", "brotli", "none"] {
        let path = samples().join(format!("codecs/conversational_{codec}.parquet"));
        let d = load_dataset(
            &path,
            &LoadOptions::new(DataFormat::ConversationalPreference),
        )
        .unwrap_or_else(|e| panic!("{codec}: {e}"));
        assert_eq!(
            triples(&d),
            vec![(String::new(), "Hello!".into(), "No.".into())],
            "{codec}"
        );
    }
}

fn demo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/demo")
}

#[test]
fn ranked_lists_in_all_three_layouts() {
    let opts = LoadOptions::new(DataFormat::Ranked).image_root(demo_root().join("sft/images"));
    let d = load_dataset(&demo_root().join("reward/ranked.jsonl"), &opts).unwrap();
    assert_eq!(d.len(), 24);
    let answers = |i: usize| {
        let r = &d.records[i];
        let mut all = vec![r.messages.last().unwrap().text_content()];
        all.extend(r.rejected.clone());
        all.extend(r.ranked_below.clone());
        all
    };
    // Best first as written.
    assert_eq!(
        answers(0),
        ["a red circle.", "a red square.", "a green square."]
    );
    assert_eq!(d.records[0].images.len(), 1);
    // Sorted by `scores`, highest first.
    assert_eq!(
        answers(1),
        ["a green circle.", "a green triangle.", "a yellow triangle."]
    );
    // Vision-LLM-Alignment's conversations layout, `<image>` placeholder in the question.
    let r = &d.records[3];
    assert_eq!(r.id.as_deref(), Some("ranked-3"));
    assert_eq!(r.messages[0].content[0], Part::Image);
    assert_eq!(r.ranked_below.len(), 1);
}

#[test]
fn ranked_list_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (body, field) in [
        (r#"{"prompt": "q", "responses": ["only one"]}"#, "responses"),
        (r#"{"prompt": "q", "responses": ["a", 2]}"#, "responses[1]"),
        (
            r#"{"prompt": "q", "responses": ["a", "b"], "scores": [1, 1]}"#,
            "scores",
        ),
        (
            r#"{"prompt": "q", "responses": ["a", "b"], "scores": [1]}"#,
            "scores",
        ),
        (r#"{"prompt": "q"}"#, "responses"),
    ] {
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, format!("{body}\n")).unwrap();
        let err = load_dataset(&path, &LoadOptions::new(DataFormat::Ranked))
            .expect_err(body)
            .to_string();
        assert!(err.contains("bad.jsonl:1:"), "{err}");
        assert!(err.contains(&format!("field `{field}`")), "{body}: {err}");
    }
}
