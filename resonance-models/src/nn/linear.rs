//! The linear layer of every model, with an optional LoRA adapter.
//!
//! Burn's own LoRA (`Module::apply_lora`) re-parameterises the weight as `W + s·A·B` and composes
//! that dense matrix on every forward. PEFT instead computes `x·W + s·(dropout(x)·A)·B`: the
//! dropout acts on the adapter's *input*, the base and adapter paths can be switched apart (the
//! adapters-off reference of DPO needs that without a second copy of the weights), and no dense
//! weight-sized delta is built or differentiated. This layer does it the PEFT way, keeping Burn's
//! `Linear` field names and layout (`weight` is `[d_in, d_out]`) so checkpoints load unchanged.
//! A QLoRA base is a Burn-quantized weight, dequantized when used.

use burn::backend::Dispatch;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, LinearConfig};
use burn::tensor::module::linear;
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
use burn::tensor::{DType, Device, Distribution, Tensor};

use crate::nn::fused_linear::FusedLinear;
use crate::nn::precision::cast_like;

/// A linear layer `y = x·W + b` (+ a LoRA update when an adapter is attached).
///
/// The struct is named `Linear` on purpose: Burn's PyTorch adapter recognises the type name
/// and transposes `weight` between PyTorch's `[out, in]` and Burn's `[in, out]` layouts.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[d_in, d_out]`.
    pub weight: Param<Tensor<2>>,
    /// `[d_out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// The low-rank adapter, when LoRA was applied to this layer.
    pub lora: Option<LoraAdapter>,
}

/// The trainable low-rank update `scale · (dropout(x)·A)·B` of a [`Linear`].
///
/// The factors are stored as PEFT stores them: `lora_a` is `lora_A.weight` (`[r, d_in]`),
/// `lora_b` is `lora_B.weight` (`[d_out, r]`), so adapters are written and read without
/// reshaping.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    pub lora_a: Param<Tensor<2>>,
    pub lora_b: Param<Tensor<2>>,
    pub dropout: Dropout,
    /// `alpha / rank`.
    #[module(skip)]
    pub scale: f64,
}

thread_local! {
    static ADAPTERS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, every [`Linear`] built into a forward on this thread ignores its LoRA adapter:
/// the base model, e.g. DPO's reference, without a second copy of the weights.
pub struct AdaptersDisabled {
    previous: bool,
}

impl AdaptersDisabled {
    pub fn new() -> Self {
        AdaptersDisabled {
            previous: ADAPTERS_OFF.with(|off| off.replace(true)),
        }
    }
}

impl Default for AdaptersDisabled {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AdaptersDisabled {
    fn drop(&mut self) {
        ADAPTERS_OFF.with(|off| off.set(self.previous));
    }
}

fn adapters_disabled() -> bool {
    ADAPTERS_OFF.with(|off| off.get())
}

/// How to build a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Quantize the frozen base weight to 4 bits (QLoRA).
    pub quantize_base: bool,
}

impl LoraSpec {
    /// PEFT's scaling `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

impl Linear {
    /// A freshly initialised layer (Burn's default Kaiming-uniform initialisation).
    pub fn new(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Self {
        let burn::nn::Linear { weight, bias } =
            LinearConfig::new(d_in, d_out).with_bias(bias).init(device);
        Linear {
            weight,
            bias,
            lora: None,
        }
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.shape().dims()
    }

    /// The base weight as a float tensor (dequantized under QLoRA).
    pub fn base_weight(&self) -> Tensor<2> {
        let w = self.weight.val();
        if matches!(w.dtype(), DType::QFloat(_)) {
            w.dequantize()
        } else {
            w
        }
    }

    /// `x·W + b`, plus the adapter's update when one is attached.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match &self.lora {
            Some(adapter) if !adapters_disabled() => {
                // On the CPU backend, without adapter dropout, one operation accumulates the
                // update into the base product (`fused_linear`).
                let base = self.base_weight();
                let bias = self.bias.as_ref().map(|b| b.val());
                let (a, b) = (adapter.lora_a.val(), adapter.lora_b.val());
                let all_f32 = [x.dtype(), base.dtype(), a.dtype(), b.dtype()]
                    .iter()
                    .all(|d| *d == DType::F32);
                if adapter.dropout.prob == 0.0
                    && D >= 2
                    && all_f32
                    && x.device().inner() == Device::flex()
                {
                    let out = fold_rows(x, self.dims()[1], |x| {
                        let out = Dispatch::fused_lora_linear(
                            x.into_dispatch(),
                            base.into_dispatch(),
                            a.into_dispatch(),
                            b.into_dispatch(),
                            adapter.scale,
                        );
                        Tensor::from_dispatch(out)
                    });
                    return add_bias(out, bias);
                }
                // `forward_base` with the base weight already at hand (a QLoRA base is
                // dequantized once).
                flat_linear(x.clone(), base, bias) + adapter.forward(x)
            }
            _ => self.forward_base(x),
        }
    }

    /// `x·W + b` without the adapter (the frozen base model, e.g. as DPO's reference).
    pub fn forward_base<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        flat_linear(x, self.base_weight(), self.bias.as_ref().map(|b| b.val()))
    }

    /// Attaches a new adapter: `A ~ U(-1/√d_in, 1/√d_in)` like PEFT's Kaiming-uniform(a=√5)
    /// default, `B = 0`, so the layer's output is unchanged until `B` is trained. The base
    /// weight and bias stop requiring gradients; under QLoRA the base is quantized.
    pub fn attach_lora(&mut self, spec: &LoraSpec, device: &Device) {
        let [d_in, d_out] = self.dims();
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Tensor::<2>::random(
            [spec.rank, d_in],
            Distribution::Uniform(-bound, bound),
            device,
        );
        let b = Tensor::<2>::zeros([d_out, spec.rank], device);
        self.lora = Some(LoraAdapter {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            dropout: DropoutConfig::new(spec.dropout).init(),
            scale: spec.scale(),
        });
        self.freeze_base();
        if spec.quantize_base {
            self.quantize_base();
        }
    }

    /// Stops gradients to the base weight and bias.
    pub fn freeze_base(&mut self) {
        self.weight = self.weight.clone().set_require_grad(false);
        if let Some(bias) = self.bias.take() {
            self.bias = Some(bias.set_require_grad(false));
        }
    }

    /// Stores the base weight as 4-bit symmetric block-quantized values (Burn's quantization).
    pub fn quantize_base(&mut self) {
        let [_, d_out] = self.dims();
        let block = [64u8, 32, 16, 8]
            .into_iter()
            .find(|b| d_out.is_multiple_of(*b as usize));
        let scheme = QuantScheme::default()
            .with_value(QuantValue::Q4S)
            .with_store(QuantStore::Native);
        let scheme = match block {
            Some(b) => scheme.per_block([b], ScaleDtype::F32),
            None => scheme.per_tensor(ScaleDtype::F32),
        };
        self.weight = self
            .weight
            .clone()
            .map(|w| w.quantize_dynamic(&scheme))
            .set_require_grad(false);
    }

    /// Folds the adapter into the base weight, `W ← W + scale·A·B`, and removes it. A quantized
    /// base is dequantized first (the merged weight is f32); otherwise it keeps the base's dtype.
    pub fn merge_lora(&mut self) {
        if let Some(adapter) = self.lora.take() {
            let base = self.base_weight();
            let delta = cast_like(adapter.delta(), &base);
            let merged = base + delta;
            self.weight = Param::initialized(self.weight.id, merged);
        }
    }
}

impl LoraAdapter {
    /// `(dropout(x)·A)·(scale·B)`: the scale goes on the small `[r, d_out]` matrix rather than
    /// on the `[tokens, d_out]` output, which saves a pass over the activations each way.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = self.dropout.forward(x);
        let down = flat_linear(x, self.lora_a.val().transpose(), None);
        let up = self.lora_b.val().transpose().mul_scalar(self.scale);
        flat_linear(down, up, None)
    }

    /// The dense update `scale·A·B` (`[d_in, d_out]`).
    pub fn delta(&self) -> Tensor<2> {
        self.lora_b
            .val()
            .matmul(self.lora_a.val())
            .transpose()
            .mul_scalar(self.scale)
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.lora_a.shape().dims::<2>()[0]
    }
}

/// `x·W + b` with every leading dimension of `x` folded into the rows of one matrix product.
///
/// Burn's `linear` on a `[batch, tokens, d_in]` input broadcasts the weight over the batch: the
/// CPU backend then runs one product per batch entry, so a decoding step of 8 sequences reads
/// every weight 8 times, and the backward pass sums per-entry weight gradients. Folded, it is
/// one `[batch·tokens, d_in] × [d_in, d_out]` product each way. The reshapes are free for the
/// contiguous activations the layers pass. On the CPU backend the product itself is
/// `fused_linear`'s, written once into its buffer.
pub fn flat_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    // Under half precision a trained (f32) weight is rounded to the activations' dtype here.
    let weight = cast_like(weight, &x);
    let bias = bias.map(|b| cast_like(b, &x));
    if D < 2 {
        return linear(x, weight, bias);
    }
    if x.device().inner() == Device::flex() {
        let out = fold_rows(x, weight.dims()[1], |x| {
            Tensor::from_dispatch(Dispatch::fused_linear(
                x.into_dispatch(),
                weight.into_dispatch(),
            ))
        });
        return add_bias(out, bias);
    }
    fold_rows(x, weight.dims()[1], |x| linear(x, weight, bias))
}

/// Applies `product` to `x` seen as `[rows, d_in]` and gives the result `x`'s leading
/// dimensions with `d_out` last.
fn fold_rows<const D: usize>(
    x: Tensor<D>,
    d_out: usize,
    product: impl FnOnce(Tensor<2>) -> Tensor<2>,
) -> Tensor<D> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let out = product(x.reshape([rows, d_in]));
    dims[D - 1] = d_out;
    out.reshape(dims)
}

fn add_bias<const D: usize>(out: Tensor<D>, bias: Option<Tensor<1>>) -> Tensor<D> {
    match bias {
        Some(bias) => out + bias.unsqueeze(),
        None => out,
    }
}

/// Something holding named linear layers that LoRA can target, visited with their full module
/// path (the Hugging Face module name, e.g. `language_model.model.layers.0.self_attn.q_proj`).
pub trait LinearLayers {
    fn visit_linears(&mut self, prefix: &str, visit: &mut dyn FnMut(&str, &mut Linear));
}

/// Joins a module path and a field name.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_adapter_leaves_output_unchanged_and_merge_matches_forward() {
        let device = Device::flex();
        let mut layer = Linear::new(8, 6, true, &device);
        let x = Tensor::<2>::random([3, 8], Distribution::Normal(0.0, 1.0), &device);
        let before = layer.forward(x.clone());
        let spec = LoraSpec {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            quantize_base: false,
        };
        layer.attach_lora(&spec, &device);
        let after = layer.forward(x.clone());
        before
            .to_data()
            .assert_approx_eq::<f32>(&after.to_data(), Default::default());

        // A non-zero B: forward with the adapter equals the merged layer's forward.
        let adapter = layer.lora.as_mut().unwrap();
        adapter.lora_b = Param::from_tensor(Tensor::random(
            [6, 2],
            Distribution::Normal(0.0, 1.0),
            &device,
        ));
        let with_adapter = layer.forward(x.clone());
        let base_only = layer.forward_base(x.clone());
        assert!(
            (with_adapter.clone() - base_only)
                .abs()
                .max()
                .into_scalar::<f32>()
                > 1e-3
        );
        {
            let _off = AdaptersDisabled::new();
            let off = layer.forward(x.clone());
            off.to_data()
                .assert_approx_eq::<f32>(&before.to_data(), Default::default());
        }
        layer.merge_lora();
        assert!(layer.lora.is_none());
        layer
            .forward(x)
            .to_data()
            .assert_approx_eq::<f32>(&with_adapter.to_data(), Default::default());
    }

    #[test]
    fn quantized_base_stays_close_to_the_float_weight() {
        let device = Device::flex();
        let mut layer = Linear::new(16, 64, false, &device);
        let w: Vec<f32> = layer.weight.val().to_data().try_to_vec::<f32>().unwrap();
        layer.quantize_base();
        assert!(matches!(layer.weight.val().dtype(), DType::QFloat(_)));
        let q: Vec<f32> = layer.base_weight().to_data().try_to_vec::<f32>().unwrap();
        let max_abs = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = w
            .iter()
            .zip(&q)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // 4-bit symmetric: at most half a step of max|w| / 7 per block.
        assert!(err <= max_abs / 7.0 * 0.51, "err {err} max {max_abs}");
    }
}
