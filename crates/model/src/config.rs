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
    #[serde(
        default = "defaults::activation",
        deserialize_with = "defaults::named_activation"
    )]
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
    use serde::Deserialize;
    pub fn dim_feedforward() -> usize {
        2048
    }
    pub fn dropout() -> f32 {
        0.1
    }
    pub fn activation() -> EncoderActivation {
        EncoderActivation::Relu
    }
    /// `activation`, with errors that name the field (serde's say only "unknown variant").
    pub fn named_activation<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<EncoderActivation, D::Error> {
        use serde::de::Error;
        let name = String::deserialize(d)
            .map_err(|e| D::Error::custom(format!("field `activation`: {e}")))?;
        match name.as_str() {
            "relu" => Ok(EncoderActivation::Relu),
            "gelu" => Ok(EncoderActivation::Gelu),
            _ => Err(D::Error::custom(format!(
                "field `activation` is `{name}`, expected `relu` or `gelu`"
            ))),
        }
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
        if self.param_bytes().is_none() {
            bail!(
                "fields `d_model` ({}), `dim_feedforward` ({}) and `num_layers` ({}) give more \
                 parameters than this machine can address",
                self.d_model,
                self.dim_feedforward,
                self.num_layers
            );
        }
        Ok(())
    }

    /// Bytes of the f32 parameters of this encoder, `None` when that overflows `isize`
    /// (so that building the parameter layout cannot overflow).
    fn param_bytes(&self) -> Option<usize> {
        let (e, f) = (self.d_model, self.dim_feedforward);
        let attention = e.checked_mul(e)?.checked_add(e)?.checked_mul(4)?;
        let feedforward = e
            .checked_mul(f)?
            .checked_mul(2)?
            .checked_add(e)?
            .checked_add(f)?;
        let norms = e.checked_mul(4)?;
        let layer = attention.checked_add(feedforward)?.checked_add(norms)?;
        let final_norm = if self.final_norm {
            e.checked_mul(2)?
        } else {
            0
        };
        let total = layer
            .checked_mul(self.num_layers)?
            .checked_add(final_norm)?;
        total.checked_mul(4).filter(|&b| b <= isize::MAX as usize)
    }

    pub fn dims(&self) -> crate::activations::Dims {
        crate::activations::Dims {
            num_layers: self.num_layers,
            d_model: self.d_model,
            d_ff: self.dim_feedforward,
            nhead: self.nhead,
            attention_dropout: self.dropout,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.nhead
    }
}
