//! Attention helpers shared by every family: masks, grouped-query head expansion, KV cache.

use burn::backend::Dispatch;
use burn::tensor::module::attention;
use burn::tensor::{s, Bool, Device, Tensor, TensorData};

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
    /// Packed rows (no cache): per row and key, the token's absolute position and its segment.
    /// A query sees a key of its own segment or of segment 0 (the shared prefix) whose position
    /// is not after its own; the causal and window rules then compare positions, not indices.
    pub packed: Option<PackedLayout>,
}

/// Positions and segments of packed rows (see [`crate::packing`]).
#[derive(Debug, Clone)]
pub struct PackedLayout {
    pub positions: Vec<Vec<usize>>,
    pub segments: Vec<Vec<u32>>,
}

impl MaskSpec {
    /// Causal mask over `key_valid` for `query_len` new tokens after `past_len` cached ones.
    pub fn causal(key_valid: Vec<Vec<bool>>, past_len: usize, query_len: usize) -> Self {
        MaskSpec {
            key_valid,
            past_len,
            query_len,
            causal: true,
            packed: None,
        }
    }

    /// Causal mask over packed rows: `key_valid`, positions and segments per row, every token
    /// both a query and a key.
    pub fn packed(key_valid: Vec<Vec<bool>>, layout: PackedLayout) -> Self {
        let query_len = key_valid.first().map(Vec::len).unwrap_or(0);
        MaskSpec {
            key_valid,
            past_len: 0,
            query_len,
            causal: true,
            packed: Some(layout),
        }
    }

    /// Whether query `q` of `row` may not see key `k`: the rule [`MaskSpec::build`] fills
    /// rows by (kept as the reference its tests compare with).
    #[cfg(test)]
    fn hidden(&self, row: usize, q: usize, k: usize, window: Option<usize>) -> bool {
        if !self.key_valid[row][k] {
            return true;
        }
        let (q_pos, k_pos) = match &self.packed {
            Some(layout) => {
                let segments = &layout.segments[row];
                if segments[k] != 0 && segments[k] != segments[q] {
                    return true;
                }
                (layout.positions[row][q], layout.positions[row][k])
            }
            None => (self.past_len + q, k),
        };
        if self.causal && k_pos > q_pos {
            return true;
        }
        // transformers' sliding window keeps keys with q - k < window.
        window.is_some_and(|w| q_pos >= k_pos + w)
    }

    /// Boolean mask `[batch, heads, q, k]`, `true` where attention is forbidden. Returns `None`
    /// when nothing would be masked.
    pub fn build(
        &self,
        heads: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Option<Tensor<4, Bool>> {
        let all: Vec<usize> = (0..self.query_len).collect();
        let queries = vec![all; self.key_valid.len()];
        self.build_queries(heads, window, &queries, device)
    }

    /// The rows of [`MaskSpec::build`]'s mask for the queries `queries[b]` of each row `b` only
    /// (indices among this spec's queries, the same count in every row): `[batch, heads,
    /// queries[b].len(), k]`.
    pub fn build_queries(
        &self,
        heads: usize,
        window: Option<usize>,
        queries: &[Vec<usize>],
        device: &Device,
    ) -> Option<Tensor<4, Bool>> {
        let batch = self.key_valid.len();
        let keys = self.key_valid.first().map(Vec::len).unwrap_or(0);
        let query_len = queries.first().map(Vec::len).unwrap_or(0);
        assert!(
            queries.len() == batch && queries.iter().all(|q| q.len() == query_len),
            "one query list per row, all of one length"
        );
        let mut masked = Vec::with_capacity(batch * query_len * keys);
        let mut any = false;
        for (row, row_queries) in queries.iter().enumerate() {
            for &q in row_queries {
                if let Some(layout) = &self.packed {
                    // The rule of `hidden`, with the row's slices taken once per query.
                    let (valid, segments) = (&self.key_valid[row], &layout.segments[row]);
                    let positions = &layout.positions[row];
                    let (segment, position) = (segments[q], positions[q]);
                    let start = masked.len();
                    masked.extend((0..keys).map(|k| {
                        let other_segment = segments[k] != 0 && segments[k] != segment;
                        let outside = (self.causal && positions[k] > position)
                            || window.is_some_and(|w| position >= positions[k] + w);
                        !valid[k] || other_segment || outside
                    }));
                    any |= masked[start..].contains(&true);
                    continue;
                }
                // Unpacked rows see a contiguous key range, less padding: filled by slices (a
                // batch of long sequences has 10⁸ entries).
                let q_pos = self.past_len + q;
                let hi = if self.causal {
                    (q_pos + 1).min(keys)
                } else {
                    keys
                };
                let lo = window.map_or(0, |w| (q_pos + 1).saturating_sub(w)).min(hi);
                let valid = &self.key_valid[row][lo..hi];
                any |= lo > 0 || hi < keys || valid.contains(&false);
                masked.extend(std::iter::repeat_n(true, lo));
                masked.extend(valid.iter().map(|&v| !v));
                masked.extend(std::iter::repeat_n(true, keys - hi));
            }
        }
        if !any {
            return None;
        }
        let mask =
            Tensor::<3, Bool>::from_data(TensorData::new(masked, [batch, query_len, keys]), device);
        Some(
            mask.unsqueeze_dim::<4>(1)
                .expand([batch, heads, query_len, keys]),
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
///
/// Each layer's keys and values live in a buffer with room to spare along the token axis:
/// appending writes the new tokens in place (the cache holds the buffer's only handle between
/// steps) and hands out a view of the filled part, so a decoding step costs the new tokens, not a
/// copy of everything cached. The buffer doubles when full.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Validity of every cached key position, per batch row.
    pub key_valid: Vec<Vec<bool>>,
    /// Next absolute position per batch row.
    pub next_position: Vec<usize>,
}

/// Tokens of room a fresh buffer gets beyond its first entries (a typical generation's worth
/// before the first doubling).
const CACHE_HEADROOM: usize = 64;

/// One layer's buffers, `[batch, kv_heads, capacity, head_dim]`, filled up to `len`.
#[derive(Debug)]
struct LayerCache {
    keys: Tensor<4>,
    values: Tensor<4>,
    len: usize,
}

impl LayerCache {
    fn empty_like(k: &Tensor<4>, v: &Tensor<4>, capacity: usize) -> Self {
        let buffer = |t: &Tensor<4>| {
            let [b, h, _, d] = t.dims();
            Tensor::<4>::zeros([b, h, capacity, d], (&t.device(), t.dtype()))
        };
        LayerCache {
            keys: buffer(k),
            values: buffer(v),
            len: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.keys.dims()[2]
    }

    /// Writes `k`, `v` after the cached tokens, growing the buffers first when needed.
    fn push(self, k: Tensor<4>, v: Tensor<4>) -> Self {
        let needed = self.len + k.dims()[2];
        let mut cache = if needed > self.capacity() {
            let mut grown = LayerCache::empty_like(&k, &v, needed.max(2 * self.capacity()));
            let filled = |t: Tensor<4>| t.narrow(2, 0, self.len);
            grown.keys = grown
                .keys
                .slice_assign(s![.., .., 0..self.len], filled(self.keys));
            grown.values = grown
                .values
                .slice_assign(s![.., .., 0..self.len], filled(self.values));
            grown.len = self.len;
            grown
        } else {
            self
        };
        let range = cache.len..needed;
        cache.keys = cache.keys.slice_assign(s![.., .., range.clone()], k);
        cache.values = cache.values.slice_assign(s![.., .., range], v);
        cache.len = needed;
        cache
    }

    /// The filled part, as views of the buffers.
    fn views(&self) -> (Tensor<4>, Tensor<4>) {
        (
            self.keys.clone().narrow(2, 0, self.len),
            self.values.clone().narrow(2, 0, self.len),
        )
    }
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

    /// Appends new keys/values of `layer` and returns the full sequences (views that should be
    /// dropped before the next append, so that it can write in place).
    pub fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let cache = match self.layers[layer].take() {
            Some(cache) => cache,
            None => LayerCache::empty_like(&k, &v, k.dims()[2] + CACHE_HEADROOM),
        };
        let cache = cache.push(k, v);
        let views = cache.views();
        self.layers[layer] = Some(cache);
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The sliced fill of unpacked rows gives the per-entry rule: causal with cached tokens,
    /// sliding windows, padding on both sides, and bidirectional.
    #[test]
    fn mask_rows_follow_the_per_entry_rule() {
        let device = Device::flex();
        let mut valid = vec![vec![true; 9], vec![true; 9]];
        valid[0][0] = false;
        valid[0][1] = false;
        valid[1][8] = false;
        let valid_unpacked = valid.clone();
        for (past_len, query_len, causal) in
            [(0, 9, true), (4, 5, true), (8, 1, true), (0, 9, false)]
        {
            for window in [None, Some(1), Some(3), Some(20)] {
                let mut spec = MaskSpec::causal(valid.clone(), past_len, query_len);
                spec.causal = causal;
                let expected: Vec<bool> = (0..2)
                    .flat_map(|row| {
                        let spec = &spec;
                        (0..query_len)
                            .flat_map(move |q| (0..9).map(move |k| spec.hidden(row, q, k, window)))
                    })
                    .collect();
                let built = spec.build(1, window, &device);
                let got: Vec<bool> = match built {
                    Some(mask) => mask.into_data().try_to_vec::<bool>().expect("bool data"),
                    None => vec![false; expected.len()],
                };
                assert_eq!(
                    got, expected,
                    "past {past_len}, causal {causal}, window {window:?}"
                );
            }
        }
        // Packed rows: a prefix of 3, copies of 2 and 3 tokens (positions restart after the
        // prefix), one padding key.
        let layout = PackedLayout {
            positions: vec![vec![0, 1, 2, 3, 4, 3, 4, 5, 0]],
            segments: vec![vec![0, 0, 0, 1, 1, 2, 2, 2, 0]],
        };
        let mut valid = vec![vec![true; 9]];
        valid[0][8] = false;
        for window in [None, Some(2)] {
            let spec = MaskSpec::packed(valid.clone(), layout.clone());
            let expected: Vec<bool> = (0..9)
                .flat_map(|q| (0..9).map(move |k| (q, k)))
                .map(|(q, k)| spec.hidden(0, q, k, window))
                .collect();
            let got = spec
                .build(1, window, &device)
                .expect("a packed mask hides keys")
                .into_data()
                .try_to_vec::<bool>()
                .expect("bool data");
            assert_eq!(got, expected, "packed, window {window:?}");
            // A subset of the queries, repeated and out of order, gives those rows.
            let queries = [7, 3, 3, 0, 8];
            let expected: Vec<bool> = queries
                .iter()
                .flat_map(|&q| (0..9).map(move |k| (q, k)))
                .map(|(q, k)| spec.hidden(0, q, k, window))
                .collect();
            let got = spec
                .build_queries(1, window, &[queries.to_vec()], &device)
                .expect("a packed mask hides keys")
                .into_data()
                .try_to_vec::<bool>()
                .expect("bool data");
            assert_eq!(got, expected, "packed queries, window {window:?}");
        }
        // Unpacked rows: each row its own queries.
        let spec = MaskSpec::causal(valid_unpacked.clone(), 0, 9);
        let queries = vec![vec![8, 2, 5], vec![0, 0, 7]];
        for window in [None, Some(3)] {
            let expected: Vec<bool> = (0..2)
                .flat_map(|row| {
                    let (spec, queries) = (&spec, &queries);
                    queries[row]
                        .iter()
                        .flat_map(move |&q| (0..9).map(move |k| spec.hidden(row, q, k, window)))
                })
                .collect();
            let got = spec
                .build_queries(1, window, &queries, &device)
                .expect("a causal mask hides keys")
                .into_data()
                .try_to_vec::<bool>()
                .expect("bool data");
            assert_eq!(got, expected, "unpacked queries, window {window:?}");
        }
    }

    /// Appends across the first buffer's room (a prefill, then single tokens and a chunk) give
    /// what concatenating every step would.
    #[test]
    fn kv_cache_appends_match_concatenation() {
        let device = Device::flex();
        device.seed(29);
        let mut cache = KvCache::new(2);
        let mut expected: Option<(Tensor<4>, Tensor<4>)> = None;
        for (step, tokens) in [5usize, 1, 1, 60, 1, 70, 1].into_iter().enumerate() {
            let k = Tensor::<4>::random([2, 3, tokens, 4], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<4>::random([2, 3, tokens, 6], Distribution::Normal(0.0, 1.0), &device);
            let (keys, values) = cache.append(1, k.clone(), v.clone());
            expected = Some(match expected.take() {
                None => (k, v),
                Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            });
            let (ek, ev) = expected.clone().expect("set above");
            assert_eq!(keys.dims(), ek.dims(), "step {step}");
            assert_eq!(keys.to_data(), ek.to_data(), "keys at step {step}");
            assert_eq!(values.to_data(), ev.to_data(), "values at step {step}");
        }
    }
}
