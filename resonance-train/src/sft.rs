//! Supervised fine-tuning: conversations rendered with the model's chat template, the loss on
//! assistant tokens only, and the cross-entropy as a pure function.
//!
//! Which tokens are the assistant's is found from turn boundaries: for the `i`-th assistant
//! message, the conversation up to it is rendered with the generation prompt (`P`) and up to and
//! including it (`F`); the characters between `|P|` and `|F|` are that turn's, and every token
//! overlapping them is trained. This works with any template that renders a conversation
//! incrementally (each prefix of messages renders to a prefix of the full text), which is what
//! `{% generation %}` markers would express; a template that does not is refused.

use std::path::PathBuf;

use burn::tensor::Tensor;
use resonance_core::data::{Conversation, Message, Part, RecordSource};
use resonance_models::processor::Processor;
use serde_json::{json, Value};

use crate::error::{Result, TrainError};
use crate::logprobs::sequence_logps;

/// One conversation as token ids with its trained positions.
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    /// Token ids, image tokens expanded.
    pub input_ids: Vec<u32>,
    /// `true` where the token is an assistant token (its prediction is trained).
    pub trained: Vec<bool>,
    /// Image files, in image-token order.
    pub images: Vec<PathBuf>,
    pub source: RecordSource,
}

impl SftExample {
    /// The number of trained tokens.
    pub fn num_trained(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

/// Why a record cannot become a training example.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{tokens} tokens exceed data.max_length = {max_length} and truncating would cut image tokens"
    )]
    ImageTokensTruncated { tokens: usize, max_length: usize },
    #[error("no assistant token is left within data.max_length = {max_length}")]
    NoAssistantTokens { max_length: usize },
    #[error("{0}")]
    Template(String),
    #[error(
        "data.max_length = {max_length} cuts an answer, so the record's precomputed reference \
         log-probs (ref_chosen_logps / ref_rejected_logps) no longer fit it"
    )]
    ReferenceTruncated { max_length: usize },
}

impl Refusal {
    /// A short name for counting refusals.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::ImageTokensTruncated { .. } => "image tokens truncated",
            Refusal::NoAssistantTokens { .. } => "no assistant tokens",
            Refusal::Template(_) => "chat template",
            Refusal::ReferenceTruncated { .. } => "precomputed reference truncated",
        }
    }
}

/// A message as chat templates take it: a plain string when it has no image, else a list of
/// `{"type": "image"}` / `{"type": "text", "text": ...}` parts.
pub fn message_json(message: &Message) -> Value {
    let content = if message.num_images() == 0 {
        Value::String(message.text_content())
    } else {
        Value::Array(
            message
                .content
                .iter()
                .map(|part| match part {
                    Part::Image => json!({"type": "image"}),
                    Part::Text(text) => json!({"type": "text", "text": text}),
                })
                .collect(),
        )
    };
    json!({"role": message.role.as_str(), "content": content})
}

/// The full rendered text and the byte spans of the assistant turns in it.
pub fn render_with_assistant_spans(
    processor: &Processor,
    conversation: &Conversation,
) -> std::result::Result<(String, Vec<(usize, usize)>), Refusal> {
    let template = processor.template.as_ref().ok_or_else(|| {
        Refusal::Template(
            "the model has no chat template (chat_template.jinja, chat_template.json or \
             tokenizer_config.json); SFT needs one to place the turns"
                .into(),
        )
    })?;
    let messages: Vec<Value> = conversation.messages.iter().map(message_json).collect();
    let render = |n: usize, generation_prompt: bool| {
        template
            .render(
                &Value::Array(messages[..n].to_vec()),
                generation_prompt,
                None,
            )
            .map_err(|e| Refusal::Template(e.to_string()))
    };
    let full = render(messages.len(), false)?;
    let mut spans = Vec::new();
    for (i, message) in conversation.messages.iter().enumerate() {
        if message.role != resonance_core::data::Role::Assistant {
            continue;
        }
        let prompt = render(i, true)?;
        let upto = render(i + 1, false)?;
        if !upto.starts_with(&prompt) || !full.starts_with(&upto) {
            return Err(Refusal::Template(format!(
                "the chat template does not render turn {} as a continuation of the earlier \
                 turns, so the assistant tokens cannot be located",
                i + 1
            )));
        }
        spans.push((prompt.len(), upto.len()));
    }
    Ok((full, spans))
}

/// Renders, tokenizes and masks one conversation; refuses it (instead of silently dropping
/// image tokens) when `max_length` would cut into an image.
pub fn encode_conversation(
    processor: &Processor,
    conversation: &Conversation,
    max_length: usize,
) -> Result<std::result::Result<SftExample, Refusal>> {
    let (text, spans) = match render_with_assistant_spans(processor, conversation) {
        Ok(r) => r,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let (ids, offsets) = processor
        .tokenizer
        .encode_with_offsets(&text, true)
        .map_err(resonance_models::ModelError::from)?;
    let image_token = processor.image_tokens;
    let n_images = conversation.images.len();
    let found = match image_token {
        Some((id, _)) => ids.iter().filter(|&&t| t == id).count(),
        None => 0,
    };
    if found != n_images {
        return Err(TrainError::Record {
            path: conversation.source.file.to_path_buf(),
            line: conversation.source.line,
            message: format!(
                "the rendered conversation has {found} image token(s) but the record has \
                 {n_images} image(s)"
            ),
        });
    }
    let mut input_ids = Vec::with_capacity(ids.len());
    let mut trained = Vec::with_capacity(ids.len());
    for (&id, &(start, end)) in ids.iter().zip(&offsets) {
        match image_token {
            Some((image_id, per_image)) if id == image_id => {
                input_ids.extend(std::iter::repeat_n(id, per_image));
                trained.extend(std::iter::repeat_n(false, per_image));
            }
            _ => {
                let in_turn = end > start && spans.iter().any(|&(s, e)| start < e && end > s);
                input_ids.push(id);
                trained.push(in_turn);
            }
        }
    }
    if input_ids.len() > max_length {
        let cuts_image = image_token
            .map(|(image_id, _)| input_ids[max_length..].contains(&image_id))
            .unwrap_or(false);
        if cuts_image {
            return Ok(Err(Refusal::ImageTokensTruncated {
                tokens: input_ids.len(),
                max_length,
            }));
        }
        input_ids.truncate(max_length);
        trained.truncate(max_length);
    }
    // The first token is never predicted.
    if let Some(first) = trained.first_mut() {
        *first = false;
    }
    if !trained.iter().any(|&t| t) {
        return Ok(Err(Refusal::NoAssistantTokens { max_length }));
    }
    Ok(Ok(SftExample {
        input_ids,
        trained,
        images: conversation.images.clone(),
        source: conversation.source.clone(),
    }))
}

/// A padded micro-batch.
#[derive(Debug, Clone)]
pub struct SftBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<bool>>,
    /// `(position, token)`: the token at `position + 1` is predicted from `position`.
    pub targets: Vec<Vec<(usize, u32)>>,
    pub images: Vec<PathBuf>,
}

impl SftBatch {
    /// Right-pads the examples to the longest.
    pub fn collate(examples: &[SftExample], pad_id: u32) -> Self {
        let width = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0);
        let mut batch = SftBatch {
            input_ids: Vec::new(),
            attention_mask: Vec::new(),
            targets: Vec::new(),
            images: Vec::new(),
        };
        for e in examples {
            let n = e.input_ids.len();
            let mut ids = e.input_ids.clone();
            ids.resize(width, pad_id);
            let mut mask = vec![true; n];
            mask.resize(width, false);
            let targets = (1..n)
                .filter(|&p| e.trained[p])
                .map(|p| (p - 1, e.input_ids[p]))
                .collect();
            batch.input_ids.push(ids);
            batch.attention_mask.push(mask);
            batch.targets.push(targets);
            batch.images.extend(e.images.iter().cloned());
        }
        batch
    }

    /// The number of trained tokens.
    pub fn num_targets(&self) -> usize {
        self.targets.iter().map(Vec::len).sum()
    }

    /// The number of real (non-pad) tokens.
    pub fn num_tokens(&self) -> usize {
        self.attention_mask.iter().flatten().filter(|&&m| m).count()
    }
}

/// The summed negative log-likelihood of `targets` under `logits` divided by `normalizer`:
/// `-Σ log p(token | prefix) / normalizer`. With `normalizer` the number of trained tokens of the
/// whole (accumulated) batch this is transformers' token-averaged causal-LM loss.
pub fn sft_loss(logits: Tensor<3>, targets: &[Vec<(usize, u32)>], normalizer: f64) -> Tensor<1> {
    sequence_logps(logits, targets)
        .sum()
        .neg()
        .div_scalar(normalizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn loss_is_the_mean_nll_of_the_targets() {
        let device = Device::flex();
        let logits = Tensor::<3>::from_data(
            TensorData::new(vec![0.0f32, 1.0, 2.0, 3.0, 3.0, 3.0], [1, 2, 3]),
            &device,
        );
        let loss = sft_loss(logits, &[vec![(0, 2), (1, 0)]], 2.0).into_scalar::<f32>();
        let z0 = (1.0f32 + 1f32.exp() + 2f32.exp()).ln();
        let want = -((2.0 - z0) + (1.0f32 / 3.0).ln()) / 2.0;
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
    }

    #[test]
    fn collate_pads_right_and_shifts_targets() {
        let source = RecordSource::new(std::path::PathBuf::from("x.json"), 1);
        let a = SftExample {
            input_ids: vec![1, 10, 11, 2],
            trained: vec![false, false, true, true],
            images: vec![],
            source: source.clone(),
        };
        let b = SftExample {
            input_ids: vec![1, 12],
            trained: vec![false, true],
            images: vec![],
            source,
        };
        let batch = SftBatch::collate(&[a, b], 0);
        assert_eq!(batch.input_ids[1], vec![1, 12, 0, 0]);
        assert_eq!(batch.attention_mask[1], vec![true, true, false, false]);
        assert_eq!(batch.targets[0], vec![(1, 11), (2, 2)]);
        assert_eq!(batch.targets[1], vec![(0, 12)]);
        assert_eq!(batch.num_targets(), 3);
        assert_eq!(batch.num_tokens(), 6);
    }
}
