//! `flint train` and `flint generate` as users run them: bad input is a one-line error with exit
//! status 2, Ctrl-C checkpoints, a SIGKILL loses only the steps since the last checkpoint, a full
//! disk during a checkpoint keeps the earlier ones.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// An empty folder, and the guard that removes it when the test ends (keep it alive that long).
fn scratch(name: &str) -> (TempDir, PathBuf) {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("flint-cli-train-{name}-"))
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    (tmp, dir)
}

/// A model small enough to train in a blink, with a learning rate that does not depend on
/// `--steps` (so runs of different lengths share their first steps exactly).
const SMALL: [&str; 14] = [
    "--n-layer",
    "1",
    "--n-embd",
    "32",
    "--n-head",
    "2",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--lr-schedule",
    "constant",
    "--warmup-steps",
    "0",
];

fn flint(args: &[&str]) -> Output {
    flint_in(Path::new("."), args)
}

/// [`flint`] started in `dir`, where relative paths resolve.
fn flint_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn assert_rejected(args: &[&str], mentions: &[&str]) {
    let out = flint(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    // `--device auto` may say in a `note:` line why it runs on the CPU (tested in cli.rs).
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("note: running on the CPU: "))
        .collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one line: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for m in mentions {
        assert!(lines[0].contains(m), "{args:?}: `{m}` not in: {stderr}");
    }
}

fn run_dir(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn bad_training_flags_are_one_line_errors() {
    let (_dir, dir) = scratch("bad");
    let out = run_dir(&dir, "run");
    assert_rejected(
        &["train", "--preset", "gpt5", "--out", &out],
        &["--preset", "gpt5"],
    );
    assert_rejected(
        &["train", "--batch-size", "0", "--out", &out],
        &["--batch-size"],
    );
    assert_rejected(
        &["train", "--seq-len", "4096", "--out", &out],
        &["--seq-len", "4096", "128"],
    );
    assert_rejected(&["train", "--device", "cuda", "--out", &out], &["--device"]);
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_rejected(
        &["train", "--data", empty.to_str().unwrap(), "--out", &out],
        &["empty"],
    );
    // A folder without a tokenizer.json (a model folder, say) is not "no such file".
    assert_rejected(
        &[
            "train",
            "--tokenizer",
            empty.to_str().unwrap(),
            "--out",
            &out,
        ],
        &["a folder without a tokenizer.json"],
    );
    assert_rejected(
        &["train", "--data", &run_dir(&dir, "missing"), "--out", &out],
        &["--data", "no such file or folder; give a text file"],
    );
    assert_rejected(
        &["train", "--resume", &run_dir(&dir, "nothing")],
        &["nothing"],
    );
    // Each names the flag that led there, and only the flags given.
    let missing = run_dir(&dir, "missing.toml");
    assert_rejected(
        &["train", "--config", &missing, "--out", &out],
        &["--config", "missing.toml"],
    );
    let not_hf = empty.to_str().unwrap();
    assert_rejected(
        &["train", "--init-from", not_hf, "--out", &out],
        &["--init-from", "no config.json", "save_pretrained"],
    );
    assert_rejected(
        &["train", "--init-from", &missing, "--out", &out],
        &["--init-from", "no such folder"],
    );
    let file = dir.join("model.safetensors");
    std::fs::write(&file, b"").unwrap();
    assert_rejected(
        &[
            "train",
            "--init-from",
            file.to_str().unwrap(),
            "--out",
            &out,
        ],
        &["--init-from", "a file, not a folder"],
    );
    let heads = ["train", "--n-head", "3", "--n-layer", "2", "--out", &out];
    assert_rejected(&heads, &["--n-head 3", "--n-layer 2", "n_head"]);
    let out_of_heads = flint(&heads);
    assert!(!String::from_utf8_lossy(&out_of_heads.stderr).contains("--n-embd"));
    assert_rejected(
        &["generate", &run_dir(&dir, "nothing"), "--prompt", "hi"],
        &["nothing"],
    );
}

/// The lines of `RUN/metrics.jsonl`, parsed (none before the file exists).
fn metric_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `step loss` of each training line.
fn losses(run: &Path) -> Vec<String> {
    metric_lines(run)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| format!("{} {}", v["step"], v["loss"]))
        .collect()
}

/// `out`, asserted to be a success (its stderr shown otherwise).
fn succeeds(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `flint train ARGS` with the SMALL model.
fn small<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["train"];
    all.extend_from_slice(args);
    all.extend(SMALL);
    all
}

/// `flint train` args for a SMALL run of `steps` steps in `run`, checkpointing every 2 steps.
fn small_run<'a>(run: &'a Path, steps: &'a str) -> Vec<&'a str> {
    let out = run.to_str().unwrap();
    small(&["--steps", steps, "--checkpoint-every", "2", "--out", out])
}

/// Starts a long training run and waits until it has logged `steps` steps.
fn start_training(run: &Path, steps: usize) -> std::process::Child {
    start(&small_run(run, "100000"), run, steps)
}

/// Starts `flint args` training in `run` and waits until it has logged `steps` steps.
fn start(args: &[&str], run: &Path, steps: usize) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while losses(run).len() < steps {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_resume_continues_from_it() {
    // SIGTERM is what Slurm and Kubernetes send before they stop a job.
    for (name, signal) in [("sigint", libc::SIGINT), ("sigterm", libc::SIGTERM)] {
        stop_and_resume(name, signal);
    }
}

fn stop_and_resume(name: &str, signal: i32) {
    let (_dir, dir) = scratch(name);
    let run = dir.join("run");
    let child = start_training(&run, 3);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    // 130, as a shell reports an interrupted command: a script can tell it from a finished run.
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("interrupted at step"), "{stdout}");
    let stopped = losses(&run).len();
    assert_checkpointed_last_step(&run, stopped);
    let resumed = flint(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--steps",
        &(stopped + 2).to_string(),
    ]);
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(losses(&run).len(), stopped + 2);
    // Training time goes on from the checkpoint's, not from 0.
    let elapsed: Vec<f64> = metric_lines(&run)
        .iter()
        .filter_map(|v| v["elapsed_s"].as_f64())
        .collect();
    assert!(elapsed.windows(2).all(|w| w[0] <= w[1]), "{elapsed:?}");
}

/// That the newest checkpoint is of `step`, the run's last.
fn assert_checkpointed_last_step(run: &Path, step: usize) {
    let newest = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .max()
        .unwrap();
    assert_eq!(
        newest.to_str().unwrap(),
        format!("step_{step:08}"),
        "the stop checkpoints the last finished step"
    );
}

/// Runs `flint ARGS` and, as `head` does, closes its output once it has printed the line of step
/// 3; returns its exit status and stderr.
fn close_output_after_step_3(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while !lines.next().unwrap().unwrap().starts_with("step 3/") {}
    drop(lines);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `flint train | head`: once the pipe is closed the run stops as on Ctrl-C, with a checkpoint
/// of its last step, instead of dying between checkpoints; the reason goes to stderr.
#[test]
fn a_closed_output_stops_the_run_with_a_checkpoint() {
    let (_dir, dir) = scratch("pipe");
    let (run, clean) = (dir.join("run"), dir.join("clean"));
    let (code, stderr) = close_output_after_step_3(&small_run(&run, "100000"));
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains("the output could not be written") && stderr.contains("Broken pipe"),
        "{stderr}"
    );
    let stopped = losses(&run).len();
    assert_checkpointed_last_step(&run, stopped);
    assert_resumes_like_an_uninterrupted_run(&run, &clean, stopped + 2);

    // Closed during the last step, the run finishes as one: exit status 0, its model written.
    let finished = dir.join("finished");
    let args = small(&["--steps", "4", "--out", finished.to_str().unwrap()]);
    let (code, stderr) = close_output_after_step_3(&args);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(finished.join("model/model.safetensors").is_file());
    assert_checkpointed_last_step(&finished, 4);
}

#[test]
fn sigkill_loses_at_most_the_steps_since_the_last_checkpoint() {
    let (_dir, dir) = scratch("sigkill");
    let (run, clean) = (dir.join("run"), dir.join("clean"));
    let mut child = start_training(&run, 5);
    child.kill().unwrap();
    child.wait().unwrap();
    // The run may have got well past step 5 before the kill landed: finish at a step far beyond.
    assert_resumes_like_an_uninterrupted_run(&run, &clean, 300);
}

/// Resumes `run` up to `steps`, trains `clean` from scratch to `steps`, and asserts that each
/// step appears once in `run` with exactly the losses of the run that was never interrupted.
fn assert_resumes_like_an_uninterrupted_run(run: &Path, clean: &Path, steps: usize) {
    let n = steps.to_string();
    let resumed = flint(&["train", "--resume", run.to_str().unwrap(), "--steps", &n]);
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(flint(&small_run(clean, &n)).status.code(), Some(0));
    let (interrupted, never) = (losses(run), losses(clean));
    assert_eq!(never.len(), steps);
    assert_eq!(interrupted, never);
}

#[test]
fn a_full_disk_during_a_checkpoint_is_an_error_that_keeps_the_previous_checkpoints() {
    let (_dir, dir) = scratch("diskfull");
    let (run, clean) = (dir.join("run"), dir.join("clean"));
    assert_eq!(flint(&small_run(&run, "4")).status.code(), Some(0));
    // Resume with files limited to 64 KiB, less than a checkpoint's tensors: the write of
    // step 6's checkpoint fails as on a full disk (EFBIG instead of ENOSPC; SIGXFSZ ignored so
    // the write returns the error instead of killing the process).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flint"));
    cmd.args(["train", "--resume", run.to_str().unwrap(), "--steps", "8"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 64 << 10,
                rlim_max: libc::RLIM_INFINITY,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot write the checkpoint of step 6")
            && stderr.contains("intact")
            && stderr.contains("--resume"),
        "{stderr}"
    );
    // Only the complete checkpoints remain: no half-written step 6, no temporary folder.
    let mut left: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["step_00000002", "step_00000004"]);
    // With space again, the run resumes from step 4 and matches a run that never failed.
    assert_resumes_like_an_uninterrupted_run(&run, &clean, 8);
}

/// `flint generate RUN --prompt ROMEO: --max-new-tokens 12`, and `extra` flags.
fn generate_romeo(run: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        run.to_str().unwrap(),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "12",
    ];
    args.extend_from_slice(extra);
    flint(&args)
}

#[test]
fn generate_continues_a_prompt_from_a_run() {
    let (_dir, dir) = scratch("generate");
    let run = dir.join("run");
    let args = small(&["--steps", "3", "--out", run.to_str().unwrap()]);
    assert_eq!(flint(&args).status.code(), Some(0));
    let out = generate_romeo(&run, &["--seed", "3"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ROMEO:"));
    let again = generate_romeo(&run, &["--seed", "3"]);
    assert_eq!(
        out.stdout, again.stdout,
        "the same seed gives the same text"
    );
    // More tokens than the context holds (SMALL's is 128): all it holds, and a note why.
    let run = run.to_str().unwrap();
    let long = [
        "generate",
        run,
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "18446744073709551615",
    ];
    let out = flint(&long);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("stopped after 122 new tokens"), "{stderr}");
}

/// A run still training (or killed) has no `model/` yet: generate samples from its newest
/// checkpoint that loads, as nanoGPT's sample.py does from ckpt.pt, and changes nothing.
#[test]
fn generate_samples_a_run_without_model_from_its_newest_checkpoint() {
    let (_dir, dir) = scratch("generate-checkpoint");
    let run = dir.join("run");
    let args = small(&[
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(flint(&args).status.code(), Some(0));
    let sample = || {
        let out = generate_romeo(&run, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    };
    let listing = || {
        let mut files: Vec<_> = walk(&run)
            .into_iter()
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        files.sort();
        files
    };
    let (code, from_model, note) = sample();
    assert_eq!(code, Some(0));
    assert!(!note.contains("sampling from"), "{note}");
    // A checkpoint newer than model/ (a resume training the run further) is what is sampled.
    let newest = run.join("checkpoints/step_00000004");
    let later = std::time::SystemTime::now() + Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(newest.join("state.json"))
        .unwrap()
        .set_modified(later)
        .unwrap();
    let (_, from_newer, note) = sample();
    assert!(
        note.contains("sampling from") && note.contains("step_00000004"),
        "{note}"
    );
    // The last checkpoint holds the same weights as model/.
    assert_eq!(from_newer, from_model);
    std::fs::remove_dir_all(run.join("model")).unwrap();
    let (_, from_last, note) = sample();
    assert_eq!(from_last, from_model);
    assert!(note.contains("step_00000004"), "{note}");
    // A damaged newest checkpoint is passed over, said, and left as it was.
    let weights = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let before = listing();
    let (code, from_older, note) = sample();
    assert_eq!(code, Some(0));
    assert!(from_older.starts_with("ROMEO:") && from_older != from_model);
    assert!(
        note.contains("passed over checkpoint")
            && note.contains("sampling from")
            && note.contains("step_00000002"),
        "{note}"
    );
    assert!(listing() == before, "generate changed the run folder");
    // Without any checkpoint: what to do.
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let (code, _, stderr) = sample();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no checkpoint yet"), "{stderr}");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// A run trained with a tokenizer file given by a relative path samples from anywhere: the
/// tokenizer is copied beside the model, and generation reads that copy.
#[test]
fn generate_finds_the_run_tokenizer_from_another_folder() {
    let (_dir, dir) = scratch("relative-tokenizer");
    std::fs::create_dir_all(dir.join("text")).unwrap();
    let text: String = (0..400)
        .map(|i| format!("line {i} of the little corpus\n"))
        .collect();
    std::fs::write(dir.join("text/a.txt"), text).unwrap();
    let tokenizer = [
        "tokenizer",
        "train",
        "--data",
        "text",
        "--vocab-size",
        "300",
        "--out",
        "tok.json",
    ];
    succeeds(flint_in(&dir, &tokenizer));
    let train = small(&[
        "--tokenizer",
        "tok.json",
        "--data",
        "text",
        "--steps",
        "2",
        "--out",
        "run",
    ]);
    succeeds(flint_in(&dir, &train));
    assert!(dir.join("run/model/tokenizer.json").is_file());
    // HF `generate` stops at config.json's eos_token_id: the tokenizer's end-of-text id.
    let json = |path: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(path)).unwrap()).unwrap()
    };
    let eot = json("tok.json")["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["content"] == "<|endoftext|>")
        .unwrap()["id"]
        .clone();
    assert_eq!(json("run/model/config.json")["eos_token_id"], eot);
    let run = run_dir(&dir, "run");
    succeeds(flint(&[
        "generate",
        &run,
        "--prompt",
        "line",
        "--max-new-tokens",
        "4",
    ]));
}

/// `{"step": N, "val_loss"}` of the model after step N's update (the one `RUN/model` holds after
/// the last step), and step 0 of the initial model: a run started from another's final model
/// logs, as its step 0, the other's last validation loss.
#[test]
fn validation_is_logged_for_the_initial_model_and_after_each_update() {
    let (_dir, dir) = scratch("validation");
    let val_losses = |run: &str| -> Vec<(u64, f64)> {
        metric_lines(&dir.join(run))
            .into_iter()
            .filter(|v| v.get("val_loss").is_some())
            .map(|v| (v["step"].as_u64().unwrap(), v["val_loss"].as_f64().unwrap()))
            .collect()
    };
    let first = small(&["--steps", "2", "--eval-every", "1", "--out", "first"]);
    succeeds(flint_in(&dir, &first));
    let next = small(&[
        "--init-from",
        "first/model",
        "--steps",
        "1",
        "--out",
        "next",
    ]);
    succeeds(flint_in(&dir, &next));

    let (first, next) = (val_losses("first"), val_losses("next"));
    let steps: Vec<u64> = first.iter().map(|v| v.0).collect();
    assert_eq!(steps, [0, 1, 2]);
    assert!(
        first[0].1 != first[1].1 && first[1].1 != first[2].1,
        "{first:?}"
    );
    assert_eq!(next[0], (0, first[2].1), "{next:?} after {first:?}");
}

/// A Hugging Face folder whose model is not a byte model and that has no `tokenizer.json` is
/// refused with the fix, rather than sampled as bytes.
#[test]
fn generate_from_a_folder_without_its_tokenizer_says_which_flag_to_pass() {
    let (_dir, dir) = scratch("no-tokenizer");
    let config =
        r#"{"vocab_size": 300, "n_positions": 16, "n_embd": 8, "n_layer": 1, "n_head": 2}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    let path = dir.display().to_string();
    let args = ["generate", path.as_str(), "--prompt", "hi"];
    assert_rejected(&args, &["no tokenizer.json", "--tokenizer"]);
    std::fs::write(dir.join("vocab.json"), "{}").unwrap();
    std::fs::write(dir.join("merges.txt"), "").unwrap();
    assert_rejected(&args, &["merges.txt", "save_pretrained", "--tokenizer"]);
}

/// A run killed after its last checkpoint but before its model was written resumes with no
/// step to train: it says so, and writes the model.
#[test]
fn a_run_killed_before_its_model_resumes_to_write_it() {
    let (_dir, dir) = scratch("model_left");
    let run = dir.join("run");
    succeeds(flint(&small(&[
        "--steps",
        "2",
        "--out",
        run.to_str().unwrap(),
    ])));
    let model = std::fs::read(run.join("model/model.safetensors")).unwrap();
    std::fs::remove_dir_all(run.join("model")).unwrap();
    // A new run in the folder is refused, with the --resume that writes the model.
    let args = small(&["--steps", "2", "--out", run.to_str().unwrap()]);
    let write_it = format!("flint train --resume {}", run.display());
    assert_rejected(&args, &["model/ was not written", &write_it]);
    let out = succeeds(flint(&["train", "--resume", run.to_str().unwrap()]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("resuming after step 2, the last: no step left to train"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read(run.join("model/model.safetensors")).unwrap(),
        model
    );
    // Now finished: a plain --resume is refused with the command that trains further.
    assert_rejected(
        &["train", "--resume", run.to_str().unwrap()],
        &["finished at its last step", "--steps 4"],
    );
    // Trained further to step 4, then killed before its model: the model/ left is step 2's,
    // older than the last checkpoint, which does not make the run finished.
    let weights = run.join("model/model.safetensors");
    let before = std::fs::metadata(&weights).unwrap().modified().unwrap();
    let resume = ["train", "--resume", run.to_str().unwrap(), "--steps", "4"];
    succeeds(flint(&resume));
    let step_4 = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &model).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_modified(before)
        .unwrap();
    let out = succeeds(flint(&["train", "--resume", run.to_str().unwrap()]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("no step left to train"), "{stdout}");
    assert_eq!(std::fs::read(&weights).unwrap(), step_4);
}

/// A new run refuses a folder that is not a run (it would write over the files there), and
/// starts over in a run folder that died before its first checkpoint: its logs are the new
/// run's alone, and half-written checkpoints of dead processes are removed.
#[test]
fn a_new_run_uses_only_empty_folders_or_runs_without_checkpoints() {
    let (_dir, dir) = scratch("folders");
    std::fs::create_dir_all(dir.join("site")).unwrap();
    std::fs::write(dir.join("site/config.toml"), "title = \"mine\"\n").unwrap();
    assert_rejected(
        &["train", "--steps", "1", "--out", &run_dir(&dir, "site")],
        &["site", "not a flint run", "--out"],
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("site/config.toml")).unwrap(),
        "title = \"mine\"\n"
    );

    let run = dir.join("run");
    let args = small(&[
        "--steps",
        "2",
        "--checkpoint-every",
        "0",
        "--out",
        run.to_str().unwrap(),
    ]);
    succeeds(flint(&args));
    // A finished run is not started over; the error gives the --resume that trains it further
    // (a plain --resume is refused), and the way to start anew from its model.
    let resume_further = format!("flint train --resume {} --steps 4", run.display());
    let init_from = format!("--init-from {}/model", run.display());
    assert_rejected(&args, &["finished at step 2", &resume_further, &init_from]);
    // Even with its checkpoints deleted.
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    assert_rejected(&args, &["has finished", "--out"]);
    // As if killed before any checkpoint: no checkpoints or model, an extra log line, a dead
    // temporary.
    std::fs::remove_dir_all(run.join("model")).unwrap();
    let tmp = run.join("checkpoints/.tmp_step_00000001_4000000000");
    std::fs::create_dir_all(&tmp).unwrap();
    let metrics = run.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"step\":3,\"val_loss\":9.0}\n");
    std::fs::write(&metrics, text).unwrap();
    let events = |run: &Path| {
        std::fs::read_dir(run)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("events.")
            })
            .count()
    };
    assert_eq!(events(&run), 1);

    succeeds(flint(&args));
    let steps: Vec<String> = metric_lines(&run)
        .iter()
        .map(|v| v["step"].to_string())
        .collect();
    assert_eq!(
        steps,
        ["0", "1", "2", "2"],
        "train lines for 1 and 2, evals at 0 and 2"
    );
    assert_eq!(events(&run), 1, "the dead run's TensorBoard file is gone");
    assert!(!tmp.exists());
}

/// A resume warns when the data it continues on is not what the checkpoint was trained on,
/// and refuses a changed tokenizer file with the fix, even when the vocabulary size changed
/// with it (which makes the checkpoint's tensors another shape).
#[test]
fn resuming_on_changed_data_warns_and_on_a_changed_tokenizer_fails() {
    let (_dir, dir) = scratch("changed");
    let text: String = (0..300)
        .map(|i| format!("line {i} of some text\n"))
        .collect();
    std::fs::write(dir.join("a.txt"), &text).unwrap();
    let tokenizer = |size: &str| {
        let args = [
            "tokenizer",
            "train",
            "--data",
            "a.txt",
            "--vocab-size",
            size,
            "--out",
            "tok.json",
        ];
        succeeds(flint_in(&dir, &args));
    };
    tokenizer("300");
    let args = small(&[
        "--data",
        "a.txt",
        "--tokenizer",
        "tok.json",
        "--steps",
        "2",
        "--out",
        "run",
    ]);
    succeeds(flint_in(&dir, &args));
    let resume = |steps: &str| flint_in(&dir, &["train", "--resume", "run", "--steps", steps]);

    std::fs::write(dir.join("a.txt"), text.replace("line", "lime")).unwrap();
    let out = resume("3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("data changed"), "{stderr}");

    tokenizer("280");
    let out = resume("4");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("tokenizer file") && stderr.contains("put back"),
        "{stderr}"
    );
}

/// `--init-from` a folder with a `tokenizer.json` trains with it unless `--tokenizer` says
/// otherwise; and a tokenizer that drops whitespace (word-level) still ends the run with a
/// sample and exit status 0.
#[test]
fn init_from_reads_the_folders_tokenizer_and_any_tokenizer_samples() {
    let (_dir, dir) = scratch("init-tokenizer");
    let text: String = (0..300)
        .map(|i| format!("one two three {}\n", i % 7))
        .collect();
    std::fs::write(dir.join("a.txt"), &text).unwrap();
    let words = [
        "[UNK]", "one", "two", "three", "0", "1", "2", "3", "4", "5", "6",
    ];
    let vocab: serde_json::Map<_, _> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let word_level = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("words.json"), word_level.to_string()).unwrap();
    let args = small(&[
        "--data",
        "a.txt",
        "--tokenizer",
        "words.json",
        "--steps",
        "2",
        "--out",
        "first",
    ]);
    let out = succeeds(flint_in(&dir, &args));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sample:"), "{stdout}");

    let mut args = vec![
        "train",
        "--data",
        "a.txt",
        "--init-from",
        "first/model",
        "--steps",
        "1",
    ];
    args.extend(["--batch-size", "4", "--seq-len", "32", "--out", "next"]);
    succeeds(flint_in(&dir, &args));
    let config = std::fs::read_to_string(dir.join("next/config.toml")).unwrap();
    assert!(config.contains("first/model/tokenizer.json"), "{config}");
    assert!(dir.join("next/model/tokenizer.json").is_file());
}

/// One process trains in a run folder at a time: a second, new or resumed, is refused (a new
/// run would otherwise start the folder over under the first one).
#[test]
fn a_folder_being_trained_in_is_refused_to_a_second_process() {
    let (_dir, dir) = scratch("locked");
    let run = dir.join("run");
    let path = run.to_str().unwrap();
    // No checkpoint yet: a new run in the folder would otherwise start it over.
    let args = small(&[
        "--steps",
        "100000",
        "--checkpoint-every",
        "0",
        "--out",
        path,
    ]);
    let mut child = start(&args, &run, 2);
    assert_rejected(&args, &["another flint process", "--out"]);
    child.kill().unwrap();
    child.wait().unwrap();
    let resumable = dir.join("resumable");
    let mut child = start_training(&resumable, 3);
    let path = resumable.to_str().unwrap();
    assert_rejected(&["train", "--resume", path], &["another flint process"]);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `--out .` trains in the current folder (the data cache goes beside it, not into it), and a
/// run that failed before it logged anything (only its `config.toml`) can be run again.
#[test]
fn a_run_in_the_current_folder_and_one_that_failed_at_once() {
    let (_dir, dir) = scratch("dot");
    let here = dir.join("here");
    std::fs::create_dir_all(&here).unwrap();
    let args = small(&["--steps", "1", "--out", "."]);
    succeeds(flint_in(&here, &args));
    assert!(here.join("model/config.json").is_file());
    assert!(dir.join(".flint-data-cache").is_dir());

    let failed = dir.join("failed");
    std::fs::create_dir_all(&failed).unwrap();
    std::fs::copy(here.join("config.toml"), failed.join("config.toml")).unwrap();
    succeeds(flint_in(&failed, &args));
}

/// A refused run leaves no empty default folder behind, whether a setting was refused before
/// the folder was made (`--lr -1`) or its data after (a missing `--data`).
#[test]
fn a_refused_run_leaves_no_empty_run_folder() {
    let (_dir, dir) = scratch("refused");
    for args in [
        &["train", "--lr", "-1"][..],
        &["train", "--data", "missing.txt"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_flint"))
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let left: Vec<_> = std::fs::read_dir(dir.join("runs"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{args:?}: {left:?}");
    }
}

/// `--help` shows each setting's default as the trainer has it, and making the help (which
/// happens on every command) writes nothing.
#[test]
fn help_shows_the_trainers_defaults_and_writes_nothing() {
    let (_dir, dir) = scratch("help");
    let out = Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(["train", "--help"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, key) in [
        ("--lr", "lr"),
        ("--eps", "eps"),
        ("--data-order", "data_order"),
    ] {
        let default = flint_train::trainer::config::default_setting(key).unwrap();
        let line = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(flag))
            .nth(1)
            .unwrap_or_else(|| panic!("{flag} in\n{help}"));
        assert!(line.contains(&format!("[default: {default}]")), "{line}");
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}
