//! flint's training layer: tensors in and out, the optimizer, and the commands' bodies
//! (`forward`, `bench`), all on top of `flint-model`.

pub mod amp;
pub mod bench;
pub mod data;
pub mod device;
pub mod forward;
pub mod generate;
pub mod hf;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod state_dict;
pub mod tensors;
pub mod trainer;
