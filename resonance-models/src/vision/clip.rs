//! CLIP vision transformer (`CLIPVisionModel`): patch + class + position embeddings, pre-layernorm,
//! bidirectional encoder, and the hidden-state selection VLMs use.

use crate::nn::linear::{join, Linear, LinearLayers};
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::tensor::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

use crate::error::{ModelError, Result};
use crate::nn::attention::scaled_attention;
use crate::nn::precision::to_dtype;
use crate::text::config::Activation;
use crate::text::model::activate;

/// `vision_config` of a CLIP tower as transformers writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_model_type")]
    pub model_type: String,
}

// transformers' CLIPVisionConfig defaults (ViT-B/32).
fn d_hidden() -> usize {
    768
}
fn d_intermediate() -> usize {
    3072
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_model_type() -> String {
    "clip_vision_model".into()
}

impl ClipVisionConfig {
    /// Parses and validates a vision config given as JSON.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let config: ClipVisionConfig =
            serde_json::from_value(value.clone()).map_err(|e| ModelError::InvalidConfig {
                path: path.to_path_buf(),
                field: "vision_config".into(),
                message: e.to_string(),
            })?;
        let invalid = |field: &str, message: String| ModelError::InvalidConfig {
            path: path.to_path_buf(),
            field: format!("vision_config.{field}"),
            message,
        };
        if !matches!(config.model_type.as_str(), "clip_vision_model" | "clip") {
            return Err(invalid(
                "model_type",
                format!(
                    "`{}` is not a CLIP vision tower (supported: clip_vision_model)",
                    config.model_type
                ),
            ));
        }
        if config.patch_size == 0 || !config.image_size.is_multiple_of(config.patch_size) {
            return Err(invalid(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    config.patch_size, config.image_size
                ),
            ));
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(invalid(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    config.num_attention_heads, config.hidden_size
                ),
            ));
        }
        config.activation().map_err(|m| invalid("hidden_act", m))?;
        Ok(config)
    }

    /// The encoder MLP activation.
    pub fn activation(&self) -> std::result::Result<Activation, String> {
        Activation::parse(&self.hidden_act)
            .ok_or_else(|| format!("activation `{}` is not supported", self.hidden_act))
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patch tokens per image (without the class token).
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
}

/// `norm.forward(x)` (`epsilon` is the norm's own: Burn keeps it private), composed from tensor
/// operations in f32 (a half-precision `x` is rounded back, as torch's LayerNorm does). Burn's
/// module would run the CPU backend's fused kernel without autodiff and the composed default
/// under it, which differ in the last bits: a policy that encodes its images under autodiff and
/// a reference that encodes them without would then disagree at step 0, and a zero
/// policy/reference margin would come out as ±1 ulp (which flips DPO's reward accuracy).
fn layer_norm(norm: &LayerNorm, epsilon: f64, x: Tensor<3>) -> Tensor<3> {
    let dtype = x.dtype();
    let x = to_dtype(x, DType::F32);
    let mean = x.clone().mean_dim(2);
    let centered = x - mean;
    let variance = centered.clone().square().mean_dim(2);
    let normed = centered / (variance + epsilon).sqrt();
    let gamma = to_dtype(norm.gamma.val(), DType::F32).unsqueeze::<3>();
    let out = match &norm.beta {
        Some(beta) => normed * gamma + to_dtype(beta.val(), DType::F32).unsqueeze::<3>(),
        None => normed * gamma,
    };
    to_dtype(out, dtype)
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    pub class_embedding: Param<Tensor<1>>,
    pub patch_embedding: Conv2d,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    #[module(skip)]
    pub num_heads: usize,
}

#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    pub activation: Activation,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
    #[module(skip)]
    pub layer_norm_eps: f64,
}

#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

/// `CLIPVisionTransformer` (`vision_model.*` in checkpoints). The misspelt `pre_layrnorm` is the
/// name transformers uses.
#[derive(Module, Debug)]
pub struct ClipVisionTransformer {
    pub embeddings: ClipEmbeddings,
    pub pre_layrnorm: LayerNorm,
    pub encoder: ClipEncoder,
    pub post_layernorm: LayerNorm,
    #[module(skip)]
    pub layer_norm_eps: f64,
}

/// `CLIPVisionModel`.
#[derive(Module, Debug)]
pub struct ClipVisionModel {
    pub vision_model: ClipVisionTransformer,
}

impl ClipAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, c] = x.dims();
        let d = c / self.num_heads;
        let split = |y: Tensor<3>| y.reshape([b, t, self.num_heads, d]).swap_dims(1, 2);
        let q = split(self.q_proj.forward(x.clone()));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let out = scaled_attention(q, k, v, None, 1.0 / (d as f64).sqrt());
        self.out_proj
            .forward(out.swap_dims(1, 2).reshape([b, t, c]))
    }
}

impl ClipEncoderLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(layer_norm(&self.layer_norm1, self.layer_norm_eps, x));
        let m = self.mlp.fc2.forward(activate(
            self.mlp.fc1.forward(layer_norm(
                &self.layer_norm2,
                self.layer_norm_eps,
                h.clone(),
            )),
            self.mlp.activation,
        ));
        h + m
    }
}

impl ClipVisionModel {
    /// A tower with fresh (lazy) parameters for `config`.
    pub fn new(config: &ClipVisionConfig, device: &Device) -> Result<Self> {
        let c = config.hidden_size;
        let activation = config.activation().map_err(ModelError::Input)?;
        let ln = || {
            LayerNormConfig::new(c)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        let lin = |i: usize, o: usize| Linear::new(i, o, true, device);
        let layers = (0..config.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: lin(c, c),
                    k_proj: lin(c, c),
                    v_proj: lin(c, c),
                    out_proj: lin(c, c),
                    num_heads: config.num_attention_heads,
                },
                layer_norm1: ln(),
                mlp: ClipMlp {
                    fc1: lin(c, config.intermediate_size),
                    fc2: lin(config.intermediate_size, c),
                    activation,
                },
                layer_norm2: ln(),
                layer_norm_eps: config.layer_norm_eps,
            })
            .collect();
        Ok(ClipVisionModel {
            vision_model: ClipVisionTransformer {
                embeddings: ClipEmbeddings {
                    class_embedding: Param::from_tensor(Tensor::zeros([c], device)),
                    patch_embedding: Conv2dConfig::new(
                        [config.num_channels, c],
                        [config.patch_size, config.patch_size],
                    )
                    .with_stride([config.patch_size, config.patch_size])
                    .with_bias(false)
                    .init(device),
                    position_embedding: EmbeddingConfig::new(config.num_patches() + 1, c)
                        .init(device),
                },
                pre_layrnorm: ln(),
                encoder: ClipEncoder { layers },
                post_layernorm: ln(),
                layer_norm_eps: config.layer_norm_eps,
            },
        })
    }

    /// Number of encoder layers.
    pub fn num_layers(&self) -> usize {
        self.vision_model.encoder.layers.len()
    }

    /// Embeddings after `pre_layrnorm`: `[n, 1 + patches, hidden]` (hidden state 0).
    pub fn embed(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let e = &self.vision_model.embeddings;
        // The pixels' dtype is the compute dtype; the convolution runs in its weight's dtype
        // (transformers casts the pixels to it).
        let dtype = pixel_values.dtype();
        let pixel_values = to_dtype(pixel_values, e.patch_embedding.weight.val().dtype());
        let patches = to_dtype(e.patch_embedding.forward(pixel_values), dtype); // [n, c, gh, gw]
        let [n, c, gh, gw] = patches.dims();
        let patches = patches.reshape([n, c, gh * gw]).swap_dims(1, 2);
        let class = to_dtype(e.class_embedding.val(), dtype)
            .reshape([1, 1, c])
            .expand([n, 1, c]);
        let tokens = Tensor::cat(vec![class, patches], 1);
        let positions = to_dtype(e.position_embedding.weight.val(), dtype).unsqueeze_dim::<3>(0);
        layer_norm(
            &self.vision_model.pre_layrnorm,
            self.vision_model.layer_norm_eps,
            tokens + positions,
        )
    }

    /// Hidden states `0..=up_to` as transformers' `output_hidden_states` numbers them (0 is the
    /// embedding output, `i` the output of layer `i - 1`); layers past `up_to` are not run.
    pub fn hidden_states(&self, pixel_values: Tensor<4>, up_to: usize) -> Vec<Tensor<3>> {
        VISION_TOWER_CALLS.with(|calls| calls.set(calls.get() + 1));
        let mut states = vec![self.embed(pixel_values)];
        for layer in self.vision_model.encoder.layers.iter().take(up_to) {
            let next = layer.forward(states.last().expect("embedding state").clone());
            states.push(next);
        }
        states
    }
}

thread_local! {
    static VISION_TOWER_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times a CLIP tower has encoded images on the calling thread (tests and the bench
/// count the encodings of a preference batch with it). Per thread so that tests running side
/// by side in one process do not count each other's encodings.
pub fn vision_tower_calls() -> usize {
    VISION_TOWER_CALLS.with(std::cell::Cell::get)
}

/// Work run on other threads on behalf of one (the shards of a batch) counts its encodings
/// from zero with this and hands them to the calling thread with [`add_vision_tower_calls`]:
/// returns the calling thread's count and sets it to `to`.
pub fn replace_vision_tower_calls(to: usize) -> usize {
    VISION_TOWER_CALLS.with(|calls| calls.replace(to))
}

/// Adds `n` encodings to the calling thread's count.
pub fn add_vision_tower_calls(n: usize) {
    VISION_TOWER_CALLS.with(|calls| calls.set(calls.get() + n));
}

impl LinearLayers for ClipVisionModel {
    fn visit_linears(&mut self, prefix: &str, visit: &mut dyn FnMut(&str, &mut Linear)) {
        let layers = join(&join(&join(prefix, "vision_model"), "encoder"), "layers");
        for (i, layer) in self.vision_model.encoder.layers.iter_mut().enumerate() {
            let at = join(&layers, &i.to_string());
            let attn = join(&at, "self_attn");
            visit(&join(&attn, "q_proj"), &mut layer.self_attn.q_proj);
            visit(&join(&attn, "k_proj"), &mut layer.self_attn.k_proj);
            visit(&join(&attn, "v_proj"), &mut layer.self_attn.v_proj);
            visit(&join(&attn, "out_proj"), &mut layer.self_attn.out_proj);
            let mlp = join(&at, "mlp");
            visit(&join(&mlp, "fc1"), &mut layer.mlp.fc1);
            visit(&join(&mlp, "fc2"), &mut layer.mlp.fc2);
        }
    }
}
