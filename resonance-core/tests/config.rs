//! The experiment config: parsing, unknown keys, invalid values, overrides, round trip.

use std::path::{Path, PathBuf};

use resonance_core::config::{
    BackendKind, ConfigError, Dtype, ExperimentConfig, GroupTraining, Method, ScheduleKind, StopAt,
    TargetModules,
};
use resonance_core::data::{DataFormat, Mixing, OnError};

fn config_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/configs")
        .join(name)
}

const MINIMAL: &str = "[model]\npath = \"m\"\n\n[[data.datasets]]\npath = \"d.json\"\n";

#[test]
fn defaults() {
    let c = ExperimentConfig::from_str(MINIMAL).unwrap();
    assert_eq!(c.model.dtype, Dtype::F32);
    assert_eq!(c.method.name, Method::Sft);
    assert_eq!(c.data.mixing, Mixing::Size);
    assert_eq!(c.data.max_length, 2048);
    assert_eq!(c.data.on_error, OnError::Fail);
    assert_eq!(c.data.datasets[0].format, DataFormat::Llava);
    assert!(!c.lora.enabled);
    assert_eq!(c.lora.target_modules, TargetModules::Auto);
    assert_eq!(c.optim.lr, 2e-5);
    assert_eq!(c.optim.betas, [0.9, 0.999]);
    assert_eq!(c.schedule.kind, ScheduleKind::Cosine);
    assert_eq!(c.train.stop_at(), StopAt::Epochs(1));
    assert_eq!(c.train.seed, 42);
    assert_eq!(c.backend.kind, BackendKind::Cpu);
    let g = c.trainable_groups();
    assert_eq!(
        (g.vision, g.projector, g.lm),
        (
            GroupTraining::Frozen,
            GroupTraining::Full,
            GroupTraining::Full
        )
    );
}

#[test]
fn full_sample_config() {
    let c = ExperimentConfig::from_file(config_path("sft.toml")).unwrap();
    assert_eq!(c.data.mixing, Mixing::Ratio);
    assert_eq!(c.data.num_samples, Some(12));
    assert_eq!(c.data.datasets.len(), 2);
    assert_eq!(c.data.datasets[1].format, DataFormat::Flamingo);
    assert_eq!(c.data.datasets[0].weight, Some(2.0));
    assert_eq!(
        c.lora.target_modules,
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
    );
    assert_eq!(c.optim.group_lrs(), (1e-4, 2e-5, 1e-4));
    assert_eq!(c.schedule.warmup_steps_for(1000), 30);
    assert_eq!(c.train.stop_at(), StopAt::Epochs(2));
    // LoRA on the LM: its base is frozen by default.
    let g = c.trainable_groups();
    assert_eq!(
        (g.vision, g.projector, g.lm),
        (
            GroupTraining::Frozen,
            GroupTraining::Full,
            GroupTraining::Lora
        )
    );
}

#[test]
fn sample_config_loads_its_datasets_and_sampler() {
    // Dataset paths in the sample config are relative to the crate directory, which is the
    // working directory of `cargo test`.
    let c = ExperimentConfig::from_file(config_path("sft.toml")).unwrap();
    let datasets = c.data.load_datasets().unwrap();
    assert_eq!(datasets[0].name, "llava");
    assert_eq!(datasets[1].name, "flamingo");
    assert_eq!(datasets[0].len(), 4);
    let sampler = c.data.sampler(&datasets, c.train.seed).unwrap();
    assert_eq!(sampler.num_samples(), 12);
    let p = sampler.probabilities();
    assert!((p[0] - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(sampler.epoch_counts(0), vec![8, 4]);
}

#[test]
fn unknown_key_names_the_key_and_line() {
    let err = ExperimentConfig::from_file(config_path("unknown_key.toml")).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ConfigError::Parse {
                line: 9,
                column: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(msg.contains("unknown_key.toml:9:1"), "{msg}");
    assert!(msg.contains("key `optim.learning_rate`"), "{msg}");
    assert!(msg.contains("unknown field `learning_rate`"), "{msg}");

    // Unknown section, and a misspelt key with a suggestion.
    let err = ExperimentConfig::from_str("[trainer]\nseed = 1\n").unwrap_err();
    assert!(err.to_string().contains("<string>:1:"), "{err}");
    assert!(err.to_string().contains("unknown field `trainer`"), "{err}");
    let err = ExperimentConfig::from_str("[lora]\nrnak = 4\n").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("<string>:2:1: key `lora.rnak`"), "{msg}");
    assert!(msg.contains("did you mean `lora.rank`?"), "{msg}");
    // Inside an array of tables.
    let err = ExperimentConfig::from_str(
        "[[data.datasets]]\npath = \"a\"\n\n[[data.datasets]]\npath = \"b\"\nratio = 2\n",
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("<string>:6:1: key `data.datasets[1].ratio`"),
        "{msg}"
    );
}

#[test]
fn wrong_type_names_the_key_and_line() {
    let err = ExperimentConfig::from_file(config_path("bad_type.toml")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("bad_type.toml:8:"), "{msg}");
    assert!(msg.contains("key `lora.rank`"), "{msg}");
    let err = ExperimentConfig::from_str("[data]\nmixing = \"weighted\"\n").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("key `data.mixing`"), "{msg}");
    assert!(msg.contains("weighted"), "{msg}");
    let err = ExperimentConfig::from_str("[lora]\ntarget_modules = \"all\"\n").unwrap_err();
    assert!(
        err.to_string()
            .contains("\"auto\" or a list of module names"),
        "{err}"
    );
}

#[test]
fn syntax_error_has_line_and_column() {
    let err = ExperimentConfig::from_str("[model]\npath = \"m\n").unwrap_err();
    assert!(matches!(err, ConfigError::Parse { line: 2, .. }), "{err:?}");
}

#[test]
fn lora_with_full_lm_fine_tune_conflicts() {
    let err = ExperimentConfig::from_file(config_path("conflict.toml")).unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.keys(), vec!["train.freeze_lm"]);
    assert!(
        msg.contains("conflict.toml:11: key `train.freeze_lm`"),
        "{msg}"
    );
    assert!(msg.contains("conflicts with lora.enabled"), "{msg}");

    // Same for the vision tower.
    let text = format!(
        "{MINIMAL}[lora]\nenabled = true\napply_to_vision = true\n[train]\nfreeze_vision = false\n"
    );
    let err = ExperimentConfig::from_str(&text).unwrap_err();
    assert_eq!(err.keys(), vec!["train.freeze_vision"]);
}

#[test]
fn every_invalid_value_is_reported_with_its_key() {
    let err = ExperimentConfig::from_file(config_path("invalid_values.toml")).unwrap_err();
    let msg = err.to_string();
    assert_eq!(
        err.keys(),
        vec![
            "data.datasets[1].weight",
            "lora.rank",
            "optim.lr",
            "schedule.warmup_steps"
        ],
        "{msg}"
    );
    assert!(
        msg.contains("invalid_values.toml:12: key `data.datasets[1].weight`"),
        "{msg}"
    );
    assert!(msg.contains("mixing is \"sqrt\""), "{msg}");
    assert!(
        msg.contains("invalid_values.toml:15: key `lora.rank`: must be > 0"),
        "{msg}"
    );
    assert!(
        msg.contains("invalid_values.toml:18: key `optim.lr`: must be > 0"),
        "{msg}"
    );
    assert!(
        msg.contains("invalid_values.toml:22: key `schedule.warmup_steps`"),
        "{msg}"
    );
}

#[test]
fn more_validation_rules() {
    let check = |extra: &str, key: &str| {
        let text = format!("{MINIMAL}{extra}");
        let err = ExperimentConfig::from_str(&text).expect_err(extra);
        assert!(err.keys().contains(&key), "{extra}: {err}");
    };
    check("[schedule]\nwarmup_ratio = 1.0\n", "schedule.warmup_ratio");
    let with_dtype = |d: &str| {
        format!("[model]\npath = \"m\"\ndtype = \"{d}\"\n\n[[data.datasets]]\npath = \"d.json\"\n")
    };
    let half = ExperimentConfig::from_str(&with_dtype("bf16")).expect("bf16 is accepted");
    assert_eq!(half.model.dtype, Dtype::Bf16);
    let err = ExperimentConfig::from_str(&with_dtype("fp8")).expect_err("fp8 is unknown");
    assert!(err.to_string().contains("dtype"), "{err}");
    check("[lora]\nqlora = true\n", "lora.qlora");
    check("[lora]\ndropout = 1.5\n", "lora.dropout");
    check("[lora]\ntarget_modules = []\n", "lora.target_modules");
    check("[optim]\nbetas = [0.9, 1.0]\n", "optim.betas");
    check("[optim]\nvision_lr = 1e-5\n", "optim.vision_lr");
    check("[train]\nepochs = 1\nmax_steps = 10\n", "train.max_steps");
    check("[train]\nbatch_size = 0\n", "train.batch_size");
    check(
        "[train]\nfreeze_projector = true\nfreeze_lm = true\n",
        "train.freeze_lm",
    );
    check(
        "[data]\nmax_prompt_length = 4096\n",
        "data.max_prompt_length",
    );
    let err = ExperimentConfig::from_str("").unwrap_err();
    assert_eq!(err.keys(), vec!["model.path", "data.datasets"]);
    let err = ExperimentConfig::from_str(
        "[model]\npath = \"m\"\n[[data.datasets]]\npath = \"a/x.json\"\n[[data.datasets]]\npath = \"b/x.json\"\n",
    )
    .unwrap_err();
    assert_eq!(err.keys(), vec!["data.datasets[1].name"]);
    // Ratio weights are fine under `ratio`; vision_lr is fine with LoRA on the vision tower.
    ExperimentConfig::from_str(&format!(
        "{MINIMAL}[data]\nmixing = \"ratio\"\n[lora]\nenabled = true\napply_to_vision = true\nqlora = true\n[optim]\nvision_lr = 1e-5\n"
    ))
    .unwrap();
}

#[test]
fn overrides() {
    let mut c = ExperimentConfig::from_str(MINIMAL).unwrap();
    assert_eq!(c.apply_override("optim.lr=1e-5").unwrap(), "optim.lr");
    assert_eq!(c.optim.lr, 1e-5);
    c.apply_override("train.epochs = 3").unwrap();
    assert_eq!(c.train.epochs, Some(3));
    c.apply_override("model.path=/models/llava-1.5").unwrap();
    assert_eq!(c.model.path, "/models/llava-1.5");
    c.apply_override("lora.target_modules=[\"q_proj\",\"k_proj\"]")
        .unwrap();
    assert_eq!(
        c.lora.target_modules,
        TargetModules::Names(vec!["q_proj".into(), "k_proj".into()])
    );
    c.apply_override("data.mixing=ratio").unwrap();
    c.apply_override("data.datasets[0].weight=2.5").unwrap();
    c.apply_override("data.datasets.1.path=more.jsonl").unwrap();
    c.apply_override("data.datasets[1].format=text").unwrap();
    assert_eq!(c.data.datasets.len(), 2);
    assert_eq!(c.data.datasets[0].weight, Some(2.5));
    assert_eq!(c.data.datasets[1].format, DataFormat::Text);
    c.apply_override("train.freeze_lm=true").unwrap();
    c.validate().unwrap();
}

#[test]
fn override_errors_name_the_key() {
    let mut c = ExperimentConfig::from_str(MINIMAL).unwrap();
    let before = c.clone();

    // `train.lr` does not exist: the error names it and suggests `optim.lr`.
    let err = c.apply_override("train.lr=1e-5").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("key `train.lr`"), "{msg}");
    assert!(msg.contains("unknown field `lr`"), "{msg}");
    assert!(msg.contains("did you mean `optim.lr`?"), "{msg}");

    let err = c.apply_override("train.epochs=many").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("key `train.epochs`"), "{msg}");
    assert!(msg.contains("invalid type"), "{msg}");

    let err = c.apply_override("trian.seed=1").unwrap_err();
    assert!(err.to_string().contains("unknown key `trian`"), "{err}");
    let err = c.apply_override("data.datasets[5].path=x").unwrap_err();
    assert!(err.to_string().contains("index 5 out of range"), "{err}");
    let err = c.apply_override("optim.lr").unwrap_err();
    assert!(err.to_string().contains("expected `key=value`"), "{err}");
    let err = c.apply_override("lora.enabled=yes").unwrap_err();
    assert!(err.to_string().contains("key `lora.enabled`"), "{err}");
    // A failed override leaves the config unchanged.
    assert_eq!(c, before);
}

#[test]
fn load_applies_overrides_then_validates() {
    let path = config_path("conflict.toml");
    // The conflict is resolved from the command line.
    let c = ExperimentConfig::load(&path, &["train.freeze_lm=true"]).unwrap();
    assert_eq!(c.trainable_groups().lm, GroupTraining::Lora);
    let c = ExperimentConfig::load(&path, &["lora.enabled=false"]).unwrap();
    assert_eq!(c.trainable_groups().lm, GroupTraining::Full);
    // An overridden key has no file line in the message.
    let err = ExperimentConfig::load(&path, &["lora.rank=0", "train.seed=3"]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("conflict.toml: key `lora.rank`: must be > 0"),
        "{msg}"
    );
    assert!(
        msg.contains("conflict.toml:11: key `train.freeze_lm`"),
        "{msg}"
    );
}

#[test]
fn resolved_config_round_trips() {
    let c = ExperimentConfig::from_file(config_path("sft.toml")).unwrap();
    let text = c.to_toml_string().unwrap();
    let back = ExperimentConfig::from_str(&text).unwrap();
    assert_eq!(back, c);
    assert!(text.contains("[[data.datasets]]"), "{text}");
    // Defaults are written out too.
    assert!(text.contains("max_grad_norm = 1.0"), "{text}");
    let d = ExperimentConfig::from_str(MINIMAL).unwrap();
    assert_eq!(
        ExperimentConfig::from_str(&d.to_toml_string().unwrap()).unwrap(),
        d
    );
}

#[test]
fn missing_config_file() {
    let err = ExperimentConfig::from_file("/nonexistent/x.toml").unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }));
    assert!(
        err.to_string().starts_with("/nonexistent/x.toml: "),
        "{err}"
    );
}

#[test]
fn docs_cover_every_key() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CONFIG.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/CONFIG.md");
    let keys = ExperimentConfig::known_keys();
    assert!(keys.len() > 40, "{keys:?}");
    for key in keys {
        // Documented as `name` in the section's table.
        let leaf = key.rsplit('.').next().unwrap();
        let section = key.split('.').next().unwrap();
        assert!(
            doc.contains(&format!("[{section}")) && doc.contains(&format!("`{leaf}`")),
            "docs/CONFIG.md does not document `{key}`"
        );
    }
}

#[test]
fn docs_example_is_valid() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CONFIG.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/CONFIG.md");
    let start = doc.find("```toml\n").expect("a ```toml example") + "```toml\n".len();
    let end = start + doc[start..].find("```").unwrap();
    let c = ExperimentConfig::from_str(&doc[start..end]).unwrap();
    let g = c.trainable_groups();
    assert_eq!(
        (g.vision, g.projector, g.lm),
        (
            GroupTraining::Frozen,
            GroupTraining::Full,
            GroupTraining::Lora
        )
    );
    assert_eq!(c.optim.group_lrs(), (2e-4, 2e-5, 2e-4));
}

#[test]
fn preference_methods_accept_every_paired_format() {
    let cfg = |method: &str, format: &str, extra: &str| {
        format!(
            "[model]\npath = \"m\"\n[method]\nname = \"{method}\"\n[[data.datasets]]\npath = \"d.jsonl\"\nformat = \"{format}\"\n{extra}"
        )
    };
    for method in ["dpo", "simpo", "orpo"] {
        for format in [
            "plain_dpo",
            "vlfeedback_paired",
            "rlhfv",
            "conversational_preference",
        ] {
            ExperimentConfig::from_str(&cfg(method, format, "")).unwrap();
        }
        let err = ExperimentConfig::from_str(&cfg(method, "unpaired", "")).unwrap_err();
        assert_eq!(err.keys(), vec!["data.datasets[0].format"], "{err}");
        assert!(
            err.to_string().contains("\"conversational_preference\""),
            "{err}"
        );
    }
    ExperimentConfig::from_str(&cfg("kto", "unpaired", "")).unwrap();
    let err = ExperimentConfig::from_str(&cfg("kto", "rlhfv", "")).unwrap_err();
    assert_eq!(err.keys(), vec!["data.datasets[0].format"]);
    assert!(Method::Sft.accepts(DataFormat::VlfeedbackPaired));
    assert!(Method::Dpo.accepts(DataFormat::Rlhfv));
    assert!(!Method::Kto.accepts(DataFormat::PlainDpo));

    // Eval datasets are named as such.
    let err = ExperimentConfig::from_str(&cfg(
        "dpo",
        "rlhfv",
        "[[data.eval_datasets]]\npath = \"e.jsonl\"\nformat = \"llava\"\n",
    ))
    .unwrap_err();
    assert_eq!(err.keys(), vec!["data.eval_datasets[0].format"], "{err}");
}

#[test]
fn score_margin_is_checked() {
    let cfg = |format: &str, margin: &str| {
        format!(
            "[model]\npath = \"m\"\n[method]\nname = \"dpo\"\n[[data.datasets]]\npath = \"d.jsonl\"\nformat = \"{format}\"\nscore_margin = {margin}\n"
        )
    };
    let c = ExperimentConfig::from_str(&cfg("vlfeedback_paired", "1.5")).unwrap();
    assert_eq!(c.data.datasets[0].score_margin, Some(1.5));
    assert_eq!(
        c.data.datasets[0].load_options(OnError::Fail).score_margin,
        1.5
    );
    ExperimentConfig::from_str(&cfg("vlfeedback_paired", "-1")).unwrap();
    ExperimentConfig::from_str(&cfg("vlfeedback_paired", "0")).unwrap();
    for (format, margin) in [
        ("vlfeedback_paired", "-0.5"),
        ("vlfeedback_paired", "nan"),
        ("plain_dpo", "1"),
    ] {
        let err = ExperimentConfig::from_str(&cfg(format, margin)).unwrap_err();
        assert_eq!(
            err.keys(),
            vec!["data.datasets[0].score_margin"],
            "{format} {margin}: {err}"
        );
    }
    // Unset: VL-RLHF's default, the largest-gap pairs.
    let c = ExperimentConfig::from_str(&cfg("vlfeedback_paired", "-1")).unwrap();
    let mut d = c.data.datasets[0].clone();
    d.score_margin = None;
    assert_eq!(d.load_options(OnError::Fail).score_margin, -1.0);
}
