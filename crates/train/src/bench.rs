//! `flint bench seed`: the seed model's training step, timed like `torch_seed_bench.py`;
//! `flint bench gpt`: a GPT-2 training step, timed like `bench/torch_gpt_bench.py`.

use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use anyhow::{bail, Result};
use flint_backend::{philox, Backend};
use flint_model::gpt::{self, Gpt, GptConfig};
use flint_model::{params, BatchShape, Encoder, EncoderConfig, Masks, Mode};
use serde::Serialize;
use std::time::Instant;

/// Config A is the seed program's input `[10, 32, 512]`; B a longer sequence `[128, 32, 512]`.
pub const SEED_CONFIGS: [(&str, usize, usize); 2] = [("A", 10, 32), ("B", 128, 32)];

#[derive(Debug, Serialize)]
pub struct BenchRow {
    pub config: String,
    pub seq: usize,
    pub batch: usize,
    #[serde(flatten)]
    pub speed: Throughput,
}

/// The measured part of a benchmark row, shared by every benchmark (and its JSON keys).
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub median_ms: f64,
    pub min_ms: f64,
    pub tokens_per_s: f64,
    pub gflops: f64,
    pub threads: usize,
    pub device: String,
    pub precision: &'static str,
    /// Model FLOPs utilisation: achieved FLOP/s over the device's peak in this precision (SM
    /// count x clock x the architecture's FLOPs per clock), where the backend knows its peak.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
}

impl Throughput {
    fn new<B: Backend>(t: Timing, tokens: usize, flops: f64, backend: &B) -> Self {
        let achieved = flops / t.median * 1e3;
        Throughput {
            median_ms: round(t.median),
            min_ms: round(t.min),
            tokens_per_s: round(tokens as f64 / t.median * 1e3),
            gflops: round(achieved / 1e9),
            threads: rayon::current_num_threads(),
            device: backend.device(),
            precision: backend.precision().name(),
            mfu: backend
                .peak_flops()
                .map(|peak| (achieved / peak * 1e4).round() / 1e4),
        }
    }
}

impl std::fmt::Display for Throughput {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "median {:.1} ms  min {:.1} ms  {:.1} tokens/s  {:.1} GFLOP/s  ({} threads, {}, {})",
            self.median_ms,
            self.min_ms,
            self.tokens_per_s,
            self.gflops,
            self.threads,
            self.device,
            self.precision
        )?;
        match self.mfu {
            Some(m) => write!(f, "  MFU {:.1}%", m * 100.0),
            None => Ok(()),
        }
    }
}

/// Median and minimum milliseconds of a timed step.
struct Timing {
    median: f64,
    min: f64,
}

/// Times `steps` calls of `step` after `warmup` untimed ones.
fn time_steps(warmup: usize, steps: usize, mut step: impl FnMut() -> Result<()>) -> Result<Timing> {
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        step()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    let median = if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2.0
    };
    Ok(Timing {
        median,
        min: times[0],
    })
}

/// Two decimals, like the PyTorch scripts' rows.
fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// FLOPs of one training step (forward + backward: 3 x the forward's matmuls).
pub fn step_flops(c: &EncoderConfig, s: BatchShape) -> f64 {
    let rows = (s.batch * s.seq) as f64;
    let (e, f) = (c.d_model as f64, c.dim_feedforward as f64);
    let linear = 2.0 * rows * (4.0 * e * e + 2.0 * e * f);
    let attention = 4.0 * (s.batch * s.seq * s.seq) as f64 * e;
    3.0 * (linear + attention) * c.num_layers as f64
}

/// Uniform [0, 1) values, like `torch.rand`.
fn rand(n: usize, stream: u64) -> Vec<f32> {
    (0..n)
        .map(|i| philox::uniform(0, stream, i as u64))
        .collect()
}

pub fn seed<B: Backend>(
    backend: B,
    configs: &[(&str, usize, usize)],
    warmup: usize,
    steps: usize,
    mut report: impl FnMut(&BenchRow, &str),
) -> Result<()> {
    let config = EncoderConfig::seed();
    let layout = params::param_layout(&config);
    let init = params::init_params(&layout, 0);
    let mut model = Encoder::new(backend, config, &init)?;
    let adamw = AdamWConfig {
        lr: 1e-4,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(model.backend(), &layout, adamw, |_| true, &model.mirrors())?;
    let mut step = 0u64;
    for &(name, seq, batch) in configs {
        let shape = BatchShape { batch, seq };
        model.plan(shape)?;
        let plan = model.describe_plan()?;
        let n = seq * batch * model.config.d_model;
        model.set_input(&rand(n, 1), None)?;
        let target = model.backend().alloc(flint_backend::DType::F32, n)?;
        model
            .backend()
            .upload(flint_backend::Buffer::tensor(&target), &rand(n, 2))?;
        let timing = time_steps(warmup, steps, || {
            step += 1;
            model.zero_grad();
            let out = model.forward(Masks::default(), Mode::Train { seed: 0, step })?;
            let b = model.backend();
            b.mse_loss(
                model.output_grad()?,
                out,
                flint_backend::Buffer::tensor(&target),
            )?;
            model.backward(false)?;
            opt.step(model.backend(), model.params(), model.grads())?;
            model.backend().synchronize()
        })?;
        let row = BenchRow {
            config: name.into(),
            seq,
            batch,
            speed: Throughput::new(
                timing,
                seq * batch,
                step_flops(&model.config, shape),
                model.backend(),
            ),
        };
        report(&row, &plan);
    }
    Ok(())
}

/// `flint bench gpt`'s presets: the ones `torch_gpt_bench.py` builds too.
pub const GPT_PRESETS: [&str; 2] = ["tiny", "gpt2"];

/// The default batch size of a `flint bench gpt` preset: 16 for `tiny`, 4 for the GPT-2 sizes.
pub fn gpt_default_batch(preset: &str) -> usize {
    if preset == "tiny" {
        16
    } else {
        4
    }
}

/// One `flint bench gpt` result; the keys and their order are `torch_gpt_bench.py`'s.
#[derive(Debug, Serialize)]
pub struct GptBenchRow {
    pub preset: String,
    pub batch: usize,
    pub seq: usize,
    #[serde(flatten)]
    pub speed: Throughput,
}

/// FLOPs of one GPT training step, the nanoGPT / PaLM (appendix B) estimate:
///
/// `6 * N * tokens + 12 * n_layer * batch * seq^2 * n_embd`
///
/// where `tokens = batch * seq` and `N` is the non-embedding parameter count plus
/// `vocab_size * n_embd` for the (tied) output head, i.e. every parameter but `wpe`. The first
/// term is forward (2 FLOPs per weight per token) plus backward (4); the second is the
/// attention scores and their weighted sum, counted over the full (not causally halved) square.
pub fn gpt_step_flops(c: &GptConfig, s: BatchShape) -> f64 {
    let layout = gpt::param_layout(c);
    let embeddings = (c.vocab_size + c.n_positions) * c.n_embd;
    let n = (layout.total() - embeddings + c.vocab_size * c.n_embd) as f64;
    let tokens = (s.batch * s.seq) as f64;
    let attention = 12.0 * (c.n_layer * s.batch * s.seq * s.seq * c.n_embd) as f64;
    6.0 * n * tokens + attention
}

/// `[batch, seq]` token ids below `vocab`, from Philox stream `stream` of seed 0.
fn random_ids(n: usize, vocab: usize, stream: u64) -> Vec<i32> {
    (0..n)
        .map(|i| (philox::uniform_u32(0, stream, i as u64) % vocab as u32) as i32)
        .collect()
}

/// Times `steps` GPT training steps of `preset` on `[batch, seq]` random tokens after `warmup`
/// untimed ones. A step is what `torch_gpt_bench.py` times: zero the gradients, forward
/// (dropout 0), cross-entropy against random targets, backward, `clip_grad_norm_(1.0)` and
/// AdamW (lr 6e-4, betas (0.9, 0.95), weight decay 0.1 on tensors of two or more dimensions).
/// Returns the row and the activation plan (for `--verbose`).
pub fn gpt<B: Backend>(
    backend: B,
    preset: &str,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
) -> Result<(GptBenchRow, String)> {
    if batch == 0 || seq == 0 || steps == 0 {
        bail!("batch size, sequence length and steps must be at least 1");
    }
    let config = GptConfig::preset(preset)?;
    let layout = gpt::param_layout(&config);
    let init = gpt::init_params(&config, &layout, 0);
    let mut model = Gpt::new(backend, config, &init)?;
    let adamw = AdamWConfig {
        lr: 6e-4,
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::for_gpt(&model, adamw)?;
    let shape = BatchShape { batch, seq };
    model.plan(shape)?;
    let plan = model.describe_plan()?;
    let vocab = model.config.vocab_size;
    model.set_batch(
        &random_ids(batch * seq, vocab, 1),
        &random_ids(batch * seq, vocab, 2),
    )?;
    let mut i = 0u64;
    let timing = time_steps(warmup, steps, || {
        i += 1;
        model.zero_grad();
        model.forward(Some((0, i)))?;
        model.loss(1.0)?;
        model.backward()?;
        clip_grad_norm(model.backend(), model.grads(), 1.0)?;
        opt.step(model.backend(), model.params(), model.grads())?;
        model.backend().synchronize()
    })?;
    let row = GptBenchRow {
        preset: preset.into(),
        batch,
        seq,
        speed: Throughput::new(
            timing,
            seq * batch,
            gpt_step_flops(&model.config, shape),
            model.backend(),
        ),
    };
    Ok((row, plan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flint_backend::cpu::Cpu;

    #[test]
    fn gpt_flops_follow_the_nanogpt_estimate() {
        let c = GptConfig::preset("tiny").unwrap();
        // Per block 12 e^2 + 13 e weights, plus ln_f, plus the head (vocab * e).
        let e = 128usize;
        let n = 4 * (12 * e * e + 13 * e) + 2 * e + 256 * e;
        let s = BatchShape { batch: 2, seq: 8 };
        let want = 6.0 * (n * 16) as f64 + 12.0 * (4 * 2 * 64 * e) as f64;
        assert_eq!(gpt_step_flops(&c, s), want);
    }

    #[test]
    fn gpt_bench_times_a_small_batch() {
        let (row, plan) = gpt(Cpu, "tiny", 2, 8, 1, 2).unwrap();
        assert_eq!((row.preset.as_str(), row.batch, row.seq), ("tiny", 2, 8));
        let t = &row.speed;
        assert!(t.median_ms > 0.0 && t.min_ms <= t.median_ms);
        assert!(t.tokens_per_s > 0.0 && t.gflops > 0.0);
        assert!(!plan.is_empty());
        let json = serde_json::to_string(&row).unwrap();
        assert!(json.starts_with(r#"{"preset":"tiny","batch":2,"seq":8,"median_ms":"#));
        assert!(gpt(Cpu, "tiny", 1, 129, 0, 1).is_err());
    }
}
