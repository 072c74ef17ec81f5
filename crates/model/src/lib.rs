//! flint's models, written once against [`flint_backend::Backend`]: today the Transformer
//! encoder with `nn.TransformerEncoder` semantics and GPT-2.

pub mod activations;
mod block;
mod config;
mod encoder;
pub mod gpt;
pub mod layout;
pub mod params;
mod weights;

pub use activations::BatchShape;
pub use config::{EncoderActivation, EncoderConfig};
pub use encoder::{Encoder, Masks, Mode};
