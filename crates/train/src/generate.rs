//! Sampling text from a GPT with a KV cache: each token costs one position of compute,
//! attending to the cached keys and values of the tokens before it.

use crate::data::Tokenizer;
use crate::hf::load_gpt2;
use crate::run::folder;
use crate::trainer::checkpoint;
use crate::trainer::config::TrainOptions;
use crate::trainer::resume::same_tokenizer;
use anyhow::{anyhow, bail, Result};
use flint_backend::{philox, Backend};
use flint_model::gpt::{Gpt, GptConfig};
use std::path::Path;

#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

/// Continues `prompt` (token ids) by up to `max_new_tokens` tokens; returns only the new ones.
/// Stops early at the context length. Only ids below `tokens` (the tokenizer's vocabulary) are
/// drawn: a model's vocabulary may be padded past its tokenizer's (nanoGPT's 50304 for GPT-2's
/// 50257), and the padding ids have no text.
pub fn generate<B: Backend>(
    model: &mut Gpt<B>,
    prompt: &[u32],
    tokens: usize,
    s: Sampling,
) -> Result<Vec<u32>> {
    let (ctx, vocab) = (model.config.n_positions, model.config.vocab_size);
    if s.temperature.is_nan() || s.temperature < 0.0 {
        bail!(
            "--temperature must be at least 0 (got {}; 0 picks the most likely token)",
            s.temperature
        );
    }
    if prompt.is_empty() {
        bail!("--prompt is empty: give at least one token of text");
    }
    if prompt.len() >= ctx {
        bail!(
            "--prompt has {} tokens and the model's context is {ctx} positions: shorten the prompt",
            prompt.len()
        );
    }
    if let Some(t) = prompt.iter().find(|&&t| t as usize >= vocab) {
        bail!("--prompt: token {t} is outside the model's vocabulary of {vocab} ids");
    }
    let len = prompt.len().saturating_add(s.max_new_tokens).min(ctx);
    model.start_decoding(len)?;
    let mut logits = vec![0.0f32; vocab];
    for &t in prompt {
        let l = model.decode(t)?;
        model.backend().download(l, &mut logits)?;
    }
    let mut out = Vec::new();
    while out.len() < s.max_new_tokens && prompt.len() + out.len() < len {
        let next = sample(&logits[..tokens.min(vocab)], s, out.len() as u64);
        out.push(next);
        if prompt.len() + out.len() < len {
            let l = model.decode(next)?;
            model.backend().download(l, &mut logits)?;
        }
    }
    Ok(out)
}

/// What [`generate_text`] made.
pub struct Generated {
    /// The new text (the prompt's continuation).
    pub text: String,
    /// Set when the model's context ran out before `--max-new-tokens`: why there is less.
    pub stopped_early: Option<String>,
    /// What the user should know about where the weights came from: a run sampled from a
    /// checkpoint (which one, and the damaged ones passed over).
    pub notes: Vec<String>,
}

/// `flint generate PATH`: PATH is a run folder (its `model/` and the tokenizer it trained with,
/// or its newest checkpoint until the run writes `model/`) or a Hugging Face GPT-2 folder (its
/// `tokenizer.json` if present). `tokenizer` overrides.
pub fn generate_text<B: Backend>(
    backend: B,
    path: &Path,
    prompt: &str,
    tokenizer: Option<&str>,
    s: Sampling,
) -> Result<Generated> {
    let w = if crate::run::folder::is_run(path) {
        run_weights(path, tokenizer)?
    } else {
        if !path.is_dir() {
            bail!("{}: no such folder", path.display());
        }
        if !path.join("config.json").is_file() {
            bail!(
                "{}: neither a run folder (no config.toml: a run writes it as it starts) nor a Hugging Face GPT-2 folder (no config.json)",
                path.display()
            );
        }
        let tokenizer = match tokenizer {
            Some(t) => t.to_string(),
            None => crate::hf::folder_tokenizer(path)?,
        };
        let (config, params) = load_gpt2(path)?;
        Weights {
            config,
            params,
            tokenizer,
            checkpoint: None,
            notes: Vec::new(),
        }
    };
    let (config, spec) = (w.config, w.tokenizer);
    // A tokenizer given on the command line is the user's call; a checkpoint's is checked.
    let tokenizer = match (&w.checkpoint, tokenizer) {
        (Some(state), None) => {
            let t = Tokenizer::from_arg(&spec).map_err(|e| {
                anyhow!(
                    "{}: the run's tokenizer cannot be read ({e:#}); give it with --tokenizer",
                    path.display()
                )
            })?;
            same_tokenizer(state, &t, path)?;
            t
        }
        _ => Tokenizer::from_arg(&spec)?,
    };
    // A byte model may have fewer ids than 256 (ASCII text): the prompt must then fit, and
    // only the model's ids are drawn.
    if tokenizer.vocab_size() > config.vocab_size && !matches!(tokenizer, Tokenizer::Bytes) {
        bail!(
            "the tokenizer ({spec}) has {} tokens but the model in {} has {}; pass the model's tokenizer with --tokenizer",
            tokenizer.vocab_size(),
            path.display(),
            config.vocab_size
        );
    }
    let ctx = config.n_positions;
    let mut model = Gpt::new(backend, config, &w.params)?;
    let prompt = tokenizer.encode(prompt)?;
    let ids = generate(&mut model, &prompt, tokenizer.vocab_size(), s)?;
    let stopped_early = (ids.len() < s.max_new_tokens).then(|| {
        format!(
            "stopped after {} new tokens: the prompt's {} and they fill the model's context of {ctx} positions",
            ids.len(),
            prompt.len()
        )
    });
    Ok(Generated {
        text: tokenizer.decode(&ids)?,
        stopped_early,
        notes: w.notes,
    })
}

/// The weights and tokenizer [`generate_text`] samples with.
struct Weights {
    config: GptConfig,
    params: Vec<f32>,
    /// `bytes` or a tokenizer.json path.
    tokenizer: String,
    /// The state of the checkpoint the weights came from, if they did.
    checkpoint: Option<checkpoint::State>,
    notes: Vec<String>,
}

/// A run's newest weights: `model/` once the run has ended, else (still training, killed, or
/// trained further since `model/` was written) its newest checkpoint that loads, as nanoGPT
/// samples `ckpt.pt`. Read only: a damaged checkpoint is passed over, never moved.
fn run_weights(run: &Path, tokenizer: Option<&str>) -> Result<Weights> {
    let model = run.join("model");
    let model_time = folder::model_time(run);
    let checkpoints = checkpoint::complete(run)?;
    let checkpoint_time = checkpoints
        .last()
        .and_then(|dir| folder::checkpoint_time(dir));
    let from_model = |notes: Vec<String>| -> Result<Weights> {
        // The copy in RUN/model first: the path in config.toml may be relative to where the
        // run was started.
        let copy = model.join("tokenizer.json");
        let tokenizer = match (tokenizer, copy.is_file()) {
            (Some(t), _) => t.to_string(),
            (None, true) => copy.display().to_string(),
            (None, false) => TrainOptions::from_toml_file(&run.join("config.toml"))?
                .tokenizer
                .unwrap_or_else(|| "bytes".into()),
        };
        let (config, params) = load_gpt2(&model)?;
        Ok(Weights {
            config,
            params,
            tokenizer,
            checkpoint: None,
            notes,
        })
    };
    // Written after the newest checkpoint: the run's end (a resume that trains further writes
    // newer checkpoints, and those are sampled until it ends).
    if model_time.is_some() && model_time >= checkpoint_time {
        return from_model(Vec::new());
    }
    if checkpoints.is_empty() {
        bail!(
            "{}: the run has no model/ and no checkpoint yet: wait for its first checkpoint (one every --checkpoint-every steps), or train it again if it stopped before one",
            run.display()
        );
    }
    let found = checkpoint::newest(run, |dir| {
        Ok(checkpoint::load_model(dir).map(|m| (dir.to_path_buf(), m)))
    })?;
    let mut notes: Vec<String> = found
        .skipped
        .iter()
        .map(|(dir, e)| format!("passed over checkpoint {}: {e:#}", dir.display()))
        .collect();
    let (dir, (state, config, params)) = match found.loaded {
        Ok(found) => found,
        // An older model/ is still the run's newest weights that load.
        Err(_) if model_time.is_some() => return from_model(notes),
        Err(e) => bail!(
            "{}: the run has no model/ and no checkpoint that loads (the oldest: {e:#})",
            run.display()
        ),
    };
    notes.push(format!(
        "{} has no model/ newer than its checkpoints: sampling from {}",
        run.display(),
        dir.display()
    ));
    Ok(Weights {
        config,
        params,
        tokenizer: tokenizer.map_or_else(|| state.tokenizer.clone(), str::to_string),
        checkpoint: Some(state),
        notes,
    })
}

/// Draws a token from `logits` with temperature and top-k; draw `i` of the seed's stream.
fn sample(logits: &[f32], s: Sampling, i: u64) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (j, &v)| {
                if v > best.1 {
                    (j, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let max = logits[order[0]];
    let weights: Vec<f64> = order
        .iter()
        .map(|&j| (((logits[j] - max) / s.temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = philox::uniform(s.seed, 0, i) as f64 * total;
    for (j, w) in order.iter().zip(&weights) {
        if u < *w {
            return *j as u32;
        }
        u -= w;
    }
    order[order.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_1_agrees() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        let greedy = Sampling {
            max_new_tokens: 1,
            temperature: 0.0,
            top_k: 0,
            seed: 0,
        };
        assert_eq!(sample(&logits, greedy, 0), 1);
        let top1 = Sampling {
            temperature: 1.0,
            top_k: 1,
            ..greedy
        };
        assert!((0..20).all(|i| sample(&logits, top1, i) == 1));
    }

    /// A model whose vocabulary is padded past its tokenizer's never draws a padding id, and a
    /// negative temperature is refused.
    #[test]
    fn draws_only_ids_the_tokenizer_has() {
        use flint_model::gpt::{init_params, param_layout, GptConfig};
        let config = GptConfig {
            vocab_size: 300,
            n_layer: 1,
            ..GptConfig::preset("tiny").unwrap()
        };
        let mut params = init_params(&config, &param_layout(&config), 3);
        // The padding rows of the tied embedding point the same way as the hidden state can,
        // with a large norm, so they would win most draws if they were allowed.
        let e = config.n_embd;
        params[256 * e..300 * e].iter_mut().for_each(|w| *w = 3.0);
        let mut model = Gpt::new(flint_backend::cpu::Cpu, config, &params).unwrap();
        let s = Sampling {
            max_new_tokens: 40,
            temperature: 1.0,
            top_k: 0,
            seed: 1,
        };
        let ids = generate(&mut model, &[1, 2, 3], 256, s).unwrap();
        assert_eq!(ids.len(), 40);
        assert!(ids.iter().all(|&t| t < 256), "{ids:?}");
        let padded = generate(&mut model, &[1, 2, 3], 300, s).unwrap();
        assert!(padded.iter().any(|&t| t >= 256), "{padded:?}");
        let negative = Sampling {
            temperature: -1.0,
            ..s
        };
        let e = generate(&mut model, &[1], 256, negative).unwrap_err();
        assert!(e.to_string().contains("--temperature"), "{e}");
    }

    #[test]
    fn sampling_follows_the_softmax() {
        let logits = [0.0, (3.0f32).ln()];
        let s = Sampling {
            max_new_tokens: 1,
            temperature: 1.0,
            top_k: 0,
            seed: 4,
        };
        let ones = (0..4000).filter(|&i| sample(&logits, s, i) == 1).count();
        assert!((ones as f64 / 4000.0 - 0.75).abs() < 0.03, "{ones}");
    }
}
