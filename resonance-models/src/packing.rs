//! Shared-prefix packing of grouped batches.
//!
//! The rows of a preference pair (chosen and rejected) or of a ranked list (its candidates)
//! begin with the same tokens: the image, the prompt, often the first words of the answers. In
//! a causal decoder a token's hidden state depends only on the tokens up to it, so those shared
//! tokens have the same states in every copy. Packing computes them once: each example becomes
//! one row holding the shared prefix followed by every copy's remaining tokens. A copy's tokens
//! keep the positions they have in their own row and attend to the prefix and to their own
//! segment only ([`MaskSpec::packed`](crate::nn::attention::MaskSpec::packed)), which is exactly
//! what they see in their own row. The hidden states are gathered back into the grouped layout,
//! so losses, log-probabilities and value heads read them as before; under autodiff the gather's
//! backward pass sums the gradients the copies send to their shared prefix.
//!
//! On the benchmark's DPO pairs (288 shared tokens: BOS, image and prompt; 224 per answer) a
//! row pair of 2 × 512 positions becomes one row of 736.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::nn::attention::PackedLayout;

/// Packing is used when it removes at least this fraction of the grouped rows' positions (a
/// packed row is longer than the rows it replaces, so its attention spans more keys).
const MIN_SAVING: f64 = 0.1;

/// A grouped batch (rows `g·n + i` for copy `g` of example `i`, right-padded) packed into one
/// row per example.
#[derive(Debug, Clone)]
pub struct SharedPrefixPacking {
    /// `n` packed rows, right-padded to a common width.
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<bool>>,
    /// Each packed token's position in its own row and its segment (0 for the shared prefix,
    /// `g + 1` for copy `g`'s own tokens).
    pub layout: PackedLayout,
    /// For every position of the grouped rows (`copies·n × width`, row-major), the packed
    /// position (`n × packed width`, row-major) that holds its hidden state. A position past
    /// a row's last real token takes the first position of its packed row.
    unpack_index: Vec<i64>,
    grouped_rows: usize,
    grouped_width: usize,
}

impl SharedPrefixPacking {
    /// Packs `copies` groups of right-padded rows when their examples share enough leading
    /// tokens, or returns `None` (fewer than two copies, ragged rows, less than [`MIN_SAVING`]
    /// saved, or an `image_token` after a shared prefix: image features are placed once per
    /// example, so every image must lie in the part its copies share).
    pub fn plan(
        input_ids: &[Vec<u32>],
        attention_mask: &[Vec<bool>],
        copies: usize,
        image_token: Option<u32>,
    ) -> Option<Self> {
        let rows = input_ids.len();
        if copies < 2 || rows == 0 || !rows.is_multiple_of(copies) || attention_mask.len() != rows {
            return None;
        }
        let n = rows / copies;
        let width = input_ids[0].len();
        let ragged = input_ids.iter().any(|r| r.len() != width)
            || attention_mask.iter().any(|r| r.len() != width);
        if ragged {
            return None;
        }
        // A row's tokens run up to its last real one; right padding after it is dropped.
        let used: Vec<usize> = attention_mask
            .iter()
            .map(|m| m.iter().rposition(|&real| real).map_or(0, |p| p + 1))
            .collect();

        let mut packed_ids = Vec::with_capacity(n);
        let mut packed_mask = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut segments = Vec::with_capacity(n);
        // sources[r][j]: the index in its packed row of grouped row r's token j.
        let mut sources: Vec<Vec<usize>> = vec![Vec::new(); rows];
        for i in 0..n {
            let members: Vec<usize> = (0..copies).map(|g| g * n + i).collect();
            let first = members[0];
            let shared = (0..width)
                .take_while(|&j| {
                    members.iter().all(|&r| {
                        j < used[r]
                            && input_ids[r][j] == input_ids[first][j]
                            && attention_mask[r][j] == attention_mask[first][j]
                    })
                })
                .count();
            if let Some(token) = image_token {
                let image_after_prefix = members
                    .iter()
                    .any(|&r| input_ids[r][shared..used[r]].contains(&token));
                if image_after_prefix {
                    return None;
                }
            }
            let mut ids = input_ids[first][..shared].to_vec();
            let mut mask = attention_mask[first][..shared].to_vec();
            let mut pos: Vec<usize> = (0..shared).collect();
            let mut seg = vec![0u32; shared];
            for (g, &r) in members.iter().enumerate() {
                let start = ids.len();
                ids.extend_from_slice(&input_ids[r][shared..used[r]]);
                mask.extend_from_slice(&attention_mask[r][shared..used[r]]);
                pos.extend(shared..used[r]);
                seg.extend(std::iter::repeat_n(g as u32 + 1, used[r] - shared));
                sources[r] = (0..used[r])
                    .map(|j| if j < shared { j } else { start + j - shared })
                    .collect();
            }
            packed_ids.push(ids);
            packed_mask.push(mask);
            positions.push(pos);
            segments.push(seg);
        }
        let packed_width = packed_ids.iter().map(Vec::len).max().unwrap_or(0);
        let (packed, grouped) = (n * packed_width, rows * width);
        if packed_width == 0 || packed as f64 > (1.0 - MIN_SAVING) * grouped as f64 {
            return None;
        }
        for i in 0..n {
            // Padding: a hidden key at position 0 of the prefix segment.
            packed_ids[i].resize(packed_width, 0);
            packed_mask[i].resize(packed_width, false);
            positions[i].resize(packed_width, 0);
            segments[i].resize(packed_width, 0);
        }
        let unpack_index = (0..rows)
            .flat_map(|r| {
                let base = (r % n) * packed_width;
                let source = &sources[r];
                (0..width).map(move |j| (base + source.get(j).copied().unwrap_or(0)) as i64)
            })
            .collect();
        Some(SharedPrefixPacking {
            input_ids: packed_ids,
            attention_mask: packed_mask,
            layout: PackedLayout {
                positions,
                segments,
            },
            unpack_index,
            grouped_rows: rows,
            grouped_width: width,
        })
    }

    /// Positions the packed rows hold, padding included.
    pub fn packed_positions(&self) -> usize {
        self.input_ids.len() * self.input_ids.first().map_or(0, Vec::len)
    }

    /// Hidden states of the packed rows `[n, packed width, hidden]` → the grouped layout
    /// `[copies·n, width, hidden]`.
    pub fn unpack(&self, packed: Tensor<3>) -> Tensor<3> {
        gather_rows(
            packed,
            &self.unpack_index,
            [self.grouped_rows, self.grouped_width],
        )
    }

    /// Where the wanted outputs `outputs[r]` of the grouped rows lie in the packed rows: each
    /// packed row lists its copies' positions one copy after the other (a shared-prefix
    /// position wanted by several copies is listed once per copy).
    pub fn pack_outputs(&self, outputs: &[Vec<usize>]) -> PackedOutputs {
        let n = self.input_ids.len();
        let packed_width = self.input_ids.first().map_or(0, Vec::len);
        let mut positions: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut starts = vec![0usize; self.grouped_rows];
        for (r, start) in starts.iter_mut().enumerate() {
            let i = r % n;
            *start = positions[i].len();
            let wanted = outputs.get(r).map(Vec::as_slice).unwrap_or(&[]);
            positions[i].extend(wanted.iter().map(|&j| {
                self.unpack_index[r * self.grouped_width + j] as usize - i * packed_width
            }));
        }
        let packed_k = positions.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let k = outputs.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let regroup_index = (0..self.grouped_rows)
            .flat_map(|r| {
                let (i, start) = (r % n, starts[r]);
                let len = outputs.get(r).map_or(0, Vec::len);
                (0..k).map(move |j| (i * packed_k + start + if j < len { j } else { 0 }) as i64)
            })
            .collect();
        PackedOutputs {
            positions,
            regroup_index,
            rows: self.grouped_rows,
            k,
        }
    }
}

/// Wanted outputs of grouped rows, located in their packed rows
/// ([`SharedPrefixPacking::pack_outputs`]).
#[derive(Debug, Clone)]
pub struct PackedOutputs {
    /// Per packed row, the positions whose outputs to compute.
    pub positions: Vec<Vec<usize>>,
    /// For every output of the grouped layout (`rows × k`, row-major), its index among the
    /// packed outputs (`n × packed k`, row-major). Padding entries take their row's first.
    regroup_index: Vec<i64>,
    rows: usize,
    k: usize,
}

impl PackedOutputs {
    /// The packed rows' outputs `[n, packed k, hidden]` → the grouped layout `[rows, k, hidden]`,
    /// as [`select_rows`](crate::text::model::select_rows) would take them from unpacked rows
    /// (its padding entries aside: they hold another output of their row).
    pub fn regroup(&self, packed: Tensor<3>) -> Tensor<3> {
        gather_rows(packed, &self.regroup_index, [self.rows, self.k])
    }
}

/// The vectors of `packed` `[n, width, hidden]` at the flat indices `index` (into `n × width`),
/// as `[rows, columns, hidden]`; under autodiff the gradient sums over repeated indices.
fn gather_rows(packed: Tensor<3>, index: &[i64], [rows, columns]: [usize; 2]) -> Tensor<3> {
    let [n, width, hidden] = packed.dims();
    let device: Device = packed.device();
    let index =
        Tensor::<1, Int>::from_data(TensorData::new(index.to_vec(), [index.len()]), &device);
    packed
        .reshape([n * width, hidden])
        .select(0, index)
        .reshape([rows, columns, hidden])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_of(rows: &[Vec<u32>], lengths: &[usize]) -> Vec<Vec<bool>> {
        rows.iter()
            .zip(lengths)
            .map(|(r, &l)| (0..r.len()).map(|j| j < l).collect())
            .collect()
    }

    /// Two pairs: the first shares `1 2 3` (its answers `4 5` / `6`), the second shares
    /// `1 2 7 8` (answers `9` / `8 5` share their first token too).
    #[test]
    fn pairs_pack_their_shared_prefix_once() {
        let ids = vec![
            vec![1, 2, 3, 4, 5, 0],
            vec![1, 2, 7, 8, 9, 0],
            vec![1, 2, 3, 6, 0, 0],
            vec![1, 2, 7, 8, 8, 5],
        ];
        let mask = mask_of(&ids, &[5, 5, 4, 6]);
        let p = SharedPrefixPacking::plan(&ids, &mask, 2, None).expect("worth packing");
        assert_eq!(
            p.input_ids,
            vec![vec![1, 2, 3, 4, 5, 6], vec![1, 2, 7, 8, 9, 8, 5]]
                .into_iter()
                .map(|mut r| {
                    r.resize(7, 0);
                    r
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(p.layout.positions[0], [0, 1, 2, 3, 4, 3, 0]);
        assert_eq!(p.layout.segments[0], [0, 0, 0, 1, 1, 2, 0]);
        assert_eq!(p.layout.positions[1], [0, 1, 2, 3, 4, 4, 5]);
        assert_eq!(p.layout.segments[1], [0, 0, 0, 0, 1, 2, 2]);
        assert_eq!(
            p.attention_mask[0],
            [true, true, true, true, true, true, false]
        );
        // Grouped row 2 (pair 0 rejected: 1 2 3 6) reads packed 0 1 2 5, its padding packed 0.
        let row2: Vec<i64> = p.unpack_index[12..18].to_vec();
        assert_eq!(row2, [0, 1, 2, 5, 0, 0]);
        // Grouped row 3 (pair 1 rejected) reads the second packed row (offset 7).
        assert_eq!(&p.unpack_index[18..24], &[7, 8, 9, 10, 12, 13]);
        assert_eq!(p.packed_positions(), 14);
    }

    #[test]
    fn nothing_is_packed_when_little_is_shared_or_an_image_follows_the_prefix() {
        let ids = vec![vec![1, 2, 3, 4], vec![5, 2, 3, 4]];
        let mask = mask_of(&ids, &[4, 4]);
        assert!(SharedPrefixPacking::plan(&ids, &mask, 2, None).is_none());
        assert!(SharedPrefixPacking::plan(&ids, &mask, 1, None).is_none());
        let ids = vec![vec![1, 2, 3, 4, 9, 5], vec![1, 2, 3, 4, 6, 9]];
        let mask = mask_of(&ids, &[6, 6]);
        assert!(SharedPrefixPacking::plan(&ids, &mask, 2, None).is_some());
        assert!(SharedPrefixPacking::plan(&ids, &mask, 2, Some(9)).is_none());
        assert!(SharedPrefixPacking::plan(&ids, &mask, 2, Some(1)).is_some());
    }
}
