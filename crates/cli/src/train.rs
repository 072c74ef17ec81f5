//! `flint train`: flags in, progress out.

use anyhow::{anyhow, Result};
use flint_train::data::DataOrder;
use flint_train::schedule::LrSchedule;
use flint_train::trainer::config::{default_setting, TrainOptions};
use flint_train::trainer::{self, Observer, Started, StepMetrics};
use indicatif::{ProgressBar, ProgressStyle};
use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Every training flag (not --config or --resume) is also a key of the `--config` TOML file
/// (snake_case); flags win.
#[derive(clap::Args)]
pub struct Args {
    /// TOML file with any of the settings below.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in this folder from its newest complete checkpoint.
    #[arg(long, value_name = "RUN")]
    resume: Option<PathBuf>,
    #[arg(long, help = help("preset", "tiny | gpt2 | gpt2-medium | gpt2-large"))]
    preset: Option<String>,
    /// Start from a Hugging Face GPT-2 folder (config.json + model.safetensors).
    #[arg(long, value_name = "DIR")]
    init_from: Option<PathBuf>,
    /// A text file, or a folder of .txt / .jsonl files (default: the embedded corpus).
    #[arg(long)]
    data: Option<PathBuf>,
    /// bytes, or a tokenizer.json (default: bytes, or the --init-from folder's tokenizer.json).
    #[arg(long)]
    tokenizer: Option<String>,
    #[arg(long, value_enum, help = help("data_order", "How windows are drawn: sequential (llm.c's loader: consecutive B*T+1 token windows) or shuffle (every window once per epoch, in a seeded random order)"))]
    data_order: Option<Order>,
    #[arg(long, help = help("batch_size", "Sequences per micro-batch (B)"))]
    batch_size: Option<usize>,
    #[arg(long, help = help("seq_len", "Tokens per sequence (T), at most the model's context"))]
    seq_len: Option<usize>,
    #[arg(long, help = help("grad_accum_steps", "Micro-batches per optimizer step; the step's loss is their mean"))]
    grad_accum_steps: Option<usize>,
    #[arg(long, help = help("steps", "Optimizer steps of the whole run"))]
    steps: Option<u64>,
    #[arg(long, help = help("lr", "Peak learning rate, reached at the end of the warm-up"))]
    lr: Option<f64>,
    #[arg(long, help = help("min_lr", "Learning rate the cosine schedule ends at"))]
    min_lr: Option<f64>,
    #[arg(long, value_enum, help = help("lr_schedule", "cosine: linear warm-up, then cosine decay to --min-lr; constant: the same warm-up, then --lr"))]
    lr_schedule: Option<Schedule>,
    #[arg(long, help = help("warmup_steps", "Steps of linear warm-up from 0 to --lr"))]
    warmup_steps: Option<u64>,
    #[arg(long, help = help("weight_decay", "AdamW weight decay, on tensors of 2 or more dimensions only"))]
    weight_decay: Option<f64>,
    #[arg(long, help = help("beta1", "AdamW beta1"))]
    beta1: Option<f64>,
    #[arg(long, help = help("beta2", "AdamW beta2"))]
    beta2: Option<f64>,
    #[arg(long, help = help("eps", "AdamW epsilon"))]
    eps: Option<f64>,
    #[arg(long, help = help("grad_clip", "Maximum global L2 norm of the gradients, as clip_grad_norm_ (0: off)"))]
    grad_clip: Option<f64>,
    #[arg(long, help = help("dropout", "Dropout probability (embeddings, attention, residuals), as GPT2Config's *_pdrop"))]
    dropout: Option<f64>,
    #[arg(long, help = help("val_fraction", "Tail of the tokens held out for validation (0: none)"))]
    val_fraction: Option<f64>,
    #[arg(long, help = help("eval_every", "Evaluate every N steps (0: only at the start and end)"))]
    eval_every: Option<u64>,
    #[arg(long, help = help("checkpoint_every", "Checkpoint every N steps (0: only at the end)"))]
    checkpoint_every: Option<u64>,
    #[arg(long, help = help("keep_checkpoints", "How many of the newest checkpoints to keep"))]
    keep_checkpoints: Option<usize>,
    #[arg(long, help = help("seed", "Seed of initialisation, dropout, shuffling and the closing sample"))]
    seed: Option<u64>,
    /// auto (bf16 on GPUs that have it, else fp32) | fp32 | tf32 | bf16 | fp16 (with loss scaling).
    #[arg(long)]
    precision: Option<String>,
    /// The run folder (default: a new runs/run-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Transformer blocks (default: the preset's), `n_layer` in GPT2Config.
    #[arg(long)]
    n_layer: Option<usize>,
    /// Model width (default: the preset's), `n_embd` in GPT2Config.
    #[arg(long)]
    n_embd: Option<usize>,
    /// Attention heads (default: the preset's), `n_head` in GPT2Config.
    #[arg(long)]
    n_head: Option<usize>,
    /// Context length (default: the preset's), `n_positions` in GPT2Config.
    #[arg(long)]
    n_positions: Option<usize>,
    /// The feed-forward width (default 4 * n_embd), `n_inner` in GPT2Config.
    #[arg(long)]
    n_inner: Option<usize>,
}

/// A flag's help line, ending with the default the trainer gives it (read from the trainer, so
/// the two cannot disagree).
fn help(key: &str, what: &str) -> String {
    match default_setting(key) {
        Some(default) => format!("{what} [default: {default}]"),
        None => what.to_string(),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Order {
    Sequential,
    Shuffle,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Schedule {
    Constant,
    Cosine,
}

struct Printer {
    bar: Option<ProgressBar>,
    verbose: bool,
    /// Set when a line cannot be written (`flint train | head` closed the pipe): the run then
    /// stops as on Ctrl-C, after a checkpoint, instead of dying mid-step.
    stop: Arc<AtomicBool>,
    /// Why the output could not be written, once it could not.
    closed: RefCell<Option<std::io::Error>>,
}

impl Printer {
    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => self.write(std::io::stdout(), text),
        }
    }

    fn write(&self, mut to: impl Write, text: &str) {
        if let Err(e) = writeln!(to, "{text}") {
            self.closed.borrow_mut().get_or_insert(e);
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

impl Observer for Printer {
    fn started(&mut self, s: &Started) {
        self.line(&format!("Using device: {}", s.device));
        let m = &s.model;
        self.line(&format!(
            "model: GPT-2, {} parameters (n_layer {}, n_embd {}, n_head {}, context {}, vocab {})",
            s.parameters, m.n_layer, m.n_embd, m.n_head, m.n_positions, m.vocab_size
        ));
        self.line(&format!(
            "data: {} training tokens, {} validation tokens",
            s.train_tokens, s.val_tokens
        ));
        self.line(&format!("run: {}", s.run.display()));
        if s.first_step > s.steps {
            // Checkpointed at --steps, then killed before the model was written, or resumed
            // with --steps equal to the checkpoint's step.
            self.line(&format!(
                "resuming after step {}, the last: no step left to train",
                s.steps
            ));
        } else if s.first_step > 1 {
            self.line(&format!("resuming at step {}", s.first_step));
        }
        if self.verbose {
            self.line(&s.plan);
        }
        // The bar draws on stderr, and the lines printed above it go there too: only when both
        // are a terminal, else plain lines on stdout.
        if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(s.steps);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} eta {eta}")
                    .expect("a valid template"),
            );
            bar.set_position(s.first_step - 1);
            self.bar = Some(bar);
        }
    }

    fn step(&mut self, m: &StepMetrics) {
        let msg = format!("loss {:.4} | {:.0} tokens/s", m.loss, m.tokens_per_s);
        match &self.bar {
            Some(bar) => {
                bar.set_position(m.step);
                bar.set_message(msg);
            }
            None => self.line(&format!(
                "step {}/{} | loss {:.4} | lr {:.2e} | grad norm {:.3} | {:.0} tokens/s",
                m.step, m.steps, m.loss, m.lr, m.grad_norm, m.tokens_per_s
            )),
        }
    }

    fn eval(&mut self, step: u64, val_loss: f32) {
        self.line(&format!("step {step} | val loss {val_loss:.4}"));
    }

    fn checkpoint(&mut self, dir: &Path) {
        self.line(&format!("checkpoint: {}", dir.display()));
    }

    fn warn(&mut self, message: &str) {
        self.write(std::io::stderr(), &format!("warning: {message}"));
    }
}

/// Trains; returns whether Ctrl-C interrupted the run (after its checkpoint was written).
pub fn run(a: Args, device: Option<String>, threads: Option<usize>, verbose: bool) -> Result<bool> {
    let flags = TrainOptions {
        preset: a.preset,
        init_from: a.init_from,
        data: a.data,
        tokenizer: a.tokenizer,
        data_order: a.data_order.map(|o| match o {
            Order::Sequential => DataOrder::Sequential,
            Order::Shuffle => DataOrder::Shuffle,
        }),
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        grad_accum_steps: a.grad_accum_steps,
        steps: a.steps,
        lr: a.lr,
        min_lr: a.min_lr,
        lr_schedule: a.lr_schedule.map(|s| match s {
            Schedule::Constant => LrSchedule::Constant,
            Schedule::Cosine => LrSchedule::Cosine,
        }),
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        beta1: a.beta1,
        beta2: a.beta2,
        eps: a.eps,
        grad_clip: a.grad_clip,
        dropout: a.dropout,
        val_fraction: a.val_fraction,
        eval_every: a.eval_every,
        checkpoint_every: a.checkpoint_every,
        keep_checkpoints: a.keep_checkpoints,
        seed: a.seed,
        device,
        precision: a.precision,
        threads,
        out: a.out,
        n_layer: a.n_layer,
        n_embd: a.n_embd,
        n_head: a.n_head,
        n_positions: a.n_positions,
        n_inner: a.n_inner,
    };
    let options = match &a.config {
        Some(path) => {
            flags.or(TrainOptions::from_toml_file(path).map_err(|e| anyhow!("--config {e:#}"))?)
        }
        None => flags,
    };
    // The flag, else `threads` from the TOML file, else one per core.
    crate::start_threads(threads.or(options.threads))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // Ctrl-C, or SIGTERM (what Slurm and Kubernetes send before stopping a job) or SIGHUP: finish
    // the current step, write a checkpoint, exit. A hangup that `nohup` told us to ignore stays
    // ignored: the handler would otherwise replace that.
    let hangup_ignored = signal_ignored(libc::SIGHUP);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
    if hangup_ignored {
        // SAFETY: setting a signal's disposition to "ignore" has no preconditions.
        unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    }
    // A closed stdout (or stderr) is an error from the write that `Printer` turns into a stop,
    // not the signal that would kill the run between checkpoints.
    // SAFETY: setting a signal's disposition to "ignore" has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let mut printer = Printer {
        bar: None,
        verbose,
        stop: stop.clone(),
        closed: RefCell::new(None),
    };
    let done = trainer::train(options, a.resume.as_deref(), &stop, &mut printer)?;
    // The closing lines go to stdout, not above a bar that is gone.
    if let Some(bar) = printer.bar.take() {
        bar.finish_and_clear();
    }
    if done.interrupted {
        let line = format!(
            "interrupted at step {}; continue with: flint train --resume {}",
            done.last_step,
            done.run.display()
        );
        printer.line(&line);
        let closed = printer.closed.borrow_mut().take();
        if let Some(e) = closed {
            printer.write(
                std::io::stderr(),
                &format!(
                    "warning: the output could not be written ({e}), so training stopped; {line}"
                ),
            );
        }
        return Ok(true);
    }
    if let (Some(first), Some(last)) = (done.first_val_loss, done.last_val_loss) {
        printer.line(&format!(
            "val loss {first:.4} -> {last:.4} ({:.2}x)",
            last / first
        ));
    }
    printer.line(&format!(
        "model: {} (Hugging Face GPT-2 layout)",
        done.run.join("model").display()
    ));
    if let Some(sample) = done.sample {
        printer.line(&format!("sample:\n{sample}"));
    }
    Ok(false)
}

/// Whether `signal` is ignored (as `nohup` leaves SIGHUP).
fn signal_ignored(signal: i32) -> bool {
    // SAFETY: reading the current disposition into a zeroed struct; no handler is changed.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}
