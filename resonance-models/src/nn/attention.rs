//! Attention helpers shared by every family: masks, grouped-query head expansion, KV cache.

use burn::backend::Dispatch;
use burn::tensor::module::attention;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use crate::nn::fused_attention::{extension_attention, options};

/// Which key positions each query may attend to, for a whole batch.
///
/// Built on the host from token validity and absolute positions, so that causal, padding and
/// sliding-window rules are applied exactly as transformers' mask functions do.
#[derive(Debug, Clone)]
pub struct MaskSpec {
    /// `key_valid[b][k]`: key `k` of row `b` is a real token (not padding).
    pub key_valid: Vec<Vec<bool>>,
    /// Index of the first query in the key sequence (number of cached tokens).
    pub past_len: usize,
    /// Number of queries.
    pub query_len: usize,
    /// `false` for bidirectional attention (vision encoders).
    pub causal: bool,
}

impl MaskSpec {
    /// Causal mask over `key_valid` for `query_len` new tokens after `past_len` cached ones.
    pub fn causal(key_valid: Vec<Vec<bool>>, past_len: usize, query_len: usize) -> Self {
        MaskSpec {
            key_valid,
            past_len,
            query_len,
            causal: true,
        }
    }

    /// Boolean mask `[batch, heads, q, k]`, `true` where attention is forbidden. Returns `None`
    /// when nothing would be masked.
    pub fn build(
        &self,
        heads: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Option<Tensor<4, Bool>> {
        let batch = self.key_valid.len();
        let keys = self.key_valid.first().map(Vec::len).unwrap_or(0);
        let mut masked = Vec::with_capacity(batch * self.query_len * keys);
        let mut any = false;
        for row in &self.key_valid {
            for q in 0..self.query_len {
                let q_pos = self.past_len + q;
                for (k, valid) in row.iter().enumerate() {
                    let mut hide = !valid;
                    if self.causal && k > q_pos {
                        hide = true;
                    }
                    if let Some(w) = window {
                        // transformers' sliding window keeps keys with q - k < window.
                        if q_pos >= k + w {
                            hide = true;
                        }
                    }
                    any |= hide;
                    masked.push(hide);
                }
            }
        }
        if !any {
            return None;
        }
        let mask = Tensor::<3, Bool>::from_data(
            TensorData::new(masked, [batch, self.query_len, keys]),
            device,
        );
        Some(
            mask.unsqueeze_dim::<4>(1)
                .expand([batch, heads, self.query_len, keys]),
        )
    }
}

/// Repeats each key/value head `n_rep` times: `[b, kv_heads, t, d]` → `[b, kv_heads * n_rep, t, d]`.
pub fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kv, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, n_rep, t, d])
        .reshape([b, kv * n_rep, t, d])
}

/// Scaled dot-product attention over `[b, h, t, d]` tensors with an optional boolean mask.
pub fn scaled_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    scale: f64,
) -> Tensor<4> {
    if q.device().inner() == Device::flex() {
        // On the CPU backend, the extension's backward pass recomputes the probabilities instead
        // of keeping Burn's composed score-matrix intermediates (see `fused_attention`).
        let out = extension_attention::<Dispatch>(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            mask.map(Tensor::into_dispatch),
            scale,
        );
        return Tensor::from_dispatch(out);
    }
    attention(q, k, v, mask, None, options(scale))
}

/// Keys and values of the tokens seen so far, one entry per decoder layer.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// Validity of every cached key position, per batch row.
    pub key_valid: Vec<Vec<bool>>,
    /// Next absolute position per batch row.
    pub next_position: Vec<usize>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            key_valid: Vec::new(),
            next_position: Vec::new(),
        }
    }

    /// Number of cached key positions.
    pub fn len(&self) -> usize {
        self.key_valid.first().map(Vec::len).unwrap_or(0)
    }

    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends new keys/values of `layer` and returns the full sequences.
    pub fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }
}
