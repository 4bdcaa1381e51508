//! A batch split into shards that run on separate threads gives the whole batch's loss and
//! gradients (up to the order of float sums), and its image encodings are counted on the thread
//! that asked for them.

use std::path::PathBuf;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use resonance_models::llava::model::Llava;
use resonance_models::llava::weights::load_llava;
use resonance_models::registry::{Images, ModelInputs};
use resonance_models::trainable::TrainableModel;
use resonance_models::vision::clip::vision_tower_calls;
use resonance_train::logprobs::compact_targets;
use resonance_train::params::prepare_params;
use resonance_train::sft::sft_loss;
use resonance_train::shards::{shard_ranges, sharded_gradients};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

const ROWS: usize = 5;
const IMAGE_TOKENS: usize = 25;
const IMAGE_TOKEN: u32 = 4;
const SIZE: usize = 30;

/// Row `r`: BOS, the image tokens, then text; rows end at different lengths (right padding)
/// and train on different numbers of tokens.
/// Token ids, attention mask and `(position, token)` targets per row.
type Batch = (Vec<Vec<u32>>, Vec<Vec<bool>>, Vec<Vec<(usize, u32)>>);

fn batch() -> Batch {
    let width = 1 + IMAGE_TOKENS + 12;
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut targets = Vec::new();
    for r in 0..ROWS {
        let len = width - r;
        let mut row = vec![1u32];
        row.extend(std::iter::repeat_n(IMAGE_TOKEN, IMAGE_TOKENS));
        row.extend((0..len - row.len()).map(|t| 10 + ((r * 37 + t * 11) % 480) as u32));
        let prompt = 1 + IMAGE_TOKENS + 2 + r % 3;
        targets.push((prompt..len).map(|p| (p - 1, row[p])).collect());
        mask.push((0..width).map(|p| p < len).collect());
        row.resize(width, 3);
        ids.push(row);
    }
    (ids, mask, targets)
}

fn pixels(rows: std::ops::Range<usize>, device: &Device) -> Tensor<4> {
    let n = rows.len();
    let values: Vec<f32> = rows
        .flat_map(|r| {
            (0..3 * SIZE * SIZE).map(move |i| ((r * 131 + i * 7) % 255) as f32 / 127.5 - 1.0)
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [n, 3, SIZE, SIZE]), device)
}

/// Every parameter's gradient in `a` against `b`: the largest difference relative to the
/// gradient's largest magnitude.
struct Compare<'a> {
    a: &'a GradientsParams,
    b: &'a GradientsParams,
    worst: f32,
    compared: usize,
}

impl ModuleVisitor for Compare<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let (Some(a), Some(b)) = (self.a.get::<D>(param.id), self.b.get::<D>(param.id)) else {
            assert!(
                self.a.get::<D>(param.id).is_none() && self.b.get::<D>(param.id).is_none(),
                "a parameter has a gradient in one run only"
            );
            return;
        };
        let a = a.into_data().try_to_vec::<f32>().unwrap();
        let b = b.into_data().try_to_vec::<f32>().unwrap();
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        self.worst = self.worst.max(diff / scale);
        self.compared += 1;
    }
}

#[test]
fn shards_give_the_whole_batch_loss_and_gradients() {
    let device = Device::flex().autodiff();
    let (model, _config) = load_llava(&root().join("fixtures/tiny-llava"), &device).unwrap();
    let trained =
        |path: &str| Llava::component_of(path) != resonance_models::trainable::Component::Vision;
    let model = prepare_params(model, &trained);
    let (ids, mask, targets) = batch();
    let normalizer = targets.iter().map(Vec::len).sum::<usize>() as f64;

    let run = |shards: usize| {
        let calls = vision_tower_calls();
        let (losses, grads) =
            sharded_gradients(&model, &device, shard_ranges(ROWS, shards), |m, rows| {
                let (positions, targets) = compact_targets(&targets[rows.clone()]);
                let logits = m.target_logits(
                    ModelInputs {
                        input_ids: &ids[rows.clone()],
                        attention_mask: &mask[rows.clone()],
                        images: Some(Images::Pixels(pixels(rows, &device))),
                    },
                    1,
                    &positions,
                    &device,
                )?;
                let loss = sft_loss(logits, &targets, normalizer);
                let value = loss.clone().into_scalar::<f64>();
                Ok((loss, value))
            })
            .unwrap();
        assert_eq!(losses.len(), shards);
        assert_eq!(
            vision_tower_calls() - calls,
            shards,
            "each shard's encoding is counted on the calling thread"
        );
        (losses.iter().sum::<f64>(), grads)
    };

    let (whole_loss, whole) = run(1);
    assert!(
        whole_loss.is_finite() && whole_loss > 1.0,
        "loss {whole_loss}"
    );
    for shards in [2, 3, ROWS] {
        let (loss, grads) = run(shards);
        assert!(
            (loss - whole_loss).abs() <= 1e-6 * whole_loss,
            "{shards} shards: loss {loss} against {whole_loss}"
        );
        let mut compare = Compare {
            a: &whole,
            b: &grads,
            worst: 0.0,
            compared: 0,
        };
        model.visit(&mut compare);
        assert!(compare.compared > 10, "only {} gradients", compare.compared);
        assert!(
            compare.worst <= 1e-5,
            "{shards} shards: gradients differ by {} of their scale",
            compare.worst
        );
        // The same shards give the same bits again.
        let (again, _) = run(shards);
        assert_eq!(
            again.to_bits(),
            loss.to_bits(),
            "{shards} shards: not reproducible"
        );
    }
}
