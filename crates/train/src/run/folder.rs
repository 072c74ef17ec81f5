//! The run folder itself (`--out RUN`): which folders a new run may use, one process at a time,
//! and what a run that died early left behind.

use crate::files::remove_dead_temporaries;
use crate::trainer::checkpoint;
use crate::trainer::config::TrainOptions;
use crate::trainer::resume::{finished, train_further};
use anyhow::{bail, Context, Result};
use std::fs::{File, TryLockError};
use std::path::Path;
use std::time::SystemTime;

/// Held while a process trains in the folder; released when dropped (or the process ends).
const LOCK: &str = ".flint.lock";

/// The run folder, locked for this process (where the file system has locks).
pub struct Locked {
    _file: File,
}

/// Whether `dir` holds a flint run: a `config.toml` of training settings (written first, so a
/// run that failed at once is one too).
pub fn is_run(dir: &Path) -> bool {
    TrainOptions::from_toml_file(&dir.join("config.toml"))
        .is_ok_and(|o| o.steps.is_some() && o.seed.is_some())
}

/// Opens `dir` for training and locks it: a folder another flint process trains in is refused.
/// A new run takes a missing or empty folder, or starts over in a run that stopped before its
/// first checkpoint (its logs are removed, so neither `metrics.jsonl` nor TensorBoard shows the
/// dead run's steps); it refuses a run with checkpoints or a model, and any other folder, rather
/// than write over it. Half-written checkpoints, which only a dead process can have left once
/// the lock is held, are removed.
pub fn open(dir: &Path, new_run: bool, warn: &mut dyn FnMut(&str)) -> Result<Locked> {
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
        // Some cluster file systems (Lustre without flock, some NFS and FUSE mounts) have no
        // locks (flock's only other failures are bad arguments): train anyway, as before.
        Err(TryLockError::Error(e)) => warn(&format!(
            "{}: the file system does not lock files ({e}); make sure no other flint trains in this folder",
            dir.display()
        )),
    }
    if new_run {
        // Checked again under the lock: another process may have finished a run here since.
        refuse_finished_run(dir)?;
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
    remove_temporaries(dir);
    Ok(Locked { _file: file })
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
        _ => refuse_finished_run(dir),
    }
}

/// A run with checkpoints continues with `--resume`; one with a model (its checkpoints deleted
/// to save space) is finished. Neither is started over.
fn refuse_finished_run(dir: &Path) -> Result<()> {
    if let Some(newest) = checkpoint::complete(dir)?.last() {
        // One that reached its last step resumes only with a larger --steps: say so, rather
        // than point at a --resume that is then refused.
        if let Some(state) = checkpoint::newest_state(dir).filter(finished) {
            if model_is_current(dir, newest) {
                bail!(
                    "--out {0}: this run finished at step {1}; train it further with `{2}`, or give --out a new folder (with `--init-from {0}/model` to start from its model)",
                    dir.display(),
                    state.step,
                    train_further(dir, state.step)
                );
            }
            bail!(
                "--out {0}: this run's last step, {1}, is checkpointed but its model/ was not written; write it with `flint train --resume {0}`, or choose another --out",
                dir.display(),
                state.step
            );
        }
        bail!(
            "--out {}: this run already has checkpoints; continue it with --resume {0} or choose another --out",
            dir.display()
        );
    }
    if model_time(dir).is_some() {
        bail!(
            "--out {}: this run has finished (it holds model/); choose another --out",
            dir.display()
        );
    }
    Ok(())
}

/// When `RUN/model/` was completed (its `model.safetensors`, written after `config.json`);
/// `None` while it is not there.
pub fn model_time(run: &Path) -> Option<SystemTime> {
    let model = run.join("model");
    if !model.join("config.json").is_file() {
        return None;
    }
    std::fs::metadata(model.join("model.safetensors"))
        .and_then(|m| m.modified())
        .ok()
}

/// When the checkpoint folder `dir` was committed (its `state.json`, written last).
pub fn checkpoint_time(dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(dir.join("state.json"))
        .and_then(|m| m.modified())
        .ok()
}

/// Whether `RUN/model/` was written no earlier than the checkpoint `dir`: the model of that step
/// or a later one, not one that an earlier end (or a Ctrl-C) left before the run went on.
pub fn model_is_current(run: &Path, dir: &Path) -> bool {
    match (model_time(run), checkpoint_time(dir)) {
        (Some(model), Some(checkpoint)) => model >= checkpoint,
        _ => false,
    }
}

/// Removes what a kill mid-write leaves: half-written checkpoints (`checkpoints/.tmp_step_N_PID`,
/// each the size of a model and its optimizer state) and the temporary files of atomic writes
/// (`.config.toml.tmpPID.N`, in the run folder and `model/`). The lock is held, so no other
/// process is writing them.
fn remove_temporaries(dir: &Path) {
    let checkpoints = std::fs::read_dir(dir.join("checkpoints"));
    for e in checkpoints.into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp_step_") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    remove_dead_temporaries(dir);
    remove_dead_temporaries(&dir.join("model"));
}
