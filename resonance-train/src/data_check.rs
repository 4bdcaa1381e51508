//! `resonance data check`: everything the trainer would do to the data, without training.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use resonance_core::config::ExperimentConfig;
use resonance_models::load::resolve_model;
use resonance_models::processor::Processor;

use crate::error::{Result, TrainError};
use crate::sft::{encode_conversation, SftExample};

/// The findings of a data check.
#[derive(Debug, Clone, Default)]
pub struct DataReport {
    /// `(name, path, records loaded, records skipped while loading)` per dataset.
    pub datasets: Vec<(String, String, usize, usize)>,
    /// Loading problems by kind (missing image, malformed JSON, …), with example locations.
    pub load_problems: BTreeMap<String, Vec<String>>,
    /// Records the trainer would refuse, by reason, with example locations.
    pub refused: BTreeMap<String, Vec<String>>,
    /// Token lengths of the encodable records.
    pub lengths: Vec<usize>,
    /// Trained (assistant) tokens over all encodable records.
    pub trained_tokens: usize,
    /// Rendered examples with trained tokens marked.
    pub examples: Vec<String>,
}

impl DataReport {
    /// Encodable records.
    pub fn usable(&self) -> usize {
        self.lengths.len()
    }

    /// A histogram of token lengths in 8 buckets up to `max_length`.
    pub fn histogram(&self, max_length: usize) -> Vec<(usize, usize, usize)> {
        let width = max_length.div_ceil(8).max(1);
        (0..8)
            .map(|i| {
                let (lo, hi) = (i * width, (i + 1) * width);
                let n = self.lengths.iter().filter(|&&l| l > lo && l <= hi).count();
                (lo + 1, hi, n)
            })
            .collect()
    }

    /// The human-readable report.
    pub fn render(&self, max_length: usize) -> String {
        let mut out = String::new();
        for (name, path, loaded, skipped) in &self.datasets {
            let _ = writeln!(
                out,
                "dataset {name} ({path}): {loaded} records, {skipped} skipped"
            );
        }
        list_problems(&mut out, "load problem", &self.load_problems);
        let refused: usize = self.refused.values().map(Vec::len).sum();
        let _ = writeln!(
            out,
            "usable records: {} ({refused} refused), trained tokens: {}",
            self.usable(),
            self.trained_tokens
        );
        list_problems(&mut out, "refused", &self.refused);
        if let (Some(min), Some(max)) = (self.lengths.iter().min(), self.lengths.iter().max()) {
            let mean = self.lengths.iter().sum::<usize>() as f64 / self.lengths.len() as f64;
            let _ = writeln!(
                out,
                "token lengths: min {min}, mean {mean:.1}, max {max} (max_length {max_length})"
            );
            let peak = self
                .histogram(max_length)
                .iter()
                .map(|b| b.2)
                .max()
                .unwrap_or(1)
                .max(1);
            for (lo, hi, n) in self.histogram(max_length) {
                let bar = "#".repeat((n * 40).div_ceil(peak));
                let _ = writeln!(out, "  {lo:>6}-{hi:<6} {n:>6} {bar}");
            }
        }
        for (i, example) in self.examples.iter().enumerate() {
            let _ = writeln!(
                out,
                "example {} (trained tokens between « and »):\n{example}",
                i + 1
            );
        }
        out
    }
}

/// One line per kind: its count and the first three places.
fn list_problems(out: &mut String, label: &str, problems: &BTreeMap<String, Vec<String>>) {
    for (kind, places) in problems {
        let examples: Vec<&str> = places.iter().take(3).map(String::as_str).collect();
        let _ = writeln!(
            out,
            "  {label} `{kind}`: {} — e.g. {}",
            places.len(),
            examples.join("; ")
        );
    }
}

/// Renders an example: runs of trained tokens in «…», runs of image tokens as `<image×N>`.
pub fn mark_example(processor: &Processor, example: &SftExample) -> Result<String> {
    let image_id = processor.image_tokens.map(|(id, _)| id);
    let mut out = String::new();
    let mut i = 0;
    let ids = &example.input_ids;
    while i < ids.len() {
        if Some(ids[i]) == image_id {
            let start = i;
            while i < ids.len() && Some(ids[i]) == image_id {
                i += 1;
            }
            let _ = write!(out, "<image×{}>", i - start);
            continue;
        }
        let trained = example.trained[i];
        let start = i;
        while i < ids.len() && example.trained[i] == trained && Some(ids[i]) != image_id {
            i += 1;
        }
        let text = processor
            .tokenizer
            .decode(&ids[start..i], false)
            .map_err(resonance_models::ModelError::from)?;
        if trained {
            let _ = write!(out, "«{text}»");
        } else {
            out.push_str(&text);
        }
    }
    Ok(out)
}

/// Loads, renders and tokenizes every record of the config's datasets.
pub fn check_data(config: &ExperimentConfig, examples: usize) -> Result<DataReport> {
    let model_dir = resolve_model(&config.model.path)?;
    let processor = Processor::from_config_dir(&model_dir)?;
    let mut report = DataReport::default();
    // Load with skipping so that every problem is listed, whatever on_error says.
    for dataset_config in &config.data.datasets {
        let options = dataset_config.load_options(resonance_core::data::OnError::Skip);
        let dataset = resonance_core::data::load_dataset(&dataset_config.path, &options)
            .map_err(|e| TrainError::Input(e.to_string()))?;
        report.datasets.push((
            dataset_config.display_name(),
            dataset_config.path.display().to_string(),
            dataset.len(),
            dataset.report.skipped_total(),
        ));
        for (kind, count) in &dataset.report.skipped {
            let places = report
                .load_problems
                .entry(kind.as_str().to_string())
                .or_default();
            places.extend(
                dataset
                    .report
                    .first_skipped
                    .iter()
                    .filter(|s| s.kind == *kind)
                    .map(|s| s.message.clone()),
            );
            // Keep the count right even past the stored examples.
            while places.len() < *count {
                places.push(format!("{}: (not listed)", dataset_config.path.display()));
            }
        }
        for conversation in &dataset.records {
            match encode_conversation(&processor, conversation, config.data.max_length)? {
                Ok(example) => {
                    report.lengths.push(example.input_ids.len());
                    report.trained_tokens += example.num_trained();
                    if report.examples.len() < examples {
                        report.examples.push(mark_example(&processor, &example)?);
                    }
                }
                Err(refusal) => report
                    .refused
                    .entry(refusal.kind().to_string())
                    .or_default()
                    .push(format!("{}: {refusal}", conversation.source)),
            }
        }
    }
    Ok(report)
}
