//! RMS normalisation (`x / √(mean(x²) + ε) · γ`, every Llama-family decoder's norm) as one
//! operation.
//!
//! Burn's `RmsNorm` composes it from six tensor operations, each a pass over the activations,
//! and under autodiff keeps several of their results per norm for the backward pass. As a
//! backend extension it is one pass forward and one backward, keeping only `x` and `γ`. With
//! `r = 1 / √(mean(x²) + ε)` and `x̂ = x · r` per row of the last dimension:
//!
//! ```text
//! y  = x̂ · γ
//! dγ = Σ_rows dy · x̂          dx = r · (g − x̂ · mean(g · x̂)),  g = dy · γ
//! ```
//!
//! Routed for Burn's CPU backend (`flex`), plain and under autodiff; other backends keep Burn's
//! module ([`rms_norm`]).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch, Flex, TensorMetadata};
use burn::nn::RmsNorm;
use burn::tensor::{DType, Device, Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::nn::cpu_ops::{contiguous_f32, zeroed};
use crate::nn::precision::to_dtype;
use crate::nn::simd::wide;

/// `norm.forward(x)`, through the fused operation on the CPU backend; in half precision as
/// transformers' Llama-family norms compute it.
pub fn rms_norm<const D: usize>(norm: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    let gamma = norm.gamma.val();
    if x.dtype() != DType::F32 {
        return widened_rms_norm(x, gamma, norm.epsilon);
    }
    if x.device().inner() == Device::flex() && gamma.dims()[0] == x.dims()[D - 1] {
        let out = Dispatch::fused_rms_norm(x.into_dispatch(), gamma.into_dispatch(), norm.epsilon);
        return Tensor::from_dispatch(out);
    }
    norm.forward(x)
}

/// RMSNorm of a half-precision `x`: `x · 1/√(mean(x²) + ε)` in f32, rounded to `x`'s dtype,
/// then times `γ` in that dtype (transformers' `LlamaRMSNorm` order; Burn's module would divide
/// the half `x` by a rounded norm instead).
fn widened_rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, epsilon: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let wide = to_dtype(x, DType::F32);
    let inverse = (wide.clone().square().mean_dim(D - 1) + epsilon)
        .sqrt()
        .recip();
    to_dtype(wide * inverse, dtype) * to_dtype(gamma, dtype).unsqueeze()
}

/// The fused RMS normalisation.
#[backend_extension(Flex, Autodiff)]
pub trait FusedRmsNorm: Backend {
    /// `x / √(mean(x²) + epsilon) · gamma` over the last dimension of `x`; `gamma` is `[d]`.
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;
}

/// The backward pass of [`FusedRmsNorm`]: `[dx, dγ]`. The default composes it from the
/// backend's tensor operations; a backend with a fused kernel overrides it.
pub trait RmsNormGradients: Backend {
    fn rms_norm_gradients(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
        grad_output: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        composed_gradients::<Self>(x, gamma, epsilon, grad_output)
    }
}

impl FusedRmsNorm for Flex {
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        match rms_norm_f32(&x, &gamma, epsilon as f32) {
            Some(out) => out,
            None => composed_forward::<Flex>(x, gamma, epsilon),
        }
    }
}

impl RmsNormGradients for Flex {
    fn rms_norm_gradients(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
        grad_output: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        match rms_norm_gradients_f32(&x, &gamma, epsilon as f32, &grad_output) {
            Some(grads) => grads,
            None => composed_gradients::<Flex>(x, gamma, epsilon, grad_output),
        }
    }
}

impl<B: FusedRmsNorm + RmsNormGradients, C: CheckpointStrategy> FusedRmsNorm for Autodiff<B, C> {
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        match RmsNormBackward
            .prepare::<C>([x.node(), gamma.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, gamma) = (x.into_primitive(), gamma.into_primitive());
                let out = B::fused_rms_norm(x.clone(), gamma.clone(), epsilon);
                prep.finish((x, gamma, epsilon), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_rms_norm(
                x.into_primitive(),
                gamma.into_primitive(),
                epsilon,
            )),
        }
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: RmsNormGradients> Backward<B, 2> for RmsNormBackward {
    /// `x`, `γ` and `ε`.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [x_node, gamma_node] = ops.parents;
        let grad_output = grads.consume::<B>(&ops.node);
        let (x, gamma, epsilon) = ops.state;
        let [grad_x, grad_gamma] = B::rms_norm_gradients(x, gamma, epsilon, grad_output);
        if let Some(node) = x_node {
            grads.register::<B>(node.id, grad_x);
        }
        if let Some(node) = gamma_node {
            grads.register::<B>(node.id, grad_gamma);
        }
    }
}

/// `[rows, d]` views of a `[.., d]` tensor and of `γ` broadcast to `[1, d]`.
fn as_rows<B: Backend>(x: &FloatTensor<B>) -> (Shape, usize, usize) {
    let shape = x.shape();
    let d = shape.as_slice().last().copied().unwrap_or(1);
    let rows = shape.num_elements() / d.max(1);
    (shape, rows, d)
}

/// `1 / √(mean(x²) + ε)` per row (`[rows, 1]`) and `x̂ = x · r` (`[rows, d]`).
fn composed_normalized<B: Backend>(
    x: FloatTensor<B>,
    rows: usize,
    d: usize,
    epsilon: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x = B::float_reshape(x, Shape::new([rows, d]));
    let mean_square = B::float_mean_dim(B::float_mul(x.clone(), x.clone()), 1);
    let inverse_rms = B::float_recip(B::float_sqrt(B::float_add_scalar(
        mean_square,
        epsilon.into(),
    )));
    let normalized = B::float_mul(x, inverse_rms.clone());
    (inverse_rms, normalized)
}

fn composed_forward<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    epsilon: f64,
) -> FloatTensor<B> {
    let (shape, rows, d) = as_rows::<B>(&x);
    let (_, normalized) = composed_normalized::<B>(x, rows, d, epsilon);
    let gamma = B::float_reshape(gamma, Shape::new([1, d]));
    B::float_reshape(B::float_mul(normalized, gamma), shape)
}

pub(crate) fn composed_gradients<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    epsilon: f64,
    grad_output: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let (shape, rows, d) = as_rows::<B>(&x);
    let (inverse_rms, normalized) = composed_normalized::<B>(x, rows, d, epsilon);
    let grad_output = B::float_reshape(grad_output, Shape::new([rows, d]));
    let grad_gamma = B::float_reshape(
        B::float_sum_dim(B::float_mul(grad_output.clone(), normalized.clone()), 0),
        Shape::new([d]),
    );
    let g = B::float_mul(grad_output, B::float_reshape(gamma, Shape::new([1, d])));
    let mean_dot = B::float_mean_dim(B::float_mul(g.clone(), normalized.clone()), 1);
    let grad_x = B::float_mul(
        B::float_sub(g, B::float_mul(normalized, mean_dot)),
        inverse_rms,
    );
    [B::float_reshape(grad_x, shape), grad_gamma]
}

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// `x` as rows of `d` and `γ`, when both are contiguous f32 and `γ` is `[d]`.
fn operands<'a>(x: &'a FlexTensor, gamma: &'a FlexTensor) -> Option<(&'a [f32], &'a [f32])> {
    let dims = x.layout().shape().as_slice();
    let d = *dims.last()?;
    if gamma.layout().shape().as_slice() != [d] || d == 0 {
        return None;
    }
    Some((contiguous_f32(x)?, contiguous_f32(gamma)?))
}

/// Σ aᵢ·bᵢ with eight partial sums (a fixed order that vectorises).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut partial = [0.0f32; 8];
    let (mut a_chunks, mut b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    for (a, b) in (&mut a_chunks).zip(&mut b_chunks) {
        for ((p, &x), &y) in partial.iter_mut().zip(a).zip(b) {
            *p += x * y;
        }
    }
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    partial.iter().sum::<f32>() + tail
}

#[inline(always)]
fn inverse_rms(row: &[f32], epsilon: f32) -> f32 {
    1.0 / (dot(row, row) / row.len() as f32 + epsilon).sqrt()
}

fn rms_norm_f32(x: &FlexTensor, gamma: &FlexTensor, epsilon: f32) -> Option<FlexTensor> {
    let (values, gamma_values) = operands(x, gamma)?;
    let d = gamma_values.len();
    let mut out = zeroed(values.len());
    out.par_chunks_mut(ROWS_PER_TASK * d)
        .zip(values.par_chunks(ROWS_PER_TASK * d))
        .for_each(|(out, x)| {
            wide!({
                for (out, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    let r = inverse_rms(x, epsilon);
                    for ((y, &x), &g) in out.iter_mut().zip(x).zip(gamma_values) {
                        *y = x * r * g;
                    }
                }
            })
        });
    let shape = x.layout().shape().clone();
    Some(FlexTensor::from_data(TensorData::new(out, shape)))
}

fn rms_norm_gradients_f32(
    x: &FlexTensor,
    gamma: &FlexTensor,
    epsilon: f32,
    grad_output: &FlexTensor,
) -> Option<[FlexTensor; 2]> {
    let (values, gamma_values) = operands(x, gamma)?;
    if grad_output.layout().shape() != x.layout().shape() {
        return None;
    }
    let grad_values = contiguous_f32(grad_output)?;
    let d = gamma_values.len();
    let mut grad_x = zeroed(values.len());
    // Each task's share of dγ, summed afterwards in task order: deterministic whatever thread
    // ran which task.
    let partial_gamma: Vec<Vec<f32>> = grad_x
        .par_chunks_mut(ROWS_PER_TASK * d)
        .zip(values.par_chunks(ROWS_PER_TASK * d))
        .zip(grad_values.par_chunks(ROWS_PER_TASK * d))
        .map(|((grad_x, x), dy)| {
            wide!({
                let mut grad_gamma = vec![0.0f32; d];
                let mut g = vec![0.0f32; d];
                let rows = grad_x
                    .chunks_exact_mut(d)
                    .zip(x.chunks_exact(d))
                    .zip(dy.chunks_exact(d));
                for ((grad_x, x), dy) in rows {
                    let r = inverse_rms(x, epsilon);
                    for (((g, &dy), &gamma), (grad_gamma, &x)) in g
                        .iter_mut()
                        .zip(dy)
                        .zip(gamma_values)
                        .zip(grad_gamma.iter_mut().zip(x))
                    {
                        *g = dy * gamma;
                        *grad_gamma += dy * x * r;
                    }
                    let mean_dot = dot(&g, x) * r / d as f32;
                    for ((grad_x, &g), &x) in grad_x.iter_mut().zip(&g).zip(x) {
                        *grad_x = r * (g - x * r * mean_dot);
                    }
                }
                grad_gamma
            })
        })
        .collect();
    let mut grad_gamma = vec![0.0f32; d];
    for partial in partial_gamma {
        for (total, value) in grad_gamma.iter_mut().zip(partial) {
            *total += value;
        }
    }
    let shape = x.layout().shape().clone();
    Some([
        FlexTensor::from_data(TensorData::new(grad_x, shape)),
        FlexTensor::from_data(TensorData::new(grad_gamma, [d])),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::RmsNormConfig;
    use burn::tensor::Distribution;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().expect("f32 tensor")
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str, tolerance: f32) {
        assert_eq!(a.len(), b.len(), "{what}: sizes");
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0f32, f32::max);
        assert!(
            worst <= tolerance,
            "{what}: max relative difference {worst}"
        );
    }

    /// Output and gradients (x and γ) against Burn's `RmsNorm` under autodiff, and the plain
    /// path against the autodiff path bit for bit.
    #[test]
    fn matches_burns_rms_norm_and_its_gradients() {
        let plain = Device::flex();
        let device = plain.clone().autodiff();
        plain.seed(13);
        let shape = [3, 70, 200];
        let x0 = Tensor::<3>::random(shape, Distribution::Normal(0.5, 2.0), &plain);
        let upstream = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &plain);
        let gamma0 = Tensor::<1>::random([200], Distribution::Normal(1.0, 0.5), &plain);
        let run = |fused: bool| {
            let mut norm = RmsNormConfig::new(200).with_epsilon(1e-5).init(&device);
            norm.gamma =
                burn::module::Param::from_tensor(Tensor::from_data(gamma0.to_data(), &device));
            let x = Tensor::<3>::from_data(x0.to_data(), &device).require_grad();
            let out = if fused {
                rms_norm(&norm, x.clone())
            } else {
                norm.forward(x.clone())
            };
            let weights = Tensor::<3>::from_data(upstream.to_data(), &device);
            let grads = (out.clone() * weights).sum().backward();
            let grad_gamma = values(norm.gamma.val().grad(&grads).expect("γ is tracked"));
            [
                values(out.inner()),
                values(x.grad(&grads).expect("x is tracked")),
                grad_gamma,
            ]
        };
        let [out, grad_x, grad_gamma] = run(true);
        let [ref_out, ref_grad_x, ref_grad_gamma] = run(false);
        assert_close(&out, &ref_out, "output", 1e-6);
        assert_close(&grad_x, &ref_grad_x, "x gradient", 1e-5);
        assert_close(&grad_gamma, &ref_grad_gamma, "γ gradient", 1e-5);

        let mut norm = RmsNormConfig::new(200).with_epsilon(1e-5).init(&plain);
        norm.gamma = burn::module::Param::from_tensor(gamma0.clone());
        assert_eq!(values(rms_norm(&norm, x0.clone())), out);
    }

    /// The composed forward and backward (the fallback for other dtypes and layouts) give the
    /// kernels' numbers.
    #[test]
    fn composed_form_matches_the_kernels() {
        let (rows, d) = (50, 64);
        let make = |seed: u64, shape: Vec<usize>| {
            let n: usize = shape.iter().product();
            let values = (0..n)
                .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 250.0) - 2.0)
                .collect::<Vec<_>>();
            FlexTensor::from_data(TensorData::new(values, shape))
        };
        let (x, dy, gamma) = (
            make(1, vec![rows, d]),
            make(2, vec![rows, d]),
            make(3, vec![d]),
        );
        let read = |t: FlexTensor| t.into_data().try_to_vec::<f32>().expect("f32");
        let fused = rms_norm_f32(&x, &gamma, 1e-6).expect("contiguous f32");
        let composed = composed_forward::<Flex>(x.clone(), gamma.clone(), 1e-6);
        assert_close(&read(fused), &read(composed), "output", 1e-6);
        let [grad_x, grad_gamma] =
            rms_norm_gradients_f32(&x, &gamma, 1e-6, &dy).expect("contiguous f32");
        let [ref_grad_x, ref_grad_gamma] = composed_gradients::<Flex>(x, gamma, 1e-6, dy);
        assert_close(&read(grad_x), &read(ref_grad_x), "x gradient", 1e-5);
        assert_close(&read(grad_gamma), &read(ref_grad_gamma), "γ gradient", 1e-5);
    }
}
