//! `silu(gate) · up`, the activation of the gated MLP (Llama, Mistral, Qwen2), as one operation.
//!
//! Burn composes `silu(x) = x · sigmoid(x)`, so the activation costs three passes over the
//! `[tokens, intermediate]` activations forward (a sigmoid with libm's scalar `expf`, two
//! products), more backward, and keeps four such tensors for the backward pass. As a backend
//! extension it is one vectorised pass each way, and the backward pass keeps only `gate` and
//! `up`:
//!
//! ```text
//! y  = g · σ(g) · u
//! du = dy · g · σ(g)            dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))
//! ```
//!
//! Routed for Burn's CPU backend (`flex`), plain and under autodiff; other backends keep the
//! composed form ([`silu_gate`]).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch, Flex};
use burn::tensor::{activation, Device, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::nn::cpu_math::{sigmoid, sigmoid_pair};
use crate::nn::cpu_ops::{contiguous_f32, zeroed};
use crate::nn::simd::wide;

/// `silu(gate) · up` for tensors of the same shape.
pub fn silu_gate<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if gate.device().inner() == Device::flex() && gate.shape() == up.shape() {
        let out = Dispatch::silu_gate(gate.into_dispatch(), up.into_dispatch());
        return Tensor::from_dispatch(out);
    }
    activation::silu(gate) * up
}

/// The fused gated activation.
#[backend_extension(Flex, Autodiff)]
pub trait SiluGate: Backend {
    /// `silu(gate) · up`, element-wise, for two tensors of the same shape.
    fn silu_gate(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The backward pass of [`SiluGate`]: `[d gate, d up]`. The default composes it from the
/// backend's tensor operations; a backend with a fused kernel overrides it.
pub trait SiluGateGradients: Backend {
    fn silu_gate_gradients(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad_output: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        composed_gradients::<Self>(gate, up, grad_output)
    }
}

impl SiluGate for Flex {
    fn silu_gate(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match silu_gate_f32(&gate, &up) {
            Some(out) => out,
            None => composed_forward::<Flex>(gate, up),
        }
    }
}

impl SiluGateGradients for Flex {
    fn silu_gate_gradients(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad_output: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        match silu_gate_gradients_f32(&gate, &up, &grad_output) {
            Some(grads) => grads,
            None => composed_gradients::<Flex>(gate, up, grad_output),
        }
    }
}

impl<B: SiluGate + SiluGateGradients, C: CheckpointStrategy> SiluGate for Autodiff<B, C> {
    fn silu_gate(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match SiluGateBackward
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (gate, up) = (gate.into_primitive(), up.into_primitive());
                let out = B::silu_gate(gate.clone(), up.clone());
                prep.finish((gate, up), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::silu_gate(gate.into_primitive(), up.into_primitive()))
            }
        }
    }
}

#[derive(Debug)]
struct SiluGateBackward;

impl<B: SiluGateGradients> Backward<B, 2> for SiluGateBackward {
    /// `gate` and `up`.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [gate_node, up_node] = ops.parents;
        let grad_output = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let [grad_gate, grad_up] = B::silu_gate_gradients(gate, up, grad_output);
        if let Some(node) = gate_node {
            grads.register::<B>(node.id, grad_gate);
        }
        if let Some(node) = up_node {
            grads.register::<B>(node.id, grad_up);
        }
    }
}

fn composed_forward<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let silu = B::float_mul(gate.clone(), B::sigmoid(gate));
    B::float_mul(silu, up)
}

pub(crate) fn composed_gradients<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad_output: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let s = B::sigmoid(gate.clone());
    let silu = B::float_mul(gate.clone(), s.clone());
    let grad_up = B::float_mul(grad_output.clone(), silu);
    // σ'(g)·g + σ(g) = σ(g) · (1 + g · (1 − σ(g)))
    let one_minus = B::float_add_scalar(B::float_neg(s.clone()), 1.0f32.into());
    let slope = B::float_mul(
        s,
        B::float_add_scalar(B::float_mul(gate, one_minus), 1.0f32.into()),
    );
    let grad_gate = B::float_mul(B::float_mul(grad_output, up), slope);
    [grad_gate, grad_up]
}

/// Elements per parallel task: large enough to amortise the task, small enough to balance.
const CHUNK: usize = 1 << 14;

/// The same shape, every tensor contiguous f32: the element-wise kernels' precondition.
fn operands<const N: usize>(tensors: [&FlexTensor; N]) -> Option<[&[f32]; N]> {
    let shape = tensors[0].layout().shape();
    if tensors.iter().any(|t| t.layout().shape() != shape) {
        return None;
    }
    let mut slices = [&[][..]; N];
    for (slice, t) in slices.iter_mut().zip(tensors) {
        *slice = contiguous_f32(t)?;
    }
    Some(slices)
}

fn from_values(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, like.layout().shape().clone()))
}

/// The forward kernel; `None` unless both inputs are contiguous f32 of the same shape.
fn silu_gate_f32(gate: &FlexTensor, up: &FlexTensor) -> Option<FlexTensor> {
    let [g, u] = operands([gate, up])?;
    let mut out = zeroed(g.len());
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(out, (g, u))| {
            wide!({
                for ((y, &g), &u) in out.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(g) * u;
                }
            })
        });
    Some(from_values(out, gate))
}

/// The backward kernel; `None` unless all three are contiguous f32 of the same shape.
fn silu_gate_gradients_f32(
    gate: &FlexTensor,
    up: &FlexTensor,
    grad_output: &FlexTensor,
) -> Option<[FlexTensor; 2]> {
    let [g, u, dy] = operands([gate, up, grad_output])?;
    let mut grad_gate = zeroed(g.len());
    let mut grad_up = zeroed(g.len());
    grad_gate
        .par_chunks_mut(CHUNK)
        .zip(grad_up.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), dy)| {
            wide!({
                for i in 0..dg.len() {
                    let (s, complement) = sigmoid_pair(g[i]);
                    du[i] = dy[i] * g[i] * s;
                    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * complement);
                }
            })
        });
    Some([from_values(grad_gate, gate), from_values(grad_up, gate)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().expect("f32 tensor")
    }

    /// `|a − b| ≤ tolerance · (1 + scale)` element-wise, `scale` being the size of the terms an
    /// element is computed from (an f32 result cannot be closer than a few ulps of those).
    fn assert_close(a: &[f32], b: &[f32], scale: &[f32], what: &str, tolerance: f32) {
        assert_eq!(a.len(), b.len(), "{what}: sizes");
        let worst = a
            .iter()
            .zip(b)
            .zip(scale)
            .map(|((x, y), s)| (x - y).abs() / (1.0 + s.abs()))
            .fold(0.0f32, f32::max);
        assert!(
            worst <= tolerance,
            "{what}: max relative difference {worst}"
        );
    }

    /// Forward and gradients against the exact values (f64) and Burn's composed `silu(gate) * up`
    /// under autodiff, with values far into both tails of the sigmoid.
    #[test]
    fn matches_the_exact_and_the_composed_activation_and_gradients() {
        let plain = Device::flex();
        let device = plain.clone().autodiff();
        plain.seed(11);
        let shape = [3, 5, 40_000];
        let make = || Tensor::<3>::random(shape, Distribution::Normal(0.0, 6.0), &plain);
        let (gate, up, upstream) = (make(), make(), make());
        let run = |fused: bool| {
            let leaf = |t: &Tensor<3>| Tensor::<3>::from_data(t.to_data(), &device).require_grad();
            let (g, u) = (leaf(&gate), leaf(&up));
            let out = if fused {
                silu_gate(g.clone(), u.clone())
            } else {
                activation::silu(g.clone()) * u.clone()
            };
            let weights = Tensor::<3>::from_data(upstream.to_data(), &device);
            let grads = (out.clone() * weights).sum().backward();
            let grad = |t: &Tensor<3>| values(t.grad(&grads).expect("tracked"));
            [values(out.inner()), grad(&g), grad(&u)]
        };
        let [out, grad_gate, grad_up] = run(true);
        let (g, u, dy) = (
            values(gate.clone()),
            values(up.clone()),
            values(upstream.clone()),
        );
        let mut exact = [Vec::new(), Vec::new(), Vec::new()];
        let mut gate_scale = Vec::new();
        for i in 0..g.len() {
            let (g, u, dy) = (g[i] as f64, u[i] as f64, dy[i] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            exact[0].push((g * s * u) as f32);
            exact[1].push((dy * u * s * (1.0 + g * (1.0 - s))) as f32);
            exact[2].push((dy * g * s) as f32);
            // `1 + g·(1 − σ)` cancels near g ≈ −1.28: the terms' size, not the result's, bounds
            // the rounding error.
            gate_scale.push((dy * u * s).abs() as f32 * (1.0 + (g * (1.0 - s)).abs() as f32));
        }
        let [exact_out, exact_grad_gate, exact_grad_up] = exact;
        let (out_scale, up_scale) = (exact_out.clone(), exact_grad_up.clone());
        assert_close(&out, &exact_out, &out_scale, "output vs exact", 1e-6);
        let what = "gate gradient vs exact";
        assert_close(&grad_gate, &exact_grad_gate, &gate_scale, what, 1e-6);
        assert_close(
            &grad_up,
            &exact_grad_up,
            &up_scale,
            "up gradient vs exact",
            1e-6,
        );
        let [ref_out, ref_grad_gate, ref_grad_up] = run(false);
        assert_close(&out, &ref_out, &out_scale, "output", 1e-6);
        // Burn's composed gradient also loses digits in `1 − σ(g)` where σ(g) is near 1.
        assert_close(
            &grad_gate,
            &ref_grad_gate,
            &gate_scale,
            "gate gradient",
            1e-5,
        );
        assert_close(&grad_up, &ref_grad_up, &up_scale, "up gradient", 1e-6);
        // The plain path gives the autodiff path's numbers bit for bit.
        let direct = values(silu_gate(gate.clone(), up.clone()));
        let [tracked, _, _] = run(true);
        assert_eq!(direct, tracked);
    }

    /// A non-contiguous input takes the composed path and still gives the same numbers.
    #[test]
    fn strided_inputs_fall_back_to_the_composed_form() {
        let device = Device::flex();
        device.seed(5);
        let gate = Tensor::<2>::random([64, 48], Distribution::Normal(0.0, 3.0), &device);
        let up = Tensor::<2>::random([48, 64], Distribution::Normal(0.0, 3.0), &device);
        let fused = values(silu_gate(gate.clone(), up.clone().transpose()));
        let composed = values(activation::silu(gate) * up.transpose());
        assert_close(&fused, &composed, &composed, "output", 1e-6);
    }

    #[test]
    fn nan_propagates() {
        let device = Device::flex();
        let gate = Tensor::<1>::from_floats([f32::NAN, 1.0], &device);
        let up = Tensor::<1>::from_floats([1.0, f32::NAN], &device);
        let out = values(silu_gate(gate, up));
        assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
    }
}
