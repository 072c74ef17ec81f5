//! `flint bench`: training-step throughput, comparable row for row with the PyTorch scripts.

use anyhow::{bail, Result};
use flint_train::bench::{self, GPT_PRESETS, SEED_CONFIGS};
use flint_train::device::Device;
use flint_train::GptConfig;
use flint_train::Precision;

#[derive(clap::Subcommand)]
pub enum Bench {
    /// The seed model (6 x TransformerEncoderLayer(512, 8)): config A [10, 32, 512], B [128, 32, 512].
    Seed {
        /// Untimed steps first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Comma-separated subset of A,B.
        #[arg(long, default_value = "A,B")]
        configs: String,
        /// fp32 (as the PyTorch counterpart) | tf32 | bf16 | fp16 | auto.
        #[arg(long, default_value = "fp32")]
        precision: String,
        /// One JSON object per config instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A GPT-2 training step on random tokens: forward, cross-entropy, backward,
    /// clip_grad_norm_(1.0), AdamW (lr 6e-4, betas (0.9, 0.95), weight decay 0.1 on matrices).
    Gpt {
        /// Model size: tiny (4 x 128, byte vocabulary) or gpt2 (124M).
        #[arg(long, default_value = "tiny", value_parser = GPT_PRESETS)]
        preset: String,
        /// Sequences per step (default: 16 for tiny, 4 for gpt2).
        #[arg(long)]
        batch_size: Option<usize>,
        /// Tokens per sequence (default: the preset's context, 128 for tiny, 1024 for gpt2).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Untimed steps first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// auto (bf16 on GPUs that have it, else fp32) | fp32 | tf32 | bf16 | fp16.
        #[arg(long, default_value = "auto")]
        precision: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(b: Bench, device: &Device, verbose: bool) -> Result<()> {
    match b {
        Bench::Seed {
            warmup,
            steps,
            configs,
            precision,
            json,
        } => seed(
            &Run::new(device, &precision, warmup, steps, json, verbose)?,
            &configs,
        ),
        Bench::Gpt {
            preset,
            batch_size,
            seq_len,
            warmup,
            steps,
            precision,
            json,
        } => gpt(
            &Run::new(device, &precision, warmup, steps, json, verbose)?,
            &preset,
            batch_size,
            seq_len,
        ),
    }
}

/// What every benchmark run shares.
struct Run<'a> {
    device: &'a Device,
    precision: Precision,
    warmup: usize,
    steps: usize,
    json: bool,
    verbose: bool,
}

impl<'a> Run<'a> {
    fn new(
        device: &'a Device,
        precision: &str,
        warmup: usize,
        steps: usize,
        json: bool,
        verbose: bool,
    ) -> Result<Self> {
        Ok(Run {
            device,
            precision: flint_train::device::precision(precision, device)?,
            warmup,
            steps,
            json,
            verbose,
        })
    }
}

fn gpt(r: &Run, preset: &str, batch_size: Option<usize>, seq_len: Option<usize>) -> Result<()> {
    if r.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let batch = batch_size.unwrap_or_else(|| bench::gpt_default_batch(preset));
    let seq = match seq_len {
        Some(s) => s,
        None => GptConfig::preset(preset)?.n_positions,
    };
    if batch == 0 || seq == 0 {
        bail!("--batch-size and --seq-len must be at least 1");
    }
    let (row, plan) = flint_train::on_backend!(r.device, r.precision, |backend| bench::gpt(
        backend, preset, batch, seq, r.warmup, r.steps
    ))?;
    if r.verbose {
        println!("{plan}");
    }
    if r.json {
        println!("{}", serde_json::to_string(&row).expect("a row serialises"));
    } else {
        println!(
            "train gpt {} seq={} batch={}: {}",
            row.preset, row.seq, row.batch, row.speed
        );
    }
    Ok(())
}

fn seed(r: &Run, configs: &str) -> Result<()> {
    if r.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let mut chosen = Vec::new();
    for name in configs.split(',') {
        match SEED_CONFIGS.iter().find(|c| c.0 == name.trim()) {
            Some(c) => chosen.push(*c),
            None => bail!("--configs: unknown config `{name}`; choose from A, B"),
        }
    }
    flint_train::on_backend!(r.device, r.precision, |backend| bench::seed(
        backend,
        &chosen,
        r.warmup,
        r.steps,
        |row, plan| {
            if r.verbose {
                println!("{plan}");
            }
            if r.json {
                println!("{}", serde_json::to_string(row).expect("a row serialises"));
            } else {
                println!(
                    "train {} seq={} batch={}: {}",
                    row.config, row.seq, row.batch, row.speed
                );
            }
        }
    ))
}
