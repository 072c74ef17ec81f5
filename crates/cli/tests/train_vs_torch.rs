//! One whole `flint train` command against an independent float64 PyTorch run of the same
//! flags: the bytes tokenizer, the validation split, the sequential loader wrapping around, the
//! cosine schedule with warm-up, gradient accumulation, clipping, AdamW with decay on matrices
//! only, and the evaluations, as `RUN/metrics.jsonl` reports them. Every step's `loss`, `lr` and
//! `grad_norm` and every `val_loss` must match. The fixture (`tests/fixtures/train_run/`: the
//! initial model, the text, and `expected.json` with the flags and the values) comes from
//! `scripts/gen_train_fixture.py`, which describes the reference step by step.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `loss` and `val_loss`: flint trains in float32, and float32 rounding alone puts it within
/// 1e-7 of the float64 reference on this run; the bound leaves a hundredfold room for other
/// CPUs' matrix kernels to round differently over 12 updates, and stays ten times below the
/// smallest change a semantic mistake the script lists makes (1.4e-4).
const LOSS_TOL: f64 = 1e-5;
/// `lr` is a formula of the step alone, written as float32: that rounding (at most 6e-8) is all
/// that separates it from the reference.
const LR_TOL: f64 = 1e-6;
/// `grad_norm` sums the squares of float32 gradients, whose rounding error (backward subtracts
/// nearly equal terms in softmax and layer norm) exceeds the loss's and grows with the drift of
/// the float32 weights; ten times the loss's bound.
const GRAD_NORM_TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train_run")
        .join(name)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn field(line: &Value, name: &str) -> f64 {
    line[name]
        .as_f64()
        .unwrap_or_else(|| panic!("no number `{name}` in {line}"))
}

fn steps(lines: &[Value]) -> Vec<u64> {
    lines.iter().map(|l| l["step"].as_u64().unwrap()).collect()
}

/// Compares `fields` of each line of `got` with the same step's line of `want`, adding a message
/// for each value off by more than its tolerance; returns the largest relative error per field.
fn compare(
    got: &[Value],
    want: &[Value],
    fields: &[(&str, f64)],
    failures: &mut Vec<String>,
) -> Vec<f64> {
    assert_eq!(steps(got), steps(want), "steps of {fields:?}");
    let mut worst = vec![0.0f64; fields.len()];
    for (g, w) in got.iter().zip(want) {
        for (i, &(name, tol)) in fields.iter().enumerate() {
            let (flint, torch) = (field(g, name), field(w, name));
            let err = ((flint - torch) / torch).abs();
            worst[i] = worst[i].max(err);
            if err.is_nan() || err > tol {
                failures.push(format!(
                    "step {}: {name} {flint} vs PyTorch {torch} (rel err {err:.2e} > {tol:.0e})",
                    g["step"]
                ));
            }
        }
    }
    worst
}

#[test]
fn a_training_run_matches_pytorch_step_by_step() {
    let expected = read_json(&fixture("expected.json"));
    let flags: Vec<&str> = expected["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    // The token cache goes beside the run folder: inside the temporary folder too.
    let tmp = tempfile::Builder::new()
        .prefix("flint-cli-train-vs-torch-")
        .tempdir()
        .unwrap();
    let run = tmp.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_flint"))
        .arg("train")
        .arg("--init-from")
        .arg(fixture("init"))
        .arg("--data")
        .arg(fixture("data.txt"))
        .args(&flags)
        .args(["--device", "cpu", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The split first: a token more or less in either part shifts every window after it.
    let data = &expected["data"];
    let split = format!(
        "data: {} training tokens, {} validation tokens",
        data["train_tokens"], data["val_tokens"]
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&split), "expected `{split}` in:\n{stdout}");

    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (train, eval): (Vec<Value>, Vec<Value>) =
        lines.into_iter().partition(|l| l.get("loss").is_some());

    let mut failures = Vec::new();
    let train_fields = [
        ("loss", LOSS_TOL),
        ("lr", LR_TOL),
        ("grad_norm", GRAD_NORM_TOL),
    ];
    let eval_fields = [("val_loss", LOSS_TOL)];
    let want_train = expected["train"].as_array().unwrap();
    let want_eval = expected["eval"].as_array().unwrap();
    let worst_train = compare(&train, want_train, &train_fields, &mut failures);
    let worst_eval = compare(&eval, want_eval, &eval_fields, &mut failures);
    for ((name, _), worst) in train_fields
        .iter()
        .chain(&eval_fields)
        .zip(worst_train.iter().chain(&worst_eval))
    {
        println!("{name}: largest relative error {worst:.2e}");
    }
    assert!(
        failures.is_empty(),
        "`flint train` differs from PyTorch ({}):\n{}",
        expected["command"],
        failures.join("\n")
    );
}
