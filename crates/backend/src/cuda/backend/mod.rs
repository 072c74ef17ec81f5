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

mod attention;
mod memory;
mod products;
mod reduce;

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

use attention::FlashSaved;
use cudarc::driver::{result, CudaContext, CudaStream, LaunchConfig};
pub use memory::CudaBuffer;
pub(in crate::cuda) use memory::DeviceMemory;
use memory::{bind, copy_to_device, Scratch, Workspace};
use products::{plain, transposed, weight_operand, weight_transposed};

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

pub struct Cuda {
    kernels: Kernels,
    blas: Blas,
    /// Locked for the whole of a call that reads results back through it.
    scratch: Mutex<Scratch>,
    /// Locked for the whole of an attention call.
    attention_scratch: Mutex<Workspace>,
    /// Locked for the whole of a padded product (see [`Cuda::gemm_padded`]).
    pad_workspace: Mutex<Workspace>,
    /// bf16 copies of a product's operands (see [`Cuda::bf16_copies`]).
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
        // Deprecated in CUDA 13's headers: without it only the MFU is unknown (0 = unknown).
        let clock_khz = attribute(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE, "clock rate").unwrap_or(0);
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
}

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

/// `mutex` locked; a poisoned one (a thread panicked holding it) is an error naming `what`.
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

/// The kernels' activation code (`activate` in elementwise.cu).
fn activation_code(act: Activation) -> Arg {
    Arg::I32(match act {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
    })
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
        if self.clock_khz <= 0 {
            return None;
        }
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
