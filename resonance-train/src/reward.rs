//! Reward models: a scalar value head on the last token of each answer, trained on preference
//! pairs (Bradley-Terry, as TRL's `RewardTrainer`) or ranked lists of answers.
//!
//! An answer is encoded as DPO encodes it (the prompt rendered with the chat template and the
//! generation prompt, then the answer and EOS, see [`crate::dpo::encode_pair`]). The reward of a
//! sequence is the value head's output at its last token that is not the padding token, which is
//! how transformers' `*ForSequenceClassification` pools (`config.pad_token_id`; when the padding
//! token is also EOS, the EOS itself is skipped, as there). A batch holds `K` candidate rows per
//! record, candidate-major (row `k·n + i` is answer `k` of record `i`), so each image is encoded
//! once for all its candidates
//! ([`TrainableModel::hidden_grouped`](resonance_models::trainable::TrainableModel::hidden_grouped)).

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use resonance_core::config::MethodConfig;
use resonance_core::data::{Conversation, RecordSource};
use resonance_models::processor::Processor;
use serde_json::Value;

use crate::dpo::encode_pair;
use crate::error::{Result, TrainError};
use crate::losses::ranking_loss;
use crate::sft::Refusal;

/// One record's answers, best first, as token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedExample {
    /// Prompt ids (image tokens expanded).
    pub prompt: Vec<u32>,
    /// The answers (each ending with EOS unless cut by `max_length`), best first.
    pub answers: Vec<Vec<u32>>,
    pub images: Vec<PathBuf>,
    pub source: RecordSource,
}

/// Encodes a preference record (chosen, rejected, then any further ranked answers) with the
/// truncation rules of [`encode_pair`].
pub fn encode_ranked(
    processor: &Processor,
    conversation: &Conversation,
    max_length: usize,
    max_prompt_length: Option<usize>,
) -> Result<std::result::Result<RankedExample, Refusal>> {
    if conversation.rejected.is_none() {
        return Err(TrainError::Record {
            path: conversation.source.file.to_path_buf(),
            line: conversation.source.line,
            message: "a reward model trains on ranked answers; this record has no rejected answer"
                .into(),
        });
    }
    let pair = match encode_pair(processor, conversation, max_length, max_prompt_length)? {
        Ok(pair) => pair,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let room = max_length - pair.prompt.len();
    let mut answers = vec![pair.chosen, pair.rejected];
    for text in &conversation.ranked_below {
        let mut ids = processor.response_ids(text)?;
        ids.truncate(room);
        answers.push(ids);
    }
    Ok(Ok(RankedExample {
        prompt: pair.prompt,
        answers,
        images: pair.images,
        source: pair.source,
    }))
}

/// `K·n` right-padded rows of `n` records with `K` answers each, candidate-major.
#[derive(Debug, Clone)]
pub struct RankedBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<bool>>,
    /// The position whose value is each row's reward.
    pub pool_index: Vec<usize>,
    /// The images of the `n` records, once.
    pub images: Vec<PathBuf>,
    pub lists: usize,
    pub candidates: usize,
}

impl RankedBatch {
    /// Collates records that all have the same number of answers; `pad_id` fills the rows,
    /// `config_pad` is the model config's `pad_token_id` that pooling skips.
    pub fn collate(
        examples: &[RankedExample],
        pad_id: u32,
        config_pad: Option<u32>,
    ) -> Result<Self> {
        let candidates = examples.first().map(|e| e.answers.len()).unwrap_or(0);
        if let Some(odd) = examples.iter().find(|e| e.answers.len() != candidates) {
            return Err(TrainError::Record {
                path: odd.source.file.to_path_buf(),
                line: odd.source.line,
                message: format!(
                    "{} ranked answers where the batch's other records have {candidates}; \
                     a reward-model dataset must rank the same number of answers in every record",
                    odd.answers.len()
                ),
            });
        }
        let rows: Vec<(&Vec<u32>, &Vec<u32>)> = (0..candidates)
            .flat_map(|k| examples.iter().map(move |e| (&e.prompt, &e.answers[k])))
            .collect();
        let width = rows
            .iter()
            .map(|(p, a)| p.len() + a.len())
            .max()
            .unwrap_or(0);
        let mut batch = RankedBatch {
            input_ids: Vec::with_capacity(rows.len()),
            attention_mask: Vec::with_capacity(rows.len()),
            pool_index: Vec::with_capacity(rows.len()),
            images: examples.iter().flat_map(|e| e.images.clone()).collect(),
            lists: examples.len(),
            candidates,
        };
        for (prompt, answer) in rows {
            let mut ids: Vec<u32> = prompt.iter().chain(answer.iter()).copied().collect();
            let n = ids.len();
            batch.pool_index.push(pool_position(&ids, config_pad));
            ids.resize(width, pad_id);
            let mut mask = vec![true; n];
            mask.resize(width, false);
            batch.input_ids.push(ids);
            batch.attention_mask.push(mask);
        }
        Ok(batch)
    }

    pub fn num_tokens(&self) -> usize {
        self.attention_mask.iter().flatten().filter(|&&m| m).count()
    }
}

/// The last position of `ids` (the unpadded row) holding a token other than `config_pad`, or the
/// last position when every token is the padding token or there is none.
pub fn pool_position(ids: &[u32], config_pad: Option<u32>) -> usize {
    let last = ids.len().saturating_sub(1);
    match config_pad {
        Some(pad) => ids.iter().rposition(|&id| id != pad).unwrap_or(last),
        None => last,
    }
}

/// The model config's `pad_token_id` (the text config's for a multimodal model), which
/// transformers' sequence classifiers pool by.
pub fn config_pad_token_id(model_dir: &Path) -> Result<Option<u32>> {
    let config = resonance_models::load::read_config(model_dir)?;
    let pad = config
        .get("text_config")
        .and_then(|t| t.get("pad_token_id"))
        .or_else(|| config.get("pad_token_id"))
        .and_then(Value::as_u64);
    Ok(pad.map(|p| p as u32))
}

/// The config's `initializer_range` (the text config's for a multimodal model), the std of a
/// new value head; transformers' default when absent.
pub fn initializer_range(model_dir: &Path) -> Result<f64> {
    let config = resonance_models::load::read_config(model_dir)?;
    Ok(config
        .get("text_config")
        .and_then(|t| t.get("initializer_range"))
        .or_else(|| config.get("initializer_range"))
        .and_then(Value::as_f64)
        .unwrap_or(resonance_models::load::DEFAULT_INITIALIZER_RANGE))
}

/// The values at `pool_index` of each row: `[rows, t]` → `[rows]`.
pub fn pooled_rewards(values: Tensor<2>, pool_index: &[usize]) -> Tensor<1> {
    let [rows, t] = values.dims();
    let device = values.device();
    let flat: Vec<i64> = pool_index
        .iter()
        .enumerate()
        .map(|(row, &p)| (row * t + p) as i64)
        .collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(flat, [rows]), &device);
    values.reshape([rows * t]).select(0, index)
}

/// Candidate-major row rewards `[K·n]` → lists `[n, K]`, best answer first.
pub fn rewards_by_list(rewards: Tensor<1>, lists: usize, candidates: usize) -> Tensor<2> {
    rewards.reshape([candidates, lists]).transpose()
}

/// The mean loss of a batch's lists (plus TRL's centring term on the first two answers), divided
/// by the number of micro-batches so that accumulated gradients average.
pub fn reward_batch_loss(
    method: &MethodConfig,
    rewards: Tensor<2>,
    micro_batches: usize,
) -> Tensor<1> {
    let [n, k] = rewards.dims();
    let mut loss = ranking_loss(rewards.clone(), method.ranking_loss).mean();
    if let Some(c) = method.center_rewards_coefficient.filter(|_| k >= 2) {
        let sum = rewards.clone().narrow(1, 0, 1) + rewards.narrow(1, 1, 1);
        loss = loss + sum.reshape([n]).square().mean().mul_scalar(c);
    }
    loss.div_scalar(micro_batches.max(1) as f64)
}

/// TRL's reward metrics of lists `[n][K]` (best first): `accuracy` (share of ordered pairs
/// `i < j` with `r_i > r_j`), `margin` (mean `r_i − r_j` over those pairs; for pairs TRL's
/// mean chosen − rejected), `min_reward`, `mean_reward`, `max_reward`.
pub fn reward_metrics(lists: &[Vec<f64>]) -> Vec<(&'static str, f64)> {
    let (mut pairs, mut correct, mut margin) = (0usize, 0usize, 0f64);
    let all: Vec<f64> = lists.iter().flatten().copied().collect();
    for list in lists {
        for i in 0..list.len() {
            for j in i + 1..list.len() {
                pairs += 1;
                correct += usize::from(list[i] > list[j]);
                margin += list[i] - list[j];
            }
        }
    }
    let count = pairs.max(1) as f64;
    let n = all.len().max(1) as f64;
    vec![
        ("accuracy", correct as f64 / count),
        ("margin", margin / count),
        (
            "min_reward",
            all.iter().copied().fold(f64::INFINITY, f64::min),
        ),
        ("mean_reward", all.iter().sum::<f64>() / n),
        (
            "max_reward",
            all.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ),
    ]
}

/// `[n, K]` rewards read back to the host, one list per record.
pub fn lists_to_host(rewards: Tensor<2>) -> Result<Vec<Vec<f64>>> {
    let [n, k] = rewards.dims();
    let values: Vec<f32> = rewards
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| TrainError::Input(format!("reading rewards: {e:?}")))?;
    Ok((0..n)
        .map(|i| {
            values[i * k..(i + 1) * k]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect())
}
