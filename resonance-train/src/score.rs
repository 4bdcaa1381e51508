//! `resonance score`: log-probabilities of responses given prompts (and images), with TRL's
//! prompt/completion contract. Also how reference log-probs are precomputed for DPO.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use resonance_models::processor::Processor;
use resonance_models::registry::{AnyModel, Images, ModelInputs};
use resonance_models::trainable::TrainableModel;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TrainError};
use crate::logprobs::token_logprobs;

/// One input line of `score`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreRecord {
    /// One image path (relative to the image root).
    #[serde(default)]
    pub image: Option<String>,
    /// Several image paths.
    #[serde(default)]
    pub images: Option<Vec<String>>,
    /// The user prompt.
    pub prompt: String,
    /// The response to score.
    pub response: String,
    /// Extra fields carried through untouched (ids, metadata).
    #[serde(default)]
    pub id: Option<Value>,
}

impl ScoreRecord {
    /// The record's image paths, in order.
    pub fn image_paths(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.image.iter().map(String::as_str).collect();
        if let Some(list) = &self.images {
            out.extend(list.iter().map(String::as_str));
        }
        out
    }
}

/// One output line of `score`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoreOutput {
    /// Sum of the response tokens' log-probabilities (EOS included).
    pub logprob: f64,
    /// Number of response tokens.
    pub num_tokens: usize,
    /// Log-probability of each response token.
    pub token_logprobs: Vec<f32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<Value>,
}

/// Reads a JSONL file of [`ScoreRecord`]s; errors name the file, line and problem.
pub fn read_score_records(path: &Path) -> Result<Vec<ScoreRecord>> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: ScoreRecord = serde_json::from_str(line).map_err(|e| TrainError::Record {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        if record.image.is_some() && record.images.is_some() {
            return Err(TrainError::Record {
                path: path.to_path_buf(),
                line: i + 1,
                message: "give either `image` or `images`, not both".into(),
            });
        }
        records.push(record);
    }
    Ok(records)
}

/// One batch of records as right-padded rows.
struct ScoreBatch {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<bool>>,
    /// `(position, token)` of each response token (predicted from `position`).
    targets: Vec<Vec<(usize, u32)>>,
    images: Vec<PathBuf>,
    /// Each row's unpadded length.
    lengths: Vec<usize>,
}

fn encode_batch(
    processor: &Processor,
    chunk: &[ScoreRecord],
    first_index: usize,
    image_root: &Path,
    pad: u32,
) -> Result<ScoreBatch> {
    let mut rows = Vec::new();
    let mut images: Vec<PathBuf> = Vec::new();
    for (offset, record) in chunk.iter().enumerate() {
        let paths = record.image_paths();
        let encoded = processor
            .encode_pair(&record.prompt, &record.response, paths.len())
            .map_err(|e| TrainError::Input(format!("record {}: {e}", first_index + offset + 1)))?;
        images.extend(paths.iter().map(|p| image_root.join(p)));
        rows.push(encoded);
    }
    let width = rows
        .iter()
        .map(|r| r.prompt_ids.len() + r.response_ids.len())
        .max()
        .unwrap_or(0);
    let mut batch = ScoreBatch {
        ids: Vec::new(),
        mask: Vec::new(),
        targets: Vec::new(),
        images,
        lengths: Vec::new(),
    };
    for row in &rows {
        let mut seq = row.prompt_ids.clone();
        seq.extend(&row.response_ids);
        let len = seq.len();
        let start = row.prompt_ids.len();
        batch
            .targets
            .push((start..len).map(|p| (p - 1, seq[p])).collect());
        seq.resize(width, pad);
        let mut valid = vec![true; len];
        valid.resize(width, false);
        batch.ids.push(seq);
        batch.mask.push(valid);
        batch.lengths.push(len);
    }
    Ok(batch)
}

fn padding_id(processor: &Processor) -> u32 {
    processor
        .tokenizer
        .pad_token_id()
        .or(processor.tokenizer.eos_token_id())
        .unwrap_or(0)
}

/// Scores records in batches of `batch_size` (right-padded, so padding never changes the
/// scores); `progress` is told how many records each batch finished.
pub fn score_records(
    model: &AnyModel,
    processor: &Processor,
    records: &[ScoreRecord],
    image_root: &Path,
    batch_size: usize,
    device: &Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<ScoreOutput>> {
    let pad = padding_id(processor);
    let size = batch_size.max(1);
    let mut outputs = Vec::with_capacity(records.len());
    for (chunk_index, chunk) in records.chunks(size).enumerate() {
        let batch = encode_batch(processor, chunk, chunk_index * size, image_root, pad)?;
        let pixel_values = processor.pixel_values(&batch.images, device)?;
        let logits = model.forward(
            ModelInputs {
                input_ids: &batch.ids,
                attention_mask: &batch.mask,
                images: Images::pixels(pixel_values),
            },
            None,
            device,
        )?;
        for (record, logps) in chunk.iter().zip(token_logprobs(logits, &batch.targets)) {
            outputs.push(ScoreOutput {
                logprob: logps.iter().map(|&v| v as f64).sum(),
                num_tokens: logps.len(),
                token_logprobs: logps,
                id: record.id.clone(),
            });
        }
        progress(chunk.len());
    }
    Ok(outputs)
}

/// One output line of `score --reward`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RewardOutput {
    /// The reward model's scalar for the prompt and response.
    pub reward: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<Value>,
}

/// Rewards of records under a reward model (a checkpoint with a value head, `score.weight`),
/// pooled at the last token that is not the config's `pad_token_id`, as transformers'
/// sequence classifiers pool.
#[allow(clippy::too_many_arguments)]
pub fn reward_records(
    model: &AnyModel,
    model_dir: &Path,
    processor: &Processor,
    records: &[ScoreRecord],
    image_root: &Path,
    batch_size: usize,
    device: &Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<RewardOutput>> {
    if !resonance_models::load::has_value_head(model_dir)? {
        return Err(TrainError::Input(format!(
            "{} is not a reward model: its weights have no value head (`score.weight`)",
            model_dir.display()
        )));
    }
    let config_pad = crate::reward::config_pad_token_id(model_dir)?;
    let pad = padding_id(processor);
    let size = batch_size.max(1);
    let mut outputs = Vec::with_capacity(records.len());
    for (chunk_index, chunk) in records.chunks(size).enumerate() {
        let batch = encode_batch(processor, chunk, chunk_index * size, image_root, pad)?;
        let pixel_values = processor.pixel_values(&batch.images, device)?;
        let inputs = ModelInputs {
            input_ids: &batch.ids,
            attention_mask: &batch.mask,
            images: Images::pixels(pixel_values),
        };
        let values = match model {
            AnyModel::Text(m, _) => m.values_grouped(inputs, 1, device)?,
            AnyModel::Llava(m, _) => m.values_grouped(inputs, 1, device)?,
        };
        let pool: Vec<usize> = batch
            .ids
            .iter()
            .zip(&batch.lengths)
            .map(|(ids, &len)| crate::reward::pool_position(&ids[..len], config_pad))
            .collect();
        let rewards: Vec<f32> = crate::reward::pooled_rewards(values, &pool)
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| TrainError::Input(format!("reading rewards: {e:?}")))?;
        for (record, reward) in chunk.iter().zip(rewards) {
            outputs.push(RewardOutput {
                reward: reward as f64,
                id: record.id.clone(),
            });
        }
        progress(chunk.len());
    }
    Ok(outputs)
}

/// How `score` reads preference pairs to precompute the reference log-probs of DPO.
#[derive(Debug, Clone)]
pub struct PairScoring {
    /// The paired format of the data file (`plain_dpo`, `rlhfv`, `conversational_preference`).
    pub format: resonance_core::data::DataFormat,
    /// Image folder (default: the data file's folder).
    pub image_root: Option<PathBuf>,
    /// The training run's `data.max_length`: the answers are cut exactly as training cuts them.
    pub max_length: usize,
    /// The training run's `data.max_prompt_length`.
    pub max_prompt_length: Option<usize>,
}

/// The reference log-probs `[chosen, rejected]` of every pair of a JSON-lines preference file,
/// computed through DPO's own encoding and batching (so that training reads back exactly what
/// its reference model would give), with the line each belongs to.
pub fn pair_reference_logps(
    model: &AnyModel,
    processor: &Processor,
    data: &Path,
    options: &PairScoring,
    batch_size: usize,
    device: &Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<(usize, [f64; 2])>> {
    use resonance_core::data::{load_dataset, LoadOptions};
    if data.extension().is_some_and(|e| e != "jsonl") {
        return Err(TrainError::Input(format!(
            "{}: reference log-probs are written into JSON-lines files (.jsonl)",
            data.display()
        )));
    }
    if !options.format.is_paired() || options.format.is_one_to_many() {
        return Err(TrainError::Input(format!(
            "--format {}: reference log-probs are written for one-pair-per-line formats \
             (plain_dpo, rlhfv, conversational_preference)",
            options.format
        )));
    }
    let mut load = LoadOptions::new(options.format);
    if let Some(root) = &options.image_root {
        load = load.image_root(root);
    }
    let dataset = load_dataset(data, &load).map_err(|e| TrainError::Input(e.to_string()))?;
    let pad = padding_id(processor);
    let mut out = Vec::with_capacity(dataset.records.len());
    for chunk in dataset.records.chunks(batch_size.max(1)) {
        let mut pairs = Vec::with_capacity(chunk.len());
        for conversation in chunk {
            // Marked as precomputed, the record is refused (not cut) when an answer does not fit,
            // exactly as training will refuse it; values already in the file are recomputed.
            let mut marked = conversation.clone();
            marked.reference_logps = Some([0.0, 0.0]);
            match crate::dpo::encode_pair(
                processor,
                &marked,
                options.max_length,
                options.max_prompt_length,
            )? {
                Ok(pair) => pairs.push(pair),
                Err(refusal) => {
                    return Err(TrainError::Record {
                        path: conversation.source.file.to_path_buf(),
                        line: conversation.source.line,
                        message: format!(
                            "{refusal}; give --max-length / --max-prompt-length as the run's data \
                             section has them"
                        ),
                    })
                }
            }
        }
        let batch = crate::dpo::PairBatch::collate(&pairs, pad);
        let pixel_values = processor.pixel_values(&batch.images, device)?;
        let inputs = ModelInputs {
            input_ids: &batch.input_ids,
            attention_mask: &batch.attention_mask,
            images: Images::pixels(pixel_values),
        };
        // The trainer's reference path: the head at the answer positions only.
        let (positions, targets) = crate::logprobs::compact_targets(&batch.targets);
        let logits = match model {
            AnyModel::Text(m, _) => m.target_logits(inputs, 2, &positions, device)?,
            AnyModel::Llava(m, _) => m.target_logits(inputs, 2, &positions, device)?,
        };
        let values: Vec<f32> = crate::logprobs::sequence_logps(logits, &targets)
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| TrainError::Input(format!("reading log-probs: {e:?}")))?;
        let n = pairs.len();
        for (i, pair) in pairs.iter().enumerate() {
            out.push((pair.source.line, [values[i] as f64, values[n + i] as f64]));
        }
        progress(n);
    }
    Ok(out)
}

/// The lines of a JSON-lines preference file with `ref_chosen_logps` / `ref_rejected_logps`
/// set from `values` (by line); other lines are kept as they are.
pub fn with_reference_logps(data: &Path, values: &[(usize, [f64; 2])]) -> Result<String> {
    let text = std::fs::read_to_string(data).map_err(|source| TrainError::Io {
        path: data.to_path_buf(),
        source,
    })?;
    let by_line: std::collections::HashMap<usize, [f64; 2]> = values.iter().copied().collect();
    let mut out = String::with_capacity(text.len() + values.len() * 64);
    for (i, line) in text.lines().enumerate() {
        match by_line.get(&(i + 1)) {
            Some([chosen, rejected]) => {
                let mut record: serde_json::Map<String, Value> = serde_json::from_str(line)
                    .map_err(|e| TrainError::Record {
                        path: data.to_path_buf(),
                        line: i + 1,
                        message: e.to_string(),
                    })?;
                record.insert("ref_chosen_logps".into(), (*chosen).into());
                record.insert("ref_rejected_logps".into(), (*rejected).into());
                out.push_str(&Value::Object(record).to_string());
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    Ok(out)
}
