//! Which parameters train, under stable ids, and the global gradient-norm clip.
//!
//! Burn gives every parameter a random `ParamId`; optimizer state is keyed by it. Training here
//! re-derives each id from the parameter's module path, so a model rebuilt from a checkpoint has
//! the same ids and the saved optimizer state lands on the right tensors.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor};

/// The stable id of the parameter at `path` (64-bit FNV-1a of the path).
pub fn stable_param_id(path: &str) -> ParamId {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in path.bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    ParamId::from(hash)
}

/// Whether the parameter at a path is a LoRA factor.
pub fn is_lora_path(path: &str) -> bool {
    path.contains(".lora.lora_a") || path.contains(".lora.lora_b")
}

/// Assigns stable ids and sets `require_grad` of every float parameter from `trainable(path)`.
pub fn prepare_params<M: Module>(model: M, trainable: &dyn Fn(&str) -> bool) -> M {
    let mut mapper = PrepareParams {
        path: Vec::new(),
        trainable,
    };
    model.map(&mut mapper)
}

struct PrepareParams<'a> {
    path: Vec<String>,
    trainable: &'a dyn Fn(&str) -> bool,
}

impl ModuleMapper for PrepareParams<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, mut param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        param.id = stable_param_id(&path);
        param.set_require_grad((self.trainable)(&path))
    }
}

/// One parameter as seen by [`param_table`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    pub id: ParamId,
    pub numel: usize,
    pub dtype: DType,
}

/// Parameter elements per storage dtype (`"f32"`, `"bf16"`, …) of a [`param_table`].
pub fn parameters_by_dtype(table: &BTreeMap<String, ParamInfo>) -> BTreeMap<String, usize> {
    let mut out: BTreeMap<String, usize> = BTreeMap::new();
    for info in table.values() {
        *out.entry(format!("{:?}", info.dtype).to_lowercase())
            .or_default() += info.numel;
    }
    out
}

/// Every float parameter by module path.
pub fn param_table<M: Module>(model: &M) -> BTreeMap<String, ParamInfo> {
    let mut visitor = Table {
        path: Vec::new(),
        out: BTreeMap::new(),
    };
    model.visit(&mut visitor);
    visitor.out
}

struct Table {
    path: Vec<String>,
    out: BTreeMap<String, ParamInfo>,
}

impl ModuleVisitor for Table {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.insert(
            self.path.join("."),
            ParamInfo {
                id: param.id,
                numel: param.shape().num_elements(),
                dtype: param.val().dtype(),
            },
        );
    }
}

/// The global L2 norm of all gradients in `grads`; when `max_norm > 0` and the norm exceeds it,
/// every gradient is scaled by `max_norm / (norm + 1e-6)` (PyTorch's `clip_grad_norm_`).
/// Returns the norm before clipping.
pub fn clip_grad_norm<M: Module>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let mut sum = SquaredNorm { grads, total: None };
    model.visit(&mut sum);
    let norm = match sum.total {
        Some(total) => total.into_scalar::<f64>().sqrt(),
        None => 0.0,
    };
    if max_norm > 0.0 && norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        let mut scale = ScaleGrads { grads, factor };
        model.visit(&mut scale);
    }
    norm
}

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            // burn-flex adds up a whole tensor of 4M+ elements on several threads in an order
            // that changes from run to run; per-row sums (sequential) keep the norm, and so a
            // resumed run, bit-identical.
            let last = grad.dims()[D - 1].max(1);
            let rows = grad.shape().num_elements() / last;
            let sq = grad.square().reshape([rows, last]).sum_dim(1).sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + sq,
                None => sq,
            });
        }
    }
}

struct ScaleGrads<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for ScaleGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            self.grads
                .register::<D>(param.id, grad.mul_scalar(self.factor));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_ids_depend_only_on_the_path() {
        assert_eq!(stable_param_id("a.b.weight"), stable_param_id("a.b.weight"));
        assert_ne!(stable_param_id("a.b.weight"), stable_param_id("a.c.weight"));
    }

    #[test]
    fn lora_paths_are_recognised() {
        assert!(is_lora_path("model.layers.0.self_attn.q_proj.lora.lora_a"));
        assert!(!is_lora_path("model.layers.0.self_attn.q_proj.weight"));
    }
}
