//! flint's training layer, on top of `flint-model`: data and tokenizers, the trainer (AdamW,
//! schedule, mixed precision, checkpoints), the run folder's files, Hugging Face and PyTorch
//! weights in and out, device selection, and the bodies of `forward`, `generate` and `bench`.

pub mod amp;
pub mod bench;
pub mod data;
pub mod demo;
pub mod device;
pub mod files;
pub mod forward;
pub mod generate;
pub mod hf;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod state_dict;
pub mod tensors;
pub mod trainer;

// What the command line needs of the layers below, so that it depends on this crate alone.
pub use flint_backend::Precision;
pub use flint_model::gpt::GptConfig;
pub use flint_model::layout::shape_str;
