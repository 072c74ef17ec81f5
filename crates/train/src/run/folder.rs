//! The run folder itself (`--out RUN`): which folders a new run may use, one process at a time,
//! and what a run that died early left behind.

use anyhow::{bail, Context, Result};
use std::fs::{File, TryLockError};
use std::path::Path;

/// Held while a process trains in the folder; released when dropped (or the process ends).
const LOCK: &str = ".flint.lock";

/// The run folder, locked for this process.
pub struct Locked {
    _file: File,
}

/// Opens `dir` for training: refuses a folder another flint process trains in, and, for a new
/// run, one that is neither missing, empty, nor a run that died before its first checkpoint
/// (the caller has refused a run with checkpoints), rather than write over it. A dead run is
/// started over: its logs are removed, so neither `metrics.jsonl` nor TensorBoard shows its
/// steps. Half-written checkpoints of dead processes are removed either way.
pub fn open(dir: &Path, new_run: bool) -> Result<Locked> {
    if new_run {
        refuse_other_folders(dir)?;
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--out {}: cannot create", dir.display()))?;
    let path = dir.join(LOCK);
    let file = File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => bail!(
            "{}: another flint process is training in this folder; wait for it to finish, or choose another --out",
            dir.display()
        ),
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("{}: cannot lock", path.display()))
        }
    }
    if new_run {
        for e in std::fs::read_dir(dir)?.filter_map(|e| e.ok()) {
            if e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
            {
                std::fs::remove_file(e.path())
                    .with_context(|| format!("{}: cannot remove", e.path().display()))?;
            }
        }
    }
    remove_stale_temporaries(dir);
    Ok(Locked { _file: file })
}

/// Whether `dir` holds a flint run: a `config.toml` of training settings and a `metrics.jsonl`.
fn is_run(dir: &Path) -> bool {
    dir.join("metrics.jsonl").is_file()
        && crate::trainer::config::TrainOptions::from_toml_file(&dir.join("config.toml")).is_ok()
}

fn refuse_other_folders(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        bail!(
            "--out {}: is a file, not a folder; choose another --out",
            dir.display()
        );
    }
    let first = std::fs::read_dir(dir)
        .with_context(|| format!("--out {}: cannot read", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .find(|n| n != LOCK);
    match first {
        Some(name) if !is_run(dir) => bail!(
            "--out {}: the folder exists and is not a flint run (it holds {}); choose another --out, or empty it",
            dir.display(),
            name.to_string_lossy()
        ),
        _ => Ok(()),
    }
}

/// Removes the half-written checkpoints (`checkpoints/.tmp_step_N_PID`) of processes that are
/// gone (killed mid-checkpoint): each can be the size of a model and its optimizer state.
fn remove_stale_temporaries(dir: &Path) {
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
