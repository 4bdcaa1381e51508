//! Half precision (`model.dtype = "bf16"` / `"f16"`), the way transformers runs a model loaded
//! with `dtype=torch.bfloat16` and PyTorch's autocast trains one.
//!
//! * Frozen weights are stored in the half dtype (half the memory of the vision tower, of a
//!   LoRA base and of DPO's reference, which is that base with the adapters off).
//! * Trained weights stay f32: the optimizer updates an f32 master copy and keeps f32 moments
//!   (an update of `lr = 1e-5` on a bf16 weight of size 0.02 would round away), and each layer
//!   rounds the weight to the activations' dtype when it uses it; the rounding's backward widens
//!   the gradient again.
//! * Activations are in the half dtype from the embeddings (and the pixels) on. Normalisations
//!   accumulate in f32, attention takes its softmax in f32, and the logits and values leave the
//!   model as f32, so every loss and log-probability is computed in f32.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Device, FloatDType, Tensor};

use crate::error::{ModelError, Result};

/// An error unless `device` computes in `dtype` (f16 needs shader support on wgpu, and bf16 is
/// not available there at all; the CPU backend and CUDA have both).
pub fn ensure_supported(device: &Device, dtype: FloatDType) -> Result<()> {
    if device.supports_dtype(DType::from(dtype)) {
        Ok(())
    } else {
        Err(ModelError::UnsupportedDtype {
            dtype,
            device: format!("{device:?}"),
        })
    }
}

/// `t` in `dtype`, untouched when it already is.
pub fn to_dtype<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

/// `t` in the dtype of `like`.
pub fn cast_like<const D: usize, const E: usize>(t: Tensor<D>, like: &Tensor<E>) -> Tensor<D> {
    to_dtype(t, like.dtype())
}

/// Whether `dtype` is a plain floating-point dtype a parameter may be converted to (not a
/// quantized one: a QLoRA base keeps its own storage).
fn is_plain_float(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F64 | DType::F32 | DType::Flex32 | DType::F16 | DType::BF16
    )
}

/// Converts every plain float parameter of `module` to `dtype` (ids and `require_grad` kept).
pub fn cast_params<M: Module>(module: M, dtype: FloatDType) -> M {
    cast_params_where(module, dtype, &|_, _| true)
}

/// Converts the plain float parameters for which `select(path, require_grad)` holds to `dtype`.
pub fn cast_params_where<M: Module>(
    module: M,
    dtype: FloatDType,
    select: &dyn Fn(&str, bool) -> bool,
) -> M {
    module.map(&mut PathCast {
        path: Vec::new(),
        select,
        dtype,
    })
}

struct PathCast<'a> {
    path: Vec<String>,
    select: &'a dyn Fn(&str, bool) -> bool,
    dtype: FloatDType,
}

impl ModuleMapper for PathCast<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        cast_param(param, self.dtype, |require_grad| {
            (self.select)(&path, require_grad)
        })
    }
}

fn cast_param<const D: usize>(
    param: Param<Tensor<D>>,
    dtype: FloatDType,
    select: impl FnOnce(bool) -> bool,
) -> Param<Tensor<D>> {
    let value = param.val();
    let (current, require_grad) = (value.dtype(), value.is_require_grad());
    if current == DType::from(dtype) || !is_plain_float(current) || !select(require_grad) {
        return param;
    }
    // The converted value is a new leaf: the rounding must not become part of a graph.
    param
        .map(|t| t.detach().set_require_grad(false).cast(dtype))
        .set_require_grad(require_grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::linear::Linear;
    use burn::tensor::Distribution;

    #[test]
    fn casting_keeps_ids_and_selects_by_path_and_training() {
        let device = Device::flex().autodiff();
        let mut layer = Linear::new(4, 3, true, &device);
        layer.weight = layer.weight.set_require_grad(false);
        let id = layer.weight.id;
        let layer = cast_params_where(layer, FloatDType::BF16, &|path, trained| {
            path == "weight" && !trained
        });
        assert_eq!(layer.weight.val().dtype(), DType::BF16);
        assert_eq!(layer.weight.id, id);
        assert!(!layer.weight.val().is_require_grad());
        let bias = layer.bias.as_ref().expect("bias");
        assert_eq!(bias.val().dtype(), DType::F32);

        // A trained parameter converted keeps training, as a fresh leaf.
        let layer = cast_params(layer, FloatDType::F16);
        let bias = layer.bias.as_ref().expect("bias");
        assert_eq!(bias.val().dtype(), DType::F16);
        assert!(bias.val().is_require_grad());
        let x = Tensor::<2>::random([2, 4], Distribution::Normal(0.0, 1.0), &device)
            .cast(FloatDType::F16);
        let grads = layer.forward(x).sum().backward();
        assert!(bias.grad(&grads).is_some());
    }
}
