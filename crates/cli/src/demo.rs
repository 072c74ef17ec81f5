//! `flint demo`: the seed program.

use anyhow::Result;
use flint_train::device::Device;
use flint_train::shape_str;

pub fn run(device: &Device, verbose: bool) -> Result<()> {
    println!("Using device: {}", device.describe());
    let report = flint_train::demo::run(device)?;
    if verbose {
        println!("{}", report.plan);
    }
    println!("Output shape: {}", shape_str(&report.output_shape));
    Ok(())
}
