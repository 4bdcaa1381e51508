//! Rotary position embeddings with the frequency scalings of transformers' `ROPE_INIT_FUNCTIONS`
//! (`default`, `linear`, `dynamic`, `llama3`, `yarn`).
//!
//! Frequencies are computed on the host in f32 in the same order of operations as transformers so
//! that angles agree to the last bits; only `cos`/`sin` tables go to the device.

use burn::backend::Dispatch;
use burn::tensor::{Device, Tensor, TensorData};

use crate::nn::fused_rope::FusedRope;
use crate::nn::precision::cast_like;
use serde_json::Value;

/// The frequency schedule of one model's rotary embedding.
#[derive(Debug, Clone)]
pub struct RopeScaling {
    /// Base inverse frequencies, `head_dim / 2` values.
    pub inv_freq: Vec<f32>,
    /// Multiplier applied to cos and sin (yarn's attention factor, 1 otherwise).
    pub attention_scaling: f32,
    /// Dynamic NTK scaling recomputes the frequencies once a sequence exceeds the trained length.
    pub dynamic: Option<DynamicNtk>,
    pub head_dim: usize,
}

/// Parameters of dynamic NTK scaling.
#[derive(Debug, Clone)]
pub struct DynamicNtk {
    pub factor: f64,
    pub base: f64,
    pub original_max_position_embeddings: usize,
}

fn default_inv_freq(base: f64, dim: usize) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|i| {
            let exponent = i as f32 / dim as f32;
            1.0f32 / (base as f32).powf(exponent)
        })
        .collect()
}

fn number(params: &Value, key: &str) -> Option<f64> {
    params.get(key).and_then(Value::as_f64)
}

fn required(params: &Value, key: &str, kind: &str) -> Result<f64, String> {
    number(params, key).ok_or_else(|| format!("rope type `{kind}` needs a numeric `{key}`"))
}

impl RopeScaling {
    /// Builds the schedule from a config's `rope_parameters` (transformers ≥ 5) or `rope_scaling`
    /// (older) dictionary, whichever is present.
    pub fn from_config(
        rope_parameters: Option<&Value>,
        rope_scaling: Option<&Value>,
        rope_theta: f64,
        partial_rotary_factor: f64,
        head_dim: usize,
        max_position_embeddings: usize,
    ) -> Result<Self, String> {
        if (partial_rotary_factor - 1.0).abs() > f64::EPSILON {
            return Err(format!(
                "partial_rotary_factor = {partial_rotary_factor} is not supported"
            ));
        }
        let params = rope_parameters
            .filter(|v| v.is_object())
            .or(rope_scaling.filter(|v| v.is_object()));
        let Some(params) = params else {
            return Ok(Self::plain(rope_theta, head_dim));
        };
        let base = number(params, "rope_theta").unwrap_or(rope_theta);
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let dim = head_dim;
        let mut rope = Self::plain(base, head_dim);
        match kind {
            "default" => {}
            "linear" => {
                let factor = required(params, "factor", kind)?;
                for f in rope.inv_freq.iter_mut() {
                    *f /= factor as f32;
                }
            }
            "dynamic" => {
                let factor = required(params, "factor", kind)?;
                let original = number(params, "original_max_position_embeddings")
                    .map(|v| v as usize)
                    .unwrap_or(max_position_embeddings);
                rope.dynamic = Some(DynamicNtk {
                    factor,
                    base,
                    original_max_position_embeddings: original,
                });
            }
            "llama3" => {
                let factor = required(params, "factor", kind)? as f32;
                let low_freq_factor = required(params, "low_freq_factor", kind)? as f32;
                let high_freq_factor = required(params, "high_freq_factor", kind)? as f32;
                let old_context_len =
                    required(params, "original_max_position_embeddings", kind)? as f32;
                let low_freq_wavelen = old_context_len / low_freq_factor;
                let high_freq_wavelen = old_context_len / high_freq_factor;
                for f in rope.inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_freq_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let smooth = (old_context_len / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    *f = if is_medium { smoothed } else { scaled };
                }
            }
            "yarn" => {
                let factor = required(params, "factor", kind)?;
                let original = number(params, "original_max_position_embeddings")
                    .unwrap_or(max_position_embeddings as f64);
                let get_mscale = |scale: f64, mscale: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * mscale * scale.ln() + 1.0
                    }
                };
                let attention_factor = match number(params, "attention_factor") {
                    Some(a) => a,
                    None => match (number(params, "mscale"), number(params, "mscale_all_dim")) {
                        (Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
                            get_mscale(factor, m) / get_mscale(factor, m_all)
                        }
                        _ => get_mscale(factor, 1.0),
                    },
                };
                let beta_fast = number(params, "beta_fast").unwrap_or(32.0);
                let beta_slow = number(params, "beta_slow").unwrap_or(1.0);
                let truncate = params
                    .get("truncate")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                let correction_dim = |rotations: f64| {
                    (dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(dim as f64 - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                for (i, f) in rope.inv_freq.iter_mut().enumerate() {
                    let pos_freq = 1.0 / *f;
                    let extrapolation = 1.0 / pos_freq;
                    let interpolation = 1.0 / (factor as f32 * pos_freq);
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation_factor = 1.0 - ramp;
                    *f = interpolation * (1.0 - extrapolation_factor)
                        + extrapolation * extrapolation_factor;
                }
                rope.attention_scaling = attention_factor as f32;
            }
            other => return Err(format!("rope type `{other}` is not supported")),
        }
        Ok(rope)
    }

    /// Unscaled rotary embedding with base `theta`.
    pub fn plain(theta: f64, head_dim: usize) -> Self {
        RopeScaling {
            inv_freq: default_inv_freq(theta, head_dim),
            attention_scaling: 1.0,
            dynamic: None,
            head_dim,
        }
    }

    /// The inverse frequencies in force for a forward pass whose largest position is
    /// `max_position` (only dynamic NTK depends on it).
    fn inv_freq_for(&self, max_position: usize) -> Vec<f32> {
        match &self.dynamic {
            Some(ntk) if max_position + 1 > ntk.original_max_position_embeddings => {
                let seq_len = (max_position + 1) as f64;
                let original = ntk.original_max_position_embeddings as f64;
                let dim = self.head_dim as f64;
                let base = ntk.base
                    * ((ntk.factor * seq_len / original) - (ntk.factor - 1.0))
                        .powf(dim / (dim - 2.0));
                default_inv_freq(base, self.head_dim)
            }
            _ => self.inv_freq.clone(),
        }
    }

    /// cos and sin tables of shape `[batch, seq, head_dim]` for the given positions
    /// (`positions[b][t]`).
    pub fn tables(&self, positions: &[Vec<usize>], device: &Device) -> (Tensor<3>, Tensor<3>) {
        let batch = positions.len();
        let seq = positions.first().map(Vec::len).unwrap_or(0);
        let max_position = positions
            .iter()
            .flat_map(|row| row.iter().copied())
            .max()
            .unwrap_or(0);
        let inv_freq = self.inv_freq_for(max_position);
        let half = inv_freq.len();
        let dim = half * 2;
        let mut cos = Vec::with_capacity(batch * seq * dim);
        let mut sin = Vec::with_capacity(batch * seq * dim);
        for row in positions {
            for &p in row {
                let angles: Vec<f32> = inv_freq.iter().map(|f| f * p as f32).collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos() * self.attention_scaling));
                    sin.extend(angles.iter().map(|a| a.sin() * self.attention_scaling));
                }
            }
        }
        let shape = [batch, seq, dim];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }
}

/// Rotates `x` (`[batch, heads, seq, head_dim]`) by the angles in `cos`/`sin` (`[batch, seq,
/// head_dim]`), the "rotate half" convention of Llama-family checkpoints.
pub fn apply_rotary(x: Tensor<4>, cos: &Tensor<3>, sin: &Tensor<3>) -> Tensor<4> {
    if x.dtype() != cos.dtype() {
        // Half precision: the tables are computed in f32 and rounded, as transformers does.
        let cos = cast_like(cos.clone(), &x);
        let sin = cast_like(sin.clone(), &x);
        return composed_rotary(x, &cos, &sin);
    }
    if x.device().inner() == Device::flex() {
        // One pass each way on the CPU backend, in the input's own layout (see `fused_rope`).
        let out = Dispatch::fused_rope(
            x.into_dispatch(),
            cos.clone().into_dispatch(),
            sin.clone().into_dispatch(),
        );
        return Tensor::from_dispatch(out);
    }
    composed_rotary(x, cos, sin)
}

/// [`apply_rotary`] written out in tensor operations (other backends; the fused operation's
/// reference in its tests).
pub fn composed_rotary(x: Tensor<4>, cos: &Tensor<3>, sin: &Tensor<3>) -> Tensor<4> {
    let [_, _, _, dim] = x.dims();
    let half = dim / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone().unsqueeze_dim(1) + rotated * sin.clone().unsqueeze_dim(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies_follow_theta() {
        let rope = RopeScaling::plain(10000.0, 8);
        assert_eq!(rope.inv_freq.len(), 4);
        assert!((rope.inv_freq[0] - 1.0).abs() < 1e-7);
        assert!((rope.inv_freq[1] - 0.1).abs() < 1e-7);
    }

    #[test]
    fn linear_scaling_divides_frequencies() {
        let params = serde_json::json!({"rope_type": "linear", "factor": 2.0});
        let rope = RopeScaling::from_config(Some(&params), None, 10000.0, 1.0, 8, 128).unwrap();
        assert!((rope.inv_freq[0] - 0.5).abs() < 1e-7);
    }

    #[test]
    fn unknown_rope_type_is_an_error() {
        let params = serde_json::json!({"rope_type": "mystery", "factor": 2.0});
        let err = RopeScaling::from_config(Some(&params), None, 10000.0, 1.0, 8, 128).unwrap_err();
        assert!(err.contains("mystery"));
    }

    #[test]
    fn llama3_requires_its_fields() {
        let params = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
        let err = RopeScaling::from_config(Some(&params), None, 10000.0, 1.0, 8, 128).unwrap_err();
        assert!(err.contains("low_freq_factor"));
    }
}
