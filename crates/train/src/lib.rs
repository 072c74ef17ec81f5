//! flint's training layer: tensors in and out, the optimizer, and the commands' bodies
//! (`forward`, `bench`), all on top of `flint-model`.

pub mod bench;
pub mod forward;
pub mod hf;
pub mod optim;
pub mod state_dict;
pub mod tensors;
