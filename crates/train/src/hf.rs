//! Hugging Face `transformers` GPT-2 directories (`config.json` + `model.safetensors`), both ways.

use crate::tensors::{named, save_f32, TensorFile};
use anyhow::{anyhow, bail, Context, Result};
use flint_model::gpt::{param_layout, GptConfig};
use flint_model::layout::shape_str;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

/// The fields of `GPT2Config` flint uses; the others are ignored.
#[derive(Deserialize)]
struct HfConfig {
    vocab_size: usize,
    n_positions: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f32,
    #[serde(default)]
    resid_pdrop: f32,
    #[serde(default = "default_activation")]
    activation_function: String,
    n_inner: Option<usize>,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
}

fn yes() -> bool {
    true
}

fn default_eps() -> f32 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}

/// Reads `DIR/config.json` and `DIR/model.safetensors` into a config and a parameter buffer
/// laid out by [`param_layout`]. Names may carry the `transformer.` prefix or not (older
/// checkpoints); the tied `lm_head.weight` and attention-mask buffers are ignored.
pub fn load_gpt2(dir: &Path) -> Result<(GptConfig, Vec<f32>)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("{}: cannot read the model config", config_path.display()))?;
    let hf: HfConfig =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    if !matches!(
        hf.activation_function.as_str(),
        "gelu_new" | "gelu_pytorch_tanh"
    ) {
        bail!(
            "{}: activation_function `{}` is not supported; GPT-2 uses gelu_new",
            config_path.display(),
            hf.activation_function
        );
    }
    // Variants of the architecture flint does not compute: refused, not silently changed.
    for (unsupported, field, gpt2) in [
        (!hf.scale_attn_weights, "scale_attn_weights", "true"),
        (
            hf.scale_attn_by_inverse_layer_idx,
            "scale_attn_by_inverse_layer_idx",
            "false",
        ),
        (!hf.tie_word_embeddings, "tie_word_embeddings", "true"),
    ] {
        if unsupported {
            bail!(
                "{}: `{field}` other than {gpt2} (GPT-2's) is not supported",
                config_path.display()
            );
        }
    }
    let config = GptConfig {
        vocab_size: hf.vocab_size,
        n_positions: hf.n_positions,
        n_embd: hf.n_embd,
        n_layer: hf.n_layer,
        n_head: hf.n_head,
        n_inner: hf.n_inner,
        layer_norm_epsilon: hf.layer_norm_epsilon,
        dropout: hf.resid_pdrop,
    };
    config
        .validate()
        .map_err(|e| anyhow!("{}: {e}", config_path.display()))?;

    let file = TensorFile::open(&dir.join("model.safetensors"))?;
    let strip = if file.contains("transformer.wte.weight") {
        ""
    } else {
        "transformer."
    };
    let path = file.path().display();
    let params = file.read_layout(
        &param_layout(&config),
        |name| name.strip_prefix(strip).unwrap_or(name).to_string(),
        |key, found, want| match found {
            None => anyhow!(
                "{path}: missing tensor `{key}` for {} layers",
                config.n_layer
            ),
            Some(shape) => anyhow!(
                "{path}: tensor `{key}` has shape {}, config.json implies {}",
                shape_str(shape),
                shape_str(want)
            ),
        },
    )?;
    Ok((config, params))
}

/// The tokenizer of a Hugging Face folder, as a `--tokenizer` value: its `tokenizer.json`, or
/// `bytes` when there is none and its model has a byte vocabulary (at most 256 ids). Otherwise
/// an error with the fix: GPT-2's 50257 ids read as bytes would be nonsense without a word.
pub fn folder_tokenizer(dir: &Path) -> Result<String> {
    let file = dir.join("tokenizer.json");
    if file.is_file() {
        return Ok(std::path::absolute(&file)
            .unwrap_or(file)
            .display()
            .to_string());
    }
    let fix =
        "pass --tokenizer PATH/tokenizer.json (or --tokenizer bytes for a model trained on bytes)";
    if dir.join("vocab.json").exists() && dir.join("merges.txt").exists() {
        bail!(
            "{}: has vocab.json and merges.txt but no tokenizer.json: write one with `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`, or {fix}",
            dir.display()
        );
    }
    let config = dir.join("config.json");
    let vocab = std::fs::read_to_string(&config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c["vocab_size"].as_u64());
    match vocab {
        Some(v) if v > 256 => bail!(
            "{}: no tokenizer.json, and the model's {v} ids are not bytes: {fix}",
            dir.display()
        ),
        _ => Ok("bytes".into()),
    }
}

/// The f64 that prints as `x` does (1e-5, not the f32's exact 9.999999747378752e-6), for JSON.
fn as_written(x: f32) -> f64 {
    x.to_string().parse().expect("an f32 prints as a number")
}

/// Writes `DIR/config.json` and `DIR/model.safetensors` so that
/// `GPT2LMHeadModel.from_pretrained(DIR)` loads the model (the head is tied, as in GPT-2).
/// `eot` is the tokenizer's `<|endoftext|>` id, GPT-2's `bos_token_id` and `eos_token_id`;
/// without one (`bytes`) both are null, so `generate` stops at no ordinary token.
pub fn save_gpt2(dir: &Path, config: &GptConfig, params: &[f32], eot: Option<u32>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let c = config;
    let hf = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "n_ctx": c.n_positions,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.n_inner,
        "layer_norm_epsilon": as_written(c.layer_norm_epsilon),
        "resid_pdrop": as_written(c.dropout),
        "embd_pdrop": as_written(c.dropout),
        "attn_pdrop": as_written(c.dropout),
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "use_cache": true,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    });
    let text = serde_json::to_string_pretty(&hf)? + "\n";
    crate::files::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    let tensors = named(&param_layout(config), params);
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_f32(&dir.join("model.safetensors"), &tensors, meta)
}
