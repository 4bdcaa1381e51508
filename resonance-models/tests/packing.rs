//! Shared-prefix packing gives the hidden states (and gradients) of the rows it packs: LLaVA
//! with its image in the shared prefix, Mistral with a sliding window shorter than the prefix,
//! and Llama under autodiff; and the last decoder layer run at wanted outputs only, packed or
//! not.

mod common;

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use resonance_models::packing::SharedPrefixPacking;
use resonance_models::registry::{AnyModel, Images, ModelInputs};
use resonance_models::text::model::{select_rows, CausalLm};
use resonance_models::trainable::TrainableModel;

/// `copies` groups of right-padded rows: example `i`'s copy `g` is `prefixes[i]` followed by
/// `answers[g][i]`.
fn grouped_rows(
    prefixes: &[Vec<u32>],
    answers: &[Vec<Vec<u32>>],
) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let rows: Vec<Vec<u32>> = answers
        .iter()
        .flat_map(|copy| {
            prefixes
                .iter()
                .zip(copy)
                .map(|(p, a)| p.iter().chain(a).copied().collect())
        })
        .collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mask = rows
        .iter()
        .map(|r| (0..width).map(|j| j < r.len()).collect())
        .collect();
    let ids = rows
        .into_iter()
        .map(|mut r| {
            r.resize(width, 0);
            r
        })
        .collect();
    (ids, mask)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data")
}

/// Largest difference of `[rows, width, hidden]` states over the real tokens.
fn max_diff_on_tokens(a: Tensor<3>, b: Tensor<3>, mask: &[Vec<bool>]) -> f32 {
    let hidden = a.dims()[2];
    let (a, b) = (values(a), values(b));
    let mut worst = 0.0f32;
    for (pos, real) in mask.iter().flatten().enumerate() {
        if *real {
            for h in 0..hidden {
                let i = pos * hidden + h;
                worst = worst.max((a[i] - b[i]).abs());
            }
        }
    }
    worst
}

/// `got` equals the non-zero gradient `expected` to 1e-5 of its largest entry (or absolutely).
fn assert_same_gradient(name: &str, got: &[f32], expected: &[f32]) {
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(expected)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(scale > 0.0, "{name}: no gradient");
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "{name}: {diff} (scale {scale})"
    );
}

/// A text-only fixture model.
/// Normal random weights `[rows, width, hidden]`, zero where `counted` (`rows × width`, 1 or
/// 0) is 0: a fixed weighting of hidden states that a loss reads only where counted.
fn counted_weights(
    counted: Vec<f32>,
    [rows, width, hidden]: [usize; 3],
    device: &Device,
) -> Tensor<3> {
    let counted = Tensor::<3>::from_data(TensorData::new(counted, [rows, width, 1]), device);
    Tensor::<3>::random(
        [rows, width, hidden],
        Distribution::Normal(0.0, 1.0),
        device,
    ) * counted
}

fn text_model(name: &str, device: &Device) -> CausalLm {
    match AnyModel::load(&common::fixtures().join(name), device) {
        Ok(AnyModel::Text(m, _)) => *m,
        other => panic!("{name} should load as a causal LM: {:?}", other.err()),
    }
}

/// The packed forward against the rows as they are, and the packing actually taken; the same
/// with outputs wanted at some positions only.
fn compare<M: TrainableModel>(
    model: &M,
    ids: &[Vec<u32>],
    mask: &[Vec<bool>],
    copies: usize,
    pixels: Option<Tensor<4>>,
    device: &Device,
) -> f32 {
    let plan = SharedPrefixPacking::plan(ids, mask, copies, model.image_token_id())
        .expect("these rows share enough to be packed");
    assert!(plan.packed_positions() < ids.len() * ids[0].len());
    let inputs = |pixel_values| ModelInputs {
        input_ids: ids,
        attention_mask: mask,
        images: Images::pixels(pixel_values),
    };
    let packed = model
        .hidden_grouped(inputs(pixels.clone()), copies, None, device)
        .expect("packed forward");
    let rows = model
        .hidden_rows(inputs(pixels.clone()), copies, None, None, device)
        .expect("forward of the rows");
    assert_eq!(packed.dims(), rows.dims());
    let mut worst = max_diff_on_tokens(packed, rows.clone(), mask);

    // Outputs at some real tokens of each row (a different number per row, shared-prefix
    // positions among them): the last layer run at those positions only, packed and not,
    // against the full states taken there.
    let outputs: Vec<Vec<usize>> = mask
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let real = row.iter().filter(|&&m| m).count();
            (0..real).filter(|j| (j + r) % 3 == 0).collect()
        })
        .collect();
    let expected = select_rows(rows, &outputs);
    let wanted: Vec<Vec<bool>> = outputs
        .iter()
        .map(|row| (0..expected.dims()[1]).map(|j| j < row.len()).collect())
        .collect();
    let packed_at = model
        .hidden_grouped(inputs(pixels.clone()), copies, Some(&outputs), device)
        .expect("packed forward at the outputs");
    let rows_at = model
        .hidden_rows(inputs(pixels), copies, None, Some(&outputs), device)
        .expect("forward of the rows at the outputs");
    assert_eq!(packed_at.dims(), expected.dims());
    assert_eq!(rows_at.dims(), expected.dims());
    worst = worst.max(max_diff_on_tokens(packed_at, expected.clone(), &wanted));
    worst.max(max_diff_on_tokens(rows_at, expected, &wanted))
}

/// Two LLaVA pairs whose image and prompt are shared (pair 0's answers share their first two
/// tokens too; pair 1's rejected answer is the longer): packed against the rows on `device`.
fn llava_pairs_difference(device: &Device) -> f32 {
    device.seed(5);
    let model = match AnyModel::load(&common::fixtures().join("tiny-llava"), device) {
        Ok(AnyModel::Llava(m, _)) => *m,
        other => panic!("tiny-llava should load as LLaVA: {:?}", other.err()),
    };
    let image = |text: &[u32]| -> Vec<u32> {
        let mut row = vec![1];
        row.extend(std::iter::repeat_n(4, 25));
        row.extend_from_slice(text);
        row
    };
    let prefixes = [image(&[10, 11, 12]), image(&[20, 21])];
    let answers = [
        vec![vec![30, 31, 32, 33], vec![40, 41]],
        vec![vec![30, 31, 50], vec![42, 43, 44, 45, 46]],
    ];
    let (ids, mask) = grouped_rows(&prefixes, &answers);
    let pixels = Tensor::<4>::random([2, 3, 30, 30], Distribution::Normal(0.0, 1.0), device);
    compare(&model, &ids, &mask, 2, Some(pixels), device)
}

#[test]
fn llava_pairs_with_the_image_in_the_shared_prefix() {
    let diff = llava_pairs_difference(&Device::flex());
    assert!(diff < 1e-5, "packed vs rows: {diff}");
}

/// Burn's own attention (wgpu) takes the packed mask as the CPU kernel does.
#[cfg(feature = "wgpu")]
#[test]
fn llava_pairs_pack_on_wgpu() {
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    let diff = llava_pairs_difference(&device);
    assert!(diff < 1e-4, "packed vs rows on wgpu: {diff}");
}

#[test]
fn sliding_windows_count_positions_not_packed_indices() {
    let device = Device::flex();
    let model = text_model("tiny-mistral", &device);
    // A window of 4 tokens: the answers' first tokens see the end of the prompt only.
    let prefixes = [vec![1, 5, 6, 7, 8, 9, 10, 11], vec![1, 12, 13, 14, 15, 16]];
    let answers = [
        vec![vec![20, 21, 22, 23, 24], vec![30]],
        vec![vec![25, 26], vec![31, 32, 33, 34, 35, 36]],
        vec![vec![27, 28, 29], vec![37, 38]],
    ];
    let (ids, mask) = grouped_rows(&prefixes, &answers);
    let diff = compare(&model, &ids, &mask, 3, None, &device);
    assert!(diff < 1e-5, "packed vs rows: {diff}");
}

#[test]
fn gradients_through_the_shared_prefix_sum_over_the_copies() {
    let device = Device::flex().autodiff();
    device.seed(11);
    let model = text_model("tiny-llama", &device);
    let prefixes = [
        vec![1, 5, 6, 7, 8, 9, 10],
        vec![1, 12, 13, 14, 15, 16, 17, 18],
    ];
    let answers = [
        vec![vec![20, 21, 22], vec![30, 31]],
        vec![vec![20, 26], vec![33, 34, 35, 36]],
    ];
    let (ids, mask) = grouped_rows(&prefixes, &answers);
    let [rows, width] = [ids.len(), ids[0].len()];
    let hidden_size = model.model.norm.gamma.dims()[0];
    // A fixed random weighting of the real tokens' states: the loss both paths differentiate.
    let real: Vec<f32> = mask
        .iter()
        .flatten()
        .map(|&m| f32::from(u8::from(m)))
        .collect();
    let weights = counted_weights(real, [rows, width, hidden_size], &device);
    let inputs = || ModelInputs {
        input_ids: &ids,
        attention_mask: &mask,
        images: None,
    };
    let grads_of = |hidden: Tensor<3>| {
        let grads = (hidden * weights.clone()).sum().backward();
        let layer = &model.model.layers[0];
        let q = values(
            layer
                .self_attn
                .q_proj
                .weight
                .val()
                .grad(&grads)
                .expect("tracked"),
        );
        let embed = values(
            model
                .model
                .embed_tokens
                .weight
                .val()
                .grad(&grads)
                .expect("tracked"),
        );
        (q, embed)
    };
    let packed = grads_of(model.hidden_grouped(inputs(), 2, None, &device).unwrap());
    let rows = grads_of(model.hidden_rows(inputs(), 2, None, None, &device).unwrap());
    for (name, a, b) in [
        ("q_proj", &packed.0, &rows.0),
        ("embed_tokens", &packed.1, &rows.1),
    ] {
        assert_same_gradient(name, a, b);
    }
}

/// Outputs wanted at some positions only (the last layer run there alone), packed or not, give
/// the gradients the full forward gives when the loss reads those positions.
#[test]
fn outputs_at_some_positions_give_the_full_gradients() {
    let device = Device::flex().autodiff();
    device.seed(13);
    let model = text_model("tiny-llama", &device);
    let prefixes = [vec![1, 5, 6, 7, 8, 9, 10], vec![1, 12, 13, 14, 15, 16, 17]];
    let answers = [
        vec![vec![20, 21, 22], vec![30, 31]],
        vec![vec![20, 26], vec![33, 34, 35, 36]],
    ];
    let (ids, mask) = grouped_rows(&prefixes, &answers);
    // The answer tokens' predecessors, as a loss over the answers reads them.
    let outputs: Vec<Vec<usize>> = mask
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let real = row.iter().filter(|&&m| m).count();
            (prefixes[r % 2].len() - 1..real - 1).collect()
        })
        .collect();
    let k = outputs.iter().map(Vec::len).max().unwrap_or(1);
    let hidden_size = model.model.norm.gamma.dims()[0];
    let wanted: Vec<f32> = outputs
        .iter()
        .flat_map(|row| (0..k).map(move |j| f32::from(u8::from(j < row.len()))))
        .collect();
    let weights = counted_weights(wanted, [ids.len(), k, hidden_size], &device);
    let inputs = || ModelInputs {
        input_ids: &ids,
        attention_mask: &mask,
        images: None,
    };
    let grads_of = |hidden: Tensor<3>| {
        let grads = (hidden * weights.clone()).sum().backward();
        let last = model.model.layers.last().expect("layers");
        [
            last.self_attn.q_proj.weight.val(),
            last.self_attn.k_proj.weight.val(),
            last.mlp.down_proj.weight.val(),
            model.model.layers[0].self_attn.v_proj.weight.val(),
            model.model.embed_tokens.weight.val(),
        ]
        .map(|w| values(w.grad(&grads).expect("tracked")))
    };
    let full = grads_of(select_rows(
        model.hidden_rows(inputs(), 2, None, None, &device).unwrap(),
        &outputs,
    ));
    let at_rows = grads_of(
        model
            .hidden_rows(inputs(), 2, None, Some(&outputs), &device)
            .unwrap(),
    );
    let packed = grads_of(
        model
            .hidden_grouped(inputs(), 2, Some(&outputs), &device)
            .unwrap(),
    );
    let names = [
        "last q_proj",
        "last k_proj",
        "last down_proj",
        "first v_proj",
        "embed",
    ];
    for (got, path) in [(&at_rows, "rows"), (&packed, "packed")] {
        for ((name, a), b) in names.iter().zip(got).zip(&full) {
            assert_same_gradient(&format!("{path} {name}"), a, b);
        }
    }
}
