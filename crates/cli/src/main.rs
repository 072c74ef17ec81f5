//! The `flint` command line: parses arguments, calls the training layer, prints.

mod bench;
mod demo;
mod doctor;
mod forward;
mod generate;
mod tokenizer;
mod train;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use flint_train::device::{self, Device, DeviceRequest};
use std::io::Write;
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
    /// auto | cpu | cuda | cuda:N. `auto` takes the first GPU when `flint doctor`'s checks
    /// pass, else the CPU (and says why).
    #[arg(long, global = true, value_name = "DEVICE")]
    device: Option<String>,
    /// Print more: the activation memory plan (train, bench, forward, demo).
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
    /// Train a GPT-2 style model (default: `tiny` on the embedded corpus).
    Train(Box<train::Args>),
    /// Sample text from a trained run or a Hugging Face GPT-2 folder.
    Generate(generate::Args),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(tokenizer::Tokenizer),
    /// Check this machine for training: CPU, NVIDIA driver, GPUs, CUDA libraries, with fixes.
    Doctor(doctor::Args),
    /// Time training steps, comparable with the PyTorch scripts in bench/ (same flags and rows).
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
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if cli.threads == Some(0) {
        to_stderr("error: --threads must be at least 1");
        return ExitCode::from(2);
    }
    // `train` may take its thread count from its TOML file, so it starts the pool itself.
    if !matches!(cli.command, Command::Train(_)) {
        if let Err(e) = start_threads(cli.threads) {
            to_stderr(&format!("error: {e:#}"));
            return ExitCode::from(2);
        }
    }
    let device = cli.device.as_deref();
    // The selected device, and why `auto` fell back to the CPU.
    let select = || -> anyhow::Result<(Device, Option<String>)> {
        let s = device::select(DeviceRequest::parse(device.unwrap_or("auto"))?)?;
        Ok((s.device, s.fallback_reason))
    };
    let result = match cli.command {
        Command::Demo => select().and_then(|(d, why)| demo::run(&d, cli.verbose).map(|()| why)),
        Command::Forward(args) => {
            select().and_then(|(d, why)| forward::run(args, &d, cli.verbose).map(|()| why))
        }
        Command::Bench(b) => {
            select().and_then(|(d, why)| bench::run(b, &d, cli.verbose).map(|()| why))
        }
        // Interrupted by Ctrl-C (its checkpoint written): 130, as a shell reports one.
        Command::Train(args) => match train::run(*args, cli.device, cli.threads, cli.verbose) {
            Ok(true) => return ExitCode::from(130),
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        },
        Command::Generate(args) => {
            select().and_then(|(d, why)| generate::run(args, &d).map(|()| why))
        }
        // Tokenizers run on the CPU whatever `--device` says, but a malformed one, or a GPU that
        // cannot train, is refused as by every other command.
        Command::Tokenizer(t) => DeviceRequest::parse(device.unwrap_or("auto"))
            .and_then(|request| {
                if matches!(request, DeviceRequest::Cuda(_)) {
                    device::select(request)?;
                }
                tokenizer::run(t)
            })
            .map(|()| None),
        Command::Doctor(args) => match doctor::run(args, device) {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
    };
    match result {
        // The CPU fallback is explained on stderr (stdout keeps the exact `Using device: ...`
        // line), after the output, so that a failed command's stderr is its one error line.
        Ok(fallback) => {
            if let Some(why) = fallback {
                to_stderr(&format!("note: running on the CPU: {why}"));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            to_stderr(&format!("error: {e:#}"));
            ExitCode::from(2)
        }
    }
}

/// The command line, with clap's usage errors cut to one line (the error and clap's tip, then
/// where the flags are listed), exit status 2. Negative numbers are values (`--lr -1` is
/// refused by the check of `--lr`, naming it, rather than read as an unknown flag `-1`).
fn parse_args() -> Result<Cli, ExitCode> {
    fn negative_numbers(command: clap::Command) -> clap::Command {
        command
            .allow_negative_numbers(true)
            .mut_subcommands(negative_numbers)
    }
    let command = negative_numbers(Cli::command());
    let error = match command.try_get_matches() {
        Ok(matches) => match Cli::from_arg_matches(&matches) {
            Ok(cli) => return Ok(cli),
            Err(e) => e,
        },
        Err(e) => e,
    };
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = error.print();
        return Err(ExitCode::from(error.exit_code() as u8));
    }
    // The message and what it lists (a missing argument's name), without the usage block.
    let text = error.render().to_string();
    let message: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let (tips, message): (Vec<&str>, Vec<&str>) =
        message.into_iter().partition(|l| l.starts_with("tip:"));
    let mut line = message.join(" ");
    for tip in tips {
        line = format!("{line} ({tip})");
    }
    to_stderr(&format!(
        "{line}; `flint --help` and `flint COMMAND --help` list the flags"
    ));
    Err(ExitCode::from(2))
}

/// Starts the worker pool with `threads` threads (default: rayon's, `RAYON_NUM_THREADS` or one
/// per core), this thread being one of them: the CPU kernels' parallel loops then start from a
/// worker, so each one hands work to the others directly instead of waking the pool and
/// sleeping until it is done (a few hundred times per training step).
pub fn start_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let pool = rayon::ThreadPoolBuilder::new().use_current_thread();
    let pool = match threads {
        Some(n) => pool.num_threads(n),
        None => pool,
    };
    pool.build_global()
        .map_err(|e| anyhow::anyhow!("cannot start the worker threads: {e}"))
}

/// A line on stderr. With SIGPIPE ignored (`flint train` turns a closed pipe into a stop), a
/// closed stderr is an error from the write, not worth a panic.
fn to_stderr(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}
