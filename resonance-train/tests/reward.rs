//! Reward models end to end on the tiny LLaVA and the demo preference pairs.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use resonance_core::config::{ExperimentConfig, RankingLoss};
use resonance_models::processor::Processor;
use resonance_models::registry::AnyModel;
use resonance_models::vision::clip::vision_tower_calls;
use resonance_train::losses::ranking_loss;
use resonance_train::score::{reward_records, ScoreRecord};
use resonance_train::trainer::{merge_lora, train, TrainOptions, TrainSummary};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Training runs share the process-wide RNG and the vision-call counter: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn demo_config(out: &Path) -> ExperimentConfig {
    let mut cfg = ExperimentConfig::load(root().join("configs/demo_reward.toml"), &[] as &[&str])
        .expect("the demo config loads");
    for d in cfg
        .data
        .datasets
        .iter_mut()
        .chain(cfg.data.eval_datasets.iter_mut())
    {
        d.path = root().join(&d.path);
        d.image_root = d.image_root.as_ref().map(|r| root().join(r));
    }
    cfg.model.path = root().join(&cfg.model.path).display().to_string();
    cfg.train.output_dir = out.to_path_buf();
    cfg
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn run(config: &ExperimentConfig) -> TrainSummary {
    train(config, &TrainOptions::default(), &Device::flex()).expect("trains")
}

fn mean(m: &[serde_json::Value], key: &str) -> f64 {
    m.iter().map(|l| l[key].as_f64().unwrap()).sum::<f64>() / m.len() as f64
}

/// The held-out pairs as `score` records, chosen answers first then rejected ones.
fn heldout_records() -> Vec<ScoreRecord> {
    let text = std::fs::read_to_string(root().join("data/demo/reward/heldout.jsonl")).unwrap();
    let pairs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let record = |p: &serde_json::Value, answer: &str| ScoreRecord {
        image: Some(p["image"].as_str().unwrap().to_string()),
        images: None,
        prompt: p["prompt"].as_str().unwrap().to_string(),
        response: p[answer].as_str().unwrap().to_string(),
        id: None,
    };
    pairs
        .iter()
        .map(|p| record(p, "chosen"))
        .chain(pairs.iter().map(|p| record(p, "rejected")))
        .collect()
}

fn rewards_of(model_dir: &Path, records: &[ScoreRecord]) -> Vec<f64> {
    let device = Device::flex();
    let model = AnyModel::load(model_dir, &device).expect("the export loads");
    let processor = Processor::from_dir(model_dir, &model).unwrap();
    reward_records(
        &model,
        model_dir,
        &processor,
        records,
        &root().join("data/demo/sft/images"),
        8,
        &device,
        |_| {},
    )
    .expect("scores")
    .iter()
    .map(|r| r.reward)
    .collect()
}

#[test]
fn demo_reward_model_ranks_held_out_pairs_and_its_export_scores_the_same() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().unwrap();
    let cfg = demo_config(out.path());
    let summary = run(&cfg);
    let m = metrics(out.path());
    assert_eq!(m.len() as u64, summary.global_step);
    for key in [
        "accuracy",
        "margin",
        "min_reward",
        "mean_reward",
        "max_reward",
    ] {
        assert!(m[0][key].is_number(), "{key} missing: {}", m[0]);
    }
    // A fresh head gives nearly equal rewards: the loss starts at about ln 2.
    assert!((m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 0.05);
    let (first, last) = (&m[..40], &m[m.len() - 40..]);
    assert!(
        mean(last, "loss") < mean(first, "loss") - 0.2,
        "loss {} -> {}",
        mean(first, "loss"),
        mean(last, "loss")
    );
    assert!(
        mean(last, "accuracy") > 0.85,
        "train accuracy {}",
        mean(last, "accuracy")
    );
    // Held-out pairs (wrong answers never seen rejected for their image): well above chance.
    let final_line = m.last().unwrap();
    let eval_accuracy = final_line["eval_accuracy"].as_f64().unwrap();
    assert!(eval_accuracy >= 0.65, "eval_accuracy {eval_accuracy}");
    assert!(final_line["eval_margin"].as_f64().unwrap() > 0.5);

    // The exported reward model (HF layout, value head `score.weight`) scores the held-out pairs
    // through `score --reward`'s code path with the same ranking as the evaluation.
    let final_dir = summary.final_dir.expect("a final export");
    let header = std::fs::read(final_dir.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&header).unwrap();
    let head = tensors
        .tensor("score.weight")
        .expect("the value head is exported");
    assert_eq!(head.shape()[0], 1);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(final_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["id2label"]["0"], "LABEL_0");
    let records = heldout_records();
    let rewards = rewards_of(&final_dir, &records);
    let n = records.len() / 2;
    let correct = (0..n).filter(|&i| rewards[i] > rewards[n + i]).count();
    assert!(
        (correct as f64 / n as f64 - eval_accuracy).abs() < 1e-9,
        "scored accuracy {} vs eval_accuracy {eval_accuracy}",
        correct as f64 / n as f64
    );
}

#[test]
fn lora_reward_model_encodes_each_image_once_and_merges_with_its_head() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(out.path());
    cfg.data.eval_datasets.clear();
    cfg.train.eval_every = 0;
    cfg.lora.enabled = true;
    cfg.lora.apply_to_vision = true;
    cfg.train.epochs = Some(1);
    cfg.train.freeze_projector = Some(true);
    let before = vision_tower_calls();
    let summary = run(&cfg);
    let calls = vision_tower_calls() - before;
    // One encoding of the batch's images per step serves both answers of every pair.
    assert_eq!(calls as u64, summary.global_step);

    let final_dir = summary.final_dir.expect("a final export");
    let adapter: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(final_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter["task_type"], "SEQ_CLS");
    let saved: Vec<String> = adapter["modules_to_save"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(saved.iter().any(|s| s.ends_with("score")), "{saved:?}");

    let merged = out.path().join("merged");
    merge_lora(
        &root().join("fixtures/tiny-llava").display().to_string(),
        &final_dir,
        &merged,
        &Device::flex(),
    )
    .expect("merges");
    let records = heldout_records();
    let rewards = rewards_of(&merged, &records[..4]);
    assert!(rewards.iter().all(|r| r.is_finite()));
    // The trained head was merged, not a fresh one: two loads give the same rewards.
    assert_eq!(rewards, rewards_of(&merged, &records[..4]));
}

#[test]
fn reward_scoring_refuses_a_model_without_a_value_head() {
    let dir = root().join("fixtures/tiny-llava");
    let device = Device::flex();
    let model = AnyModel::load(&dir, &device).unwrap();
    let processor = Processor::from_dir(&dir, &model).unwrap();
    let err = reward_records(
        &model,
        &dir,
        &processor,
        &heldout_records()[..1],
        &root().join("data/demo/sft/images"),
        1,
        &device,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("score.weight"), "{err}");
}

fn lists(values: &[&[f64]]) -> Tensor<2> {
    let k = values[0].len();
    let flat: Vec<f32> = values
        .iter()
        .flat_map(|l| l.iter().map(|&v| v as f32))
        .collect();
    Tensor::from_data(TensorData::new(flat, [values.len(), k]), &Device::flex())
}

fn losses(rewards: Tensor<2>, kind: RankingLoss) -> Vec<f32> {
    ranking_loss(rewards, kind)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

fn neg_log_sigmoid(x: f64) -> f64 {
    (1.0 + (-x).exp()).ln()
}

#[test]
fn ranking_losses_match_their_formulas() {
    // Two answers: both losses are Bradley-Terry, −logσ(r_c − r_r).
    let pairs = lists(&[&[1.5, -0.25], &[-2.0, 0.75]]);
    for kind in [RankingLoss::Pairwise, RankingLoss::PlackettLuce] {
        let got = losses(pairs.clone(), kind);
        for (g, (c, r)) in got.iter().zip([(1.5, -0.25), (-2.0, 0.75)]) {
            assert!(
                (*g as f64 - neg_log_sigmoid(c - r)).abs() < 1e-6,
                "{kind:?}"
            );
        }
    }
    // Three answers, best first.
    let r = [0.5f64, 2.0, -1.0];
    let got = losses(lists(&[&r]), RankingLoss::Pairwise)[0] as f64;
    let want = (neg_log_sigmoid(r[0] - r[1])
        + neg_log_sigmoid(r[0] - r[2])
        + neg_log_sigmoid(r[1] - r[2]))
        / 3.0;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    let lse = |xs: &[f64]| xs.iter().map(|x| x.exp()).sum::<f64>().ln();
    let got = losses(lists(&[&r]), RankingLoss::PlackettLuce)[0] as f64;
    let want = (lse(&r) - r[0]) + (lse(&r[1..]) - r[1]);
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // Large rewards stay finite (the log-sum-exp is shifted).
    let got = losses(lists(&[&[300.0, 0.0, -300.0]]), RankingLoss::PlackettLuce)[0];
    assert!(got.is_finite() && got.abs() < 1e-3, "{got}");
}

#[test]
fn ranked_lists_train_with_plackett_luce_and_one_image_encoding_per_list() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(out.path());
    cfg.data.eval_datasets.clear();
    cfg.train.eval_every = 0;
    cfg.data.datasets[0].path = root().join("data/demo/reward/ranked.jsonl");
    cfg.data.datasets[0].format = resonance_core::data::DataFormat::Ranked;
    cfg.method.ranking_loss = RankingLoss::PlackettLuce;
    cfg.train.epochs = Some(15);
    let before = vision_tower_calls();
    let summary = run(&cfg);
    let calls = vision_tower_calls() - before;
    // Three answers per list, one encoding of the batch's images per step.
    assert_eq!(calls as u64, summary.global_step);
    let m = metrics(out.path());
    // Nearly equal rewards at the start: −log(1/3) − log(1/2) = ln 6.
    assert!(
        (m[0]["loss"].as_f64().unwrap() - 6f64.ln()).abs() < 0.1,
        "{}",
        m[0]
    );
    let (first, last) = (&m[..10], &m[m.len() - 10..]);
    assert!(
        mean(last, "loss") < mean(first, "loss") - 0.5,
        "loss {} -> {}",
        mean(first, "loss"),
        mean(last, "loss")
    );
    // Accuracy counts the 3 ordered pairs of every list.
    assert!(mean(last, "accuracy") > 0.8, "{}", mean(last, "accuracy"));
}

/// Rewards of `model_dir`'s model on the fixture batch, pooled as the trainer pools.
fn fixture_rewards(model_dir: &Path, ids: &[Vec<u32>], mask: &[Vec<bool>]) -> Vec<f32> {
    use resonance_models::registry::ModelInputs;
    use resonance_models::trainable::TrainableModel;
    let device = Device::flex();
    let AnyModel::Text(model, _) = AnyModel::load(model_dir, &device).expect("loads") else {
        panic!("a text model");
    };
    let values = model
        .values_grouped(
            ModelInputs {
                input_ids: ids,
                attention_mask: mask,
                images: None,
            },
            1,
            &device,
        )
        .unwrap();
    let pad = resonance_train::reward::config_pad_token_id(model_dir).unwrap();
    let pool: Vec<usize> = ids
        .iter()
        .zip(mask)
        .map(|(row, m)| {
            let len = m.iter().filter(|&&v| v).count();
            resonance_train::reward::pool_position(&row[..len], pad)
        })
        .collect();
    resonance_train::reward::pooled_rewards(values, &pool)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

#[test]
fn transformers_sequence_classifier_rewards_match_and_export_round_trips() {
    let fixture = root().join("fixtures/reward");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).unwrap())
            .unwrap();
    let ids: Vec<Vec<u32>> = expected["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let mask: Vec<Vec<bool>> = expected["attention_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64() == Some(1))
                .collect()
        })
        .collect();
    let want: Vec<f64> = expected["rewards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // A transformers `LlamaForSequenceClassification` (no lm_head, `score.weight`) loads as a
    // reward model and gives transformers' rewards, EOS-final and pad-inside rows included.
    let model_dir = fixture.join("tiny-llama-reward");
    let got = fixture_rewards(&model_dir, &ids, &mask);
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-4, "{got:?} vs {want:?}");
    }

    // Exported again, it keeps transformers' layout and gives the same rewards.
    let device = Device::flex();
    let AnyModel::Text(model, _) = AnyModel::load(&model_dir, &device).unwrap() else {
        panic!("a text model");
    };
    let out = tempfile::tempdir().unwrap();
    resonance_train::checkpoint::save_hf_model(&*model, &model_dir, out.path()).unwrap();
    let bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = tensors.names().into_iter().map(String::from).collect();
    assert!(names.iter().any(|n| n == "score.weight"));
    assert!(!names.iter().any(|n| n.starts_with("lm_head")), "{names:?}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(fixture_rewards(out.path(), &ids, &mask), got);
}
