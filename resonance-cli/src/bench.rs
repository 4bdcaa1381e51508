//! `resonance bench`: runs the workloads of `bench/workloads.json`, each in a child process of
//! this binary (so the peak RSS is per workload), writes the result JSON and prints a table;
//! with `--compare`, also the ratios against `bench/reference.py`'s JSON.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use resonance_core::config::Dtype;
use resonance_train::bench::{
    build_profile, compare_table, cpu_model, dtype_name, file_sha256, load_avg, matmul_peak,
    print_table, run_workload, weights_file, weights_info, BenchSpec, RunOptions, SCHEMA_VERSION,
};
use resonance_train::trainer::float_dtype;
use serde_json::{json, Map, Value};

use crate::backend::{self, BackendKind};
use crate::parse_dtype;

/// Arguments of `resonance bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The workloads file.
    #[arg(long, default_value = "bench/workloads.json")]
    pub workloads: PathBuf,
    /// The model directory with the benchmark weights (default: `model.weights_dir` of the
    /// workloads file, relative to the current directory).
    #[arg(long)]
    pub weights_dir: Option<PathBuf>,
    /// Timed steps per workload (default: the workloads file's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Untimed warm-up steps, at least one is run (default: the workloads file's).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Comma-separated workload names (default: all).
    #[arg(long)]
    pub only: Option<String>,
    /// Compute threads (`RAYON_NUM_THREADS` of the children; default: all usable cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where to write the results.
    #[arg(long, default_value = "bench/.cache/resonance.json")]
    pub out: PathBuf,
    /// A PyTorch result (`bench/reference.py`'s JSON) to compare with.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Do not run: read `--out` and only print (and `--compare`).
    #[arg(long)]
    pub no_run: bool,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// Precision: f32, bf16 or f16. Training keeps trained weights in f32 and stores the frozen
    /// ones in the dtype (as `model.dtype`); scoring and generation store every weight in it
    /// (as `--dtype` of `score`/`generate`). The matmul peak is measured in the same dtype.
    #[arg(long, value_parser = parse_dtype, default_value = "f32")]
    pub dtype: Dtype,
    /// Run one workload in this process and write its JSON here (internal).
    #[arg(long, hide = true, requires = "child_out")]
    pub child: Option<String>,
    #[arg(long, hide = true)]
    pub child_out: Option<PathBuf>,
}

/// The compute threads of the bench's parent and children: `--threads`, else every usable core.
/// The CLI builds its pool with this count, so the parent measures the matmul peak with the
/// children's thread count.
pub fn compute_threads(args: &BenchArgs) -> usize {
    args.threads.unwrap_or_else(usable_cores).max(1)
}

fn usable_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `--dtype` as the children are given it.
fn dtype_arg(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "f32",
        Dtype::Bf16 => "bf16",
        Dtype::F16 => "f16",
    }
}

fn backend_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Cpu => "flex",
        BackendKind::Ndarray => "ndarray",
        BackendKind::Wgpu => "wgpu",
        BackendKind::Cuda => "cuda",
    }
}

/// Which attention the model runs on this backend (`resonance_models::nn::attention`).
fn attention_implementation(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Cpu => "resonance fused attention extension (cpu_attention kernels)",
        _ => "burn::tensor::module::attention",
    }
}

fn backend_arg(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Cpu => "cpu",
        BackendKind::Ndarray => "ndarray",
        BackendKind::Wgpu => "wgpu",
        BackendKind::Cuda => "cuda",
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let spec = BenchSpec::load(&args.workloads)
        .with_context(|| format!("reading {}", args.workloads.display()))?;
    let weights_dir = args
        .weights_dir
        .clone()
        .unwrap_or_else(|| spec.weights_dir.clone());
    let threads = compute_threads(&args);
    let options = RunOptions {
        steps: args.steps.unwrap_or(spec.steps),
        warmup: args.warmup.unwrap_or(spec.warmup),
        threads,
        dtype: float_dtype(args.dtype),
    };
    if options.steps == 0 {
        bail!("--steps must be ≥ 1");
    }

    if let (Some(name), Some(out)) = (&args.child, &args.child_out) {
        let device = backend::device(args.backend)?;
        let result = run_workload(&spec, name, &weights_dir, &options, &device)?;
        std::fs::write(out, serde_json::to_vec(&Value::Object(result))?)
            .with_context(|| format!("writing {}", out.display()))?;
        return Ok(());
    }

    let result: Value = if args.no_run {
        let text = std::fs::read_to_string(&args.out)
            .with_context(|| format!("--no-run: reading {}", args.out.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", args.out.display()))?
    } else {
        let result = run_all(&args, &spec, &weights_dir, &options)?;
        if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(&result)? + "\n";
        std::fs::write(&args.out, text)
            .with_context(|| format!("writing {}", args.out.display()))?;
        result
    };
    println!();
    print!("{}", print_table(&result));
    if !args.no_run {
        println!("\nwrote {}", args.out.display());
    }
    let mut ok = result["workloads"]
        .as_object()
        .is_some_and(|w| w.values().all(|r| r["ok"] == json!(true)));
    if let Some(path) = &args.compare {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading {} (run `python bench/reference.py` first, or use bench/run.sh)",
                path.display()
            )
        })?;
        let pytorch: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let (table, agree) = compare_table(&result, &pytorch);
        println!("\nResonance vs PyTorch ({})", path.display());
        print!("{table}");
        ok &= agree;
    }
    if !ok {
        bail!("some workloads failed or disagree (see above)");
    }
    Ok(())
}

fn run_all(
    args: &BenchArgs,
    spec: &BenchSpec,
    weights_dir: &Path,
    options: &RunOptions,
) -> Result<Value> {
    let weights = weights_file(weights_dir)?;
    let names: Vec<String> = match &args.only {
        Some(list) => list.split(',').map(|s| s.trim().to_string()).collect(),
        None => spec.workloads.iter().map(|(n, _)| n.clone()).collect(),
    };
    for name in &names {
        spec.workload(name)?;
    }
    let load_start = load_avg();
    let device = backend::device(args.backend)?;
    let peak = matmul_peak(&device, 2048, 10, 2, options.dtype)?;
    let peak_gflops = peak["gflops"].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "matmul peak: {peak_gflops:.1} GFLOP/s ({} threads, {}, {})",
        options.threads,
        backend_name(args.backend),
        peak["product_library"].as_str().unwrap_or("?"),
    );
    let weights_sha256 = file_sha256(&weights)?;
    let info = weights_info(weights_dir);
    let exe = std::env::current_exe().context("locating the resonance binary")?;
    let tmp = std::env::temp_dir().join(format!("resonance-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

    let mut workloads = Map::new();
    for name in &names {
        let kind = spec.workload(name)?.kind.as_str();
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(format!(
            "{name}: {} untimed + {} timed steps",
            options.warmup.max(1),
            options.steps
        ));
        bar.enable_steady_tick(std::time::Duration::from_millis(500));
        let out_file = tmp.join(format!("{name}.json"));
        let started = Instant::now();
        let output = Command::new(&exe)
            .arg("bench")
            .args(["--child", name, "--child-out"])
            .arg(&out_file)
            .arg("--workloads")
            .arg(&args.workloads)
            .arg("--weights-dir")
            .arg(weights_dir)
            .args(["--steps", &options.steps.to_string()])
            .args(["--warmup", &options.warmup.to_string()])
            .args(["--threads", &options.threads.to_string()])
            .args(["--backend", backend_arg(args.backend)])
            .args(["--dtype", dtype_arg(args.dtype)])
            .env("RAYON_NUM_THREADS", options.threads.to_string())
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        bar.finish_and_clear();
        let wall = started.elapsed().as_secs_f64();
        let parsed = std::fs::read_to_string(&out_file)
            .ok()
            .and_then(|t| serde_json::from_str::<Map<String, Value>>(&t).ok());
        let mut r = match (output.status.success(), parsed) {
            (true, Some(r)) => r,
            _ => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let tail: String = stderr
                    .chars()
                    .rev()
                    .take(4000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                eprintln!("[{name}] failed:\n{tail}");
                let mut r = Map::new();
                r.insert("kind".into(), json!(kind));
                r.insert("ok".into(), json!(false));
                r.insert("error".into(), json!(tail));
                r
            }
        };
        let _ = std::fs::remove_file(&out_file);
        if r["ok"] == json!(true) {
            let fraction = r["gflops_per_s"].as_f64().unwrap_or(f64::NAN) / peak_gflops;
            r.insert("fraction_of_peak".into(), json!(fraction));
            eprintln!(
                "[{name}] median {:.3} s, {:.1} tokens/s, {:.1} GFLOP/s, peak RSS {:.0} MB ({wall:.0} s wall)",
                r["median_s"].as_f64().unwrap_or(f64::NAN),
                r["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                r["gflops_per_s"].as_f64().unwrap_or(f64::NAN),
                r["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
            );
        }
        r.insert("wall_s".into(), json!(wall));
        workloads.insert(name.clone(), Value::Object(r));
    }
    let _ = std::fs::remove_dir(&tmp);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(json!({
        "schema_version": SCHEMA_VERSION,
        "implementation": "resonance",
        "created_unix": created,
        "versions": {
            "resonance": env!("CARGO_PKG_VERSION"),
            "burn": "0.22.1",
            "build_profile": build_profile(),
        },
        "backend": backend_name(args.backend),
        "machine": {
            "cpu_model": cpu_model(),
            "cores": usable_cores(),
            "threads": options.threads,
            "load_avg_start": load_start,
            "load_avg_end": load_avg(),
        },
        "matmul_peak": peak,
        "model": {
            "config_dir": spec.config_dir,
            "weights": weights.display().to_string(),
            "weights_sha256": weights_sha256,
            "seed": info.as_ref().and_then(|i| i.get("seed").cloned()).unwrap_or(json!(spec.seed)),
            "dtype": dtype_name(options.dtype),
            "attn_implementation": attention_implementation(args.backend),
            "params": info.as_ref().and_then(|i| i.get("params").cloned()).unwrap_or(Value::Null),
        },
        "settings": {
            "steps": options.steps,
            "warmup": options.warmup,
            "workloads_file": args.workloads.display().to_string(),
            "workloads_sha256": spec.sha256,
            "statistic": "median",
        },
        "workloads": workloads,
    }))
}
