//! The trainer's AdamW: Burn's `AdamW` arithmetic and state, with the update of a CPU (flex) f32
//! parameter taken by one fused pass (`resonance_models::nn::adamw`) instead of Burn's fourteen
//! element-wise tensor operations. Other backends, dtypes and AMSGrad states take Burn's own
//! step; both give bit-identical results, and the optimizer state is Burn's `AdamWState`, so
//! checkpoints written before or by either path load into the other.

use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, Optimizer};
use burn::tensor::{Device, Tensor};
use resonance_models::nn::adamw::{adamw_step, fused_adamw_applies, AdamWCoefficients};

/// AdamW without AMSGrad and without cautious weight decay (what the trainer configures).
#[derive(Clone)]
pub struct FusedAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    composed: AdamW,
}

impl FusedAdamW {
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        let composed = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build();
        FusedAdamW {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            composed,
        }
    }

    /// The same optimizer with another weight decay (a parameter group's).
    pub fn with_weight_decay(&self, weight_decay: f32) -> Self {
        FusedAdamW::new(self.beta_1, self.beta_2, self.epsilon, weight_decay)
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let amsgrad = state
            .as_ref()
            .is_some_and(|s| s.momentum.max_moment_2.is_some());
        let moments = state
            .as_ref()
            .map(|s| (&s.momentum.moment_1, &s.momentum.moment_2));
        if amsgrad || !fused_adamw_applies(&tensor, &grad, moments) {
            return self.composed.step(lr, tensor, grad, state);
        }
        let time = state.as_ref().map_or(1, |s| s.momentum.time + 1);
        // Burn's AdamW takes the same values: f32 bias corrections from an i32 power, the f64
        // learning rate and decay factor rounded to f32 by its scalar operations.
        let power = time as i32;
        let decay_rate = lr * self.weight_decay as f64;
        let coefficients = AdamWCoefficients {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            bias_correction_1: 1.0 - self.beta_1.powi(power),
            bias_correction_2: 1.0 - self.beta_2.powi(power),
            lr: lr as f32,
            keep: (decay_rate != 0.0).then_some((1.0 - decay_rate) as f32),
        };
        let moments = state.map(|s| (s.momentum.moment_1, s.momentum.moment_2));
        let (tensor, moment_1, moment_2) = adamw_step(tensor, grad, moments, coefficients);
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (tensor, Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn bits<const D: usize>(t: &Tensor<D>) -> Vec<u32> {
        let values = t.clone().into_data().try_to_vec::<f32>().expect("f32");
        values.iter().map(|x| x.to_bits()).collect()
    }

    /// Four steps of both optimizers on the same parameter: the parameter and both moments
    /// agree to the bit, with and without decay. The gradient is a transposed view, which the
    /// fused path takes too (it reads it contiguously).
    #[test]
    fn fused_and_burn_adamw_agree_to_the_bit() {
        let device = Device::flex();
        for weight_decay in [0.0f32, 0.1] {
            let fused = FusedAdamW::new(0.9, 0.999, 1e-8, weight_decay);
            let burn = AdamWConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(weight_decay)
                .build();
            let init = Tensor::<2>::random([300, 70], Distribution::Normal(0.0, 0.02), &device);
            let (mut p_fused, mut p_burn) = (init.clone(), init.clone());
            let (mut s_fused, mut s_burn) = (None, None);
            for step in 0..4 {
                let lr = 1e-3 / (step + 1) as f64;
                let g = Tensor::<2>::random([70, 300], Distribution::Normal(0.0, 1e-2), &device)
                    .transpose();
                let moments = s_fused
                    .as_ref()
                    .map(|s: &AdamWState<2>| (&s.momentum.moment_1, &s.momentum.moment_2));
                assert!(fused_adamw_applies(&p_fused, &g, moments));
                (p_fused, s_fused) = fused.step(lr, p_fused, g.clone(), s_fused);
                (p_burn, s_burn) = burn.step(lr, p_burn, g, s_burn);
                let (a, b) = (
                    s_fused.as_ref().expect("state"),
                    s_burn.as_ref().expect("state"),
                );
                assert_eq!(a.momentum.time, b.momentum.time);
                assert_eq!(
                    bits(&p_fused),
                    bits(&p_burn),
                    "decay {weight_decay} step {step}"
                );
                assert_eq!(bits(&a.momentum.moment_1), bits(&b.momentum.moment_1));
                assert_eq!(bits(&a.momentum.moment_2), bits(&b.momentum.moment_2));
            }
            let moved = (p_fused - init).abs().max().into_scalar::<f32>();
            assert!(moved > 1e-4, "the parameter moved by {moved}");
        }
    }
}
