//! PyTorch `state_dict` files in, flat parameter buffers out.

use crate::tensors::TensorFile;
use anyhow::{anyhow, bail, Result};
use flint_model::layout::{shape_str, Layout};

/// The prefix before the encoder's own names (`transformer_encoder.` in the seed program, or
/// none), found from the first layer's attention weight.
pub fn encoder_prefix(file: &TensorFile) -> Result<String> {
    const ANCHOR: &str = "layers.0.self_attn.in_proj_weight";
    let names = file.names();
    match names.iter().find(|n| n.ends_with(ANCHOR) && (n.len() == ANCHOR.len() || n[..n.len() - ANCHOR.len()].ends_with('.'))) {
        Some(n) => Ok(n[..n.len() - ANCHOR.len()].to_string()),
        None => bail!(
            "{}: no `{ANCHOR}` tensor under any prefix; expected the state_dict of an nn.TransformerEncoder",
            file.path().display()
        ),
    }
}

/// How many encoder layers the state_dict holds: one more than the largest `N` in
/// `<prefix>layers.N.`. Cheap, so a config can be checked before its layout is built.
pub fn layer_count(file: &TensorFile) -> Result<usize> {
    let prefix = encoder_prefix(file)?;
    Ok(file
        .names()
        .iter()
        .filter_map(|n| {
            let rest = n.strip_prefix(&prefix)?.strip_prefix("layers.")?;
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0))
}

/// Reads every tensor of `layout` (`<prefix><name>`) into one buffer in layout order. A missing
/// tensor, a wrong shape, a tensor the config does not have (more layers, a final norm) or a
/// non-finite value is an error naming the tensor.
pub fn load(file: &TensorFile, layout: &Layout, describe_config: &str) -> Result<Vec<f32>> {
    let prefix = encoder_prefix(file)?;
    let path = file.path().display();
    for name in file.names() {
        let Some(own) = name.strip_prefix(&prefix) else {
            continue;
        };
        if (own.starts_with("layers.") || own.starts_with("norm.")) && layout.get(own).is_none() {
            bail!("{path}: tensor `{name}` is not part of the config ({describe_config}); fix num_layers or final_norm");
        }
    }
    file.read_layout(
        layout,
        |name| format!("{prefix}{name}"),
        |key, found, want| match found {
            None => {
                anyhow!("{path}: missing tensor `{key}` that the config ({describe_config}) needs")
            }
            Some(shape) => anyhow!(
                "{path}: tensor `{key}` has shape {}, the config ({describe_config}) expects {}",
                shape_str(shape),
                shape_str(want)
            ),
        },
    )
}
