//! Half precision (bf16, f16) against transformers run in the same dtype
//! (fixtures/half/generate.py).
//!
//! Rounding differs with the order of operations, so there is no bit-exact half reference.
//! Each side's logits are measured against the f32 logits of the same model: Resonance in half
//! precision must be as close to them as transformers in half precision is (within a factor),
//! close to transformers' half logits, and not f32 in disguise (its weights are in the dtype
//! and its error is far above f32 rounding).

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Device, FloatDType, Tensor};
use common::*;
use resonance_models::registry::AnyModel;

/// Dtypes of every float parameter.
struct Dtypes(Vec<DType>);

impl ModuleVisitor for Dtypes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().dtype());
    }
}

fn check(name: &str, dtype: FloatDType, label: &str, device: &Device) {
    let dir = fixtures().join(name);
    let expected = read_tensors(&dir.join("expected.safetensors"));
    let half = read_tensors(&fixtures().join("half/expected.safetensors"));
    let mask = rows_bool(&expected["attention_mask"]);
    let model = AnyModel::load(&dir, device)
        .and_then(|m| m.into_precision(dtype, device))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut dtypes = Dtypes(Vec::new());
    match &model {
        AnyModel::Text(m, _) => m.visit(&mut dtypes),
        AnyModel::Llava(m, _) => m.visit(&mut dtypes),
    }
    assert!(
        !dtypes.0.is_empty() && dtypes.0.iter().all(|d| *d == DType::from(dtype)),
        "{name}: parameters not all {label}: {:?}",
        dtypes.0
    );
    let logits =
        fixture_logits(&model, &expected, device).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(logits.dtype(), DType::F32, "{name}: logits leave in f32");
    let f32_logits = &expected["logits"];
    let vocab = f32_logits.shape[2];
    let ours = host(logits);
    let transformers = &half[&format!("{name}.{label}.logits")].floats;
    let transformers_error = half[&format!("{name}.f32_error.{label}")].floats[0];
    let our_error = max_masked_diff(&ours, &f32_logits.floats, &mask, vocab);
    let to_transformers = max_masked_diff(&ours, transformers, &mask, vocab);
    println!(
        "{name} {label}: max |ours - f32| = {our_error:.3e}, max |transformers - f32| = \
         {transformers_error:.3e}, max |ours - transformers| = {to_transformers:.3e}"
    );
    // f32 rounding alone moves these logits by ~1e-6; a tenth of the half-precision error is
    // far above it.
    assert!(
        our_error > 0.1 * transformers_error,
        "{name} {label}: error {our_error:.3e} is f32-sized: not computed in {label}"
    );
    assert!(
        our_error <= 2.0 * transformers_error,
        "{name} {label}: max |ours - f32| = {our_error:.3e} exceeds twice transformers' \
         {transformers_error:.3e}"
    );
    assert!(
        to_transformers <= 2.0 * transformers_error,
        "{name} {label}: max |ours - transformers| = {to_transformers:.3e} exceeds twice \
         transformers' own error {transformers_error:.3e}"
    );
}

#[test]
fn llava_bf16_matches_transformers_bf16() {
    check("tiny-llava", FloatDType::BF16, "bf16", &Device::flex());
}

#[test]
fn llava_f16_matches_transformers_f16() {
    check("tiny-llava", FloatDType::F16, "f16", &Device::flex());
}

#[test]
fn llama_bf16_matches_transformers_bf16() {
    check("tiny-llama", FloatDType::BF16, "bf16", &Device::flex());
}

#[test]
fn llama_f16_matches_transformers_f16() {
    check("tiny-llama", FloatDType::F16, "f16", &Device::flex());
}
