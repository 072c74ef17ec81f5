//! Exact resume: a run stopped and resumed logs bit-identical losses to one never stopped
//! (dropout and shuffling included), and a damaged checkpoint is refused while the previous
//! one still loads.

use flint_train::data::DataOrder;
use flint_train::trainer::config::TrainOptions;
use flint_train::trainer::{train, Observer, Started, StepMetrics};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use tempfile::TempDir;

#[derive(Default)]
struct Quiet {
    warnings: Vec<String>,
}

impl Observer for Quiet {
    fn started(&mut self, _: &Started) {}
    fn step(&mut self, _: &StepMetrics) {}
    fn eval(&mut self, _: u64, _: f32) {}
    fn checkpoint(&mut self, _: &Path) {}
    fn warn(&mut self, message: &str) {
        self.warnings.push(message.to_string());
    }
}

/// A run folder that does not exist yet, inside a temporary folder removed when the test ends
/// (keep the first value alive for that long).
fn scratch(name: &str) -> (TempDir, PathBuf) {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("flint-resume-{name}-"))
        .tempdir()
        .unwrap();
    let run = tmp.path().join("run");
    (tmp, run)
}

fn options(out: &Path, steps: u64) -> TrainOptions {
    TrainOptions {
        out: Some(out.to_path_buf()),
        steps: Some(steps),
        n_layer: Some(1),
        n_embd: Some(32),
        n_head: Some(2),
        batch_size: Some(4),
        seq_len: Some(32),
        grad_accum_steps: Some(2),
        dropout: Some(0.1),
        data_order: Some(DataOrder::Shuffle),
        eval_every: Some(4),
        checkpoint_every: Some(3),
        ..TrainOptions::default()
    }
}

/// The training lines of metrics.jsonl (step, loss, grad_norm), as text.
fn losses(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {} {}", v["step"], v["loss"], v["grad_norm"])
        })
        .collect()
}

#[test]
fn resumed_run_logs_the_same_losses_as_an_uninterrupted_one() {
    let stop = AtomicBool::new(false);
    let (_full, full) = scratch("full");
    let whole = train(options(&full, 7), None, &stop, &mut Quiet::default()).unwrap();

    let (_part, part) = scratch("part");
    train(options(&part, 4), None, &stop, &mut Quiet::default()).unwrap();
    let more = TrainOptions {
        steps: Some(7),
        ..TrainOptions::default()
    };
    let resumed = train(more, Some(&part), &stop, &mut Quiet::default()).unwrap();

    assert_eq!(losses(&full).len(), 7);
    assert_eq!(losses(&full), losses(&part));
    // The summary's first validation loss is step 0's (the initial model), logged before the stop.
    assert!(whole.first_val_loss.is_some());
    assert_eq!(resumed.first_val_loss, whole.first_val_loss);
    assert_eq!(resumed.last_val_loss, whole.last_val_loss);
    assert!(
        part.join("model/model.safetensors").exists() && part.join("model/config.json").exists()
    );
}

#[test]
fn damaged_newest_checkpoint_is_refused_and_the_previous_one_loads() {
    let stop = AtomicBool::new(false);
    let (_run, run) = scratch("damaged");
    train(options(&run, 6), None, &stop, &mut Quiet::default()).unwrap();
    // Steps 3 and 6 are checkpointed; truncate the newest model file.
    let newest = run.join("checkpoints/step_00000006/model.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();

    let mut quiet = Quiet::default();
    let more = TrainOptions {
        steps: Some(7),
        ..TrainOptions::default()
    };
    let done = train(more, Some(&run), &stop, &mut quiet).unwrap();
    assert_eq!(done.last_step, 7);
    assert!(
        quiet
            .warnings
            .iter()
            .any(|w| w.contains("step_00000006") && w.contains("truncated or corrupted")),
        "{:?}",
        quiet.warnings
    );
    // Steps 4..=7 were redone from step 3: each step appears once in the metrics.
    let steps: Vec<String> = losses(&run)
        .iter()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(steps, ["1", "2", "3", "4", "5", "6", "7"]);
    // A newest "checkpoint" that is a dangling link is damage too (not a folder being pruned,
    // which the walk would wait for).
    let link = run.join("checkpoints/step_00000099");
    std::os::unix::fs::symlink("/nonexistent/flint", &link).unwrap();
    let more = TrainOptions {
        steps: Some(8),
        ..TrainOptions::default()
    };
    let done = train(more, Some(&run), &stop, &mut Quiet::default()).unwrap();
    assert_eq!(done.last_step, 8);
    assert!(std::fs::symlink_metadata(run.join("checkpoints/damaged_step_00000099")).is_ok());
}

#[test]
fn a_new_run_refuses_a_folder_with_checkpoints() {
    let stop = AtomicBool::new(false);
    let (_run, run) = scratch("exists");
    train(options(&run, 3), None, &stop, &mut Quiet::default()).unwrap();
    let err = train(options(&run, 3), None, &stop, &mut Quiet::default())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("--resume"), "{err:#}");
}

#[test]
fn a_checkpoint_of_another_model_stops_the_resume() {
    let stop = AtomicBool::new(false);
    let ((_run, run), (_other, other)) = (scratch("victim"), scratch("other"));
    train(options(&run, 3), None, &stop, &mut Quiet::default()).unwrap();
    let wider = TrainOptions {
        n_embd: Some(48),
        ..options(&other, 9)
    };
    train(wider, None, &stop, &mut Quiet::default()).unwrap();
    // The other model's checkpoint, intact, as the newest of this run.
    let foreign = run.join("checkpoints/step_00000009");
    std::fs::rename(other.join("checkpoints/step_00000009"), &foreign).unwrap();
    let more = TrainOptions {
        steps: Some(12),
        ..TrainOptions::default()
    };
    let err = train(more, Some(&run), &stop, &mut Quiet::default())
        .err()
        .unwrap();
    let text = format!("{err:#}");
    assert!(
        text.contains("step_00000009") && text.contains("another model"),
        "{text}"
    );
    // Nothing was trained or cut: the run still ends at its own step 3.
    assert_eq!(losses(&run).len(), 3);
    assert!(foreign.join("state.json").exists());
}

#[test]
fn settings_that_cannot_change_are_refused_not_ignored() {
    let stop = AtomicBool::new(false);
    let (_run, run) = scratch("settings");
    train(options(&run, 2), None, &stop, &mut Quiet::default()).unwrap();
    let changed = TrainOptions {
        steps: Some(3),
        lr: Some(0.1),
        n_layer: Some(3),
        ..TrainOptions::default()
    };
    let err = train(changed, Some(&run), &stop, &mut Quiet::default())
        .err()
        .unwrap();
    let text = format!("{err:#}");
    assert!(
        text.contains("--lr, --n-layer cannot change with --resume"),
        "{text}"
    );
    assert_eq!(losses(&run).len(), 2);

    // --init-from takes the model's shape from its config.json: a different one is refused.
    let model = run.join("model");
    let ((_wider, wider_run), (_same, same_run)) = (scratch("init"), scratch("init-same"));
    let wider = TrainOptions {
        init_from: Some(model.clone()),
        n_embd: Some(48),
        ..options(&wider_run, 1)
    };
    let err = train(wider, None, &stop, &mut Quiet::default())
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("--n-embd 48 conflicts with --init-from"),
        "{err:#}"
    );
    let same = TrainOptions {
        init_from: Some(model),
        ..options(&same_run, 1)
    };
    train(same, None, &stop, &mut Quiet::default()).unwrap();
}

#[test]
fn a_damaged_newer_checkpoint_is_set_aside_and_never_outlives_the_good_ones() {
    let stop = AtomicBool::new(false);
    let (_run, run) = scratch("aside");
    let keep_one = |steps| TrainOptions {
        keep_checkpoints: Some(1),
        ..options(&run, steps)
    };
    train(keep_one(3), None, &stop, &mut Quiet::default()).unwrap();
    let checkpoints = run.join("checkpoints");
    let damaged = checkpoints.join("step_00000020");
    std::fs::rename(checkpoints.join("step_00000003"), &damaged).unwrap();
    let file = damaged.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..100]).unwrap();
    // Nothing loads: an error, and nothing is moved.
    let more = |steps| TrainOptions {
        steps: Some(steps),
        ..TrainOptions::default()
    };
    assert!(train(more(6), Some(&run), &stop, &mut Quiet::default()).is_err());
    assert!(damaged.exists());
    // With a good checkpoint below it, the damaged one is moved aside, and keeping one
    // checkpoint keeps the one just written.
    let (_good, good) = scratch("aside-good");
    train(options(&good, 3), None, &stop, &mut Quiet::default()).unwrap();
    std::fs::rename(
        good.join("checkpoints/step_00000003"),
        checkpoints.join("step_00000003"),
    )
    .unwrap();
    train(more(6), Some(&run), &stop, &mut Quiet::default()).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["damaged_step_00000020", "step_00000006"]);
    // Steps below the newest checkpoint cannot be resumed to.
    let err = train(more(4), Some(&run), &stop, &mut Quiet::default())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("--steps 4 is below"), "{err:#}");
}

#[test]
fn a_saved_config_of_an_init_from_run_can_be_given_back() {
    let stop = AtomicBool::new(false);
    let (_base, base) = scratch("config-base");
    train(options(&base, 1), None, &stop, &mut Quiet::default()).unwrap();
    let (_first, first) = scratch("config-first");
    let from_model = TrainOptions {
        init_from: Some(base.join("model")),
        out: Some(first.clone()),
        steps: Some(2),
        seq_len: Some(32),
        batch_size: Some(2),
        ..TrainOptions::default()
    };
    train(from_model, None, &stop, &mut Quiet::default()).unwrap();
    let saved = TrainOptions::from_toml_file(&first.join("config.toml")).unwrap();
    assert!(saved.preset.is_none() && saved.init_from.is_some());
    let (_again, again) = scratch("config-again");
    let given_back = TrainOptions {
        out: Some(again.clone()),
        ..saved
    };
    train(given_back, None, &stop, &mut Quiet::default()).unwrap();
    assert_eq!(losses(&first), losses(&again));
}

/// `state.json` is checked like the tensor files: an edited data position or update count (or
/// a step that is not its folder's) would parse and silently change the training, so it is
/// damage, and the previous checkpoint loads; the losses then match an uninterrupted run.
#[test]
fn an_altered_state_json_is_damage_and_the_previous_checkpoint_loads() {
    let stop = AtomicBool::new(false);
    let (_full, full) = scratch("state-full");
    train(options(&full, 7), None, &stop, &mut Quiet::default()).unwrap();
    for (name, from, to) in [
        ("updates", "\"adam_updates\": 6", "\"adam_updates\": 5"),
        ("step", "\"step\": 6", "\"step\": 3"),
    ] {
        let (_run, run) = scratch(&format!("state-{name}"));
        train(options(&run, 6), None, &stop, &mut Quiet::default()).unwrap();
        let state = run.join("checkpoints/step_00000006/state.json");
        let text = std::fs::read_to_string(&state).unwrap();
        assert_eq!(text.matches(from).count(), 1, "{text}");
        std::fs::write(&state, text.replace(from, to)).unwrap();
        let mut quiet = Quiet::default();
        let more = TrainOptions {
            steps: Some(7),
            ..TrainOptions::default()
        };
        train(more, Some(&run), &stop, &mut quiet).unwrap();
        assert!(
            quiet
                .warnings
                .iter()
                .any(|w| w.contains("step_00000006") && w.contains("state.json: corrupted")),
            "{name}: {:?}",
            quiet.warnings
        );
        assert_eq!(losses(&run), losses(&full), "{name}");
    }
}

/// A finished run resumed with nothing left to do is refused (with the flag that trains it
/// further) instead of rewriting its model; one cut short with `--steps` at its checkpoint
/// still ends with that step's evaluation and the model.
#[test]
fn a_resume_with_no_step_left_finishes_or_says_how_to_go_on() {
    let stop = AtomicBool::new(false);
    let (_run, run) = scratch("finished");
    train(options(&run, 3), None, &stop, &mut Quiet::default()).unwrap();
    let again = TrainOptions::default();
    let err = train(again, Some(&run), &stop, &mut Quiet::default())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("--steps 6"), "{err:#}");

    let (_cut, cut) = scratch("cut");
    train(options(&cut, 6), None, &stop, &mut Quiet::default()).unwrap();
    // As if stopped at step 3 of 6: the later checkpoint, lines and model gone.
    std::fs::remove_dir_all(cut.join("checkpoints/step_00000006")).unwrap();
    std::fs::remove_dir_all(cut.join("model")).unwrap();
    let at_three = TrainOptions {
        steps: Some(3),
        ..TrainOptions::default()
    };
    let done = train(at_three, Some(&cut), &stop, &mut Quiet::default()).unwrap();
    assert!(done.last_val_loss.is_some());
    let evals: Vec<u64> = std::fs::read_to_string(cut.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("val_loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [0, 3]);
    assert!(cut.join("model/model.safetensors").exists());
}

/// `config.toml` edited by hand between runs: another architecture with the same tensor shapes
/// (`n_head`) is refused, a changed setting (`lr`) is named in a warning.
#[test]
fn a_hand_edited_config_toml_is_refused_or_reported() {
    let stop = AtomicBool::new(false);
    for (name, from, to) in [
        ("heads", "n_head = 2", "n_head = 4"),
        ("lr", "lr = 0.002", "lr = 0.001"),
    ] {
        let (_run, run) = scratch(&format!("edited-{name}"));
        train(options(&run, 3), None, &stop, &mut Quiet::default()).unwrap();
        let config = run.join("config.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        assert_eq!(text.matches(from).count(), 1, "{text}");
        std::fs::write(&config, text.replace(from, to)).unwrap();
        let more = TrainOptions {
            steps: Some(4),
            ..TrainOptions::default()
        };
        let mut quiet = Quiet::default();
        let result = train(more, Some(&run), &stop, &mut quiet);
        if name == "heads" {
            let err = format!("{:#}", result.err().unwrap());
            assert!(err.contains("its model is not the one"), "{err}");
            assert_eq!(losses(&run).len(), 3);
        } else {
            result.unwrap();
            assert!(
                quiet
                    .warnings
                    .iter()
                    .any(|w| w.contains("changed since") && w.contains("(lr)")),
                "{:?}",
                quiet.warnings
            );
        }
    }
}

/// The temporary files of atomic writes that a kill leaves (`.NAME.tmpPID.N`) are removed when
/// the run is next opened; other files are not touched.
#[test]
fn a_resume_removes_the_temporary_files_a_kill_left() {
    let stop = AtomicBool::new(false);
    let (_run, run) = scratch("temporaries");
    train(options(&run, 3), None, &stop, &mut Quiet::default()).unwrap();
    // Writers that cannot be alive (beyond any pid_max), last touched an hour ago.
    let left = [
        run.join(".config.toml.tmp4294967295.0"),
        run.join("model/.model.safetensors.tmp4294967294.3"),
    ];
    let recent = run.join(".metrics.jsonl.tmp4294967295.1");
    let kept = [
        run.join(".notes.tmp"),
        run.join("model/.x.tmp1.y"),
        recent.clone(),
    ];
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for f in left.iter().chain(&kept) {
        std::fs::write(f, b"x").unwrap();
        if *f != recent {
            let file = std::fs::File::options().write(true).open(f).unwrap();
            file.set_modified(hour_ago).unwrap();
        }
    }
    let more = TrainOptions {
        steps: Some(4),
        ..TrainOptions::default()
    };
    train(more, Some(&run), &stop, &mut Quiet::default()).unwrap();
    assert!(left.iter().all(|f| !f.exists()));
    assert!(kept.iter().all(|f| f.exists()));
}

/// A run resumed under another spelling of its folder (from another working folder, say) is
/// not a run whose settings changed.
#[test]
fn a_resume_under_another_spelling_of_the_folder_is_not_a_change() {
    let stop = AtomicBool::new(false);
    let (_run, run) = scratch("spelling");
    train(options(&run, 3), None, &stop, &mut Quiet::default()).unwrap();
    let other = run.join("..").join(run.file_name().unwrap());
    let more = TrainOptions {
        steps: Some(4),
        ..TrainOptions::default()
    };
    let mut quiet = Quiet::default();
    train(more, Some(&other), &stop, &mut quiet).unwrap();
    assert!(quiet.warnings.is_empty(), "{:?}", quiet.warnings);
}
