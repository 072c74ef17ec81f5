//! `flint` as users script it: the real binary, run on files in a scratch directory.
//!
//! The PyTorch fixtures live in `crates/train/tests/fixtures/encoder` (see its README): per case
//! a config, a state_dict and `src` [+ `src_key_padding_mask`] with PyTorch's `output`.

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const CASES: [&str; 5] = [
    "post_relu",
    "pre_gelu",
    "padding",
    "causal",
    "padding_causal",
];
/// max |a - b| / max |b| against PyTorch (float64 reference stored as float32).
const TOL: f64 = 1e-4;

// ---------------------------------------------------------------------------------------------
// Helpers: a scratch directory, running the binary, safetensors files in memory.
// ---------------------------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../train/tests/fixtures/encoder")
        .join(name)
}

/// A fresh directory under the system temp dir, unique per test, removed when dropped.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Self {
        Scratch(
            tempfile::Builder::new()
                .prefix("flint-cli-test-")
                .tempdir()
                .expect("create scratch dir"),
        )
    }

    fn root(&self) -> &Path {
        self.0.path()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }
}

/// What one run of the binary did.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn assert_success(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "flint failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

fn flint<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Outcome {
    flint_env(args, &[])
}

/// [`flint`] with extra environment variables.
fn flint_env<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>, env: &[(&str, &Path)]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .output()
        .expect("run the flint binary");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: without_device_note(&String::from_utf8_lossy(&out.stderr)),
    }
}

/// stderr without the one `note:` line in which `--device auto` says why it runs on the CPU
/// (checked by its own test); what remains is what the command itself printed.
fn without_device_note(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("note: running on the CPU: "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// One tensor in memory: dtype, shape and little-endian bytes.
#[derive(Clone)]
struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Tensor {
    fn f32(shape: &[usize], values: &[f32]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        Tensor {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn values(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32);
        self.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

/// A safetensors file in memory, to read, edit and write back.
#[derive(Clone)]
struct Tensors {
    tensors: BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
}

impl Tensors {
    fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).expect("a valid safetensors file");
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, t)| {
                let tensor = Tensor {
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                    data: t.data().to_vec(),
                };
                (name, tensor)
            })
            .collect();
        let metadata = SafeTensors::read_metadata(&bytes)
            .unwrap()
            .1
            .metadata()
            .clone()
            .unwrap_or_default();
        Tensors { tensors, metadata }
    }

    fn write(&self, path: &Path) {
        let views = self.tensors.iter().map(|(name, t)| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap();
            (name.clone(), view)
        });
        let meta = (!self.metadata.is_empty()).then(|| self.metadata.clone());
        std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
    }

    fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("no tensor `{name}`; have {:?}", self.tensors.keys()))
    }

    fn set(&mut self, name: &str, t: Tensor) {
        self.tensors.insert(name.to_string(), t);
    }

    fn remove(&mut self, name: &str) {
        self.tensors
            .remove(name)
            .expect("the tensor to remove exists");
    }
}

/// max |a - b| / max |b|, infinite when `a` is not finite.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| (*y as f64).abs()).fold(1e-12, f64::max);
    diff / scale
}

/// The files of one `flint forward` run: a fixture case's, each replaceable by an edited copy
/// named `bad_*` in the scratch directory.
struct Forward {
    scratch: Scratch,
    config: PathBuf,
    weights: PathBuf,
    input: PathBuf,
    output: PathBuf,
    causal: bool,
}

impl Forward {
    fn case(name: &str) -> Self {
        let input = fixture(&format!("{name}.safetensors"));
        let causal = Tensors::read(&input).metadata["causal"] == "true";
        let scratch = Scratch::new();
        Forward {
            config: fixture(&format!("{name}.json")),
            weights: fixture(&format!("{name}.weights.safetensors")),
            input,
            output: scratch.path("out.safetensors"),
            causal,
            scratch,
        }
    }

    fn edit_config(mut self, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Self {
        let mut json: Value =
            serde_json::from_str(&std::fs::read_to_string(&self.config).unwrap()).unwrap();
        edit(json.as_object_mut().unwrap());
        self.config = self.scratch.path("bad_config.json");
        std::fs::write(&self.config, json.to_string()).unwrap();
        self
    }

    fn edit_weights(mut self, edit: impl FnOnce(&mut Tensors)) -> Self {
        let mut t = Tensors::read(&self.weights);
        edit(&mut t);
        self.weights = self.scratch.path("bad_weights.safetensors");
        t.write(&self.weights);
        self
    }

    fn edit_input(mut self, edit: impl FnOnce(&mut Tensors)) -> Self {
        let mut t = Tensors::read(&self.input);
        edit(&mut t);
        self.input = self.scratch.path("bad_input.safetensors");
        t.write(&self.input);
        self
    }

    /// Weights replaced by an arbitrary file's bytes.
    fn weights_bytes(mut self, bytes: &[u8]) -> Self {
        self.weights = self.scratch.path("bad_weights.safetensors");
        std::fs::write(&self.weights, bytes).unwrap();
        self
    }

    fn run(&self, extra: &[&str]) -> Outcome {
        let mut args: Vec<&OsStr> = extra.iter().map(OsStr::new).collect();
        args.push(OsStr::new("forward"));
        for (flag, path) in [
            ("--config", &self.config),
            ("--weights", &self.weights),
            ("--input", &self.input),
            ("--output", &self.output),
        ] {
            args.extend([OsStr::new(flag), path.as_os_str()]);
        }
        if self.causal {
            args.push(OsStr::new("--causal"));
        }
        flint(args)
    }

    /// Runs successfully and returns the tensor `output`.
    fn output(&self, extra: &[&str]) -> Tensor {
        self.run(extra).assert_success();
        Tensors::read(&self.output).get("output").clone()
    }

    /// flint refuses: exit status 2, one `error:` line naming `file` and each of `mentions`,
    /// no panic, and no output file.
    fn assert_rejected(&self, file: &Path, mentions: &[&str]) {
        let out = self.run(&[]);
        let stderr = out.stderr.trim_end();
        assert_eq!(out.code, Some(2), "exit status; stderr:\n{stderr}");
        assert!(!stderr.contains("panicked"), "panicked:\n{stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line:\n{stderr}");
        assert!(
            stderr.starts_with("error: "),
            "starts with `error:`:\n{stderr}"
        );
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(stderr.contains(&*name), "names `{name}`:\n{stderr}");
        for m in mentions {
            assert!(stderr.contains(m), "mentions `{m}`:\n{stderr}");
        }
        assert!(!self.output.exists(), "no output file after an error");
    }
}

/// Deterministic values in [-scale, scale) (splitmix64).
fn noise(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_add(1);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// forward reproduces PyTorch
// ---------------------------------------------------------------------------------------------

#[test]
fn forward_reproduces_pytorch_output_on_every_fixture_case() {
    for case in CASES {
        let run = Forward::case(case);
        let expected = Tensors::read(&run.input);
        let got = run.output(&[]);
        assert_eq!(got.dtype, Dtype::F32, "{case}");
        assert_eq!(got.shape, expected.get("src").shape, "{case}: shape of src");
        let err = rel_err(&got.values(), &expected.get("output").values());
        assert!(err <= TOL, "{case}: relative error {err:.3e} > {TOL:e}");
    }
}

#[test]
fn forward_reports_device_and_output_shape() {
    let run = Forward::case("padding");
    let out = run.run(&[]);
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "Using device: cpu");
    assert!(
        lines[1].starts_with("Output shape: [3, 5, 16]"),
        "{lines:?}"
    );
}

#[test]
fn forward_accepts_a_bool_padding_mask_like_a_u8_one() {
    let u8_mask = Forward::case("padding_causal").output(&[]);
    let bool_mask = Forward::case("padding_causal")
        .edit_input(|t| {
            let m = t.get("src_key_padding_mask").clone();
            t.set(
                "src_key_padding_mask",
                Tensor {
                    dtype: Dtype::BOOL,
                    data: m.data.iter().map(|&b| (b != 0) as u8).collect(),
                    ..m
                },
            );
        })
        .output(&[]);
    assert_eq!(u8_mask.data, bool_mask.data);
}

#[test]
fn forward_output_does_not_depend_on_thread_count() {
    // Big enough that matmuls and attention split across threads; dropout 0.1 must not matter
    // (forward runs in eval mode).
    let (e, heads, ff, layers, seq, batch) = (128, 8, 256, 2, 48, 12);
    let scratch = Scratch::new();
    let config = scratch.path("config.json");
    let config_json = serde_json::json!({
        "d_model": e, "nhead": heads, "dim_feedforward": ff, "dropout": 0.1,
        "activation": "gelu", "num_layers": layers, "final_norm": true,
    });
    std::fs::write(&config, config_json.to_string()).unwrap();

    let mut weights = Tensors {
        tensors: BTreeMap::new(),
        metadata: HashMap::new(),
    };
    let mut seed = 0;
    let mut add = |name: String, shape: &[usize], scale: f32| {
        seed += 1;
        let n = shape.iter().product();
        let values: Vec<f32> = noise(seed, n, scale);
        weights.set(&name, Tensor::f32(shape, &values));
    };
    for l in 0..layers {
        let p = format!("layers.{l}.");
        add(format!("{p}self_attn.in_proj_weight"), &[3 * e, e], 0.1);
        add(format!("{p}self_attn.in_proj_bias"), &[3 * e], 0.1);
        add(format!("{p}self_attn.out_proj.weight"), &[e, e], 0.1);
        add(format!("{p}self_attn.out_proj.bias"), &[e], 0.1);
        add(format!("{p}linear1.weight"), &[ff, e], 0.1);
        add(format!("{p}linear1.bias"), &[ff], 0.1);
        add(format!("{p}linear2.weight"), &[e, ff], 0.1);
        add(format!("{p}linear2.bias"), &[e], 0.1);
        for norm in ["norm1", "norm2"] {
            add(format!("{p}{norm}.weight"), &[e], 1.0);
            add(format!("{p}{norm}.bias"), &[e], 0.1);
        }
    }
    add("norm.weight".into(), &[e], 1.0);
    add("norm.bias".into(), &[e], 0.1);
    let weights_path = scratch.path("weights.safetensors");
    weights.write(&weights_path);

    let mut input = Tensors {
        tensors: BTreeMap::new(),
        metadata: HashMap::new(),
    };
    input.set(
        "src",
        Tensor::f32(&[seq, batch, e], &noise(99, seq * batch * e, 1.0)),
    );
    // Each sequence pads a different tail.
    let mask: Vec<u8> = (0..batch * seq)
        .map(|i| (i % seq >= seq - i / seq) as u8)
        .collect();
    input.set(
        "src_key_padding_mask",
        Tensor {
            dtype: Dtype::U8,
            shape: vec![batch, seq],
            data: mask,
        },
    );
    let input_path = scratch.path("input.safetensors");
    input.write(&input_path);

    let run = Forward {
        config,
        weights: weights_path,
        input: input_path,
        output: scratch.path("out.safetensors"),
        causal: true,
        scratch,
    };
    let one = run.output(&["--threads", "1"]);
    let two = run.output(&["--threads", "2"]);
    assert!(one.values().iter().all(|v| v.is_finite()));
    assert!(one.data == two.data, "--threads 1 and 2 differ");
}

// ---------------------------------------------------------------------------------------------
// forward refuses bad input with one clear line
// ---------------------------------------------------------------------------------------------

#[test]
fn rejects_unknown_activation() {
    let run = Forward::case("post_relu").edit_config(|c| {
        c.insert("activation".into(), "silu".into());
    });
    run.assert_rejected(&run.config, &["activation", "silu"]);
}

#[test]
fn rejects_d_model_not_divisible_by_nhead() {
    let run = Forward::case("post_relu").edit_config(|c| {
        c.insert("nhead".into(), 5.into());
    });
    run.assert_rejected(&run.config, &["d_model", "nhead"]);
}

#[test]
fn rejects_unknown_config_field() {
    let run = Forward::case("post_relu").edit_config(|c| {
        c.insert("n_heads".into(), 4.into());
    });
    run.assert_rejected(&run.config, &["n_heads"]);
}

#[test]
fn rejects_weights_missing_a_tensor_and_names_it() {
    let run = Forward::case("post_relu").edit_weights(|w| {
        w.remove("transformer_encoder.layers.1.linear2.weight");
    });
    run.assert_rejected(
        &run.weights,
        &["transformer_encoder.layers.1.linear2.weight"],
    );
}

#[test]
fn rejects_two_layer_weights_for_a_three_layer_config() {
    let run = Forward::case("causal").edit_config(|c| {
        c.insert("num_layers".into(), 3.into());
    });
    run.assert_rejected(
        &run.weights,
        &["2 layers", "bad_config.json", "num_layers=3"],
    );
}

#[test]
fn rejects_absurd_layer_count_quickly_instead_of_building_it() {
    let run = Forward::case("causal").edit_config(|c| {
        c.insert("num_layers".into(), 100_000_000_000u64.into());
    });
    run.assert_rejected(&run.weights, &["2 layers", "num_layers=100000000000"]);
}

#[test]
fn rejects_huge_d_model_that_does_not_match_weights_without_allocating_it() {
    let run = Forward::case("causal").edit_config(|c| {
        c.insert("d_model".into(), 1_000_000.into());
    });
    let in_proj = "layers.0.self_attn.in_proj_weight";
    run.assert_rejected(&run.weights, &[in_proj, "[48, 16]", "[3000000, 1000000]"]);
}

#[test]
fn rejects_d_model_too_large_to_address() {
    let run = Forward::case("causal").edit_config(|c| {
        c.insert("d_model".into(), (1u64 << 40).into());
    });
    run.assert_rejected(&run.config, &["d_model"]);
}

#[test]
fn rejects_final_norm_config_when_weights_have_no_final_norm() {
    let run = Forward::case("causal").edit_config(|c| {
        c.insert("final_norm".into(), true.into());
    });
    run.assert_rejected(&run.weights, &["norm.weight", "final_norm=true"]);
}

#[test]
fn rejects_weights_with_a_final_norm_the_config_lacks() {
    let run = Forward::case("post_relu").edit_config(|c| {
        c.insert("final_norm".into(), false.into());
    });
    run.assert_rejected(&run.weights, &["transformer_encoder.norm."]);
}

#[test]
fn rejects_weights_whose_shape_does_not_match_the_config_naming_both_shapes() {
    let run = Forward::case("causal").edit_config(|c| {
        c.insert("dim_feedforward".into(), 32.into());
    });
    run.assert_rejected(
        &run.weights,
        &["layers.0.linear1.weight", "[24, 16]", "[32, 16]"],
    );
}

#[test]
fn rejects_a_truncated_weights_file() {
    let bytes = std::fs::read(fixture("causal.weights.safetensors")).unwrap();
    let run = Forward::case("causal").weights_bytes(&bytes[..bytes.len() / 2]);
    run.assert_rejected(&run.weights, &["safetensors"]);
}

#[test]
fn rejects_a_text_file_as_weights() {
    let run = Forward::case("causal").weights_bytes(b"these are not the weights you want\n");
    run.assert_rejected(&run.weights, &["safetensors"]);
}

#[test]
fn rejects_input_without_src() {
    let run = Forward::case("causal").edit_input(|t| t.remove("src"));
    run.assert_rejected(&run.input, &["`src`"]);
}

#[test]
fn rejects_nan_in_src_and_says_so() {
    let run = Forward::case("causal").edit_input(|t| {
        let src = t.get("src");
        let mut values = src.values();
        values[7] = f32::NAN;
        let shape = src.shape.clone();
        t.set("src", Tensor::f32(&shape, &values));
    });
    run.assert_rejected(&run.input, &["src", "NaN"]);
}

#[test]
fn rejects_infinity_in_weights_naming_the_tensor() {
    let name = "layers.0.norm1.weight";
    let run = Forward::case("causal").edit_weights(|w| {
        let mut values = w.get(name).values();
        values[0] = f32::INFINITY;
        w.set(name, Tensor::f32(&[values.len()], &values));
    });
    run.assert_rejected(&run.weights, &[name, "inf"]);
}

#[test]
fn rejects_padding_mask_of_the_wrong_shape() {
    // padding is batch_first: src [N=3, S=5, E], so the mask must be [3, 5].
    let run = Forward::case("padding").edit_input(|t| {
        t.set(
            "src_key_padding_mask",
            Tensor {
                dtype: Dtype::U8,
                shape: vec![3, 6],
                data: vec![0; 18],
            },
        );
    });
    run.assert_rejected(&run.input, &["src_key_padding_mask", "[3, 6]", "[3, 5]"]);
}

#[test]
fn rejects_src_with_the_wrong_d_model() {
    let run = Forward::case("causal").edit_input(|t| {
        t.set("src", Tensor::f32(&[5, 3, 17], &vec![0.5; 5 * 3 * 17]));
    });
    run.assert_rejected(&run.input, &["`src`", "[5, 3, 17]", "[5, 3, 16]"]);
}

// ---------------------------------------------------------------------------------------------
// demo, bench and global flags
// ---------------------------------------------------------------------------------------------

#[test]
fn demo_prints_device_and_output_shape() {
    let out = flint(["demo"]);
    out.assert_success();
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["Using device: cpu", "Output shape: [10, 32, 512]"]
    );
}

#[test]
fn bench_json_prints_one_row_per_config() {
    let out = flint([
        "bench",
        "seed",
        "--json",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--configs",
        "A",
    ]);
    out.assert_success();
    let rows: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(rows.len(), 1, "{}", out.stdout);
    let row = &rows[0];
    for key in [
        "config",
        "seq",
        "batch",
        "median_ms",
        "min_ms",
        "tokens_per_s",
    ] {
        assert!(row.get(key).is_some(), "no `{key}` in {row}");
    }
    assert_eq!(row["config"], "A");
    assert_eq!(row["seq"], 10);
    assert_eq!(row["batch"], 32);
    assert!(row["median_ms"].as_f64().unwrap() > 0.0);
    assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_rejects_an_unknown_config_in_one_line() {
    let out = flint(["bench", "seed", "--configs", "Z"]);
    assert_eq!(out.code, Some(2));
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.starts_with("error: ") && out.stderr.contains("Z"));
}

/// clap's usage errors too: one line, exit 2; a negative number is a value, refused by the
/// flag's own check, which names it.
#[test]
fn usage_errors_are_one_line_and_negative_numbers_are_values() {
    for (args, says) in [
        (&["train", "--bogus-flag", "3"][..], "'--bogus-flag'"),
        (&["train", "--steps", "abc"], "--steps"),
        (&["train", "--lr", "-1"], "--lr must be positive"),
        (
            &["train", "--val-fraction", "-0.1"],
            "--val-fraction must be in [0, 1)",
        ),
        (&["generate", "somewhere"], "--prompt"),
        (
            &[
                "tokenizer",
                "train",
                "--device",
                "bogus",
                "--data",
                "x",
                "--vocab-size",
                "300",
                "--out",
                "t.json",
            ],
            "--device bogus",
        ),
    ] {
        let out = flint(args);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert_eq!(
            out.stderr.trim_end().lines().count(),
            1,
            "{args:?}: {}",
            out.stderr
        );
        assert!(
            out.stderr.starts_with("error: ") && out.stderr.contains(says),
            "{args:?}: {}",
            out.stderr
        );
    }
    let help = flint(["train", "--help"]);
    assert_eq!(help.code, Some(0));
    assert!(help.stdout.contains("--n-inner"));
}

#[test]
fn zero_threads_is_refused() {
    let out = flint(["--threads", "0", "demo"]);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.starts_with("error: ") && out.stderr.contains("--threads"));
}

// ---------------------------------------------------------------------------------------------
// `flint doctor` and `--device`.
// ---------------------------------------------------------------------------------------------

fn doctor_json(env: &[(&str, &Path)], extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["doctor", "--json"];
    args.extend_from_slice(extra);
    let out = flint_env(args, env);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json is not JSON ({e}):\n{}\n{}",
            out.stdout, out.stderr
        )
    });
    (out.code, v)
}

#[test]
fn doctor_json_has_the_documented_fields() {
    let (code, v) = doctor_json(&[], &[]);
    // `auto` can always fall back to the CPU, so some device can train.
    assert_eq!(code, Some(0), "{v}");
    assert!(
        v["device"]
            .as_str()
            .is_some_and(|d| d == "cpu" || d.starts_with("cuda:")),
        "{v}"
    );
    assert!(v["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert!(v["cpu"]["avx2"].is_boolean() && v["cpu"]["avx512_bf16"].is_boolean());
    assert!(v["gpus"].is_array());
    let libs: Vec<&str> = v["libraries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(libs, ["libcuda", "libnvrtc", "libcublasLt", "libnccl"]);
    for p in v["problems"].as_array().unwrap() {
        assert!(!p["what"].as_str().unwrap().is_empty() && !p["fix"].as_str().unwrap().is_empty());
    }
    // Without a usable GPU, the reason is given.
    if v["device"] == "cpu" {
        assert!(
            v["device_reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{v}"
        );
    }
}

#[test]
fn doctor_text_ends_with_the_device_line() {
    let out = flint(["doctor"]);
    out.assert_success();
    assert!(out.stdout.contains("CUDA libraries"), "{}", out.stdout);
    assert!(
        out.stdout.lines().any(|l| l.starts_with("Using device: ")),
        "{}",
        out.stdout
    );
}

/// A scratch folder holding `libcuda.so.1` with the given contents, first on LD_LIBRARY_PATH.
fn fake_driver(contents: &[u8]) -> Scratch {
    let dir = Scratch::new();
    std::fs::write(dir.path("libcuda.so.1"), contents).unwrap();
    dir
}

#[test]
fn doctor_reports_a_corrupt_driver_library_instead_of_crashing() {
    let dir = fake_driver(&[0x55; 4096]);
    let (code, v) = doctor_json(&[("LD_LIBRARY_PATH", dir.root())], &[]);
    assert_eq!(code, Some(0), "auto still has the CPU: {v}");
    assert_eq!(v["device"], "cpu");
    let lib = &v["libraries"][0];
    assert_eq!(lib["path"], dir.path("libcuda.so.1").display().to_string());
    assert!(
        lib["error"]
            .as_str()
            .unwrap()
            .contains("invalid ELF header"),
        "{lib}"
    );
    let problem = &v["problems"][0];
    assert!(
        problem["what"].as_str().unwrap().contains("libcuda.so.1"),
        "{problem}"
    );
    assert!(
        problem["fix"].as_str().unwrap().contains("LD_LIBRARY_PATH"),
        "{problem}"
    );
    // Asking for the GPU explicitly fails: exit status 1.
    let (code, v) = doctor_json(&[("LD_LIBRARY_PATH", dir.root())], &["--device", "cuda"]);
    assert_eq!(code, Some(1), "{v}");
    assert!(v["device"].is_null(), "{v}");
}

/// The bytes of this machine's libm.so.6: a real shared library that is not CUDA's.
fn libm_bytes() -> Vec<u8> {
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib64/libm.so.6",
        "/lib64/libm.so.6",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libm.so.6 on this machine");
    std::fs::read(libm).unwrap()
}

#[test]
fn doctor_reports_a_library_that_is_not_the_driver() {
    // A real shared library under the driver's name: it loads, but lacks the CUDA entry points.
    let dir = fake_driver(&libm_bytes());
    let (code, v) = doctor_json(&[("LD_LIBRARY_PATH", dir.root())], &[]);
    assert_eq!(code, Some(0), "{v}");
    let err = v["libraries"][0]["error"].as_str().unwrap();
    assert!(err.contains("cuDriverGetVersion"), "{err}");
}

/// Compiles C `source` into the shared library `path` with the system's gcc.
fn shared_library(path: &Path, source: &str) {
    let c = path.with_extension("c");
    std::fs::write(&c, source).unwrap();
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(path)
        .arg(&c)
        .output()
        .expect("gcc (CI installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An NVRTC at `path` reporting `version` whose compiles fail with status 100 (a code NVRTC's
/// enum lacks) and the log "bad", and which names no code.
fn fake_nvrtc(path: &Path, (major, minor): (u32, u32)) {
    shared_library(
        path,
        &format!(
            "#include <stddef.h>\n\
             int nvrtcVersion(int *a, int *b) {{ *a = {major}; *b = {minor}; return 0; }}\n\
             int nvrtcCreateProgram(void **p, const char *s, const char *n, int h, const char **a, const char **b) {{ *p = (void *)1; return 0; }}\n\
             int nvrtcCompileProgram(void *p, int n, const char **o) {{ return 100; }}\n\
             int nvrtcGetProgramLogSize(void *p, size_t *n) {{ *n = 4; return 0; }}\n\
             int nvrtcGetProgramLog(void *p, char *l) {{ l[0] = 'b'; l[1] = 'a'; l[2] = 'd'; l[3] = 0; return 0; }}\n\
             int nvrtcGetCUBINSize(void *p, size_t *n) {{ return 100; }}\n\
             int nvrtcGetCUBIN(void *p, char *c) {{ return 100; }}\n\
             int nvrtcDestroyProgram(void **p) {{ return 0; }}\n\
             const char *nvrtcGetErrorString(int e) {{ return NULL; }}\n"
        ),
    );
}

/// With both a CUDA 12 and a CUDA 13 NVRTC on the search path, the one the driver can run is
/// taken, whichever comes first; a CUDA 13 driver takes the first. Stub libraries: a driver
/// that reports its CUDA version and no GPU, and NVRTCs with every entry point flint binds.
#[test]
fn doctor_takes_the_nvrtc_the_driver_can_run() {
    let dir = Scratch::new();
    let nvrtc = |major: u32| {
        let folder = dir.path(&format!("cu{major}"));
        std::fs::create_dir_all(&folder).unwrap();
        fake_nvrtc(&folder.join(format!("libnvrtc.so.{major}")), (major, 0));
        folder
    };
    let (cu13, cu12) = (nvrtc(13), nvrtc(12));
    for (version, want) in [(12040, &cu12), (13000, &cu13)] {
        let driver = dir.path(&format!("driver{version}"));
        std::fs::create_dir_all(&driver).unwrap();
        shared_library(
            &driver.join("libcuda.so.1"),
            &format!(
                "int cuDriverGetVersion(int *v) {{ *v = {version}; return 0; }}\n\
                 int cuInit(unsigned f) {{ return 0; }}\n\
                 int cuDeviceGetCount(int *c) {{ *c = 0; return 0; }}\n"
            ),
        );
        let path = std::env::join_paths([&cu13, &cu12, &driver]).unwrap();
        let (_, v) = doctor_json(&[("LD_LIBRARY_PATH", Path::new(&path))], &[]);
        let lib = v["libraries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "libnvrtc")
            .unwrap()
            .clone();
        let expected = want.join(format!("libnvrtc.so.{}", version / 1000));
        assert_eq!(lib["path"], expected.display().to_string(), "{v}");
    }
}

/// A driver with one GPU (sm_90) whose `cuInit`, `cuDevicePrimaryCtxRetain` and
/// `cuDeviceGetName` return the given status codes, and which names no code (as for one it
/// does not know).
fn driver_returning(dir: &Scratch, init: i32, retain: i32, name: i32) -> PathBuf {
    let folder = dir.path(&format!("driver-{init}-{retain}-{name}"));
    std::fs::create_dir_all(&folder).unwrap();
    shared_library(
        &folder.join("libcuda.so.1"),
        &format!(
            "#include <stddef.h>\n\
             int cuDriverGetVersion(int *v) {{ *v = 13000; return 0; }}\n\
             int cuInit(unsigned f) {{ return {init}; }}\n\
             int cuDeviceGetCount(int *c) {{ *c = 1; return 0; }}\n\
             int cuDeviceGet(int *d, int i) {{ *d = i; return 0; }}\n\
             int cuDeviceGetAttribute(int *v, int a, int d) {{ *v = a == 75 ? 9 : a == 76 ? 0 : 100; return 0; }}\n\
             int cuDeviceGetName(char *n, int len, int d) {{ n[0] = 'G'; n[1] = 0; return {name}; }}\n\
             int cuDeviceTotalMem_v2(size_t *b, int d) {{ *b = (size_t)1 << 34; return 0; }}\n\
             int cuDevicePrimaryCtxRetain(void **c, int d) {{ return {retain}; }}\n\
             int cuDevicePrimaryCtxRelease_v2(int d) {{ return 0; }}\n\
             int cuCtxPushCurrent_v2(void *c) {{ return 0; }}\n\
             int cuCtxPopCurrent_v2(void **c) {{ return 0; }}\n\
             int cuMemGetInfo_v2(size_t *f, size_t *t) {{ return 0; }}\n\
             int cuGetErrorName(int e, const char **s) {{ return 1; }}\n"
        ),
    );
    folder
}

/// Status codes outside cuda.h's list (a newer driver's, or garbage) used to be undefined
/// behaviour in the bindings and killed doctor with SIGILL; and a GPU whose context does not
/// open (exclusive to another process) was called usable. Both are problems with a fix now,
/// and `auto` takes the CPU.
#[test]
fn doctor_reports_unknown_driver_codes_and_gpus_that_do_not_open() {
    let dir = Scratch::new();
    let driver = driver_returning(&dir, 1001, 0, 0);
    let (code, v) = doctor_json(&[("LD_LIBRARY_PATH", &driver)], &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["device"], "cpu");
    assert!(
        problem_whats(&v)
            .iter()
            .any(|w| w.contains("cuInit failed") && w.contains("(1001)")),
        "{v}"
    );
    // The CUDA version the driver library reports is known without cuInit.
    assert_eq!(v["driver"]["cuda"], "13.0", "{v}");

    // A GPU whose properties cannot be read is left out, and said.
    let driver = driver_returning(&dir, 0, 0, 999);
    let (_, v) = doctor_json(&[("LD_LIBRARY_PATH", &driver)], &[]);
    assert_eq!(v["gpus"].as_array().unwrap().len(), 0, "{v}");
    assert!(
        problem_whats(&v)
            .iter()
            .any(|w| w.contains("cannot read the properties of cuda:0") && w.contains("(999)")),
        "{v}"
    );

    let driver = driver_returning(&dir, 0, 46, 0);
    let (code, v) = doctor_json(&[("LD_LIBRARY_PATH", &driver)], &[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["device"], "cpu", "{v}");
    assert_eq!(v["gpus"][0]["usable"], false, "{v}");
    let problem = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["what"].as_str().unwrap().contains("cannot open cuda:0"))
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        problem["fix"]
            .as_str()
            .unwrap()
            .contains("exclusive-process"),
        "{problem}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(["--device", "cuda", "demo"])
        .env("LD_LIBRARY_PATH", &driver)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // The first blocking problem is the one named: a machine without cuBLASLt names that.
    let blocked = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["blocking"] == true);
    assert!(blocked || stderr.contains("cannot open cuda:0"), "{stderr}");
}

/// Every problem's `what` of a doctor report.
fn problem_whats(v: &Value) -> Vec<String> {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["what"].as_str().unwrap().to_string())
        .collect()
}

/// A truncated driver library (a partial download) is refused before the loader maps it (which
/// dies with SIGBUS), also where the loader's own search would find it again; a stub driver is
/// passed over for a real one later in the search; a driver older than CUDA 12 is told so.
#[test]
fn doctor_survives_truncated_and_stub_drivers_and_names_old_ones() {
    let bytes = libm_bytes();
    let dir = fake_driver(&bytes[..bytes.len() / 2]);
    let (code, v) = doctor_json(&[("LD_LIBRARY_PATH", dir.root())], &[]);
    assert_eq!(code, Some(0), "{v}");
    let err = v["libraries"][0]["error"].as_str().unwrap();
    assert!(err.contains("truncated"), "{v}");

    let stub = dir.path("stub");
    std::fs::create_dir_all(&stub).unwrap();
    shared_library(
        &stub.join("libcuda.so.1"),
        "int cuDriverGetVersion(int *v) { return 34; }\nint cuInit(unsigned f) { return 34; }\n",
    );
    let real = driver_returning(&dir, 0, 46, 0);
    let path = std::env::join_paths([&stub, &real]).unwrap();
    let (_, v) = doctor_json(&[("LD_LIBRARY_PATH", Path::new(&path))], &[]);
    let driver = &v["libraries"][0];
    assert_eq!(
        driver["path"],
        real.join("libcuda.so.1").display().to_string(),
        "{v}"
    );
    assert!(problem_whats(&v).iter().any(|w| w.contains("stub")), "{v}");

    let old = dir.path("old");
    std::fs::create_dir_all(&old).unwrap();
    shared_library(
        &old.join("libcuda.so.1"),
        "int cuDriverGetVersion(int *v) { *v = 10020; return 0; }\nint cuInit(unsigned f) { return 0; }\n",
    );
    let (_, v) = doctor_json(&[("LD_LIBRARY_PATH", &old)], &[]);
    assert!(
        problem_whats(&v)
            .iter()
            .any(|w| w.contains("CUDA 10.2") && w.contains("flint needs CUDA 12")),
        "{v}"
    );
}

/// The C source of a library whose initialiser crashes: a damaged file that still looks like a
/// library.
const CRASHING_LIBRARY: &str =
    "__attribute__((constructor)) static void init(void) { *(volatile int *)0 = 0; }\n";

/// A damaged copy of a library earlier in the search (a venv's broken wheel) no longer hides a
/// working one later: the working one is used, the damaged one reported. Damaged: garbage, or
/// a library that crashes as it loads (which used to take flint down with it).
#[test]
fn doctor_passes_over_a_broken_library_for_one_that_loads() {
    type Damage = fn(&Path);
    let garbage: Damage = |path| std::fs::write(path, [0x55; 4096]).unwrap();
    let crashing: Damage = |path| shared_library(path, CRASHING_LIBRARY);
    for (damage, says) in [(garbage, "invalid ELF header"), (crashing, "SIGSEGV")] {
        let dir = Scratch::new();
        let (broken, good) = (dir.path("broken"), dir.path("good"));
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::create_dir_all(&good).unwrap();
        damage(&broken.join("libnvrtc.so.12"));
        fake_nvrtc(&good.join("libnvrtc.so.12"), (12, 98));
        let path = std::env::join_paths([&broken, &good]).unwrap();
        let cache = dir.path("cache");
        let (_, v) = doctor_json(
            &[
                ("LD_LIBRARY_PATH", Path::new(&path)),
                ("FLINT_CACHE_DIR", &cache),
            ],
            &[],
        );
        let nvrtc = &v["libraries"][1];
        assert_eq!(
            nvrtc["path"],
            good.join("libnvrtc.so.12").display().to_string(),
            "{v}"
        );
        assert_eq!(nvrtc["version"], "12.98", "{v}");
        let broken_file = broken.join("libnvrtc.so.12").display().to_string();
        assert!(
            v["problems"].as_array().unwrap().iter().any(|p| {
                let what = p["what"].as_str().unwrap();
                what.starts_with(&broken_file)
                    && what.contains(says)
                    && p["fix"].as_str().unwrap().contains("LD_LIBRARY_PATH")
            }),
            "{v}"
        );
    }
}

/// A driver library whose initialiser crashes used to take flint down as it loaded: now a child
/// process takes the crash, and the library is reported, by doctor and by `--device auto`
/// alike, also when SIGCHLD is ignored.
#[test]
fn a_library_that_crashes_as_it_loads_is_reported_not_fatal() {
    let dir = Scratch::new();
    shared_library(&dir.path("libcuda.so.1"), CRASHING_LIBRARY);
    let crashing = dir.root();
    let (code, v) = doctor_json(&[("LD_LIBRARY_PATH", crashing)], &[]);
    assert_eq!(code, Some(0), "auto still has the CPU: {v}");
    assert_eq!(v["device"], "cpu", "{v}");
    let err = v["libraries"][0]["error"].as_str().unwrap();
    assert!(err.contains("crashed") && err.contains("SIGSEGV"), "{v}");
    let out = Command::new(env!("CARGO_BIN_EXE_flint"))
        .arg("demo")
        .env("LD_LIBRARY_PATH", crashing)
        .output()
        .unwrap();
    assert!(out.status.success());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.starts_with("Using device: cpu"), "{stdout}");
    assert!(stderr.contains("SIGSEGV"), "{stderr}");
    // With SIGCHLD ignored (inherited from whatever started flint), the trial child is reaped
    // by the kernel: the crash must still be seen.
    let mut doctor = Command::new(env!("CARGO_BIN_EXE_flint"));
    doctor
        .args(["doctor", "--json"])
        .env("LD_LIBRARY_PATH", crashing);
    // SAFETY: only sets a signal disposition in the child before exec.
    unsafe {
        doctor.pre_exec(|| {
            libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = doctor.output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = v["libraries"][0]["error"].as_str().unwrap();
    assert!(err.contains("ended the process"), "{v}");
}

/// The same for NVRTC: a compile that fails with a code NVRTC's enum lacks aborted doctor (a
/// huge allocation) on a machine without a GPU, where doctor test-compiles the kernels.
#[test]
fn doctor_reports_unknown_nvrtc_codes() {
    let dir = Scratch::new();
    fake_nvrtc(&dir.path("libnvrtc.so.12"), (12, 99));
    let cache = dir.path("cache");
    let (code, v) = doctor_json(
        &[("LD_LIBRARY_PATH", dir.root()), ("FLINT_CACHE_DIR", &cache)],
        &[],
    );
    if v["libraries"][0]["found"] == true {
        return; // a real driver here: doctor compiles for its GPUs instead
    }
    assert_eq!(code, Some(0), "{v}");
    let what = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["what"].as_str().unwrap())
        .find(|w| w.contains("NVRTC"))
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        what.contains("nvrtcCompileProgram failed")
            && what.contains("(100)")
            && what.contains("bad"),
        "{what}"
    );
}

#[test]
fn device_flag_errors_are_one_line_with_exit_2() {
    for (device, expect) in [
        ("gpu", "expected auto, cpu, cuda or cuda:N"),
        ("cuda:+1", "expected auto, cpu, cuda or cuda:N"),
        ("cuda:7", "cuda:7"),
    ] {
        let out = flint(["--device", device, "demo"]);
        assert_eq!(out.code, Some(2), "{}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(
            out.stderr.starts_with("error: ") && out.stderr.contains(expect),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn device_auto_says_in_one_line_why_it_runs_on_the_cpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_flint"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stdout.starts_with("Using device: cpu\n") {
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("note: running on the CPU: "), "{stderr}");
    } else {
        assert!(stdout.starts_with("Using device: cuda:0 ("), "{stdout}");
    }
}

#[test]
fn device_cpu_runs_the_demo_without_a_note() {
    let out = flint(["--device", "cpu", "demo"]);
    out.assert_success();
    assert!(
        out.stdout.starts_with("Using device: cpu\n"),
        "{}",
        out.stdout
    );
    assert!(out.stderr.is_empty(), "{}", out.stderr);
}

#[test]
fn doctor_parity_without_a_gpu_fails_and_says_so() {
    let (_, v) = doctor_json(&[], &[]);
    if v["device"] != "cpu" {
        return; // a GPU machine: gpu-check.sh runs the parity there
    }
    let out = flint(["doctor", "--parity"]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stdout.contains("parity: not run, no usable GPU"),
        "{}",
        out.stdout
    );
}

#[test]
fn precision_errors_are_one_line_with_exit_2() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["bench", "gpt", "--precision", "fp64"],
            "expected auto, fp32, tf32, bf16 or fp16",
        ),
        (
            &["--device", "cpu", "bench", "gpt", "--precision", "bf16"],
            "the CPU backend computes in fp32",
        ),
        (
            &[
                "--device",
                "cpu",
                "train",
                "--precision",
                "fp16",
                "--steps",
                "1",
            ],
            "the CPU backend computes in fp32",
        ),
    ];
    for (args, expect) in cases {
        let out = flint(args);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert_eq!(out.stderr.trim_end().lines().count(), 1, "{}", out.stderr);
        assert!(
            out.stderr.starts_with("error: ") && out.stderr.contains(expect),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn doctor_finds_nvrtc_in_a_virtual_environments_pip_wheel() {
    // The layout `pip install nvidia-cuda-nvrtc-cu12` leaves in a venv, holding a file that is
    // not a real library: doctor must find it there, say it does not load, and not crash.
    let venv = Scratch::new();
    let lib = venv.path("lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(lib.join("libnvrtc.so.12"), [0x55u8; 4096]).unwrap();
    // Only the venv is set: the folders a user names explicitly would be searched first.
    let out = Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(["doctor", "--json"])
        .env("VIRTUAL_ENV", venv.root())
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("CUDA_HOME")
        .env_remove("CUDA_PATH")
        .env_remove("CUDA_ROOT")
        .env_remove("CONDA_PREFIX")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // It is the library reported when nothing else loads, or a problem passed over for another
    // NVRTC this machine has (its Python's wheel, say).
    let file = lib.join("libnvrtc.so.12").display().to_string();
    let nvrtc = &v["libraries"][1];
    assert_eq!(nvrtc["name"], "libnvrtc");
    let reported = if nvrtc["path"] == file.as_str() {
        nvrtc["error"].as_str().unwrap().to_string()
    } else {
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["what"].as_str().unwrap().to_string())
            .find(|w| w.starts_with(&file))
            .unwrap_or_else(|| panic!("{v}"))
    };
    assert!(reported.contains("invalid ELF header"), "{v}");
}

/// A cuBLASLt at `path` with every entry point flint binds (none is called: doctor only checks
/// them and asks the version, `version` in cuBLASLt's MAJOR * 10000 + MINOR * 100 + PATCH).
fn fake_cublaslt(path: &Path, version: u32) {
    let entries: String = [
        "Create",
        "Destroy",
        "Matmul",
        "MatmulAlgoGetHeuristic",
        "MatmulDescCreate",
        "MatmulDescDestroy",
        "MatmulDescSetAttribute",
        "MatmulPreferenceCreate",
        "MatmulPreferenceDestroy",
        "MatmulPreferenceSetAttribute",
        "MatrixLayoutCreate",
        "MatrixLayoutDestroy",
        "MatrixLayoutSetAttribute",
    ]
    .iter()
    .map(|e| format!("int cublasLt{e}(void) {{ return 0; }}\n"))
    .collect();
    shared_library(
        path,
        &format!("{entries}unsigned long cublasLtGetVersion(void) {{ return {version}; }}\n"),
    );
}

/// cudarc, which flint calls the driver and cuBLASLt through, asks the loader for
/// `libcuda.so` and `libcublasLt.so` before the sonames flint found and checked: when those
/// names are other files (a toolkit's lib64 or stubs on the path), doctor says so, and another
/// driver release keeps flint off the GPU. Links to the checked files, or to copies of the same
/// driver release, are no problem.
#[test]
fn doctor_reports_libraries_cudarc_would_open_instead_of_the_checked_ones() {
    let dir = Scratch::new();
    let driver = driver_returning(&dir, 0, 0, 0);
    let others = dir.path("others");
    std::fs::create_dir_all(&others).unwrap();
    shared_library(
        &others.join("libcuda.so"),
        "int cuInit(unsigned f) { return 0; }\nint cuDriverGetVersion(int *v) { *v = 12000; return 0; }\n",
    );
    let cublas = dir.path("cublas");
    std::fs::create_dir_all(&cublas).unwrap();
    fake_cublaslt(&cublas.join("libcublasLt.so.13"), 130401);
    fake_cublaslt(&others.join("libcublasLt.so"), 130100);
    let path = std::env::join_paths([&driver, &cublas, &others]).unwrap();
    let (code, v) = doctor_json(&[("LD_LIBRARY_PATH", Path::new(&path))], &[]);
    assert_eq!(code, Some(0), "{v}");
    let problem = |file: &str| {
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                let what = p["what"].as_str().unwrap();
                what.starts_with("cudarc") && what.contains(file)
            })
            .unwrap_or_else(|| panic!("no problem naming {file}: {v}"))
            .clone()
    };
    let driver_problem = problem(&others.join("libcuda.so").display().to_string());
    assert_eq!(driver_problem["blocking"], true, "{driver_problem}");
    let blas = problem(&others.join("libcublasLt.so").display().to_string());
    assert!(blas["what"].as_str().unwrap().contains("13.1.0"), "{blas}");
    // A CUDA 13 cuBLASLt on a CUDA 13 driver runs: worth knowing, not blocking.
    assert_eq!(blas["blocking"], false, "{blas}");
    assert!(blas["fix"].as_str().unwrap().contains("ln -sf"), "{blas}");

    // A cuBLASLt newer than the driver runs, or one without the entry points flint calls: the
    // GPU could not train, so both block.
    for (name, source) in [
        ("newer", None),
        ("partial", Some("int cublasLtCreate(void) { return 0; }\n")),
    ] {
        let folder = dir.path(name);
        std::fs::create_dir_all(&folder).unwrap();
        let file = folder.join("libcublasLt.so");
        match source {
            None => fake_cublaslt(&file, 140000),
            Some(source) => shared_library(&file, source),
        }
        let path = std::env::join_paths([&driver, &cublas, &folder]).unwrap();
        let (_, v) = doctor_json(&[("LD_LIBRARY_PATH", Path::new(&path))], &[]);
        let found = v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["what"].as_str().unwrap().contains("cudarc"))
            .unwrap_or_else(|| panic!("{name}: {v}"))
            .clone();
        assert_eq!(found["blocking"], true, "{found}");
        let what = found["what"].as_str().unwrap();
        match source {
            None => assert!(what.contains("14.0.0"), "{what}"),
            Some(_) => assert!(what.contains("has no cublasLtDestroy"), "{what}"),
        }
    }

    // The same names as a link to the cuBLASLt flint checked, and a link to a copy of its driver
    // release (the same real file name): nothing to report.
    let links = dir.path("links");
    std::fs::create_dir_all(&links).unwrap();
    std::fs::copy(driver.join("libcuda.so.1"), links.join("libcuda.so.1")).unwrap();
    std::os::unix::fs::symlink("libcuda.so.1", links.join("libcuda.so")).unwrap();
    std::os::unix::fs::symlink(
        cublas.join("libcublasLt.so.13"),
        links.join("libcublasLt.so"),
    )
    .unwrap();
    let path = std::env::join_paths([&driver, &cublas, &links, &others]).unwrap();
    let (_, v) = doctor_json(&[("LD_LIBRARY_PATH", Path::new(&path))], &[]);
    assert!(
        !problem_whats(&v).iter().any(|w| w.starts_with("cudarc")),
        "{v}"
    );
}
