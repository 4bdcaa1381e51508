//! Broken checkpoints and inputs give errors that name the problem, never a panic.

mod common;

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Device;
use common::fixtures;
use resonance_models::load::resolve_model_in;
use resonance_models::processor::Processor;
use resonance_models::registry::AnyModel;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Raw tensors of a checkpoint: name → (dtype, shape, bytes).
type RawTensors = HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Rewrites `model.safetensors` of `dir` through `edit`.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut RawTensors)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: RawTensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn load_error(dir: &Path) -> String {
    AnyModel::load(dir, &Device::flex())
        .expect_err("loading must fail")
        .to_string()
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny-llava"), tmp.path());
    edit_weights(tmp.path(), |t| {
        t.remove("language_model.model.layers.1.mlp.up_proj.weight")
            .unwrap();
    });
    let err = load_error(tmp.path());
    assert!(err.contains("missing tensors"), "{err}");
    assert!(
        err.contains("language_model.model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny-llama"), tmp.path());
    edit_weights(tmp.path(), |t| {
        let norm = t["model.norm.weight"].clone();
        t.insert("model.extra_norm.weight".into(), norm);
    });
    let err = load_error(tmp.path());
    assert!(err.contains("unexpected tensors"), "{err}");
    assert!(err.contains("model.extra_norm.weight"), "{err}");
}

#[test]
fn wrong_shape_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny-llama"), tmp.path());
    edit_weights(tmp.path(), |t| {
        let entry = t.get_mut("model.norm.weight").unwrap();
        entry.1 = vec![32];
        entry.2.truncate(32 * 4);
    });
    let err = load_error(tmp.path());
    assert!(err.contains("model.norm"), "{err}");
    assert!(err.to_lowercase().contains("shape"), "{err}");
}

#[test]
fn malformed_config_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny-llama"), tmp.path());
    std::fs::write(
        tmp.path().join("config.json"),
        "{\n  \"model_type\": \"llama\",\n  oops\n}",
    )
    .unwrap();
    let err = load_error(tmp.path());
    assert!(err.contains("config.json:3:"), "{err}");
}

#[test]
fn unsupported_model_type_lists_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny-llama"), tmp.path());
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"model_type": "gpt_neox"}"#,
    )
    .unwrap();
    let err = load_error(tmp.path());
    assert!(err.contains("gpt_neox") && err.contains("llava"), "{err}");
}

#[test]
fn image_that_is_not_an_image_is_named() {
    let device = Device::flex();
    let dir = fixtures().join("tiny-llava");
    let model = AnyModel::load(&dir, &device).unwrap();
    let processor = Processor::from_dir(&dir, &model).unwrap();
    let bad = fixtures().join("images/not_an_image.png");
    let err = processor
        .pixel_values(&[bad], &device)
        .expect_err("a text file is not an image")
        .to_string();
    assert!(err.contains("not_an_image.png"), "{err}");
}

#[test]
fn half_precision_checkpoint_is_converted_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny-llama"), tmp.path());
    edit_weights(tmp.path(), |t| {
        for (dtype, _, bytes) in t.values_mut() {
            if *dtype == safetensors::Dtype::F32 {
                let halves: Vec<u8> = bytes
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        half::bf16::from_f32(v).to_le_bytes()
                    })
                    .collect();
                *bytes = halves;
                *dtype = safetensors::Dtype::BF16;
            }
        }
    });
    let expected = common::read_tensors(&fixtures().join("tiny-llama/expected.safetensors"));
    let ids = common::rows_u32(&expected["input_ids"]);
    let mask = common::rows_bool(&expected["attention_mask"]);
    let device = Device::flex();
    let model = AnyModel::load(tmp.path(), &device).expect("bf16 checkpoint loads");
    let logits = model
        .forward(
            resonance_models::registry::ModelInputs {
                input_ids: &ids,
                attention_mask: &mask,
                images: None,
            },
            None,
            &device,
        )
        .unwrap();
    assert_eq!(logits.dtype(), burn::tensor::DType::F32);
    let diff = common::max_masked_diff(
        &common::host(logits),
        &expected["logits"].floats,
        &mask,
        500,
    );
    // bf16 keeps 8 bits of mantissa: close to, but not at, the f32 numbers.
    assert!(diff < 5e-2, "bf16 weights drift by {diff}");
}

#[test]
fn hub_id_resolves_through_a_local_cache_layout() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--tiny-org--tiny-llama");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let snapshot = repo.join("snapshots/0123abcd");
    copy_dir(&fixtures().join("tiny-llama"), &snapshot);
    let dir = resolve_model_in("tiny-org/tiny-llama", cache.path(), false).unwrap();
    assert_eq!(dir, snapshot);
    AnyModel::load(&dir, &Device::flex()).expect("cached model loads");

    let err = resolve_model_in("tiny-org/absent", cache.path(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiny-org/absent") && err.contains("downloads are disabled"),
        "{err}"
    );
    let err = resolve_model_in("not a model", cache.path(), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a directory"), "{err}");
}
