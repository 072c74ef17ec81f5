//! `flint demo`: the seed program.

use anyhow::Result;
use flint_backend::{philox, Backend, Precision};
use flint_model::layout::shape_str;
use flint_model::{params, BatchShape, Encoder, EncoderConfig, Masks, Mode};
use flint_train::device::Device;

pub fn run(device: &Device, verbose: bool) -> Result<()> {
    println!("Using device: {}", device.describe());
    flint_train::on_backend!(device, Precision::Fp32, |backend| seed(backend, verbose))
}

fn seed<B: Backend>(backend: B, verbose: bool) -> Result<()> {
    let (seq, batch) = (10, 32);
    let config = EncoderConfig::seed();
    let init = params::init_params(&params::param_layout(&config), 0);
    let d_model = config.d_model;
    let mut model = Encoder::new(backend, config, &init)?;
    model.plan(BatchShape { batch, seq })?;
    if verbose {
        println!("{}", model.describe_plan()?);
    }
    let x: Vec<f32> = (0..seq * batch * d_model)
        .map(|i| philox::uniform(0, 1, i as u64))
        .collect();
    model.set_input(&x, None)?;
    // A fresh nn.Module is in training mode, so the seed runs with dropout active.
    model.forward(Masks::default(), Mode::Train { seed: 0, step: 1 })?;
    println!("Output shape: {}", shape_str(&[seq, batch, d_model]));
    Ok(())
}
