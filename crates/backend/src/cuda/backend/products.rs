//! Matrix products through cuBLASLt: plain, padded (for rows that are not 16-byte aligned),
//! batched, with bf16 operand copies, and with the bias and GELU epilogues.

use super::*;

impl Cuda {
    /// `dst[m, n] (+)= a[m, k] @ b[k, n]` on packed matrices, any dimension possibly zero.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
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
        // copied to aligned rows anyway (`bf16_copies`).
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
    pub(super) fn gemm_padded(
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
    pub(super) fn copy_rows(
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

    /// `count` strided products (see [`Blas::matmul`]), every dimension nonzero.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_batched(
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
    pub(super) fn product(
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
    /// [`Blas::matmul`]), with bf16 operands in bf16 precision; `Ok(false)`, having done
    /// nothing, when the epilogue cannot be used. Every dimension nonzero.
    pub(super) fn gemm_epilogue(
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
    pub(super) fn gelu_epilogue(&self, act: Activation, dropout: Option<Dropout>) -> Result<bool> {
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
    pub(super) fn bf16_copies(
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
}

/// Row strides (in floats) that keep every row 16-byte aligned, as cuBLASLt's fast kernels need.
pub(super) const ALIGNED_FLOATS: usize = 4;
/// The row stride a misaligned operand is padded to: whole 128-byte lines.
pub(super) const PAD_FLOATS: usize = 32;
/// Products smaller than this many multiply-adds run misaligned, as do those that would read a
/// padded copy fewer than [`PAD_MIN_REUSE`] times per element: the copies would cost more.
pub(super) const PAD_MIN_MACS: usize = 1 << 20;
pub(super) const PAD_MIN_REUSE: usize = 64;

/// The weight `W[k, n]` of a product as an operand: `nn.Linear` stores its transpose.
pub(super) fn weight_operand(w: Weight, k: usize, n: usize, what: &str) -> Result<Operand> {
    Ok(Operand {
        addr: f32s(w.tensor, k * n, what)?,
        transposed: w.layout == WeightLayout::OutIn,
    })
}

/// W^T as the right operand of `dinp[rows, k] = dout[rows, n] @ W^T` (nn.Linear stores W^T).
pub(super) fn weight_transposed(w: Weight, k: usize, n: usize, what: &str) -> Result<Operand> {
    let w = weight_operand(w, k, n, what)?;
    Ok(Operand {
        transposed: !w.transposed,
        ..w
    })
}

/// A packed row-major operand used as `[rows, cols]`: rows of `cols` elements, or of `rows`
/// when it is stored transposed.
pub(super) fn packed(op: Operand, rows: usize, cols: usize) -> Strided {
    Strided {
        op,
        ld: if op.transposed { rows } else { cols },
        stride: 0,
    }
}

pub(super) fn plain(addr: u64) -> Operand {
    Operand {
        addr,
        transposed: false,
    }
}

pub(super) fn transposed(addr: u64) -> Operand {
    Operand {
        addr,
        transposed: true,
    }
}

impl Cuda {
    /// [`Backend::linear_activation_forward`], through cuBLASLt's GELU epilogue when `fused`
    /// and cuBLASLt has an algorithm for it: `Ok(true)` when it ran.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::cuda) fn linear_activation_forward_on(
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
    pub(in crate::cuda) fn matmul_activation_backward_on(
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
