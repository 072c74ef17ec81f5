//! The checks a resume makes before it continues a run: the same model, tokenizer and
//! settings as the checkpoint's, or an error (or a warning) that says what changed.

use super::checkpoint;
use super::config::{self, TrainConfig, TrainOptions};
use crate::data::Tokenizer;
use anyhow::{bail, Result};
use flint_model::gpt::GptConfig;
use std::path::Path;

/// The checkpoint's model must be the one `config.toml` describes: a hand-edited architecture
/// (`n_head`, say, which keeps every tensor's shape) would load and silently compute another
/// model. Dropout is a setting, not the architecture (see [`changed_settings`]).
pub(super) fn same_model(ck: &checkpoint::Loaded, model: &GptConfig, run: &Path) -> Result<()> {
    let architecture = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(fields) = v.as_object_mut() {
            fields.remove("dropout");
        }
        v
    };
    if architecture(&ck.state.model) != architecture(&serde_json::to_value(model)?) {
        bail!(
            "{}: its model is not the one {} describes (it was edited since): restore it, or start a new run with another --out",
            ck.dir.display(),
            run.join("config.toml").display()
        );
    }
    Ok(())
}

/// The command that trains `run`, finished at `step`, as far again.
pub(crate) fn train_further(run: &Path, step: u64) -> String {
    format!(
        "flint train --resume {} --steps {}",
        run.display(),
        step.saturating_mul(2)
    )
}

/// Whether the checkpoint is its run's last step (the steps it was written with), rather than
/// that of an interrupted run.
pub(crate) fn finished(state: &checkpoint::State) -> bool {
    let steps = state
        .config
        .as_deref()
        .and_then(|c| c.parse::<toml::Table>().ok())
        .and_then(|c| c.get("steps").and_then(toml::Value::as_integer));
    steps == Some(state.step as i64)
}

/// The settings of `config.toml` that differ from those the checkpoint was written with (it was
/// edited by hand), other than those a resume may change; `None` when none do, or the
/// checkpoint predates recording them.
pub(super) fn changed_settings(
    state: &checkpoint::State,
    cfg: &TrainConfig,
) -> Result<Option<String>> {
    let Some(then) = &state.config else {
        return Ok(None);
    };
    let parse = |text: &str| text.parse::<toml::Table>();
    let (Ok(then), now) = (parse(then), parse(&cfg.to_toml()?)?) else {
        return Ok(None);
    };
    let keys: std::collections::BTreeSet<&String> = then.keys().chain(now.keys()).collect();
    let changed: Vec<&str> = keys
        .into_iter()
        // `out` is the folder itself, spelled as the resume names it.
        .filter(|k| *k != "out" && !RESUME_MAY_CHANGE.contains(&k.as_str()))
        .filter(|k| then.get(*k) != now.get(*k))
        .map(String::as_str)
        .collect();
    Ok((!changed.is_empty()).then(|| changed.join(", ")))
}

/// A checkpoint continues only with the tokenizer it was trained with.
pub(crate) fn same_tokenizer(
    state: &checkpoint::State,
    tokenizer: &Tokenizer,
    run: &Path,
) -> Result<()> {
    if state.tokenizer_fingerprint == tokenizer.fingerprint() {
        return Ok(());
    }
    if state.tokenizer == tokenizer.spec() {
        bail!(
            "{}: the tokenizer file {} has changed since the run's checkpoints were written; put back the one the run was trained with",
            run.display(),
            state.tokenizer
        );
    }
    bail!(
        "{}: the checkpoints were trained with tokenizer {}, not {}; restore `tokenizer` in {}",
        run.display(),
        state.tokenizer,
        tokenizer.spec(),
        run.join("config.toml").display()
    )
}

/// The settings a resume may change.
const RESUME_MAY_CHANGE: [&str; 4] = ["steps", "device", "precision", "threads"];

/// `--resume` continues a run with its saved settings; only the number of steps, the device,
/// the precision and the threads may change. Any other setting given is an error rather than
/// silently ignored.
pub(super) fn refuse_changes_on_resume(options: &TrainOptions, saved: &Path) -> Result<()> {
    config::below_2_63("--steps", options.steps.unwrap_or(0))?;
    let given = toml::Value::try_from(options)?;
    let changed: Vec<String> = given
        .as_table()
        .into_iter()
        .flat_map(|t| t.keys())
        .filter(|k| !RESUME_MAY_CHANGE.contains(&k.as_str()))
        .map(|k| format!("--{}", k.replace('_', "-")))
        .collect();
    if !changed.is_empty() {
        bail!(
            "{} cannot change with --resume, which continues with the settings in {}; only --steps, --device, --precision and --threads can (start a new run with --init-from RUN/model to change the others)",
            changed.join(", "),
            saved.display()
        );
    }
    Ok(())
}
