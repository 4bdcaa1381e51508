//! What a trainer needs from a model, whatever its architecture.

use burn::module::Module;
use burn::tensor::{Device, FloatDType, Tensor};

use crate::error::{ModelError, Result};
use crate::llava::model::Llava;
use crate::nn::attention::PackedLayout;
use crate::nn::linear::LinearLayers;
use crate::packing::SharedPrefixPacking;
use crate::registry::ModelInputs;
use crate::text::model::{CausalLm, DecoderInputs};

/// The parts of a vision-language model that are frozen, trained or adapted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    /// The image encoder (`vision_tower`).
    Vision,
    /// The vision-to-text projector (`multi_modal_projector`).
    Projector,
    /// The language model.
    Language,
    /// A reward model's value head (`score`); always trained in full.
    Head,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Vision => "vision",
            Component::Projector => "projector",
            Component::Language => "lm",
            Component::Head => "head",
        }
    }
}

/// A model the training loop can run: a Burn module with LoRA-targetable linear layers, a
/// forward from token ids (and pixels) to logits, and a split of its parameters into
/// [`Component`]s by module path. `Sync`: the shards of a batch run on several threads and read
/// a frozen reference model side by side.
pub trait TrainableModel: Module + LinearLayers + Sized + Sync {
    /// The component a parameter (or module) path belongs to.
    fn component_of(path: &str) -> Component;

    /// The path prefix (regex-escaped, with the trailing dot) of a component's parameters, or
    /// `None` when this architecture has no such component (a text-only model has no tower).
    fn component_prefix(component: Component) -> Option<&'static str>;

    /// Final hidden states `[b, t, hidden]` of a batch whose rows come in `copies` groups of
    /// `n` rows: row `g·n + i` belongs to example `i`, and `pixel_values` holds the images of
    /// the `n` examples once. Each image is encoded once and its features serve every copy
    /// (the chosen and rejected answers of a pair, or the candidates of a ranked list); the
    /// tokens an example's copies share at their start are run once when that saves work
    /// ([`SharedPrefixPacking`]). Positions past a row's last real token hold no meaningful
    /// state. With `outputs`, only the states at `outputs[r]` of each row, `[b, k, hidden]` as
    /// [`select_rows`](crate::text::model::select_rows) takes them, and the last decoder layer
    /// runs at those positions only ([`DecoderInputs::outputs`]).
    fn hidden_grouped(
        &self,
        inputs: ModelInputs,
        copies: usize,
        outputs: Option<&[Vec<usize>]>,
        device: &Device,
    ) -> Result<Tensor<3>> {
        let packing = SharedPrefixPacking::plan(
            inputs.input_ids,
            inputs.attention_mask,
            copies,
            self.image_token_id(),
        );
        let Some(packing) = packing else {
            return self.hidden_rows(inputs, copies, None, outputs, device);
        };
        let packed = ModelInputs {
            input_ids: &packing.input_ids,
            attention_mask: &packing.attention_mask,
            images: inputs.images,
        };
        let layout = Some(&packing.layout);
        match outputs {
            Some(outputs) => {
                let plan = packing.pack_outputs(outputs);
                let hidden = self.hidden_rows(packed, 1, layout, Some(&plan.positions), device)?;
                Ok(plan.regroup(hidden))
            }
            None => Ok(packing.unpack(self.hidden_rows(packed, 1, layout, None, device)?)),
        }
    }

    /// Final hidden states of the rows as they are: `copies` groups as in
    /// [`TrainableModel::hidden_grouped`] without packing, or, with a `packed` layout, packed
    /// rows (one per example, `copies` = 1) at the layout's positions and segments; with
    /// `outputs`, at those positions of each row only.
    fn hidden_rows(
        &self,
        inputs: ModelInputs,
        copies: usize,
        packed: Option<&PackedLayout>,
        outputs: Option<&[Vec<usize>]>,
        device: &Device,
    ) -> Result<Tensor<3>>;

    /// The token id whose positions take image features, for a multimodal model.
    fn image_token_id(&self) -> Option<u32>;

    /// The features `[n, tokens, hidden]` the decoder takes for the images `pixels`, to pass as
    /// [`Images::Encoded`](crate::registry::Images::Encoded) to several forward passes; an error
    /// for a text-only model.
    fn encode_images(&self, pixels: Tensor<4>) -> Result<Tensor<3>>;

    /// This architecture's model out of a loaded checkpoint, or `None` for another architecture.
    fn from_any(model: crate::registry::AnyModel) -> Option<Self>;

    /// The decoder that turns hidden states into logits and values.
    fn decoder(&self) -> &CausalLm;

    /// The decoder, mutably (to attach a value head).
    fn decoder_mut(&mut self) -> &mut CausalLm;

    /// Sets the dtype activations are computed in (see [`crate::nn::precision`]); the
    /// parameters' own dtypes are set separately.
    fn set_compute_dtype(&mut self, dtype: FloatDType) {
        self.decoder_mut().compute_dtype = dtype;
    }

    /// Logits `[b, t, vocab]` of a batch.
    fn forward_inputs(&self, inputs: ModelInputs, device: &Device) -> Result<Tensor<3>> {
        Ok(self
            .decoder()
            .logits(self.hidden_grouped(inputs, 1, None, device)?))
    }

    /// Logits `[b, k, vocab]` of a grouped batch (see [`TrainableModel::hidden_grouped`]; a
    /// preference batch is `copies` = 2, its chosen rows then its rejected rows) at
    /// `positions[r]` of each row only (as [`CausalLm::logits_at`] takes them): what a loss over
    /// answer tokens needs, without the last decoder layer's and the head's work and memory at
    /// every other position.
    fn target_logits(
        &self,
        inputs: ModelInputs,
        copies: usize,
        positions: &[Vec<usize>],
        device: &Device,
    ) -> Result<Tensor<3>> {
        let hidden = self.hidden_grouped(inputs, copies, Some(positions), device)?;
        Ok(self.decoder().logits(hidden))
    }

    /// Per-token values `[b, t]` of the value head on a grouped batch (see
    /// [`TrainableModel::hidden_grouped`]).
    fn values_grouped(
        &self,
        inputs: ModelInputs,
        copies: usize,
        device: &Device,
    ) -> Result<Tensor<2>> {
        let hidden = self.hidden_grouped(inputs, copies, None, device)?;
        self.decoder()
            .values(hidden)
            .ok_or_else(|| ModelError::Input("the model has no value head (`score`)".into()))
    }

    /// `(regex, replacement)` renames from module paths to the tensor names transformers writes
    /// in `model.safetensors` for this architecture.
    fn checkpoint_renames() -> Vec<(&'static str, &'static str)>;

    /// `(regex, replacement)` renames from module paths to transformers' in-memory module names
    /// (what PEFT prefixes with `base_model.model.` in adapter files).
    fn module_renames() -> Vec<(&'static str, &'static str)>;
}

/// The decoder's inputs for rows as they are or packed.
fn decoder_inputs<'a>(
    attention_mask: &'a [Vec<bool>],
    packed: Option<&'a PackedLayout>,
    outputs: Option<&'a [Vec<usize>]>,
) -> DecoderInputs<'a> {
    DecoderInputs {
        attention_mask,
        positions: packed.map(|layout| layout.positions.as_slice()),
        segments: packed.map(|layout| layout.segments.as_slice()),
        outputs,
    }
}

/// Applies `(regex, replacement)` renames in order to a path.
pub fn rename_path(path: &str, renames: &[(&str, &str)]) -> String {
    let mut out = path.to_string();
    for (pattern, replacement) in renames {
        if let Ok(re) = regex::Regex::new(pattern) {
            out = re.replace(&out, *replacement).into_owned();
        }
    }
    out
}

impl TrainableModel for CausalLm {
    fn component_of(path: &str) -> Component {
        if path == "score" || path.starts_with("score.") {
            Component::Head
        } else {
            Component::Language
        }
    }

    fn component_prefix(component: Component) -> Option<&'static str> {
        match component {
            Component::Language => Some(""),
            Component::Head => Some("score."),
            _ => None,
        }
    }

    fn hidden_rows(
        &self,
        inputs: ModelInputs,
        _copies: usize,
        packed: Option<&PackedLayout>,
        outputs: Option<&[Vec<usize>]>,
        device: &Device,
    ) -> Result<Tensor<3>> {
        if inputs.images.is_some() {
            return Err(ModelError::text_only());
        }
        let embeds = self.embed(inputs.input_ids, device);
        let inputs = decoder_inputs(inputs.attention_mask, packed, outputs);
        Ok(self.hidden_states(embeds, &inputs, None))
    }

    fn image_token_id(&self) -> Option<u32> {
        None
    }

    fn encode_images(&self, _pixels: Tensor<4>) -> Result<Tensor<3>> {
        Err(ModelError::text_only())
    }

    fn from_any(model: crate::registry::AnyModel) -> Option<Self> {
        match model {
            crate::registry::AnyModel::Text(m, _) => Some(*m),
            _ => None,
        }
    }

    fn decoder(&self) -> &CausalLm {
        self
    }

    fn decoder_mut(&mut self) -> &mut CausalLm {
        self
    }

    fn checkpoint_renames() -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }

    fn module_renames() -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }
}

impl TrainableModel for Llava {
    fn component_of(path: &str) -> Component {
        if path.starts_with("language_model.score.") || path == "language_model.score" {
            Component::Head
        } else if path.starts_with("vision_tower.") || path == "vision_tower" {
            Component::Vision
        } else if path.starts_with("multi_modal_projector.") || path == "multi_modal_projector" {
            Component::Projector
        } else {
            Component::Language
        }
    }

    fn component_prefix(component: Component) -> Option<&'static str> {
        Some(match component {
            Component::Vision => "vision_tower.",
            Component::Projector => "multi_modal_projector.",
            Component::Language => "language_model.",
            Component::Head => "language_model.score.",
        })
    }

    fn hidden_rows(
        &self,
        inputs: ModelInputs,
        copies: usize,
        packed: Option<&PackedLayout>,
        outputs: Option<&[Vec<usize>]>,
        device: &Device,
    ) -> Result<Tensor<3>> {
        let features = inputs.images.map(|images| {
            let once = self.features_of(images);
            Tensor::cat(vec![once; copies.max(1)], 0)
        });
        let embeds = self.embeddings_with_features(inputs.input_ids, features, device)?;
        let inputs = decoder_inputs(inputs.attention_mask, packed, outputs);
        Ok(self.language_model.hidden_states(embeds, &inputs, None))
    }

    fn image_token_id(&self) -> Option<u32> {
        Some(self.settings.image_token_id)
    }

    fn encode_images(&self, pixels: Tensor<4>) -> Result<Tensor<3>> {
        Ok(self.image_features(pixels))
    }

    fn from_any(model: crate::registry::AnyModel) -> Option<Self> {
        match model {
            crate::registry::AnyModel::Llava(m, _) => Some(*m),
            _ => None,
        }
    }

    fn decoder(&self) -> &CausalLm {
        &self.language_model
    }

    fn decoder_mut(&mut self) -> &mut CausalLm {
        &mut self.language_model
    }

    fn checkpoint_renames() -> Vec<(&'static str, &'static str)> {
        // transformers 5 writes LLaVA in the 4.x layout, with the CLIP tower unwrapped; a value
        // head is written at the top level, where `*ForSequenceClassification` models keep it.
        vec![
            (r"^vision_tower\.vision_model\.", "vision_tower."),
            (r"^language_model\.score\.", "score."),
        ]
    }

    fn module_renames() -> Vec<(&'static str, &'static str)> {
        vec![
            (r"^language_model\.model\.", "model.language_model."),
            (r"^language_model\.lm_head", "lm_head"),
            (r"^language_model\.score", "score"),
            (r"^vision_tower\.vision_model\.", "model.vision_tower."),
            (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        ]
    }
}
