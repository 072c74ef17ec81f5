//! `flint tokenizer train`: a byte-level BPE for `--tokenizer`.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Tokenizer {
    /// Train a byte-level BPE (GPT-2 style) on text files.
    Train {
        /// A text file or a folder of .txt / .jsonl files.
        #[arg(long, num_args = 1..)]
        data: Vec<PathBuf>,
        /// Ids in the trained vocabulary: the 256 bytes, `<|endoftext|>` and the merges.
        #[arg(long)]
        vocab_size: usize,
        /// Where to write the tokenizer.json.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(t: Tokenizer) -> Result<()> {
    let Tokenizer::Train {
        data,
        vocab_size,
        out,
    } = t;
    for warning in flint_train::data::train_bpe(&data, vocab_size, &out)? {
        eprintln!("warning: {warning}");
    }
    // The size the text supported, which may be below the one asked for.
    let trained = flint_train::data::Tokenizer::from_arg(&out.display().to_string())?;
    println!(
        "tokenizer: {} ({} tokens)",
        out.display(),
        trained.vocab_size()
    );
    Ok(())
}
