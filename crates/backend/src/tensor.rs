//! Views into backend memory.

/// Element type of a buffer: f32 values (low-precision operand copies are a backend's own
/// business) and i32 token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        4
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
