//! Measures the CPU backends that build offline (flex, ndarray) on the forward pass of a
//! ~50M-parameter Llama decoder, to choose the default CPU backend.
//!
//! `cargo run --release -p resonance-cli --features ndarray --example cpu_backends`

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use resonance_models::text::config::TextConfig;
use resonance_models::text::model::CausalLm;

fn config() -> TextConfig {
    let value = serde_json::json!({
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 2048,
    });
    TextConfig::from_value(&value, Path::new("<bench>")).expect("valid config")
}

fn measure(name: &str, device: &Device, repeats: usize) {
    let config = config();
    let model = CausalLm::new(&config, device);
    let (batch, seq) = (1, 256);
    let ids: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..seq)
                .map(|t| ((b * 7919 + t * 104_729) % 32000) as u32)
                .collect()
        })
        .collect();
    let mask = vec![vec![true; seq]; batch];
    // Warm-up (lazy parameter initialisation, allocator pools).
    let _ = model.forward_ids(&ids, &mask, device).into_data();
    let mut times = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        let _ = model.forward_ids(&ids, &mask, device).into_data();
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{name:>8}: median forward {:.3} s over {repeats} runs ({:.0} tokens/s), batch {batch} x {seq} tokens",
        median,
        (batch * seq) as f64 / median
    );
}

fn main() {
    let params = {
        let c = config();
        let layer = 4 * c.hidden_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size;
        2 * c.vocab_size * c.hidden_size + c.num_layers * layer
    };
    println!("decoder with {:.1}M parameters", params as f64 / 1e6);
    measure("flex", &Device::flex(), 5);
    #[allow(deprecated)]
    let ndarray = Device::ndarray();
    measure("ndarray", &ndarray, 5);
}
