//! The CUDA backend and everything that finds, checks and compiles for a GPU at run time.

mod backend;
mod blas;
pub mod compile;
mod flash_check;
mod launch;
pub mod libs;
pub mod probe;

pub use backend::{Cuda, CudaBuffer};
