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

/// A `note:` line on stderr. `flint train` ignores SIGPIPE (a closed output stops it cleanly),
/// so a closed stderr is an error from the write here, and a note is not worth a panic.
fn note(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "note: {text}");
}
