//! The run folder itself (`--out RUN`): which folders a new run may use, and what a run that
//! died early left behind.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Whether `dir` holds a flint run: a `config.toml` of training settings and a `metrics.jsonl`.
fn is_run(dir: &Path) -> bool {
    dir.join("metrics.jsonl").is_file()
        && crate::trainer::config::TrainOptions::from_toml_file(&dir.join("config.toml")).is_ok()
}

/// Makes `dir` ready for a new run (the caller has refused one that holds checkpoints): a
/// missing or empty folder is used as it is; a run that died before its first checkpoint is
/// started over, its logs removed (so neither `metrics.jsonl` nor TensorBoard shows the dead
/// run's steps); anything else is refused rather than written over.
pub fn prepare_new(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        bail!(
            "--out {}: is a file, not a folder; choose another --out",
            dir.display()
        );
    }
    let entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("--out {}: cannot read", dir.display()))?
        .filter_map(|e| e.ok())
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    if !is_run(dir) {
        bail!(
            "--out {}: the folder exists and is not a flint run (it holds {}); choose another --out, or empty it",
            dir.display(),
            entries[0].file_name().to_string_lossy()
        );
    }
    for e in entries {
        let name = e.file_name();
        if name.to_string_lossy().starts_with("events.out.tfevents.") {
            std::fs::remove_file(e.path())
                .with_context(|| format!("{}: cannot remove", e.path().display()))?;
        }
    }
    remove_stale_temporaries(dir);
    Ok(())
}

/// Removes the half-written checkpoints (`checkpoints/.tmp_step_N_PID`) of processes that are
/// gone (killed mid-checkpoint): each can be the size of a model and its optimizer state.
pub fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join("checkpoints")) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(".tmp_step_")
            .and_then(|rest| rest.rsplit('_').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
