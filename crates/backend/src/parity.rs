//! Parity of two backends: every [`Backend`] call, on the same random inputs uploaded to both,
//! compared output by output. The CPU backend is the reference; `tests/cuda_parity.rs` checks
//! the CUDA backend against it on a GPU machine.
//!
//! Every output buffer, `=` and `+=` alike, starts with the same random values on both sides,
//! so a kernel that accumulates where it should overwrite (or the reverse) fails.

use crate::{
    Activation, AdamW, AttentionShape, Backend, Buffer, DType, Dropout, GradStore, Mirror,
    Precision, Tensor, Weight, WeightLayout,
};
use anyhow::{Context, Result};
use GradStore::{Accumulate, Write};
use WeightLayout::{InOut, OutIn};

/// One compared output of one call.
#[derive(Clone, Debug)]
pub struct ParityRow {
    /// The call, its configuration and the output, e.g. `matmul_forward OutIn +bias: out`.
    pub kernel: String,
    pub dtype: &'static str,
    /// See [`max_rel_err`].
    pub max_rel_err: f64,
    pub threshold: f64,
    pub passed: bool,
}

/// `max_i |a_i - b_i| / max(max_i |a_i|, 1e-6)`, with `a` the reference: the largest difference
/// relative to the reference's largest magnitude (not element by element, which would blow up
/// on outputs near zero). Infinite when the lengths differ or either side holds a NaN or an
/// infinity, so such a comparison never passes.
pub fn max_rel_err(reference: &[f32], tested: &[f32]) -> f64 {
    if reference.len() != tested.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut scale) = (0.0f64, 0.0f64);
    for (&a, &b) in reference.iter().zip(tested) {
        if !a.is_finite() || !b.is_finite() {
            return f64::INFINITY;
        }
        diff = diff.max((a as f64 - b as f64).abs());
        scale = scale.max((a as f64).abs());
    }
    diff / scale.max(1e-6)
}

type Case<A, B> = fn(&mut Harness<A, B>) -> Result<()>;

/// Runs every case on `reference` and `tested` (in fp32) with inputs drawn from `seed`, then
/// the matrix products again (the NaN one included) in every lower precision `tested` supports
/// (tf32, bf16, fp16),
/// each against its own threshold ([`Precision::tolerance`]). A call that fails on either side
/// is a failed row carrying the error. `tested` is left in fp32.
pub fn run<A: Backend, B: Backend>(reference: &A, tested: &B, seed: u64) -> Result<Vec<ParityRow>> {
    let mut h = Harness {
        reference,
        tested,
        rng: SplitMix64(seed),
        buffers: (Vec::new(), Vec::new()),
        rows: Vec::new(),
        precision: Precision::Fp32,
    };
    let cases: [(&str, Case<A, B>); 16] = [
        ("matmul", matmul),
        ("nan_input", nan_input),
        ("linear_activation", linear_activation),
        ("transpose", transpose),
        ("layernorm", layernorm),
        ("attention", attention),
        ("attention_decode", attention_decode),
        ("embedding", embedding),
        ("activation", activation),
        ("residual", residual),
        ("mse_loss", mse_loss),
        ("cross_entropy", cross_entropy),
        ("sum_squares", sum_squares),
        ("scale", scale),
        ("fill", fill),
        ("adamw", adamw),
    ];
    tested.set_precision(Precision::Fp32)?;
    for (name, case) in cases {
        h.run_case(name, case);
    }
    for p in [Precision::Tf32, Precision::Bf16, Precision::Fp16] {
        if tested.set_precision(p).is_ok() {
            h.precision = p;
            h.run_case("matmul", matmul);
            h.run_case("linear_activation", linear_activation);
            h.run_case("nan_input", nan_input);
            if p == Precision::Bf16 {
                h.run_case("attention_products", attention_products);
            }
        }
    }
    tested.set_precision(Precision::Fp32)?;
    Ok(h.rows)
}

/// The rows as an aligned text table, failures marked.
pub fn table(rows: &[ParityRow]) -> String {
    let width = rows.iter().map(|r| r.kernel.len()).max().unwrap_or(0);
    let mut out = format!(
        "{:width$}  dtype  max_rel_err  threshold  result\n",
        "kernel"
    );
    for r in rows {
        out.push_str(&format!(
            "{:width$}  {:5}  {:11.3e}  {:9.1e}  {}\n",
            r.kernel,
            r.dtype,
            r.max_rel_err,
            r.threshold,
            if r.passed { "ok" } else { "FAILED" }
        ));
    }
    out
}

/// splitmix64 (Steele et al.): a tiny seeded generator for test inputs.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-scale, scale]`.
    fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The same logical tensor on both backends.
#[derive(Clone, Copy)]
struct Pair {
    reference: Tensor,
    tested: Tensor,
}

struct Harness<'a, A: Backend, B: Backend> {
    reference: &'a A,
    tested: &'a B,
    rng: SplitMix64,
    /// Keeps this case's buffers alive.
    buffers: (Vec<A::Buffer>, Vec<B::Buffer>),
    rows: Vec<ParityRow>,
    /// The tested backend's matmul precision: names the rows' dtype and sets their threshold.
    precision: Precision,
}

/// Runs `$call` on both backends: inside it, `$bk` is the backend and `$t` maps a [`Pair`] to
/// that backend's view. Evaluates to both results, for [`both_ok`].
macro_rules! both {
    ($h:expr, |$bk:ident, $t:ident| $call:expr) => {{
        let reference = {
            let $bk = $h.reference;
            let $t = |p: Pair| p.reference;
            $call
        };
        let tested = {
            let $bk = $h.tested;
            let $t = |p: Pair| p.tested;
            $call
        };
        (reference, tested)
    }};
}

/// Both results of [`both!`], or the first error, saying which side failed.
fn both_ok<T>((reference, tested): (Result<T>, Result<T>)) -> Result<(T, T)> {
    Ok((
        reference.context("the reference backend failed")?,
        tested.context("the tested backend failed")?,
    ))
}

impl<A: Backend, B: Backend> Harness<'_, A, B> {
    fn run_case(&mut self, name: &str, case: Case<A, B>) {
        if let Err(e) = case(self) {
            self.push(format!("{name}: error: {e:#}"), "fp32", f64::INFINITY);
        }
        // Each case's buffers are dropped before the next: the run stays small on a GPU.
        self.buffers.0.clear();
        self.buffers.1.clear();
    }

    fn alloc(&mut self, dtype: DType, len: usize) -> Result<Pair> {
        let a = self.reference.alloc(dtype, len)?;
        let b = self.tested.alloc(dtype, len)?;
        let pair = Pair {
            reference: a.tensor(),
            tested: b.tensor(),
        };
        self.buffers.0.push(a);
        self.buffers.1.push(b);
        Ok(pair)
    }

    fn upload(&mut self, data: &[f32]) -> Result<Pair> {
        let p = self.alloc(DType::F32, data.len())?;
        both_ok(both!(self, |bk, t| bk.upload(t(p), data)))?;
        Ok(p)
    }

    fn upload_i32(&mut self, data: &[i32]) -> Result<Pair> {
        let p = self.alloc(DType::I32, data.len())?;
        both_ok(both!(self, |bk, t| bk.upload_i32(t(p), data)))?;
        Ok(p)
    }

    /// Values uniform in `[-scale, scale]`.
    fn uniform(&mut self, len: usize, scale: f32) -> Result<Pair> {
        let data: Vec<f32> = (0..len).map(|_| self.rng.uniform(scale)).collect();
        self.upload(&data)
    }

    fn random(&mut self, len: usize) -> Result<Pair> {
        self.uniform(len, 1.0)
    }

    /// Values in `[0.5, 1.5]` (variances, reciprocal deviations).
    fn positive(&mut self, len: usize) -> Result<Pair> {
        let data: Vec<f32> = (0..len).map(|_| 1.0 + self.rng.uniform(0.5)).collect();
        self.upload(&data)
    }

    fn download(&self, p: Pair) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut a = vec![0.0; p.reference.len()];
        let mut b = vec![0.0; p.tested.len()];
        self.reference.download(p.reference, &mut a)?;
        self.tested.download(p.tested, &mut b)?;
        Ok((a, b))
    }

    /// Compares each named output of `call`.
    fn check(&mut self, call: &str, outputs: &[(&str, Pair)]) -> Result<()> {
        for (name, p) in outputs {
            let (a, b) = self.download(*p)?;
            self.push(format!("{call}: {name}"), "fp32", max_rel_err(&a, &b));
        }
        Ok(())
    }

    /// Compares a returned scalar.
    fn check_scalar(&mut self, call: &str, dtype: &'static str, (a, b): (f64, f64)) {
        self.push(format!("{call}: result"), dtype, max_rel_err64(a, b));
    }

    /// Both backends must refuse the call.
    fn check_refused<T>(&mut self, call: &str, (a, b): (Result<T>, Result<T>)) {
        let both = a.is_err() && b.is_err();
        let err = if both { 0.0 } else { f64::INFINITY };
        self.push(format!("{call}: refused by both"), "-", err);
    }

    fn push(&mut self, kernel: String, dtype: &'static str, max_rel_err: f64) {
        // fp32 rows name the buffer's type (f32 values, i32 ids), the others the precision.
        let dtype = match self.precision {
            Precision::Fp32 => dtype,
            p => p.name(),
        };
        let threshold = self.precision.tolerance();
        self.rows.push(ParityRow {
            kernel,
            dtype,
            max_rel_err,
            threshold,
            passed: max_rel_err <= threshold,
        });
    }
}

/// [`max_rel_err`] of two scalars.
fn max_rel_err64(a: f64, b: f64) -> f64 {
    if !a.is_finite() || !b.is_finite() {
        return f64::INFINITY;
    }
    (a - b).abs() / a.abs().max(1e-6)
}

fn weight(tensor: Tensor, layout: WeightLayout) -> Weight {
    Weight { tensor, layout }
}

fn dropout(p: f32, seed: u64) -> Dropout {
    Dropout { p, seed, offset: 3 }
}

fn matmul<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    // Rows of 70 and 130 floats are not 16-byte aligned, and the product is large enough for
    // the CUDA backend to pad them (`gemm_padded`).
    let (rows, k, n) = (128, 70, 130);
    for layout in [OutIn, InOut] {
        for with_bias in [false, true] {
            let (inp, w, out) = (h.random(rows * k)?, h.random(k * n)?, h.random(rows * n)?);
            let bias = if with_bias { Some(h.random(n)?) } else { None };
            both_ok(both!(h, |bk, t| bk.matmul_forward(
                t(out),
                t(inp),
                weight(t(w), layout),
                bias.map(t),
                rows,
                k,
                n
            )))?;
            let plus = if with_bias { " +bias" } else { "" };
            h.check(&format!("matmul_forward {layout:?}{plus}"), &[("out", out)])?;
        }
    }
    // The weight in either layout (a mirror), the gradient in either, both accumulate modes
    // for dinp and both stores for the parameter gradients; then once without dinp and dbias.
    for (wl, dl, accumulate, grads, full) in [
        (OutIn, OutIn, false, Write, true),
        (OutIn, OutIn, true, Accumulate, true),
        (InOut, InOut, false, Accumulate, true),
        (InOut, InOut, true, Write, true),
        (InOut, OutIn, false, Write, true),
        (OutIn, InOut, true, Accumulate, true),
        (OutIn, InOut, false, Write, false),
    ] {
        let (dinp, dw, db) = (h.random(rows * k)?, h.random(k * n)?, h.random(n)?);
        let (dout, inp, w) = (h.random(rows * n)?, h.random(rows * k)?, h.random(k * n)?);
        let (dinp_opt, db_opt) = if full {
            (Some(dinp), Some(db))
        } else {
            (None, None)
        };
        both_ok(both!(h, |bk, t| bk.matmul_backward(
            dinp_opt.map(t),
            accumulate,
            weight(t(dw), dl),
            db_opt.map(t),
            grads,
            t(dout),
            t(inp),
            weight(t(w), wl),
            rows,
            k,
            n
        )))?;
        let call = format!(
            "matmul_backward weight {wl:?} dweight {dl:?} dinp {} grads {grads:?}{}",
            if accumulate { "+=" } else { "=" },
            if full { "" } else { " (no dinp, dbias)" }
        );
        h.check(&call, &[("dinp", dinp), ("dweight", dw), ("dbias", db)])?;
    }
    // The bias gradient over more rows and columns: the CUDA backend sums columns in chunks of
    // 32 rows and tiles of 32 columns, here several of each, the last of both ragged.
    let (rows, k) = (300, 8);
    for (n, grads) in [(200, Write), (1000, Accumulate)] {
        let (dinp, dw, db) = (h.random(rows * k)?, h.random(k * n)?, h.random(n)?);
        let (dout, inp, w) = (h.random(rows * n)?, h.random(rows * k)?, h.random(k * n)?);
        both_ok(both!(h, |bk, t| bk.matmul_backward(
            Some(t(dinp)),
            true,
            weight(t(dw), OutIn),
            Some(t(db)),
            grads,
            t(dout),
            t(inp),
            weight(t(w), OutIn),
            rows,
            k,
            n
        )))?;
        let call = format!("matmul_backward [{rows}, {k}] @ [{k}, {n}] grads {grads:?}");
        h.check(&call, &[("dinp", dinp), ("dweight", dw), ("dbias", db)])?;
    }
    Ok(())
}

/// The feed-forward's product-then-activation pair, fused on the CUDA backend in bf16
/// (cuBLASLt's GELU epilogues), against the reference's separate calls. Also the cases it
/// must leave unfused: dropout, and an activation the epilogue does not have.
fn linear_activation<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    // The second product maps the activations (`n` wide) to `e`; its input gradient goes back
    // through the activation.
    // The first weight layouts are GPT-2's (Conv1D forward, the `[out, in]` mirror backward).
    let (rows, k, n, e) = (96, 64, 256, 48);
    for (act, with_bias, p, (fl, bl)) in [
        (Activation::GeluTanh, true, None, (InOut, OutIn)),
        (Activation::GeluTanh, false, None, (OutIn, InOut)),
        (Activation::GeluTanh, true, Some(0.2), (InOut, OutIn)),
        (Activation::Gelu, true, None, (OutIn, InOut)),
    ] {
        let d = p.map(|p| dropout(p, 13));
        let (inp, w, pre, out) = (
            h.random(rows * k)?,
            h.random(k * n)?,
            h.random(rows * n)?,
            h.random(rows * n)?,
        );
        let bias = if with_bias { Some(h.random(n)?) } else { None };
        both_ok(both!(h, |bk, t| bk.linear_activation_forward(
            (t(pre), t(out)),
            t(inp),
            weight(t(w), fl),
            bias.map(t),
            (act, d),
            rows,
            k,
            n
        )))?;
        let plus = if with_bias { " +bias" } else { "" };
        let call = format!("linear_activation {act:?}{plus} dropout={p:?} weights {fl:?}/{bl:?}");
        h.check(&format!("{call} forward"), &[("pre", pre), ("out", out)])?;
        // Fresh inputs for the backward, the same on both sides, so that its rows measure the
        // backward alone rather than the forward's rounding carried through it; `pre` spans
        // GELU's curved part and both tails, where its tanh saturates.
        let (pre, out) = (h.uniform(rows * n, 6.0)?, h.random(rows * n)?);
        let (dpre, scratch, dw, db) = (
            h.random(rows * n)?,
            h.random(rows * n)?,
            h.random(n * e)?,
            h.random(e)?,
        );
        let (dout, w2) = (h.random(rows * e)?, h.random(n * e)?);
        both_ok(both!(h, |bk, t| bk.matmul_activation_backward(
            (t(dpre), t(scratch)),
            (t(pre), act, d),
            weight(t(dw), bl),
            Some(t(db)),
            Write,
            t(dout),
            t(out),
            weight(t(w2), bl),
            rows,
            n,
            e
        )))?;
        let outputs = [("dpre", dpre), ("dweight", dw), ("dbias", db)];
        h.check(&format!("{call} backward"), &outputs)?;
    }
    Ok(())
}

fn transpose<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let (rows, cols) = (67, 45);
    let (out, inp) = (h.random(rows * cols)?, h.random(rows * cols)?);
    both_ok(both!(h, |bk, t| bk.transpose(t(out), t(inp), rows, cols)))?;
    h.check("transpose", &[("out", out)])
}

fn layernorm<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let (rows, c) = (64, 96);
    let (out, mean, rstd) = (h.random(rows * c)?, h.random(rows)?, h.random(rows)?);
    let (inp, w, b) = (h.uniform(rows * c, 3.0)?, h.random(c)?, h.random(c)?);
    both_ok(both!(h, |bk, t| bk.layernorm_forward(
        t(out),
        t(mean),
        t(rstd),
        t(inp),
        t(w),
        t(b),
        rows,
        c,
        1e-5
    )))?;
    h.check(
        "layernorm_forward",
        &[("out", out), ("mean", mean), ("rstd", rstd)],
    )?;
    for (accumulate, grads) in [(false, Write), (true, Accumulate), (true, Write)] {
        let call = format!(
            "layernorm_backward dinp {} grads {grads:?}",
            if accumulate { "+=" } else { "=" }
        );
        layernorm_backward(h, &call, inp, w, rows, c, (accumulate, grads))?;
    }
    // The parameter gradients over more rows and columns: several of the CUDA backend's chunks
    // of 32 rows and tiles of 32 columns, the last of both ragged.
    let rows = 300;
    for (c, grads) in [(200, Write), (1000, Accumulate)] {
        let (inp, w) = (h.uniform(rows * c, 3.0)?, h.random(c)?);
        let call = format!("layernorm_backward [{rows}, {c}] grads {grads:?}");
        layernorm_backward(h, &call, inp, w, rows, c, (true, grads))?;
    }
    Ok(())
}

fn layernorm_backward<A: Backend, B: Backend>(
    h: &mut Harness<A, B>,
    call: &str,
    inp: Pair,
    w: Pair,
    rows: usize,
    c: usize,
    (accumulate, grads): (bool, GradStore),
) -> Result<()> {
    let (dinp, dw, db, dout) = (
        h.random(rows * c)?,
        h.random(c)?,
        h.random(c)?,
        h.random(rows * c)?,
    );
    let (mean, rstd) = (h.random(rows)?, h.positive(rows)?);
    both_ok(both!(h, |bk, t| bk.layernorm_backward(
        t(dinp),
        accumulate,
        t(dw),
        t(db),
        grads,
        t(dout),
        t(inp),
        t(w),
        t(mean),
        t(rstd),
        rows,
        c
    )))?;
    h.check(call, &[("dinp", dinp), ("dweight", dw), ("dbias", db)])
}

fn attention<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    // (batch, seq, heads, head_dim, batch_first, causal, key padding, dropout p); seq 37 is a
    // multiple of nothing, and every shape has several heads and batch elements (the CUDA
    // backend batches its products over heads and loops over the batch).
    let configs = [
        (3, 24, 3, 16, true, true, false, None),
        (3, 24, 3, 16, false, false, true, Some(0.1)),
        (3, 24, 3, 16, true, true, true, Some(0.25)),
        (3, 24, 3, 16, false, true, false, Some(0.5)),
        (3, 24, 3, 16, true, false, false, None),
        (3, 37, 2, 8, true, true, true, Some(0.2)),
        (3, 37, 2, 8, false, true, true, Some(0.3)),
        (3, 37, 2, 8, false, false, false, None),
    ];
    for (i, (batch, seq, heads, head_dim, batch_first, causal, padded, p)) in
        configs.into_iter().enumerate()
    {
        // Unpadded lengths of the three sequences: the last is all padding (rows with every
        // key masked, which attend to nothing).
        let lengths = [seq, seq - 7, 0];
        let shape = AttentionShape {
            batch,
            seq,
            heads,
            head_dim,
            batch_first,
            causal,
        };
        let d = p.map(|p| dropout(p, 100 + i as u64));
        let case = AttentionCase::new(h, shape, padded.then_some(&lengths[..]))?;
        case.forward(h, d)?;
        let call = format!("{} dropout={p:?}", case.name());
        h.check(
            &format!("{call} forward"),
            &[("out", case.out), ("att", case.att)],
        )?;
        // The backward starts from the reference's probabilities on both sides.
        let (probs, _) = h.download(case.att)?;
        h.tested.upload(case.att.tested, &probs)?;
        case.backward(h, d)?;
        h.check(&format!("{call} backward"), &[("dqkv", case.dqkv)])?;
    }
    Ok(())
}

/// The buffers of one attention shape on both backends, with its key padding (when given the
/// unpadded length of each sequence).
struct AttentionCase {
    shape: AttentionShape,
    padded: bool,
    key_padding: Option<Pair>,
    out: Pair,
    att: Pair,
    qkv: Pair,
    dqkv: Pair,
    dout: Pair,
}

impl AttentionCase {
    fn new<A: Backend, B: Backend>(
        h: &mut Harness<A, B>,
        shape: AttentionShape,
        lengths: Option<&[usize]>,
    ) -> Result<Self> {
        let (rows, e, seq) = (shape.rows(), shape.width(), shape.seq);
        let key_padding = match lengths {
            Some(lengths) => {
                let kp: Vec<f32> = (0..shape.batch * seq)
                    .map(|r| (r % seq >= lengths[r / seq]) as u8 as f32)
                    .collect();
                Some(h.upload(&kp)?)
            }
            None => None,
        };
        Ok(AttentionCase {
            shape,
            padded: lengths.is_some(),
            key_padding,
            out: h.random(rows * e)?,
            att: h.random(shape.batch * shape.heads * seq * seq)?,
            qkv: h.uniform(rows * 3 * e, 2.0)?,
            dqkv: h.random(rows * 3 * e)?,
            dout: h.random(rows * e)?,
        })
    }

    fn name(&self) -> String {
        let s = &self.shape;
        format!(
            "attention [{}, {}, {}, {}] batch_first={} causal={} padding={}",
            s.batch, s.seq, s.heads, s.head_dim, s.batch_first, s.causal, self.padded
        )
    }

    fn forward<A: Backend, B: Backend>(
        &self,
        h: &mut Harness<A, B>,
        d: Option<Dropout>,
    ) -> Result<()> {
        let (kp, shape) = (self.key_padding, &self.shape);
        let (out, att, qkv) = (self.out, self.att, self.qkv);
        both_ok(both!(h, |bk, t| bk.attention_forward(
            t(out),
            t(att),
            t(qkv),
            kp.map(t),
            shape,
            d
        )))
        .map(drop)
    }

    fn backward<A: Backend, B: Backend>(
        &self,
        h: &mut Harness<A, B>,
        d: Option<Dropout>,
    ) -> Result<()> {
        let shape = &self.shape;
        let (dqkv, dout, qkv, att) = (self.dqkv, self.dout, self.qkv, self.att);
        both_ok(both!(h, |bk, t| bk.attention_backward(
            t(dqkv),
            t(dout),
            t(qkv),
            t(att),
            shape,
            d
        )))
        .map(drop)
    }
}

/// Attention in bf16, where the CUDA backend may take its flash path (no dropout, head size 32 or
/// 64): the output and the gradient, each side
/// from its own forward. `att` is not compared: the flash forward keeps other state in it.
/// Sequences of 150 and 200 end partway through the flash kernels' tiles of 64 and 128.
fn attention_products<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    // (batch, seq, heads, head_dim, batch_first, causal, key padding)
    let configs = [
        (2, 150, 3, 32, true, true, false),
        (2, 200, 2, 64, true, true, false),
        (3, 70, 2, 64, false, false, true),
    ];
    for (batch, seq, heads, head_dim, batch_first, causal, padded) in configs {
        let shape = AttentionShape {
            batch,
            seq,
            heads,
            head_dim,
            batch_first,
            causal,
        };
        // The second sequence is half padding, the last all padding (as in `attention`).
        let lengths = [seq, seq / 2, 0];
        let case = AttentionCase::new(h, shape, padded.then_some(&lengths[..]))?;
        case.forward(h, None)?;
        h.check(&format!("{} forward", case.name()), &[("out", case.out)])?;
        case.backward(h, None)?;
        h.check(&format!("{} backward", case.name()), &[("dqkv", case.dqkv)])?;
    }
    Ok(())
}

/// A NaN in a low-precision product's input stays a NaN in exactly the outputs it reaches. The
/// NaN is the GPU's own (bits `0x7fffffff`, from `0 * inf` or `inf - inf`), whose careless
/// rounding to bf16 carries into the sign bit and gives -0: a diverged row would then read as
/// zeros and the loss would look finite.
fn nan_input<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let (rows, k, n) = (128, 64, 96);
    let mut data: Vec<f32> = (0..rows * k).map(|_| h.rng.uniform(1.0)).collect();
    data[5 * k + 3] = f32::from_bits(0x7fff_ffff);
    let (inp, w, out) = (h.upload(&data)?, h.random(k * n)?, h.random(rows * n)?);
    both_ok(both!(h, |bk, t| bk.matmul_forward(
        t(out),
        t(inp),
        weight(t(w), InOut),
        None,
        rows,
        k,
        n
    )))?;
    let (a, b) = h.download(out)?;
    let same_nans = a.iter().zip(&b).all(|(x, y)| x.is_nan() == y.is_nan());
    let finite = |v: &[f32]| {
        v.iter()
            .map(|x| if x.is_nan() { 0.0 } else { *x })
            .collect::<Vec<_>>()
    };
    let err = if same_nans && a.iter().any(|x| x.is_nan()) {
        max_rel_err(&finite(&a), &finite(&b))
    } else {
        f64::INFINITY
    };
    h.push("matmul_forward with a NaN input: out".into(), "fp32", err);
    Ok(())
}

fn attention_decode<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let (heads, head_dim, max_len) = (4, 16, 32);
    let e = heads * head_dim;
    for pos in [0, 19] {
        let (out, qkv) = (h.random(e)?, h.uniform(3 * e, 2.0)?);
        let (k_cache, v_cache) = (h.random(max_len * e)?, h.random(max_len * e)?);
        both_ok(both!(h, |bk, t| bk.attention_decode(
            t(out),
            t(qkv),
            t(k_cache),
            t(v_cache),
            pos,
            heads,
            head_dim
        )))?;
        h.check(
            &format!("attention_decode pos={pos}"),
            &[("out", out), ("k_cache", k_cache), ("v_cache", v_cache)],
        )?;
    }
    Ok(())
}

fn embedding<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let (vocab, c, seq, rows) = (500, 64, 16, 64);
    // Every third token is the same one, so the backward adds into shared rows.
    let ids: Vec<i32> = (0..rows)
        .map(|r| {
            if r % 3 == 0 {
                7
            } else {
                h.rng.below(vocab) as i32
            }
        })
        .collect();
    let ids = h.upload_i32(&ids)?;
    let (wte, wpe) = (h.random(vocab * c)?, h.random(seq * c)?);
    for p in [None, Some(0.2)] {
        let d = p.map(|p| dropout(p, 5));
        let out = h.random(rows * c)?;
        both_ok(both!(h, |bk, t| bk.embedding_forward(
            t(out),
            t(ids),
            t(wte),
            t(wpe),
            rows,
            seq,
            c,
            d
        )))?;
        h.check(&format!("embedding_forward dropout={p:?}"), &[("out", out)])?;
        let (dwte, dwpe, dout) = (
            h.random(vocab * c)?,
            h.random(seq * c)?,
            h.random(rows * c)?,
        );
        both_ok(both!(h, |bk, t| bk.embedding_backward(
            t(dwte),
            t(dwpe),
            t(dout),
            t(ids),
            rows,
            seq,
            c,
            d
        )))?;
        h.check(
            &format!("embedding_backward dropout={p:?}"),
            &[("dwte", dwte), ("dwpe", dwpe)],
        )?;
    }
    let bad = h.upload_i32(&[3, vocab as i32, 1, 2])?;
    let out = h.random(4 * c)?;
    let refused = both!(h, |bk, t| bk.embedding_forward(
        t(out),
        t(bad),
        t(wte),
        t(wpe),
        4,
        seq,
        c,
        None
    ));
    h.check_refused("embedding_forward id outside the vocabulary", refused);
    Ok(())
}

fn activation<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    // Not a multiple of 4: the last Philox block is used in part.
    let n = 12_291;
    for act in [Activation::Relu, Activation::Gelu, Activation::GeluTanh] {
        for p in [None, Some(0.3)] {
            let d = p.map(|p| dropout(p, 9));
            let (out, inp) = (h.random(n)?, h.uniform(n, 4.0)?);
            both_ok(both!(h, |bk, t| bk.activation_forward(
                t(out),
                t(inp),
                act,
                d
            )))?;
            let call = format!("activation {act:?} dropout={p:?}");
            h.check(&format!("{call} forward"), &[("out", out)])?;
            let (dinp, dout) = (h.random(n)?, h.random(n)?);
            both_ok(both!(h, |bk, t| bk.activation_backward(
                t(dinp),
                t(dout),
                t(inp),
                act,
                d
            )))?;
            h.check(&format!("{call} backward"), &[("dinp", dinp)])?;
        }
    }
    Ok(())
}

fn residual<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let n = 12_291;
    for p in [None, Some(0.2), Some(1.0)] {
        let d = p.map(|p| dropout(p, 11));
        let (out, resid, inp) = (h.random(n)?, h.random(n)?, h.random(n)?);
        both_ok(both!(h, |bk, t| bk.residual_forward(
            t(out),
            t(resid),
            t(inp),
            d
        )))?;
        h.check(&format!("residual_forward dropout={p:?}"), &[("out", out)])?;
        let (dresid, dinp, dout) = (h.random(n)?, h.random(n)?, h.random(n)?);
        both_ok(both!(h, |bk, t| bk.residual_backward(
            t(dresid),
            t(dinp),
            t(dout),
            d
        )))?;
        h.check(
            &format!("residual_backward dropout={p:?}"),
            &[("dresid", dresid), ("dinp", dinp)],
        )?;
    }
    Ok(())
}

fn mse_loss<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let n = 5_003;
    let (dinp, inp, target) = (h.random(n)?, h.random(n)?, h.random(n)?);
    let (a, b) = both_ok(both!(h, |bk, t| bk.mse_loss(t(dinp), t(inp), t(target))))?;
    h.check("mse_loss", &[("dinp", dinp)])?;
    h.check_scalar("mse_loss", "fp32", (a as f64, b as f64));
    Ok(())
}

fn cross_entropy<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let (rows, vocab) = (96, 500);
    let logits = h.uniform(rows * vocab, 4.0)?;
    let some_ignored: Vec<i32> = (0..rows)
        .map(|r| {
            if r % 5 == 2 {
                -100
            } else {
                h.rng.below(vocab) as i32
            }
        })
        .collect();
    for (name, targets) in [
        ("some targets -100", some_ignored),
        ("every target -100", vec![-100; rows]),
    ] {
        let targets = h.upload_i32(&targets)?;
        let dlogits = h.random(rows * vocab)?;
        let losses = both_ok(both!(h, |bk, t| bk.cross_entropy(
            t(dlogits),
            t(logits),
            t(targets),
            rows,
            vocab
        )))?;
        let call = format!("cross_entropy {name}");
        h.check(&call, &[("dlogits", dlogits)])?;
        h.check_scalar(&call, "fp32", (losses.0 as f64, losses.1 as f64));
    }
    let bad = h.upload_i32(&[1, -1, 2, 3])?;
    let dlogits = h.random(4 * vocab)?;
    let refused = both!(h, |bk, t| bk.cross_entropy(
        t(dlogits),
        t(logits),
        t(bad),
        4,
        vocab
    ));
    h.check_refused("cross_entropy target outside the vocabulary", refused);
    Ok(())
}

fn sum_squares<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let x = h.random(100_003)?;
    let sums = both_ok(both!(h, |bk, t| bk.sum_squares(t(x))))?;
    h.check_scalar("sum_squares", "fp64", sums);
    Ok(())
}

fn scale<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let x = h.random(10_001)?;
    both_ok(both!(h, |bk, t| bk.scale(t(x), 0.37)))?;
    h.check("scale", &[("t", x)])
}

fn fill<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let x = h.random(10_001)?;
    both_ok(both!(h, |bk, t| bk.fill(t(x), -2.5)))?;
    h.check("fill", &[("dst", x)])
}

fn adamw<A: Backend, B: Backend>(h: &mut Harness<A, B>) -> Result<()> {
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
    };
    // (rows, cols) of a mirrored matrix, or a flat buffer.
    for shape in [None, Some((48, 40))] {
        let n = shape.map_or(5_000, |(r, c)| r * c);
        let (param, grad, m, v) = (h.random(n)?, h.random(n)?, h.random(n)?, h.positive(n)?);
        let out = h.random(n)?;
        let mirror = |t: Tensor| shape.map(|(rows, cols)| Mirror { out: t, rows, cols });
        both_ok(both!(h, |bk, t| bk.adamw(
            t(param),
            t(grad),
            t(m),
            t(v),
            &hp,
            mirror(t(out))
        )))?;
        let mut outputs = vec![("param", param), ("m", m), ("v", v)];
        if shape.is_some() {
            outputs.push(("mirror", out));
        }
        let call = format!("adamw mirror={shape:?}");
        h.check(&call, &outputs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Cpu;

    #[test]
    fn the_cpu_backend_matches_itself_in_every_case() {
        let rows = run(&Cpu, &Cpu, 1).unwrap();
        assert!(rows.len() > 60, "only {} rows", rows.len());
        let failed: Vec<_> = rows.iter().filter(|r| !r.passed).collect();
        assert!(failed.is_empty(), "{}", table(&rows));
        assert!(
            rows.iter().all(|r| r.max_rel_err == 0.0),
            "{}",
            table(&rows)
        );
    }

    #[test]
    fn the_error_metric_fails_on_nan_infinity_and_a_perturbed_value() {
        let a = [1.0, -2.0, 0.5];
        assert_eq!(max_rel_err(&a, &a), 0.0);
        assert!(max_rel_err(&a, &[1.0, f32::NAN, 0.5]) > Precision::Fp32.tolerance());
        assert!(max_rel_err(&[f32::NAN, -2.0, 0.5], &a) > Precision::Fp32.tolerance());
        assert!(max_rel_err(&a, &[1.0, f32::INFINITY, 0.5]) > Precision::Fp32.tolerance());
        let err = max_rel_err(&a, &[1.0, -2.0 + 1e-3, 0.5]);
        assert!((err - 5e-4).abs() < 1e-6, "{err}");
        assert!(max_rel_err(&a, &[1.0, -2.0]) > Precision::Fp32.tolerance());
        assert!(max_rel_err64(1.0, f64::NAN) > Precision::Fp32.tolerance());
        // Relative to the largest magnitude: a tiny output next to a large one may differ a bit.
        assert!(max_rel_err(&[1e3, 1e-3], &[1e3, 1.001e-3]) <= Precision::Fp32.tolerance());
    }
}
