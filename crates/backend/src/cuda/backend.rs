//! The CUDA implementation of [`crate::Backend`]: flint's CUDA C kernels (`kernels/`, compiled
//! by NVRTC for the GPU at hand) and cuBLASLt products, queued in order on the context's default
//! stream. Every call computes what the CPU backend ([`crate::cpu`], the reference) computes;
//! [`crate::parity`] checks one against the other.
//!
//! Tensors are device addresses. Each call checks the dtype and length of every view it is
//! given before a kernel touches it, so a wrong plan is an error, not a stray write. The step
//! allocates no device memory after its first: scratch for sums read back to the host and for
//! the partial sums of column reductions is allocated in `new`, attention's (see
//! [`Workspace`]) and the padded products' on the first call that needs them.

use super::blas::{self, Blas, Epilogue, Operand, Product, Strided};
use super::compile;
use super::launch::{self, elementwise, grid, size, Arg, Kernels, THREADS};
use super::libs::{self, Lib};
use super::self_test::Verdict;
use crate::{
    Activation, AdamW, AttentionShape, Backend, Buffer, DType, Dropout, GradStore, Mirror,
    Precision, Tensor, Weight, WeightLayout,
};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result, CudaContext, CudaStream, LaunchConfig};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Per-block partial sums a reduction may leave (its grid is capped to this many blocks).
const PARTIALS: usize = 1024;

/// Column reductions (see [`Cuda::column_reduce`]) cut the rows into at most this many chunks of
/// at least [`MIN_CHUNK_ROWS`]: at GPT-2 sizes (8192 rows, 768 to 3072 columns) that is 64
/// chunks times 24 to 96 tiles of 32 columns, thousands of blocks, enough to fill any GPU.
const MAX_ROW_CHUNKS: usize = 64;

/// Rows a chunk gets at least, so that small reductions do not drown in partials.
const MIN_CHUNK_ROWS: usize = 32;

/// f32 partial sums of the column reductions: [`MAX_ROW_CHUNKS`] chunks of 65536 columns, 16 MiB.
/// Wider reductions go in slabs of columns that fit.
const COLUMN_PARTIALS: usize = MAX_ROW_CHUNKS << 16;

/// Device memory, freed on drop.
pub(super) struct DeviceMemory {
    addr: u64,
    stream: Arc<CudaStream>,
}

impl DeviceMemory {
    /// `bytes` of zeroed device memory (zeroed like the CPU backend's buffers).
    fn zeroed(stream: &Arc<CudaStream>, bytes: usize) -> Result<DeviceMemory> {
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

    pub(super) fn addr(&self) -> u64 {
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
fn bind(stream: &CudaStream) -> Result<()> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| anyhow!("binding the CUDA context to this thread: {e}"))
}

/// A buffer of device memory.
pub struct CudaBuffer {
    mem: DeviceMemory,
    len: usize,
    dtype: DType,
}

impl Buffer for CudaBuffer {
    fn tensor(&self) -> Tensor {
        // SAFETY: the view covers exactly this buffer's elements, which live as long as it.
        unsafe { Tensor::from_raw(self.mem.addr as usize, self.len, self.dtype) }
    }
}

/// The scratch buffer's parts: `PARTIALS` f64 partial sums, then three u64 slots that the host
/// reads back in one copy: a total (f64 bits), and two counters.
struct Scratch {
    mem: DeviceMemory,
}

impl Scratch {
    const BYTES: usize = (PARTIALS + 3) * 8;
    fn partials(&self) -> u64 {
        self.mem.addr
    }
    fn total(&self) -> u64 {
        self.mem.addr + (PARTIALS * 8) as u64
    }
    fn counters(&self) -> u64 {
        self.total() + 8
    }
}

/// Attention's working memory: the per-head copies of q, k, v and their gradients (see
/// [`HeadMajor`]), and a chunk's `[heads, seq, seq]` matrices between the products: dropout(att)
/// when dropout is on, and in the backward dP, turned into dS in place. The products of one
/// chunk are queued after those of the previous one on the one stream, so one chunk's worth is
/// enough, whatever the batch size. Allocated on first use and grown when a call needs more, so
/// a training step allocates nothing after its first.
struct Workspace {
    mem: DeviceMemory,
    floats: usize,
}

impl Workspace {
    fn empty(stream: &Arc<CudaStream>) -> Result<Workspace> {
        Ok(Workspace {
            mem: DeviceMemory::zeroed(stream, 0)?,
            floats: 0,
        })
    }

    /// The address of at least `floats` floats.
    fn reserve(&mut self, stream: &Arc<CudaStream>, floats: usize) -> Result<u64> {
        if self.floats < floats {
            // Dropping the old memory waits for the work queued on it.
            self.mem = DeviceMemory::zeroed(stream, floats * 4)?;
            self.floats = floats;
        }
        Ok(self.mem.addr)
    }
}

pub struct Cuda {
    kernels: Kernels,
    blas: Blas,
    /// Locked for the whole of a call that reads results back through it.
    scratch: Mutex<Scratch>,
    /// Locked for the whole of an attention call.
    attention_scratch: Mutex<Workspace>,
    /// Locked for the whole of a padded product (see [`Cuda::gemm_padded`]).
    pad_workspace: Mutex<Workspace>,
    /// bf16 copies of a product's operands (see [`Cuda::bf16_operands`]).
    bf16_workspace: Mutex<Workspace>,
    /// [`COLUMN_PARTIALS`] floats, locked for the whole of a column reduction: the two levels
    /// of another call must not interleave with its own on the stream.
    column_partials: Mutex<DeviceMemory>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    /// Index into [`Precision::ALL`]; atomic because the trait takes `&self`.
    precision: AtomicUsize,
    arch: (i32, i32),
    sm_count: i32,
    /// Peak SM clock, kHz.
    clock_khz: i32,
    /// Whether the flash attention kernels passed their self-test here (run on first use).
    pub(super) flash_passed: OnceLock<Result<Verdict, String>>,
    /// Whether cuBLASLt's GELU epilogues passed their self-test here (run on first use).
    pub(super) gelu_passed: OnceLock<Result<Verdict, String>>,
}

impl Cuda {
    /// Opens GPU `ordinal`: its context and default stream, flint's kernels compiled for its
    /// architecture (or from the disk cache), a cuBLASLt handle and its workspace.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        // cudarc panics when it cannot open a library, so it is only called once we know the
        // library loaded.
        for lib in [Lib::Driver, Lib::CublasLt] {
            if libs::loaded(lib).is_none() {
                bail!(
                    "{} was not found or did not load; fix: {}",
                    lib.name(),
                    lib.install_hint()
                );
            }
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow!("cannot open GPU {ordinal} (cuda:{ordinal}): {e}"))?;
        let stream = ctx.default_stream();
        let arch = ctx
            .compute_capability()
            .map_err(|e| anyhow!("reading the compute capability of GPU {ordinal}: {e}"))?;
        let cubin = compile::kernels_cubin(arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| anyhow!("loading flint's kernels for sm_{}{}: {e}", arch.0, arch.1))?;
        let kernels = Kernels::load(&module)?;
        let attribute = |a, what: &str| {
            ctx.attribute(a)
                .map_err(|e| anyhow!("reading the {what} of GPU {ordinal}: {e}"))
        };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let sm_count = attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "SM count")?;
        let clock_khz = attribute(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE, "clock rate")?;
        let workspace = DeviceMemory::zeroed(&stream, blas::WORKSPACE_BYTES)?;
        let blas = Blas::new(workspace)?;
        let scratch = Scratch {
            mem: DeviceMemory::zeroed(&stream, Scratch::BYTES)?,
        };
        Ok(Cuda {
            kernels,
            blas,
            scratch: Mutex::new(scratch),
            attention_scratch: Mutex::new(Workspace::empty(&stream)?),
            pad_workspace: Mutex::new(Workspace::empty(&stream)?),
            bf16_workspace: Mutex::new(Workspace::empty(&stream)?),
            column_partials: Mutex::new(DeviceMemory::zeroed(&stream, COLUMN_PARTIALS * 4)?),
            stream,
            ordinal,
            precision: AtomicUsize::new(0),
            arch,
            sm_count,
            clock_khz,
            flash_passed: OnceLock::new(),
            gelu_passed: OnceLock::new(),
        })
    }

    fn launch(
        &self,
        kernel: &launch::Kernel,
        cfg: LaunchConfig,
        args: impl IntoIterator<Item = Arg>,
    ) -> Result<()> {
        launch::launch(&self.stream, kernel, cfg, args)
    }

    fn scratch(&self) -> Result<MutexGuard<'_, Scratch>> {
        lock(&self.scratch, "the GPU scratch buffer")
    }

    /// Copies `N` values of `T` from device address `addr` (waits for queued work).
    fn read<T: Copy + Default, const N: usize>(&self, addr: u64) -> Result<[T; N]> {
        bind(&self.stream)?;
        let mut out = [T::default(); N];
        // SAFETY: callers pass addresses of at least N values of T (scratch slots, checked views);
        // the copy runs on the legacy default stream, after every queued kernel.
        unsafe { result::memcpy_dtoh_sync(&mut out, addr) }
            .map_err(|e| anyhow!("copying a result back from the GPU: {e}"))?;
        Ok(out)
    }

    /// `dst[m, n] (+)= a[m, k] @ b[k, n]` on packed matrices, any dimension possibly zero.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        dst: u64,
        accumulate: bool,
        a: Operand,
        b: Operand,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if m == 0 || n == 0 || (k == 0 && accumulate) {
            return Ok(());
        }
        if k == 0 {
            let cfg = elementwise(m * n);
            return self.launch(
                &self.kernels.fill,
                cfg,
                [Arg::U64(dst), size(m * n), Arg::F32(0.0)],
            );
        }
        let (dst, a, b) = (packed(plain(dst), m, n), packed(a, m, k), packed(b, k, n));
        // Each copy must pay: a padded operand is read by the product once per element of the
        // dimension it does not have (k for dst, n for a, m for b). In bf16, a and b are
        // copied to aligned rows anyway (`bf16_operands`).
        let mut f32_operands = vec![(dst, k)];
        if self.precision() != Precision::Bf16 {
            f32_operands.extend([(a, n), (b, m)]);
        }
        let aligned = |o: &Strided| o.ld.is_multiple_of(ALIGNED_FLOATS);
        let pays = f32_operands
            .iter()
            .all(|(o, reuse)| aligned(o) || *reuse >= PAD_MIN_REUSE);
        let misaligned = f32_operands.iter().any(|(o, _)| !aligned(o));
        if misaligned && pays && m * k * n >= PAD_MIN_MACS {
            let pad = f32_operands.len() > 1;
            return self.gemm_padded(dst, accumulate, a, b, [m, k, n], pad);
        }
        self.gemm_batched(dst, accumulate, a, b, m, k, n, 1)
    }

    /// A large product whose rows are not 16-byte aligned (a vocabulary of 50257 columns, say)
    /// gets only cuBLASLt's slowest, element-by-element kernels. It is faster to copy each such
    /// operand to rows padded to [`PAD_FLOATS`], multiply those, and copy the result back: a
    /// copy moves each element twice, the product reads it many times. `inputs`: pad a and b
    /// too, not only dst.
    fn gemm_padded(
        &self,
        dst: Strided,
        accumulate: bool,
        a: Strided,
        b: Strided,
        [m, k, n]: [usize; 3],
        inputs: bool,
    ) -> Result<()> {
        // Stored [rows, cols] of each operand, and its place in the padded workspace.
        let stored = |o: &Strided, rows: usize, cols: usize| {
            if o.op.transposed {
                (cols, rows)
            } else {
                (rows, cols)
            }
        };
        let shapes = [stored(&dst, m, n), stored(&a, m, k), stored(&b, k, n)];
        let ops = [dst, a, b];
        let padded_ld = |i: usize| {
            let o = &ops[i];
            if o.ld.is_multiple_of(ALIGNED_FLOATS) || (i > 0 && !inputs) {
                None
            } else {
                Some(o.ld.next_multiple_of(PAD_FLOATS))
            }
        };
        let floats: usize = (0..3)
            .filter_map(|i| padded_ld(i).map(|ld| shapes[i].0 * ld))
            .sum();
        let mut workspace = lock(&self.pad_workspace, "the padding workspace")?;
        let mut next = workspace.reserve(&self.stream, floats)?;
        let mut padded = ops;
        for (i, (o, (rows, cols))) in ops.iter().zip(shapes).enumerate() {
            let Some(ld) = padded_ld(i) else { continue };
            padded[i] = Strided {
                op: Operand { addr: next, ..o.op },
                ld,
                stride: 0,
            };
            // The destination is only read when accumulating.
            if i > 0 || accumulate {
                self.copy_rows(next, ld, o.op.addr, o.ld, rows, cols)?;
            }
            next += 4 * (rows * ld) as u64;
        }
        let [pdst, pa, pb] = padded;
        self.gemm_batched(pdst, accumulate, pa, pb, m, k, n, 1)?;
        if pdst.op.addr != dst.op.addr {
            let (rows, cols) = shapes[0];
            self.copy_rows(dst.op.addr, dst.ld, pdst.op.addr, pdst.ld, rows, cols)?;
        }
        Ok(())
    }

    /// `dst[r * dst_ld + c] = src[r * src_ld + c]` for every `r < rows`, `c < cols`.
    fn copy_rows(
        &self,
        dst: u64,
        dst_ld: usize,
        src: u64,
        src_ld: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let args = [
            ptr(dst),
            ptr(src),
            size(rows),
            size(cols),
            size(dst_ld),
            size(src_ld),
        ];
        self.launch(&self.kernels.copy_rows, grid(rows, 0), args)
    }

    /// `count` strided products (see [`Blas::gemm`]), every dimension nonzero.
    #[allow(clippy::too_many_arguments)]
    fn gemm_batched(
        &self,
        dst: Strided,
        accumulate: bool,
        a: Strided,
        b: Strided,
        m: usize,
        k: usize,
        n: usize,
        count: usize,
    ) -> Result<()> {
        if !self.product((a, b, dst), accumulate, [m, k, n, count], None)? {
            bail!("cuBLASLt has no algorithm for a [{m}, {k}] @ [{k}, {n}] product");
        }
        Ok(())
    }

    /// One cuBLASLt product (see [`Blas::matmul`]): on bf16 copies of a single product's
    /// operands in bf16 precision, unless cuBLASLt has refused those before (then no copies are
    /// made), else on the f32 operands. `Ok(false)` when cuBLASLt refused both.
    fn product(
        &self,
        (a, b, dst): (Strided, Strided, Strided),
        accumulate: bool,
        dims: [usize; 4],
        epilogue: Option<Epilogue>,
    ) -> Result<bool> {
        bind(&self.stream)?;
        let (stream, precision) = (self.stream.cu_stream(), self.precision());
        let op = |bf16| Product {
            precision,
            bf16,
            epilogue,
        };
        // Checked before any copy: cuBLASLt's epilogue faults on a misaligned bias.
        if epilogue.is_some_and(|e| !e.fits(dst.ld)) {
            return Ok(false);
        }
        if precision == Precision::Bf16 && dims[3] == 1 {
            let mut workspace = lock(&self.bf16_workspace, "the bf16 workspace")?;
            let [m, k, n, _] = dims;
            let copies = self.bf16_copies(&mut workspace, a, b, [m, k, n])?;
            let ops = (copies[0].0, copies[1].0, dst);
            if !self.blas.refused(op(true), ops, dims)? {
                for (copy, source, rows, cols) in copies {
                    let args = [copy.op.addr, source.op.addr].map(ptr);
                    let args = args
                        .into_iter()
                        .chain([rows, cols, copy.ld, source.ld].map(size));
                    self.launch(&self.kernels.to_bf16, grid(rows, 0), args)?;
                }
                if self.blas.matmul(stream, op(true), ops, accumulate, dims)? {
                    return Ok(true);
                }
            }
        }
        self.blas
            .matmul(stream, op(false), (a, b, dst), accumulate, dims)
    }

    /// `dst[m, n] = epilogue(a[m, k] @ b[k, n])` on packed matrices through cuBLASLt (see
    /// [`Blas::gemm_epilogue`]), with bf16 operands in bf16 precision; `Ok(false)`, having done
    /// nothing, when the epilogue cannot be used. Every dimension nonzero.
    fn gemm_epilogue(
        &self,
        dst: u64,
        a: Operand,
        b: Operand,
        epilogue: Epilogue,
        [m, k, n]: [usize; 3],
    ) -> Result<bool> {
        let (dst, a, b) = (packed(plain(dst), m, n), packed(a, m, k), packed(b, k, n));
        self.product((a, b, dst), false, [m, k, n, 1], Some(epilogue))
    }

    /// Whether products with `act` may end in cuBLASLt's GELU epilogues: GPT-2's tanh GELU,
    /// without dropout (which the epilogue cannot apply), in bf16 only. cuBLASLt's GELU may
    /// use the GPU's approximate tanh (relative error up to 2^-11), which its derivative
    /// amplifies to a few 1e-3 of the gradient: within bf16's rounding and its parity
    /// threshold (1e-2), not within the 1e-5 (fp32) or 1e-3 (tf32, fp16) promised elsewhere.
    /// They must also have passed their self-test on this GPU (see [`Cuda::gelu_self_test`]).
    fn gelu_epilogue(&self, act: Activation, dropout: Option<Dropout>) -> Result<bool> {
        if act != Activation::GeluTanh || dropout.is_some() || self.precision() != Precision::Bf16 {
            return Ok(false);
        }
        checked(&self.gelu_passed, || self.gelu_checked())
    }

    /// Where bf16 copies of the operands of `a[m, k] @ b[k, n]` go in `workspace` (rows padded
    /// to 16 bytes, as cuBLASLt's fast kernels need): per operand its copy, its source, and the
    /// stored rows and columns that `to_bf16` converts (rounding to nearest even; the matrix
    /// units then read half the bytes, at the bf16 rate). The caller holds the workspace until
    /// the product that reads them is queued.
    fn bf16_copies(
        &self,
        workspace: &mut Workspace,
        a: Strided,
        b: Strided,
        [m, k, n]: [usize; 3],
    ) -> Result<[(Strided, Strided, usize, usize); 2]> {
        // Stored [rows, cols] of each operand, and the row stride of its copy.
        let stored = |o: &Strided, rows: usize, cols: usize| match o.op.transposed {
            true => (cols, rows, rows.next_multiple_of(8)),
            false => (rows, cols, cols.next_multiple_of(8)),
        };
        let shapes = [stored(&a, m, k), stored(&b, k, n)];
        let elements: usize = shapes.iter().map(|(rows, _, ld)| rows * ld).sum();
        let mut next = workspace.reserve(&self.stream, elements.div_ceil(2))?;
        let mut copies = [(a, a, 0, 0), (b, b, 0, 0)];
        for (copy, (rows, cols, ld)) in copies.iter_mut().zip(shapes) {
            let source = copy.1;
            let op = Operand {
                addr: next,
                ..source.op
            };
            *copy = (Strided { op, ld, stride: 0 }, source, rows, cols);
            next += 2 * (rows * ld) as u64;
        }
        Ok(copies)
    }

    /// `dst[..n] = dropout(att[start..start + n])`, element `i` with multiplier `start + i` of the
    /// dropout stream.
    fn attention_dropout(
        &self,
        dst: u64,
        att: u64,
        start: usize,
        n: usize,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let args = [ptr(dst), ptr(att), size(n), size(start)];
        let args = args.into_iter().chain(dropout_args(dropout));
        self.launch(&self.kernels.attention_dropout, elementwise(n), args)
    }

    /// `kernel` (heads_split or heads_merge) from `src` to `dst`, over `parts` column blocks of
    /// a `[rows, parts * E]` buffer and the per-head layout of [`HeadMajor`].
    fn heads(
        &self,
        kernel: &launch::Kernel,
        dst: u64,
        src: u64,
        parts: usize,
        s: &AttentionShape,
    ) -> Result<()> {
        let n = parts * s.rows() * s.width();
        let args = [ptr(dst), ptr(src), size(parts), size(s.batch), size(s.seq)];
        let args = args.into_iter().chain([
            size(s.heads),
            size(s.head_dim),
            Arg::I32(s.batch_first as i32),
        ]);
        self.launch(kernel, elementwise(n), args)
    }

    /// Dynamic shared memory for a row of `n` floats, checked against the per-block limit.
    fn shared_row(n: usize, what: &str) -> Result<usize> {
        if n * 4 > launch::MAX_SHARED_BYTES {
            bail!(
                "{what}: a row of {n} keys does not fit in shared memory (at most {})",
                launch::MAX_SHARED_BYTES / 4
            );
        }
        Ok(n)
    }
}

/// `mutex` locked; a poisoned one (a thread panicked holding it) is an error naming `what`.
/// A self-test's verdict, run on first use (see `self_test.rs`): whether the fast path may run,
/// or the error that left the GPU unusable.
fn checked(
    verdict: &OnceLock<Result<Verdict, String>>,
    test: impl FnOnce() -> Result<Verdict>,
) -> Result<bool> {
    match verdict.get_or_init(|| test().map_err(|e| format!("{e:#}"))) {
        Ok(v) => Ok(v.passed()),
        Err(e) => Err(anyhow!("{e}")),
    }
}

fn lock<'a, T>(mutex: &'a Mutex<T>, what: &str) -> Result<MutexGuard<'a, T>> {
    mutex
        .lock()
        .map_err(|_| anyhow!("a thread panicked while using {what}"))
}

/// The device address of `t` after checking that it holds at least `len` elements of `dtype`.
fn view(t: Tensor, dtype: DType, len: usize, what: &str) -> Result<u64> {
    if t.dtype() != dtype {
        bail!(
            "{what}: the CUDA backend expects {dtype:?} here, got {:?}",
            t.dtype()
        );
    }
    if t.len() < len {
        bail!("{what}: needs {len} elements, the view has {}", t.len());
    }
    Ok(t.addr() as u64)
}

fn f32s(t: Tensor, len: usize, what: &str) -> Result<u64> {
    view(t, DType::F32, len, what)
}

fn i32s(t: Tensor, len: usize, what: &str) -> Result<u64> {
    view(t, DType::I32, len, what)
}

/// A device address as a kernel argument.
fn ptr(addr: u64) -> Arg {
    Arg::U64(addr)
}

/// The kernels' `DROPOUT_PARAMS`: seed, offset, threshold, keep (see `common.cuh`). The
/// threshold and the kept scale are computed exactly as `philox::dropout_multipliers` does.
fn dropout_args(d: Option<Dropout>) -> [Arg; 4] {
    let (seed, offset, threshold, keep) = match d {
        None => (0, 0, 0, 1.0),
        Some(d) if d.p >= 1.0 => (d.seed, d.offset, 1 << 32, 0.0),
        Some(d) => (
            d.seed,
            d.offset,
            (d.p as f64 * 4294967296.0) as u64,
            1.0 / (1.0 - d.p),
        ),
    };
    [
        Arg::U64(seed),
        Arg::U64(offset),
        Arg::U64(threshold),
        Arg::F32(keep),
    ]
}

/// The `seq, heads, hd, causal` parameters of the attention kernels.
fn attention_args(s: &AttentionShape) -> [Arg; 4] {
    [
        size(s.seq),
        size(s.heads),
        size(s.head_dim),
        Arg::I32(s.causal as i32),
    ]
}

/// Whether the softmax kernels hold an attention row in shared memory (`seq` floats, when they
/// fit) or work on it in place in global memory, and the dynamic shared floats that takes.
fn row_cache(seq: usize) -> (Arg, usize) {
    let fits = seq * 4 <= launch::MAX_SHARED_BYTES;
    (Arg::I32(fits as i32), if fits { seq } else { 0 })
}

// The flash kernels tile 128 rows per block as 8 warps of 16.
const _: () = assert!(THREADS == 256);

/// Row strides (in floats) that keep every row 16-byte aligned, as cuBLASLt's fast kernels need.
const ALIGNED_FLOATS: usize = 4;
/// The row stride a misaligned operand is padded to: whole 128-byte lines.
const PAD_FLOATS: usize = 32;
/// Products smaller than this many multiply-adds run misaligned, as do those that would read a
/// padded copy fewer than [`PAD_MIN_REUSE`] times per element: the copies would cost more.
const PAD_MIN_MACS: usize = 1 << 20;
const PAD_MIN_REUSE: usize = 64;

/// Floats of `[heads, seq, seq]` scratch (dropout(att), dP) attention may use at once: batch
/// elements are processed in chunks that fit (at least one element), so the scratch stays
/// bounded whatever the batch: 256 MiB. `FLINT_ATTENTION_CHUNK_FLOATS` lowers it, so that a
/// parity run on small shapes goes through several chunks too (scripts/gpu-check.sh).
fn chunk(batch: usize, square: usize) -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let limit = *LIMIT.get_or_init(|| {
        std::env::var("FLINT_ATTENTION_CHUNK_FLOATS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64 << 20)
    });
    (limit / square.max(1)).clamp(1, batch.max(1))
}

/// `(first, count)` of each chunk of `per` batch elements.
fn chunks(batch: usize, per: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..batch)
        .step_by(per)
        .map(move |b0| (b0, per.min(batch - b0)))
}

/// Attention's per-head copies at `base` (heads_split's layout): part `p` is `[batch, heads,
/// seq, head_dim]`, so the `[seq, head_dim]` matrices of every (batch, head) pair are one
/// stride apart and a single batched product covers them.
struct HeadMajor<'a> {
    s: &'a AttentionShape,
    base: u64,
}

impl HeadMajor<'_> {
    /// Part `p`'s matrix for batch element `b0`, head 0 (or its transpose), then one per head
    /// and batch element.
    fn part(&self, p: usize, b0: usize, transposed: bool) -> Strided {
        let (s, hd) = (self.s, self.s.head_dim);
        let at = (p * s.batch + b0) * s.heads * s.seq * hd;
        Strided {
            op: Operand {
                addr: self.base + 4 * at as u64,
                transposed,
            },
            ld: hd,
            stride: s.seq * hd,
        }
    }
}

/// The first `[seq, seq]` matrix (or its transpose) of `[.., seq, seq]` ones at `addr`.
fn square_of(s: &AttentionShape, addr: u64, transposed: bool) -> Strided {
    Strided {
        op: Operand { addr, transposed },
        ld: s.seq,
        stride: s.seq * s.seq,
    }
}

/// The kernels' activation code (`activate` in elementwise.cu).
fn activation_code(act: Activation) -> Arg {
    Arg::I32(match act {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
    })
}

/// The weight `W[k, n]` of a product as an operand: `nn.Linear` stores its transpose.
fn weight_operand(w: Weight, k: usize, n: usize, what: &str) -> Result<Operand> {
    Ok(Operand {
        addr: f32s(w.tensor, k * n, what)?,
        transposed: w.layout == WeightLayout::OutIn,
    })
}

/// W^T as the right operand of `dinp[rows, k] = dout[rows, n] @ W^T` (nn.Linear stores W^T).
fn weight_transposed(w: Weight, k: usize, n: usize, what: &str) -> Result<Operand> {
    let w = weight_operand(w, k, n, what)?;
    Ok(Operand {
        transposed: !w.transposed,
        ..w
    })
}

/// A packed row-major operand used as `[rows, cols]`: rows of `cols` elements, or of `rows`
/// when it is stored transposed.
fn packed(op: Operand, rows: usize, cols: usize) -> Strided {
    Strided {
        op,
        ld: if op.transposed { rows } else { cols },
        stride: 0,
    }
}

fn plain(addr: u64) -> Operand {
    Operand {
        addr,
        transposed: false,
    }
}

fn transposed(addr: u64) -> Operand {
    Operand {
        addr,
        transposed: true,
    }
}

/// What the flash forward leaves in `att` for the backward, in place of the probabilities: each
/// attention row's log-sum-exp, the per-head output (for the backward's rowsum(dout * out)), and
/// the key padding mask (zeros without one). `att` has room for them when `seq > head_dim + 1`.
struct FlashSaved {
    lse: u64,
    out: u64,
    key_padding: u64,
}

impl FlashSaved {
    /// The floats it takes: a log-sum-exp and a head's output row per attention row, and the
    /// mask.
    fn len(s: &AttentionShape) -> usize {
        s.batch * s.heads * s.seq * (1 + s.head_dim) + s.batch * s.seq
    }

    fn new(att: u64, s: &AttentionShape) -> FlashSaved {
        let rows = s.batch * s.heads * s.seq;
        FlashSaved {
            lse: att,
            out: att + 4 * rows as u64,
            key_padding: att + 4 * (rows * (1 + s.head_dim)) as u64,
        }
    }
}

/// One block per 128 rows (queries or keys) of each head.
fn flash_grid(s: &AttentionShape) -> LaunchConfig {
    grid(s.seq.div_ceil(128) * s.batch * s.heads, 0)
}

/// The flash kernels' trailing `batch, heads, seq, causal, scale, hd, batch_first` parameters.
fn flash_args(s: &AttentionShape) -> [Arg; 7] {
    [
        size(s.batch),
        size(s.heads),
        size(s.seq),
        Arg::I32(s.causal as i32),
        Arg::F32(1.0 / (s.head_dim as f32).sqrt()),
        size(s.head_dim),
        Arg::I32(s.batch_first as i32),
    ]
}

impl Cuda {
    /// Whether attention takes the flash path: bf16 products on sm_80 or newer, no attention
    /// dropout, a head size the kernels are built for (32 or 64), sequences longer than
    /// `head_dim + 1` (so that what the forward keeps also fits an `att` sized for the
    /// `[B, H, T, T]` probabilities, as callers that do not ask
    /// [`Backend::attention_saved_len`] size it), and a passed self-test on this GPU (see
    /// `self_test.rs`: a GPU whose flash results disagree with the cuBLASLt path's keeps to the
    /// latter, and says so). `FLINT_FLASH_ATTENTION=0` (or `off`) turns it off. The forward and
    /// the backward decide alike, from the same arguments and precision: the precision must not
    /// change between a forward and its backward (the trainer sets it once per run).
    fn flash(&self, s: &AttentionShape, dropout: Option<Dropout>) -> Result<bool> {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let enabled = *ENABLED.get_or_init(|| {
            let off = ["0", "off", "false", "no"];
            std::env::var("FLINT_FLASH_ATTENTION").map_or(true, |v| !off.contains(&v.as_str()))
        });
        let eligible = enabled
            && self.precision() == Precision::Bf16
            && self.arch.0 >= 8
            && dropout.is_none_or(|d| d.p == 0.0)
            && matches!(s.head_dim, 32 | 64)
            && s.seq > s.head_dim + 1;
        if !eligible {
            return Ok(false);
        }
        checked(&self.flash_passed, || self.flash_checked())
    }
}

impl Cuda {
    /// [`Backend::attention_forward`], on the flash kernels when `flash`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_forward_on(
        &self,
        flash: bool,
        out: Tensor,
        att: Tensor,
        qkv: Tensor,
        key_padding: Option<Tensor>,
        shape: &AttentionShape,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let s = shape;
        let (rows, e, seq, heads, hd) = (s.rows(), s.width(), s.seq, s.heads, s.head_dim);
        let att_rows = s.batch * heads * seq;
        let out = f32s(out, rows * e, "attention_forward out")?;
        let saved = if flash {
            FlashSaved::len(s)
        } else {
            att_rows * seq
        };
        let att = f32s(att, saved, "attention_forward att")?;
        let qkv = f32s(qkv, rows * 3 * e, "attention_forward qkv")?;
        let key_padding = match key_padding {
            Some(kp) => f32s(kp, s.batch * seq, "attention_forward key_padding")?,
            None => 0, // a null pointer: no padding
        };
        if att_rows == 0 {
            return Ok(());
        }
        if hd == 0 {
            bail!("attention_forward: head_dim is 0");
        }
        if flash {
            let saved = FlashSaved::new(att, s);
            match key_padding {
                0 => self.launch(
                    &self.kernels.fill,
                    elementwise(s.batch * seq),
                    [ptr(saved.key_padding), size(s.batch * seq), Arg::F32(0.0)],
                )?,
                kp => self.copy_rows(saved.key_padding, seq, kp, seq, s.batch, seq)?,
            }
            let args = [out, saved.out, saved.lse, qkv, saved.key_padding];
            let args = args.into_iter().map(ptr).chain(flash_args(s));
            return self.launch(&self.kernels.flash_forward, flash_grid(s), args);
        }
        let square = heads * seq * seq;
        let per = chunk(s.batch, square);
        let mut scratch = lock(&self.attention_scratch, "the attention scratch buffer")?;
        // q, k, v and out per head, then dropout(att) of a chunk when dropout is on.
        let base = scratch.reserve(
            &self.stream,
            4 * rows * e + dropout.map_or(0, |_| per * square),
        )?;
        let h = HeadMajor { s, base };
        self.heads(&self.kernels.heads_split, base, qkv, 3, s)?;
        // Scores q @ k^T of every (batch, head) pair, then the masked softmax over all of them in
        // place.
        let bh = s.batch * heads;
        self.gemm_batched(
            square_of(s, att, false),
            false,
            h.part(0, 0, false),
            h.part(1, 0, true),
            seq,
            hd,
            seq,
            bh,
        )?;
        let (cached, floats) = row_cache(seq);
        let args = [ptr(att), ptr(key_padding), size(s.batch)];
        let args = args.into_iter().chain(attention_args(s)).chain([cached]);
        self.launch(
            &self.kernels.attention_softmax,
            grid(att_rows, floats),
            args,
        )?;
        for (b0, nb) in chunks(s.batch, per) {
            let probs = match dropout {
                Some(_) => {
                    let buf = base + 4 * (4 * rows * e) as u64;
                    self.attention_dropout(buf, att, b0 * square, nb * square, dropout)?;
                    square_of(s, buf, false)
                }
                None => square_of(s, att + 4 * (b0 * square) as u64, false),
            };
            self.gemm_batched(
                h.part(3, b0, false),
                false,
                probs,
                h.part(2, b0, false),
                seq,
                seq,
                hd,
                nb * heads,
            )?;
        }
        self.heads(
            &self.kernels.heads_merge,
            out,
            base + 4 * (3 * rows * e) as u64,
            1,
            s,
        )
    }

    /// [`Backend::attention_backward`], on the flash kernels when `flash` (as the forward was).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_on(
        &self,
        flash: bool,
        dqkv: Tensor,
        dout: Tensor,
        qkv: Tensor,
        att: Tensor,
        shape: &AttentionShape,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let s = shape;
        let (rows, e, seq, heads, hd) = (s.rows(), s.width(), s.seq, s.heads, s.head_dim);
        let att_rows = s.batch * heads * seq;
        if hd == 0 {
            bail!("attention_backward: head_dim is 0");
        }
        let dqkv = f32s(dqkv, rows * 3 * e, "attention_backward dqkv")?;
        let dout = f32s(dout, rows * e, "attention_backward dout")?;
        let qkv = f32s(qkv, rows * 3 * e, "attention_backward qkv")?;
        let saved = if flash {
            FlashSaved::len(s)
        } else {
            att_rows * seq
        };
        let att = f32s(att, saved, "attention_backward att")?;
        if att_rows == 0 {
            return Ok(());
        }
        if flash {
            let saved = FlashSaved::new(att, s);
            let mut scratch = lock(&self.attention_scratch, "the attention scratch buffer")?;
            let delta = scratch.reserve(&self.stream, att_rows)?;
            let args = [delta, dout, saved.out].into_iter().map(ptr);
            let layout = [s.batch, heads, seq, hd].map(size);
            let args = args.chain(layout).chain([Arg::I32(s.batch_first as i32)]);
            self.launch(&self.kernels.flash_delta, elementwise(att_rows), args)?;
            let args = [dqkv, qkv, dout, saved.lse, delta, saved.key_padding].map(ptr);
            for kernel in [
                &self.kernels.flash_backward_kv,
                &self.kernels.flash_backward_q,
            ] {
                self.launch(kernel, flash_grid(s), args.into_iter().chain(flash_args(s)))?;
            }
            return Ok(());
        }
        let square = heads * seq * seq;
        let per = chunk(s.batch, square);
        let mut scratch = lock(&self.attention_scratch, "the attention scratch buffer")?;
        // Per head: q, k, v, dout, then dq, dk, dv (merged back in one pass); then a chunk's
        // dropout(att), and its dP turned into dS.
        let base = scratch.reserve(&self.stream, 7 * rows * e + per * square)?;
        let h = HeadMajor { s, base };
        let buf = base + 4 * (7 * rows * e) as u64;
        self.heads(&self.kernels.heads_split, base, qkv, 3, s)?;
        self.heads(
            &self.kernels.heads_split,
            base + 4 * (3 * rows * e) as u64,
            dout,
            1,
            s,
        )?;
        for (b0, nb) in chunks(s.batch, per) {
            let count = nb * heads;
            let go = h.part(3, b0, false);
            // dv = dropout(att)^T @ dout, before dP takes the scratch over.
            let probs = match dropout {
                Some(_) => {
                    self.attention_dropout(buf, att, b0 * square, nb * square, dropout)?;
                    buf
                }
                None => att + 4 * (b0 * square) as u64,
            };
            self.gemm_batched(
                h.part(6, b0, false),
                false,
                square_of(s, probs, true),
                go,
                seq,
                seq,
                hd,
                count,
            )?;
            // dP = dout @ v^T, then dS in place.
            self.gemm_batched(
                square_of(s, buf, false),
                false,
                go,
                h.part(2, b0, true),
                seq,
                hd,
                seq,
                count,
            )?;
            let (cached, floats) = row_cache(seq);
            let args = [ptr(buf), ptr(att), size(b0), size(nb)].into_iter();
            let args = args.chain(attention_args(s)).chain(dropout_args(dropout));
            let cfg = grid(count * seq, floats);
            self.launch(
                &self.kernels.attention_softmax_backward,
                cfg,
                args.chain([cached]),
            )?;
            // dq = dS @ k;  dk = dS^T @ q (parts: dq 4, dk 5, q 0, k 1).
            for (grad, transposed, other) in [(4, false, 1), (5, true, 0)] {
                let ds = square_of(s, buf, transposed);
                let (dst, rhs) = (h.part(grad, b0, false), h.part(other, b0, false));
                self.gemm_batched(dst, false, ds, rhs, seq, seq, hd, count)?;
            }
        }
        self.heads(
            &self.kernels.heads_merge,
            dqkv,
            base + 4 * (4 * rows * e) as u64,
            3,
            s,
        )
    }
}

impl Cuda {
    /// [`Backend::linear_activation_forward`], through cuBLASLt's GELU epilogue when `fused`
    /// and cuBLASLt has an algorithm for it: `Ok(true)` when it ran.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_activation_forward_on(
        &self,
        fused: bool,
        (pre, out): (Tensor, Tensor),
        inp: Tensor,
        weight: Weight,
        bias: Option<Tensor>,
        (act, dropout): (Activation, Option<Dropout>),
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<bool> {
        if fused && rows > 0 && k > 0 && n > 0 {
            debug_assert!(act == Activation::GeluTanh && dropout.is_none());
            let what = "linear_activation_forward";
            let epilogue = Epilogue::Gelu {
                bias: bias.map(|b| f32s(b, n, what)).transpose()?,
                pre: f32s(pre, rows * n, what)?,
            };
            let (out, inp) = (f32s(out, rows * n, what)?, f32s(inp, rows * k, what)?);
            let w = weight_operand(weight, k, n, what)?;
            if self.gemm_epilogue(out, plain(inp), w, epilogue, [rows, k, n])? {
                return Ok(true);
            }
        }
        self.matmul_forward(pre, inp, weight, bias, rows, k, n)?;
        self.activation_forward(out, pre, act, dropout)?;
        Ok(false)
    }

    /// [`Backend::matmul_activation_backward`], through cuBLASLt's GELU-gradient epilogue when
    /// `fused` and cuBLASLt has an algorithm for it: `Ok(true)` when it ran.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_activation_backward_on(
        &self,
        fused: bool,
        (dpre, scratch): (Tensor, Tensor),
        (pre, act, dropout): (Tensor, Activation, Option<Dropout>),
        dweight: Weight,
        dbias: Option<Tensor>,
        grads: GradStore,
        dout: Tensor,
        inp: Tensor,
        weight: Weight,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<bool> {
        let what = "matmul_activation_backward";
        let dout_addr = f32s(dout, rows * n, what)?;
        let fused = if fused && rows > 0 && k > 0 && n > 0 {
            debug_assert!(act == Activation::GeluTanh && dropout.is_none());
            let pre = f32s(pre, rows * k, what)?;
            let wt = weight_transposed(weight, k, n, what)?;
            let dpre = f32s(dpre, rows * k, what)?;
            let epilogue = Epilogue::GeluGrad { pre };
            self.gemm_epilogue(dpre, plain(dout_addr), wt, epilogue, [rows, n, k])?
        } else {
            false
        };
        if !fused {
            let (act, params) = ((pre, act, dropout), (dweight, dbias, grads));
            let operands = (dout, inp, weight);
            crate::separate_matmul_activation_backward(
                self,
                (dpre, scratch),
                act,
                params,
                operands,
                [rows, k, n],
            )?;
            return Ok(false);
        }
        self.param_grads(dweight, dbias, grads, dout_addr, inp, [rows, k, n])?;
        Ok(true)
    }
}

impl Backend for Cuda {
    type Buffer = CudaBuffer;

    fn device(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CudaBuffer> {
        if !matches!(dtype, DType::F32 | DType::I32) {
            bail!("the CUDA backend stores f32 and i32 only, not {dtype:?}");
        }
        let mem = DeviceMemory::zeroed(&self.stream, len * dtype.size())?;
        Ok(CudaBuffer { mem, len, dtype })
    }

    fn upload(&self, dst: Tensor, src: &[f32]) -> Result<()> {
        copy_to_device(
            &self.stream,
            view(dst, DType::F32, src.len(), "upload")?,
            dst,
            src,
        )
    }

    fn upload_i32(&self, dst: Tensor, src: &[i32]) -> Result<()> {
        copy_to_device(
            &self.stream,
            view(dst, DType::I32, src.len(), "upload_i32")?,
            dst,
            src,
        )
    }

    fn download(&self, src: Tensor, dst: &mut [f32]) -> Result<()> {
        let addr = f32s(src, dst.len(), "download")?;
        if src.len() != dst.len() {
            bail!("download: {} elements into {}", src.len(), dst.len());
        }
        if dst.is_empty() {
            return Ok(()); // as in `copy_to_device`
        }
        bind(&self.stream)?;
        // SAFETY: `src` holds dst.len() f32s; the copy waits for every queued kernel (legacy
        // default stream) and completes before returning.
        unsafe { result::memcpy_dtoh_sync(dst, addr) }
            .map_err(|e| anyhow!("copying {} floats from the GPU: {e}", dst.len()))
    }

    fn fill(&self, dst: Tensor, value: f32) -> Result<()> {
        let addr = f32s(dst, 0, "fill")?;
        let n = dst.len();
        self.launch(
            &self.kernels.fill,
            elementwise(n),
            [ptr(addr), size(n), Arg::F32(value)],
        )
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("a GPU kernel failed: {e}"))
    }

    fn set_precision(&self, precision: Precision) -> Result<()> {
        if precision.flops_per_clock_per_sm(self.arch).is_none() {
            bail!(
                "--precision {} needs a GPU with compute capability 8.0 or newer; cuda:{} is sm_{}{}",
                precision.name(),
                self.ordinal,
                self.arch.0,
                self.arch.1
            );
        }
        let index = Precision::ALL.iter().position(|&p| p == precision);
        self.precision
            .store(index.expect("every precision is in ALL"), Ordering::Relaxed);
        Ok(())
    }

    fn precision(&self) -> Precision {
        Precision::ALL[self.precision.load(Ordering::Relaxed)]
    }

    fn peak_flops(&self) -> Option<f64> {
        let per_sm = self.precision().flops_per_clock_per_sm(self.arch)?;
        Some(per_sm * self.sm_count as f64 * self.clock_khz as f64 * 1e3)
    }

    fn matmul_forward(
        &self,
        out: Tensor,
        inp: Tensor,
        weight: Weight,
        bias: Option<Tensor>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let out = f32s(out, rows * n, "matmul_forward out")?;
        let inp = f32s(inp, rows * k, "matmul_forward inp")?;
        let w = weight_operand(weight, k, n, "matmul_forward weight")?;
        let Some(bias) = bias else {
            return self.gemm(out, false, plain(inp), w, rows, k, n);
        };
        let bias = f32s(bias, n, "matmul_forward bias")?;
        let epilogue = Epilogue::Bias(bias);
        if rows > 0
            && k > 0
            && n > 0
            && self.gemm_epilogue(out, plain(inp), w, epilogue, [rows, k, n])?
        {
            return Ok(());
        }
        // Without the epilogue: the bias written first and the product accumulated onto it.
        let args = [ptr(out), ptr(bias), size(rows), size(n)];
        self.launch(&self.kernels.bias_rows, elementwise(rows * n), args)?;
        self.gemm(out, true, plain(inp), w, rows, k, n)
    }

    fn transpose(&self, out: Tensor, inp: Tensor, rows: usize, cols: usize) -> Result<()> {
        let out = f32s(out, rows * cols, "transpose out")?;
        let inp = f32s(inp, rows * cols, "transpose inp")?;
        let args = [ptr(out), ptr(inp), size(rows), size(cols)];
        self.launch(&self.kernels.transpose, elementwise(rows * cols), args)
    }

    fn matmul_backward(
        &self,
        dinp: Option<Tensor>,
        accumulate: bool,
        dweight: Weight,
        dbias: Option<Tensor>,
        grads: GradStore,
        dout: Tensor,
        inp: Tensor,
        weight: Weight,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let dout = f32s(dout, rows * n, "matmul_backward dout")?;
        if let Some(dinp) = dinp {
            let dinp = f32s(dinp, rows * k, "matmul_backward dinp")?;
            let wt = weight_transposed(weight, k, n, "matmul_backward weight")?;
            self.gemm(dinp, accumulate, plain(dout), wt, rows, n, k)?;
        }
        self.param_grads(dweight, dbias, grads, dout, inp, [rows, k, n])
    }

    fn linear_activation_forward(
        &self,
        outs: (Tensor, Tensor),
        inp: Tensor,
        weight: Weight,
        bias: Option<Tensor>,
        (act, dropout): (Activation, Option<Dropout>),
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let fused = self.gelu_epilogue(act, dropout)?;
        let act = (act, dropout);
        self.linear_activation_forward_on(fused, outs, inp, weight, bias, act, rows, k, n)?;
        Ok(())
    }

    fn matmul_activation_backward(
        &self,
        grads_out: (Tensor, Tensor),
        (pre, act, dropout): (Tensor, Activation, Option<Dropout>),
        dweight: Weight,
        dbias: Option<Tensor>,
        grads: GradStore,
        dout: Tensor,
        inp: Tensor,
        weight: Weight,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let fused = self.gelu_epilogue(act, dropout)?;
        let (act, w, d) = ((pre, act, dropout), weight, (dweight, dbias));
        self.matmul_activation_backward_on(
            fused, grads_out, act, d.0, d.1, grads, dout, inp, w, rows, k, n,
        )?;
        Ok(())
    }

    fn layernorm_forward(
        &self,
        out: Tensor,
        mean: Tensor,
        rstd: Tensor,
        inp: Tensor,
        weight: Tensor,
        bias: Tensor,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        let args = [
            ptr(f32s(out, rows * c, "layernorm_forward out")?),
            ptr(f32s(mean, rows, "layernorm_forward mean")?),
            ptr(f32s(rstd, rows, "layernorm_forward rstd")?),
            ptr(f32s(inp, rows * c, "layernorm_forward inp")?),
            ptr(f32s(weight, c, "layernorm_forward weight")?),
            ptr(f32s(bias, c, "layernorm_forward bias")?),
            size(rows),
            size(c),
            Arg::F32(eps),
        ];
        self.launch(&self.kernels.layernorm_forward, grid(rows, 0), args)
    }

    fn layernorm_backward(
        &self,
        dinp: Tensor,
        accumulate: bool,
        dweight: Tensor,
        dbias: Tensor,
        grads: GradStore,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        mean: Tensor,
        rstd: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        let dout = f32s(dout, rows * c, "layernorm_backward dout")?;
        let inp = f32s(inp, rows * c, "layernorm_backward inp")?;
        let mean = f32s(mean, rows, "layernorm_backward mean")?;
        let rstd = f32s(rstd, rows, "layernorm_backward rstd")?;
        let args = [
            ptr(f32s(dinp, rows * c, "layernorm_backward dinp")?),
            ptr(dout),
            ptr(inp),
            ptr(f32s(weight, c, "layernorm_backward weight")?),
            ptr(mean),
            ptr(rstd),
            size(rows),
            size(c),
            Arg::I32(accumulate as i32),
        ];
        self.launch(&self.kernels.layernorm_backward_input, grid(rows, 0), args)?;
        let outs = [
            f32s(dweight, c, "layernorm_backward dweight")?,
            f32s(dbias, c, "layernorm_backward dbias")?,
        ];
        let inputs = [ptr(dout), ptr(inp), ptr(mean), ptr(rstd)];
        let kernel = &self.kernels.layernorm_backward_params_partials;
        self.column_reduce(kernel, &outs, grads, &inputs, rows, c)
    }

    fn attention_saved_len(&self, s: &AttentionShape, dropout: Option<Dropout>) -> usize {
        // An error here (a GPU that failed the self-test) is reported by the attention call.
        if self.flash(s, dropout).unwrap_or(false) {
            FlashSaved::len(s)
        } else {
            s.batch * s.heads * s.seq * s.seq
        }
    }

    fn attention_forward(
        &self,
        out: Tensor,
        att: Tensor,
        qkv: Tensor,
        key_padding: Option<Tensor>,
        shape: &AttentionShape,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let flash = self.flash(shape, dropout)?;
        self.attention_forward_on(flash, out, att, qkv, key_padding, shape, dropout)
    }

    fn attention_backward(
        &self,
        dqkv: Tensor,
        dout: Tensor,
        qkv: Tensor,
        att: Tensor,
        shape: &AttentionShape,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let flash = self.flash(shape, dropout)?;
        self.attention_backward_on(flash, dqkv, dout, qkv, att, shape, dropout)
    }

    fn embedding_forward(
        &self,
        out: Tensor,
        ids: Tensor,
        wte: Tensor,
        wpe: Tensor,
        rows: usize,
        seq: usize,
        c: usize,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        if c == 0 || seq == 0 {
            bail!("embedding_forward: c and seq must be positive");
        }
        let vocab = wte.len() / c;
        let ids = i32s(ids, rows, "embedding_forward ids")?;
        let args = [
            ptr(f32s(out, rows * c, "embedding_forward out")?),
            ptr(ids),
            ptr(f32s(wte, vocab * c, "embedding_forward wte")?),
            ptr(f32s(wpe, seq.min(rows) * c, "embedding_forward wpe")?),
            size(rows),
            size(seq),
            size(c),
            size(vocab),
        ];
        // The first row with a token outside the vocabulary is left in a scratch slot: reading
        // it back makes this call wait for the kernel, as the CPU's check makes it an error.
        let scratch = self.scratch()?;
        let bad_row = scratch.counters();
        bind(&self.stream)?;
        // SAFETY: the slot is 8 bytes of scratch; ordered on the stream before the kernel.
        unsafe { result::memset_d8_async(bad_row, 0xff, 8, self.stream.cu_stream()) }
            .map_err(|e| anyhow!("embedding_forward: {e}"))?;
        let args = args
            .into_iter()
            .chain([ptr(bad_row)])
            .chain(dropout_args(dropout));
        self.launch(&self.kernels.embedding_forward, elementwise(rows * c), args)?;
        let [r] = self.read::<u64, 1>(bad_row)?;
        if r != u64::MAX {
            let [id] = self.read::<i32, 1>(ids + r * 4)?;
            bail!("token id {id} at position {r} is outside the vocabulary of {vocab} tokens");
        }
        Ok(())
    }

    fn embedding_backward(
        &self,
        dwte: Tensor,
        dwpe: Tensor,
        dout: Tensor,
        ids: Tensor,
        rows: usize,
        seq: usize,
        c: usize,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        if c == 0 || seq == 0 {
            bail!("embedding_backward: c and seq must be positive");
        }
        let vocab = dwte.len() / c;
        let args = [
            ptr(f32s(dwte, vocab * c, "embedding_backward dwte")?),
            ptr(f32s(dwpe, seq.min(rows) * c, "embedding_backward dwpe")?),
            ptr(f32s(dout, rows * c, "embedding_backward dout")?),
            ptr(i32s(ids, rows, "embedding_backward ids")?),
            size(rows),
            size(seq),
            size(c),
            size(vocab),
        ];
        let args = args.into_iter().chain(dropout_args(dropout));
        self.launch(
            &self.kernels.embedding_backward,
            elementwise(rows * c),
            args,
        )
    }

    fn attention_decode(
        &self,
        out: Tensor,
        qkv: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        pos: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let e = heads * head_dim;
        let args = [
            ptr(f32s(out, e, "attention_decode out")?),
            ptr(f32s(qkv, 3 * e, "attention_decode qkv")?),
            ptr(f32s(k_cache, (pos + 1) * e, "attention_decode k_cache")?),
            ptr(f32s(v_cache, (pos + 1) * e, "attention_decode v_cache")?),
            size(pos),
            size(heads),
            size(head_dim),
        ];
        let cfg = grid(heads, Self::shared_row(pos + 1, "attention_decode")?);
        self.launch(&self.kernels.attention_decode, cfg, args)
    }

    fn activation_forward(
        &self,
        out: Tensor,
        inp: Tensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let n = out.len();
        let args = [
            ptr(f32s(out, n, "activation_forward out")?),
            ptr(f32s(inp, n, "activation_forward inp")?),
            size(n),
            activation_code(act),
        ];
        let args = args.into_iter().chain(dropout_args(dropout));
        self.launch(&self.kernels.activation_forward, elementwise(n), args)
    }

    fn activation_backward(
        &self,
        dinp: Tensor,
        dout: Tensor,
        inp: Tensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let n = dinp.len();
        let args = [
            ptr(f32s(dinp, n, "activation_backward dinp")?),
            ptr(f32s(dout, n, "activation_backward dout")?),
            ptr(f32s(inp, n, "activation_backward inp")?),
            size(n),
            activation_code(act),
        ];
        let args = args.into_iter().chain(dropout_args(dropout));
        self.launch(&self.kernels.activation_backward, elementwise(n), args)
    }

    fn residual_forward(
        &self,
        out: Tensor,
        resid: Tensor,
        inp: Tensor,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let n = out.len();
        let args = [
            ptr(f32s(out, n, "residual_forward out")?),
            ptr(f32s(resid, n, "residual_forward resid")?),
            ptr(f32s(inp, n, "residual_forward inp")?),
            size(n),
        ];
        let args = args.into_iter().chain(dropout_args(dropout));
        self.launch(&self.kernels.residual_forward, elementwise(n), args)
    }

    fn residual_backward(
        &self,
        dresid: Tensor,
        dinp: Tensor,
        dout: Tensor,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let n = dresid.len();
        let args = [
            ptr(f32s(dresid, n, "residual_backward dresid")?),
            ptr(f32s(dinp, n, "residual_backward dinp")?),
            ptr(f32s(dout, n, "residual_backward dout")?),
            size(n),
        ];
        let args = args.into_iter().chain(dropout_args(dropout));
        self.launch(&self.kernels.residual_backward, elementwise(n), args)
    }

    fn mse_loss(&self, dinp: Tensor, inp: Tensor, target: Tensor) -> Result<f32> {
        let n = inp.len();
        let scratch = self.scratch()?;
        let blocks = n.div_ceil(THREADS).clamp(1, PARTIALS);
        let args = [
            ptr(f32s(dinp, n, "mse_loss dinp")?),
            ptr(f32s(inp, n, "mse_loss inp")?),
            ptr(f32s(target, n, "mse_loss target")?),
            size(n),
            Arg::F32(2.0 / n as f32),
            ptr(scratch.partials()),
        ];
        self.launch(&self.kernels.mse, grid(blocks, 0), args)?;
        let sum = self.total(&scratch, blocks)?;
        Ok((sum / n as f64) as f32)
    }

    fn cross_entropy(
        &self,
        dlogits: Tensor,
        logits: Tensor,
        targets: Tensor,
        rows: usize,
        vocab: usize,
    ) -> Result<f32> {
        let dlogits = f32s(dlogits, rows * vocab, "cross_entropy dlogits")?;
        let logits = f32s(logits, rows * vocab, "cross_entropy logits")?;
        let targets = i32s(targets, rows, "cross_entropy targets")?;
        let scratch = self.scratch()?;
        let counters = scratch.counters();
        let args = [ptr(targets), size(rows), size(vocab), ptr(counters)];
        self.launch(&self.kernels.cross_entropy_count, grid(1, 0), args)?;
        let blocks = rows.clamp(1, PARTIALS);
        let args = [
            ptr(dlogits),
            ptr(logits),
            ptr(targets),
            size(rows),
            size(vocab),
            ptr(counters),
            ptr(scratch.partials()),
        ];
        self.launch(&self.kernels.cross_entropy, grid(blocks, 0), args)?;
        let total = self.total(&scratch, blocks)?;
        let [count, bad_row] = self.read::<u64, 2>(counters)?;
        if bad_row != u64::MAX {
            let [t] = self.read::<i32, 1>(targets + bad_row * 4)?;
            bail!("target {t} at row {bad_row} is outside the vocabulary of {vocab} tokens");
        }
        let inv = if count > 0 { 1.0 / count as f32 } else { 0.0 };
        Ok((total * inv as f64) as f32)
    }

    fn sum_squares(&self, t: Tensor) -> Result<f64> {
        let n = t.len();
        let scratch = self.scratch()?;
        let blocks = n.div_ceil(THREADS).clamp(1, PARTIALS);
        let args = [
            ptr(f32s(t, n, "sum_squares")?),
            size(n),
            ptr(scratch.partials()),
        ];
        self.launch(&self.kernels.sum_squares, grid(blocks, 0), args)?;
        self.total(&scratch, blocks)
    }

    fn scale(&self, t: Tensor, s: f32) -> Result<()> {
        let n = t.len();
        let args = [ptr(f32s(t, n, "scale")?), size(n), Arg::F32(s)];
        self.launch(&self.kernels.scale, elementwise(n), args)
    }

    fn adamw(
        &self,
        param: Tensor,
        grad: Tensor,
        m: Tensor,
        v: Tensor,
        hp: &AdamW,
        mirror: Option<Mirror>,
    ) -> Result<()> {
        let n = param.len();
        let (mirror, rows, cols) = match mirror {
            Some(mi) => {
                if mi.rows * mi.cols != n {
                    bail!(
                        "adamw: a mirror of [{}, {}] for a parameter of {n} elements",
                        mi.rows,
                        mi.cols
                    );
                }
                (f32s(mi.out, n, "adamw mirror")?, mi.rows, mi.cols)
            }
            None => (0, 0, 0), // a null pointer: no mirror
        };
        // The constants exactly as cpu/adamw.rs computes them.
        let t = hp.step as i32;
        let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
        let bc2_sqrt = (1.0 - (hp.beta2 as f64).powi(t)).sqrt() as f32;
        let step_size = (hp.lr as f64 / bc1) as f32;
        let decay = 1.0 - hp.lr * hp.weight_decay;
        let args = [
            ptr(f32s(param, n, "adamw param")?),
            ptr(f32s(grad, n, "adamw grad")?),
            ptr(f32s(m, n, "adamw m")?),
            ptr(f32s(v, n, "adamw v")?),
            size(n),
            Arg::F32(hp.beta1),
            Arg::F32(hp.beta2),
            Arg::F32(hp.eps),
            Arg::F32(bc2_sqrt),
            Arg::F32(step_size),
            Arg::F32(decay),
            ptr(mirror),
            size(rows),
            size(cols),
        ];
        self.launch(&self.kernels.adamw, elementwise(n), args)
    }
}

impl Cuda {
    /// The parameter gradients of `out[rows, n] = inp[rows, k] @ W + bias` given `dout` (a
    /// device address): `dweight` in its own layout and `dbias`, stored as `grads` says.
    fn param_grads(
        &self,
        dweight: Weight,
        dbias: Option<Tensor>,
        grads: GradStore,
        dout: u64,
        inp: Tensor,
        [rows, k, n]: [usize; 3],
    ) -> Result<()> {
        let inp = f32s(inp, rows * k, "matmul_backward inp")?;
        let dw = f32s(dweight.tensor, k * n, "matmul_backward dweight")?;
        let acc = grads.accumulates();
        match dweight.layout {
            // dW[n, k] (+)= dout^T @ inp
            WeightLayout::OutIn => self.gemm(dw, acc, transposed(dout), plain(inp), n, rows, k)?,
            // dW[k, n] (+)= inp^T @ dout
            WeightLayout::InOut => self.gemm(dw, acc, transposed(inp), plain(dout), k, rows, n)?,
        }
        if let Some(dbias) = dbias {
            let dbias = f32s(dbias, n, "matmul_backward dbias")?;
            let kernel = &self.kernels.column_sum_partials;
            self.column_reduce(kernel, &[dbias], grads, &[ptr(dout)], rows, n)?;
        }
        Ok(())
    }

    /// `outs[o][n] (+)=` (as `grads` says) column sums over `rows` rows of `[rows, n]` matrices,
    /// in two levels (see COLUMN_PARAMS in kernels/common.cuh): `kernel`, called with the
    /// partials buffer, then `inputs`, then COLUMN_PARAMS, leaves output `o`'s sum over row
    /// chunk `ch` in `partials[(o * chunks + ch) * cols..][..cols]`; add_column_partials then
    /// adds each output's chunks in order. The chunks depend on `rows` alone, so a result depends on
    /// neither timing, the GPU nor the number of columns.
    fn column_reduce(
        &self,
        kernel: &launch::Kernel,
        outs: &[u64],
        grads: GradStore,
        inputs: &[Arg],
        rows: usize,
        n: usize,
    ) -> Result<()> {
        let guard = lock(&self.column_partials, "the column partials")?;
        let partials = guard.addr();
        let chunk_rows = rows.div_ceil(MAX_ROW_CHUNKS).max(MIN_CHUNK_ROWS);
        let chunks = rows.div_ceil(chunk_rows);
        // Columns whose partials fit the buffer: at least 32768, so more than one slab is rare.
        let slab = COLUMN_PARTIALS / (outs.len() * chunks.max(1));
        for col0 in (0..n).step_by(slab) {
            let cols = slab.min(n - col0);
            let items = cols.div_ceil(32) * chunks;
            let params = [
                size(rows),
                size(n),
                size(col0),
                size(cols),
                size(chunk_rows),
            ];
            let args = std::iter::once(ptr(partials))
                .chain(inputs.iter().copied())
                .chain(params);
            self.launch(kernel, grid(items, 0), args)?;
            for (o, &out) in outs.iter().enumerate() {
                let args = [
                    ptr(out + 4 * col0 as u64),
                    ptr(partials + 4 * (o * chunks * cols) as u64),
                    size(chunks),
                    size(cols),
                    Arg::I32(grads.accumulates() as i32),
                ];
                self.launch(&self.kernels.add_column_partials, elementwise(cols), args)?;
            }
        }
        Ok(())
    }

    /// Adds the `blocks` partial sums a reduction left in scratch and reads the total back.
    fn total(&self, scratch: &Scratch, blocks: usize) -> Result<f64> {
        let args = [ptr(scratch.partials()), size(blocks), ptr(scratch.total())];
        self.launch(&self.kernels.sum_partials, grid(1, 0), args)?;
        let [bits] = self.read::<u64, 1>(scratch.total())?;
        Ok(f64::from_bits(bits))
    }
}

/// Copies `src` to the device view `dst` (address `addr`), which must have exactly its length.
fn copy_to_device<T>(stream: &CudaStream, addr: u64, dst: Tensor, src: &[T]) -> Result<()> {
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
