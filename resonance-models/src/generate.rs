//! Autoregressive decoding with a KV cache: greedy or sampled (temperature, top-k, top-p).

use burn::tensor::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{ModelError, Result};
use crate::nn::attention::KvCache;
use crate::registry::{AnyModel, Images, ModelInputs};

/// How the next token is chosen.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// 0 selects greedy decoding.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 disables).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 disables).
    pub top_k: usize,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// Picks a token from one row of logits.
pub fn choose_token(logits: &[f32], config: &SamplingConfig, rng: &mut StdRng) -> u32 {
    if config.temperature <= 0.0 {
        // First maximum, as torch.argmax does.
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if config.top_k > 0 {
        order.truncate(config.top_k.max(1));
    }
    let scaled: Vec<f64> = order
        .iter()
        .map(|&i| logits[i] as f64 / config.temperature as f64)
        .collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<f64> = scaled.iter().map(|v| (v - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if config.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= config.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        order.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let draw: f64 = rng.random();
    let mut cumulative = 0.0;
    for (i, p) in probs.iter().enumerate() {
        cumulative += p;
        if draw < cumulative {
            return order[i] as u32;
        }
    }
    order[order.len() - 1] as u32
}

fn last_row(logits: Tensor<3>) -> Result<Vec<f32>> {
    let [_, t, v] = logits.dims();
    let row = logits.narrow(1, t - 1, 1).reshape([v]);
    row.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| ModelError::Input(format!("reading logits: {e:?}")))
}

/// Generates up to `max_new_tokens` after `prompt_ids` (one sequence), stopping at any of
/// `eos_ids`. Returns the new token ids (including the EOS token when one was produced).
pub fn generate(
    model: &AnyModel,
    prompt_ids: &[u32],
    pixel_values: Option<Tensor<4>>,
    eos_ids: &[u32],
    config: &SamplingConfig,
    device: &Device,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt_ids.is_empty() {
        return Err(ModelError::Input("the prompt is empty".into()));
    }
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut cache = KvCache::new(model.language_model().num_layers());
    let ids = vec![prompt_ids.to_vec()];
    let mask = vec![vec![true; prompt_ids.len()]];
    let logits = model.forward(
        ModelInputs {
            input_ids: &ids,
            attention_mask: &mask,
            images: Images::pixels(pixel_values),
        },
        Some(&mut cache),
        device,
    )?;
    let mut next = choose_token(&last_row(logits)?, config, &mut rng);
    let mut out = Vec::new();
    let lm = model.language_model();
    for step in 0..config.max_new_tokens {
        out.push(next);
        on_token(next);
        if eos_ids.contains(&next) || step + 1 == config.max_new_tokens {
            break;
        }
        let embeds = lm.embed(&[vec![next]], device);
        let logits = lm.forward_embeds(embeds, &[vec![true]], Some(&mut cache));
        next = choose_token(&last_row(logits)?, config, &mut rng);
    }
    Ok(out)
}

/// Greedy decoding of a batch of prompts of equal length (no padding) with one KV cache: a
/// prefill of all rows, then one `[b, 1]` forward per new token. Each row's output stops after
/// its first token in `eos_ids`; decoding ends when every row has stopped or after
/// `max_new_tokens` (pass no `eos_ids` to always produce `max_new_tokens`, as
/// `min_new_tokens = max_new_tokens` does in transformers). `pixel_values` holds the images of the
/// rows in image-token order. Rows of different lengths are refused: left padding would need
/// per-row positions, which this function does not build.
pub fn generate_greedy_batch(
    model: &AnyModel,
    prompts: &[Vec<u32>],
    pixel_values: Option<Tensor<4>>,
    eos_ids: &[u32],
    max_new_tokens: usize,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    let width = prompts.first().map_or(0, Vec::len);
    if width == 0 {
        return Err(ModelError::Input("the prompt is empty".into()));
    }
    if prompts.iter().any(|p| p.len() != width) {
        return Err(ModelError::Input(
            "batched greedy decoding needs prompts of equal length".into(),
        ));
    }
    let rows = prompts.len();
    let greedy = SamplingConfig::default();
    let mut rng = StdRng::seed_from_u64(0);
    let mut cache = KvCache::new(model.language_model().num_layers());
    let mask = vec![vec![true; width]; rows];
    let logits = model.forward(
        ModelInputs {
            input_ids: prompts,
            attention_mask: &mask,
            images: Images::pixels(pixel_values),
        },
        Some(&mut cache),
        device,
    )?;
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut done = vec![false; rows];
    let mut next = last_rows(logits)?
        .iter()
        .map(|row| choose_token(row, &greedy, &mut rng))
        .collect::<Vec<_>>();
    let lm = model.language_model();
    let one = vec![vec![true]; rows];
    for step in 0..max_new_tokens {
        for (r, &token) in next.iter().enumerate() {
            if !done[r] {
                out[r].push(token);
                done[r] = eos_ids.contains(&token);
            }
        }
        if done.iter().all(|&d| d) || step + 1 == max_new_tokens {
            break;
        }
        let ids: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        let logits = lm.forward_embeds(lm.embed(&ids, device), &one, Some(&mut cache));
        next = last_rows(logits)?
            .iter()
            .map(|row| choose_token(row, &greedy, &mut rng))
            .collect();
    }
    Ok(out)
}

/// The logits of the last position of every row, `[b][vocab]`.
fn last_rows(logits: Tensor<3>) -> Result<Vec<Vec<f32>>> {
    let [b, t, v] = logits.dims();
    let values = logits
        .narrow(1, t - 1, 1)
        .reshape([b * v])
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| ModelError::Input(format!("reading logits: {e:?}")))?;
    Ok(values.chunks(v).map(<[f32]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = StdRng::seed_from_u64(0);
        let c = SamplingConfig::default();
        assert_eq!(choose_token(&[0.1, 0.5, 0.5, -1.0], &c, &mut rng), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = StdRng::seed_from_u64(3);
        let c = SamplingConfig {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(choose_token(&[0.1, 2.0, 0.3], &c, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_removes_the_tail() {
        let mut rng = StdRng::seed_from_u64(5);
        let c = SamplingConfig {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        // Token 0 alone holds > 50% of the mass, so it is the only candidate.
        for _ in 0..20 {
            assert_eq!(choose_token(&[5.0, 1.0, 1.0, 1.0], &c, &mut rng), 0);
        }
    }

    #[test]
    fn sampling_is_reproducible_for_a_seed() {
        let c = SamplingConfig {
            temperature: 1.0,
            ..Default::default()
        };
        let logits = [0.0f32; 50];
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..10)
                .map(|_| choose_token(&logits, &c, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
    }
}
