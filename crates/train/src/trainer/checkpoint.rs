//! Checkpoints: `RUN/checkpoints/step_NNNNNNNN/` holding `model.safetensors` (parameters),
//! `optimizer.safetensors` (AdamW moments) and `state.json` (step, data position, settings,
//! and each file's size and checksum). A checkpoint is written into a temporary folder, every
//! file synced, then renamed into place: a kill at any moment leaves either the complete
//! checkpoint or none, and never touches the earlier ones.

use crate::files::write_atomic;
use crate::tensors::{named, save_f32, TensorFile};
use anyhow::{anyhow, bail, Context, Result};
use flint_model::gpt::{self, GptConfig};
use flint_model::layout::Layout;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    /// Optimizer steps done.
    pub step: u64,
    /// AdamW updates done: fewer than `step` when fp16 overflows skipped updates (AdamW's bias
    /// correction counts updates, not steps).
    pub adam_updates: u32,
    /// The data loader's position, serialised by the loader.
    pub loader: serde_json::Value,
    /// The tokenizer (`bytes` or a tokenizer.json path) and its fingerprint.
    pub tokenizer: String,
    pub tokenizer_fingerprint: String,
    /// The model config, as JSON.
    pub model: serde_json::Value,
    /// The fp16 loss scaler's state, for an exact resume (absent in other precisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_scaler: Option<crate::amp::GradScaler>,
    /// Where and in which precision the run trained (`cpu` / `cuda:0`, `fp32` / `bf16` / ...):
    /// a resume elsewhere is allowed but not bit-identical, and says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// The training data's [`Dataset::fingerprint`](crate::data::Dataset::fingerprint): a resume
    /// on other data is allowed but not bit-identical, and says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Seconds of training up to this step (`metrics.jsonl`'s `elapsed_s`), which a resume
    /// continues from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// The run's settings (`config.toml`) when it was written: a resume after `config.toml`
    /// was edited by hand says what changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// File name -> (size in bytes, FNV-1a 64 checksum), checked before loading.
    pub files: BTreeMap<String, (u64, String)>,
    /// FNV-1a 64 of this state as written with `checksum` empty: a damaged `state.json` (a
    /// flipped step or data position would parse, and silently change the training) is refused
    /// like a damaged tensor file, and the previous checkpoint loads.
    #[serde(default)]
    pub checksum: String,
}

impl State {
    /// The text `state.json` holds: written with an empty checksum, whose place then takes the
    /// checksum of that text.
    fn to_json(&self) -> Result<String> {
        let mut blank = self.clone();
        blank.checksum = String::new();
        let text = serde_json::to_string_pretty(&blank)?;
        let sum = fnv1a64(text.as_bytes());
        let at = text.rfind(CHECKSUM_BLANK).expect("the field just written");
        Ok(format!(
            "{}\"checksum\": \"{sum}\"{}",
            &text[..at],
            &text[at + CHECKSUM_BLANK.len()..]
        ))
    }

    /// Parses `state.json`, refusing text whose checksum does not match. The check is on the
    /// text itself: a float parsed and written again need not give the same digits.
    fn from_json(text: &str) -> Result<State> {
        let state: State = serde_json::from_str(text)?;
        let field = format!("\"checksum\": \"{}\"", state.checksum);
        let blank = match text.rfind(&field) {
            Some(at) if !state.checksum.is_empty() => {
                format!(
                    "{}{CHECKSUM_BLANK}{}",
                    &text[..at],
                    &text[at + field.len()..]
                )
            }
            _ => bail!("it has no checksum"),
        };
        if fnv1a64(blank.as_bytes()) != state.checksum {
            bail!("its checksum does not match its contents");
        }
        Ok(state)
    }
}

/// The checksum field as written before its value is known.
const CHECKSUM_BLANK: &str = "\"checksum\": \"\"";

pub struct Loaded {
    pub dir: PathBuf,
    pub state: State,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn dir_of(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(folder_name(step))
}

fn folder_name(step: u64) -> String {
    format!("step_{step:08}")
}

/// Writes a checkpoint of `step` and keeps only the newest `keep`.
pub fn save(
    run: &Path,
    layout: &Layout,
    params: &[f32],
    m: &[f32],
    v: &[f32],
    mut state: State,
    keep: usize,
) -> Result<PathBuf> {
    let root = run.join("checkpoints");
    std::fs::create_dir_all(&root).with_context(|| format!("{}: cannot create", root.display()))?;
    let tmp = root.join(format!(
        ".tmp_step_{:08}_{}",
        state.step,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let result = (|| -> Result<()> {
        save_f32(
            &tmp.join("model.safetensors"),
            &named(layout, params),
            HashMap::new(),
        )?;
        let mut moments = named(layout, m);
        for t in &mut moments {
            t.name = format!("exp_avg.{}", t.name);
        }
        let mut vs = named(layout, v);
        for t in &mut vs {
            t.name = format!("exp_avg_sq.{}", t.name);
        }
        moments.extend(vs);
        save_f32(&tmp.join("optimizer.safetensors"), &moments, HashMap::new())?;
        for name in ["model.safetensors", "optimizer.safetensors"] {
            let bytes = std::fs::read(tmp.join(name))?;
            state
                .files
                .insert(name.into(), (bytes.len() as u64, fnv1a64(&bytes)));
        }
        write_atomic(&tmp.join("state.json"), state.to_json()?.as_bytes())?;
        let dst = dir_of(run, state.step);
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::rename(&tmp, &dst)?;
        if let Ok(d) = std::fs::File::open(&root) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!(
            "{}: cannot write the checkpoint of step {} ({e:#}); earlier checkpoints are intact: free space (or fix the folder's permissions), then continue with `flint train --resume {}`",
            root.display(),
            state.step,
            run.display()
        );
    }
    let written = dir_of(run, state.step);
    for old in complete(run)?.into_iter().rev().skip(keep) {
        // Never the one just written, even with a newer-named folder left beside it.
        if old != written {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(written)
}

/// Complete checkpoint folders of a run, oldest first.
pub fn complete(run: &Path) -> Result<Vec<PathBuf>> {
    let root = run.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(Vec::new());
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step_"))
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// The `state.json` of the newest complete checkpoint, when it reads (a damaged one is left to
/// [`latest`] to report).
pub fn newest_state(run: &Path) -> Option<State> {
    let dir = complete(run).ok()?.pop()?;
    let text = std::fs::read_to_string(dir.join("state.json")).ok()?;
    State::from_json(&text).ok()
}

/// Loads one checkpoint folder, verifying every file against `state.json`.
pub fn load(dir: &Path, layout: &Layout) -> Result<Loaded> {
    let state = read_state(dir)?;
    verify(dir, &state, |_| true)?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        params: read_tensors(dir, "model.safetensors", "", layout)?,
        m: read_tensors(dir, "optimizer.safetensors", "exp_avg.", layout)?,
        v: read_tensors(dir, "optimizer.safetensors", "exp_avg_sq.", layout)?,
        state,
    })
}

/// The model of one checkpoint folder (its parameters, verified like [`load`]'s, and its
/// config), without the optimizer's moments: what sampling needs.
pub fn load_model(dir: &Path) -> Result<(State, GptConfig, Vec<f32>)> {
    let state = read_state(dir)?;
    verify(dir, &state, |name| name == "model.safetensors")?;
    let config: GptConfig = serde_json::from_value(state.model.clone())
        .map_err(|e| anyhow!("{}: corrupted model config ({e})", dir.display()))?;
    let params = read_tensors(dir, "model.safetensors", "", &gpt::param_layout(&config))?;
    Ok((state, config, params))
}

/// `dir/state.json`, which must belong to its folder's step.
fn read_state(dir: &Path) -> Result<State> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("{}: cannot read", state_path.display()))?;
    let state = State::from_json(&text)
        .map_err(|e| anyhow!("{}: corrupted ({e})", state_path.display()))?;
    if dir.file_name() != Some(folder_name(state.step).as_ref()) {
        bail!(
            "{}: corrupted (it says step {}, its folder another)",
            state_path.display(),
            state.step
        );
    }
    Ok(state)
}

/// Checks the size and checksum `state.json` records of each file `wanted` names.
fn verify(dir: &Path, state: &State, wanted: impl Fn(&str) -> bool) -> Result<()> {
    for (name, (size, sum)) in state.files.iter().filter(|(name, _)| wanted(name)) {
        let path = dir.join(name);
        let bytes =
            std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        if bytes.len() as u64 != *size {
            bail!(
                "{}: truncated or corrupted ({} bytes, expected {size})",
                path.display(),
                bytes.len()
            );
        }
        if fnv1a64(&bytes) != *sum {
            bail!(
                "{}: corrupted (its checksum differs from state.json's)",
                path.display()
            );
        }
    }
    Ok(())
}

/// The tensors of `file` named `prefix` + each layout name. A missing tensor or another shape:
/// another model's checkpoint. Non-finite values (a run that diverged) are damage like any
/// other, and an older checkpoint is tried.
fn read_tensors(dir: &Path, file: &str, prefix: &str, layout: &Layout) -> Result<Vec<f32>> {
    let f = TensorFile::open(&dir.join(file))?;
    let path = f.path().display();
    f.read_layout(
        layout,
        |name| format!("{prefix}{name}"),
        |key, found, want| {
            let why = match found {
                None => format!("no tensor `{key}`"),
                Some(shape) => {
                    format!("tensor `{key}` is {shape:?}, this run's model has {want:?}")
                }
            };
            anyhow::Error::new(ForeignCheckpoint(format!("{path}: {why}")))
        },
    )
}

/// A checkpoint whose files are intact but whose tensors do not fit the run's model: not
/// damage to step over (the older checkpoints would be of the wrong model too, or of another
/// run), so resuming stops with it.
#[derive(Debug)]
struct ForeignCheckpoint(String);

impl std::fmt::Display for ForeignCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ForeignCheckpoint {}

/// The newest checkpoint of `run` that loads; a damaged newer one is reported through `warn`
/// and skipped. One of another model is an error.
pub fn latest(run: &Path, layout: &Layout, mut warn: impl FnMut(String)) -> Result<Loaded> {
    if complete(run)?.is_empty() {
        bail!(
            "{}: no checkpoint to resume from (checkpoints/ is empty or missing)",
            run.display()
        );
    }
    let found = newest(run, |dir| match load(dir, layout) {
        Err(e) if e.is::<ForeignCheckpoint>() => Err(Stop(anyhow!(
            "{}: a checkpoint of another model than {}: {e}; resume the run it belongs to, \
             or move it out of {}",
            dir.display(),
            run.join("config.toml").display(),
            dir.parent().unwrap_or(dir).display()
        ))),
        loaded => Ok(loaded),
    })?;
    for (dir, e) in &found.skipped {
        warn(format!("skipping checkpoint {}: {e:#}", dir.display()));
    }
    let loaded = found.loaded?;
    let damaged: Vec<&PathBuf> = found.skipped.iter().map(|(dir, _)| dir).collect();
    set_aside(&damaged, &mut warn);
    Ok(loaded)
}

/// What [`newest`] found: the first result that loaded (or the last error), and the newer
/// folders that did not load, each with its error.
pub(crate) struct Newest<T> {
    pub loaded: Result<T>,
    pub skipped: Vec<(PathBuf, anyhow::Error)>,
}

/// An error that ends [`newest`]'s walk at once, instead of trying an older checkpoint.
pub(crate) struct Stop(pub anyhow::Error);

/// Tries `load` on the complete checkpoints of `run`, newest first, until one loads. A folder
/// that vanishes meanwhile was pruned by the run training in it (which then wrote a newer
/// one): the folders are listed again, rather than the prune taken for damage.
pub(crate) fn newest<T>(
    run: &Path,
    load: impl Fn(&Path) -> std::result::Result<Result<T>, Stop>,
) -> Result<Newest<T>> {
    'listing: for _ in 0..100 {
        let mut skipped = Vec::new();
        let mut last = None;
        for dir in complete(run)?.into_iter().rev() {
            let attempt = match load(&dir) {
                Ok(attempt) => attempt,
                // The folders passed over so far are still reported.
                Err(Stop(e)) => {
                    return Ok(Newest {
                        loaded: Err(e),
                        skipped,
                    })
                }
            };
            match attempt {
                Ok(found) => {
                    return Ok(Newest {
                        loaded: Ok(found),
                        skipped,
                    })
                }
                Err(e) if pruned(&dir, &e) => continue 'listing,
                Err(e) => {
                    last = Some(anyhow!("{e:#}"));
                    skipped.push((dir, e));
                }
            }
        }
        let loaded = Err(last.unwrap_or_else(|| anyhow!("{}: no checkpoint", run.display())));
        return Ok(Newest { loaded, skipped });
    }
    bail!(
        "{}: its checkpoints kept changing while being read",
        run.display()
    )
}

/// Whether `dir` failed to load because a training process removed it meanwhile: it is gone,
/// or a file of it was, and the folder follows within moments (it is removed file by file).
/// Gone means no entry at all: a dangling or looping link is damage, not a prune.
fn pruned(dir: &Path, e: &anyhow::Error) -> bool {
    let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let gone = || std::fs::symlink_metadata(dir).is_err_and(|e| not_found(&e));
    let vanished = e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(not_found)
    });
    if vanished && !gone() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    gone()
}

/// Renames the damaged checkpoints newer than the one a run resumes from to `damaged_step_N`:
/// kept for a look, but no longer a checkpoint. Left in place, they would count as the newest
/// when old checkpoints are removed, and the good ones written after the resume would go.
fn set_aside(damaged: &[&PathBuf], warn: &mut impl FnMut(String)) {
    for dir in damaged {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let to = dir.with_file_name(format!("damaged_{name}"));
        match std::fs::rename(dir, &to) {
            Ok(()) => warn(format!("{} moved to {}", dir.display(), to.display())),
            Err(e) => warn(format!("cannot move {} aside: {e}", dir.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(elapsed_s: f64) -> State {
        State {
            step: 7,
            adam_updates: 7,
            loader: serde_json::json!({"pos": 1476, "epoch": 0}),
            tokenizer: "bytes".into(),
            tokenizer_fingerprint: "bytes".into(),
            model: serde_json::json!({"n_head": 2, "layer_norm_epsilon": 1e-5f32}),
            grad_scaler: None,
            device: Some("cpu".into()),
            precision: Some("fp32".into()),
            data: None,
            elapsed_s: Some(elapsed_s),
            config: Some("steps = 7\n".into()),
            files: BTreeMap::from([("model.safetensors".into(), (12, "00ff".into()))]),
            checksum: String::new(),
        }
    }

    /// Whatever the floats (serde_json's default parser may read one an ulp off), a state
    /// written reads back; any changed byte of it is refused.
    #[test]
    fn state_json_reads_back_and_refuses_any_changed_byte() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let elapsed = f64::from_bits(0x3ff0_0000_0000_0000 | (x >> 12)) * 1e3;
            let text = state(elapsed).to_json().unwrap();
            let back = State::from_json(&text).unwrap();
            assert_eq!(back.elapsed_s.map(f64::to_bits), Some(elapsed.to_bits()));
        }
        let text = state(12.5).to_json().unwrap();
        for i in 0..text.len() {
            let mut bytes = text.clone().into_bytes();
            bytes[i] ^= 1;
            if let Ok(changed) = String::from_utf8(bytes) {
                assert!(State::from_json(&changed).is_err(), "byte {i}: {changed}");
            }
        }
    }
}
