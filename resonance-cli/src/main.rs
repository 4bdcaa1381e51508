//! `resonance`: train, score and run vision-language models on CPU, wgpu or CUDA.

mod allocator;
mod backend;
mod bench;
mod plot;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use resonance_core::config::{BackendKind as ConfigBackend, Dtype, ExperimentConfig};
use resonance_models::generate::{generate, SamplingConfig};
use resonance_models::load::resolve_model;
use resonance_models::processor::Processor;
use resonance_models::registry::{architectures, AnyModel};
use resonance_train::data_check::check_data;
use resonance_train::score::{
    pair_reference_logps, read_score_records, reward_records, score_records, with_reference_logps,
    PairScoring,
};
use resonance_train::trainer::{float_dtype, merge_lora, train, Resume, TrainOptions};

use backend::BackendKind;

#[derive(Parser)]
#[command(
    name = "resonance",
    version,
    about = "Train vision-language models with human preferences"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Log-probabilities of responses given prompts (and images), one JSON line per input line.
    Score {
        /// Model directory in Hugging Face layout, or a hub id (e.g. llava-hf/llava-1.5-7b-hf).
        #[arg(long)]
        model: String,
        /// JSONL file: {"image": "a.png", "prompt": "...", "response": "..."} per line.
        #[arg(long)]
        data: PathBuf,
        /// Folder image paths are relative to (default: the data file's folder).
        #[arg(long)]
        image_root: Option<PathBuf>,
        /// Where to write the results (default: standard output).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Records per forward pass.
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Print each response's reward under a reward model (a checkpoint with a value head)
        /// instead of its log-probabilities.
        #[arg(long)]
        reward: bool,
        /// Precompute DPO's reference log-probs: `--data` is a JSON-lines preference file of
        /// this format (plain_dpo, rlhfv, conversational_preference); the output is that file
        /// with `ref_chosen_logps` / `ref_rejected_logps` added to every record.
        #[arg(long, value_name = "FORMAT")]
        pairs: Option<String>,
        /// With --pairs: the training run's data.max_length.
        #[arg(long, default_value_t = 2048)]
        max_length: usize,
        /// With --pairs: the training run's data.max_prompt_length.
        #[arg(long)]
        max_prompt_length: Option<usize>,
        #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
        backend: BackendKind,
        /// Weights and activations in this dtype: f32, bf16 or f16 (bf16/f16 where the backend
        /// has it; log-probs are computed in f32).
        #[arg(long, value_parser = parse_dtype, default_value = "f32")]
        dtype: Dtype,
    },
    /// Generate a response to a prompt (and images).
    Generate {
        /// Model directory or hub id.
        #[arg(long)]
        model: String,
        /// Image file(s); repeat for several.
        #[arg(long)]
        image: Vec<PathBuf>,
        /// The user prompt.
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 0 means greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print a JSON object with the text and the token ids.
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
        backend: BackendKind,
        /// Weights and activations in this dtype: f32, bf16 or f16 (bf16/f16 where the backend
        /// has it; log-probs are computed in f32).
        #[arg(long, value_parser = parse_dtype, default_value = "f32")]
        dtype: Dtype,
    },
    /// List the supported architectures and the config `model_type`s they accept.
    Models,
    /// Train a model as a TOML experiment config describes (see docs/CONFIG.md).
    Train {
        /// The experiment config.
        #[arg(long)]
        config: PathBuf,
        /// Override a config value, e.g. `--set optim.lr=1e-5` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue from the newest checkpoint of the run directory, or from the given one.
        #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1, default_missing_value = "")]
        resume: Option<String>,
        /// Stop after this many optimizer steps (as if interrupted; checkpoints are written).
        #[arg(long, hide = true)]
        stop_after: Option<u64>,
        /// Override `[backend] kind`.
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
    },
    /// Dataset tools.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Fold a PEFT LoRA adapter into its base model and write a full transformers checkpoint.
    MergeLora {
        /// The base model directory or hub id.
        #[arg(long)]
        base: String,
        /// The adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// The output directory.
        #[arg(long)]
        output: PathBuf,
    },
    /// Benchmark training, scoring and generation on `bench/workloads.json` (see
    /// docs/PERFORMANCE.md); `--compare` prints the ratios against `bench/reference.py`'s results.
    Bench(bench::BenchArgs),
    /// Draw the loss and learning-rate curves of a run (its metrics.jsonl) into a PNG.
    Plot {
        /// The run directory.
        run_dir: PathBuf,
        /// The PNG to write (default: RUN_DIR/curves.png).
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Validate the datasets of a config without training: counts, token lengths, missing
    /// images, refused records, and examples with the trained tokens marked.
    Check {
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// How many rendered examples to show.
        #[arg(long, default_value_t = 2)]
        examples: usize,
    },
}

fn main() {
    allocator::configure_for_tensors();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Bench(args) => Some(bench::compute_threads(args)),
        _ => None,
    };
    if let Err(err) = run_in_compute_pool(threads, move || run(cli)) {
        eprintln!("error: {}", describe(&err));
        std::process::exit(1);
    }
}

/// An error and its causes on one line, as anyhow's `{:#}`, without repeating a cause that the
/// message before it already ends with (the libraries' I/O errors name their file and quote
/// their source, which is also their `source()`).
fn describe(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Runs `work` on a thread of Rayon's global pool (`threads` of them, or `RAYON_NUM_THREADS`,
/// or one per core), so that the thread issuing the compute kernels is one of the threads that
/// run them. From outside the pool, every split kernel (each matrix product, each element-wise
/// pass) waits for a sleeping worker to wake, take the job and wake the next; from inside,
/// the issuing thread runs its share at once and wakes one (the bench's SFT step: the second
/// block of a product started 0.2 ms after the first on average, 0.07 ms from inside).
fn run_in_compute_pool(
    threads: Option<usize>,
    work: impl FnOnce() -> Result<()> + Send,
) -> Result<()> {
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        // Loading and the trainers run here rather than on the main thread: give them its
        // usual stack.
        .stack_size(8 << 20)
        .thread_name(|i| format!("compute-{i}"))
        .build_global();
    if let Err(e) = built {
        tracing::warn!("compute threads: {e}; kernels use Rayon's default pool");
    }
    let mut result = Ok(());
    rayon::scope(|_| result = work());
    result
}

/// `--dtype`, spelled as `model.dtype` in a config.
pub(crate) fn parse_dtype(text: &str) -> std::result::Result<Dtype, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string()))
        .map_err(|_| format!("`{text}` is not a dtype (f32, bf16, f16)"))
}

fn load(
    reference: &str,
    backend: BackendKind,
    dtype: Dtype,
) -> Result<(AnyModel, Processor, burn::tensor::Device)> {
    let device = backend::device(backend)?;
    let dir = resolve_model(reference)?;
    tracing::info!(model = %dir.display(), backend = ?backend, dtype = ?dtype, "loading");
    let model = AnyModel::load(&dir, &device)
        .and_then(|m| m.into_precision(float_dtype(dtype), &device))
        .with_context(|| format!("loading {reference}"))?;
    let processor = Processor::from_dir(&dir, &model)
        .with_context(|| format!("loading the processor of {reference}"))?;
    Ok((model, processor, device))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Models => {
            for arch in architectures() {
                println!(
                    "{:<32} model_type: {:<16} {}",
                    arch.name,
                    arch.model_types.join(", "),
                    arch.description
                );
            }
            println!(
                "backends compiled in: {}",
                backend::compiled_backends().join(", ")
            );
            Ok(())
        }
        Command::Train {
            config,
            set,
            resume,
            stop_after,
            backend,
        } => {
            let experiment = ExperimentConfig::load(&config, &set)
                .with_context(|| format!("reading {}", config.display()))?;
            let kind = backend.unwrap_or(match experiment.backend.kind {
                ConfigBackend::Cpu => BackendKind::Cpu,
                ConfigBackend::Wgpu => BackendKind::Wgpu,
                ConfigBackend::Cuda => BackendKind::Cuda,
            });
            let device = backend::device(kind)?;
            let options = TrainOptions {
                resume: resume.map(|r| {
                    if r.is_empty() {
                        Resume::Latest
                    } else {
                        Resume::Dir(PathBuf::from(r))
                    }
                }),
                progress: std::io::stderr().is_terminal(),
                stop_after,
            };
            let summary = train(&experiment, &options, &device)?;
            let first = summary.losses.first().map(|l| l.1).unwrap_or(f64::NAN);
            let last = summary.losses.last().map(|l| l.1).unwrap_or(f64::NAN);
            println!(
                "trained {}/{} steps: loss {first:.4} -> {last:.4}, {:.3} s/step, {:.0} tokens/s, \
                 {} of {} parameters trained",
                summary.global_step,
                summary.total_steps,
                summary.mean_step_seconds,
                summary.tokens_per_second,
                summary.trainable_parameters,
                summary.total_parameters,
            );
            if !summary.refused.is_empty() {
                println!("refused records: {:?}", summary.refused);
            }
            match &summary.final_dir {
                Some(dir) => println!("output: {}", dir.display()),
                None => println!(
                    "stopped early; continue with --resume (checkpoints in {})",
                    summary.run_dir.display()
                ),
            }
            Ok(())
        }
        Command::Data {
            command:
                DataCommand::Check {
                    config,
                    set,
                    examples,
                },
        } => {
            let experiment = ExperimentConfig::load(&config, &set)
                .with_context(|| format!("reading {}", config.display()))?;
            let report = check_data(&experiment, examples)?;
            print!("{}", report.render(experiment.data.max_length));
            if report.usable() == 0 {
                bail!("no usable record");
            }
            Ok(())
        }
        Command::MergeLora {
            base,
            adapter,
            output,
        } => {
            merge_lora(&base, &adapter, &output, &burn::tensor::Device::flex())?;
            println!("wrote {}", output.display());
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::Plot { run_dir, output } => {
            let output = output.unwrap_or_else(|| run_dir.join("curves.png"));
            plot::plot_run(&run_dir.join("metrics.jsonl"), &output)?;
            println!("wrote {}", output.display());
            Ok(())
        }
        Command::Score {
            model,
            data,
            image_root,
            output,
            batch_size,
            reward,
            pairs,
            max_length,
            max_prompt_length,
            backend,
            dtype,
        } => {
            if let Some(format) = pairs {
                let format: resonance_core::data::DataFormat =
                    serde_json::from_value(serde_json::Value::String(format.clone()))
                        .map_err(|_| anyhow::anyhow!("--pairs {format}: not a data format"))?;
                let (model, processor, device) = load(&model, backend, dtype)?;
                let count = std::fs::read_to_string(&data)
                    .with_context(|| format!("reading {}", data.display()))?
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .count();
                let bar = ProgressBar::new(count as u64);
                let values = pair_reference_logps(
                    &model,
                    &processor,
                    &data,
                    &PairScoring {
                        format,
                        image_root,
                        max_length,
                        max_prompt_length,
                    },
                    batch_size,
                    &device,
                    |n| bar.inc(n as u64),
                )?;
                bar.finish_and_clear();
                let text = with_reference_logps(&data, &values)?;
                match output {
                    Some(path) => write_atomically(&path, text.as_bytes())?,
                    None => std::io::stdout().write_all(text.as_bytes())?,
                }
                return Ok(());
            }
            let records = read_score_records(&data)?;
            let model_dir = resolve_model(&model)?;
            let (model, processor, device) = load(&model, backend, dtype)?;
            let root = image_root
                .unwrap_or_else(|| data.parent().map(Path::to_path_buf).unwrap_or_default());
            let bar = ProgressBar::new(records.len() as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} scoring {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let lines: Vec<String> = if reward {
                reward_records(
                    &model,
                    &model_dir,
                    &processor,
                    &records,
                    &root,
                    batch_size,
                    &device,
                    |n| bar.inc(n as u64),
                )?
                .iter()
                .map(serde_json::to_string)
                .collect::<std::result::Result<_, _>>()?
            } else {
                score_records(
                    &model,
                    &processor,
                    &records,
                    &root,
                    batch_size,
                    &device,
                    |n| bar.inc(n as u64),
                )?
                .iter()
                .map(serde_json::to_string)
                .collect::<std::result::Result<_, _>>()?
            };
            bar.finish_and_clear();
            let mut text = String::new();
            for line in &lines {
                text.push_str(line);
                text.push('\n');
            }
            match output {
                Some(path) => write_atomically(&path, text.as_bytes())?,
                None => std::io::stdout().write_all(text.as_bytes())?,
            }
            Ok(())
        }
        Command::Generate {
            model,
            image,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            json,
            backend,
            dtype,
        } => {
            if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
                bail!("--top-p must be in (0, 1], got {top_p}");
            }
            if temperature < 0.0 {
                bail!("--temperature must be ≥ 0, got {temperature}");
            }
            let (model, processor, device) = load(&model, backend, dtype)?;
            let prompt_text = processor.render_prompt(&prompt, image.len())?;
            let prompt_ids = processor.prompt_ids(&prompt_text, image.len())?;
            let pixels = processor.pixel_values(&image, &device)?;
            let mut eos = processor.tokenizer.eos_token_ids();
            eos.extend(model.text_config().eos_token_ids.iter().copied());
            let config = SamplingConfig {
                max_new_tokens,
                temperature,
                top_p,
                top_k,
                seed,
            };
            let ids = generate(&model, &prompt_ids, pixels, &eos, &config, &device, |_| {})?;
            let text = processor.tokenizer.decode(&ids, true)?;
            if json {
                let value = serde_json::json!({
                    "text": text,
                    "prompt_ids": prompt_ids,
                    "new_ids": ids,
                    "finished_with_eos": ids.last().is_some_and(|t| eos.contains(t)),
                });
                println!("{}", serde_json::to_string(&value)?);
            } else {
                println!("{text}");
            }
            Ok(())
        }
    }
}

/// Writes through a temporary file and a rename, so a crash never leaves half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-resonance");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::describe;
    use anyhow::Context;

    /// An error that quotes its source in its message, as the libraries' I/O errors do.
    #[derive(Debug)]
    struct Quoting {
        source: std::io::Error,
    }

    impl std::fmt::Display for Quoting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "data.json: {}", self.source)
        }
    }

    impl std::error::Error for Quoting {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_the_message_already_quotes_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = Err::<(), _>(Quoting { source: io })
            .context("reading the data")
            .unwrap_err();
        assert_eq!(describe(&err), "reading the data: data.json: no such file");
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe(&plain), "outer: inner");
    }
}
