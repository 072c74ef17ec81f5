//! Exact resume: a run stopped and resumed logs bit-identical losses to one never stopped
//! (dropout and shuffling included), and a damaged checkpoint is refused while the previous
//! one still loads.

use flint_train::data::DataOrder;
use flint_train::trainer::config::TrainOptions;
use flint_train::trainer::{train, Observer, Started, StepMetrics};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

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

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flint-resume-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
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
    let full = scratch("full");
    let whole = train(options(&full, 7), None, &stop, &mut Quiet::default()).unwrap();

    let part = scratch("part");
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
    let run = scratch("damaged");
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
}

#[test]
fn a_new_run_refuses_a_folder_with_checkpoints() {
    let stop = AtomicBool::new(false);
    let run = scratch("exists");
    train(options(&run, 3), None, &stop, &mut Quiet::default()).unwrap();
    let err = train(options(&run, 3), None, &stop, &mut Quiet::default())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("--resume"), "{err:#}");
}

#[test]
fn a_checkpoint_of_another_model_stops_the_resume() {
    let stop = AtomicBool::new(false);
    let (run, other) = (scratch("victim"), scratch("other"));
    train(options(&run, 3), None, &stop, &mut Quiet::default()).unwrap();
    let wider = TrainOptions {
        n_embd: Some(48),
        ..options(&other, 3)
    };
    train(wider, None, &stop, &mut Quiet::default()).unwrap();
    // The other model's checkpoint, intact, as the newest of this run.
    let foreign = run.join("checkpoints/step_00000009");
    std::fs::rename(other.join("checkpoints/step_00000003"), &foreign).unwrap();
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
    let run = scratch("settings");
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
    let wider = TrainOptions {
        init_from: Some(model.clone()),
        n_embd: Some(48),
        ..options(&scratch("init"), 1)
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
        ..options(&scratch("init-same"), 1)
    };
    train(same, None, &stop, &mut Quiet::default()).unwrap();
}

#[test]
fn a_damaged_newer_checkpoint_is_set_aside_and_never_outlives_the_good_ones() {
    let stop = AtomicBool::new(false);
    let run = scratch("aside");
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
    let good = scratch("aside-good");
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
    let base = scratch("config-base");
    train(options(&base, 1), None, &stop, &mut Quiet::default()).unwrap();
    let first = scratch("config-first");
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
    let again = scratch("config-again");
    let given_back = TrainOptions {
        out: Some(again.clone()),
        ..saved
    };
    train(given_back, None, &stop, &mut Quiet::default()).unwrap();
    assert_eq!(losses(&first), losses(&again));
}
