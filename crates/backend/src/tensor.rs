//! Views into backend memory.

/// Element type of a buffer. f32 is what every backend computes in today; the low-precision
/// types are here so that storage can be chosen per buffer when a backend supports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// A view of `len` elements starting at a backend address: a host pointer on the CPU, a device
/// pointer on a GPU. Views are `Copy` and carry no lifetime, exactly like device pointers; the
/// model that owns the buffers guarantees that views outlive nothing and that an output view
/// never overlaps an input view of the same call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor {
    addr: usize,
    len: usize,
    dtype: DType,
}

impl Tensor {
    /// # Safety
    /// `addr` must point to `len` elements of `dtype` that stay allocated while the view is used.
    pub unsafe fn from_raw(addr: usize, len: usize, dtype: DType) -> Self {
        Tensor { addr, len, dtype }
    }
    pub fn addr(&self) -> usize {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The sub-view `[offset, offset + len)`; panics when it leaves the view, which is a bug in
    /// the caller's plan, not bad input.
    pub fn slice(&self, offset: usize, len: usize) -> Tensor {
        assert!(
            offset + len <= self.len,
            "view [{offset}, {}) outside a tensor of {} elements",
            offset + len,
            self.len
        );
        Tensor {
            addr: self.addr + offset * self.dtype.size(),
            len,
            dtype: self.dtype,
        }
    }
}

/// Memory owned by a backend; dropping it frees the memory.
pub trait Buffer: Send + Sync {
    /// The view of the whole buffer.
    fn tensor(&self) -> Tensor;
}
