//! `metrics.jsonl`: the run's training and eval metrics, one JSON object per line.
//!
//! The format is a fixed interface (users script against it):
//!
//! ```text
//! {"step":1,"loss":2.5,"lr":0.001,"grad_norm":1.25,"tokens_per_s":1000.0,"elapsed_s":0.5}
//! {"step":100,"val_loss":2.25}
//! ```
//!
//! Training lines count `step` from 1; evaluation lines start at 0, the initial model. A
//! non-finite value (a diverged loss) is written as `null`. Runs with `--precision fp16` add
//! `"loss_scale"` (the GradScaler's scale the step used) and `"skipped"` (true when the step's
//! gradients overflowed and the update was skipped).

use crate::files::cannot_write;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A training line; field order is the key order in the file.
#[derive(Serialize)]
struct TrainLine {
    step: u64,
    loss: f32,
    lr: f32,
    grad_norm: f32,
    tokens_per_s: f64,
    elapsed_s: f64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    amp: Option<LossScaling>,
}

/// What dynamic loss scaling did in a step (fp16 runs only).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LossScaling {
    pub loss_scale: f32,
    pub skipped: bool,
}

/// An eval line.
#[derive(Serialize, serde::Deserialize)]
struct EvalLine {
    step: u64,
    val_loss: f32,
}

/// Appends lines to `metrics.jsonl`. Each line goes out in one `write` call on a file opened in
/// append mode, so a kill leaves at most a torn last line, which the next resume drops.
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
    /// Added to the next training lines when set.
    pub loss_scaling: Option<LossScaling>,
}

impl MetricsWriter {
    /// Opens `path` for appending.
    ///
    /// - `resume_at = None`: a fresh run; the file is created, or emptied if it exists.
    /// - `resume_at = Some(k)`: the run resumes after step `k`. Only the lines with `step <= k`
    ///   (training and eval alike) are kept, and a torn last line (no newline and not a whole
    ///   object, from a kill mid-write) is dropped; the file is rewritten atomically (temp file,
    ///   fsync, rename) and then appended to. A missing file is created empty. A complete line
    ///   that is not a JSON object with an integer `step` is an error naming the line.
    pub fn open(path: &Path, resume_at: Option<u64>) -> Result<Self> {
        match resume_at {
            None => {
                File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
            }
            Some(k) => cut_back(path, k)?,
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for appending", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            loss_scaling: None,
        })
    }

    /// Appends a training line:
    /// `{"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}`.
    pub fn write_train(
        &mut self,
        step: u64,
        loss: f32,
        lr: f32,
        grad_norm: f32,
        tokens_per_s: f64,
        elapsed_s: f64,
    ) -> Result<()> {
        self.write_line(&TrainLine {
            step,
            loss,
            lr,
            grad_norm,
            tokens_per_s,
            elapsed_s,
            amp: self.loss_scaling,
        })
    }

    /// The first `val_loss` the file holds (a resumed run's, logged before it stopped).
    pub fn first_val_loss(&self) -> Option<f32> {
        self.eval_lines().first().map(|l| l.val_loss)
    }

    /// Whether the file holds a `val_loss` of `step`.
    pub fn has_val_loss(&self, step: u64) -> bool {
        self.eval_lines().iter().any(|l| l.step == step)
    }

    /// The eval lines the file holds so far (none when it cannot be read).
    fn eval_lines(&self) -> Vec<EvalLine> {
        let text = fs::read_to_string(&self.path).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Appends an eval line: `{"step", "val_loss"}`.
    pub fn write_eval(&mut self, step: u64, val_loss: f32) -> Result<()> {
        self.write_line(&EvalLine { step, val_loss })
    }

    fn write_line<T: Serialize>(&mut self, line: &T) -> Result<()> {
        let mut buf = serde_json::to_vec(line)?;
        buf.push(b'\n');
        // One write for the whole line (a regular file takes it whole), then flush; synced with
        // each checkpoint (see `sync`).
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.flush())
            .map_err(|e| cannot_write(&self.path, e))
    }

    /// Makes every line written so far durable: called before a checkpoint is committed, so a
    /// power loss cannot keep the checkpoint of a step and lose that step's lines.
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| cannot_write(&self.path, e))
    }
}

/// Rewrites `path` with only its lines of `step <= k`, atomically.
fn cut_back(path: &Path, k: u64) -> Result<()> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    let mut kept = Vec::with_capacity(bytes.len());
    let mut rest = &bytes[..];
    let mut line_no = 0usize;
    while !rest.is_empty() {
        line_no += 1;
        let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line = &rest[..i];
                rest = &rest[i + 1..];
                (line, true)
            }
            None => {
                let line = rest;
                rest = &[];
                (line, false)
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let step = match line_step(line) {
            Some(step) => step,
            // A last line without its newline that does not parse was torn by a kill.
            None if !complete => break,
            None => bail!(
                "{}: line {line_no} is not a JSON object with an integer \"step\": {}",
                path.display(),
                String::from_utf8_lossy(line)
            ),
        };
        if step <= k {
            kept.extend_from_slice(line);
            kept.push(b'\n');
        }
    }

    crate::files::write_atomic(path, &kept)
}

/// The `step` of a metrics line, if it is a JSON object with a non-negative integer `step`.
fn line_step(line: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(line).ok()?;
    value.as_object()?.get("step")?.as_u64()
}
