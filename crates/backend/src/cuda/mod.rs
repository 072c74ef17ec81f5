//! The CUDA backend and everything that finds, checks and compiles for a GPU at run time.

mod backend;
pub mod compile;
pub mod libs;
pub mod probe;

pub use backend::{Cuda, CudaBuffer};
