//! `flint train`'s settings: flags, a TOML file given with `--config` (same names, snake_case),
//! and defaults, in that order of precedence. The effective config is saved as
//! `RUN/config.toml`.

use crate::data::DataOrder;
use crate::schedule::LrSchedule;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Every setting, optional: what one source (flags or TOML) says.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainOptions {
    pub preset: Option<String>,
    pub init_from: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub tokenizer: Option<String>,
    pub data_order: Option<DataOrder>,
    pub batch_size: Option<usize>,
    pub seq_len: Option<usize>,
    pub grad_accum_steps: Option<usize>,
    pub steps: Option<u64>,
    pub lr: Option<f64>,
    pub min_lr: Option<f64>,
    pub lr_schedule: Option<LrSchedule>,
    pub warmup_steps: Option<u64>,
    pub weight_decay: Option<f64>,
    pub beta1: Option<f64>,
    pub beta2: Option<f64>,
    pub eps: Option<f64>,
    pub grad_clip: Option<f64>,
    pub dropout: Option<f64>,
    pub val_fraction: Option<f64>,
    pub eval_every: Option<u64>,
    pub checkpoint_every: Option<u64>,
    pub keep_checkpoints: Option<usize>,
    pub seed: Option<u64>,
    pub device: Option<String>,
    pub precision: Option<String>,
    pub threads: Option<usize>,
    pub out: Option<PathBuf>,
    pub n_layer: Option<usize>,
    pub n_embd: Option<usize>,
    pub n_head: Option<usize>,
    pub n_positions: Option<usize>,
    pub n_inner: Option<usize>,
}

/// The effective settings of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// None with `init_from`, which names the model instead (so that a saved config can be
    /// given back with `--config`).
    pub preset: Option<String>,
    pub init_from: Option<PathBuf>,
    /// None: the embedded corpus.
    pub data: Option<PathBuf>,
    pub tokenizer: String,
    pub data_order: DataOrder,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum_steps: usize,
    pub steps: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub grad_clip: f64,
    pub dropout: f64,
    pub val_fraction: f64,
    pub eval_every: u64,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    pub seed: u64,
    pub device: String,
    /// `auto` (bf16 on GPUs that have it, else fp32), fp32, tf32, bf16 or fp16.
    pub precision: String,
    pub threads: Option<usize>,
    pub out: PathBuf,
    pub n_layer: Option<usize>,
    pub n_embd: Option<usize>,
    pub n_head: Option<usize>,
    pub n_positions: Option<usize>,
    pub n_inner: Option<usize>,
}

impl TrainOptions {
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the config", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            // One line: where, then what (the parser's message may span lines).
            let line = e.span().map_or(String::new(), |s| {
                format!(" line {}", text[..s.start].matches('\n').count() + 1)
            });
            let what = e.message().trim().replace('\n', "; ");
            anyhow!("{}{line}: {what}", path.display())
        })
    }

    /// `self` where set, else `other`. `--preset` and `--init-from` both name the model: the one
    /// `self` gives wins over the other's (a saved `config.toml` names a preset unless its run
    /// started from `--init-from`).
    pub fn or(self, mut other: TrainOptions) -> TrainOptions {
        if self.preset.is_some() || self.init_from.is_some() {
            other.preset = None;
            other.init_from = None;
        }
        macro_rules! pick {
            ($($f:ident),*) => { TrainOptions { $($f: self.$f.or(other.$f)),* } };
        }
        pick!(
            preset,
            init_from,
            data,
            tokenizer,
            data_order,
            batch_size,
            seq_len,
            grad_accum_steps,
            steps,
            lr,
            min_lr,
            lr_schedule,
            warmup_steps,
            weight_decay,
            beta1,
            beta2,
            eps,
            grad_clip,
            dropout,
            val_fraction,
            eval_every,
            checkpoint_every,
            keep_checkpoints,
            seed,
            device,
            precision,
            threads,
            out,
            n_layer,
            n_embd,
            n_head,
            n_positions,
            n_inner
        )
    }

    /// Fills the defaults (the `tiny` job on the embedded corpus) and checks every value. Input
    /// paths become absolute, so that the saved config resumes from any folder.
    pub fn resolve(self) -> Result<TrainConfig> {
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        // Fine-tuning a Hugging Face folder reads text with its tokenizer unless told otherwise.
        let tokenizer = match (self.tokenizer, &self.init_from) {
            (Some(t), _) if t != "bytes" => absolute(t.into()).display().to_string(),
            (None, Some(dir)) => crate::hf::folder_tokenizer(dir)?,
            _ => "bytes".into(),
        };
        let mut c = TrainConfig {
            preset: match self.init_from {
                Some(_) => self.preset,
                None => Some(self.preset.unwrap_or_else(|| "tiny".into())),
            },
            init_from: self.init_from.map(absolute),
            data: self.data.map(absolute),
            tokenizer,
            data_order: self.data_order.unwrap_or(DataOrder::Sequential),
            batch_size: self.batch_size.unwrap_or(16),
            seq_len: self.seq_len.unwrap_or(128),
            grad_accum_steps: self.grad_accum_steps.unwrap_or(1),
            steps: self.steps.unwrap_or(300),
            lr: self.lr.unwrap_or(2e-3),
            min_lr: self.min_lr.unwrap_or(2e-4),
            lr_schedule: self.lr_schedule.unwrap_or(LrSchedule::Cosine),
            warmup_steps: self.warmup_steps.unwrap_or(20),
            weight_decay: self.weight_decay.unwrap_or(0.1),
            beta1: self.beta1.unwrap_or(0.9),
            beta2: self.beta2.unwrap_or(0.95),
            eps: self.eps.unwrap_or(1e-8),
            grad_clip: self.grad_clip.unwrap_or(1.0),
            dropout: self.dropout.unwrap_or(0.0),
            val_fraction: self.val_fraction.unwrap_or(0.05),
            eval_every: self.eval_every.unwrap_or(100),
            checkpoint_every: self.checkpoint_every.unwrap_or(100),
            keep_checkpoints: self.keep_checkpoints.unwrap_or(3),
            seed: self.seed.unwrap_or(1337),
            device: self.device.unwrap_or_else(|| "auto".into()),
            precision: self.precision.unwrap_or_else(|| "auto".into()),
            threads: self.threads,
            // Made below, once the settings are known to be valid.
            out: self.out.clone().unwrap_or_default(),
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            n_head: self.n_head,
            n_positions: self.n_positions,
            n_inner: self.n_inner,
        };
        c.check()?;
        if self.out.is_none() {
            c.out = default_out();
        }
        Ok(c)
    }
}

fn default_out() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Runs started in the same second get their own folders: each is made here, and only one
    // process can make it. (Where `runs/` cannot be written, the run's own error says so.)
    let _ = std::fs::create_dir_all("runs");
    (1..)
        .map(|n| match n {
            1 => PathBuf::from(format!("runs/run-{secs}")),
            n => PathBuf::from(format!("runs/run-{secs}-{n}")),
        })
        .find(|p| match std::fs::create_dir(p) {
            Ok(()) => true,
            Err(e) => e.kind() != std::io::ErrorKind::AlreadyExists,
        })
        .expect("some suffix is free")
}

impl TrainConfig {
    fn check(&self) -> Result<()> {
        let positive = [
            ("--batch-size", self.batch_size),
            ("--seq-len", self.seq_len),
            ("--grad-accum-steps", self.grad_accum_steps),
            ("--keep-checkpoints", self.keep_checkpoints),
        ];
        for (flag, v) in positive {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        let reals = [
            ("--lr", self.lr),
            ("--min-lr", self.min_lr),
            ("--weight-decay", self.weight_decay),
            ("--eps", self.eps),
            ("--grad-clip", self.grad_clip),
        ];
        for (flag, v) in reals {
            if !v.is_finite() {
                bail!("{flag} must be a finite number (got {v})");
            }
        }
        let opt = |v: Option<usize>| v.unwrap_or(0) as u64;
        let integers = [
            ("--seed", self.seed),
            ("--steps", self.steps),
            ("--warmup-steps", self.warmup_steps),
            ("--eval-every", self.eval_every),
            ("--checkpoint-every", self.checkpoint_every),
            ("--batch-size", self.batch_size as u64),
            ("--seq-len", self.seq_len as u64),
            ("--grad-accum-steps", self.grad_accum_steps as u64),
            ("--keep-checkpoints", self.keep_checkpoints as u64),
            ("--threads", opt(self.threads)),
            ("--n-layer", opt(self.n_layer)),
            ("--n-embd", opt(self.n_embd)),
            ("--n-head", opt(self.n_head)),
            ("--n-positions", opt(self.n_positions)),
            ("--n-inner", opt(self.n_inner)),
        ];
        for (flag, v) in integers {
            below_2_63(flag, v)?;
        }
        // The tokens of one step are counted in usize.
        let tokens = self
            .batch_size
            .checked_mul(self.seq_len)
            .and_then(|n| n.checked_mul(self.grad_accum_steps))
            .and_then(|n| n.checked_add(1));
        if tokens.is_none() {
            bail!("--batch-size x --seq-len x --grad-accum-steps is too large to count");
        }
        if !(self.lr > 0.0 && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            bail!(
                "--lr must be positive and --min-lr in [0, lr] (got {} and {})",
                self.lr,
                self.min_lr
            );
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            bail!(
                "--val-fraction must be in [0, 1) (got {})",
                self.val_fraction
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("--dropout must be in [0, 1) (got {})", self.dropout);
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            bail!("--beta1 and --beta2 must be in [0, 1)");
        }
        if self.grad_clip < 0.0 || self.weight_decay < 0.0 || self.eps <= 0.0 {
            bail!("--grad-clip and --weight-decay must be >= 0 and --eps > 0");
        }
        crate::device::DeviceRequest::parse(&self.device)?;
        if self.precision != "auto" {
            flint_backend::Precision::parse(&self.precision)?;
        }
        Ok(())
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}

/// The value a setting takes when neither a flag nor the config file gives it, as `--help`
/// shows it (`key` as in config.toml: `lr`, `data_order`); `None` for a setting without one
/// (`--data`: the embedded corpus) or an unknown key.
pub fn default_setting(key: &str) -> Option<String> {
    static DEFAULTS: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();
    let table = DEFAULTS.get_or_init(|| {
        // With an `out` given, resolving makes no run folder.
        let defaults = TrainOptions {
            out: Some(PathBuf::new()),
            ..TrainOptions::default()
        }
        .resolve()
        .expect("the defaults are valid");
        toml::Table::try_from(defaults).expect("a config is a TOML table")
    });
    Some(match table.get(key)? {
        toml::Value::String(s) => s.clone(),
        // As the README writes them (TOML would print 1e-8 as 0.00000001).
        toml::Value::Float(x) if *x != 0.0 && x.abs() < 1e-2 => format!("{x:e}"),
        v => v.to_string(),
    })
}

/// config.toml stores integer settings, and TOML integers are signed 64-bit.
pub(crate) fn below_2_63(flag: &str, v: u64) -> Result<()> {
    if v > i64::MAX as u64 {
        bail!("{flag} must be below 2^63 (got {v})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::TrainOptions;
    use std::path::PathBuf;

    /// A config file names a preset; `--init-from` given on top of it names the model instead
    /// (flags win), and the file's other settings stay.
    #[test]
    fn a_model_named_by_flags_replaces_the_files() {
        let file = TrainOptions {
            preset: Some("tiny".into()),
            lr: Some(0.01),
            ..TrainOptions::default()
        };
        let flags = TrainOptions {
            init_from: Some(PathBuf::from("run/model")),
            ..TrainOptions::default()
        };
        let merged = flags.or(file.clone());
        assert_eq!(merged.preset, None);
        assert_eq!(merged.init_from, Some(PathBuf::from("run/model")));
        assert_eq!(merged.lr, Some(0.01));
        // Without a model flag, the file's model stands.
        let merged = TrainOptions::default().or(file);
        assert_eq!(merged.preset.as_deref(), Some("tiny"));
    }
}
