//! `flint generate`: sample text from a run or a Hugging Face GPT-2 folder.

use anyhow::Result;
use flint_train::device::Device;
use flint_train::generate::{generate_text, Sampling};
use flint_train::Precision;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A run folder (flint train --out) or a Hugging Face GPT-2 folder.
    path: PathBuf,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    /// Tokens to sample after the prompt (fewer when the context fills up).
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 = always the most likely token.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Seed of the sampling: the same seed, prompt and settings give the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// bytes or a tokenizer.json (default: the run's, or the folder's tokenizer.json).
    #[arg(long)]
    tokenizer: Option<String>,
}

pub fn run(a: Args, device: &Device) -> Result<()> {
    let s = Sampling {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
    };
    let (path, tok) = (&a.path, a.tokenizer.as_deref());
    let out = flint_train::on_backend!(device, Precision::Fp32, |backend| generate_text(
        backend, path, &a.prompt, tok, s
    ))?;
    for note in &out.notes {
        eprintln!("note: {note}");
    }
    println!("{}{}", a.prompt, out.text);
    if let Some(why) = out.stopped_early {
        eprintln!("note: {why}");
    }
    Ok(())
}
