//! The `flint` command line: parses arguments, calls the training layer, prints.

mod bench;
mod demo;
mod forward;
mod generate;
mod tokenizer;
mod train;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "flint",
    version,
    about = "Train Transformers fast on CPUs and NVIDIA GPUs, from one binary"
)]
struct Cli {
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// Print more, e.g. the activation memory plan.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The seed program: a 6-layer encoder (d_model 512, nhead 8) on a random [10, 32, 512] input.
    Demo,
    /// Run an nn.TransformerEncoder trained in PyTorch, in eval mode, on a safetensors input.
    Forward(forward::Args),
    /// Train a GPT-2 style model (default: `tiny` on the embedded corpus, on the CPU).
    Train(Box<train::Args>),
    /// Sample text from a trained run or a Hugging Face GPT-2 folder.
    Generate(generate::Args),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(tokenizer::Tokenizer),
    /// Time training steps side by side with PyTorch's counterpart scripts.
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`flint ... | head`), as Unix tools do, instead of panicking.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of a signal at start-up, before any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(2);
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: cannot start {n} threads: {e}");
            return ExitCode::from(2);
        }
    }
    let result = match cli.command {
        Command::Demo => demo::run(cli.verbose),
        Command::Forward(args) => forward::run(args, cli.verbose),
        Command::Bench(b) => bench::run(b, cli.verbose),
        Command::Train(args) => train::run(*args, cli.threads, cli.verbose),
        Command::Generate(args) => generate::run(args),
        Command::Tokenizer(t) => tokenizer::run(t),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
