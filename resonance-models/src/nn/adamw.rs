//! One AdamW update of a parameter as a single pass over its elements.
//!
//! Burn's `AdamW` composes the update from about fourteen element-wise tensor operations, and
//! flex runs each of them as its own single-threaded pass over the parameter-sized tensors. On
//! the CPU backend this kernel reads the parameter, its gradient and the two moments once, on
//! every core, and writes the new parameter and moments in place where it holds them alone.
//!
//! The arithmetic is Burn's, operation for operation in the same order and in f32, so a run
//! gives bit-identical parameters and moments whichever path took a step (the trainer's
//! `FusedAdamW` falls back to Burn's `AdamW` on other backends, dtypes and layouts):
//!
//! ```text
//! m ← m·β₁ + g·(1−β₁)                (first step: m ← g·(1−β₁))
//! v ← v·β₂ + (g·g)·(1−β₂)            (first step: v ← (g·g)·(1−β₂))
//! u ← (m / c₁) / (sqrt(v / c₂) + ε)  c₁ = 1−β₁ᵗ, c₂ = 1−β₂ᵗ
//! p ← p·keep − u·lr                  keep = 1 − lr·λ (p itself when λ·lr = 0)
//! ```

use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch, Flex};
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::nn::simd::wide;

/// The scalars of one AdamW step, as f32 like Burn's element-wise operations use them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWCoefficients {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// `1 − β₁ᵗ` of the step's time `t` (1 on the first step).
    pub bias_correction_1: f32,
    /// `1 − β₂ᵗ`.
    pub bias_correction_2: f32,
    pub lr: f32,
    /// The factor the parameter is multiplied by before the update (`1 − lr·λ`); `None` when
    /// there is no decay, so the parameter is used as it is.
    pub keep: Option<f32>,
}

/// Whether [`adamw_step`] takes these tensors: flex, f32, all of the parameter's shape. Where it
/// does not, the caller takes Burn's composed step.
pub fn fused_adamw_applies<const D: usize>(
    param: &Tensor<D>,
    grad: &Tensor<D>,
    moments: Option<(&Tensor<D>, &Tensor<D>)>,
) -> bool {
    let takes = |t: &Tensor<D>| t.dtype() == DType::F32 && t.shape() == param.shape();
    param.device().inner() == Device::flex()
        && takes(param)
        && takes(grad)
        && moments.is_none_or(|(m, v)| takes(m) && takes(v))
}

/// The updated `(parameter, first moment, second moment)`; `moments` is `None` on a parameter's
/// first step. Only for tensors [`fused_adamw_applies`] accepts.
pub fn adamw_step<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<(Tensor<D>, Tensor<D>)>,
    c: AdamWCoefficients,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    debug_assert!(fused_adamw_applies(
        &param,
        &grad,
        moments.as_ref().map(|(m, v)| (m, v))
    ));
    // Before the first step the moments are zero; `first` keeps Burn's first-step formula.
    let first = moments.is_none();
    let (m, v) = moments.unwrap_or_else(|| (param.zeros_like(), param.zeros_like()));
    let (p, m, v) = Dispatch::adamw_step(
        param.into_dispatch(),
        grad.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        first,
        c,
    );
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// The fused AdamW update (see the module documentation).
#[backend_extension(Flex)]
pub trait AdamWStep: Backend {
    /// Every tensor is f32 and of the same shape ([`adamw_step`] checks it); `first`: the
    /// moments are zero and the first step's formula applies.
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        first: bool,
        c: AdamWCoefficients,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl AdamWStep for Flex {
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        first: bool,
        c: AdamWCoefficients,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        fused_step(param, grad, moment_1, moment_2, first, c)
    }
}

/// Elements per task: large enough that scheduling is negligible, small enough that both
/// cores share the tail of a small parameter.
const CHUNK: usize = 1 << 14;

fn fused_step(
    param: FlexTensor,
    grad: FlexTensor,
    moment_1: FlexTensor,
    moment_2: FlexTensor,
    first: bool,
    c: AdamWCoefficients,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let grad = grad.to_contiguous();
    let g = grad
        .as_slice::<f32>()
        .expect("adamw_step passes f32 tensors only");
    let n = g.len();
    let (mut p, mut m, mut v) = (writable(param), writable(moment_1), writable(moment_2));
    // Each buffer is uniquely held and exactly its elements (`writable`).
    let (ps, ms, vs) = (
        p.storage_mut::<f32>(),
        m.storage_mut::<f32>(),
        v.storage_mut::<f32>(),
    );
    debug_assert!(ps.len() == n && ms.len() == n && vs.len() == n);
    let update: ChunkUpdate = match (first, c.keep.is_some()) {
        (true, true) => update_chunk::<true, true>,
        (true, false) => update_chunk::<true, false>,
        (false, true) => update_chunk::<false, true>,
        (false, false) => update_chunk::<false, false>,
    };
    ps.par_chunks_mut(CHUNK)
        .zip(ms.par_chunks_mut(CHUNK))
        .zip(vs.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| update(p, m, v, g, &c));
    (p, m, v)
}

/// `update_chunk` with its flags chosen: `(parameter, m, v, gradient, coefficients)`.
type ChunkUpdate = fn(&mut [f32], &mut [f32], &mut [f32], &[f32], &AdamWCoefficients);

/// The update of one chunk. The branches are constants and the slices are walked by iterators,
/// so the loop vectorises (the SIMD square root and division round exactly like the scalar ones).
fn update_chunk<const FIRST: bool, const DECAY: bool>(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    c: &AdamWCoefficients,
) {
    let (factor_1, factor_2) = (1.0 - c.beta_1, 1.0 - c.beta_2);
    let keep = c.keep.unwrap_or(1.0);
    wide!({
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            if FIRST {
                *m = g * factor_1;
                *v = (g * g) * factor_2;
            } else {
                *m = *m * c.beta_1 + g * factor_1;
                *v = *v * c.beta_2 + (g * g) * factor_2;
            }
            let update =
                (*m / c.bias_correction_1) / ((*v / c.bias_correction_2).sqrt() + c.epsilon);
            let base = if DECAY { *p * keep } else { *p };
            *p = base - update * c.lr;
        }
    })
}

/// The tensor itself when it alone owns exactly its contiguous elements (written in place),
/// otherwise a fresh contiguous copy (a clone elsewhere keeps reading the old values).
fn writable(t: FlexTensor) -> FlexTensor {
    let whole_buffer = t.layout().contiguous_offsets().is_some_and(|(start, end)| {
        start == 0 && end * std::mem::size_of::<f32>() == t.bytes().len()
    });
    if t.is_unique() && whole_buffer {
        return t;
    }
    let contiguous = t.to_contiguous();
    let elements = contiguous
        .as_slice::<f32>()
        .expect("adamw_step passes f32 tensors only")
        .to_vec();
    FlexTensor::from_data(TensorData::new(elements, t.layout().shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Burn's `AdamW` arithmetic written out with tensor operations (the reference the kernel
    /// must equal to the bit).
    fn composed(
        p: Tensor<1>,
        g: Tensor<1>,
        moments: Option<(Tensor<1>, Tensor<1>)>,
        c: AdamWCoefficients,
    ) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
        let (f1, f2) = (1.0 - c.beta_1, 1.0 - c.beta_2);
        let (m, v) = match moments {
            Some((m, v)) => (
                m.mul_scalar(c.beta_1).add(g.clone().mul_scalar(f1)),
                v.mul_scalar(c.beta_2).add(g.square().mul_scalar(f2)),
            ),
            None => (g.clone().mul_scalar(f1), g.square().mul_scalar(f2)),
        };
        let update = m.clone().div_scalar(c.bias_correction_1).div(
            v.clone()
                .div_scalar(c.bias_correction_2)
                .sqrt()
                .add_scalar(c.epsilon),
        );
        let base = match c.keep {
            Some(keep) => p.mul_scalar(keep),
            None => p,
        };
        (base - update.mul_scalar(c.lr), m, v)
    }

    fn bits(t: Tensor<1>) -> Vec<u32> {
        t.into_data()
            .try_to_vec::<f32>()
            .expect("f32")
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn the_fused_step_equals_the_composed_one_to_the_bit() {
        let device = Device::flex();
        // Not a multiple of the chunk: the last task is partial.
        let n = 3 * CHUNK + 77;
        let random = |std: f64| Tensor::<1>::random([n], Distribution::Normal(0.0, std), &device);
        let mut p = random(0.02);
        let mut moments: Option<(Tensor<1>, Tensor<1>)> = None;
        let (mut p_ref, mut moments_ref) = (p.clone(), None);
        for (t, keep) in [(1, Some(1.0 - 1e-3 * 0.01)), (2, None), (3, Some(0.999_99))] {
            let g = random(1e-3);
            let c = AdamWCoefficients {
                beta_1: 0.9,
                beta_2: 0.999,
                epsilon: 1e-8,
                bias_correction_1: 1.0 - 0.9f32.powi(t),
                bias_correction_2: 1.0 - 0.999f32.powi(t),
                lr: 1e-3,
                keep,
            };
            let refs = moments.as_ref().map(|(m, v)| (m, v));
            assert!(fused_adamw_applies(&p, &g, refs));
            let (p_new, m, v) = adamw_step(p, g.clone(), moments, c);
            let (p_ref_new, m_ref, v_ref) = composed(p_ref, g, moments_ref, c);
            assert_eq!(bits(p_new.clone()), bits(p_ref_new.clone()), "step {t}: p");
            assert_eq!(bits(m.clone()), bits(m_ref.clone()), "step {t}: m");
            assert_eq!(bits(v.clone()), bits(v_ref.clone()), "step {t}: v");
            (p, moments) = (p_new, Some((m, v)));
            (p_ref, moments_ref) = (p_ref_new, Some((m_ref, v_ref)));
        }
    }

    #[test]
    fn shared_and_strided_inputs_are_left_untouched() {
        let device = Device::flex();
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.1 - 1.0).collect();
        // A transposed view: not contiguous, so the kernel copies it.
        let p =
            Tensor::<2>::from_data(TensorData::new(values.clone(), [4, 6]), &device).transpose();
        let kept = p.clone();
        let g = Tensor::<2>::ones([6, 4], &device).mul_scalar(0.5);
        let c = AdamWCoefficients {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            bias_correction_1: 0.1,
            bias_correction_2: 1.0 - 0.999,
            lr: 0.1,
            keep: None,
        };
        assert!(fused_adamw_applies(&p, &g, None));
        let (p_new, _, _) = adamw_step(p, g, None, c);
        // The first step moves every element by lr (m̂ = g, v̂ = g²).
        let moved = p_new
            .sub(kept.clone())
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32");
        assert!(moved.iter().all(|d| (d + 0.1).abs() < 1e-6), "{moved:?}");
        // The clone held by `kept` still reads the original values.
        let original = kept
            .transpose()
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32");
        assert_eq!(original, values);
        // Another dtype is not the kernel's.
        let half = Tensor::<1>::ones([4], &device).cast(burn::tensor::FloatDType::F16);
        let g = Tensor::<1>::ones([4], &device).cast(burn::tensor::FloatDType::F16);
        assert!(!fused_adamw_applies(&half, &g, None));
    }
}
