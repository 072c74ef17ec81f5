//! `flint demo`: the seed program, a PyTorch-default `nn.TransformerEncoder` run forward once.

use crate::device::Device;
use anyhow::Result;
use flint_backend::{philox, Backend, Precision};
use flint_model::{params, BatchShape, Encoder, EncoderConfig, Masks, Mode};

pub struct DemoReport {
    pub output_shape: Vec<usize>,
    /// The activation plan, for `--verbose`.
    pub plan: String,
}

/// The seed encoder on `[10, 32, 512]` inputs (uniform, from a fixed seed), in training mode.
pub fn run(device: &Device) -> Result<DemoReport> {
    crate::on_backend!(device, Precision::Fp32, |backend| seed(backend))
}

fn seed<B: Backend>(backend: B) -> Result<DemoReport> {
    let (seq, batch) = (10, 32);
    let config = EncoderConfig::seed();
    let init = params::init_params(&params::param_layout(&config), 0);
    let d_model = config.d_model;
    let mut model = Encoder::new(backend, config, &init)?;
    model.plan(BatchShape { batch, seq })?;
    let plan = model.describe_plan()?;
    let x: Vec<f32> = (0..seq * batch * d_model)
        .map(|i| philox::uniform(0, 1, i as u64))
        .collect();
    model.set_input(&x, None)?;
    // A fresh nn.Module is in training mode, so the seed runs with dropout active.
    model.forward(Masks::default(), Mode::Train { seed: 0, step: 1 })?;
    Ok(DemoReport {
        output_shape: vec![seq, batch, d_model],
        plan,
    })
}
