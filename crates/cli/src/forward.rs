//! `flint forward`: an encoder trained in PyTorch, run without Python.

use anyhow::Result;
use flint_train::device::Device;
use flint_train::forward::{self, ForwardRequest};
use flint_train::shape_str;
use flint_train::Precision;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// JSON with nn.TransformerEncoderLayer's constructor names, num_layers and final_norm.
    #[arg(long)]
    config: PathBuf,
    /// The encoder's state_dict as safetensors (any prefix before `layers.0.`).
    #[arg(long)]
    weights: PathBuf,
    /// safetensors with `src` and optionally `src_key_padding_mask` (nonzero = padding).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the tensor `output`.
    #[arg(long)]
    output: PathBuf,
    /// Apply a causal mask (nn.Transformer.generate_square_subsequent_mask).
    #[arg(long)]
    causal: bool,
}

pub fn run(a: Args, device: &Device, verbose: bool) -> Result<()> {
    let req = ForwardRequest {
        config: a.config,
        weights: a.weights,
        input: a.input,
        output: a.output,
        causal: a.causal,
    };
    println!("Using device: {}", device.describe());
    let report = flint_train::on_backend!(device, Precision::Fp32, |backend| forward::run(
        backend, &req
    ))?;
    if verbose {
        println!("{}", report.plan);
    }
    println!(
        "Output shape: {} -> {}",
        shape_str(&report.output_shape),
        req.output.display()
    );
    Ok(())
}
