//! Attention with a hand-written backward pass, as a Burn backend extension.
//!
//! Under autodiff, Burn composes attention from primitive operations, so training keeps every
//! intermediate `[batch, heads, queries, keys]` tensor of the score matrix and its softmax (two
//! or three of them per layer) until the backward pass, and runs a dozen element-wise passes over
//! them. This operation instead runs the backend's own attention kernel forward and keeps only
//! its inputs and output; the backward pass recomputes the probabilities one layer at a time, as
//! flash attention's backward does:
//!
//! ```text
//! P  = softmax(scale · Q Kᵀ, masked)        dV = Pᵀ dO
//! dP = dO Vᵀ                                dS = P ⊙ (dP − rowsum(dO ⊙ O))
//! dQ = scale · dS K                         dK = scale · dSᵀ Q
//! ```
//!
//! It costs one more `Q Kᵀ` product per layer in the backward pass and saves the score-sized
//! activations of every layer.
//!
//! The extension is routed for Burn's CPU backend (`flex`), plain and under autodiff; its forward
//! and backward passes there are [`crate::nn::cpu_attention`]'s block kernels, which never build
//! a score-sized tensor at all. Elsewhere the backward pass is composed from tensor operations
//! ([`AttentionGradients`]' default). On other backends
//! [`crate::nn::attention::scaled_attention`] keeps Burn's own attention.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{backend_extension, Backend, Flex, TensorMetadata};
use burn::tensor::ops::AttentionModuleOptions;

/// Burn's attention options for an explicit softmax scale.
pub(crate) fn options(scale: f64) -> AttentionModuleOptions {
    AttentionModuleOptions {
        scale: Some(scale),
        ..Default::default()
    }
}

/// Scaled dot-product attention whose backward pass recomputes the probabilities.
///
/// Two methods because the extension macro routes optional float tensors only: the mask is a
/// boolean tensor.
#[backend_extension(Flex, Autodiff)]
pub trait RecomputingAttention: Backend {
    /// `softmax(scale · Q Kᵀ, masked) V` over `[batch, heads, tokens, head_dim]` tensors; `mask`
    /// (`[batch, heads, queries, keys]`) is `true` where attention is forbidden. A query whose
    /// keys are all masked gets zeros.
    fn recomputing_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;

    /// `softmax(scale · Q Kᵀ) V`, every query seeing every key.
    fn recomputing_attention_unmasked(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;
}

impl RecomputingAttention for Flex {
    fn recomputing_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        flex_attention(query, key, value, Some(mask), scale)
    }

    fn recomputing_attention_unmasked(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        flex_attention(query, key, value, None, scale)
    }
}

/// Resonance's block kernel for f32 (`cpu_attention`), flex's own kernel otherwise.
fn flex_attention(
    query: FloatTensor<Flex>,
    key: FloatTensor<Flex>,
    value: FloatTensor<Flex>,
    mask: Option<BoolTensor<Flex>>,
    scale: f64,
) -> FloatTensor<Flex> {
    match crate::nn::cpu_attention::attention_f32(&query, &key, &value, mask.as_ref(), scale as f32)
    {
        Some(output) => output,
        None => Flex::attention(query, key, value, mask, None, options(scale)),
    }
}

/// The backward pass of [`RecomputingAttention`]: `[dQ, dK, dV]` from the saved inputs and
/// output. The default composes it from the backend's tensor operations (one score-sized tensor
/// at a time); a backend with a fused kernel overrides it.
pub trait AttentionGradients: Backend {
    fn attention_gradients(
        state: AttentionState<Self>,
        grad_output: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        composed_gradients::<Self>(state, grad_output)
    }
}

impl AttentionGradients for Flex {
    /// Resonance's block kernel for f32 (`cpu_attention`): the probabilities, their gradient
    /// and the products run block by block without a score-sized tensor.
    fn attention_gradients(
        state: AttentionState<Self>,
        grad_output: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        let fused = crate::nn::cpu_attention::attention_backward_f32(
            &state.query,
            &state.key,
            &state.value,
            state.mask.as_ref(),
            &state.output,
            &grad_output,
            state.scale as f32,
        );
        fused.unwrap_or_else(|| composed_gradients::<Self>(state, grad_output))
    }
}

impl<B: RecomputingAttention + AttentionGradients, C: CheckpointStrategy> RecomputingAttention
    for Autodiff<B, C>
{
    fn recomputing_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        tracked_attention::<B, C>(query, key, value, Some(mask), scale)
    }

    fn recomputing_attention_unmasked(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        tracked_attention::<B, C>(query, key, value, None, scale)
    }
}

/// The extension's forward pass on backend `B` (`Dispatch` from the tensor API, the inner
/// backend under autodiff), through the masked or the unmasked method.
pub(crate) fn extension_attention<B: RecomputingAttention>(
    query: FloatTensor<B>,
    key: FloatTensor<B>,
    value: FloatTensor<B>,
    mask: Option<BoolTensor<B>>,
    scale: f64,
) -> FloatTensor<B> {
    match mask {
        Some(mask) => B::recomputing_attention(query, key, value, mask, scale),
        None => B::recomputing_attention_unmasked(query, key, value, scale),
    }
}

/// The forward pass under autodiff: the inner backend's attention, and the backward step
/// registered with the inputs and the output as its state.
fn tracked_attention<B: RecomputingAttention + AttentionGradients, C: CheckpointStrategy>(
    query: FloatTensor<Autodiff<B, C>>,
    key: FloatTensor<Autodiff<B, C>>,
    value: FloatTensor<Autodiff<B, C>>,
    mask: Option<BoolTensor<B>>,
    scale: f64,
) -> FloatTensor<Autodiff<B, C>> {
    let nodes = [query.node(), key.node(), value.node()];
    match AttentionBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (q, k, v) = (
                query.into_primitive(),
                key.into_primitive(),
                value.into_primitive(),
            );
            let out =
                extension_attention::<B>(q.clone(), k.clone(), v.clone(), mask.clone(), scale);
            let state = AttentionState::new([q, k, v], mask, out.clone(), scale);
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(extension_attention::<B>(
            query.into_primitive(),
            key.into_primitive(),
            value.into_primitive(),
            mask,
            scale,
        )),
    }
}

#[derive(Debug)]
struct AttentionBackward;

/// What the backward pass needs: the inputs and the output, not the score matrix.
#[derive(Debug, Clone)]
pub struct AttentionState<B: Backend> {
    query: FloatTensor<B>,
    key: FloatTensor<B>,
    value: FloatTensor<B>,
    mask: Option<BoolTensor<B>>,
    output: FloatTensor<B>,
    scale: f64,
}

impl<B: Backend> AttentionState<B> {
    pub(crate) fn new(
        [query, key, value]: [FloatTensor<B>; 3],
        mask: Option<BoolTensor<B>>,
        output: FloatTensor<B>,
        scale: f64,
    ) -> Self {
        AttentionState {
            query,
            key,
            value,
            mask,
            output,
            scale,
        }
    }
}

impl<B: AttentionGradients> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [query_node, key_node, value_node] = ops.parents;
        let grad_output = grads.consume::<B>(&ops.node);
        let [grad_query, grad_key, grad_value] = B::attention_gradients(ops.state, grad_output);
        for (node, grad) in [
            (query_node, grad_query),
            (key_node, grad_key),
            (value_node, grad_value),
        ] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// The gradients from the backend's tensor operations:
///
/// ```text
/// P  = softmax(scale · Q Kᵀ, masked)        dV = Pᵀ dO
/// dP = dO Vᵀ                                dS = P ⊙ (dP − rowsum(dO ⊙ O))
/// dQ = scale · dS K                         dK = scale · dSᵀ Q
/// ```
pub(crate) fn composed_gradients<B: Backend>(
    state: AttentionState<B>,
    grad_output: FloatTensor<B>,
) -> [FloatTensor<B>; 3] {
    let AttentionState {
        query,
        key,
        value,
        mask,
        output,
        scale,
    } = state;
    let probs = attention_probabilities::<B>(query.clone(), key.clone(), mask, scale);
    let grad_value = B::float_matmul(B::float_swap_dims(probs.clone(), 2, 3), grad_output.clone());
    // dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), with the softmax scale folded in.
    let grad_probs = B::float_matmul(grad_output.clone(), B::float_swap_dims(value, 2, 3));
    let row_dot = B::float_sum_dim(B::float_mul(grad_output, output), 3);
    let grad_scores = B::float_mul_scalar(
        B::float_mul(probs, B::float_sub(grad_probs, row_dot)),
        scale.into(),
    );
    let grad_query = B::float_matmul(grad_scores.clone(), key);
    let grad_key = B::float_matmul(B::float_swap_dims(grad_scores, 2, 3), query);
    [grad_query, grad_key, grad_value]
}

/// `softmax(scale · Q Kᵀ, masked)`, with rows whose keys are all masked set to zero as the
/// forward kernel sets them. Masked scores are `-inf` (a finite lowest value would send libm's
/// `expf` down its slow underflow path); the rows that see no key at all (left padding) come out
/// of the backend's softmax as NaN and are overwritten with zeros.
fn attention_probabilities<B: Backend>(
    query: FloatTensor<B>,
    key: FloatTensor<B>,
    mask: Option<BoolTensor<B>>,
    scale: f64,
) -> FloatTensor<B> {
    // Scaling Q ([.., tokens, head_dim]) is cheaper than scaling the [.., tokens, tokens] scores.
    let scores = B::float_matmul(
        B::float_mul_scalar(query, scale.into()),
        B::float_swap_dims(key, 2, 3),
    );
    let Some(mask) = mask else {
        return B::softmax(scores, 3);
    };
    let shape = scores.shape();
    let probs = B::softmax(
        B::float_mask_fill(scores, mask.clone(), f32::NEG_INFINITY.into()),
        3,
    );
    let sees_nothing = B::bool_expand(B::bool_all_dim(mask, 3), shape);
    B::float_mask_fill(probs, sees_nothing, 0.0f32.into())
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::softmax;
    use burn::tensor::{Bool, Device, Distribution, Tensor};

    use crate::nn::attention::{scaled_attention, MaskSpec};

    /// Attention written out in tensor operations and differentiated by Burn's autodiff; a query
    /// with no visible key is zeroed, as the fused kernel does.
    fn composed(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: Tensor<4, Bool>,
        scale: f64,
    ) -> Tensor<4> {
        let visible = mask.clone().bool_not().any_dim(3).float();
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        let probs = softmax(scores.mask_fill(mask, -1.0e9), 3) * visible;
        probs.matmul(v)
    }

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().expect("f32 tensor")
    }

    fn assert_close(a: Tensor<4>, b: Tensor<4>, what: &str) {
        let worst = values(a)
            .iter()
            .zip(values(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "{what}: max difference {worst}");
    }

    #[test]
    fn gradients_match_the_composed_attention() {
        let plain = Device::flex();
        let device = plain.clone().autodiff();
        plain.seed(7);
        let shape = [2, 3, 6, 4];
        let make = || Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &plain);
        let (q0, k0, v0, upstream) = (make(), make(), make(), make());
        // Causal, with left padding in the second row: its first two queries see no key.
        let spec = MaskSpec::causal(
            vec![vec![true; 6], vec![false, false, true, true, true, true]],
            0,
            6,
        );
        let mask = spec.build(3, None, &device).expect("something is masked");
        let scale = 0.5;

        let run = |fused: bool| {
            let leaf = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &device).require_grad();
            let (q, k, v) = (leaf(&q0), leaf(&k0), leaf(&v0));
            let out = if fused {
                scaled_attention(q.clone(), k.clone(), v.clone(), Some(mask.clone()), scale)
            } else {
                composed(q.clone(), k.clone(), v.clone(), mask.clone(), scale)
            };
            let weights = Tensor::<4>::from_data(upstream.to_data(), &device);
            let grads = (out.clone() * weights).sum().backward();
            let grad = |t: &Tensor<4>| {
                Tensor::<4>::from_data(t.grad(&grads).expect("tracked").to_data(), &plain)
            };
            [out.inner(), grad(&q), grad(&k), grad(&v)]
        };
        let [out, dq, dk, dv] = run(true);
        let [ref_out, ref_dq, ref_dk, ref_dv] = run(false);
        assert_close(out.clone(), ref_out, "output");
        assert_close(dq, ref_dq, "query gradient");
        assert_close(dk, ref_dk, "key gradient");
        assert_close(dv, ref_dv, "value gradient");
        let hidden = out.narrow(0, 1, 1).narrow(2, 0, 2);
        assert_eq!(
            values(hidden),
            vec![0.0; 3 * 2 * 4],
            "no visible key gives zeros"
        );
    }

    /// DPO's reference runs without autodiff and the policy with it: on the same inputs the two
    /// paths must agree to the bit, or a step-0 policy/reference margin would not be exactly 0.
    #[test]
    fn autodiff_and_plain_forward_agree_to_the_bit() {
        let plain = Device::flex();
        let device = plain.clone().autodiff();
        plain.seed(3);
        let shape = [2, 4, 100, 16];
        let make = || Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &plain);
        let (q, k, v) = (make(), make(), make());
        let padded = [vec![false; 7], vec![true; 93]].concat();
        let spec = MaskSpec::causal(vec![vec![true; 100], padded], 0, 100);
        let direct = scaled_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            spec.build(4, None, &plain),
            0.25,
        );
        let leaf = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &device).require_grad();
        let tracked = scaled_attention(
            leaf(&q),
            leaf(&k),
            leaf(&v),
            spec.build(4, None, &device),
            0.25,
        );
        let bits = |t: Tensor<4>| values(t).into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(bits(direct), bits(tracked.inner()));
    }
}
