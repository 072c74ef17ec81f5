//! The CPU backend: f32 kernels on host memory, multi-threaded with rayon (the global pool,
//! sized by `--threads`) and the `gemm` crate. Every reduction runs over fixed-size chunks
//! combined in a fixed order, so results do not depend on the thread count.

mod activation;
mod adamw;
mod attention;
mod dropout;
mod embedding;
mod head_gemm;
mod info;
mod layernorm;
mod loss;
mod math;
mod matmul;
mod residual;
mod softmax;
mod transpose;

pub use info::{cpu_info, CpuInfo};

use crate::{
    Activation, AdamW, AttentionShape, Backend, Buffer, DType, Dropout, GradStore, Mirror,
    Precision, Tensor, Weight,
};
use anyhow::{bail, Result};

/// Elements per task in elementwise kernels: large enough to amortise scheduling, a multiple
/// of 4 so that each task starts on a Philox block.
pub(crate) const CHUNK: usize = 1 << 14;

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

pub struct CpuBuffer {
    data: Vec<f32>,
    dtype: DType,
}

impl Buffer for CpuBuffer {
    fn tensor(&self) -> Tensor {
        // SAFETY: the view covers exactly this buffer's elements (f32 or i32, both 4 bytes).
        unsafe { Tensor::from_raw(self.data.as_ptr() as usize, self.data.len(), self.dtype) }
    }
}

/// Reads a view as a slice.
///
/// SAFETY (for all three helpers): views are made by `CpuBuffer::tensor` and `Tensor::slice`,
/// so they point to live host memory of the right length; the model guarantees that an output
/// view never overlaps another view of the same call.
fn f32s<'a>(t: Tensor) -> &'a [f32] {
    debug_assert_eq!(t.dtype(), DType::F32);
    unsafe { std::slice::from_raw_parts(t.addr() as *const f32, t.len()) }
}

#[allow(clippy::mut_from_ref)]
fn f32s_mut<'a>(t: Tensor) -> &'a mut [f32] {
    debug_assert_eq!(t.dtype(), DType::F32);
    unsafe { std::slice::from_raw_parts_mut(t.addr() as *mut f32, t.len()) }
}

#[allow(clippy::mut_from_ref)]
fn i32s_mut<'a>(t: Tensor) -> &'a mut [i32] {
    debug_assert_eq!(t.dtype(), DType::I32);
    unsafe { std::slice::from_raw_parts_mut(t.addr() as *mut i32, t.len()) }
}

fn i32s<'a>(t: Tensor) -> &'a [i32] {
    debug_assert_eq!(t.dtype(), DType::I32);
    unsafe { std::slice::from_raw_parts(t.addr() as *const i32, t.len()) }
}

impl Backend for Cpu {
    type Buffer = CpuBuffer;

    fn device(&self) -> String {
        "cpu".into()
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CpuBuffer> {
        if !matches!(dtype, DType::F32 | DType::I32) {
            bail!("the CPU backend stores f32 and i32 only, not {dtype:?}");
        }
        let mut data = Vec::new();
        if data.try_reserve_exact(len).is_err() {
            bail!(
                "cannot allocate {:.1} MiB of host memory",
                (len * 4) as f64 / 1048576.0
            );
        }
        data.resize(len, 0.0);
        Ok(CpuBuffer { data, dtype })
    }

    fn upload(&self, dst: Tensor, src: &[f32]) -> Result<()> {
        f32s_mut(dst).copy_from_slice(src);
        Ok(())
    }

    fn upload_i32(&self, dst: Tensor, src: &[i32]) -> Result<()> {
        i32s_mut(dst).copy_from_slice(src);
        Ok(())
    }

    fn download(&self, src: Tensor, dst: &mut [f32]) -> Result<()> {
        dst.copy_from_slice(f32s(src));
        Ok(())
    }

    fn fill(&self, dst: Tensor, value: f32) -> Result<()> {
        use rayon::prelude::*;
        f32s_mut(dst)
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.fill(value));
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn set_precision(&self, precision: Precision) -> Result<()> {
        if precision != Precision::Fp32 {
            bail!(
                "--precision {}: the CPU backend computes in fp32; use --precision fp32",
                precision.name()
            );
        }
        Ok(())
    }

    fn precision(&self) -> Precision {
        Precision::Fp32
    }

    fn peak_flops(&self) -> Option<f64> {
        None
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
        let w = (f32s(weight.tensor), weight.layout);
        matmul::forward(f32s_mut(out), f32s(inp), w, bias.map(f32s), rows, k, n);
        Ok(())
    }

    fn transpose(&self, out: Tensor, inp: Tensor, rows: usize, cols: usize) -> Result<()> {
        transpose::transpose(f32s_mut(out), f32s(inp), rows, cols);
        Ok(())
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
        matmul::backward(
            dinp.map(f32s_mut),
            accumulate,
            (f32s_mut(dweight.tensor), dweight.layout),
            dbias.map(f32s_mut),
            grads.accumulates(),
            f32s(dout),
            f32s(inp),
            (f32s(weight.tensor), weight.layout),
            rows,
            k,
            n,
        );
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
        layernorm::forward(
            f32s_mut(out),
            f32s_mut(mean),
            f32s_mut(rstd),
            f32s(inp),
            f32s(weight),
            f32s(bias),
            rows,
            c,
            eps,
        );
        Ok(())
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
        layernorm::backward(
            f32s_mut(dinp),
            accumulate,
            f32s_mut(dweight),
            f32s_mut(dbias),
            grads.accumulates(),
            f32s(dout),
            f32s(inp),
            f32s(weight),
            f32s(mean),
            f32s(rstd),
            rows,
            c,
        );
        Ok(())
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
        attention::forward(
            f32s_mut(out),
            f32s_mut(att),
            f32s(qkv),
            key_padding.map(f32s),
            shape,
            dropout,
        );
        Ok(())
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
        attention::backward(
            f32s_mut(dqkv),
            f32s(dout),
            f32s(qkv),
            f32s(att),
            shape,
            dropout,
        );
        Ok(())
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
        let (k, v) = (f32s_mut(k_cache), f32s_mut(v_cache));
        attention::decode(f32s_mut(out), f32s(qkv), k, v, pos, heads, head_dim);
        Ok(())
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
        let ids = i32s(ids);
        embedding::forward(
            f32s_mut(out),
            ids,
            f32s(wte),
            f32s(wpe),
            rows,
            seq,
            c,
            dropout,
        )
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
        let (dwte, dwpe, dout) = (f32s_mut(dwte), f32s_mut(dwpe), f32s(dout));
        embedding::backward(dwte, dwpe, dout, i32s(ids), rows, seq, c, dropout);
        Ok(())
    }

    fn activation_forward(
        &self,
        out: Tensor,
        inp: Tensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        activation::forward(f32s_mut(out), f32s(inp), act, dropout);
        Ok(())
    }

    fn activation_backward(
        &self,
        dinp: Tensor,
        dout: Tensor,
        inp: Tensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        activation::backward(f32s_mut(dinp), f32s(dout), f32s(inp), act, dropout);
        Ok(())
    }

    fn residual_forward(
        &self,
        out: Tensor,
        resid: Tensor,
        inp: Tensor,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        residual::forward(f32s_mut(out), f32s(resid), f32s(inp), dropout);
        Ok(())
    }

    fn residual_backward(
        &self,
        dresid: Tensor,
        dinp: Tensor,
        dout: Tensor,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        residual::backward(f32s_mut(dresid), f32s_mut(dinp), f32s(dout), dropout);
        Ok(())
    }

    fn mse_loss(&self, dinp: Tensor, inp: Tensor, target: Tensor) -> Result<f32> {
        Ok(loss::mse(f32s_mut(dinp), f32s(inp), f32s(target)))
    }

    fn cross_entropy(
        &self,
        dlogits: Tensor,
        logits: Tensor,
        targets: Tensor,
        rows: usize,
        vocab: usize,
    ) -> Result<f32> {
        loss::cross_entropy(f32s_mut(dlogits), f32s(logits), i32s(targets), rows, vocab)
    }

    fn sum_squares(&self, t: Tensor) -> Result<f64> {
        Ok(adamw::sum_squares(f32s(t)))
    }

    fn scale(&self, t: Tensor, s: f32) -> Result<()> {
        use rayon::prelude::*;
        f32s_mut(t)
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|x| *x *= s));
        Ok(())
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
        let mirror = mirror.map(|mi| (f32s_mut(mi.out), mi.rows, mi.cols));
        adamw::step(
            f32s_mut(param),
            f32s(grad),
            f32s_mut(m),
            f32s_mut(v),
            hp,
            mirror,
        );
        Ok(())
    }
}

/// Sums `f(chunk)` over fixed-size chunks of `0..n` in parallel, then adds the partial sums in
/// chunk order: the result is the same for every thread count.
pub(crate) fn deterministic_sum(
    n: usize,
    chunk: usize,
    f: impl Fn(std::ops::Range<usize>) -> f64 + Sync,
) -> f64 {
    use rayon::prelude::*;
    let chunks = n.div_ceil(chunk);
    // Small fixed-size stack array of partials per group keeps the step allocation-free.
    const GROUP: usize = 256;
    let mut total = 0.0;
    for g in (0..chunks).step_by(GROUP) {
        let mut partial = [0.0f64; GROUP];
        let m = GROUP.min(chunks - g);
        partial[..m].par_iter_mut().enumerate().for_each(|(i, p)| {
            let c = g + i;
            *p = f(c * chunk..((c + 1) * chunk).min(n));
        });
        total += partial[..m].iter().sum::<f64>();
    }
    total
}

/// A raw pointer that may cross threads: kernels use it where parallel tasks write disjoint
/// parts of one output (each attention head its own columns).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method, not field access, so closures capture the `Sync` wrapper, not the raw pointer.
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Asserts `got` and `want` agree elementwise within 1e-6 (relative above 1): for the tests of
/// kernels with an AVX-512 form and a portable one, which round differently.
#[cfg(test)]
fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{i}: {a} vs {b}");
    }
}

/// `simd_fn!(name => inner(args) -> ret)` defines `name(args) -> ret`, which runs `inner` (an
/// `#[inline(always)]` function of plain iterator code) compiled for the widest SIMD the CPU has:
/// AVX-512, else AVX2 + FMA, else the baseline, chosen at run time. Loops are written once and
/// the compiler vectorises them for each level. A named function, not a closure handed to a
/// generic wrapper: a closure is compiled once, for the baseline, unless it is inlined, and
/// larger ones are not.
macro_rules! simd_fn {
    ($vis:vis $name:ident => $inner:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $inner($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $inner($($arg),*)
        }
    };
}
pub(crate) use simd_fn;
