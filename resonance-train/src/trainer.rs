//! The training loop: config → model (+ LoRA) → batches → loss → AdamW with per-group learning
//! rates → checkpoints that resume exactly.
//!
//! The loop is written on Burn's optimizer pieces (`ModuleOptimizer` with parameter groups,
//! `ModuleLrScheduler`, `GradientsAccumulator`) rather than `burn::train::Learner`: exact resume
//! needs the position in our dataset mixture, the preference methods need paired batches, and
//! gradient clipping must be global (PyTorch's `clip_grad_norm_`) rather than per tensor.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::ParamGroup;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::optim::lr_scheduler::LrSchedulerRecord;
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, FloatDType, Tensor};
use burn_store::ModuleSnapshot;
use indicatif::{ProgressBar, ProgressStyle};
use resonance_core::config::Method;
use resonance_core::config::{
    Dtype, ExperimentConfig, GroupTraining, StopAt, TargetModules, TrainableGroups,
};
use resonance_core::data::{Conversation, Dataset, MixtureSampler, OnError, SampleRef};
use resonance_models::load::resolve_model;
use resonance_models::nn::linear::{AdaptersDisabled, LoraSpec};
use resonance_models::nn::precision::{cast_params_where, ensure_supported};
use resonance_models::processor::Processor;
use resonance_models::registry::{AnyModel, Images, ModelInputs};
use resonance_models::trainable::{Component, TrainableModel};
use serde_json::json;

use crate::adamw::FusedAdamW;
use crate::checkpoint::{
    list_checkpoints, load_trainable, rotate_checkpoints, save_hf_model, save_peft_adapter,
    save_trainable, write_dir_atomically, AdapterConfig, TrainerState, OPTIMIZER_STATE,
    SCHEDULER_STATE, TRAINABLE_WEIGHTS, TRAINER_STATE,
};
use crate::error::{Result, TrainError};
use crate::params::{
    clip_grad_norm, is_lora_path, param_table, parameters_by_dtype, prepare_params,
};
use crate::reward::RankedBatch;
use crate::schedule::WarmupSchedule;
use crate::sft::{encode_conversation, sft_loss, Refusal, SftBatch};
use crate::shards::{shard_count, shard_ranges, sharded_gradients};

/// Linear layers LoRA targets under `target_modules = "auto"`.
pub const AUTO_LM_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
pub const AUTO_VISION_TARGETS: [&str; 6] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

/// Where to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest `checkpoint-*` of the run directory.
    Latest,
    /// A given checkpoint directory.
    Dir(PathBuf),
}

/// Options of one `train` invocation that are not part of the experiment.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub resume: Option<Resume>,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop (as if interrupted) after this many optimizer steps, without the final export.
    pub stop_after: Option<u64>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    /// `(step, loss)` of every step of the run, including those before a resume.
    pub losses: Vec<(u64, f64)>,
    pub global_step: u64,
    pub total_steps: u64,
    /// The exported model or adapter, when the run finished.
    pub final_dir: Option<PathBuf>,
    /// Mean wall time of the steps run by this invocation, and their token throughput.
    pub mean_step_seconds: f64,
    pub tokens_per_second: f64,
    pub refused: BTreeMap<String, usize>,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
    /// Parameter elements per storage dtype (`"f32"`, `"bf16"`, …); under half precision the
    /// frozen ones are in the half dtype.
    pub parameters_by_dtype: BTreeMap<String, usize>,
}

/// Trains `config` on `device` (the autodiff wrapper is added here).
pub fn train(
    config: &ExperimentConfig,
    options: &TrainOptions,
    device: &Device,
) -> Result<TrainSummary> {
    config
        .validate()
        .map_err(|e| TrainError::Input(e.to_string()))?;
    let model_dir = resolve_model(&config.model.path)?;
    let mut device = device.clone().autodiff();
    if config.train.gradient_checkpointing {
        device = device.gradient_checkpointing();
    }
    let model = AnyModel::load(&model_dir, &device)?;
    let processor = Processor::from_dir(&model_dir, &model)?;
    let context = RunContext {
        config,
        options,
        model_dir: &model_dir,
        processor: &processor,
        device: &device,
    };
    match model {
        AnyModel::Text(model, _) => run(*model, &context),
        AnyModel::Llava(model, _) => run(*model, &context),
    }
}

struct RunContext<'a> {
    config: &'a ExperimentConfig,
    options: &'a TrainOptions,
    model_dir: &'a Path,
    processor: &'a Processor,
    device: &'a Device,
}

fn group_of(groups: &TrainableGroups, component: Component) -> GroupTraining {
    match component {
        Component::Vision => groups.vision,
        Component::Projector => groups.projector,
        Component::Language => groups.lm,
        // A reward model's value head is new: it always trains (PEFT's `modules_to_save`).
        Component::Head => GroupTraining::Full,
    }
}

/// Attaches LoRA adapters to the targeted layers of the components trained with LoRA; returns
/// the layer names adapted.
pub fn attach_lora<M: TrainableModel>(
    model: &mut M,
    config: &ExperimentConfig,
    device: &Device,
) -> Result<Vec<String>> {
    let groups = config.trainable_groups();
    let lora = &config.lora;
    let spec = LoraSpec {
        rank: lora.rank,
        alpha: lora.alpha,
        dropout: lora.dropout,
        quantize_base: lora.qlora,
    };
    let mut adapted = Vec::new();
    model.visit_linears("", &mut |path, linear| {
        let component = M::component_of(path);
        if group_of(&groups, component) != GroupTraining::Lora {
            return;
        }
        let name = path.rsplit('.').next().unwrap_or(path);
        let targeted = match &lora.target_modules {
            TargetModules::Auto => match component {
                Component::Vision => AUTO_VISION_TARGETS.contains(&name),
                Component::Language => AUTO_LM_TARGETS.contains(&name),
                Component::Projector | Component::Head => false,
            },
            TargetModules::Names(names) => names.iter().any(|n| n == name || n == path),
        };
        if targeted {
            linear.attach_lora(&spec, device);
            adapted.push(path.to_string());
        }
    });
    if lora.enabled && adapted.is_empty() {
        return Err(TrainError::Input(format!(
            "lora.target_modules = {:?} matches no linear layer of the model",
            lora.target_modules
        )));
    }
    Ok(adapted)
}

/// The path prefixes of the components trained in full (`""` for a model that is all LM); the
/// value head only for a reward model (`reward`).
fn full_component_prefixes<M: TrainableModel>(
    groups: &TrainableGroups,
    reward: bool,
) -> Vec<&'static str> {
    [
        Component::Vision,
        Component::Projector,
        Component::Language,
        Component::Head,
    ]
    .into_iter()
    .filter(|&c| c != Component::Head || reward)
    .filter(|&c| group_of(groups, c) == GroupTraining::Full)
    .filter_map(M::component_prefix)
    .collect()
}

/// The regexes of the parameters a run trains (LoRA factors and fully trained components).
fn trained_regexes<M: TrainableModel>(groups: &TrainableGroups, reward: bool) -> Vec<String> {
    let mut out = vec![r"\.lora\.lora_[ab]$".to_string()];
    out.extend(
        full_component_prefixes::<M>(groups, reward)
            .into_iter()
            .map(|prefix| format!("^{}", regex::escape(prefix))),
    );
    out
}

/// The optimizer: AdamW, without weight decay on biases and norm weights (as transformers'
/// `Trainer` groups them). [`FusedAdamW`] is Burn's AdamW with a one-pass update on the CPU.
pub fn build_optimizer(config: &ExperimentConfig) -> Result<ModuleOptimizer> {
    let o = &config.optim;
    let adamw = FusedAdamW::new(
        o.betas[0] as f32,
        o.betas[1] as f32,
        o.eps as f32,
        o.weight_decay as f32,
    );
    let no_decay = ParamGroup::from_regex(r"(\.bias|\.gamma|\.beta)$")
        .map_err(|e| TrainError::Input(format!("{e:?}")))?;
    let no_decay_adamw = adamw.with_weight_decay(0.0);
    Ok(ModuleOptimizer::from(adamw).with_group(no_decay, no_decay_adamw, None))
}

fn build_scheduler<M: TrainableModel>(
    config: &ExperimentConfig,
    warmup: u64,
    total: u64,
) -> Result<ModuleLrScheduler> {
    let kind = config.schedule.kind;
    let (vision, projector, lm) = config.optim.group_lrs();
    let mut scheduler =
        ModuleLrScheduler::new(WarmupSchedule::new(config.optim.lr, kind, warmup, total));
    for (component, lr) in [
        (Component::Vision, vision),
        (Component::Projector, projector),
        (Component::Language, lm),
    ] {
        if let Some(prefix) = M::component_prefix(component).filter(|p| !p.is_empty()) {
            let group = ParamGroup::from_regex(format!("^{}", regex::escape(prefix)))
                .map_err(|e| TrainError::Input(format!("{e:?}")))?;
            scheduler = scheduler.with_group(group, WarmupSchedule::new(lr, kind, warmup, total));
        }
    }
    Ok(scheduler)
}

/// Total optimizer steps of the run.
pub fn total_steps(config: &ExperimentConfig, num_samples: usize) -> u64 {
    let per_step = (config.train.batch_size * config.train.grad_accumulation).max(1);
    match config.train.stop_at() {
        StopAt::Steps(n) => n,
        StopAt::Epochs(e) => (num_samples * e as usize).div_ceil(per_step) as u64,
    }
}

/// Draws records of the datasets in mixture order across epochs, and counts the refused ones.
struct SampleStream<'a> {
    sampler: &'a MixtureSampler,
    datasets: &'a [Dataset],
    epoch: u64,
    index: usize,
    order: Vec<SampleRef>,
    /// Records refused so far, by reason.
    refused: BTreeMap<String, usize>,
}

impl<'a> SampleStream<'a> {
    fn new(
        sampler: &'a MixtureSampler,
        datasets: &'a [Dataset],
        epoch: u64,
        index: usize,
        refused: BTreeMap<String, usize>,
    ) -> Self {
        SampleStream {
            sampler,
            datasets,
            epoch,
            index,
            order: sampler.epoch(epoch),
            refused,
        }
    }

    fn next_sample(&mut self) -> SampleRef {
        if self.index >= self.order.len() {
            self.epoch += 1;
            self.index = 0;
            self.order = self.sampler.epoch(self.epoch);
        }
        let s = self.order[self.index];
        self.index += 1;
        s
    }

    /// Draws and encodes records until `count` examples are ready; refused records are counted
    /// (never silently truncated), or stop the run under `data.on_error = "fail"`.
    fn next_items<T>(
        &mut self,
        on_error: OnError,
        count: usize,
        encode: impl Fn(&Conversation) -> Result<std::result::Result<T, Refusal>>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(count);
        let mut attempts = 0usize;
        let limit = self.order.len().max(1) * 2 + count;
        while out.len() < count {
            attempts += 1;
            if attempts > limit {
                return Err(TrainError::Input(format!(
                    "every record drawn was refused ({:?}); check data.max_length and the data",
                    self.refused
                )));
            }
            let sample = self.next_sample();
            let conversation = &self.datasets[sample.dataset].records[sample.record];
            match encode(conversation)? {
                Ok(example) => out.push(example),
                Err(refusal) => {
                    if on_error == OnError::Fail {
                        return Err(TrainError::Record {
                            path: conversation.source.file.to_path_buf(),
                            line: conversation.source.line,
                            message: format!(
                                "{refusal} (set data.on_error = \"skip\" to skip such records)"
                            ),
                        });
                    }
                    tracing::warn!("{}: skipped: {refusal}", conversation.source);
                    *self.refused.entry(refusal.kind().to_string()).or_insert(0) += 1;
                }
            }
        }
        Ok(out)
    }
}

/// The dropout seed of one optimizer step.
fn step_seed(seed: u64, step: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(step.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

fn run<M>(mut model: M, context: &RunContext) -> Result<TrainSummary>
where
    M: TrainableModel + ModuleSnapshot + Clone,
{
    let config = context.config;
    let device = context.device;
    let run_dir = config.train.output_dir.clone();
    fs::create_dir_all(&run_dir).map_err(|source| TrainError::Io {
        path: run_dir.clone(),
        source,
    })?;
    let groups = config.trainable_groups();

    // Resume point.
    let resume_dir = match &context.options.resume {
        None => None,
        Some(Resume::Dir(dir)) => Some(dir.clone()),
        Some(Resume::Latest) => match list_checkpoints(&run_dir).pop() {
            Some((_, dir)) => Some(dir),
            None => {
                return Err(TrainError::Checkpoint(format!(
                    "--resume: no checkpoint-* directory with a {TRAINER_STATE} in {}",
                    run_dir.display()
                )))
            }
        },
    };
    let state: Option<TrainerState> = match &resume_dir {
        Some(dir) => {
            let path = dir.join(TRAINER_STATE);
            let text = fs::read_to_string(&path).map_err(|source| TrainError::Io {
                path: path.clone(),
                source,
            })?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?,
            )
        }
        None => None,
    };

    // Model: a value head for a reward model, adapters, then the trained weights of the
    // checkpoint, then ids and gradients.
    device.seed(config.train.seed);
    if config.method.name == Method::Reward && model.decoder().score.is_none() {
        let std = crate::reward::initializer_range(context.model_dir)?;
        model.decoder_mut().attach_value_head(std, device);
    }
    let adapted = attach_lora(&mut model, config, device)?;
    if let Some(dir) = &resume_dir {
        load_trainable(&mut model, &dir.join(TRAINABLE_WEIGHTS))?;
    }
    let trained = |path: &str| {
        if is_lora_path(path) {
            return true;
        }
        group_of(&groups, M::component_of(path)) == GroupTraining::Full
    };
    let model = prepare_params(model, &trained);
    let dtype = float_dtype(config.model.dtype);
    let mut model = apply_precision(
        model,
        dtype,
        device,
        &trained,
        &format!("model.dtype = {:?}", config.model.dtype),
    )?;
    let table = param_table(&model);
    let parameters_by_dtype = parameters_by_dtype(&table);
    let total_parameters: usize = table.values().map(|p| p.numel).sum();
    let trainable_parameters: usize = table
        .iter()
        .filter(|(path, _)| trained(path))
        .map(|(_, p)| p.numel)
        .sum();
    if trainable_parameters == 0 {
        return Err(TrainError::Input(
            "nothing to train: every group is frozen (see train.freeze_* and [lora])".into(),
        ));
    }
    tracing::info!(
        "trainable parameters: {trainable_parameters} of {total_parameters} ({:.2}%); LoRA on {} layers",
        100.0 * trainable_parameters as f64 / total_parameters as f64,
        adapted.len()
    );
    tracing::info!("parameters by dtype: {parameters_by_dtype:?}");

    // Data.
    let datasets = config
        .data
        .load_datasets()
        .map_err(|e| TrainError::Input(e.to_string()))?;
    for d in &datasets {
        if d.report.skipped_total() > 0 {
            tracing::warn!(
                "{}: {} record(s) skipped while loading",
                d.path.display(),
                d.report.skipped_total()
            );
        }
    }
    let sampler = config
        .data
        .sampler(&datasets, config.train.seed)
        .map_err(|e| TrainError::Input(e.to_string()))?;
    let eval_datasets = config
        .data
        .load_eval_datasets()
        .map_err(|e| TrainError::Input(e.to_string()))?;
    let total = total_steps(config, sampler.num_samples());
    let warmup = config.schedule.warmup_steps_for(total);

    // Optimizer and schedule.
    let mut optimizer = build_optimizer(config)?;
    let mut scheduler = build_scheduler::<M>(config, warmup, total)?;
    let (mut global_step, mut stream, mut losses) = match &state {
        Some(s) => (
            s.global_step,
            SampleStream::new(
                &sampler,
                &datasets,
                s.epoch,
                s.sample_index,
                s.refused.clone(),
            ),
            s.losses.clone(),
        ),
        None => (
            0,
            SampleStream::new(&sampler, &datasets, 0, 0, BTreeMap::new()),
            Vec::new(),
        ),
    };
    if let Some(dir) = &resume_dir {
        let path = dir.join(OPTIMIZER_STATE);
        optimizer = optimizer
            .load(&path)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
        let path = dir.join(SCHEDULER_STATE);
        let record = LrSchedulerRecord::load(&path)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
        scheduler = scheduler.load_record(record);
        tracing::info!("resumed from {} at step {global_step}", dir.display());
    }

    // The run directory: resolved config, metrics.
    let config_text = config
        .to_toml_string()
        .map_err(|e| TrainError::Input(e.to_string()))?;
    write_file(&run_dir.join("config.toml"), config_text.as_bytes())?;
    let metrics_path = run_dir.join("metrics.jsonl");
    truncate_metrics(&metrics_path, global_step)?;
    let mut metrics = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|source| TrainError::Io {
            path: metrics_path.clone(),
            source,
        })?;

    let stop_at = context
        .options
        .stop_after
        .map(|s| s.min(total))
        .unwrap_or(total);
    let progress = if context.options.progress {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(global_step);
        bar
    } else {
        ProgressBar::hidden()
    };
    let pad_id = context
        .processor
        .tokenizer
        .pad_token_id()
        .or(context.processor.tokenizer.eos_token_id())
        .unwrap_or(0);
    let config_pad = crate::reward::config_pad_token_id(context.model_dir)?;
    let eval_set = if eval_datasets.is_empty() {
        None
    } else {
        Some(EvalSet::encode(
            &eval_datasets,
            context,
            (pad_id, config_pad),
        )?)
    };
    // DPO's reference: nothing (reference-free), the policy with its adapters switched off
    // (LoRA is all that trains), or a frozen copy of the initial weights.
    let precomputed = precomputed_reference(&datasets)?;
    if precomputed && config.method.name != Method::Dpo {
        return Err(TrainError::Input(
            "precomputed reference log-probs (ref_chosen_logps / ref_rejected_logps) are read by \
             method.name = \"dpo\" only"
                .into(),
        ));
    }
    if precomputed
        && config
            .method
            .loss_type
            .0
            .contains(&crate::losses::DpoLossType::Ddpo)
    {
        return Err(TrainError::Input(
            "method.loss_type = \"ddpo\" weighs the reference's tokens; it cannot use \
             precomputed reference log-probs"
                .into(),
        ));
    }
    let frozen_images = !table.keys().any(|p| {
        trained(p) && matches!(M::component_of(p), Component::Vision | Component::Projector)
    });
    let reference = match config.method.name {
        Method::Dpo | Method::Kto if config.method.reference_free => Reference::None,
        Method::Dpo if precomputed => Reference::Precomputed,
        Method::Dpo | Method::Kto if config.method.reference.is_some() => {
            let path = config
                .method
                .reference
                .as_ref()
                .map(|r| r.model.as_str())
                .unwrap_or_default();
            Reference::Copy {
                model: Box::new(load_reference(path, &model, dtype, device)?),
                shares_images: false,
            }
        }
        Method::Dpo | Method::Kto
            if !adapted.is_empty() && !table.keys().any(|p| trained(p) && !is_lora_path(p)) =>
        {
            Reference::AdaptersOff {
                shares_images: frozen_images,
            }
        }
        Method::Dpo | Method::Kto => Reference::Copy {
            model: Box::new(model.valid()),
            shares_images: frozen_images,
        },
        Method::Sft | Method::Simpo | Method::Orpo | Method::Reward => Reference::None,
    };
    let (mut run_seconds, mut run_tokens, mut run_steps) = (0f64, 0usize, 0u64);

    while global_step < stop_at {
        let started = Instant::now();
        device.seed(step_seed(config.train.seed, global_step));
        let mut accumulator = GradientsAccumulator::<M>::new();
        let outcome = match config.method.name {
            Method::Sft => sft_step(&model, &mut accumulator, &mut stream, context, pad_id)?,
            Method::Reward => reward_step(
                &model,
                &mut accumulator,
                &mut stream,
                context,
                (pad_id, config_pad),
            )?,
            Method::Dpo | Method::Simpo | Method::Orpo | Method::Kto => dpo_step(
                &model,
                &reference,
                &mut accumulator,
                &mut stream,
                context,
                pad_id,
            )?,
        };
        let (step_loss, tokens) = (outcome.loss, outcome.tokens);
        let mut grads = accumulator.grads();
        let grad_norm = clip_grad_norm(&model, &mut grads, config.optim.max_grad_norm);
        let lrs = scheduler.step();
        let lr = lrs.base();
        model = optimizer.step(lrs, model, grads);
        global_step += 1;
        if !step_loss.is_finite() {
            return Err(TrainError::Input(format!(
                "the loss is {step_loss} at step {global_step}; lower optim.lr or check the data"
            )));
        }
        losses.push((global_step, step_loss));

        let seconds = started.elapsed().as_secs_f64();
        let eval_due = (config.train.eval_every > 0 && global_step % config.train.eval_every == 0)
            || global_step == total;
        let eval_metrics = match &eval_set {
            Some(set) if eval_due => {
                let metrics = set.evaluate(&model, &reference, context, pad_id)?;
                let shown: Vec<String> =
                    metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
                tracing::info!("step {global_step}: {}", shown.join(", "));
                metrics
            }
            _ => Vec::new(),
        };
        run_seconds += seconds;
        run_tokens += tokens;
        run_steps += 1;
        let mut line = serde_json::Map::new();
        line.insert("step".into(), json!(global_step));
        line.insert(
            "epoch".into(),
            json!(stream.epoch as f64 + stream.index as f64 / sampler.num_samples() as f64),
        );
        line.insert("loss".into(), json!(step_loss));
        line.insert("lr".into(), json!(lr));
        line.insert("grad_norm".into(), json!(grad_norm));
        line.insert("tokens".into(), json!(tokens));
        line.insert("tokens_per_second".into(), json!(tokens as f64 / seconds));
        line.insert("step_seconds".into(), json!(seconds));
        for (name, value) in eval_metrics {
            line.insert(name, json!(value));
        }
        for (name, value) in &outcome.metrics {
            line.insert(name.to_string(), json!(value));
        }
        let line = serde_json::Value::Object(line);
        writeln!(metrics, "{line}").map_err(|source| TrainError::Io {
            path: metrics_path.clone(),
            source,
        })?;
        progress.set_position(global_step);
        progress.set_message(format!(
            "loss {step_loss:.4} lr {lr:.2e} {:.0} tok/s",
            tokens as f64 / seconds
        ));
        if global_step % config.train.log_every.max(1) == 0 || global_step == total {
            tracing::info!(
                "step {global_step}/{total} loss {step_loss:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {:.0} tok/s",
                tokens as f64 / seconds
            );
        }

        let save_now = (config.train.save_every > 0 && global_step % config.train.save_every == 0)
            || global_step == stop_at;
        if save_now {
            let state = TrainerState {
                global_step,
                total_steps: total,
                epoch: stream.epoch,
                sample_index: stream.index,
                seed: config.train.seed,
                losses: losses.clone(),
                refused: stream.refused.clone(),
            };
            let dir = run_dir.join(format!("checkpoint-{global_step}"));
            write_dir_atomically(&dir, |tmp| {
                save_trainable(
                    &model,
                    trained_regexes::<M>(&groups, config.method.name == Method::Reward),
                    &tmp.join(TRAINABLE_WEIGHTS),
                )?;
                let path = tmp.join(OPTIMIZER_STATE);
                optimizer
                    .save(&path)
                    .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
                let path = tmp.join(SCHEDULER_STATE);
                scheduler
                    .to_record()
                    .save(&path)
                    .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
                let text = serde_json::to_string_pretty(&state)
                    .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
                write_file(&tmp.join(TRAINER_STATE), text.as_bytes())
            })?;
            rotate_checkpoints(&run_dir, config.train.save_total_limit)?;
        }
    }
    progress.finish_and_clear();

    let final_dir = if global_step >= total {
        let dir = run_dir.join("final");
        export_final(&model, context, &adapted, &dir)?;
        Some(dir)
    } else {
        None
    };
    Ok(TrainSummary {
        run_dir,
        losses,
        global_step,
        total_steps: total,
        final_dir,
        mean_step_seconds: if run_steps > 0 {
            run_seconds / run_steps as f64
        } else {
            0.0
        },
        tokens_per_second: if run_seconds > 0.0 {
            run_tokens as f64 / run_seconds
        } else {
            0.0
        },
        refused: stream.refused,
        trainable_parameters,
        total_parameters,
        parameters_by_dtype,
    })
}

/// What one optimizer step's forward/backward passes produced.
struct StepOutcome {
    loss: f64,
    tokens: usize,
    metrics: Vec<(&'static str, f64)>,
}

/// DPO's reference model. `shares_images`: the reference encodes images exactly as the policy
/// does (the same tower and projector weights, frozen and without adapters), so the policy's
/// image features serve it and each image is encoded once per step.
enum Reference<M> {
    None,
    /// The policy with its adapters switched off.
    AdaptersOff {
        shares_images: bool,
    },
    /// A frozen model: the initial policy's weights or `[method.reference] model`.
    Copy {
        model: Box<M>,
        shares_images: bool,
    },
    /// Every record carries its reference log-probs (`ref_chosen_logps` / `ref_rejected_logps`).
    Precomputed,
}

/// Whether the training records carry precomputed reference log-probs: all of them (`true`),
/// none (`false`), or some — an error naming the first record without.
fn precomputed_reference(datasets: &[Dataset]) -> Result<bool> {
    let mut records = datasets.iter().flat_map(|d| &d.records);
    let with = records
        .clone()
        .filter(|c| c.reference_logps.is_some())
        .count();
    if with == 0 {
        return Ok(false);
    }
    match records.find(|c| c.reference_logps.is_none()) {
        None => Ok(true),
        Some(c) => Err(TrainError::Record {
            path: c.source.file.to_path_buf(),
            line: c.source.line,
            message: format!(
                "no ref_chosen_logps / ref_rejected_logps, while {with} other record(s) have them; \
                 precomputed reference log-probs must cover every training record"
            ),
        }),
    }
}

/// The precision of a run in `dtype`: the parameters `trained` does not select are stored in
/// `dtype` and the activations computed in it, trained ones stay f32 master weights (see
/// `resonance_models::nn::precision`). A device without the dtype is an error naming `setting`.
pub fn apply_precision<M: TrainableModel>(
    model: M,
    dtype: FloatDType,
    device: &Device,
    trained: &dyn Fn(&str) -> bool,
    setting: &str,
) -> Result<M> {
    if dtype == FloatDType::F32 {
        return Ok(model);
    }
    ensure_supported(device, dtype).map_err(|e| TrainError::Input(format!("{setting}: {e}")))?;
    let mut model = cast_params_where(model, dtype, &|path, _| !trained(path));
    model.set_compute_dtype(dtype);
    Ok(model)
}

/// The floating-point type of `model.dtype`.
pub fn float_dtype(dtype: Dtype) -> FloatDType {
    match dtype {
        Dtype::F32 => FloatDType::F32,
        Dtype::Bf16 => FloatDType::BF16,
        Dtype::F16 => FloatDType::F16,
    }
}

/// The frozen reference model of `[method.reference] model`, loaded without gradients, in the
/// policy's compute dtype.
fn load_reference<M: TrainableModel>(
    reference: &str,
    policy: &M,
    dtype: FloatDType,
    device: &Device,
) -> Result<M> {
    let dir = resolve_model(reference)?;
    let plain = device.clone().inner();
    let loaded = AnyModel::load(&dir, &plain)?.into_precision(dtype, &plain)?;
    let vocab = loaded.text_config().vocab_size;
    let model = M::from_any(loaded).ok_or_else(|| {
        TrainError::Input(format!(
            "method.reference.model = {reference}: not the policy's architecture"
        ))
    })?;
    let policy_vocab = policy.decoder().model.embed_tokens.weight.dims()[0];
    if vocab != policy_vocab {
        return Err(TrainError::Input(format!(
            "method.reference.model = {reference}: vocabulary of {vocab} tokens, the policy's has \
             {policy_vocab}; the reference must share the policy's tokenizer"
        )));
    }
    Ok(model)
}

/// The shards of a micro-batch of `rows` examples (`crate::shards`). One when the forward pass
/// draws random numbers (LoRA dropout): Burn's generator is shared, and the order in which the
/// shards' threads draw from it would vary from run to run.
fn shards_of(context: &RunContext, rows: usize) -> Vec<std::ops::Range<usize>> {
    let lora = &context.config.lora;
    let count = if lora.enabled && lora.dropout > 0.0 {
        1
    } else {
        shard_count(context.device, rows)
    };
    shard_ranges(rows, count)
}

/// SFT: token-averaged cross-entropy over the assistant tokens of the accumulated batch.
fn sft_step<M: TrainableModel>(
    model: &M,
    accumulator: &mut GradientsAccumulator<M>,
    stream: &mut SampleStream,
    context: &RunContext,
    pad_id: u32,
) -> Result<StepOutcome> {
    let config = context.config;
    let device = context.device;
    // Each micro-batch is split into shards, one per compute thread on the CPU (see
    // `crate::shards`), each collated (padded) on its own.
    let mut micro_batches: Vec<Vec<SftBatch>> = Vec::with_capacity(config.train.grad_accumulation);
    for _ in 0..config.train.grad_accumulation {
        let examples = stream.next_items(config.data.on_error, config.train.batch_size, |c| {
            encode_conversation(context.processor, c, config.data.max_length)
        })?;
        let shards = shards_of(context, examples.len());
        micro_batches.push(
            shards
                .into_iter()
                .map(|rows| SftBatch::collate(&examples[rows], pad_id))
                .collect(),
        );
    }
    let normalizer = micro_batches
        .iter()
        .flatten()
        .map(SftBatch::num_targets)
        .sum::<usize>() as f64;
    let tokens: usize = micro_batches
        .iter()
        .flatten()
        .map(SftBatch::num_tokens)
        .sum();
    let mut loss_sum = 0f64;
    for shards in &micro_batches {
        let (losses, grads) =
            sharded_gradients(model, device, shards.iter().collect(), |m, batch| {
                let loss = sft_batch_loss(m, context.processor, batch, normalizer, device)?;
                let value = loss.clone().into_scalar::<f64>();
                Ok((loss, value))
            })?;
        loss_sum += losses.iter().sum::<f64>();
        accumulator.accumulate(model, grads);
    }
    Ok(StepOutcome {
        loss: loss_sum,
        tokens,
        metrics: Vec::new(),
    })
}

/// DPO: the mean pair loss over the accumulated batch, with TRL's reward metrics.
fn dpo_step<M: TrainableModel>(
    model: &M,
    reference: &Reference<M>,
    accumulator: &mut GradientsAccumulator<M>,
    stream: &mut SampleStream,
    context: &RunContext,
    pad_id: u32,
) -> Result<StepOutcome> {
    let config = context.config;
    let accumulation = config.train.grad_accumulation;
    let total_pairs = (config.train.batch_size * accumulation) as f64;
    let (mut loss_sum, mut tokens) = (0f64, 0usize);
    let mut metric_sums: Vec<(&'static str, f64)> = Vec::new();
    for _ in 0..accumulation {
        let pairs = stream.next_items(config.data.on_error, config.train.batch_size, |c| {
            crate::dpo::encode_pair(
                context.processor,
                c,
                config.data.max_length,
                config.data.max_prompt_length,
            )
        })?;
        // A loss that is a sum or mean over pairs (DPO and its variants, SimPO) runs in shards,
        // one per compute thread on the CPU (`crate::shards`): DPO's shard losses are already
        // divided by the whole batch's pairs, SimPO's means over a shard's pairs are weighted by
        // its share of them, as are the shards' metrics (means over their pairs). KTO's KL rows
        // pair completions across the whole micro-batch, RPO's NLL is a token mean over it, and
        // ORPO's NLL too: those keep the micro-batch whole.
        let method = config.method.name;
        let shardable =
            matches!(method, Method::Dpo | Method::Simpo) && config.method.rpo_alpha.is_none();
        let mean_over_shard = method == Method::Simpo;
        let count = pairs.len();
        let ranges = if shardable {
            shards_of(context, count)
        } else {
            shard_ranges(count, 1)
        };
        let mut rest = pairs.into_iter();
        let shards: Vec<Vec<crate::dpo::PairExample>> = ranges
            .iter()
            .map(|r| rest.by_ref().take(r.len()).collect())
            .collect();
        let (outs, grads) = sharded_gradients(model, context.device, shards, |m, shard| {
            let share = shard.len() as f64 / count.max(1) as f64;
            let out = preference_batch_loss(
                m,
                reference,
                shard,
                context,
                context.device,
                pad_id,
                (total_pairs, accumulation),
            )?;
            let loss = if mean_over_shard {
                out.loss.mul_scalar(share)
            } else {
                out.loss
            };
            let value = loss.clone().into_scalar::<f64>();
            Ok((loss, (value, out.metrics, out.tokens, share)))
        })?;
        for (value, metrics, shard_tokens, share) in outs {
            tokens += shard_tokens;
            loss_sum += value;
            add_weighted(&mut metric_sums, metrics, |v| {
                v * share / accumulation as f64
            });
        }
        accumulator.accumulate(model, grads);
    }
    Ok(StepOutcome {
        loss: loss_sum,
        tokens,
        metrics: metric_sums,
    })
}

/// Adds each of a micro-batch's metrics, weighted by `weigh`, to the running sums (same names,
/// same order in every micro-batch).
fn add_weighted(
    sums: &mut Vec<(&'static str, f64)>,
    metrics: Vec<(&'static str, f64)>,
    weigh: impl Fn(f64) -> f64,
) {
    for (i, (name, value)) in metrics.into_iter().enumerate() {
        match sums.get_mut(i) {
            Some(slot) => slot.1 += weigh(value),
            None => sums.push((name, weigh(value))),
        }
    }
}

/// One micro-batch of a preference method: its loss (scaled so that a step's micro-batches add
/// up to the mean over `scale.0` examples, with per-micro-batch terms divided by `scale.1`), its
/// metrics and its number of tokens.
struct PreferenceBatch {
    loss: Tensor<1>,
    metrics: Vec<(&'static str, f64)>,
    tokens: usize,
}

/// The loss of one micro-batch of pairs (or KTO records) on `device`, for training (the autodiff
/// device) and evaluation (the plain one).
fn preference_batch_loss<M: TrainableModel>(
    model: &M,
    reference: &Reference<M>,
    mut pairs: Vec<crate::dpo::PairExample>,
    context: &RunContext,
    device: &Device,
    pad_id: u32,
    scale: (f64, usize),
) -> Result<PreferenceBatch> {
    let config = context.config;
    let (total_pairs, accumulation) = scale;
    let loss_configs = crate::dpo::loss_configs(&config.method);
    let ddpo = config.method.name == Method::Dpo
        && loss_configs
            .iter()
            .any(|(_, c)| c.loss_type == crate::losses::DpoLossType::Ddpo);
    let desirable: Vec<bool> = pairs.iter().map(|p| p.label.unwrap_or(true)).collect();
    if config.method.name == Method::Kto {
        // The KL rows pair each prompt with another example's completion (TRL reverses the
        // batch's completions), cut to fit after this prompt.
        let completions: Vec<Vec<u32>> = pairs.iter().rev().map(|p| p.chosen.clone()).collect();
        for (pair, completion) in pairs.iter_mut().zip(completions) {
            let room = config.data.max_length.saturating_sub(pair.prompt.len());
            pair.rejected = completion.into_iter().take(room).collect();
        }
    }
    let batch = crate::dpo::PairBatch::collate(&pairs, pad_id);
    let tokens = batch.num_tokens();
    let inputs = |pixels| ModelInputs {
        input_ids: &batch.input_ids,
        attention_mask: &batch.attention_mask,
        images: pixels,
    };
    // The head runs at the answer positions only; `targets` index those logits.
    let (positions, targets) = crate::logprobs::compact_targets(&batch.targets);
    let pixels = context.processor.pixel_values(&batch.images, device)?;
    // A reference that encodes images as the policy does takes the policy's features: each
    // image is encoded once per step (no gradient reaches them, nothing on their way trains).
    let shares_images = matches!(
        reference,
        Reference::AdaptersOff {
            shares_images: true
        } | Reference::Copy {
            shares_images: true,
            ..
        }
    );
    let policy_images = match pixels {
        Some(pixels) if shares_images => Some(Images::Encoded(model.encode_images(pixels)?)),
        pixels => Images::pixels(pixels),
    };
    // The reference runs without autodiff: the policy's features, or its pixels to encode.
    let reference_images = policy_images.clone().map(|images| match images {
        Images::Encoded(features) => Images::Encoded(features.inner()),
        Images::Pixels(pixels) => Images::Pixels(pixels.inner()),
    });
    let policy_logits =
        model.target_logits(inputs(policy_images.clone()), 2, &positions, device)?;
    // DDPO: the token weights come from the host-side diff of each pair; the same forward
    // pass gives the plain and the weighted sums (other loss types of a list use the plain).
    let ddpo_weights = ddpo.then(|| batch.ddpo_weights());
    let weightings: Vec<Option<&[Vec<f32>]>> = std::iter::once(None)
        .chain(ddpo_weights.as_deref().map(Some))
        .collect();
    let mut policy_sums =
        crate::logprobs::weighted_sequence_logps(policy_logits, &targets, &weightings).into_iter();
    let policy = policy_sums.next().expect("the plain sums come first");
    let policy_dense = policy_sums.next();
    let rows = batch.input_ids.len();
    let lengths = batch.lengths();
    let needs_reference = matches!(config.method.name, Method::Dpo | Method::Kto);
    let (loss, metrics) = if needs_reference {
        let (reference_logps, reference_dense) = {
            let plain = device.clone().inner();
            let reference_of = |m: &M| -> Result<Vec<Tensor<1>>> {
                let logits =
                    m.target_logits(inputs(reference_images.clone()), 2, &positions, &plain)?;
                Ok(crate::logprobs::weighted_sequence_logps(
                    logits,
                    &targets,
                    &weightings,
                ))
            };
            let values = match reference {
                Reference::None => weightings
                    .iter()
                    .map(|_| Tensor::<1>::zeros([rows], &plain))
                    .collect(),
                Reference::Precomputed => {
                    if let Some(p) = pairs.iter().find(|p| p.reference_logps.is_none()) {
                        return Err(TrainError::Record {
                            path: p.source.file.to_path_buf(),
                            line: p.source.line,
                            message: "no ref_chosen_logps / ref_rejected_logps, which the \
                                      training data's precomputed reference needs (in \
                                      evaluation data too)"
                                .into(),
                        });
                    }
                    let values: Vec<f32> = (0..2)
                        .flat_map(|side| {
                            pairs
                                .iter()
                                .map(move |p| p.reference_logps.map_or(0.0, |r| r[side] as f32))
                        })
                        .collect();
                    vec![Tensor::<1>::from_data(
                        burn::tensor::TensorData::new(values, [rows]),
                        &plain,
                    )]
                }
                Reference::AdaptersOff { .. } => {
                    let _off = AdaptersDisabled::new();
                    reference_of(&model.valid())?
                }
                Reference::Copy { model: copy, .. } => reference_of(copy)?,
            };
            let mut values = values
                .into_iter()
                .map(|v| Tensor::<1>::from_data(v.into_data(), device));
            let reference_logps = values.next().expect("the plain sums come first");
            (reference_logps, values.next())
        };
        let chosen_nll = crate::dpo::chosen_nll(
            policy.clone().narrow(0, 0, batch.pairs),
            &lengths[..batch.pairs],
        );
        if config.method.name == Method::Kto {
            let (loss, metrics) = crate::dpo::kto_batch_loss(
                &config.method,
                policy,
                reference_logps,
                &desirable,
                total_pairs,
            )?;
            (loss, metrics)
        } else {
            let (out, mut metrics) = crate::dpo::pair_loss(
                policy,
                reference_logps,
                policy_dense.zip(reference_dense),
                &lengths,
                &loss_configs,
            )?;
            let mut loss = out.losses.sum().div_scalar(total_pairs);
            if let Some(alpha) = config.method.rpo_alpha {
                // RPO: + α · (token-mean NLL of the chosen answers), averaged over micro-batches.
                metrics.push(("nll_loss", chosen_nll.clone().into_scalar::<f64>()));
                loss = loss + chosen_nll.mul_scalar(alpha / accumulation as f64);
            }
            (loss, metrics)
        }
    } else {
        let (loss, metrics) = crate::dpo::reference_free_loss(&config.method, policy, &lengths)?;
        (loss.div_scalar(accumulation as f64), metrics)
    };
    Ok(PreferenceBatch {
        loss,
        metrics,
        tokens,
    })
}

/// Reward model: the mean ranking loss over the accumulated batch's lists, with TRL's reward
/// metrics. `pads` = (the id padding rows, the config's `pad_token_id` pooling skips).
fn reward_step<M: TrainableModel>(
    model: &M,
    accumulator: &mut GradientsAccumulator<M>,
    stream: &mut SampleStream,
    context: &RunContext,
    pads: (u32, Option<u32>),
) -> Result<StepOutcome> {
    let config = context.config;
    let accumulation = config.train.grad_accumulation;
    let (mut loss_sum, mut tokens) = (0f64, 0usize);
    let mut lists = Vec::new();
    for _ in 0..accumulation {
        let examples = stream.next_items(config.data.on_error, config.train.batch_size, |c| {
            crate::reward::encode_ranked(
                context.processor,
                c,
                config.data.max_length,
                config.data.max_prompt_length,
            )
        })?;
        let batch = RankedBatch::collate(&examples, pads.0, pads.1)?;
        tokens += batch.num_tokens();
        let rewards = ranked_rewards(model, context.processor, &batch, context.device)?;
        lists.extend(crate::reward::lists_to_host(rewards.clone().detach())?);
        let loss = crate::reward::reward_batch_loss(&config.method, rewards, accumulation);
        loss_sum += loss.clone().into_scalar::<f64>();
        let grads = loss.backward();
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    Ok(StepOutcome {
        loss: loss_sum,
        tokens,
        metrics: crate::reward::reward_metrics(&lists),
    })
}

/// Rewards `[n, K]` of a ranked batch, each image encoded once for all its candidates.
fn ranked_rewards<M: TrainableModel>(
    model: &M,
    processor: &Processor,
    batch: &RankedBatch,
    device: &Device,
) -> Result<Tensor<2>> {
    let pixels = processor.pixel_values(&batch.images, device)?;
    let values = model.values_grouped(
        ModelInputs {
            input_ids: &batch.input_ids,
            attention_mask: &batch.attention_mask,
            images: Images::pixels(pixels),
        },
        batch.candidates,
        device,
    )?;
    let rewards = crate::reward::pooled_rewards(values, &batch.pool_index);
    Ok(crate::reward::rewards_by_list(
        rewards,
        batch.lists,
        batch.candidates,
    ))
}

/// The SFT loss of a batch ([`sft_loss`] over `normalizer` targets), its images loaded onto
/// `device` and the head applied at the target positions only.
fn sft_batch_loss<M: TrainableModel>(
    model: &M,
    processor: &Processor,
    batch: &SftBatch,
    normalizer: f64,
    device: &Device,
) -> Result<Tensor<1>> {
    let pixels = processor.pixel_values(&batch.images, device)?;
    let (positions, targets) = crate::logprobs::compact_targets(&batch.targets);
    let logits = model.target_logits(
        ModelInputs {
            input_ids: &batch.input_ids,
            attention_mask: &batch.attention_mask,
            images: Images::pixels(pixels),
        },
        1,
        &positions,
        device,
    )?;
    Ok(sft_loss(logits, &targets, normalizer))
}

/// The encodable evaluation records (refused ones are left out); none at all is an error.
fn encode_usable<'a, T>(
    records: impl Iterator<Item = &'a Conversation>,
    encode: impl Fn(&Conversation) -> Result<std::result::Result<T, Refusal>>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for conversation in records {
        if let Ok(example) = encode(conversation)? {
            out.push(example);
        }
    }
    if out.is_empty() {
        return Err(TrainError::Input(
            "the evaluation datasets have no usable record".into(),
        ));
    }
    Ok(out)
}

/// The evaluation data, encoded once: for SFT and the preference methods, the SFT batches of
/// every encodable record (the chosen answers of pairs) and their number of trained tokens; for
/// a reward model, its ranked batches.
enum EvalSet {
    Sft {
        batches: Vec<SftBatch>,
        targets: usize,
    },
    Reward {
        batches: Vec<RankedBatch>,
    },
    /// DPO, SimPO, ORPO and KTO: the method's own loss and metrics on the eval pairs.
    Preference {
        batches: Vec<Vec<crate::dpo::PairExample>>,
    },
}

impl EvalSet {
    fn encode(
        datasets: &[Dataset],
        context: &RunContext,
        pads: (u32, Option<u32>),
    ) -> Result<Self> {
        let config = context.config;
        let records = datasets.iter().flat_map(|d| &d.records);
        let batch_size = config.train.batch_size.max(1);
        if config.method.name == Method::Reward {
            let examples = encode_usable(records, |c| {
                crate::reward::encode_ranked(
                    context.processor,
                    c,
                    config.data.max_length,
                    config.data.max_prompt_length,
                )
            })?;
            let batches = examples
                .chunks(batch_size)
                .map(|chunk| RankedBatch::collate(chunk, pads.0, pads.1))
                .collect::<Result<_>>()?;
            return Ok(EvalSet::Reward { batches });
        }
        if config.method.name.is_preference() {
            let pairs = encode_usable(records, |c| {
                crate::dpo::encode_pair(
                    context.processor,
                    c,
                    config.data.max_length,
                    config.data.max_prompt_length,
                )
            })?;
            let batches = pairs.chunks(batch_size).map(<[_]>::to_vec).collect();
            return Ok(EvalSet::Preference { batches });
        }
        let examples = encode_usable(records, |c| {
            encode_conversation(context.processor, c, config.data.max_length)
        })?;
        let targets: usize = examples.iter().map(|e| e.num_trained()).sum();
        let batches = examples
            .chunks(batch_size)
            .map(|chunk| SftBatch::collate(chunk, pads.0))
            .collect();
        Ok(EvalSet::Sft { batches, targets })
    }

    /// The evaluation metrics with dropout off and without recording gradients: `eval_loss`
    /// (token-averaged cross-entropy, or the reward model's mean ranking loss) and, for a reward
    /// model, TRL's reward metrics with an `eval_` prefix.
    fn evaluate<M: TrainableModel>(
        &self,
        model: &M,
        reference: &Reference<M>,
        context: &RunContext,
        pad_id: u32,
    ) -> Result<Vec<(String, f64)>> {
        let model = model.valid();
        let device = context.device.clone().inner();
        match self {
            EvalSet::Preference { batches } => {
                let total: usize = batches.iter().map(Vec::len).sum();
                let mut loss_sum = 0f64;
                let mut metric_sums: Vec<(&'static str, f64)> = Vec::new();
                for batch in batches {
                    let weight = batch.len() as f64 / total as f64;
                    let out = preference_batch_loss(
                        &model,
                        reference,
                        batch.clone(),
                        context,
                        &device,
                        pad_id,
                        (batch.len() as f64, 1),
                    )?;
                    loss_sum += weight * out.loss.into_scalar::<f64>();
                    add_weighted(&mut metric_sums, out.metrics, |v| weight * v);
                }
                let mut out = vec![("eval_loss".to_string(), loss_sum)];
                out.extend(
                    metric_sums
                        .into_iter()
                        .map(|(name, value)| (format!("eval_{name}"), value)),
                );
                Ok(out)
            }
            EvalSet::Sft { batches, targets } => {
                let mut sum = 0f64;
                for batch in batches {
                    let loss =
                        sft_batch_loss(&model, context.processor, batch, *targets as f64, &device)?;
                    sum += loss.into_scalar::<f64>();
                }
                Ok(vec![("eval_loss".into(), sum)])
            }
            EvalSet::Reward { batches } => {
                let (mut loss_sum, mut lists) = (0f64, Vec::new());
                for batch in batches {
                    let rewards = ranked_rewards(&model, context.processor, batch, &device)?;
                    let losses = crate::losses::ranking_loss(
                        rewards.clone(),
                        context.config.method.ranking_loss,
                    );
                    loss_sum += losses.sum().into_scalar::<f64>();
                    lists.extend(crate::reward::lists_to_host(rewards)?);
                }
                let mut out = vec![(
                    "eval_loss".to_string(),
                    loss_sum / lists.len().max(1) as f64,
                )];
                out.extend(
                    crate::reward::reward_metrics(&lists)
                        .into_iter()
                        .map(|(name, value)| (format!("eval_{name}"), value)),
                );
                Ok(out)
            }
        }
    }
}

/// The adapter description of a LoRA run.
pub fn adapter_config<M: TrainableModel>(
    config: &ExperimentConfig,
    adapted: &[String],
    base: &str,
) -> (AdapterConfig, Vec<String>) {
    let groups = config.trainable_groups();
    let mut names: Vec<String> = adapted
        .iter()
        .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
        .collect();
    names.sort();
    names.dedup();
    let full_prefixes: Vec<String> =
        full_component_prefixes::<M>(&groups, config.method.name == Method::Reward)
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
    let modules_to_save: Vec<String> = full_prefixes
        .iter()
        .map(|p| p.trim_end_matches('.').to_string())
        .collect();
    (
        AdapterConfig {
            peft_type: "LORA".into(),
            r: config.lora.rank,
            lora_alpha: config.lora.alpha,
            lora_dropout: config.lora.dropout,
            target_modules: names,
            modules_to_save: (!modules_to_save.is_empty()).then_some(modules_to_save),
            base_model_name_or_path: Some(base.to_string()),
            bias: Some("none".into()),
            use_rslora: false,
            use_dora: false,
            fan_in_fan_out: false,
            task_type: (config.method.name == Method::Reward).then(|| "SEQ_CLS".to_string()),
        },
        full_prefixes,
    )
}

fn export_final<M: TrainableModel + ModuleSnapshot + Clone>(
    model: &M,
    context: &RunContext,
    adapted: &[String],
    dir: &Path,
) -> Result<()> {
    let config = context.config;
    write_dir_atomically(dir, |tmp| {
        if config.lora.enabled {
            let (adapter, full_prefixes) = adapter_config::<M>(config, adapted, &config.model.path);
            save_peft_adapter(&model.valid(), &adapter, &full_prefixes, tmp)?;
            // The base model's tokenizer and templates travel with the adapter, as PEFT does;
            // its config.json does not (it would make the folder look like a full model).
            crate::checkpoint::copy_model_files(context.model_dir, tmp, false)
        } else {
            save_hf_model(&model.valid(), context.model_dir, tmp)
        }
    })?;
    tracing::info!("wrote {}", dir.display());
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Drops metric lines past `step` (a resumed run rewrites the steps after its checkpoint).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_file(path, kept.as_bytes())
}

/// `resonance merge-lora`: the base model with a PEFT adapter folded in, written as a full
/// transformers checkpoint.
pub fn merge_lora(base: &str, adapter_dir: &Path, out: &Path, device: &Device) -> Result<()> {
    let base_dir = resolve_model(base)?;
    let model = AnyModel::load(&base_dir, device)?;
    fn merge<M: TrainableModel + ModuleSnapshot + Clone>(
        mut model: M,
        adapter_dir: &Path,
        base_dir: &Path,
        out: &Path,
        device: &Device,
    ) -> Result<()> {
        crate::checkpoint::attach_peft_adapter(&mut model, adapter_dir, device)?;
        write_dir_atomically(out, |tmp| save_hf_model(&model, base_dir, tmp))
    }
    match model {
        AnyModel::Text(m, _) => merge(*m, adapter_dir, &base_dir, out, device),
        AnyModel::Llava(m, _) => merge(*m, adapter_dir, &base_dir, out, device),
    }
}
