//! The linear layer's matrix products on the CPU backend, LoRA update included.
//!
//! flex allocates every matrix product's output twice (a zeroed byte vector, then an aligned
//! copy of it), and a LoRA layer composed from tensor operations builds its `[rows, d_out]`
//! update and adds it to the base output as separate passes, forward and backward. This
//! extension writes each product once into its final buffer and accumulates the low-rank update
//! into the base product in place (`gemm`'s `dst = dst + β·lhs·rhs`):
//!
//! ```text
//! y  = x·W + s·(x·Aᵀ)·Bᵀ                    (A: [r, d_in], B: [d_out, r], PEFT's layout)
//! dx = dy·Wᵀ + s·(dy·B)·A                   dW = xᵀ·dy
//! dA = s·(dy·B)ᵀ·x                          dB = s·dyᵀ·(x·Aᵀ)
//! ```
//!
//! Routed for Burn's CPU backend (`flex`), plain and under autodiff, for 2-D f32 operands with
//! non-negative strides; anything else, and every other backend, composes the same products from
//! tensor operations ([`crate::nn::linear::flat_linear`]).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Flex};
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

use crate::nn::cpu_ops::{product_into, Operand};

/// The fused products.
#[backend_extension(Flex, Autodiff)]
pub trait FusedLinear: Backend {
    /// `x·W` for `x` `[rows, d_in]` and `W` `[d_in, d_out]`.
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `x·W + scale·(x·Aᵀ)·Bᵀ` with `A` `[r, d_in]` and `B` `[d_out, r]`.
    fn fused_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;
}

/// Matrix products into fresh buffers, `lhs·rhs` and `c + β·lhs·rhs`, with transposes as views.
/// The default composes them from the backend's operations; flex overrides them with `gemm`.
pub trait Products: Backend {
    /// `lhs·rhs`.
    fn product(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// `c + beta·lhs·rhs`, reusing `c`'s buffer where the backend can.
    fn accumulate_product(
        c: FloatTensor<Self>,
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        beta: f64,
    ) -> FloatTensor<Self> {
        composed_accumulate::<Self>(c, lhs, rhs, beta)
    }
}

fn composed_accumulate<B: Backend>(
    c: FloatTensor<B>,
    lhs: FloatTensor<B>,
    rhs: FloatTensor<B>,
    beta: f64,
) -> FloatTensor<B> {
    let product = B::float_matmul(lhs, rhs);
    B::float_add(c, B::float_mul_scalar(product, beta.into()))
}

impl Products for Flex {
    fn product(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        match product_f32(&lhs, &rhs) {
            Some(out) => out,
            None => Flex::float_matmul(lhs, rhs),
        }
    }

    fn accumulate_product(
        c: FloatTensor<Self>,
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        beta: f64,
    ) -> FloatTensor<Self> {
        match accumulate_f32(c, &lhs, &rhs, beta as f32) {
            Ok(out) => out,
            Err(c) => composed_accumulate::<Flex>(c, lhs, rhs, beta),
        }
    }
}

fn transpose<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    B::float_transpose(t)
}

/// `x·W + scale·(x·Aᵀ)·Bᵀ` and the `[rows, r]` down-projection `x·Aᵀ` it went through.
fn lora_forward<B: Products>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    lora_a: FloatTensor<B>,
    lora_b: FloatTensor<B>,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let down = B::product(x.clone(), transpose::<B>(lora_a));
    let base = B::product(x, weight);
    let out = B::accumulate_product(base, down.clone(), transpose::<B>(lora_b), scale);
    (out, down)
}

impl FusedLinear for Flex {
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        Flex::product(x, weight)
    }

    fn fused_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        lora_forward::<Flex>(x, weight, lora_a, lora_b, scale).0
    }
}

impl<B: FusedLinear + Products, C: CheckpointStrategy> FusedLinear for Autodiff<B, C> {
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x_tracked, weight_tracked) = (x.is_tracked(), weight.is_tracked());
        match LinearBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, weight) = (x.into_primitive(), weight.into_primitive());
                let out = B::product(x.clone(), weight.clone());
                // dx needs W, dW needs x: keep only what a tracked parent needs.
                let state = (weight_tracked.then_some(x), x_tracked.then_some(weight));
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::product(x.into_primitive(), weight.into_primitive()))
            }
        }
    }

    fn fused_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), weight.node(), lora_a.node(), lora_b.node()];
        match LoraLinearBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = x.into_primitive();
                let weight = weight.into_primitive();
                let (lora_a, lora_b) = (lora_a.into_primitive(), lora_b.into_primitive());
                let (out, down) = lora_forward::<B>(
                    x.clone(),
                    weight.clone(),
                    lora_a.clone(),
                    lora_b.clone(),
                    scale,
                );
                let state = LoraState {
                    x,
                    weight,
                    lora_a,
                    lora_b,
                    down,
                    scale,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_lora_linear(
                x.into_primitive(),
                weight.into_primitive(),
                lora_a.into_primitive(),
                lora_b.into_primitive(),
                scale,
            )),
        }
    }
}

#[derive(Debug)]
struct LinearBackward;

impl<B: Products> Backward<B, 2> for LinearBackward {
    /// `x` when `W` is tracked, `W` when `x` is.
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [x_node, weight_node] = ops.parents;
        let grad_output = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        if let (Some(node), Some(weight)) = (x_node, weight) {
            let grad_x = B::product(grad_output.clone(), transpose::<B>(weight));
            grads.register::<B>(node.id, grad_x);
        }
        if let (Some(node), Some(x)) = (weight_node, x) {
            grads.register::<B>(node.id, B::product(transpose::<B>(x), grad_output));
        }
    }
}

#[derive(Debug)]
struct LoraLinearBackward;

/// What the LoRA backward pass needs.
#[derive(Debug, Clone)]
struct LoraState<B: Backend> {
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    lora_a: FloatTensor<B>,
    lora_b: FloatTensor<B>,
    /// `x·Aᵀ`, `[rows, r]`.
    down: FloatTensor<B>,
    scale: f64,
}

impl<B: Products> Backward<B, 4> for LoraLinearBackward {
    type State = LoraState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [x_node, weight_node, a_node, b_node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let LoraState {
            x,
            weight,
            lora_a,
            lora_b,
            down,
            scale,
        } = ops.state;
        // dy·B, `[rows, r]`: the gradient reaching the down-projection, before the scale.
        let dy_b = B::product(dy.clone(), lora_b);
        if let Some(node) = b_node {
            // dB = s·dyᵀ·down, `[d_out, r]`.
            let grad_b =
                B::float_mul_scalar(B::product(transpose::<B>(dy.clone()), down), scale.into());
            grads.register::<B>(node.id, grad_b);
        }
        if let Some(node) = a_node {
            // dA = s·(dy·B)ᵀ·x, `[r, d_in]`.
            let grad_a = B::float_mul_scalar(
                B::product(transpose::<B>(dy_b.clone()), x.clone()),
                scale.into(),
            );
            grads.register::<B>(node.id, grad_a);
        }
        if let Some(node) = weight_node {
            grads.register::<B>(node.id, B::product(transpose::<B>(x), dy.clone()));
        }
        if let Some(node) = x_node {
            let base = B::product(dy, transpose::<B>(weight));
            grads.register::<B>(node.id, B::accumulate_product(base, dy_b, lora_a, scale));
        }
    }
}

/// A 2-D f32 tensor with non-negative strides whose extent lies inside its buffer, as a product
/// operand (valid while `t` lives).
fn operand_of(t: &FlexTensor) -> Option<Operand> {
    if t.dtype() != DType::F32 {
        return None;
    }
    let layout = t.layout();
    let [rows, columns]: [usize; 2] = layout.shape().as_slice().try_into().ok()?;
    let [row_stride, column_stride]: [isize; 2] = layout.strides().try_into().ok()?;
    if row_stride < 0 || column_stride < 0 {
        return None;
    }
    let data = t.storage::<f32>();
    let offset = layout.start_offset();
    if rows > 0 && columns > 0 {
        let last =
            offset + (rows - 1) * row_stride as usize + (columns - 1) * column_stride as usize;
        if last >= data.len() {
            return None;
        }
    }
    let ptr = data.get(offset..)?.as_ptr();
    Some(Operand::new(
        ptr,
        [rows, columns],
        [row_stride, column_stride],
    ))
}

/// Products smaller than this run on one thread (flex's own threshold).
const PARALLEL_WORK: usize = 192 * 192 * 192;

/// `dst = lhs·rhs`, or `dst += beta·lhs·rhs` when `accumulate`, into a row-major `dst`, on all
/// threads when the product is large.
///
/// # Safety
/// As [`product_into`]'s, with `dst` `lhs.rows × rhs.columns` and contiguous.
unsafe fn gemm_into(dst: *mut f32, lhs: Operand, rhs: Operand, accumulate: bool, beta: f32) {
    let (m, k, n) = (lhs.rows(), lhs.columns(), rhs.columns());
    let parallelism = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_WORK {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: as the caller promises.
    unsafe { product_into(dst, n, accumulate, lhs, rhs, beta, parallelism) };
}

/// `lhs·rhs` into a buffer written once (no zeroing, no second copy).
fn product_f32(lhs: &FlexTensor, rhs: &FlexTensor) -> Option<FlexTensor> {
    let (a, b) = (operand_of(lhs)?, operand_of(rhs)?);
    if a.columns() != b.rows() {
        return None;
    }
    let (m, n) = (a.rows(), b.columns());
    let values = if a.columns() == 0 || m == 0 || n == 0 {
        vec![0.0f32; m * n]
    } else {
        let mut values = Vec::<f32>::with_capacity(m * n);
        // SAFETY: the capacity holds m·n floats; with k > 0 and `read_dst` false, gemm writes
        // every one of them before `set_len` exposes them.
        unsafe {
            gemm_into(values.as_mut_ptr(), a, b, false, 1.0);
            values.set_len(m * n);
        }
        values
    };
    Some(FlexTensor::from_data(TensorData::new(values, [m, n])))
}

/// `c + beta·lhs·rhs`, in `c`'s own buffer when `c` is a uniquely held contiguous f32 matrix
/// (the fresh product it always is here), in a copy of it otherwise; `Err(c)` for operands the
/// kernel does not take.
fn accumulate_f32(
    c: FlexTensor,
    lhs: &FlexTensor,
    rhs: &FlexTensor,
    beta: f32,
) -> Result<FlexTensor, FlexTensor> {
    let (Some(a), Some(b)) = (operand_of(lhs), operand_of(rhs)) else {
        return Err(c);
    };
    let fits = a.columns() == b.rows()
        && c.layout().shape().as_slice() == [a.rows(), b.columns()]
        && c.dtype() == DType::F32;
    if !fits {
        return Err(c);
    }
    let owned = c.is_unique() && c.layout().is_contiguous() && c.layout().start_offset() == 0;
    let mut c = if owned {
        c
    } else {
        FlexTensor::from_data(c.into_data())
    };
    if a.columns() > 0 && a.rows() > 0 && b.columns() > 0 {
        let Some(dst) = c.try_storage_mut::<f32>() else {
            return Err(c);
        };
        // SAFETY: `dst` is the uniquely held, initialised `rows × columns` row-major result of
        // the product before (shape and layout checked above).
        unsafe { gemm_into(dst.as_mut_ptr(), a, b, true, beta) };
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, Param};
    use burn::tensor::module::linear;
    use burn::tensor::{Device, Distribution, Tensor};

    use crate::nn::linear::{flat_linear, Linear, LoraSpec};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().expect("f32 tensor")
    }

    fn assert_close(a: Vec<f32>, b: Vec<f32>, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: sizes");
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "{what}: max relative difference {worst}");
    }

    /// A LoRA layer (bias, trained or frozen base) on a `[batch, tokens, d_in]` input: output
    /// and every gradient equal the products composed by Burn's autodiff, and the plain forward
    /// gives the autodiff forward's numbers bit for bit.
    #[test]
    fn lora_layer_matches_the_composed_products() {
        for frozen_base in [true, false] {
            let plain = Device::flex();
            let device = plain.clone().autodiff();
            plain.seed(31);
            let (d_in, d_out, rank) = (40, 24, 4);
            let spec = LoraSpec {
                rank,
                alpha: 8.0,
                dropout: 0.0,
                quantize_base: false,
            };
            let mut layer = Linear::new(d_in, d_out, true, &device);
            layer.attach_lora(&spec, &device);
            let adapter = layer.lora.as_mut().expect("attached");
            // A trained-looking B (a fresh one is zero).
            adapter.lora_b = Param::from_tensor(Tensor::random(
                [d_out, rank],
                Distribution::Normal(0.0, 0.5),
                &device,
            ));
            if !frozen_base {
                layer.weight = layer.weight.clone().set_require_grad(true);
            }
            let x0 = Tensor::<3>::random([3, 7, d_in], Distribution::Normal(0.0, 1.0), &plain);
            let upstream =
                Tensor::<3>::random([3, 7, d_out], Distribution::Normal(0.0, 1.0), &plain);
            let run = |fused: bool| {
                let x = Tensor::<3>::from_data(x0.to_data(), &device).require_grad();
                let out = if fused {
                    layer.forward(x.clone())
                } else {
                    let adapter = layer.lora.as_ref().expect("attached");
                    let bias = layer.bias.as_ref().map(|b| b.val());
                    let base = linear(x.clone(), layer.weight.val(), bias);
                    let down = linear(x.clone(), adapter.lora_a.val().transpose(), None);
                    let up = adapter.lora_b.val().transpose().mul_scalar(adapter.scale);
                    base + linear(down, up, None)
                };
                let weights = Tensor::<3>::from_data(upstream.to_data(), &device);
                let grads = (out.clone() * weights).sum().backward();
                let adapter = layer.lora.as_ref().expect("attached");
                let weight_grad = layer.weight.val().grad(&grads).map(values);
                (
                    values(out.inner()),
                    values(x.grad(&grads).expect("x tracked")),
                    values(adapter.lora_a.val().grad(&grads).expect("A tracked")),
                    values(adapter.lora_b.val().grad(&grads).expect("B tracked")),
                    weight_grad,
                )
            };
            let (out, dx, da, db, dw) = run(true);
            let (ref_out, ref_dx, ref_da, ref_db, ref_dw) = run(false);
            assert_close(out.clone(), ref_out, "output");
            assert_close(dx, ref_dx, "x gradient");
            assert_close(da, ref_da, "A gradient");
            assert_close(db, ref_db, "B gradient");
            assert_eq!(dw.is_some(), !frozen_base, "W gradient only when W trains");
            if let (Some(dw), Some(ref_dw)) = (dw, ref_dw) {
                assert_close(dw, ref_dw, "W gradient");
            }

            let plain_layer = layer.valid();
            assert_eq!(values(plain_layer.forward(x0.clone())), out);
        }
    }

    /// A plain product through transposed views (the tied LM head's `embeddingᵀ`), with the
    /// weight trained: output and both gradients equal Burn's.
    #[test]
    fn product_through_views_matches_burn() {
        let plain = Device::flex();
        let device = plain.clone().autodiff();
        plain.seed(37);
        let x0 = Tensor::<3>::random([2, 9, 16], Distribution::Normal(0.0, 1.0), &plain);
        let table = Tensor::<2>::random([30, 16], Distribution::Normal(0.0, 1.0), &plain);
        let run = |fused: bool| {
            let x = Tensor::<3>::from_data(x0.to_data(), &device).require_grad();
            let w = Tensor::<2>::from_data(table.to_data(), &device).require_grad();
            let out = if fused {
                flat_linear(x.clone(), w.clone().transpose(), None)
            } else {
                linear(x.clone(), w.clone().transpose(), None)
            };
            let grads = (out.clone() * out.clone()).sum().backward();
            (
                values(out.inner()),
                values(x.grad(&grads).expect("x tracked")),
                values(w.grad(&grads).expect("w tracked")),
            )
        };
        let (out, dx, dw) = run(true);
        let (ref_out, ref_dx, ref_dw) = run(false);
        assert_close(out, ref_out, "output");
        assert_close(dx, ref_dx, "x gradient");
        assert_close(dw, ref_dw, "weight gradient");
    }
}
