//! `flint bench seed`: the seed model's training step, timed like `torch_seed_bench.py`.

use crate::optim::{AdamW, AdamWConfig};
use anyhow::Result;
use flint_backend::{philox, Backend};
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
    pub median_ms: f64,
    pub min_ms: f64,
    pub tokens_per_s: f64,
    pub gflops: f64,
    pub threads: usize,
    pub device: String,
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
        let mut times = Vec::with_capacity(steps);
        for i in 0..warmup + steps {
            let t0 = Instant::now();
            step += 1;
            model.zero_grad()?;
            let out = model.forward(Masks::default(), Mode::Train { seed: 0, step })?;
            let b = model.backend();
            b.mse_loss(
                model.output_grad()?,
                out,
                flint_backend::Buffer::tensor(&target),
            )?;
            model.backward(false)?;
            opt.step(model.backend(), model.params(), model.grads())?;
            model.backend().synchronize()?;
            if i >= warmup {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        let median = if times.len() % 2 == 1 {
            times[times.len() / 2]
        } else {
            (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
        };
        // Two decimals, like the PyTorch script's rows.
        let round = |x: f64| (x * 100.0).round() / 100.0;
        let row = BenchRow {
            config: name.into(),
            seq,
            batch,
            median_ms: round(median),
            min_ms: round(times[0]),
            tokens_per_s: round((seq * batch) as f64 / median * 1e3),
            gflops: round(step_flops(&model.config, shape) / median / 1e6),
            threads: rayon::current_num_threads(),
            device: model.backend().device(),
        };
        report(&row, &plan);
    }
    Ok(())
}
