//! Encoder configuration with `nn.TransformerEncoderLayer`'s constructor names and defaults.

use anyhow::{bail, Context, Result};
use flint_backend::Activation;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderActivation {
    Relu,
    Gelu,
}

impl From<EncoderActivation> for Activation {
    fn from(a: EncoderActivation) -> Self {
        match a {
            EncoderActivation::Relu => Activation::Relu,
            EncoderActivation::Gelu => Activation::Gelu,
        }
    }
}

/// `nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
/// activation, layer_norm_eps, batch_first, norm_first), num_layers, norm=LayerNorm if final_norm)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    pub d_model: usize,
    pub nhead: usize,
    #[serde(default = "defaults::dim_feedforward")]
    pub dim_feedforward: usize,
    #[serde(default = "defaults::dropout")]
    pub dropout: f32,
    #[serde(default = "defaults::activation")]
    pub activation: EncoderActivation,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f32,
    #[serde(default)]
    pub batch_first: bool,
    #[serde(default)]
    pub norm_first: bool,
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    /// A final `LayerNorm(d_model)` after the last layer (`TransformerEncoder(norm=...)`).
    #[serde(default)]
    pub final_norm: bool,
}

mod defaults {
    use super::EncoderActivation;
    pub fn dim_feedforward() -> usize {
        2048
    }
    pub fn dropout() -> f32 {
        0.1
    }
    pub fn activation() -> EncoderActivation {
        EncoderActivation::Relu
    }
    pub fn layer_norm_eps() -> f32 {
        1e-5
    }
    pub fn num_layers() -> usize {
        6
    }
}

impl EncoderConfig {
    /// The seed program's encoder: 6 × `TransformerEncoderLayer(d_model=512, nhead=8)`.
    pub fn seed() -> Self {
        Self {
            d_model: 512,
            nhead: 8,
            dim_feedforward: defaults::dim_feedforward(),
            dropout: defaults::dropout(),
            activation: defaults::activation(),
            layer_norm_eps: defaults::layer_norm_eps(),
            batch_first: false,
            norm_first: false,
            num_layers: defaults::num_layers(),
            final_norm: false,
        }
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the config", path.display()))?;
        let config: Self =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.d_model == 0 || self.nhead == 0 || self.num_layers == 0 || self.dim_feedforward == 0
        {
            bail!("d_model, nhead, dim_feedforward and num_layers must be positive");
        }
        if !self.d_model.is_multiple_of(self.nhead) {
            bail!(
                "field `d_model` ({}) must be divisible by `nhead` ({})",
                self.d_model,
                self.nhead
            );
        }
        if !(0.0..=1.0).contains(&self.dropout) {
            bail!("field `dropout` ({}) must be in [0, 1]", self.dropout);
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            bail!(
                "field `layer_norm_eps` ({}) must be positive",
                self.layer_norm_eps
            );
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.nhead
    }
}
