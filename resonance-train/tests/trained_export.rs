//! What the trainer exported (fixtures/trained, written by fixtures/trained/generate.py through
//! `resonance train`) gives, in Rust, the logits transformers and PEFT computed from it.

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use resonance_models::llava::model::Llava;
use resonance_models::registry::{AnyModel, Images, ModelInputs};
use resonance_train::checkpoint::attach_peft_adapter;
use safetensors::SafeTensors;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

struct Expected {
    ids: Vec<u32>,
    pixels: Tensor<4>,
    logits: std::collections::BTreeMap<String, (Vec<f32>, [usize; 2])>,
}

fn expected(device: &Device) -> Expected {
    let bytes = std::fs::read(dir().join("trained/expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> (Vec<f32>, Vec<usize>) {
        let view = st.tensor(name).unwrap();
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (data, view.shape().to_vec())
    };
    let ids_view = st.tensor("input_ids").unwrap();
    let ids = ids_view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let (pixels, shape) = f32s("pixel_values");
    let pixels = Tensor::<4>::from_data(
        TensorData::new(pixels, [shape[0], shape[1], shape[2], shape[3]]),
        device,
    );
    let mut logits = std::collections::BTreeMap::new();
    for name in ["full_logits", "lora_logits", "base_logits"] {
        let (data, shape) = f32s(name);
        logits.insert(name.to_string(), (data, [shape[0], shape[1]]));
    }
    Expected {
        ids,
        pixels,
        logits,
    }
}

fn logits(model: &Llava, e: &Expected, device: &Device) -> Vec<f32> {
    let ids = [e.ids.clone()];
    let mask = [vec![true; e.ids.len()]];
    let out = model
        .forward(
            ModelInputs {
                input_ids: &ids,
                attention_mask: &mask,
                images: Some(Images::Pixels(e.pixels.clone())),
            },
            None,
            device,
        )
        .unwrap();
    out.into_data().try_into_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn load(path: PathBuf, device: &Device) -> Llava {
    match AnyModel::load(&path, device).unwrap() {
        AnyModel::Llava(model, _) => *model,
        other => panic!("expected LLaVA, got {other:?}"),
    }
}

#[test]
fn exported_full_model_matches_transformers() {
    let device = Device::flex();
    let e = expected(&device);
    let model = load(dir().join("trained/full"), &device);
    let got = logits(&model, &e, &device);
    let diff = max_diff(&got, &e.logits["full_logits"].0);
    eprintln!("exported full model vs transformers: max |Δlogits| = {diff:e}");
    assert!(diff <= 1e-4, "max |Δlogits| = {diff}");
    // Training did move the model.
    assert!(max_diff(&e.logits["full_logits"].0, &e.logits["base_logits"].0) > 1e-2);
}

#[test]
fn peft_adapter_matches_peft() {
    let device = Device::flex();
    let e = expected(&device);
    let mut model = load(dir().join("tiny-llava"), &device);
    attach_peft_adapter(&mut model, &dir().join("trained/lora"), &device).unwrap();
    let got = logits(&model, &e, &device);
    let diff = max_diff(&got, &e.logits["lora_logits"].0);
    eprintln!("base + adapter vs PEFT: max |Δlogits| = {diff:e}");
    assert!(diff <= 1e-4, "max |Δlogits| = {diff}");
    assert!(max_diff(&e.logits["lora_logits"].0, &e.logits["base_logits"].0) > 1e-2);
}
