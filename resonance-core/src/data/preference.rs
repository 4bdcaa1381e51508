//! Published preference datasets and TRL's conversational preference formats.
//!
//! # `vlfeedback_paired`
//!
//! A VLFeedback record (`MMInstruction/VLFeedback`) holds one prompt, one image (`img_path`,
//! relative to the image root) and several `completions`, each rated by GPT-4V in three aspects
//! (`annotations`: `Helpfulness`, `Visual Faithfulness`, `Ethical Considerations`, each
//! `{"Rating": "1".."5", "Rationale"}`). Pairs are formed as VL-RLHF does
//! (`src/vlrlhf/utils/data.py`, `make_vlfeedback_paired_dataset`):
//!
//! * A completion's score is the mean of its ratings over every aspect present. A rating is read
//!   as a number (a numeric string, surrounding spaces allowed, or a JSON number); a completion
//!   with any non-numeric rating (`"N/A"`, an empty string, a missing / null rating or aspect)
//!   or without annotations has no score and takes part in no pair (VL-RLHF skips every pair in
//!   which `float(rating)` raises). Non-finite ratings count as non-numeric.
//! * Every two scored completions `i < j` (in order) form a pair unless their scores tie; the
//!   higher-scored one is chosen. The score gap is `|score_i - score_j|`.
//! * `score_margin = -1` (the default, as in VL-RLHF) keeps the pairs with the largest gap of the
//!   record (all of them if several pairs share it); `score_margin = m >= 0` keeps the pairs
//!   whose gap is at least `m` (VL-RLHF compares with `>=`). Pairs are emitted grouped by gap, in
//!   the order in which each gap value first occurs, pairs of one gap in pair order.
//! * Responses of kept pairs may not hold `<image>` placeholders (an error naming the response);
//!   those of other completions are not looked at.
//! * A record without any kept pair is skipped and counted as
//!   [`RecordErrorKind::NoPair`]; it is not an error.
//!
//! Every pair becomes a conversation `[user: prompt, assistant: chosen]` with the rejected
//! response beside it; all pairs of a record share its `id`, image and source line.
//!
//! # `rlhfv`
//!
//! An RLHF-V record (`openbmb/RLHF-V-Dataset`, published as Parquet) carries its texts in
//! `text`, a JSON *string* `{"question", "chosen", "rejected"}` (VL-RLHF,
//! `make_rlhfv_paired_dataset`, decodes it with `json.loads`). The image is the `image` column
//! (an HF `Image`: embedded bytes are cached, see [`super::parquet`]; without bytes its `path`)
//! or, when `image` is absent or null, `image_path` joined to the image root (what VL-RLHF
//! does). `idx` is the record id. `text` may also be an object, and RLAIF-V's flat layout
//! (`question`, `chosen`, `rejected` as columns) is read too.
//!
//! # `conversational_preference` and conversational `unpaired`
//!
//! TRL's layouts: `prompt` a list of `{"role", "content"}` messages (an optional system turn,
//! then user / assistant turns ending with a user turn), `chosen` / `rejected` (or, unpaired,
//! `completion`) a list holding one assistant message. Message content is read like the `text`
//! format's: a string with optional `<image>` placeholders, or a list of `{"type": "image"}` /
//! `{"type": "text", "text": ..}` items. Images come from `images` (or `image`), or inline
//! paths in the image items. Answers must be text. Without `prompt`, the prompt is the common
//! leading part of `chosen` and `rejected`, as TRL's `extract_prompt` does.

use std::path::Path;

use serde_json::{Map, Value};

use super::error::RecordErrorKind;
use super::format::{
    get_answer, get_array, get_str, json_type, parse_image_list, parse_message, place_images,
    split_placeholders, Images, InlineImages, ParsedRecord, RecordProblem, Res, IMAGE_PLACEHOLDER,
    LARGEST_GAP,
};
use super::record::{Message, Part, Role};

// ---------------------------------------------------------------------------------------------
// vlfeedback_paired

/// One VLFeedback record → its selected preference pairs (never empty: no pair is a
/// [`RecordErrorKind::NoPair`] problem).
pub(super) fn parse_vlfeedback(
    obj: &Map<String, Value>,
    image_root: &Path,
    score_margin: f64,
) -> Res<Vec<ParsedRecord>> {
    let prompt = get_str(obj, "prompt", "prompt")?;
    let image_key = if obj.get("image").is_some_and(|v| !v.is_null()) {
        "image"
    } else {
        "img_path"
    };
    let (images, image_fields) = parse_image_list(obj, image_key, image_root)?;
    let completions = get_array(obj, "completions")?;
    let mut responses = Vec::with_capacity(completions.len());
    let mut scores = Vec::with_capacity(completions.len());
    for (i, c) in completions.iter().enumerate() {
        let field = format!("completions[{i}]");
        let c = c.as_object().ok_or_else(|| {
            RecordProblem::invalid(
                &field,
                format!("expected an object, found {}", json_type(c)),
            )
        })?;
        responses.push(get_str(c, "response", &format!("{field}.response"))?);
        scores.push(completion_score(c.get("annotations"), &field)?);
    }

    let pairs = select_pairs(&scores, score_margin).map_err(|why| {
        RecordProblem::new(
            RecordErrorKind::NoPair,
            "completions",
            format!("no preference pair: {why}"),
        )
    })?;

    let template = ParsedRecord {
        id: None,
        images,
        image_fields,
        messages: vec![Message {
            role: Role::User,
            content: split_placeholders(prompt, IMAGE_PLACEHOLDER),
        }],
        rejected: None,
        label: None,
        ranked_below: Vec::new(),
        reference_logps: None,
    };
    // Only the responses that are trained on must be free of image placeholders.
    for &(chosen, rejected) in &pairs {
        for i in [chosen, rejected] {
            if responses[i].contains(IMAGE_PLACEHOLDER) {
                return Err(RecordProblem::invalid(
                    format!("completions[{i}].response"),
                    format!("answers cannot hold images (`{IMAGE_PLACEHOLDER}`)"),
                ));
            }
        }
    }
    let mut out = Vec::with_capacity(pairs.len());
    for (chosen, rejected) in pairs {
        let mut rec = template.clone();
        rec.messages
            .push(Message::text(Role::Assistant, responses[chosen]));
        rec.rejected = Some(responses[rejected].to_string());
        place_images(&mut rec, image_key, IMAGE_PLACEHOLDER)?;
        out.push(rec);
    }
    Ok(out)
}

/// Like [`get_answer`] for a field of a nested object, named `field` in errors.
fn get_answer_at<'a>(obj: &'a Map<String, Value>, key: &str, field: &str) -> Res<&'a str> {
    let text = get_str(obj, key, field)?;
    if text.contains(IMAGE_PLACEHOLDER) {
        return Err(RecordProblem::invalid(
            field,
            format!("answers cannot hold images (`{IMAGE_PLACEHOLDER}`)"),
        ));
    }
    Ok(text)
}

/// The mean rating of one completion over all its aspects, or `None` when some rating is not
/// numeric (or there are none). Structural problems (an `annotations` that is not an object, an
/// aspect that is neither an object nor null, a rating that is neither a string nor a number)
/// are errors.
fn completion_score(annotations: Option<&Value>, field: &str) -> Res<Option<f64>> {
    let aspects = match annotations {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(a)) => a,
        Some(other) => {
            return Err(RecordProblem::invalid(
                format!("{field}.annotations"),
                format!(
                    "expected an object of rated aspects, found {}",
                    json_type(other)
                ),
            ))
        }
    };
    let mut sum = 0.0f64;
    let mut n = 0usize;
    let mut numeric = true;
    for (aspect, value) in aspects {
        let afield = format!("{field}.annotations.{aspect}");
        let rating = match value {
            Value::Null => None,
            Value::Object(a) => a.get("Rating"),
            other => {
                return Err(RecordProblem::invalid(
                    afield,
                    format!(
                        "expected an object {{\"Rating\", \"Rationale\"}}, found {}",
                        json_type(other)
                    ),
                ))
            }
        };
        let r = match rating {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(Value::Number(x)) => x.as_f64(),
            Some(other) => {
                return Err(RecordProblem::invalid(
                    format!("{afield}.Rating"),
                    format!(
                        "expected a rating (a number or a numeric string), found {}",
                        json_type(other)
                    ),
                ))
            }
        };
        // Keep reading: a later aspect may still be structurally wrong.
        match r.filter(|x| x.is_finite()) {
            Some(x) => {
                // numpy's mean over < 8 values: a plain left-to-right sum, then one division.
                sum += x;
                n += 1;
            }
            None => numeric = false,
        }
    }
    Ok((numeric && n > 0).then(|| sum / n as f64))
}

/// The (chosen, rejected) completion indices kept under `score_margin`, or why there are none.
fn select_pairs(scores: &[Option<f64>], score_margin: f64) -> Result<Vec<(usize, usize)>, String> {
    // Pairs grouped by gap, groups in order of the gap's first occurrence.
    let mut groups: Vec<(f64, Vec<(usize, usize)>)> = Vec::new();
    for i in 0..scores.len() {
        for j in i + 1..scores.len() {
            let (Some(a), Some(b)) = (scores[i], scores[j]) else {
                continue;
            };
            let pair = if a > b {
                (i, j)
            } else if b > a {
                (j, i)
            } else {
                continue;
            };
            let gap = (a - b).abs();
            match groups.iter_mut().find(|(g, _)| *g == gap) {
                Some((_, pairs)) => pairs.push(pair),
                None => groups.push((gap, vec![pair])),
            }
        }
    }
    if groups.is_empty() {
        let scored = scores.iter().filter(|s| s.is_some()).count();
        return Err(if scored < 2 {
            format!(
                "{scored} of {} completions have numeric ratings in every aspect, at least 2 \
                 are needed",
                scores.len()
            )
        } else {
            format!("the {scored} completions with numeric ratings all have the same score")
        });
    }
    let kept: Vec<(usize, usize)> = if score_margin == LARGEST_GAP {
        let max = groups.iter().map(|(g, _)| *g).fold(f64::MIN, f64::max);
        groups
            .into_iter()
            .filter(|(g, _)| *g == max)
            .flat_map(|(_, p)| p)
            .collect()
    } else {
        let max = groups.iter().map(|(g, _)| *g).fold(f64::MIN, f64::max);
        let kept: Vec<(usize, usize)> = groups
            .into_iter()
            .filter(|(g, _)| *g >= score_margin)
            .flat_map(|(_, p)| p)
            .collect();
        if kept.is_empty() {
            return Err(format!(
                "no score gap reaches score_margin = {score_margin} (the largest is {max})"
            ));
        }
        kept
    };
    Ok(kept)
}

// ---------------------------------------------------------------------------------------------
// rlhfv

/// One RLHF-V record.
pub(super) fn parse_rlhfv(obj: &Map<String, Value>, image_root: &Path) -> Res<ParsedRecord> {
    let decoded;
    let (texts, prefix) = match obj.get("text") {
        Some(Value::String(s)) => {
            decoded = serde_json::from_str::<Value>(s).map_err(|e| {
                RecordProblem::invalid(
                    "text",
                    format!(
                        "expected a JSON string {{\"question\", \"chosen\", \"rejected\"}}: {e}"
                    ),
                )
            })?;
            match &decoded {
                Value::Object(o) => (o, "text."),
                other => {
                    return Err(RecordProblem::invalid(
                        "text",
                        format!(
                            "expected the JSON of an object {{\"question\", \"chosen\", \
                             \"rejected\"}}, found {}",
                            json_type(other)
                        ),
                    ))
                }
            }
        }
        Some(Value::Object(o)) => (o, "text."),
        None if obj.contains_key("question") => (obj, ""),
        None => return Err(RecordProblem::invalid("text", "missing")),
        Some(other) => {
            return Err(RecordProblem::invalid(
                "text",
                format!(
                    "expected a JSON string {{\"question\", \"chosen\", \"rejected\"}}, found {}",
                    json_type(other)
                ),
            ))
        }
    };
    let question = get_str(texts, "question", &format!("{prefix}question"))?;
    let chosen = get_answer_at(texts, "chosen", &format!("{prefix}chosen"))?;
    let rejected = get_answer_at(texts, "rejected", &format!("{prefix}rejected"))?;
    let image_key = if obj.get("image").is_some_and(|v| !v.is_null()) {
        "image"
    } else {
        "image_path"
    };
    let (images, image_fields) = parse_image_list(obj, image_key, image_root)?;
    let id = match obj.get("idx") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => {
            return Err(RecordProblem::invalid(
                "idx",
                format!("expected a string or a number, found {}", json_type(other)),
            ))
        }
    };
    let mut rec = ParsedRecord {
        id,
        images,
        image_fields,
        messages: vec![
            Message {
                role: Role::User,
                content: split_placeholders(question, IMAGE_PLACEHOLDER),
            },
            Message::text(Role::Assistant, chosen),
        ],
        rejected: Some(rejected.to_string()),
        label: None,
        ranked_below: Vec::new(),
        reference_logps: None,
    };
    place_images(&mut rec, image_key, IMAGE_PLACEHOLDER)?;
    Ok(rec)
}

// ---------------------------------------------------------------------------------------------
// TRL conversational

/// Images of a conversational record: the `images` (or `image`) list and inline paths.
struct ConvImages {
    key: &'static str,
    has_list: bool,
    images: Images,
    inline: InlineImages,
}

impl ConvImages {
    fn new(obj: &Map<String, Value>, image_root: &Path) -> Res<Self> {
        let key = if obj.contains_key("image") && !obj.contains_key("images") {
            "image"
        } else {
            "images"
        };
        let (paths, fields) = parse_image_list(obj, key, image_root)?;
        Ok(ConvImages {
            key,
            has_list: obj.get(key).is_some_and(|v| !v.is_null()),
            images: Images { paths, fields },
            inline: InlineImages::default(),
        })
    }

    /// The messages of `items` (a JSON array at `field`), element `k` named `{field}[{k + offset}]`.
    fn messages(
        &mut self,
        items: &[Value],
        field: &str,
        offset: usize,
        image_root: &Path,
    ) -> Res<Vec<Message>> {
        items
            .iter()
            .enumerate()
            .map(|(k, m)| {
                parse_message(
                    m,
                    &format!("{field}[{}]", k + offset),
                    image_root,
                    &mut self.inline,
                    &mut self.images,
                )
            })
            .collect()
    }

    /// The record from its prompt messages and the final answer.
    fn finish(
        self,
        mut messages: Vec<Message>,
        answer: String,
        rejected: Option<String>,
        label: Option<bool>,
    ) -> Res<ParsedRecord> {
        self.inline.check(self.has_list)?;
        messages.push(Message::text(Role::Assistant, answer));
        let mut rec = ParsedRecord {
            id: None,
            images: self.images.paths,
            image_fields: self.images.fields,
            messages,
            rejected,
            label,
            ranked_below: Vec::new(),
            reference_logps: None,
        };
        place_images(&mut rec, self.key, IMAGE_PLACEHOLDER)?;
        Ok(rec)
    }
}

/// A message list field (`prompt`, `chosen`, ...).
fn message_list<'a>(obj: &'a Map<String, Value>, key: &str) -> Res<&'a [Value]> {
    match obj.get(key) {
        Some(Value::Array(a)) => Ok(a),
        None => Err(RecordProblem::invalid(key, "missing")),
        Some(other) => Err(RecordProblem::invalid(
            key,
            format!(
                "expected a list of {{\"role\", \"content\"}} messages, found {}",
                json_type(other)
            ),
        )),
    }
}

/// The text of an answer: `items` must be one assistant message with text-only content.
fn answer_text(items: &[Value], field: &str, offset: usize, image_root: &Path) -> Res<String> {
    if items.len() != 1 {
        return Err(RecordProblem::invalid(
            field,
            format!(
                "expected exactly one assistant message, found {} messages (multi-turn answers \
                 are not supported)",
                items.len()
            ),
        ));
    }
    // Parse into a scratch image list: answers may not hold images at all.
    let mut scratch = ConvImages {
        key: "images",
        has_list: false,
        images: Images::default(),
        inline: InlineImages::default(),
    };
    let msg = scratch
        .messages(items, field, offset, image_root)?
        .remove(0);
    let mfield = format!("{field}[{offset}]");
    if msg.role != Role::Assistant {
        return Err(RecordProblem::new(
            RecordErrorKind::RoleOrder,
            format!("{mfield}.role"),
            format!(
                "the answer must be an assistant message, found {}",
                msg.role
            ),
        ));
    }
    if msg.content.iter().any(|p| matches!(p, Part::Image)) {
        return Err(RecordProblem::invalid(
            format!("{mfield}.content"),
            "answers cannot hold images",
        ));
    }
    Ok(msg.text_content())
}

/// TRL conversational preference: `{prompt?, chosen, rejected, images?}`.
pub(super) fn parse_conversational(
    obj: &Map<String, Value>,
    image_root: &Path,
) -> Res<ParsedRecord> {
    let mut conv = ConvImages::new(obj, image_root)?;
    let chosen = message_list(obj, "chosen")?;
    let rejected = message_list(obj, "rejected")?;
    let (prompt, start) = match obj.get("prompt") {
        Some(_) => (
            conv.messages(message_list(obj, "prompt")?, "prompt", 0, image_root)?,
            0,
        ),
        None => {
            // Implicit prompt: the common leading messages of chosen and rejected.
            let common = chosen
                .iter()
                .zip(rejected)
                .take_while(|(c, r)| c == r)
                .count();
            if common == 0 {
                return Err(RecordProblem::invalid(
                    "prompt",
                    "missing, and `chosen` and `rejected` share no leading messages to take it \
                     from",
                ));
            }
            (
                conv.messages(&chosen[..common], "chosen", 0, image_root)?,
                common,
            )
        }
    };
    let chosen_text = answer_text(&chosen[start..], "chosen", start, image_root)?;
    let rejected_text = answer_text(&rejected[start..], "rejected", start, image_root)?;
    conv.finish(prompt, chosen_text, Some(rejected_text), None)
}

/// TRL conversational unpaired preference: `{prompt: [...], completion: [...], label}`
/// (`prompt` may also be a string).
pub(super) fn parse_conversational_unpaired(
    obj: &Map<String, Value>,
    image_root: &Path,
    label: bool,
) -> Res<ParsedRecord> {
    let mut conv = ConvImages::new(obj, image_root)?;
    let prompt = match obj.get("prompt") {
        Some(Value::String(s)) => vec![Message {
            role: Role::User,
            content: split_placeholders(s, IMAGE_PLACEHOLDER),
        }],
        _ => conv.messages(message_list(obj, "prompt")?, "prompt", 0, image_root)?,
    };
    let answer = match obj.get("completion") {
        Some(Value::String(_)) => get_answer(obj, "completion")?.to_string(),
        _ => answer_text(
            message_list(obj, "completion")?,
            "completion",
            0,
            image_root,
        )?,
    };
    conv.finish(prompt, answer, None, Some(label))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::format::{parse_record, parse_records, DataFormat, ParseOptions};
    use serde_json::json;
    use std::path::PathBuf;

    fn root() -> PathBuf {
        PathBuf::from("/img")
    }

    fn comp(response: &str, ratings: [&str; 3]) -> Value {
        json!({"model": "m", "response": response, "annotations": {
            "Helpfulness": {"Rating": ratings[0], "Rationale": "."},
            "Ethical Considerations": {"Rating": ratings[1], "Rationale": "."},
            "Visual Faithfulness": {"Rating": ratings[2], "Rationale": "."}}})
    }

    fn pairs(v: &Value, margin: f64) -> Vec<(String, String)> {
        parse_records(
            DataFormat::VlfeedbackPaired,
            v,
            &root(),
            &ParseOptions {
                score_margin: margin,
            },
        )
        .unwrap()
        .into_iter()
        .map(|r| (r.messages[1].text_content(), r.rejected.unwrap()))
        .collect()
    }

    #[test]
    fn vlfeedback_pairs_follow_vl_rlhf() {
        // Scores: a 4, b 2, c 3, d N/A, e 4 (ties a).
        let v = json!({"id": "r1", "prompt": "Describe.", "img_path": "x.jpg", "completions": [
            comp("a", ["4", "4", "4"]), comp("b", ["2", "2", "2"]), comp("c", ["3", "3", "3"]),
            comp("d", ["N/A", "5", "5"]), comp("e", ["5", "3", "4"])]});
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        // Gap 2: (a, b), (e, b); gap 1: (a, c), (c, b), (e, c); d has no score, a and e tie.
        assert_eq!(pairs(&v, -1.0), vec![s("a", "b"), s("e", "b")]);
        assert_eq!(
            pairs(&v, 0.0),
            vec![
                s("a", "b"),
                s("e", "b"),
                s("a", "c"),
                s("c", "b"),
                s("e", "c")
            ]
        );
        assert_eq!(pairs(&v, 1.5), vec![s("a", "b"), s("e", "b")]);
        let r = &parse_records(
            DataFormat::VlfeedbackPaired,
            &v,
            &root(),
            &ParseOptions::default(),
        )
        .unwrap()[0];
        assert_eq!(r.id.as_deref(), Some("r1"));
        assert_eq!(r.images, vec![PathBuf::from("/img/x.jpg")]);
        assert_eq!(
            r.messages[0].content,
            vec![Part::Image, Part::Text("Describe.".into())]
        );
    }

    #[test]
    fn vlfeedback_without_pairs_is_a_no_pair_problem() {
        let v = json!({"prompt": "p", "completions": [
            comp("a", ["4", "4", "4"]), comp("b", ["N/A", "4", "4"])]});
        let e = parse_record(DataFormat::VlfeedbackPaired, &v, &root()).unwrap_err();
        assert_eq!(e.kind, RecordErrorKind::NoPair);
        assert_eq!(e.field.as_deref(), Some("completions"));
        assert!(e.message.contains("1 of 2 completions"), "{}", e.message);

        let v = json!({"prompt": "p", "completions": [
            comp("a", ["4", "4", "4"]), comp("b", ["4", "4", "4"])]});
        let e = parse_record(DataFormat::VlfeedbackPaired, &v, &root()).unwrap_err();
        assert!(e.message.contains("same score"), "{}", e.message);

        let v = json!({"prompt": "p", "completions": [
            comp("a", ["4", "4", "4"]), comp("b", ["3", "4", "4"])]});
        let e = parse_records(
            DataFormat::VlfeedbackPaired,
            &v,
            &root(),
            &ParseOptions { score_margin: 1.0 },
        )
        .unwrap_err();
        assert!(e.message.contains("score_margin = 1"), "{}", e.message);
    }

    #[test]
    fn vlfeedback_structural_errors_name_the_field() {
        let v = json!({"prompt": "p", "completions": [
            comp("a", ["4", "4", "4"]), {"response": "b", "annotations": {"Helpfulness": 3}}]});
        let e = parse_record(DataFormat::VlfeedbackPaired, &v, &root()).unwrap_err();
        assert_eq!(
            e.field.as_deref(),
            Some("completions[1].annotations.Helpfulness")
        );
        let v = json!({"prompt": "p", "completions": [{"annotations": {}}]});
        let e = parse_record(DataFormat::VlfeedbackPaired, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("completions[0].response"));
        assert_eq!(e.message, "missing");
    }

    #[test]
    fn placeholders_only_matter_in_kept_answers() {
        // `c` is never in a kept pair (largest gap: a over b), so its `<image>` is harmless.
        let v = json!({"prompt": "p", "completions": [
            comp("a", ["5", "5", "5"]), comp("b", ["1", "1", "1"]),
            comp("see <image>", ["3", "3", "3"])]});
        assert_eq!(pairs(&v, -1.0), vec![("a".to_string(), "b".to_string())]);
        let e = parse_records(
            DataFormat::VlfeedbackPaired,
            &v,
            &root(),
            &ParseOptions { score_margin: 0.0 },
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("completions[2].response"));
    }

    #[test]
    fn ratings_numbers_spaces_and_nulls() {
        let f = "completions[0]";
        let ann = json!({"A": {"Rating": " 4 "}, "B": {"Rating": 5}, "C": {"Rating": "3.0"}});
        assert_eq!(completion_score(Some(&ann), f).unwrap(), Some(4.0));
        let ann = json!({"A": {"Rating": "4"}, "B": null});
        assert_eq!(completion_score(Some(&ann), f).unwrap(), None);
        let ann = json!({"A": {"Rating": "nan"}});
        assert_eq!(completion_score(Some(&ann), f).unwrap(), None);
        assert_eq!(completion_score(Some(&json!({})), f).unwrap(), None);
        assert_eq!(completion_score(None, f).unwrap(), None);
        let e = completion_score(Some(&json!({"A": {"Rating": true}})), f).unwrap_err();
        assert_eq!(
            e.field.as_deref(),
            Some("completions[0].annotations.A.Rating")
        );
    }

    #[test]
    fn rlhfv_text_is_a_json_string() {
        let v = json!({"ds_name": "RLHF-V", "image": {"bytes": null, "path": "a.jpg"},
            "text": "{\"question\": \"What?\", \"chosen\": \"A.\", \"rejected\": \"B.\"}",
            "idx": 7, "image_path": "ignored.jpg"});
        let r = parse_record(DataFormat::Rlhfv, &v, &root()).unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(r.images, vec![PathBuf::from("/img/a.jpg")]);
        assert_eq!(r.messages[1].text_content(), "A.");
        assert_eq!(r.rejected.as_deref(), Some("B."));

        let v = json!({"text": "{\"question\": \"What?\", \"chosen\": \"A.\"}",
            "image_path": "b.jpg"});
        let e = parse_record(DataFormat::Rlhfv, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("text.rejected"));
        let v = json!({"text": "{not json", "image_path": "b.jpg"});
        let e = parse_record(DataFormat::Rlhfv, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("text"));
        // Without `image`: image_path, as VL-RLHF.
        let v = json!({"text": "{\"question\": \"Q\", \"chosen\": \"A\", \"rejected\": \"B\"}",
            "image": null, "image_path": "b.jpg"});
        let r = parse_record(DataFormat::Rlhfv, &v, &root()).unwrap();
        assert_eq!(r.images, vec![PathBuf::from("/img/b.jpg")]);
    }

    #[test]
    fn conversational_explicit_and_implicit_prompt() {
        let v = json!({"images": ["a.png", "b.png"], "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And"}, {"type": "image"}]},
            {"role": "assistant", "content": "Two squares."},
            {"role": "user", "content": "Which is red?"}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "The first."}]}],
            "rejected": [{"role": "assistant", "content": "The second."}]});
        let r = parse_record(DataFormat::ConversationalPreference, &v, &root()).unwrap();
        assert_eq!(r.messages.len(), 5);
        assert_eq!(r.messages[0].role, Role::System);
        assert_eq!(r.messages[1].num_images(), 2);
        assert_eq!(r.messages[4].text_content(), "The first.");
        assert_eq!(r.rejected.as_deref(), Some("The second."));

        let v = json!({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                       "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}]});
        let r = parse_record(DataFormat::ConversationalPreference, &v, &root()).unwrap();
        assert_eq!(r.messages.len(), 2);
        assert_eq!(r.rejected.as_deref(), Some("Go away"));
    }

    #[test]
    fn conversational_errors() {
        let v = json!({"prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "user", "content": "x"}],
            "rejected": [{"role": "assistant", "content": "y"}]});
        let e = parse_record(DataFormat::ConversationalPreference, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("chosen[0].role"));
        let v = json!({"prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "z"}],
            "rejected": [{"role": "assistant", "content": "y"}]});
        let e = parse_record(DataFormat::ConversationalPreference, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("chosen"));
        let v = json!({"prompt": [{"role": "assistant", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "x"}],
            "rejected": [{"role": "assistant", "content": "y"}]});
        let e = parse_record(DataFormat::ConversationalPreference, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("prompt[0].role"));
        let v = json!({"prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": [{"type": "image"}]}],
            "rejected": [{"role": "assistant", "content": "y"}]});
        let e = parse_record(DataFormat::ConversationalPreference, &v, &root()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("chosen[0].content"));
    }

    #[test]
    fn unpaired_conversational() {
        let v = json!({"image": "a.png", "prompt": [{"role": "user", "content": "Colour?"}],
            "completion": [{"role": "assistant", "content": "Red."}], "label": false});
        let r = parse_record(DataFormat::Unpaired, &v, &root()).unwrap();
        assert_eq!(r.label, Some(false));
        assert_eq!(r.images, vec![PathBuf::from("/img/a.png")]);
        assert_eq!(
            r.messages[0].content,
            vec![Part::Image, Part::Text("Colour?".into())]
        );
        assert_eq!(r.messages[1].text_content(), "Red.");
    }
}
