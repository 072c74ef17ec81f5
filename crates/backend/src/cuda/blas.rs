//! Matrix products on cuBLASLt, f32 results with f32 accumulation. In `--precision fp32`
//! (`CUBLAS_COMPUTE_32F`, not TF32) results agree with the CPU's to rounding. In bf16 the backend
//! hands single products bf16 copies of their operands (cuBLASLt runs f32 operands with
//! `_FAST_16BF` on TF32 kernels, at half the bf16 rate, as the first H200 profile showed); the
//! other low precisions, and batched products, round f32 operands on the tensor cores (see
//! [`compute_type`]).
//!
//! flint's matrices are row-major and cuBLASLt's column-major. A row-major `X[r, c]` is the
//! column-major `X^T[c, r]`, so `C = A @ B` is computed as `C^T = B^T @ A^T`: cuBLASLt's first
//! operand is our `B`, its second our `A`, and each transposed operand is a transpose flag,
//! never a copy.

use super::backend::DeviceMemory;
use crate::Precision;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublaslt::{result, result::CublasError, sys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// Workspace for cuBLASLt's split-K and other algorithms: 32 MiB is NVIDIA's recommendation
/// for Hopper (4 MiB suffices before it).
pub(super) const WORKSPACE_BYTES: usize = 32 << 20;

/// A row-major operand of a product, by device address: stored as used, or (`transposed`) as
/// its transpose.
#[derive(Clone, Copy, Debug)]
pub(super) struct Operand {
    pub addr: u64,
    pub transposed: bool,
}

/// An operand as it lies in memory: `ld` elements between consecutive stored rows, and `stride`
/// elements between the matrices of consecutive products of a batch (see [`Blas::matmul`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Strided {
    pub op: Operand,
    pub ld: usize,
    pub stride: usize,
}

pub(super) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceMemory,
    /// The algorithm cuBLASLt's heuristic chose for each distinct product (see [`AlgoKey`]): a
    /// training step makes hundreds of products of a few dozen kinds, and the heuristic query
    /// costs far more host time than building the descriptors, which are therefore still made
    /// per call (small host structs; caching them too would mean sharing raw handles between
    /// threads for little gain). NVIDIA documents `cublasLtMatmulAlgo_t` as plain data that may
    /// be stored and reused with the same library. The map grows by one small entry per kind of
    /// product a run makes, so it stays tiny.
    /// `None` where the heuristic has no algorithm (for a product with an epilogue, which is
    /// then done without it).
    algos: Mutex<HashMap<AlgoKey, Option<sys::cublasLtMatmulAlgo_t>>>,
}

/// Everything the heuristic query is given: the compute type, and each operand's layout (its
/// transpose flag, leading dimension, batch stride) and promised alignment, with the product's
/// dimensions and batch count, and the epilogue with its pointers' alignment. The workspace is
/// always the same one, and beta (`accumulate`) is not an input of the query.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct AlgoKey {
    precision: Precision,
    /// The operands a and b are bf16 in memory (see [`Blas::matmul`]).
    bf16: bool,
    /// `(transposed, ld, stride, alignment)` of a, b and dst.
    operands: [(bool, usize, usize, u32); 3],
    dims: [usize; 4],
    /// The epilogue's code and the alignments of its bias and auxiliary matrix (the heuristic
    /// reads the pointers).
    epilogue: Option<(u32, u32, u32)>,
}

impl AlgoKey {
    fn new(
        p: Precision,
        bf16: bool,
        (a, b, dst): (Strided, Strided, Strided),
        dims: [usize; 4],
        epilogue: Option<Epilogue>,
    ) -> AlgoKey {
        let count = dims[3];
        let op = |s: Strided, bytes| {
            let align = batch_alignment(s, count, bytes);
            (s.op.transposed, s.ld, s.stride, align)
        };
        let input = element_bytes(bf16);
        AlgoKey {
            precision: p,
            bf16,
            operands: [op(a, input), op(b, input), op(dst, 4)],
            dims,
            epilogue: epilogue.map(|e| {
                let align = |addr: Option<u64>| addr.map_or(0, alignment);
                (e.code() as u32, align(e.bias()), align(e.aux()))
            }),
        }
    }
}

// SAFETY: a cuBLASLt handle holds no per-call state and may be used from any thread; all
// products are queued on one stream, so calls never share the workspace at the same time.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once; an error here cannot be
        // reported and only leaks the handle.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// What kind of product [`Blas::matmul`] makes.
#[derive(Clone, Copy)]
pub(super) struct Product {
    pub precision: Precision,
    /// The operands a and b are bf16 in memory.
    pub bf16: bool,
    pub epilogue: Option<Epilogue>,
}

/// Work cuBLASLt does on a product's result as it stores it, instead of a kernel reading it back
/// (addresses are device addresses of f32). Its GELU is the tanh approximation, GPT-2's.
#[derive(Clone, Copy, Debug)]
pub(super) enum Epilogue {
    /// `dst = result + bias[n]`.
    Bias(u64),
    /// `pre = result (+ bias[n])` stored at `pre`, laid out as dst, and `dst = gelu(pre)`.
    Gelu { bias: Option<u64>, pre: u64 },
    /// `dst = gelu'(pre) * result`, `pre` laid out as dst.
    GeluGrad { pre: u64 },
}

impl Epilogue {
    fn code(self) -> sys::cublasLtEpilogue_t {
        use sys::cublasLtEpilogue_t as E;
        match self {
            Epilogue::Bias(_) => E::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::Gelu { bias: None, .. } => E::CUBLASLT_EPILOGUE_GELU_AUX,
            Epilogue::Gelu { bias: Some(_), .. } => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
            Epilogue::GeluGrad { .. } => E::CUBLASLT_EPILOGUE_DGELU,
        }
    }

    fn bias(self) -> Option<u64> {
        match self {
            Epilogue::Bias(bias) => Some(bias),
            Epilogue::Gelu { bias, .. } => bias,
            Epilogue::GeluGrad { .. } => None,
        }
    }

    /// The auxiliary matrix: GELU's input.
    fn aux(self) -> Option<u64> {
        match self {
            Epilogue::Bias(_) => None,
            Epilogue::Gelu { pre, .. } | Epilogue::GeluGrad { pre } => Some(pre),
        }
    }

    /// Whether cuBLASLt can run it on a product whose row-major dst has rows `ld` elements
    /// apart: a bias and an auxiliary matrix 16-byte aligned (biases are views packed back to
    /// back in the parameter buffer, and cuBLASLt's epilogue kernels fault on misaligned ones;
    /// its alignment preferences cover only A to D), and the auxiliary matrix's leading
    /// dimension, dst's, a multiple of 8 as cuBLASLt requires.
    pub(super) fn fits(self, ld: usize) -> bool {
        let aligned = |addr: Option<u64>| addr.is_none_or(|a| a.is_multiple_of(16));
        aligned(self.bias())
            && aligned(self.aux())
            && (self.aux().is_none() || ld.is_multiple_of(8))
    }
}

/// A cuBLASLt descriptor, destroyed on drop.
struct Owned<T: Copy> {
    raw: T,
    destroy: unsafe fn(T) -> Result<(), CublasError>,
}

impl<T: Copy> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: `raw` was created by the matching create call and is destroyed once.
        let _ = unsafe { (self.destroy)(self.raw) };
    }
}

impl Blas {
    /// Needs cuBLASLt loaded (the caller checks `libs::loaded`) and the context bound;
    /// `workspace` must hold [`WORKSPACE_BYTES`].
    pub(super) fn new(workspace: DeviceMemory) -> Result<Blas> {
        let handle = result::create_handle().context("cublasLtCreate")?;
        Ok(Blas {
            handle,
            workspace,
            algos: Mutex::new(HashMap::new()),
        })
    }

    /// Whether cuBLASLt has already refused this product (no algorithm, or a refusal at
    /// launch, remembered per kind of product): the caller then skips preparing its operands.
    pub(super) fn refused(
        &self,
        Product {
            precision,
            bf16,
            epilogue,
        }: Product,
        ops: (Strided, Strided, Strided),
        dims: [usize; 4],
    ) -> Result<bool> {
        let algos = self
            .algos
            .lock()
            .map_err(|_| anyhow!("a thread panicked while choosing a cuBLASLt algorithm"))?;
        let key = AlgoKey::new(precision, bf16, ops, dims, epilogue);
        Ok(matches!(algos.get(&key), Some(None)))
    }

    /// `dst[m, n] (+)= epilogue(a[m, k] @ b[k, n])`, row-major, `count` times: product `i` reads
    /// and writes each matrix `i * stride` elements past its first; `+=` when `accumulate`
    /// (never with an epilogue). `dst` must not be transposed. All dimensions and `count` must
    /// be nonzero. `a` and `b` are f32, or bf16 when `op.bf16` (copies the backend rounded,
    /// multiplied as they are in fp32 accumulation); `dst` is f32. `Ok(false)`, having done
    /// nothing, when cuBLASLt cannot make this product with bf16 operands or the epilogue
    /// (which must [fit](Epilogue::fits) dst; see [`Epilogue`]): no algorithm from the
    /// heuristic, or one that then refuses the product. The caller then does without them.
    pub(super) fn matmul(
        &self,
        stream: cudarc::driver::sys::CUstream,
        Product {
            precision,
            bf16,
            epilogue,
        }: Product,
        (a, b, dst): (Strided, Strided, Strided),
        accumulate: bool,
        [m, k, n, count]: [usize; 4],
    ) -> Result<bool> {
        let shape = || {
            format!(
                "cuBLASLt {} product [{m}, {k}] @ [{k}, {n}] (x{count})",
                precision.name()
            )
        };
        if epilogue.is_some_and(|e| !e.fits(dst.ld)) {
            return Ok(false);
        }
        if dst.op.transposed {
            bail!("{}: the destination is transposed", shape());
        }
        let desc = Owned {
            raw: result::create_matmul_desc(
                // bf16 operands are multiplied as they are; f32 ones as the precision says.
                if bf16 {
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
                } else {
                    compute_type(precision)
                },
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .with_context(shape)?,
            destroy: result::destroy_matmul_desc,
        };
        use sys::cublasLtMatmulDescAttributes_t::{
            CUBLASLT_MATMUL_DESC_TRANSA as TRANSA, CUBLASLT_MATMUL_DESC_TRANSB as TRANSB,
        };
        // cublasOperation_t: 0 = N, 1 = T.
        let (trans_a, trans_b) = (b.op.transposed as i32, a.op.transposed as i32);
        // SAFETY: the descriptor is live; each attribute is an int32 cublasOperation_t.
        unsafe {
            set_desc(desc.raw, TRANSA, &trans_a).with_context(shape)?;
            set_desc(desc.raw, TRANSB, &trans_b).with_context(shape)?;
        }
        if let Some(epilogue) = epilogue {
            use sys::cublasLtMatmulDescAttributes_t::{
                CUBLASLT_MATMUL_DESC_BIAS_POINTER as BIAS_POINTER,
                CUBLASLT_MATMUL_DESC_EPILOGUE as EPILOGUE,
                CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD as AUX_LD,
                CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER as AUX_POINTER,
            };
            let code = epilogue.code() as u32;
            // SAFETY: the descriptor is live; the epilogue is a uint32 cublasLtEpilogue_t.
            unsafe { set_desc(desc.raw, EPILOGUE, &code) }.with_context(shape)?;
            if let Some(bias) = epilogue.bias() {
                // Row-major dst[m, n] is cuBLASLt's column-major [n, m]: its n rows are our
                // columns, which is what the epilogue broadcasts a bias vector over.
                let pointer = bias as *const c_void;
                // SAFETY: the descriptor is live; the bias pointer is a device address of n
                // f32 (D's type, the default bias type).
                unsafe { set_desc(desc.raw, BIAS_POINTER, &pointer) }.with_context(shape)?;
            }
            if let Some(aux) = epilogue.aux() {
                // GELU's input, f32 (D's type, the default) and laid out as D.
                let (pointer, ld) = (aux as *const c_void, dst.ld as i64);
                // SAFETY: the descriptor is live; the pointer is a device address of a matrix
                // laid out as D, and the leading dimension an int64, as cuBLASLt documents.
                unsafe {
                    set_desc(desc.raw, AUX_POINTER, &pointer).with_context(shape)?;
                    set_desc(desc.raw, AUX_LD, &ld).with_context(shape)?;
                }
            }
        }
        let layout_a = layout(b, k, n, count, bf16).with_context(shape)?;
        let layout_b = layout(a, m, k, count, bf16).with_context(shape)?;
        let layout_c = layout(dst, m, n, count, false).with_context(shape)?;
        let mut algos = self
            .algos
            .lock()
            .map_err(|_| anyhow!("a thread panicked while choosing a cuBLASLt algorithm"))?;
        let key = AlgoKey::new(precision, bf16, (a, b, dst), [m, k, n, count], epilogue);
        // A product that may do without cuBLASLt's choice: the epilogue, or bf16 operands.
        let optional = epilogue.is_some() || bf16;
        let algo = match algos.get(&key) {
            Some(algo) => *algo,
            None => {
                let pref = self
                    .preference(a, b, dst, count, bf16)
                    .with_context(shape)?;
                // SAFETY: all descriptors are live.
                let heuristic = unsafe {
                    result::get_matmul_algo_heuristic(
                        self.handle,
                        desc.raw,
                        layout_a.raw,
                        layout_b.raw,
                        layout_c.raw,
                        layout_c.raw,
                        pref.raw,
                    )
                };
                let algo = match heuristic {
                    Ok(h) => Some(h.algo),
                    // Not every product has an algorithm with the epilogue or bf16 operands.
                    Err(_) if optional => None,
                    Err(e) => return Err(e).with_context(|| format!("{}: no algorithm", shape())),
                };
                algos.insert(key, algo);
                algo
            }
        };
        drop(algos);
        let Some(algo) = algo else {
            return Ok(false);
        };
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        // SAFETY: the descriptors are live and describe the operands, which the backend checked
        // to be f32 views of sufficient length; with beta 0, C is not read. The workspace
        // outlives the call (it is freed only after the stream is synchronised).
        let done = unsafe {
            result::matmul(
                self.handle,
                desc.raw,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                b.op.addr as *const c_void,
                layout_a.raw,
                a.op.addr as *const c_void,
                layout_b.raw,
                dst.op.addr as *const c_void,
                layout_c.raw,
                dst.op.addr as *mut c_void,
                layout_c.raw,
                &algo,
                self.workspace.addr() as *mut c_void,
                WORKSPACE_BYTES,
                stream as sys::cudaStream_t,
            )
        };
        match done {
            Ok(()) => Ok(true),
            // The epilogue or the bf16 operands refused at launch (cuBLASLt checks before
            // queuing anything): the caller's fallback from now on for this shape.
            Err(_) if optional => {
                let mut algos = self.algos.lock().map_err(|_| {
                    anyhow!("a thread panicked while choosing a cuBLASLt algorithm")
                })?;
                algos.insert(key, None);
                Ok(false)
            }
            Err(e) => Err(e).with_context(shape),
        }
    }

    /// The search preferences: our workspace, and the operands' actual alignment (cuBLASLt
    /// assumes 256-byte aligned pointers otherwise, and views into a buffer may be less). In a
    /// batch, each matrix after the first is `stride` elements further, so the promise is what
    /// every one of their addresses satisfies.
    fn preference(
        &self,
        a: Strided,
        b: Strided,
        dst: Strided,
        count: usize,
        bf16: bool,
    ) -> Result<Owned<sys::cublasLtMatmulPreference_t>> {
        let input = element_bytes(bf16);
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let pref = Owned {
            raw: result::create_matmul_pref()?,
            destroy: result::destroy_matmul_pref,
        };
        let workspace = WORKSPACE_BYTES as u64;
        let attrs = [
            (
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                batch_alignment(b, count, input),
            ),
            (
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                batch_alignment(a, count, input),
            ),
            (
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                batch_alignment(dst, count, 4),
            ),
            (
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                batch_alignment(dst, count, 4),
            ),
        ];
        // SAFETY: the preference is live; the workspace size is a uint64 and each alignment a
        // uint32, as cuBLASLt documents these attributes.
        unsafe {
            result::set_matmul_pref_attribute(
                pref.raw,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )?;
            for (attr, value) in &attrs {
                result::set_matmul_pref_attribute(
                    pref.raw,
                    *attr,
                    (value as *const u32).cast(),
                    std::mem::size_of::<u32>(),
                )?;
            }
        }
        Ok(pref)
    }
}

/// # Safety
/// `desc` must be live and `T` the attribute's type.
unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<(), CublasError> {
    result::set_matmul_desc_attribute(
        desc,
        attr,
        (value as *const T).cast(),
        std::mem::size_of::<T>(),
    )
}

/// The column-major layout of a row-major operand used as `[rows, cols]`: stored row-major as
/// `[rows, cols]` (or `[cols, rows]` when transposed), which column-major reads as its
/// transpose, with leading dimension `op.ld`; `count` of them `op.stride` elements apart.
fn layout(
    op: Strided,
    rows: usize,
    cols: usize,
    count: usize,
    bf16: bool,
) -> Result<Owned<sys::cublasLtMatrixLayout_t>> {
    let (stored_rows, stored_cols) = if op.op.transposed {
        (cols, rows)
    } else {
        (rows, cols)
    };
    if stored_rows == 0 || stored_cols == 0 || count == 0 {
        bail!("empty matrix");
    }
    if op.ld < stored_cols {
        bail!("rows of {stored_cols} elements {} apart", op.ld);
    }
    let layout = Owned {
        raw: result::create_matrix_layout(
            if bf16 {
                sys::cudaDataType_t::CUDA_R_16BF
            } else {
                sys::cudaDataType_t::CUDA_R_32F
            },
            stored_cols as u64,
            stored_rows as u64,
            op.ld as i64,
        )?,
        destroy: result::destroy_matrix_layout,
    };
    if count > 1 {
        use sys::cublasLtMatrixLayoutAttribute_t::{
            CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT as COUNT,
            CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET as OFFSET,
        };
        let (count, stride) = (i32::try_from(count)?, op.stride as i64);
        // SAFETY: the layout is live; cuBLASLt documents the batch count as an int32 and the
        // strided batch offset as an int64.
        unsafe {
            result::set_matrix_layout_attribute(
                layout.raw,
                COUNT,
                (&count as *const i32).cast(),
                std::mem::size_of::<i32>(),
            )?;
            result::set_matrix_layout_attribute(
                layout.raw,
                OFFSET,
                (&stride as *const i64).cast(),
                std::mem::size_of::<i64>(),
            )?;
        }
    }
    Ok(layout)
}

/// Bytes per element of an operand.
fn element_bytes(bf16: bool) -> u64 {
    if bf16 {
        2
    } else {
        4
    }
}

/// The alignment every matrix of a batch of `count` has: that of the first, and of the stride
/// between them (`bytes` per element) when there are several.
fn batch_alignment(op: Strided, count: usize, bytes: u64) -> u32 {
    let first = alignment(op.op.addr);
    if count > 1 {
        first.min(alignment(op.stride as u64 * bytes))
    } else {
        first
    }
}

/// The largest power of two, up to 256, that divides `addr`.
fn alignment(addr: u64) -> u32 {
    1 << addr.trailing_zeros().min(8)
}

/// fp32 storage in every precision; the low-precision modes round the operands on the matrix
/// units and accumulate in fp32 (cuBLAS's `_FAST_` compute types), which is what mixed precision
/// asks of a matmul while the master weights and optimizer state stay fp32.
fn compute_type(p: Precision) -> sys::cublasComputeType_t {
    use sys::cublasComputeType_t as C;
    match p {
        Precision::Fp32 => C::CUBLAS_COMPUTE_32F,
        Precision::Tf32 => C::CUBLAS_COMPUTE_32F_FAST_TF32,
        Precision::Bf16 => C::CUBLAS_COMPUTE_32F_FAST_16BF,
        Precision::Fp16 => C::CUBLAS_COMPUTE_32F_FAST_16F,
    }
}

#[cfg(test)]
mod tests {
    use super::{alignment, batch_alignment, Operand, Strided};

    #[test]
    fn alignment_is_the_largest_power_of_two_dividing_the_address_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1004), 4);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0), 256);
    }

    #[test]
    fn a_batch_promises_the_alignment_of_every_matrix() {
        let head = |stride| Strided {
            op: Operand {
                addr: 0x1000,
                transposed: false,
            },
            ld: 96,
            stride,
        };
        // Heads 8 floats apart: 32 bytes.
        assert_eq!(batch_alignment(head(8), 3, 4), 32);
        assert_eq!(batch_alignment(head(64), 12, 4), 256);
        // bf16 heads 8 elements apart: 16 bytes.
        assert_eq!(batch_alignment(head(8), 3, 2), 16);
        // A single product only needs its own address aligned.
        assert_eq!(batch_alignment(head(8), 1, 4), 256);
    }
}
