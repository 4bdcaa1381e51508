//! Per-token log-probabilities of given continuations: the quantity every preference loss and
//! the `score` command are built on.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

/// Log-probabilities of `targets` under `logits`.
///
/// `logits`: `[b, t, vocab]`; `targets[b]` lists `(position, token)` pairs, meaning the token at
/// `position + 1` was predicted from the logits at `position`. Returns one vector per row, in the
/// order of `targets[b]`.
pub fn token_logprobs(logits: Tensor<3>, targets: &[Vec<(usize, u32)>]) -> Vec<Vec<f32>> {
    let [b, t, _] = logits.dims();
    let device = logits.device();
    let logp = log_softmax(logits, 2);
    // Gather the target column at every position (0 where unused), then read the needed ones.
    let mut index = vec![0i64; b * t];
    for (row, pairs) in targets.iter().enumerate() {
        for &(pos, token) in pairs {
            index[row * t + pos] = token as i64;
        }
    }
    let index = Tensor::<3, Int>::from_data(TensorData::new(index, [b, t, 1]), &device);
    let picked = logp.gather(2, index).reshape([b, t]);
    let values = picked
        .into_data()
        .try_into_vec::<f32>()
        .unwrap_or_else(|_| vec![f32::NAN; b * t]);
    targets
        .iter()
        .enumerate()
        .map(|(row, pairs)| {
            pairs
                .iter()
                .map(|&(pos, _)| values[row * t + pos])
                .collect()
        })
        .collect()
}

/// Targets read from logits taken at their positions only
/// ([`TrainableModel::target_logits`](resonance_models::trainable::TrainableModel::target_logits)): the
/// positions to take per row, and the targets renumbered so that target `k` of a row reads
/// index `k`. Every function of this module then works on those logits unchanged.
pub type CompactTargets = (Vec<Vec<usize>>, Vec<Vec<(usize, u32)>>);

/// See [`CompactTargets`].
pub fn compact_targets(targets: &[Vec<(usize, u32)>]) -> CompactTargets {
    targets
        .iter()
        .map(|row| {
            let positions = row.iter().map(|&(position, _)| position).collect();
            let renumbered = row
                .iter()
                .enumerate()
                .map(|(k, &(_, token))| (k, token))
                .collect();
            (positions, renumbered)
        })
        .unzip()
}

/// The summed log-probability of each row's targets, `[rows]`.
pub fn sequence_logps(logits: Tensor<3>, targets: &[Vec<(usize, u32)>]) -> Tensor<1> {
    weighted_sequence_logps(logits, targets, &[None])
        .pop()
        .expect("one weighting in, one sum out")
}

/// Weighted sums of each row's target log-probs, `[rows]` per weighting: `None` weighs every
/// target 1 (= [`sequence_logps`]), `Some(w)` weighs target `k` of row `r` by `w[r][k]` (a missing
/// weight counts 0). The log-softmax and gather run once for all weightings, so DDPO's weighted
/// and the plain sums of one forward pass share them.
pub fn weighted_sequence_logps(
    logits: Tensor<3>,
    targets: &[Vec<(usize, u32)>],
    weightings: &[Option<&[Vec<f32>]>],
) -> Vec<Tensor<1>> {
    let [b, t, _] = logits.dims();
    let device = logits.device();
    let mut index = vec![0i64; b * t];
    for (row, pairs) in targets.iter().enumerate() {
        for &(pos, token) in pairs {
            index[row * t + pos] = token as i64;
        }
    }
    let index = Tensor::<3, Int>::from_data(TensorData::new(index, [b, t, 1]), &device);
    let picked = log_softmax(logits, 2).gather(2, index).reshape([b, t]);
    weightings
        .iter()
        .map(|weighting| {
            let mut weight = vec![0f32; b * t];
            for (row, pairs) in targets.iter().enumerate() {
                for (k, &(pos, _)) in pairs.iter().enumerate() {
                    weight[row * t + pos] = match weighting {
                        None => 1.0,
                        Some(w) => w.get(row).and_then(|r| r.get(k)).copied().unwrap_or(0.0),
                    };
                }
            }
            let weight = Tensor::<2>::from_data(TensorData::new(weight, [b, t]), &device);
            crate::losses::weighted_token_sum(picked.clone(), weight)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// The head at the target positions only gives the log-probs of the full logits, rows
    /// with different numbers of targets (and one with none) included.
    #[test]
    fn logits_at_the_targets_give_the_full_logits_log_probs() {
        use resonance_models::registry::{AnyModel, ModelInputs};
        use resonance_models::trainable::TrainableModel;
        let device = Device::flex();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-llama");
        let Ok(AnyModel::Text(model, _)) = AnyModel::load(&dir, &device) else {
            panic!("tiny-llama loads as a causal LM");
        };
        let ids = vec![
            vec![1, 5, 6, 7, 8, 9],
            vec![1, 12, 13, 14, 0, 0],
            vec![1, 3, 4, 5, 6, 7],
        ];
        let mask: Vec<Vec<bool>> = ids
            .iter()
            .map(|r: &Vec<u32>| {
                r.iter()
                    .enumerate()
                    .map(|(j, &id)| j == 0 || id != 0)
                    .collect()
            })
            .collect();
        let targets = vec![
            vec![(2, 7), (3, 8), (4, 9)],
            vec![(1, 13), (2, 14)],
            Vec::new(),
        ];
        let inputs = ModelInputs {
            input_ids: &ids,
            attention_mask: &mask,
            images: None,
        };
        let hidden = model.hidden_grouped(inputs, 1, None, &device).unwrap();
        let full = sequence_logps(model.logits(hidden.clone()), &targets);
        let (positions, compact) = compact_targets(&targets);
        assert_eq!(positions, vec![vec![2, 3, 4], vec![1, 2], vec![]]);
        assert_eq!(compact[0], vec![(0, 7), (1, 8), (2, 9)]);
        let at = model.logits_at(hidden, &positions);
        assert_eq!(at.dims()[..2], [3, 3]);
        let at = sequence_logps(at, &compact);
        let (full, at) = (
            full.into_data().try_to_vec::<f32>().unwrap(),
            at.into_data().try_to_vec::<f32>().unwrap(),
        );
        assert_eq!(at[2], 0.0);
        for (a, b) in full.iter().zip(&at) {
            assert!(
                (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                "{full:?} vs {at:?}"
            );
        }
        assert!(full[0] < 0.0 && full[1] < 0.0);
    }

    #[test]
    fn picks_log_softmax_of_the_target() {
        let device = Device::flex();
        let logits = Tensor::<3>::from_data(
            TensorData::new(vec![0.0f32, 1.0, 2.0, 3.0, 3.0, 3.0], [1, 2, 3]),
            &device,
        );
        let out = token_logprobs(logits, &[vec![(0, 2), (1, 0)]]);
        let z0 = (1.0f32 + 1f32.exp() + 2f32.exp()).ln();
        assert!((out[0][0] - (2.0 - z0)).abs() < 1e-6);
        assert!((out[0][1] - (1.0f32 / 3.0).ln()).abs() < 1e-6);
    }
}
