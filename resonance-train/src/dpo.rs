//! DPO on preference pairs: encoding, paired batches (one image encoding per pair), per-sequence
//! log-probabilities, and the step's loss and TRL-named metrics.
//!
//! The prompt is the conversation up to the chosen answer rendered with the model's chat template
//! and the generation prompt, tokenized with the tokenizer's special-token rule; each answer is
//! tokenized without special tokens and followed by EOS — TRL's contract for prompt / completion
//! data, the same as `resonance score`.

use std::path::PathBuf;

use burn::tensor::{Tensor, TensorData};
use resonance_core::config::{Method, MethodConfig};
use resonance_core::data::{Conversation, RecordSource};
use resonance_models::processor::Processor;
use serde_json::Value;

use crate::error::{Result, TrainError};
pub use crate::logprobs::sequence_logps;
use crate::losses::{
    dpo_loss, kto_kl_estimate, kto_loss, orpo_odds_ratio_loss, simpo_loss, DpoLossConfig,
    DpoLossOutput, DpoLossType, KtoConfig, KtoLossType, SimpoConfig,
};
use crate::sft::Refusal;

/// One preference pair as token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct PairExample {
    /// Prompt ids (image tokens expanded).
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub images: Vec<PathBuf>,
    /// Unpaired (KTO) records: whether `chosen` is desirable.
    pub label: Option<bool>,
    /// Precomputed reference log-probs `[chosen, rejected]`, when the record has them.
    pub reference_logps: Option<[f64; 2]>,
    pub source: RecordSource,
}

/// Encodes a preference record. The answers are cut to fit `max_length`; a prompt that leaves
/// no room for an answer token is refused, as is one that `max_prompt_length` would cut
/// inside an image (a text-only prompt is cut from the left, as TRL keeps its end).
pub fn encode_pair(
    processor: &Processor,
    conversation: &Conversation,
    max_length: usize,
    max_prompt_length: Option<usize>,
) -> Result<std::result::Result<PairExample, Refusal>> {
    let record_error = |message: String| TrainError::Record {
        path: conversation.source.file.to_path_buf(),
        line: conversation.source.line,
        message,
    };
    // An unpaired (KTO) record has no rejected answer: its second sequence is filled in by
    // the trainer with another record's completion (the KL estimate's mismatched pair).
    let rejected = match (&conversation.rejected, conversation.label) {
        (Some(r), _) => Some(r.as_str()),
        (None, Some(_)) => None,
        (None, None) => {
            return Err(record_error(
                "not a preference record (no rejected answer or label)".into(),
            ))
        }
    };
    let (answer, context) = conversation
        .messages
        .split_last()
        .filter(|(last, _)| last.role == resonance_core::data::Role::Assistant)
        .ok_or_else(|| {
            record_error("a preference record must end with the chosen answer".into())
        })?;
    let template = match processor.template.as_ref() {
        Some(t) => t,
        None => {
            return Ok(Err(Refusal::Template(
                "the model has no chat template to render the prompt with".into(),
            )))
        }
    };
    let messages: Vec<Value> = context.iter().map(crate::sft::message_json).collect();
    let text = match template.render(&Value::Array(messages), true, None) {
        Ok(t) => t,
        Err(e) => return Ok(Err(Refusal::Template(e.to_string()))),
    };
    let mut prompt = processor.prompt_ids(&text, conversation.images.len())?;
    let image_id = processor.image_tokens.map(|(id, _)| id);
    if let Some(limit) = max_prompt_length {
        if prompt.len() > limit {
            let cut = prompt.len() - limit;
            if image_id.is_some_and(|id| prompt[..cut].contains(&id)) {
                return Ok(Err(Refusal::ImageTokensTruncated {
                    tokens: prompt.len(),
                    max_length: limit,
                }));
            }
            prompt.drain(..cut);
        }
    }
    if prompt.len() >= max_length {
        return Ok(Err(Refusal::NoAssistantTokens { max_length }));
    }
    let room = max_length - prompt.len();
    let mut chosen = processor.response_ids(&answer.text_content())?;
    let mut rejected = match rejected {
        Some(text) => processor.response_ids(text)?,
        None => Vec::new(),
    };
    if conversation.reference_logps.is_some() && (chosen.len() > room || rejected.len() > room) {
        return Ok(Err(Refusal::ReferenceTruncated { max_length }));
    }
    chosen.truncate(room);
    rejected.truncate(room);
    Ok(Ok(PairExample {
        prompt,
        chosen,
        rejected,
        images: conversation.images.clone(),
        label: conversation.label,
        reference_logps: conversation.reference_logps,
        source: conversation.source.clone(),
    }))
}

/// `2n` right-padded rows: the chosen sequences of `n` pairs, then their rejected sequences.
#[derive(Debug, Clone)]
pub struct PairBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<bool>>,
    /// `(position, token)` of each answer token (predicted from `position`).
    pub targets: Vec<Vec<(usize, u32)>>,
    /// The images of the `n` pairs, once.
    pub images: Vec<PathBuf>,
    pub pairs: usize,
}

impl PairBatch {
    pub fn collate(pairs: &[PairExample], pad_id: u32) -> Self {
        let rows: Vec<(&Vec<u32>, &Vec<u32>)> = pairs
            .iter()
            .map(|p| (&p.prompt, &p.chosen))
            .chain(pairs.iter().map(|p| (&p.prompt, &p.rejected)))
            .collect();
        let width = rows
            .iter()
            .map(|(p, a)| p.len() + a.len())
            .max()
            .unwrap_or(0);
        let mut batch = PairBatch {
            input_ids: Vec::new(),
            attention_mask: Vec::new(),
            targets: Vec::new(),
            images: pairs.iter().flat_map(|p| p.images.clone()).collect(),
            pairs: pairs.len(),
        };
        for (prompt, answer) in rows {
            let mut ids: Vec<u32> = prompt.iter().chain(answer.iter()).copied().collect();
            let n = ids.len();
            let targets = (prompt.len()..n).map(|p| (p - 1, ids[p])).collect();
            ids.resize(width, pad_id);
            let mut mask = vec![true; n];
            mask.resize(width, false);
            batch.input_ids.push(ids);
            batch.attention_mask.push(mask);
            batch.targets.push(targets);
        }
        batch
    }

    /// Answer lengths of the rows.
    pub fn lengths(&self) -> Vec<f32> {
        self.targets.iter().map(|t| t.len() as f32).collect()
    }

    pub fn num_tokens(&self) -> usize {
        self.attention_mask.iter().flatten().filter(|&&m| m).count()
    }

    /// DDPO's per-token weights of every row (chosen rows first, in the order of `targets`), from
    /// the diff of each pair's label rows at this batch's width (see [`ddpo_token_weights`]).
    /// Computed on the host, once per batch: the device only multiplies.
    pub fn ddpo_weights(&self) -> Vec<Vec<f32>> {
        let width = self.input_ids.first().map_or(0, Vec::len);
        let (chosen, rejected): (Vec<_>, Vec<_>) = (0..self.pairs)
            .map(|i| ddpo_token_weights(&self.targets[i], &self.targets[self.pairs + i], width))
            .unzip();
        chosen.into_iter().chain(rejected).collect()
    }
}

/// VL-RLHF's minimum size of a matching block that counts as shared (`trainer.py` l.176).
pub const DDPO_MIN_MATCH_SIZE: usize = 3;

/// The indices of `a` and of `b` that lie in modified spans, as VL-RLHF's `get_diff_ids`
/// (`src/vlrlhf/utils/diff_lib.py` l.116-180): difflib's matching blocks of
/// `SequenceMatcher(None, a, b)` (autojunk on), blocks shorter than `min_match_size` dropped
/// (l.121; the sentinel kept); the gaps before the kept blocks are the candidate spans (l.73-83),
/// and a gap is modified only when it is non-empty on **both** sides (l.152): a pure insertion or
/// deletion is not.
pub fn ddpo_modified_ids(a: &[u32], b: &[u32], min_match_size: usize) -> (Vec<usize>, Vec<usize>) {
    let blocks = crate::difflib::SequenceMatcher::new(a, b).get_matching_blocks();
    let (last, inner) = blocks
        .split_last()
        .expect("get_matching_blocks always ends with the sentinel");
    let mut out = (Vec::new(), Vec::new());
    let (mut ia, mut ib) = (0, 0);
    for m in inner
        .iter()
        .filter(|m| m.size >= min_match_size)
        .chain(std::iter::once(last))
    {
        if m.a > ia && m.b > ib {
            out.0.extend(ia..m.a);
            out.1.extend(ib..m.b);
        }
        (ia, ib) = (m.a + m.size, m.b + m.size);
    }
    out
}

/// DDPO's token weights of one pair, as VL-RLHF (TideDra/VL-RLHF @ e9737dc) computes them for
/// `loss_type="ddpo"`: 1 for an answer token in a modified span of the chosen/rejected diff, 0 for
/// every other token. Returned per answer token, in the order of `chosen` / `rejected`
/// (`(position, token)` targets of rows padded to `width` tokens).
///
/// `src/vlrlhf/base/trainer.py`, `VLDPOTrainer.get_batch_logps` (l.148-188, used when
/// `loss_type == "ddpo"`, l.233):
/// * l.160-166: the rows handed to the diff are the whole **shifted label rows of the padded
///   batch** (`width − 1` items: the label of position t is token t + 1), with the ignored
///   positions — prompt, image tokens and batch padding — set to token 0. The shared prompt zeros
///   and the padding zeros therefore take part in the matching: they can extend a short common
///   answer ending to the minimum block size, and a real token 0 can match them. Note the
///   consequence that the weights depend on the batch's width (its padding), exactly as there.
/// * l.176-182: `get_diff_ids(chosen_row, rejected_row, min_match_size=3)`
///   ([`ddpo_modified_ids`]) marks the modified indices;
/// * l.184: `loss_mask &= modified`: a token has weight 1 iff it is an answer token and modified.
///   Unchanged tokens get weight 0 (VL-RLHF does not use the RLHF-V paper's γ-weighting of changed
///   against unchanged tokens, nor its length normalisation);
/// * l.188: the sequence log-prob is the plain weighted sum (`average_log_prob=False`, l.230).
///
/// `fixtures/ddpo/generate.py` recomputes these weights from Python's difflib (and checks its own
/// code against VL-RLHF's `get_diff_ids`); the `ddpo_weights_match_vl_rlhf` test compares.
pub fn ddpo_token_weights(
    chosen: &[(usize, u32)],
    rejected: &[(usize, u32)],
    width: usize,
) -> (Vec<f32>, Vec<f32>) {
    // A label row is `width − 1` long; a target beyond it cannot come from `collate`, but
    // lengthen the rows rather than index out of bounds.
    let len = chosen
        .iter()
        .chain(rejected)
        .map(|&(pos, _)| pos + 1)
        .fold(width.saturating_sub(1), usize::max);
    let row = |targets: &[(usize, u32)]| {
        let mut row = vec![0u32; len];
        for &(pos, token) in targets {
            row[pos] = token;
        }
        row
    };
    let (a, b) = (row(chosen), row(rejected));
    let (mod_a, mod_b) = ddpo_modified_ids(&a, &b, DDPO_MIN_MATCH_SIZE);
    let weights = |targets: &[(usize, u32)], modified: Vec<usize>| {
        let mut mask = vec![false; len];
        for i in modified {
            mask[i] = true;
        }
        targets
            .iter()
            .map(|&(pos, _)| if mask[pos] { 1.0 } else { 0.0 })
            .collect()
    };
    (weights(chosen, mod_a), weights(rejected, mod_b))
}

/// The weighted loss configurations of a `[method]` section (one per `loss_type`).
pub fn loss_configs(method: &MethodConfig) -> Vec<(f64, DpoLossConfig)> {
    method
        .loss_type
        .0
        .iter()
        .enumerate()
        .map(|(i, &loss_type)| {
            let weight = method
                .loss_weights
                .as_ref()
                .and_then(|w| w.get(i).copied())
                .unwrap_or(1.0);
            let config = DpoLossConfig {
                loss_type,
                beta: method.beta,
                label_smoothing: method.label_smoothing,
                reference_free: method.reference_free,
                ..DpoLossConfig::default()
            };
            (weight, config)
        })
        .collect()
}

/// The DPO loss of a batch of `n` pairs from the policy's and the reference's row log-probs
/// (`[2n]`, chosen rows first), and TRL's metrics of it.
///
/// `ddpo`: the policy's and the reference's DDPO-weighted row log-probs (`[2n]`, see
/// [`PairBatch::ddpo_weights`]), required when a loss type is `ddpo`, which uses them instead of
/// the plain sums; the other types of a list keep the plain ones.
pub fn pair_loss(
    policy: Tensor<1>,
    reference: Tensor<1>,
    ddpo: Option<(Tensor<1>, Tensor<1>)>,
    lengths: &[f32],
    configs: &[(f64, DpoLossConfig)],
) -> Result<(DpoLossOutput, Vec<(&'static str, f64)>)> {
    let [rows] = policy.dims();
    let n = rows / 2;
    let device = policy.device();
    // (policy chosen, policy rejected, reference chosen, reference rejected)
    let split = |p: Tensor<1>, r: Tensor<1>| {
        (
            p.clone().narrow(0, 0, n),
            p.narrow(0, n, n),
            r.clone().narrow(0, 0, n),
            r.narrow(0, n, n),
        )
    };
    let plain = split(policy, reference);
    let dense = ddpo.map(|(p, r)| split(p, r));
    let lengths = Tensor::<1>::from_data(TensorData::new(lengths.to_vec(), [rows]), &device);
    let lengths = Some((lengths.clone().narrow(0, 0, n), lengths.narrow(0, n, n)));
    // Several loss types (MPO) add up with their weights; the rewards and logps logged are those
    // of the first type (for `ddpo` the weighted ones, which is what VL-RLHF logs).
    let mut out: Option<DpoLossOutput> = None;
    let mut logged: Option<(Tensor<1>, Tensor<1>)> = None;
    for (weight, config) in configs {
        let (pc, pr, rc, rr) = if config.loss_type == DpoLossType::Ddpo {
            dense.clone().ok_or_else(|| {
                TrainError::Input("loss type `ddpo` needs the DDPO-weighted log-probs".into())
            })?
        } else {
            plain.clone()
        };
        logged.get_or_insert_with(|| (pc.clone(), pr.clone()));
        let part = dpo_loss(pc, pr, rc, rr, lengths.clone(), config)
            .map_err(|e| TrainError::Input(e.to_string()))?;
        let weighted = part.losses.mul_scalar(*weight);
        out = Some(match out {
            Some(mut acc) => {
                acc.losses = acc.losses + weighted;
                acc
            }
            None => DpoLossOutput {
                losses: weighted,
                ..part
            },
        });
    }
    let (out, (pc, pr)) = out
        .zip(logged)
        .ok_or_else(|| TrainError::Input("method.loss_type is empty".into()))?;
    let metrics = reward_metrics(&out, pc, pr);
    Ok((out, metrics))
}

/// TRL's reward metrics of a pair loss: rewards/{chosen,rejected,accuracies,margins} and
/// logps/{chosen,rejected} (summed answer log-probs), batch means.
pub fn reward_metrics(
    out: &DpoLossOutput,
    policy_chosen: Tensor<1>,
    policy_rejected: Tensor<1>,
) -> Vec<(&'static str, f64)> {
    let read = |t: Tensor<1>| -> Vec<f32> {
        let [n] = t.dims();
        t.into_data()
            .try_into_vec::<f32>()
            .unwrap_or_else(|_| vec![f32::NAN; n])
    };
    let chosen = read(out.chosen_rewards.clone());
    let rejected = read(out.rejected_rewards.clone());
    let n = chosen.len().max(1) as f64;
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    let accuracy = chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count() as f64 / n;
    let margins: Vec<f32> = chosen.iter().zip(&rejected).map(|(c, r)| c - r).collect();
    vec![
        ("rewards/chosen", mean(&chosen)),
        ("rewards/rejected", mean(&rejected)),
        ("rewards/accuracies", accuracy),
        ("rewards/margins", mean(&margins)),
        ("logps/chosen", mean(&read(policy_chosen.detach()))),
        ("logps/rejected", mean(&read(policy_rejected.detach()))),
    ]
}

/// The token-mean negative log-likelihood of the chosen answers (TRL's `policy_nll_loss`) from
/// their summed log-probs and lengths.
pub fn chosen_nll(chosen_logps: Tensor<1>, chosen_lengths: &[f32]) -> Tensor<1> {
    let tokens: f32 = chosen_lengths.iter().sum();
    chosen_logps.sum().neg().div_scalar(tokens.max(1.0))
}

/// KTO on a batch of `n` unpaired examples: rows `0..n` are prompt + own completion, rows
/// `n..2n` prompt + another example's completion (for the KL estimate). Returns the micro-batch
/// loss (sum over its examples / `total_examples`) and TRL's metrics.
pub fn kto_batch_loss(
    method: &MethodConfig,
    policy: Tensor<1>,
    reference: Tensor<1>,
    desirable: &[bool],
    total_examples: f64,
) -> Result<(Tensor<1>, Vec<(&'static str, f64)>)> {
    let n = desirable.len();
    let (main, kl_rows) = (policy.clone().narrow(0, 0, n), policy.narrow(0, n, n));
    let (ref_main, ref_kl) = (reference.clone().narrow(0, 0, n), reference.narrow(0, n, n));
    let kl = kto_kl_estimate(kl_rows.detach(), ref_kl);
    let config = KtoConfig {
        loss_type: KtoLossType::Kto,
        beta: method.beta,
        desirable_weight: method.desirable_weight,
        undesirable_weight: method.undesirable_weight,
    };
    let out = kto_loss(main.clone(), ref_main, desirable, kl, &config)
        .map_err(|e| TrainError::Input(e.to_string()))?;
    let read = |t: Tensor<1>| -> Vec<f32> {
        t.into_data()
            .try_into_vec::<f32>()
            .unwrap_or_else(|_| vec![f32::NAN; n])
    };
    let rewards = read(out.rewards.clone());
    let logps = read(main.detach());
    let mean_where = |values: &[f32], want: bool| {
        let picked: Vec<f64> = values
            .iter()
            .zip(desirable)
            .filter(|(_, &d)| d == want)
            .map(|(&v, _)| v as f64)
            .collect();
        (!picked.is_empty()).then(|| picked.iter().sum::<f64>() / picked.len() as f64)
    };
    let mut metrics = vec![("kl", kl)];
    let chosen = mean_where(&rewards, true);
    let rejected = mean_where(&rewards, false);
    for (name, value) in [
        ("rewards/chosen", chosen),
        ("rewards/rejected", rejected),
        ("logps/chosen", mean_where(&logps, true)),
        ("logps/rejected", mean_where(&logps, false)),
    ] {
        if let Some(v) = value {
            metrics.push((name, v));
        }
    }
    if let (Some(c), Some(r)) = (chosen, rejected) {
        metrics.push(("rewards/margins", c - r));
    }
    Ok((out.losses.sum().div_scalar(total_examples), metrics))
}

/// The reference-free pair objectives on length-averaged answer log-probs (`[2n]` summed
/// log-probs and lengths, chosen rows first), as TRL's CPOTrainer (`simpo`) and ORPOTrainer
/// compute them. Returns the micro-batch loss to minimise (mean over its pairs, NLL terms
/// included) and the metrics.
pub fn reference_free_loss(
    method: &MethodConfig,
    policy: Tensor<1>,
    lengths: &[f32],
) -> Result<(Tensor<1>, Vec<(&'static str, f64)>)> {
    let [rows] = policy.dims();
    let n = rows / 2;
    let device = policy.device();
    let len = Tensor::<1>::from_data(
        TensorData::new(
            lengths.iter().map(|l| l.max(1.0)).collect::<Vec<_>>(),
            [rows],
        ),
        &device,
    );
    let average = policy.clone().div(len);
    let (ac, ar) = (average.clone().narrow(0, 0, n), average.narrow(0, n, n));
    let (pc, pr) = (policy.clone().narrow(0, 0, n), policy.narrow(0, n, n));
    let nll = chosen_nll(pc.clone(), &lengths[..n]);
    let invalid = |e: crate::losses::LossConfigError| TrainError::Input(e.to_string());
    match method.name {
        Method::Simpo => {
            let config = SimpoConfig {
                beta: method.beta,
                gamma: method.simpo_gamma,
                label_smoothing: method.label_smoothing,
            };
            let out = simpo_loss(ac, ar, &config).map_err(invalid)?;
            let mut metrics = reward_metrics(&out, pc, pr);
            let mut loss = out.losses.mean();
            if let Some(alpha) = method.rpo_alpha {
                metrics.push(("nll_loss", nll.clone().into_scalar::<f64>()));
                loss = loss + nll.mul_scalar(alpha);
            }
            Ok((loss, metrics))
        }
        Method::Orpo => {
            let out = orpo_odds_ratio_loss(ac, ar, method.beta).map_err(invalid)?;
            let as_dpo = DpoLossOutput {
                losses: out.losses.clone(),
                chosen_rewards: out.chosen_rewards.clone(),
                rejected_rewards: out.rejected_rewards.clone(),
            };
            let mut metrics = reward_metrics(&as_dpo, pc, pr);
            let ratio = out.losses.clone().mean();
            metrics.push(("nll_loss", nll.clone().into_scalar::<f64>()));
            metrics.push((
                "log_odds_ratio",
                ratio.clone().into_scalar::<f64>() / method.beta,
            ));
            metrics.push(("log_odds_chosen", out.log_odds.mean().into_scalar::<f64>()));
            Ok((nll - ratio, metrics))
        }
        other => Err(TrainError::Input(format!(
            "{other:?} is not a reference-free pair objective"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collate_puts_chosen_rows_first_and_targets_on_answers() {
        let source = RecordSource::new(PathBuf::from("p.jsonl"), 1);
        let pair = PairExample {
            prompt: vec![1, 5, 6],
            chosen: vec![7, 2],
            rejected: vec![8, 9, 2],
            images: vec![PathBuf::from("a.png")],
            label: None,
            reference_logps: None,
            source,
        };
        let batch = PairBatch::collate(&[pair], 0);
        assert_eq!(batch.input_ids[0], vec![1, 5, 6, 7, 2, 0]);
        assert_eq!(batch.input_ids[1], vec![1, 5, 6, 8, 9, 2]);
        assert_eq!(batch.targets[0], vec![(2, 7), (3, 2)]);
        assert_eq!(batch.targets[1], vec![(2, 8), (3, 9), (4, 2)]);
        assert_eq!(batch.lengths(), vec![2.0, 3.0]);
        assert_eq!(batch.images.len(), 1);
    }

    #[test]
    fn ddpo_weights_mark_the_replaced_word_only() {
        let source = RecordSource::new(PathBuf::from("p.jsonl"), 1);
        let pair = |chosen: Vec<u32>, rejected: Vec<u32>| PairExample {
            prompt: vec![1, 5, 6, 7],
            chosen,
            rejected,
            images: Vec::new(),
            label: None,
            reference_logps: None,
            source: source.clone(),
        };
        // "the cat sat on the mat </s>" vs "the dog sat on the mat </s>": one replaced word.
        let batch = PairBatch::collate(
            &[pair(
                vec![40, 41, 42, 43, 40, 44, 2],
                vec![40, 50, 42, 43, 40, 44, 2],
            )],
            0,
        );
        assert_eq!(
            batch.ddpo_weights(),
            vec![
                vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
            ]
        );
        // A common ending of two tokens is below the minimum block size: without padding after
        // it, it belongs to the modified span; in a wider batch the padding zeros extend it.
        let short = pair(vec![11, 12, 13, 2], vec![11, 20, 13, 2]);
        let alone = PairBatch::collate(std::slice::from_ref(&short), 0);
        assert_eq!(alone.ddpo_weights()[0], vec![0.0, 1.0, 1.0, 1.0]);
        let long = pair(
            vec![11, 12, 13, 14, 15, 16, 2],
            vec![11, 12, 13, 14, 15, 16, 2],
        );
        let padded = PairBatch::collate(&[short, long], 0);
        let w = padded.ddpo_weights();
        assert_eq!(w[0], vec![0.0, 1.0, 0.0, 0.0]);
        assert_eq!(w[2], vec![0.0, 1.0, 0.0, 0.0]);
        // Identical answers: nothing to learn from.
        assert!(w[1].iter().chain(&w[3]).all(|&x| x == 0.0));
        // A pure insertion is not a modification.
        assert_eq!(
            ddpo_modified_ids(&[1, 2, 3, 4, 5, 6], &[1, 2, 3, 9, 9, 4, 5, 6], 3),
            (vec![], vec![])
        );
    }

    #[test]
    fn ddpo_weights_match_vl_rlhf() {
        let e = crate::difflib::tests::fixture();
        let ids = |v: &Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let floats = |v: &Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        for case in e["difflib"].as_array().unwrap() {
            let (a, b) = (ids(&case["a"]), ids(&case["b"]));
            let (ma, mb) = ddpo_modified_ids(&a, &b, DDPO_MIN_MATCH_SIZE);
            let as_u32 = |v: Vec<usize>| v.into_iter().map(|i| i as u32).collect::<Vec<_>>();
            assert_eq!(as_u32(ma), ids(&case["modified_a"]), "{a:?} / {b:?}");
            assert_eq!(as_u32(mb), ids(&case["modified_b"]), "{a:?} / {b:?}");
        }
        let cases = e["weights"].as_array().unwrap();
        for case in cases {
            let prompt = case["prompt_len"].as_u64().unwrap() as usize;
            let width = case["width"].as_u64().unwrap() as usize;
            let targets = |answer: Vec<u32>| -> Vec<(usize, u32)> {
                answer
                    .into_iter()
                    .enumerate()
                    .map(|(k, t)| (prompt - 1 + k, t))
                    .collect()
            };
            let (wc, wr) = ddpo_token_weights(
                &targets(ids(&case["chosen"])),
                &targets(ids(&case["rejected"])),
                width,
            );
            assert_eq!(wc, floats(&case["chosen_weights"]), "{case}");
            assert_eq!(wr, floats(&case["rejected_weights"]), "{case}");
        }
        assert!(cases.len() >= 40);
    }
}
