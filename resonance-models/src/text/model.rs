//! Decoder-only causal language model shared by Llama, Mistral and Qwen2: RMSNorm, rotary
//! embeddings, grouped-query attention and a gated MLP. Field names follow the transformers
//! modules so checkpoint keys map one to one.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, RmsNorm, RmsNormConfig};
use burn::tensor::activation;
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};

use super::config::{Activation, TextConfig};
use crate::nn::attention::{repeat_kv, scaled_attention, KvCache, MaskSpec, PackedLayout};
use crate::nn::linear::{flat_linear, join, Linear, LinearLayers};
use crate::nn::precision::to_dtype;
use crate::nn::rms_norm::rms_norm;
use crate::nn::rope::{apply_rotary, RopeScaling};
use crate::nn::silu_gate::silu_gate;

/// Applies a configured activation.
pub fn activate<const D: usize>(x: Tensor<D>, act: Activation) -> Tensor<D> {
    match act {
        Activation::Silu => activation::silu(x),
        Activation::Gelu => activation::gelu(x),
        Activation::GeluTanh => activation::gelu_approximate(x),
        Activation::QuickGelu => x.clone() * activation::sigmoid(x * 1.702),
        Activation::Relu => activation::relu(x),
    }
}

/// Self-attention of one decoder layer.
#[derive(Module, Debug)]
pub struct DecoderAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

/// The gated feed-forward block `down(act(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct GatedMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    #[module(skip)]
    pub activation: Activation,
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: DecoderAttention,
    pub mlp: GatedMlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    /// Sliding attention window of this layer, if any.
    #[module(skip)]
    pub window: Option<usize>,
}

impl DecoderLayer {
    /// The layer's second half: `x + mlp(norm(x))` for the attention block's output `x`.
    fn feed_forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self
            .mlp
            .forward(rms_norm(&self.post_attention_layernorm, x.clone()));
        x + h
    }
}

/// Token embeddings, decoder layers and final norm (`model.*` in checkpoints).
#[derive(Module, Debug)]
pub struct DecoderModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

/// A decoder with its language-model head (`lm_head`, absent when tied to the embeddings) and,
/// for a reward model, a scalar value head (`score`, as transformers'
/// `*ForSequenceClassification` with one label).
#[derive(Module, Debug)]
pub struct CausalLm {
    pub model: DecoderModel,
    pub lm_head: Option<Linear>,
    /// `hidden → 1`, no bias; present on reward models only.
    pub score: Option<Linear>,
    #[module(skip)]
    pub rope: RopeScaling,
    /// The dtype activations are computed in (see [`crate::nn::precision`]); f32 unless the
    /// model was put in half precision.
    #[module(skip)]
    pub compute_dtype: FloatDType,
}

fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    Linear::new(d_in, d_out, bias, device)
}

/// `x[r, positions[r][j]]` as `[b, k, hidden]` (`k` the longest list; shorter rows are filled
/// with their position 0).
pub fn select_rows(x: Tensor<3>, positions: &[Vec<usize>]) -> Tensor<3> {
    let [b, t, h] = x.dims();
    let positions = padded_positions(positions, b);
    let k = positions[0].len();
    let index: Vec<i64> = positions
        .iter()
        .enumerate()
        .flat_map(|(r, row)| row.iter().map(move |&j| (r * t + j) as i64))
        .collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [b * k]), &x.device());
    x.reshape([b * t, h]).select(0, index).reshape([b, k, h])
}

/// `positions` for `rows` rows, each padded with position 0 to the longest list (at least 1).
fn padded_positions(positions: &[Vec<usize>], rows: usize) -> Vec<Vec<usize>> {
    let k = positions.iter().map(Vec::len).max().unwrap_or(0).max(1);
    (0..rows)
        .map(|r| {
            let mut row = positions.get(r).cloned().unwrap_or_default();
            row.resize(k, 0);
            row
        })
        .collect()
}

impl DecoderAttention {
    fn new(config: &TextConfig, device: &Device) -> Self {
        let h = config.hidden_size;
        let q_dim = config.num_heads * config.head_dim;
        let kv_dim = config.num_kv_heads * config.head_dim;
        DecoderAttention {
            q_proj: linear(h, q_dim, config.qkv_bias, device),
            k_proj: linear(h, kv_dim, config.qkv_bias, device),
            v_proj: linear(h, kv_dim, config.qkv_bias, device),
            o_proj: linear(q_dim, h, config.o_bias, device),
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        }
    }

    fn heads(&self, x: Tensor<3>, n: usize) -> Tensor<4> {
        let [b, t, _] = x.dims();
        x.reshape([b, t, n, self.head_dim]).swap_dims(1, 2)
    }

    /// `x`: `[b, t, hidden]`; returns `[b, t, hidden]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &(Tensor<3>, Tensor<3>),
        mask: Option<burn::tensor::Tensor<4, burn::tensor::Bool>>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        let q = self.heads(self.q_proj.forward(x.clone()), self.num_heads);
        let q = apply_rotary(q, &rope.0, &rope.1);
        self.attend(q, x, rope, mask, cache)
    }

    /// Attention of the queries `x_queries` `[b, q, hidden]` (rotated by `rope_queries`) over
    /// the keys and values of `x` `[b, t, hidden]`: the last decoder layer when only some
    /// positions' outputs are wanted. Returns `[b, q, hidden]`.
    pub fn forward_queries(
        &self,
        x_queries: Tensor<3>,
        rope_queries: &(Tensor<3>, Tensor<3>),
        x: Tensor<3>,
        rope: &(Tensor<3>, Tensor<3>),
        mask: Option<burn::tensor::Tensor<4, burn::tensor::Bool>>,
    ) -> Tensor<3> {
        let q = self.heads(self.q_proj.forward(x_queries), self.num_heads);
        let q = apply_rotary(q, &rope_queries.0, &rope_queries.1);
        self.attend(q, x, rope, mask, None)
    }

    /// Rotated queries `[b, heads, q, head_dim]` attending over the keys and values of `x`.
    fn attend(
        &self,
        q: Tensor<4>,
        x: Tensor<3>,
        rope: &(Tensor<3>, Tensor<3>),
        mask: Option<burn::tensor::Tensor<4, burn::tensor::Bool>>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        let [b, _, queries, _] = q.dims();
        let k = self.heads(self.k_proj.forward(x.clone()), self.num_kv_heads);
        let v = self.heads(self.v_proj.forward(x), self.num_kv_heads);
        let k = apply_rotary(k, &rope.0, &rope.1);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let n_rep = self.num_heads / self.num_kv_heads;
        let out = scaled_attention(
            q,
            repeat_kv(k, n_rep),
            repeat_kv(v, n_rep),
            mask,
            1.0 / (self.head_dim as f64).sqrt(),
        );
        let out = out
            .swap_dims(1, 2)
            .reshape([b, queries, self.num_heads * self.head_dim]);
        self.o_proj.forward(out)
    }
}

impl GatedMlp {
    fn new(config: &TextConfig, device: &Device) -> Self {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        GatedMlp {
            gate_proj: linear(h, i, config.mlp_bias, device),
            up_proj: linear(h, i, config.mlp_bias, device),
            down_proj: linear(i, h, config.mlp_bias, device),
            activation: config.activation,
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = self.gate_proj.forward(x.clone());
        let up = self.up_proj.forward(x);
        let hidden = match self.activation {
            Activation::Silu => silu_gate(gate, up),
            act => activate(gate, act) * up,
        };
        self.down_proj.forward(hidden)
    }
}

/// Inputs of one decoder forward pass besides the embeddings.
pub struct DecoderInputs<'a> {
    /// `attention_mask[b][t]` for the new tokens: `true` for real tokens.
    pub attention_mask: &'a [Vec<bool>],
    /// Absolute positions of the new tokens, `None` for `past_len..past_len + t` (what
    /// transformers uses when `position_ids` is not given).
    pub positions: Option<&'a [Vec<usize>]>,
    /// Segments of packed rows (see [`crate::packing`]), with `positions` given and no cache:
    /// a token attends to its own segment and to segment 0, the prefix the segments share.
    pub segments: Option<&'a [Vec<u32>]>,
    /// Token indices per row (no cache) whose final hidden states are wanted, `None` for every
    /// token; the states come back as `[b, k, hidden]` in [`select_rows`]'s layout (`k` the
    /// longest list). A causal decoder's last layer then runs its queries, attention output and
    /// MLP at those positions only: a loss over answer tokens reads a fraction of a sequence
    /// that also holds an image and a prompt.
    pub outputs: Option<&'a [Vec<usize>]>,
}

impl CausalLm {
    /// Builds a model with freshly initialised (lazy) parameters for `config`.
    pub fn new(config: &TextConfig, device: &Device) -> Self {
        let norm = || {
            RmsNormConfig::new(config.hidden_size)
                .with_epsilon(config.rms_norm_eps)
                .init(device)
        };
        let layers = config
            .layer_windows
            .iter()
            .map(|window| DecoderLayer {
                self_attn: DecoderAttention::new(config, device),
                mlp: GatedMlp::new(config, device),
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
                window: *window,
            })
            .collect();
        CausalLm {
            model: DecoderModel {
                embed_tokens: EmbeddingConfig::new(config.vocab_size, config.hidden_size)
                    .init(device),
                layers,
                norm: norm(),
            },
            lm_head: (!config.tie_word_embeddings)
                .then(|| linear(config.hidden_size, config.vocab_size, false, device)),
            score: None,
            rope: config.rope.clone(),
            compute_dtype: FloatDType::F32,
        }
    }

    /// Gives the model a fresh value head, `N(0, std²)` as transformers initialises a new
    /// `score` layer (`std` = the config's `initializer_range`).
    pub fn attach_value_head(&mut self, std: f64, device: &Device) {
        let hidden = self.model.norm.gamma.dims()[0];
        let weight = Tensor::<2>::random(
            [hidden, 1],
            burn::tensor::Distribution::Normal(0.0, std),
            device,
        );
        self.score = Some(Linear {
            weight: burn::module::Param::from_tensor(weight),
            bias: None,
            lora: None,
        });
    }

    /// Per-token values `[b, t]` of final hidden states, or `None` without a value head.
    pub fn values(&self, hidden: Tensor<3>) -> Option<Tensor<2>> {
        let [b, t, _] = hidden.dims();
        self.score
            .as_ref()
            .map(|head| to_dtype(head.forward(hidden).reshape([b, t]), DType::F32))
    }

    /// Embeds token ids `[b, t]` → `[b, t, hidden]`.
    pub fn embed(&self, ids: &[Vec<u32>], device: &Device) -> Tensor<3> {
        let b = ids.len();
        let t = ids.first().map(Vec::len).unwrap_or(0);
        let flat: Vec<i64> = ids.iter().flatten().map(|&id| id as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, t]), device);
        to_dtype(
            self.model.embed_tokens.forward(ids),
            self.compute_dtype.into(),
        )
    }

    /// Runs the decoder on embeddings and returns the final hidden states `[b, t, hidden]`.
    /// With a cache, the new keys/values are appended and attention spans the cached tokens.
    pub fn hidden_states(
        &self,
        embeds: Tensor<3>,
        inputs: &DecoderInputs,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let device = embeds.device();
        let [b, t, _] = embeds.dims();
        let past_len = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let positions: Vec<Vec<usize>> = match (inputs.positions, cache.as_ref()) {
            (Some(p), _) => p.to_vec(),
            (None, Some(c)) if !c.next_position.is_empty() => c
                .next_position
                .iter()
                .map(|&start| (start..start + t).collect())
                .collect(),
            _ => (0..b).map(|_| (past_len..past_len + t).collect()).collect(),
        };
        let key_valid: Vec<Vec<bool>> = match cache.as_deref_mut() {
            Some(c) => {
                if c.key_valid.is_empty() {
                    c.key_valid = vec![Vec::new(); b];
                }
                for (row, new) in c.key_valid.iter_mut().zip(inputs.attention_mask) {
                    row.extend_from_slice(new);
                }
                c.next_position = positions
                    .iter()
                    .map(|p| p.last().map_or(0, |l| l + 1))
                    .collect();
                c.key_valid.clone()
            }
            None => inputs.attention_mask.to_vec(),
        };
        let spec = match inputs.segments {
            Some(segments) => {
                assert!(
                    cache.is_none() && inputs.positions.is_some(),
                    "packed rows take explicit positions and no cache"
                );
                let layout = PackedLayout {
                    positions: positions.clone(),
                    segments: segments.to_vec(),
                };
                MaskSpec::packed(key_valid, layout)
            }
            None => MaskSpec::causal(key_valid, past_len, t),
        };
        let heads = self
            .model
            .layers
            .first()
            .map(|l| l.self_attn.num_heads)
            .unwrap_or(1);
        // With wanted outputs the last layer takes mask rows of its own (built below).
        let full_layers = match inputs.outputs {
            Some(_) => {
                assert!(cache.is_none(), "selected outputs take no cache");
                self.model.layers.len().saturating_sub(1)
            }
            None => self.model.layers.len(),
        };
        // One mask per distinct window, built once for all layers that share it.
        let mut masks: Vec<(Option<usize>, Option<Tensor<4, burn::tensor::Bool>>)> = Vec::new();
        for layer in &self.model.layers[..full_layers] {
            if !masks.iter().any(|(w, _)| *w == layer.window) {
                masks.push((layer.window, spec.build(heads, layer.window, &device)));
            }
        }
        let rope = self.rope.tables(&positions, &device);

        let mut x = embeds;
        for (i, layer) in self.model.layers[..full_layers].iter().enumerate() {
            let mask = masks
                .iter()
                .find(|(w, _)| *w == layer.window)
                .and_then(|(_, m)| m.clone());
            let residual = x.clone();
            let h = rms_norm(&layer.input_layernorm, x);
            let h = layer
                .self_attn
                .forward(h, &rope, mask, cache.as_deref_mut().map(|c| (c, i)));
            x = layer.feed_forward(residual + h);
        }
        if let Some(outputs) = inputs.outputs {
            let outputs = &padded_positions(outputs, b);
            let picked = |x: Tensor<3>| select_rows(x, outputs);
            x = match self.model.layers.last() {
                Some(layer) => {
                    let mask = spec.build_queries(heads, layer.window, outputs, &device);
                    let query_positions: Vec<Vec<usize>> = outputs
                        .iter()
                        .zip(&positions)
                        .map(|(row, p)| row.iter().map(|&j| p[j]).collect())
                        .collect();
                    let rope_queries = self.rope.tables(&query_positions, &device);
                    let h = rms_norm(&layer.input_layernorm, x.clone());
                    let h = layer.self_attn.forward_queries(
                        picked(h.clone()),
                        &rope_queries,
                        h,
                        &rope,
                        mask,
                    );
                    layer.feed_forward(picked(x) + h)
                }
                None => picked(x),
            };
        }
        rms_norm(&self.model.norm, x)
    }

    /// Projects hidden states to vocabulary logits, returned in f32 whatever the compute dtype
    /// (losses and log-probabilities are taken in f32).
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let weight = self.model.embed_tokens.weight.val();
                flat_linear(hidden, weight.transpose(), None)
            }
        };
        to_dtype(logits, DType::F32)
    }

    /// Logits `[b, k, vocab]` of the hidden states at `positions[r]` of each row `r` only
    /// (`k` the longest list; shorter rows are filled with their position 0), in f32. A loss
    /// reads a fraction of a sequence's positions (the answer tokens), and with a vocabulary of
    /// 32–150K the head and the log-softmax over every position would be a large share of the
    /// work and the memory of a step.
    pub fn logits_at(&self, hidden: Tensor<3>, positions: &[Vec<usize>]) -> Tensor<3> {
        self.logits(select_rows(hidden, positions))
    }

    /// Logits `[b, t, vocab]` from input embeddings at the default positions (after the cached
    /// tokens, if any).
    pub fn forward_embeds(
        &self,
        embeds: Tensor<3>,
        attention_mask: &[Vec<bool>],
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let inputs = DecoderInputs {
            attention_mask,
            positions: None,
            segments: None,
            outputs: None,
        };
        self.logits(self.hidden_states(embeds, &inputs, cache))
    }

    /// Full forward from token ids to logits `[b, t, vocab]`.
    pub fn forward_ids(
        &self,
        ids: &[Vec<u32>],
        attention_mask: &[Vec<bool>],
        device: &Device,
    ) -> Tensor<3> {
        self.forward_embeds(self.embed(ids, device), attention_mask, None)
    }

    /// Number of decoder layers (the size a [`KvCache`] needs).
    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }
}

impl LinearLayers for CausalLm {
    fn visit_linears(&mut self, prefix: &str, visit: &mut dyn FnMut(&str, &mut Linear)) {
        let layers = join(&join(prefix, "model"), "layers");
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let at = join(&layers, &i.to_string());
            let attn = join(&at, "self_attn");
            visit(&join(&attn, "q_proj"), &mut layer.self_attn.q_proj);
            visit(&join(&attn, "k_proj"), &mut layer.self_attn.k_proj);
            visit(&join(&attn, "v_proj"), &mut layer.self_attn.v_proj);
            visit(&join(&attn, "o_proj"), &mut layer.self_attn.o_proj);
            let mlp = join(&at, "mlp");
            visit(&join(&mlp, "gate_proj"), &mut layer.mlp.gate_proj);
            visit(&join(&mlp, "up_proj"), &mut layer.mlp.up_proj);
            visit(&join(&mlp, "down_proj"), &mut layer.mlp.down_proj);
        }
        if let Some(head) = self.lm_head.as_mut() {
            visit(&join(prefix, "lm_head"), head);
        }
    }
}
