//! The CUDA implementation of [`crate::Backend`] (being written).

/// Placeholder until the CUDA backend lands.
pub struct Cuda;
pub struct CudaBuffer;
