//! Rotary position embedding (`x · cos + rotate_half(x) · sin`) as one operation.
//!
//! Composed, the rotation is two slices, a negation, a concatenation, two products and a sum:
//! six passes over the queries and keys of every layer, and under autodiff the backward pass of
//! each. As a backend extension it is one pass each way. It also keeps the layout of its input:
//! the queries and keys arrive as `[batch, tokens, heads, head_dim]` projections seen as
//! `[batch, heads, tokens, head_dim]`, and the rotated tensor (and, backward, the gradient) is
//! written in that same physical layout, so the head-swapping view and the reshape around the
//! projections stay free instead of each costing a copy. With `Rᵀ(v) = [v₂, −v₁]` the transpose
//! of the half rotation:
//!
//! ```text
//! y  = x · cos + rotate_half(x) · sin          dx = dy · cos + Rᵀ(dy · sin)
//! ```
//!
//! Routed for Burn's CPU backend (`flex`), plain and under autodiff; other backends keep the
//! composed form ([`crate::nn::rope::apply_rotary`]).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Flex, TensorMetadata};
use burn::tensor::{Bytes, DType, Shape, Slice};
use burn_flex::{FlexTensor, Layout};
use rayon::prelude::*;

use crate::nn::cpu_ops::zeroed;
use crate::nn::simd::wide;

/// The fused rotation.
#[backend_extension(Flex, Autodiff)]
pub trait FusedRope: Backend {
    /// `x · cos + rotate_half(x) · sin` for `x` `[batch, heads, tokens, head_dim]` and `cos`,
    /// `sin` `[batch, tokens, head_dim]` (the same angles for every head).
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// The backward pass of [`FusedRope`] and what it needs of the input's layout. The defaults
/// compose the gradient from the backend's tensor operations.
pub trait RopeGradients: Backend {
    /// The strides of `x` when they describe a dense buffer (any axis order), to lay the
    /// gradient out the same way.
    fn dense_strides(_x: &FloatTensor<Self>) -> Option<[usize; 4]> {
        None
    }

    /// `dx = dy · cos + Rᵀ(dy · sin)`.
    fn rope_gradient(
        grad_output: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        _strides: Option<[usize; 4]>,
    ) -> FloatTensor<Self> {
        composed_gradient::<Self>(grad_output, cos, sin)
    }
}

impl FusedRope for Flex {
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let strides = dense_strides(&x);
        match rotate_f32(&x, &cos, &sin, strides, Direction::Forward) {
            Some(out) => out,
            None => composed_forward::<Flex>(x, cos, sin),
        }
    }
}

impl RopeGradients for Flex {
    fn dense_strides(x: &FloatTensor<Self>) -> Option<[usize; 4]> {
        dense_strides(x)
    }

    fn rope_gradient(
        grad_output: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        strides: Option<[usize; 4]>,
    ) -> FloatTensor<Self> {
        match rotate_f32(&grad_output, &cos, &sin, strides, Direction::Backward) {
            Some(grad) => grad,
            None => composed_gradient::<Flex>(grad_output, cos, sin),
        }
    }
}

impl<B: FusedRope + RopeGradients, C: CheckpointStrategy> FusedRope for Autodiff<B, C> {
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // The angles are functions of the positions, never trained: only `x` is tracked.
        match RopeBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = x.into_primitive();
                let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
                let strides = B::dense_strides(&x);
                let out = B::fused_rope(x, cos.clone(), sin.clone());
                prep.finish((cos, sin, strides), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_rope(
                x.into_primitive(),
                cos.into_primitive(),
                sin.into_primitive(),
            )),
        }
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: RopeGradients> Backward<B, 1> for RopeBackward {
    /// `cos`, `sin` and the input's dense strides.
    type State = (FloatTensor<B>, FloatTensor<B>, Option<[usize; 4]>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [x_node] = ops.parents;
        let grad_output = grads.consume::<B>(&ops.node);
        let (cos, sin, strides) = ops.state;
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::rope_gradient(grad_output, cos, sin, strides));
        }
    }
}

/// The two halves of the last dimension.
fn halves<B: Backend>(x: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = x.shape();
    let dims = shape.as_slice();
    let half = (dims[3] / 2) as isize;
    let slice = |start: isize, end: isize| {
        let mut slices = [Slice::new(0, None, 1); 4];
        slices[3] = Slice::new(start, Some(end), 1);
        B::float_slice(x.clone(), &slices)
    };
    (slice(0, half), slice(half, 2 * half))
}

/// `cos`/`sin` `[b, t, d]` as `[b, 1, t, d]`, broadcast over the heads.
fn per_head<B: Backend>(angles: FloatTensor<B>) -> FloatTensor<B> {
    let shape = angles.shape();
    let [b, t, d]: [usize; 3] = shape.as_slice().try_into().expect("[batch, tokens, dim]");
    B::float_reshape(angles, Shape::new([b, 1, t, d]))
}

fn composed_forward<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let (x1, x2) = halves::<B>(x.clone());
    let rotated = B::float_cat(vec![B::float_neg(x2), x1], 3);
    B::float_add(
        B::float_mul(x, per_head::<B>(cos)),
        B::float_mul(rotated, per_head::<B>(sin)),
    )
}

pub(crate) fn composed_gradient<B: Backend>(
    grad_output: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let through_sin = B::float_mul(grad_output.clone(), per_head::<B>(sin));
    let (v1, v2) = halves::<B>(through_sin);
    let transposed = B::float_cat(vec![v2, B::float_neg(v1)], 3);
    B::float_add(B::float_mul(grad_output, per_head::<B>(cos)), transposed)
}

/// The strides of a rank-4 tensor whose elements fill `0..n` of some buffer exactly once in some
/// axis order with the last axis innermost (a permuted contiguous layout, such as the
/// `[b, t, h, d]` projections seen as `[b, h, t, d]`).
fn dense_strides(x: &FlexTensor) -> Option<[usize; 4]> {
    let layout = x.layout();
    let dims: [usize; 4] = layout.shape().as_slice().try_into().ok()?;
    let mut strides = [0usize; 4];
    for (stride, &s) in strides.iter_mut().zip(layout.strides()) {
        *stride = usize::try_from(s).ok()?;
    }
    if dims[3] > 1 && strides[3] != 1 {
        return None;
    }
    // Walk the axes from the smallest stride out: each must start where the previous ended.
    let mut axes: Vec<usize> = (0..4).filter(|&a| dims[a] > 1).collect();
    axes.sort_by_key(|&a| strides[a]);
    let mut expected = 1;
    for a in axes {
        if strides[a] != expected {
            return None;
        }
        expected *= dims[a];
    }
    // Size-1 axes contribute no offset; give them any stride.
    Some(strides)
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    /// `y = x · cos + rotate_half(x) · sin`.
    Forward,
    /// `dx = dy · cos + Rᵀ(dy · sin)`.
    Backward,
}

/// A raw output pointer shared by the row tasks, each writing its own rows.
#[derive(Clone, Copy)]
struct Output(*mut f32);
// SAFETY: the tasks write disjoint elements (see `rotate_f32`).
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// # Safety
    /// `offset..offset + len` lies in the buffer and no other task touches it.
    unsafe fn run<'a>(self, offset: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}

/// The rotation (either direction) of f32 `x` `[b, h, t, d]` read through its strides (last
/// axis contiguous), with contiguous f32 `cos`/`sin` `[b, t, d]`. The result is laid out with
/// `out_strides` when given (a dense layout of the same shape), contiguously otherwise.
fn rotate_f32(
    x: &FlexTensor,
    cos: &FlexTensor,
    sin: &FlexTensor,
    out_strides: Option<[usize; 4]>,
    direction: Direction,
) -> Option<FlexTensor> {
    if [x, cos, sin].iter().any(|t| t.dtype() != DType::F32) {
        return None;
    }
    let layout = x.layout();
    let [b, h, t, d]: [usize; 4] = layout.shape().as_slice().try_into().ok()?;
    if cos.layout().shape().as_slice() != [b, t, d]
        || sin.layout().shape().as_slice() != [b, t, d]
        || d % 2 != 0
    {
        return None;
    }
    let (cos, sin) = (cos.as_slice::<f32>()?, sin.as_slice::<f32>()?);
    let mut in_strides = [0usize; 4];
    for (stride, &s) in in_strides.iter_mut().zip(layout.strides()) {
        *stride = usize::try_from(s).ok()?;
    }
    if d > 1 && in_strides[3] != 1 {
        return None;
    }
    let data = x.storage::<f32>();
    let start = layout.start_offset();
    let n = b * h * t * d;
    if n > 0 {
        let last = start
            + (0..4)
                .map(|a| (layout.shape()[a] - 1) * in_strides[a])
                .sum::<usize>();
        if last >= data.len() {
            return None;
        }
    }
    let out_strides = out_strides.unwrap_or([h * t * d, t * d, d, 1]);
    let mut out = zeroed(n);
    let target = Output(out.as_mut_ptr());
    let half = d / 2;
    (0..b * h * t)
        .into_par_iter()
        .with_min_len(64)
        .for_each(|row| {
            let (bh, ti) = (row / t, row % t);
            let (bi, hi) = (bh / h, bh % h);
            let source = start + bi * in_strides[0] + hi * in_strides[1] + ti * in_strides[2];
            let x = &data[source..source + d];
            let angles = (bi * t + ti) * d;
            let (cos, sin) = (&cos[angles..angles + d], &sin[angles..angles + d]);
            let offset = bi * out_strides[0] + hi * out_strides[1] + ti * out_strides[2];
            // SAFETY: `out_strides` is a dense layout of `[b, h, t, d]` (the input's own, checked
            // by `dense_strides`, or the contiguous one), so distinct rows own distinct `d`-long
            // runs inside `0..n`; no two tasks write the same element.
            let y = unsafe { target.run(offset, d) };
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            let (c1, c2) = cos.split_at(half);
            let (s1, s2) = sin.split_at(half);
            wide!(match direction {
                Direction::Forward => {
                    for j in 0..half {
                        y1[j] = x1[j] * c1[j] - x2[j] * s1[j];
                        y2[j] = x2[j] * c2[j] + x1[j] * s2[j];
                    }
                }
                Direction::Backward => {
                    for j in 0..half {
                        y1[j] = x1[j] * c1[j] + x2[j] * s2[j];
                        y2[j] = x2[j] * c2[j] - x1[j] * s1[j];
                    }
                }
            })
        });
    let layout = Layout::new(
        Shape::new([b, h, t, d]),
        out_strides.iter().map(|&s| s as isize).collect(),
        0,
    );
    Some(FlexTensor::new(Bytes::from_elems(out), layout, DType::F32))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use crate::nn::rope::{apply_rotary, composed_rotary as composed};

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().expect("f32 tensor")
    }

    fn assert_close(a: Vec<f32>, b: Vec<f32>, what: &str) {
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert_eq!(a.len(), b.len(), "{what}: sizes");
        assert!(worst <= 1e-6, "{what}: max difference {worst}");
    }

    /// Queries as the model builds them (a `[b, t, h, d]` projection seen as `[b, h, t, d]`):
    /// the fused rotation and its gradient equal the composed ones, the plain and autodiff
    /// paths agree to the bit, and the result keeps the input's physical layout.
    #[test]
    fn matches_the_composed_rotation_and_its_gradient() {
        let plain = Device::flex();
        let device = plain.clone().autodiff();
        plain.seed(19);
        let (b, t, h, d) = (2, 37, 3, 16);
        let x0 = Tensor::<4>::random([b, t, h, d], Distribution::Normal(0.0, 1.0), &plain);
        let upstream = Tensor::<4>::random([b, h, t, d], Distribution::Normal(0.0, 1.0), &plain);
        let angles = Tensor::<3>::random([b, t, d], Distribution::Uniform(-3.0, 3.0), &plain);
        let (cos0, sin0) = (angles.clone().cos(), angles.sin());
        let run = |fused: bool| {
            let x = Tensor::<4>::from_data(x0.to_data(), &device).require_grad();
            let cos = Tensor::<3>::from_data(cos0.to_data(), &device);
            let sin = Tensor::<3>::from_data(sin0.to_data(), &device);
            let q = x.clone().swap_dims(1, 2);
            let out = if fused {
                apply_rotary(q, &cos, &sin)
            } else {
                composed(q, &cos, &sin)
            };
            let weights = Tensor::<4>::from_data(upstream.to_data(), &device);
            let grads = (out.clone() * weights).sum().backward();
            let grad = Tensor::<4>::from_data(x.grad(&grads).expect("tracked").to_data(), &plain);
            (out.inner(), grad)
        };
        let (out, grad) = run(true);
        let (ref_out, ref_grad) = run(false);
        assert_close(values(out.clone()), values(ref_out), "output");
        assert_close(values(grad), values(ref_grad), "gradient");

        let direct = apply_rotary(x0.clone().swap_dims(1, 2), &cos0.clone(), &sin0.clone());
        assert_eq!(values(direct), values(out));
    }

    /// The result is laid out like the input (`[b, t, h, d]` behind a `[b, h, t, d]` view), so
    /// the model's swap back and reshape need no copy.
    #[test]
    fn keeps_the_input_layout() {
        use burn::backend::Flex;
        use burn::tensor::TensorData;
        use burn_flex::FlexTensor;

        use super::FusedRope;

        let (b, t, h, d) = (2, 5, 3, 4);
        let flex = |n: usize, shape: Vec<usize>| {
            let values: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
            FlexTensor::from_data(TensorData::new(values, shape))
        };
        let x = flex(b * t * h * d, vec![b, t, h, d]).transpose(1, 2);
        let (cos, sin) = (
            flex(b * t * d, vec![b, t, d]),
            flex(b * t * d, vec![b, t, d]),
        );
        let strides = x.layout().strides().to_vec();
        let out = Flex::fused_rope(x, cos, sin);
        assert_eq!(out.layout().strides(), strides.as_slice());
        assert!(out.transpose(1, 2).is_contiguous());
    }

    #[test]
    fn contiguous_input_gives_the_composed_rotation() {
        let device = Device::flex();
        device.seed(23);
        let x = Tensor::<4>::random([1, 2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
        let angles = Tensor::<3>::random([1, 5, 8], Distribution::Uniform(-3.0, 3.0), &device);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let fused = apply_rotary(x.clone(), &cos, &sin);
        assert_close(values(fused), values(composed(x, &cos, &sin)), "output");
    }
}
