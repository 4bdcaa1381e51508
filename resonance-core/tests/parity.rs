//! Parity with the Python reference (transformers 5.23, torch 2.15 / torchvision 0.29 on an
//! AVX-512 CPU, Pillow 13): fixtures written by `tests/fixtures/generate.py` and by the
//! workspace's `fixtures/generate.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use resonance_core::image::{center_crop, resize};
use resonance_core::{
    load_image_with, AlphaMode, ChatTemplate, ClipImageProcessor, ConfigBosEos, CoreError,
    ImageProcessorConfig, LoadOptions, ProcessorBackend, Resample, RgbImage, SpecialTokens,
    TextTokenizer, TokenizerOptions,
};
use safetensors::SafeTensors;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn workspace_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

struct Tensors {
    bytes: Vec<u8>,
}

impl Tensors {
    fn open(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Tensors { bytes }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    fn metadata(&self, key: &str) -> Value {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        let m = meta.metadata().as_ref().unwrap();
        serde_json::from_str(&m[key]).unwrap()
    }

    fn u8(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("missing tensor {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::U8, "{name}");
        (t.shape().to_vec(), t.data().to_vec())
    }

    fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("missing tensor {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        let data = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (t.shape().to_vec(), data)
    }
}

fn rgb_from(shape: &[usize], data: Vec<u8>) -> RgbImage {
    assert_eq!(shape.len(), 3);
    RgbImage::from_raw(shape[1], shape[0], data).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn resize_matches_pil_and_torchvision_exactly() {
    // RESONANCE_RESIZE_CASES may point at a larger file made with
    // `generate.py --only resize --resize-cases N --max-in A --max-out B --out DIR`.
    let path = std::env::var_os("RESONANCE_RESIZE_CASES")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixtures().join("resize_cases.safetensors"));
    let t = Tensors::open(&path);
    let cases = t.metadata("cases");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut mismatched = Vec::new();
    let mut compared = 0;
    for (i, case) in cases.iter().enumerate() {
        let (shape, data) = t.u8(&format!("{i}.input"));
        let img = rgb_from(&shape, data);
        let ow = case["out_width"].as_u64().unwrap() as usize;
        let oh = case["out_height"].as_u64().unwrap() as usize;
        for (bname, backend) in [
            ("pil", ProcessorBackend::Pil),
            ("torchvision", ProcessorBackend::Torchvision),
        ] {
            for (fname, filter) in [
                ("bilinear", Resample::Bilinear),
                ("bicubic", Resample::Bicubic),
            ] {
                let (eshape, expected) = t.u8(&format!("{i}.{bname}.{fname}"));
                assert_eq!(eshape, vec![oh, ow, 3]);
                let got = resize(&img, ow, oh, filter, backend).unwrap();
                compared += 1;
                let diff = got
                    .as_raw()
                    .iter()
                    .zip(&expected)
                    .filter(|(a, b)| a != b)
                    .count();
                if diff > 0 {
                    let maxd = got
                        .as_raw()
                        .iter()
                        .zip(&expected)
                        .map(|(a, b)| (i16::from(*a) - i16::from(*b)).abs())
                        .max()
                        .unwrap_or(0);
                    mismatched.push(format!(
                        "case {i} {}x{} -> {ow}x{oh} {bname} {fname}: {diff} values differ (max {maxd})",
                        img.width(),
                        img.height()
                    ));
                }
            }
        }
    }
    assert!(compared >= 80);
    assert!(mismatched.is_empty(), "{}", mismatched.join("\n"));
}

#[test]
fn clip_and_llava_processors_match_fast_and_slow() {
    let t = Tensors::open(&fixtures().join("processor_cases.safetensors"));
    let meta = t.metadata("meta");
    let configs = meta["configs"].as_object().unwrap();
    let images = meta["images"].as_array().unwrap();
    let mut report = Vec::new();
    for (name, cfg) in configs {
        let mut cfg = cfg.clone();
        if name.starts_with("llava") {
            cfg["image_processor_type"] = Value::from("LlavaImageProcessor");
        }
        let config = ImageProcessorConfig::from_json(&cfg, Path::new(name), "").unwrap();
        for img_meta in images {
            let key = img_meta["image"].as_str().unwrap();
            let (shape, data) = t.u8(key);
            let img = rgb_from(&shape, data);
            for (suffix, backend) in [
                ("fast", ProcessorBackend::Torchvision),
                ("slow", ProcessorBackend::Pil),
            ] {
                let (eshape, expected) = t.f32(&format!("{name}.{key}.{suffix}"));
                let p = ClipImageProcessor::new(config.clone()).with_backend(backend);
                let got = p.preprocess(&img).unwrap();
                assert_eq!(
                    vec![got.channels, got.height, got.width],
                    eshape,
                    "{name} {key}"
                );
                let d = max_abs_diff(&got.data, &expected);
                report.push(format!("{name} {key} {suffix}: max|Δ| = {d:e}"));
                assert_eq!(d, 0.0, "{name} {key} {suffix}: max|Δ| = {d}");
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// The workspace fixtures (`fixtures/images`, generated with the tiny-llava processor config):
/// transformers is handed `Image.open(path)`, so transparency is composited onto white.
#[test]
fn workspace_image_fixtures_match_transformers() {
    let dir = workspace_fixtures();
    let images = dir.join("images");
    let expected = Tensors::open(&images.join("expected_pixels.safetensors"));
    let processor = ClipImageProcessor::from_dir(&dir.join("tiny-llava")).unwrap();
    let opts = LoadOptions {
        alpha: AlphaMode::CompositeOnWhite,
        apply_exif_orientation: false,
    };
    let mut report = Vec::new();
    let mut worst: HashMap<&str, f32> = HashMap::new();
    for (stem, file) in [
        ("gradient_48x36", "gradient_48x36.png"),
        ("stripes_25x40", "stripes_25x40.png"),
        ("alpha_32x32", "alpha_32x32.png"),
        ("gray_40x30", "gray_40x30.png"),
        ("photo_36x28", "photo_36x28.jpg"),
    ] {
        let img = load_image_with(&images.join(file), &opts).unwrap();
        for (suffix, backend) in [
            ("fast", ProcessorBackend::Torchvision),
            ("slow", ProcessorBackend::Pil),
        ] {
            let (shape, want) = expected.f32(&format!("{stem}.{suffix}"));
            assert_eq!(shape, vec![1, 3, 30, 30]);
            let got = processor
                .clone()
                .with_backend(backend)
                .preprocess(&img)
                .unwrap();
            let d = max_abs_diff(&got.data, &want);
            report.push(format!("{stem}.{suffix}: max|Δ| = {d:e}"));
            let w = worst.entry(suffix).or_insert(0.0);
            *w = w.max(d);
            if stem == "photo_36x28" {
                // JPEG: the image crate's decoder (zune-jpeg) and libjpeg-turbo may differ by a
                // level or two in a few pixels; everything after decoding is exact.
                assert!(d < 0.1, "{stem}.{suffix}: max|Δ| = {d}");
            } else {
                assert_eq!(d, 0.0, "{stem}.{suffix}: max|Δ| = {d}");
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    eprintln!("worst: {worst:?}");
}

#[test]
fn decoding_matches_pil_for_lossless_files() {
    let images = workspace_fixtures().join("images");
    let expected = Tensors::open(&images.join("expected_pixels.safetensors"));
    let raw = LoadOptions {
        alpha: AlphaMode::Drop,
        apply_exif_orientation: false,
    };
    for stem in ["gradient_48x36", "stripes_25x40"] {
        let img = load_image_with(&images.join(format!("{stem}.png")), &raw).unwrap();
        let (shape, want) = expected.u8(&format!("{stem}.decoded"));
        assert_eq!(shape, vec![img.height(), img.width(), 3]);
        assert_eq!(img.as_raw(), &want[..], "{stem}");
    }
    // Grey: PIL mode L, replicated to RGB.
    let img = load_image_with(&images.join("gray_40x30.png"), &raw).unwrap();
    let (_, want) = expected.u8("gray_40x30.decoded");
    let grey: Vec<u8> = img.as_raw().chunks_exact(3).map(|p| p[0]).collect();
    assert_eq!(grey, want);
    // RGBA: convert("RGB") drops alpha.
    let img = load_image_with(&images.join("alpha_32x32.png"), &raw).unwrap();
    let (_, want) = expected.u8("alpha_32x32.decoded");
    let rgb: Vec<u8> = want
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    assert_eq!(img.as_raw(), &rgb[..]);
    // Not an image: the error names the file.
    let bad = images.join("not_an_image.png");
    let err = load_image_with(&bad, &raw).unwrap_err();
    assert!(matches!(err, CoreError::Image { .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("{}: not a decodable image (", bad.display())),
        "{err}"
    );
}

#[test]
fn center_crop_fixture_sanity() {
    // A crop larger than the image pads with zeros (normalised to -mean/std later).
    let img = RgbImage::filled(3, 3, [255, 255, 255]);
    let c = center_crop(&img, 4, 4, ProcessorBackend::Torchvision);
    assert_eq!(c.get_pixel(0, 0), Some([255, 255, 255]));
    assert_eq!(c.get_pixel(3, 3), Some([0, 0, 0]));
    let c = center_crop(&img, 4, 4, ProcessorBackend::Pil);
    assert_eq!(c.get_pixel(0, 0), Some([0, 0, 0]));
    assert_eq!(c.get_pixel(3, 3), Some([255, 255, 255]));
}

#[test]
fn chat_templates_match_transformers() {
    let text = std::fs::read_to_string(fixtures().join("chat_templates.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 10);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let mut special = SpecialTokens::default();
        for (k, v) in case["special_tokens"].as_object().unwrap() {
            let v = Some(v.as_str().unwrap().to_string());
            match k.as_str() {
                "bos_token" => special.bos_token = v,
                "eos_token" => special.eos_token = v,
                "unk_token" => special.unk_token = v,
                "pad_token" => special.pad_token = v,
                other => panic!("unexpected special token {other}"),
            }
        }
        let t =
            ChatTemplate::from_source(name, case["template"].as_str().unwrap(), special).unwrap();
        let extra = case["extra_context"].clone();
        let got = t.render(
            &case["messages"],
            case["add_generation_prompt"].as_bool().unwrap(),
            Some(&extra),
        );
        if let Some(want) = case.get("expected") {
            let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, want.as_str().unwrap(), "{name}");
        } else {
            let want = case["expected_error"].as_str().unwrap();
            match got {
                Err(CoreError::TemplateRaised { message, .. }) => {
                    assert_eq!(message, want, "{name}")
                }
                other => panic!("{name}: expected raise_exception({want:?}), got {other:?}"),
            }
        }
    }
}

#[test]
fn workspace_tiny_llava_template_renders() {
    let dir = workspace_fixtures().join("tiny-llava");
    let t = ChatTemplate::from_dir(&dir)
        .unwrap()
        .expect("tiny-llava has a chat template");
    assert!(t.origin().ends_with("chat_template.jinja"));
    let msgs = serde_json::json!([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]},
        {"role": "assistant", "content": "A square."}
    ]);
    assert_eq!(
        t.render(&msgs, false, None).unwrap(),
        "USER: <image>\nWhat is in this image? ASSISTANT: A square.</s>"
    );
    let bad = serde_json::json!([{"role": "robot", "content": "x"}]);
    match t.render(&bad, false, None) {
        Err(CoreError::TemplateRaised { message, .. }) => {
            assert_eq!(message, "Unsupported role: robot")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn tokenizers_match_transformers() {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    for name in ["tokenizer", "tokenizer_no_pp"] {
        let summary = &all[name];
        let dir = fixtures().join(name);
        // transformers 5 semantics.
        let v5 = TextTokenizer::from_dir_with(
            &dir,
            &TokenizerOptions {
                config_bos_eos: ConfigBosEos::Ignore,
            },
        )
        .unwrap();
        let default = TextTokenizer::from_dir(&dir).unwrap();
        assert_eq!(
            u64::from(v5.bos_token_id().unwrap()),
            summary["bos_token_id"].as_u64().unwrap()
        );
        assert_eq!(
            u64::from(v5.eos_token_id().unwrap()),
            summary["eos_token_id"].as_u64().unwrap()
        );
        assert_eq!(
            u64::from(v5.pad_token_id().unwrap()),
            summary["pad_token_id"].as_u64().unwrap()
        );
        assert_eq!(
            u64::from(v5.unk_token_id().unwrap()),
            summary["unk_token_id"].as_u64().unwrap()
        );
        assert_eq!(
            v5.vocab_size() as u64,
            summary["vocab_size"].as_u64().unwrap()
        );
        assert_eq!(
            v5.vocab_size_with_added_tokens() as u64,
            summary["len"].as_u64().unwrap()
        );
        assert_eq!(v5.eos_token_ids(), vec![2, 4]);
        for case in summary["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let plain: Vec<u32> = serde_json::from_value(case["ids_no_special"].clone()).unwrap();
            assert_eq!(v5.encode(text, true).unwrap(), ids, "{name}: {text:?}");
            assert_eq!(v5.encode(text, false).unwrap(), plain, "{name}: {text:?}");
            assert_eq!(
                default.encode(text, false).unwrap(),
                plain,
                "{name}: {text:?}"
            );
            assert_eq!(
                v5.decode(&ids, false).unwrap(),
                case["decoded"].as_str().unwrap()
            );
            assert_eq!(
                v5.decode(&ids, true).unwrap(),
                case["decoded_skip"].as_str().unwrap()
            );
            let with_default = default.encode(text, true).unwrap();
            if name == "tokenizer_no_pp" {
                // add_bos_token: true and no post-processor: BOS is prepended by default (the
                // transformers 4 Llama behaviour), not by transformers 5.
                let mut want = vec![1];
                want.extend(&ids);
                assert_eq!(with_default, want, "{text:?}");
            } else {
                assert_eq!(with_default, ids, "{text:?}");
            }
        }
    }
}
