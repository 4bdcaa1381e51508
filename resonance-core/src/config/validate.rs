//! Value ranges and conflicting options of an [`ExperimentConfig`].

use std::collections::HashMap;

use super::error::Problem;
use super::{ExperimentConfig, GroupTraining, Method, TargetModules};
use crate::data::{DataFormat, Mixing, LARGEST_GAP};

/// Every problem of `cfg`, in section order.
pub(super) fn problems(cfg: &ExperimentConfig) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut add = |key: &str, msg: String| p.push(Problem::new(key, msg));

    // [model]
    if cfg.model.path.trim().is_empty() {
        add(
            "model.path",
            "must be set to a model directory or hub id".into(),
        );
    }
    // [data]
    let data = &cfg.data;
    if data.datasets.is_empty() {
        add(
            "data.datasets",
            "at least one dataset is required ([[data.datasets]] with a `path`)".into(),
        );
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, d) in data.datasets.iter().enumerate() {
        let key = |f: &str| format!("data.datasets[{i}].{f}");
        if d.path.as_os_str().is_empty() {
            add(&key("path"), "must be set".into());
        }
        if let Some(w) = d.weight {
            if data.mixing != Mixing::Ratio {
                add(
                    &key("weight"),
                    format!(
                        "a weight is only used with data.mixing = \"ratio\", but mixing is \
                         \"{}\" (weights come from the dataset sizes); remove it or set \
                         mixing = \"ratio\"",
                        data.mixing.as_str()
                    ),
                );
            } else if !(w.is_finite() && w > 0.0) {
                add(&key("weight"), format!("must be positive, got {w}"));
            }
        }
        let name = d.display_name();
        if let Some(j) = names.insert(name.clone(), i) {
            add(
                &key("name"),
                format!(
                    "dataset name `{name}` is already used by data.datasets[{j}]; set distinct \
                     `name`s"
                ),
            );
        }
    }
    for (i, d) in data.eval_datasets.iter().enumerate() {
        if d.path.as_os_str().is_empty() {
            add(
                &format!("data.eval_datasets[{i}].path"),
                "must be set".into(),
            );
        }
        if d.weight.is_some() {
            add(
                &format!("data.eval_datasets[{i}].weight"),
                "evaluation datasets are read whole; remove the weight".into(),
            );
        }
    }
    if cfg.train.eval_every > 0 && data.eval_datasets.is_empty() {
        add(
            "train.eval_every",
            "evaluation needs [[data.eval_datasets]]; add one or set eval_every = 0".into(),
        );
    }
    if data.num_samples == Some(0) {
        add("data.num_samples", "must be > 0".into());
    }
    if data.max_length == 0 {
        add("data.max_length", "must be > 0".into());
    }
    if let Some(mp) = data.max_prompt_length {
        if mp == 0 || mp >= data.max_length {
            add(
                "data.max_prompt_length",
                format!(
                    "must be > 0 and below data.max_length ({}), got {mp}",
                    data.max_length
                ),
            );
        }
    }

    // [method]
    let method = &cfg.method;
    let sets = [
        ("datasets", &data.datasets),
        ("eval_datasets", &data.eval_datasets),
    ];
    for (list, datasets) in sets {
        for (i, d) in datasets.iter().enumerate() {
            if !method.name.accepts(d.format) {
                let accepted: Vec<String> = method
                    .name
                    .accepted_formats()
                    .iter()
                    .map(|f| format!("\"{f}\""))
                    .collect();
                add(
                    &format!("data.{list}[{i}].format"),
                    format!(
                        "method {:?} trains on {} data, got \"{}\"",
                        method.name,
                        accepted.join(" / "),
                        d.format.as_str()
                    ),
                );
            }
            if let Some(m) = d.score_margin {
                if d.format != DataFormat::VlfeedbackPaired {
                    add(
                        &format!("data.{list}[{i}].score_margin"),
                        format!(
                            "only used with format = \"vlfeedback_paired\", but the format is \
                             \"{}\"; remove it",
                            d.format
                        ),
                    );
                } else if !(m.is_finite() && (m >= 0.0 || m == LARGEST_GAP)) {
                    add(
                        &format!("data.{list}[{i}].score_margin"),
                        format!(
                            "must be >= 0 (the minimum score gap of a pair) or -1 (the \
                             largest-gap pairs of each record), got {m}"
                        ),
                    );
                }
            }
        }
    }
    if method.name.is_preference() {
        for (key, w) in [
            ("method.desirable_weight", method.desirable_weight),
            ("method.undesirable_weight", method.undesirable_weight),
        ] {
            if !(w.is_finite() && w > 0.0) {
                add(key, format!("must be > 0, got {w}"));
            }
        }
        if !(method.beta.is_finite() && method.beta > 0.0) {
            add("method.beta", format!("must be > 0, got {}", method.beta));
        }
        if method.loss_type.0.is_empty() {
            add("method.loss_type", "the list of loss types is empty".into());
        }
        if let Some(weights) = &method.loss_weights {
            if weights.len() != method.loss_type.0.len() {
                add(
                    "method.loss_weights",
                    format!(
                        "{} weight(s) for {} loss type(s); give one per loss type",
                        weights.len(),
                        method.loss_type.0.len()
                    ),
                );
            }
            if weights.iter().any(|w| !w.is_finite()) {
                add("method.loss_weights", "weights must be finite".into());
            }
        }
        if let Some(reference) = &method.reference {
            if !matches!(method.name, Method::Dpo | Method::Kto) {
                add(
                    "method.reference.model",
                    format!(
                        "only DPO and KTO use a reference model, not `{}`",
                        format!("{:?}", method.name).to_lowercase()
                    ),
                );
            } else if method.reference_free {
                add(
                    "method.reference.model",
                    "conflicts with method.reference_free = true".into(),
                );
            } else if reference.model.trim().is_empty() {
                add("method.reference.model", "is empty".into());
            }
        }
        if let Some(c) = method.center_rewards_coefficient {
            if !(c.is_finite() && c >= 0.0) {
                add(
                    "method.center_rewards_coefficient",
                    format!("must be ≥ 0, got {c}"),
                );
            }
        }
        if let Some(alpha) = method.rpo_alpha {
            if !(alpha.is_finite() && alpha >= 0.0) {
                add("method.rpo_alpha", format!("must be ≥ 0, got {alpha}"));
            }
        }
        if !(0.0..0.5).contains(&method.label_smoothing) {
            add(
                "method.label_smoothing",
                format!("must be in [0, 0.5), got {}", method.label_smoothing),
            );
        }
    }

    // [lora]
    let lora = &cfg.lora;
    if lora.rank == 0 {
        add("lora.rank", "must be > 0".into());
    }
    if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
        add("lora.alpha", format!("must be > 0, got {}", lora.alpha));
    }
    if !(0.0..1.0).contains(&lora.dropout) {
        add(
            "lora.dropout",
            format!("must be in [0, 1), got {}", lora.dropout),
        );
    }
    if let TargetModules::Names(names) = &lora.target_modules {
        if names.is_empty() {
            add(
                "lora.target_modules",
                "an empty list targets nothing; use \"auto\" or name the layers".into(),
            );
        } else if names.iter().any(|n| n.trim().is_empty()) {
            add("lora.target_modules", "contains an empty name".into());
        }
    }
    if lora.qlora && !lora.enabled {
        add(
            "lora.qlora",
            "QLoRA trains LoRA adapters on a quantized base: it needs lora.enabled = true".into(),
        );
    }
    if lora.enabled && !lora.apply_to_lm && !lora.apply_to_vision {
        add(
            "lora.enabled",
            "LoRA is enabled but applies to nothing: set lora.apply_to_lm or \
             lora.apply_to_vision"
                .into(),
        );
    }
    // LoRA on a group whose base weights are explicitly fully fine-tuned.
    if lora.enabled && lora.apply_to_lm && cfg.train.freeze_lm == Some(false) {
        add(
            "train.freeze_lm",
            "conflicts with lora.enabled: LoRA applies to the language model \
             (lora.apply_to_lm = true), whose base weights are then frozen, but \
             train.freeze_lm = false asks for a full fine-tune of them; remove \
             train.freeze_lm, or disable LoRA (lora.enabled = false) or set \
             lora.apply_to_lm = false"
                .into(),
        );
    }
    if lora.enabled && lora.apply_to_vision && cfg.train.freeze_vision == Some(false) {
        add(
            "train.freeze_vision",
            "conflicts with lora.apply_to_vision: LoRA on the vision tower keeps its base \
             weights frozen, but train.freeze_vision = false asks for a full fine-tune of them; \
             remove one of the two"
                .into(),
        );
    }

    // [optim]
    let o = &cfg.optim;
    if !(o.lr.is_finite() && o.lr > 0.0) {
        add("optim.lr", format!("must be > 0, got {}", o.lr));
    }
    for (i, b) in o.betas.iter().enumerate() {
        if !(0.0..1.0).contains(b) {
            add(
                "optim.betas",
                format!("beta{} must be in [0, 1), got {b}", i + 1),
            );
        }
    }
    if !(o.eps.is_finite() && o.eps > 0.0) {
        add("optim.eps", format!("must be > 0, got {}", o.eps));
    }
    if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
        add(
            "optim.weight_decay",
            format!("must be ≥ 0, got {}", o.weight_decay),
        );
    }
    if !(o.max_grad_norm.is_finite() && o.max_grad_norm >= 0.0) {
        add(
            "optim.max_grad_norm",
            format!("must be ≥ 0 (0 disables clipping), got {}", o.max_grad_norm),
        );
    }
    let groups = cfg.trainable_groups();
    for (key, lr, group, what) in [
        (
            "optim.vision_lr",
            o.vision_lr,
            groups.vision,
            "the vision tower",
        ),
        (
            "optim.projector_lr",
            o.projector_lr,
            groups.projector,
            "the projector",
        ),
        ("optim.lm_lr", o.lm_lr, groups.lm, "the language model"),
    ] {
        if let Some(lr) = lr {
            if !(lr.is_finite() && lr > 0.0) {
                add(key, format!("must be > 0, got {lr}"));
            } else if group == GroupTraining::Frozen {
                add(
                    key,
                    format!("is set but {what} is frozen (nothing in it is trained)"),
                );
            }
        }
    }

    // [schedule]
    let s = &cfg.schedule;
    if let Some(r) = s.warmup_ratio {
        if !(0.0..1.0).contains(&r) {
            add(
                "schedule.warmup_ratio",
                format!("must be in [0, 1), got {r}"),
            );
        }
    }
    if s.warmup_ratio.is_some() && s.warmup_steps.is_some() {
        add(
            "schedule.warmup_steps",
            "schedule.warmup_ratio and schedule.warmup_steps are both set; set only one".into(),
        );
    }

    // [train]
    let t = &cfg.train;
    if t.epochs.is_some() && t.max_steps.is_some() {
        add(
            "train.max_steps",
            "train.epochs and train.max_steps are both set; set only one".into(),
        );
    }
    if t.epochs == Some(0) {
        add("train.epochs", "must be > 0".into());
    }
    if t.max_steps == Some(0) {
        add("train.max_steps", "must be > 0".into());
    }
    if t.batch_size == 0 {
        add("train.batch_size", "must be > 0".into());
    }
    if t.grad_accumulation == 0 {
        add("train.grad_accumulation", "must be > 0".into());
    }
    if t.log_every == 0 {
        add("train.log_every", "must be > 0".into());
    }
    if t.output_dir.as_os_str().is_empty() {
        add("train.output_dir", "must be set".into());
    }
    if t.seed > i64::MAX as u64 {
        add(
            "train.seed",
            format!("must be at most {} (a TOML integer)", i64::MAX),
        );
    }
    if !groups.vision.is_trained() && !groups.projector.is_trained() && !groups.lm.is_trained() {
        add(
            "train.freeze_lm",
            "nothing is trained: the vision tower, the projector and the language model are all \
             frozen and LoRA is disabled"
                .into(),
        );
    }

    p
}
