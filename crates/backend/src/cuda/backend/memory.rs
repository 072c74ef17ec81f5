//! Device memory: allocations freed on drop, the buffers tensors view, and the scratch and
//! workspaces the backend allocates once and reuses.

use super::*;

/// Device memory, freed on drop.
pub(in crate::cuda) struct DeviceMemory {
    addr: u64,
    stream: Arc<CudaStream>,
}

impl DeviceMemory {
    /// `bytes` of zeroed device memory (zeroed like the CPU backend's buffers).
    pub(super) fn zeroed(stream: &Arc<CudaStream>, bytes: usize) -> Result<DeviceMemory> {
        if bytes == 0 {
            return Ok(DeviceMemory {
                addr: 0,
                stream: stream.clone(),
            });
        }
        bind(stream)?;
        // SAFETY: plain allocation; the memory is owned by the returned value.
        let addr = unsafe { result::malloc_sync(bytes) }.map_err(|e| {
            let mib = |b: usize| b as f64 / 1048576.0;
            let free = match result::mem_get_info() {
                Ok((free, total)) => format!(
                    "{:.1} MiB of the GPU's {:.1} MiB are free",
                    mib(free),
                    mib(total)
                ),
                Err(_) => "the free memory is unknown".into(),
            };
            anyhow!(
                "out of GPU memory ({e}): {:.1} MiB more are needed but {free}; lower --batch-size or --seq-len (keeping the tokens per step with --grad-accum-steps), or choose a smaller --preset",
                mib(bytes)
            )
        })?;
        let mem = DeviceMemory {
            addr,
            stream: stream.clone(),
        };
        // SAFETY: `addr` holds `bytes` bytes; the memset is ordered before any later use on the
        // stream.
        unsafe { result::memset_d8_async(addr, 0, bytes, stream.cu_stream()) }
            .map_err(|e| anyhow!("zeroing new GPU memory: {e}"))?;
        Ok(mem)
    }

    pub(in crate::cuda) fn addr(&self) -> u64 {
        self.addr
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        if self.addr == 0 {
            return;
        }
        // Kernels still queued may use the memory: wait for them. Errors cannot be returned from
        // a drop and mean the context is already broken; the memory goes with it.
        let _ = self.stream.synchronize();
        // SAFETY: allocated by `zeroed`, freed once, no queued work uses it any more.
        let _ = unsafe { result::free_sync(self.addr) };
    }
}

/// Binds the stream's context to the calling thread, as every driver call needs.
pub(super) fn bind(stream: &CudaStream) -> Result<()> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| anyhow!("binding the CUDA context to this thread: {e}"))
}

/// A buffer of device memory.
pub struct CudaBuffer {
    pub(super) mem: DeviceMemory,
    pub(super) len: usize,
    pub(super) dtype: DType,
}

impl Buffer for CudaBuffer {
    fn tensor(&self) -> Tensor {
        // SAFETY: the view covers exactly this buffer's elements, which live as long as it.
        unsafe { Tensor::from_raw(self.mem.addr as usize, self.len, self.dtype) }
    }
}

/// The scratch buffer's parts: `PARTIALS` f64 partial sums, then three u64 slots that the host
/// reads back in one copy: a total (f64 bits), and two counters.
pub(super) struct Scratch {
    pub(super) mem: DeviceMemory,
}

impl Scratch {
    pub(super) const BYTES: usize = (PARTIALS + 3) * 8;
    pub(super) fn partials(&self) -> u64 {
        self.mem.addr
    }
    pub(super) fn total(&self) -> u64 {
        self.mem.addr + (PARTIALS * 8) as u64
    }
    pub(super) fn counters(&self) -> u64 {
        self.total() + 8
    }
}

/// Attention's working memory: the per-head copies of q, k, v and their gradients (see
/// [`HeadMajor`]), and a chunk's `[heads, seq, seq]` matrices between the products: dropout(att)
/// when dropout is on, and in the backward dP, turned into dS in place. The products of one
/// chunk are queued after those of the previous one on the one stream, so one chunk's worth is
/// enough, whatever the batch size. Allocated on first use and grown when a call needs more, so
/// a training step allocates nothing after its first.
pub(super) struct Workspace {
    mem: DeviceMemory,
    floats: usize,
}

impl Workspace {
    pub(super) fn empty(stream: &Arc<CudaStream>) -> Result<Workspace> {
        Ok(Workspace {
            mem: DeviceMemory::zeroed(stream, 0)?,
            floats: 0,
        })
    }

    /// The address of at least `floats` floats.
    pub(super) fn reserve(&mut self, stream: &Arc<CudaStream>, floats: usize) -> Result<u64> {
        if self.floats < floats {
            // Dropping the old memory waits for the work queued on it.
            self.mem = DeviceMemory::zeroed(stream, floats * 4)?;
            self.floats = floats;
        }
        Ok(self.mem.addr)
    }
}

/// Copies `src` to the device view `dst` (address `addr`), which must have exactly its length.
pub(super) fn copy_to_device<T>(
    stream: &CudaStream,
    addr: u64,
    dst: Tensor,
    src: &[T],
) -> Result<()> {
    if dst.len() != src.len() {
        bail!(
            "upload: {} elements into a view of {}",
            src.len(),
            dst.len()
        );
    }
    if src.is_empty() {
        // An empty buffer has no device memory (address 0), which the driver may refuse.
        return Ok(());
    }
    bind(stream)?;
    // SAFETY: `dst` holds src.len() elements of this size (dtype checked by the caller); the
    // synchronous copy reads `src` before returning and runs after every queued kernel.
    unsafe { result::memcpy_htod_sync(addr, src) }
        .with_context(|| format!("copying {} values to the GPU", src.len()))
}
