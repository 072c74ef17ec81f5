//! GPT-2 against `transformers.GPT2LMHeadModel`: logits, loss and every gradient, then 5
//! training steps with gradient accumulation, global-norm clipping and AdamW with decay on
//! matrices only. Fixtures from `scripts/gen_gpt2_fixtures.py`; relative error ≤ 1e-4.

use flint_backend::{cpu::Cpu, Backend};
use flint_model::gpt::{self, Gpt};
use flint_model::BatchShape;
use flint_train::hf::load_gpt2;
use flint_train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use flint_train::tensors::TensorFile;
use std::path::PathBuf;

mod common;
use common::rel_err;

const TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpt2")
        .join(name)
}

fn ints(file: &TensorFile, name: &str) -> Vec<i32> {
    file.i32(name).unwrap().1
}

fn download(t: flint_backend::Tensor) -> Vec<f32> {
    let mut v = vec![0.0; t.len()];
    Cpu.download(t, &mut v).unwrap();
    v
}

fn model() -> Gpt<Cpu> {
    model_from("model")
}

fn model_from(dir: &str) -> Gpt<Cpu> {
    let (config, params) = load_gpt2(&fixture(dir)).unwrap();
    Gpt::new(Cpu, config, &params).unwrap()
}

#[test]
fn logits_loss_and_gradients_match_transformers() {
    check_forward("model", "forward.safetensors");
}

/// Odd vocabulary, 3 heads of 6, `n_inner` 40 (not 4 * n_embd), layer norm eps 1e-6.
#[test]
fn a_model_off_gpt2_defaults_matches_transformers() {
    let gpt = model_from("variant");
    assert_eq!(gpt.config.n_inner, Some(40));
    assert_eq!(gpt.config.layer_norm_epsilon, 1e-6);
    check_forward("variant", "variant_forward.safetensors");
}

fn check_forward(dir: &str, file: &str) {
    let data = TensorFile::open(&fixture(file)).unwrap();
    let mut gpt = model_from(dir);
    gpt.plan(BatchShape { batch: 2, seq: 8 }).unwrap();
    gpt.set_batch(&ints(&data, "input_ids"), &ints(&data, "targets"))
        .unwrap();
    gpt.zero_grad();
    let logits = download(gpt.forward(None).unwrap());
    let e = rel_err(&logits, &data.f32("logits").unwrap().1);
    assert!(e <= TOL, "logits rel err {e:e}");
    let loss = gpt.loss(1.0).unwrap();
    let e = rel_err(&[loss], &data.f32("loss").unwrap().1);
    assert!(e <= TOL, "loss rel err {e:e}");
    gpt.backward().unwrap();
    let grads = download(gpt.grads());
    for entry in gpt.layout().entries() {
        let got = &grads[entry.offset..entry.offset + entry.numel()];
        let e = rel_err(got, &data.f32(&format!("grad.{}", entry.name)).unwrap().1);
        assert!(e <= TOL, "grad of {} rel err {e:e}", entry.name);
    }
}

#[test]
fn five_steps_with_accumulation_clipping_and_adamw_match_torch() {
    let data = TensorFile::open(&fixture("train5.safetensors")).unwrap();
    let meta = data.metadata();
    let num = |k: &str| meta[k].parse::<f32>().unwrap();
    let (accum, clip) = (num("grad_accum_steps") as usize, num("grad_clip"));
    let mut gpt = model();
    let (batch, seq) = (2, 8);
    gpt.plan(BatchShape { batch, seq }).unwrap();
    let config = AdamWConfig {
        lr: num("lr"),
        beta1: num("beta1"),
        beta2: num("beta2"),
        eps: num("eps"),
        weight_decay: num("weight_decay"),
    };
    let mut opt = AdamW::for_gpt(&gpt, config).unwrap();
    let p0 = download(gpt.params());
    let (ids, targets) = (ints(&data, "micro_input_ids"), ints(&data, "micro_targets"));
    let (losses, norms) = (
        data.f32("losses").unwrap().1,
        data.f32("grad_norms").unwrap().1,
    );
    let n = batch * seq;
    // Elements whose gradient, in some step, is nonzero but within 10 x AdamW's eps: the update
    // m / (sqrt(v) + eps) is steep there, so the last bits of such a gradient (rounding, in
    // float64 as in float32) decide the step (a gradient of 4.3e-8 against eps 1e-8 moves its
    // weight by 0.81 lr, one of 4.0e-8 by 0.80 lr). At init they are mostly key weights, whose
    // gradient is small for the same reason as the key bias's below. They are checked to match
    // within 1% of lr per step (a wrong or missing update is off by about lr per step); every
    // other element within TOL.
    let mut undetermined = vec![false; p0.len()];
    for step in 0..losses.len() {
        gpt.zero_grad();
        let mut loss = 0.0;
        for micro in 0..accum {
            let at = (step * accum + micro) * n;
            gpt.set_batch(&ids[at..at + n], &targets[at..at + n])
                .unwrap();
            gpt.forward(Some((0, step as u64 + 1))).unwrap();
            loss += gpt.loss(1.0 / accum as f32).unwrap() / accum as f32;
            gpt.backward().unwrap();
        }
        let norm = clip_grad_norm(&Cpu, gpt.grads(), clip).unwrap();
        // The clipped gradients, which AdamW sees.
        for (u, &g) in undetermined.iter_mut().zip(&download(gpt.grads())) {
            *u |= g != 0.0 && g.abs() < 10.0 * config.eps;
        }
        assert!(
            rel_err(&[loss], &[losses[step]]) <= TOL,
            "step {step}: loss {loss} vs {}",
            losses[step]
        );
        assert!(
            rel_err(&[norm], &[norms[step]]) <= TOL,
            "step {step}: grad norm {norm} vs {}",
            norms[step]
        );
        opt.step(&Cpu, gpt.params(), gpt.grads()).unwrap();
    }
    let p = download(gpt.params());
    let loose_bound = 0.01 * config.lr * losses.len() as f32;
    for entry in gpt.layout().entries() {
        let range = entry.offset..entry.offset + entry.numel();
        let (got, start) = (&p[range.clone()], &p0[range.clone()]);
        let want = data.f32(&format!("step5.{}", entry.name)).unwrap().1;
        let mut loose = undetermined[range].to_vec();
        if entry.name.ends_with("attn.c_attn.bias") {
            // The key bias adds q.b to every score of a row, which softmax cancels: its
            // gradient is zero but for rounding, and AdamW's normalised update turns that
            // noise into a drift of either sign, in PyTorch as in flint. So it is only
            // checked to stay put: a real gradient would move it ~lr per step.
            let e = got.len() / 3;
            let drift = (e..2 * e)
                .map(|i| (got[i] - start[i]).abs())
                .fold(0.0, f32::max);
            assert!(
                drift <= loose_bound,
                "{} key bias drift {drift:e}",
                entry.name
            );
            loose[e..2 * e].fill(true);
        }
        for i in (0..got.len()).filter(|&i| loose[i]) {
            let off = (got[i] - want[i]).abs();
            assert!(off <= loose_bound, "{}[{i}] off by {off:e}", entry.name);
        }
        let scale = want.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        let diff = (0..got.len())
            .filter(|&i| !loose[i])
            .map(|i| (got[i] - want[i]).abs())
            .fold(0.0f32, f32::max);
        let e = diff as f64 / scale as f64;
        assert!(e <= TOL, "{} after 5 steps rel err {e:e}", entry.name);
    }
}

#[test]
fn kv_cache_decoding_gives_the_full_forward_logits() {
    let data = TensorFile::open(&fixture("forward.safetensors")).unwrap();
    let ids = ints(&data, "input_ids");
    let seq = 8;
    let vocab = 64;
    let mut gpt = model();
    gpt.plan(BatchShape { batch: 1, seq }).unwrap();
    gpt.set_batch(&ids[..seq], &ids[..seq]).unwrap();
    let full = download(gpt.forward(None).unwrap());
    gpt.start_decoding(seq).unwrap();
    for (pos, &t) in ids[..seq].iter().enumerate() {
        let step = download(gpt.decode(t as u32).unwrap());
        let e = rel_err(&step, &full[pos * vocab..(pos + 1) * vocab]);
        assert!(e <= 1e-5, "position {pos}: rel err {e:e}");
    }
}

#[test]
fn saved_model_loads_back_identically() {
    // The end-of-text id is the tokenizer's (none for `bytes`), never a guess from the vocabulary.
    for (name, eot) in [("model", Some(3)), ("variant", None)] {
        let (config, params) = load_gpt2(&fixture(name)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        flint_train::hf::save_gpt2(&dir, &config, &params, eot).unwrap();
        let (again, back) = load_gpt2(&dir).unwrap();
        assert_eq!(again, config);
        assert!(params
            .iter()
            .zip(&back)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        // Numbers as written, as transformers writes them: 1e-06, not f32's 9.99999997e-07.
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let hf: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(name).join("config.json")).unwrap(),
        )
        .unwrap();
        for key in ["bos_token_id", "eos_token_id"] {
            assert_eq!(json[key], serde_json::json!(eot), "{name}: {key}");
        }
        for key in ["layer_norm_epsilon", "n_inner", "vocab_size", "n_embd"] {
            assert_eq!(json[key], hf[key], "{name}: {key}");
        }
    }
}

#[test]
fn checkpoints_with_attention_buffers_and_a_tied_head_load_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::copy(fixture("model/config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(
        fixture("model_legacy_buffers.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let (_, with_buffers) = load_gpt2(&dir).unwrap();
    let (_, plain) = load_gpt2(&fixture("model")).unwrap();
    assert!(plain
        .iter()
        .zip(&with_buffers)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn architecture_variants_flint_does_not_compute_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::copy(
        fixture("model/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("model/config.json")).unwrap())
            .unwrap();
    for (field, value) in [
        ("scale_attn_weights", false),
        ("scale_attn_by_inverse_layer_idx", true),
        ("tie_word_embeddings", false),
    ] {
        let mut config = base.clone();
        config[field] = value.into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let err = format!("{:#}", load_gpt2(&dir).unwrap_err());
        assert!(
            err.contains("config.json") && err.contains(field),
            "{field}: {err}"
        );
    }
}

/// A byte model may have fewer than 256 ids (ASCII text): a folder without a tokenizer is read
/// as bytes, a prompt within its ids continues, and one past them is an error naming `--prompt`.
#[test]
fn a_byte_model_smaller_than_256_ids_generates_from_ascii() {
    use flint_train::generate::{generate_text, Sampling};
    let config = gpt::GptConfig {
        vocab_size: 128,
        ..gpt::GptConfig::preset("tiny").unwrap()
    };
    let params = gpt::init_params(&config, &gpt::param_layout(&config), 7);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    flint_train::hf::save_gpt2(&dir, &config, &params, None).unwrap();
    let s = Sampling {
        max_new_tokens: 5,
        temperature: 1.0,
        top_k: 0,
        seed: 1,
    };
    let out = generate_text(Cpu, &dir, "hi", None, s).unwrap();
    assert!(out.text.bytes().all(|b| b < 128), "{:?}", out.text);
    let err = generate_text(Cpu, &dir, "é", None, s)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--prompt") && err.contains("128"), "{err}");
}
