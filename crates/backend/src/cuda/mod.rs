//! The CUDA backend and everything that finds, checks and compiles for a GPU at run time.

mod backend;
mod blas;
pub mod compile;
pub mod driver;
mod isolate;
mod launch;
pub mod libs;
pub mod probe;
mod raw;
mod self_test;

pub use backend::{Cuda, CudaBuffer};
