//! `flint bench`: training-step throughput, comparable row for row with the PyTorch scripts.

use anyhow::{bail, Result};
use flint_backend::cpu::Cpu;
use flint_train::bench::{self, SEED_CONFIGS};

#[derive(clap::Subcommand)]
pub enum Bench {
    /// The seed model (6 x TransformerEncoderLayer(512, 8)): config A [10, 32, 512], B [128, 32, 512].
    Seed {
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Comma-separated subset of A,B.
        #[arg(long, default_value = "A,B")]
        configs: String,
        /// One JSON object per config instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(b: Bench, verbose: bool) -> Result<()> {
    let Bench::Seed {
        warmup,
        steps,
        configs,
        json,
    } = b;
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let mut chosen = Vec::new();
    for name in configs.split(',') {
        match SEED_CONFIGS.iter().find(|c| c.0 == name.trim()) {
            Some(c) => chosen.push(*c),
            None => bail!("--configs: unknown config `{name}`; choose from A, B"),
        }
    }
    bench::seed(Cpu, &chosen, warmup, steps, |row, plan| {
        if verbose {
            println!("{plan}");
        }
        if json {
            println!("{}", serde_json::to_string(row).expect("a row serialises"));
        } else {
            println!(
                "train {} seq={} batch={}: median {:.1} ms  min {:.1} ms  {:.1} tokens/s  {:.1} GFLOP/s  ({} threads, {})",
                row.config, row.seq, row.batch, row.median_ms, row.min_ms, row.tokens_per_s, row.gflops, row.threads, row.device
            );
        }
    })
}
