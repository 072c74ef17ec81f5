//! Gradient checks of the CPU backend, the project standard: every kernel's forward is compared
//! with a naive f64 reference (`reference/`), and every backward with central finite
//! differences, in f64, of that reference under the loss `L = sum(out * R)` (so `dout = R`).
//! Also checked: which gradient buffers accumulate (`+=`) and which are overwritten, dropout
//! masks against `philox::dropout_multipliers`, and bitwise independence of the thread count.

mod reference;

use anyhow::Result;
use flint_backend::cpu::{Cpu, CpuBuffer};
use flint_backend::{
    philox, Activation, AdamW, AttentionShape, Backend, Buffer, DType, Dropout, GradStore, Mirror,
    Tensor, Weight, WeightLayout,
};
use reference::{Act, Attn};
use WeightLayout::{InOut, OutIn};

/// A weight stored as `nn.Linear` stores it, `[out, in]`.
fn lin(tensor: Tensor) -> Weight {
    Weight {
        tensor,
        layout: OutIn,
    }
}

/// A weight stored as Hugging Face's `Conv1D` stores it, `[in, out]`.
fn conv(tensor: Tensor) -> Weight {
    Weight {
        tensor,
        layout: InOut,
    }
}

/// Forward outputs (f32 kernels) against the f64 reference.
const FORWARD_TOL: f64 = 1e-5;
/// Kernel gradients against finite differences of the reference.
const GRAD_TOL: f64 = 1e-4;
/// Finite-difference step, in f64.
const H: f64 = 1e-6;
/// Tensors up to this size are probed at every element; larger ones at an even spread.
const MAX_PROBES: usize = 512;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Deterministic standard-normal data: stream `stream` of the Philox generator.
fn randn(stream: u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| philox::normal(stream, 0, i as u64))
        .collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// A backend buffer holding `data`.
fn buf(data: &[f32]) -> Result<CpuBuffer> {
    let b = Cpu.alloc(DType::F32, data.len())?;
    Cpu.upload(b.tensor(), data)?;
    Ok(b)
}

fn filled(n: usize, value: f32) -> Result<CpuBuffer> {
    let b = Cpu.alloc(DType::F32, n)?;
    Cpu.fill(b.tensor(), value)?;
    Ok(b)
}

/// An i32 buffer holding `data`.
fn buf_i32(data: &[i32]) -> Result<CpuBuffer> {
    let b = Cpu.alloc(DType::I32, data.len())?;
    Cpu.upload_i32(b.tensor(), data)?;
    Ok(b)
}

fn read(t: Tensor) -> Result<Vec<f32>> {
    let mut out = vec![0.0; t.len()];
    Cpu.download(t, &mut out)?;
    Ok(out)
}

/// Dropout multipliers of elements `0..n` of a kernel's dropout index space, as documented.
fn mask(d: Option<Dropout>, n: usize) -> Option<Vec<f64>> {
    d.map(|d| {
        let mut m = vec![0.0f32; n];
        philox::dropout_multipliers(&d, 0, &mut m);
        f64s(&m)
    })
}

/// `max|got - want| / max(max|want|, 1e-6)`.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let diff = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max);
    let scale = want.iter().map(|b| b.abs()).fold(1e-6, f64::max);
    if diff.is_nan() || got.iter().any(|g| g.is_nan()) {
        return f64::INFINITY;
    }
    diff / scale
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let err = rel_err(got, want);
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
}

/// Elements that finite differences probe in a tensor of `len`.
fn probes(len: usize) -> Vec<usize> {
    if len <= MAX_PROBES {
        (0..len).collect()
    } else {
        let mut idx: Vec<usize> = (0..MAX_PROBES).map(|i| i * len / MAX_PROBES).collect();
        idx.push(len - 1);
        idx
    }
}

/// The one finite-difference check, for every op: `inputs` are the tensors the kernel
/// differentiates (name, value), `grads` the kernel's gradients of each, in order, for the
/// upstream gradient `dout`; `forward` is the f64 reference, a function of those inputs (anything
/// else it needs is captured). Central differences of `L = sum(forward(x) * dout)` must match
/// every gradient within [`GRAD_TOL`].
#[track_caller]
fn assert_grads_match_fd(
    op: &str,
    inputs: &[(&str, &[f32])],
    dout: &[f32],
    grads: &[&[f32]],
    forward: impl Fn(&[Vec<f64>]) -> Vec<f64>,
) {
    assert_eq!(inputs.len(), grads.len());
    let dout = f64s(dout);
    let loss = |x: &[Vec<f64>]| -> f64 {
        let out = forward(x);
        assert_eq!(out.len(), dout.len(), "{op}: reference output vs dout");
        out.iter().zip(&dout).map(|(o, r)| o * r).sum()
    };
    let mut x: Vec<Vec<f64>> = inputs.iter().map(|(_, v)| f64s(v)).collect();
    for (a, ((name, _), grad)) in inputs.iter().zip(grads).enumerate() {
        assert_eq!(grad.len(), x[a].len(), "{op}: d{name} has the wrong length");
        let idx = probes(x[a].len());
        let mut fd = Vec::with_capacity(idx.len());
        for &i in &idx {
            let x0 = x[a][i];
            x[a][i] = x0 + H;
            let plus = loss(&x);
            x[a][i] = x0 - H;
            let minus = loss(&x);
            x[a][i] = x0;
            fd.push((plus - minus) / (2.0 * H));
        }
        let got: Vec<f32> = idx.iter().map(|&i| grad[i]).collect();
        let err = rel_err(&got, &fd);
        assert!(
            err <= GRAD_TOL,
            "{op}: d{name} vs finite differences: relative error {err:.3e} > {GRAD_TOL:.0e}"
        );
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------------
// matmul

const MATMUL_SIZES: [(usize, usize, usize); 2] = [(7, 5, 9), (33, 64, 70)];

#[test]
fn matmul_forward_matches_reference() -> Result<()> {
    for (rows, k, n) in MATMUL_SIZES {
        for with_bias in [false, true] {
            let (x, w, b) = (randn(1, rows * k), randn(2, n * k), randn(3, n));
            let out = filled(rows * n, 7.0)?;
            let (xb, wb, bb) = (buf(&x)?, buf(&w)?, buf(&b)?);
            let bias = with_bias.then(|| bb.tensor());
            Cpu.matmul_forward(
                out.tensor(),
                xb.tensor(),
                lin(wb.tensor()),
                bias,
                rows,
                k,
                n,
            )?;
            // The same product from the weight transposed to [k, n] by the transpose kernel.
            let (wt, out_t) = (filled(k * n, 7.0)?, filled(rows * n, 7.0)?);
            Cpu.transpose(wt.tensor(), wb.tensor(), n, k)?;
            let wt_host = read(wt.tensor())?;
            let wt_want: Vec<f64> = (0..k * n).map(|i| w[(i % n) * k + i / n] as f64).collect();
            assert_close("transpose", &wt_host, &wt_want, 0.0);
            Cpu.matmul_forward(
                out_t.tensor(),
                xb.tensor(),
                conv(wt.tensor()),
                bias,
                rows,
                k,
                n,
            )?;
            let want = reference::linear(
                &f64s(&x),
                &f64s(&w),
                with_bias.then_some(&f64s(&b)[..]),
                rows,
                k,
                n,
            );
            let what = format!("matmul {rows}x{k}x{n} bias={with_bias}");
            assert_close(&what, &read(out.tensor())?, &want, FORWARD_TOL);
            assert_close(
                &format!("{what} (transposed weight)"),
                &read(out_t.tensor())?,
                &want,
                FORWARD_TOL,
            );
        }
    }
    Ok(())
}

#[test]
fn matmul_backward_matches_finite_differences() -> Result<()> {
    for (rows, k, n) in MATMUL_SIZES {
        for (with_bias, layout) in [(false, OutIn), (true, OutIn), (true, InOut)] {
            let (x, w, b, r) = (
                randn(1, rows * k),
                randn(2, n * k),
                randn(3, n),
                randn(4, rows * n),
            );
            // W^T[n, k] as stored by nn.Linear, or W[k, n] as stored by Conv1D.
            let stored = match layout {
                OutIn => w.clone(),
                InOut => (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(),
            };
            let (xb, wb, rb) = (buf(&x)?, buf(&stored)?, buf(&r)?);
            // dinp (accumulate = false) and the parameter gradients (GradStore::Write) are
            // overwritten: start them on garbage.
            let dx = filled(rows * k, 7.0)?;
            let (dw, db) = (filled(n * k, 7.0)?, filled(n, 7.0)?);
            let dbias = with_bias.then(|| db.tensor());
            let weight = |t| Weight { tensor: t, layout };
            Cpu.matmul_backward(
                Some(dx.tensor()),
                false,
                weight(dw.tensor()),
                dbias,
                GradStore::Write,
                rb.tensor(),
                xb.tensor(),
                weight(wb.tensor()),
                rows,
                k,
                n,
            )?;
            let op = format!("matmul {rows}x{k}x{n} bias={with_bias} {layout:?}");
            let (gx, gw, gb) = (read(dx.tensor())?, read(dw.tensor())?, read(db.tensor())?);
            // Back to the [n, k] order the reference differentiates.
            let gw: Vec<f32> = match layout {
                OutIn => gw,
                InOut => (0..n * k).map(|i| gw[(i % k) * n + i / k]).collect(),
            };
            let mut inputs = vec![("inp", &x[..]), ("weight", &w[..])];
            let mut grads = vec![&gx[..], &gw[..]];
            if with_bias {
                inputs.push(("bias", &b[..]));
                grads.push(&gb[..]);
            } else {
                assert!(
                    gb.iter().all(|&v| v == 7.0),
                    "{op}: dbias written without a bias"
                );
            }
            assert_grads_match_fd(&op, &inputs, &r, &grads, |p| {
                reference::linear(&p[0], &p[1], p.get(2).map(|b| &b[..]), rows, k, n)
            });
        }
    }
    Ok(())
}

#[test]
fn matmul_backward_accumulates_parameter_grads_and_follows_accumulate_flag() -> Result<()> {
    let (rows, k, n) = (7, 5, 9);
    let (x, w, r) = (randn(1, rows * k), randn(2, n * k), randn(4, rows * n));
    let (xb, wb, rb) = (buf(&x)?, buf(&w)?, buf(&r)?);
    let backward_as = |dx: Option<&CpuBuffer>, acc: bool, dw: &CpuBuffer, db: &CpuBuffer, grads| {
        Cpu.matmul_backward(
            dx.map(|d| d.tensor()),
            acc,
            lin(dw.tensor()),
            Some(db.tensor()),
            grads,
            rb.tensor(),
            xb.tensor(),
            lin(wb.tensor()),
            rows,
            k,
            n,
        )
    };
    let backward = |dx, acc, dw, db| backward_as(dx, acc, dw, db, GradStore::Accumulate);
    // One call on zeroed buffers gives the plain gradients.
    let (dx0, dw0, db0) = (filled(rows * k, 0.0)?, filled(n * k, 0.0)?, filled(n, 0.0)?);
    backward(Some(&dx0), false, &dw0, &db0)?;
    let (gx, gw, gb) = (
        read(dx0.tensor())?,
        read(dw0.tensor())?,
        read(db0.tensor())?,
    );

    // Start from nonzero buffers and call twice: first with accumulate = false, then true.
    let (px, pw, pb) = (randn(10, rows * k), randn(11, n * k), randn(12, n));
    let (dx, dw, db) = (buf(&px)?, buf(&pw)?, buf(&pb)?);
    backward(Some(&dx), false, &dw, &db)?;
    assert_close(
        "dinp, accumulate = false",
        &read(dx.tensor())?,
        &f64s(&gx),
        1e-6,
    );
    backward(Some(&dx), true, &dw, &db)?;
    let twice = |g: &[f32]| -> Vec<f64> { g.iter().map(|&v| 2.0 * v as f64).collect() };
    assert_close(
        "dinp, accumulate = true",
        &read(dx.tensor())?,
        &twice(&gx),
        1e-6,
    );
    let plus = |p: &[f32], g: &[f32]| -> Vec<f64> {
        p.iter()
            .zip(g)
            .map(|(&p, &g)| p as f64 + 2.0 * g as f64)
            .collect()
    };
    assert_close(
        "dweight += twice",
        &read(dw.tensor())?,
        &plus(&pw, &gw),
        1e-6,
    );
    assert_close("dbias += twice", &read(db.tensor())?, &plus(&pb, &gb), 1e-6);

    // Without dinp, the parameter gradients still accumulate.
    backward(None, false, &dw, &db)?;
    let thrice = |p: &[f32], g: &[f32]| -> Vec<f64> {
        p.iter()
            .zip(g)
            .map(|(&p, &g)| p as f64 + 3.0 * g as f64)
            .collect()
    };
    assert_close(
        "dweight, dinp = None",
        &read(dw.tensor())?,
        &thrice(&pw, &gw),
        1e-6,
    );
    assert_close(
        "dbias, dinp = None",
        &read(db.tensor())?,
        &thrice(&pb, &gb),
        1e-6,
    );

    // GradStore::Write replaces what the parameter gradients held.
    backward_as(None, false, &dw, &db, GradStore::Write)?;
    assert_close("dweight, Write", &read(dw.tensor())?, &f64s(&gw), 1e-6);
    assert_close("dbias, Write", &read(db.tensor())?, &f64s(&gb), 1e-6);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// layernorm

const LN_SIZES: [(usize, usize); 2] = [(6, 37), (5, 100)];
const LN_EPS: f32 = 1e-5;

/// LayerNorm inputs: a row scale and offset so that rows are not already normalised.
fn ln_inputs(rows: usize, c: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = randn(1, rows * c)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1.0 + (i / c) as f32 * 0.5) + (i / c) as f32 - 2.0)
        .collect();
    let w = randn(2, c).iter().map(|v| 1.0 + 0.3 * v).collect();
    (x, w, randn(3, c))
}

#[test]
fn layernorm_forward_matches_reference() -> Result<()> {
    for (rows, c) in LN_SIZES {
        let (x, w, b) = ln_inputs(rows, c);
        let (out, mean, rstd) = (
            filled(rows * c, 7.0)?,
            filled(rows, 7.0)?,
            filled(rows, 7.0)?,
        );
        let (xb, wb, bb) = (buf(&x)?, buf(&w)?, buf(&b)?);
        Cpu.layernorm_forward(
            out.tensor(),
            mean.tensor(),
            rstd.tensor(),
            xb.tensor(),
            wb.tensor(),
            bb.tensor(),
            rows,
            c,
            LN_EPS,
        )?;
        let (y, m, s) =
            reference::layernorm(&f64s(&x), &f64s(&w), &f64s(&b), rows, c, LN_EPS as f64);
        assert_close("layernorm out", &read(out.tensor())?, &y, FORWARD_TOL);
        assert_close("layernorm mean", &read(mean.tensor())?, &m, FORWARD_TOL);
        assert_close("layernorm rstd", &read(rstd.tensor())?, &s, FORWARD_TOL);
    }
    Ok(())
}

/// Runs the layernorm forward to get the saved statistics, then the backward with `dout`.
struct LnRun {
    x: CpuBuffer,
    w: CpuBuffer,
    mean: CpuBuffer,
    rstd: CpuBuffer,
    dout: CpuBuffer,
    rows: usize,
    c: usize,
}

impl LnRun {
    fn new(x: &[f32], w: &[f32], b: &[f32], dout: &[f32], rows: usize, c: usize) -> Result<Self> {
        let run = LnRun {
            x: buf(x)?,
            w: buf(w)?,
            mean: filled(rows, 0.0)?,
            rstd: filled(rows, 0.0)?,
            dout: buf(dout)?,
            rows,
            c,
        };
        let (out, bb) = (filled(rows * c, 0.0)?, buf(b)?);
        Cpu.layernorm_forward(
            out.tensor(),
            run.mean.tensor(),
            run.rstd.tensor(),
            run.x.tensor(),
            run.w.tensor(),
            bb.tensor(),
            rows,
            c,
            LN_EPS,
        )?;
        Ok(run)
    }

    fn backward(&self, dx: &CpuBuffer, acc: bool, dw: &CpuBuffer, db: &CpuBuffer) -> Result<()> {
        self.backward_as(dx, acc, dw, db, GradStore::Accumulate)
    }

    fn backward_as(
        &self,
        dx: &CpuBuffer,
        acc: bool,
        dw: &CpuBuffer,
        db: &CpuBuffer,
        grads: GradStore,
    ) -> Result<()> {
        Cpu.layernorm_backward(
            dx.tensor(),
            acc,
            dw.tensor(),
            db.tensor(),
            grads,
            self.dout.tensor(),
            self.x.tensor(),
            self.w.tensor(),
            self.mean.tensor(),
            self.rstd.tensor(),
            self.rows,
            self.c,
        )
    }
}

#[test]
fn layernorm_backward_matches_finite_differences() -> Result<()> {
    for (rows, c) in LN_SIZES {
        let (x, w, b) = ln_inputs(rows, c);
        let r = randn(4, rows * c);
        let run = LnRun::new(&x, &w, &b, &r, rows, c)?;
        // Everything is overwritten: start on garbage.
        let (dx, dw, db) = (filled(rows * c, 7.0)?, filled(c, 7.0)?, filled(c, 7.0)?);
        run.backward_as(&dx, false, &dw, &db, GradStore::Write)?;
        let (gx, gw, gb) = (read(dx.tensor())?, read(dw.tensor())?, read(db.tensor())?);
        assert_grads_match_fd(
            &format!("layernorm {rows}x{c}"),
            &[("inp", &x), ("weight", &w), ("bias", &b)],
            &r,
            &[&gx, &gw, &gb],
            |p| reference::layernorm(&p[0], &p[1], &p[2], rows, c, LN_EPS as f64).0,
        );
    }
    Ok(())
}

#[test]
fn layernorm_backward_accumulates_parameter_grads_and_follows_accumulate_flag() -> Result<()> {
    let (rows, c) = (5, 100);
    let (x, w, b) = ln_inputs(rows, c);
    let run = LnRun::new(&x, &w, &b, &randn(4, rows * c), rows, c)?;
    let (dx0, dw0, db0) = (filled(rows * c, 0.0)?, filled(c, 0.0)?, filled(c, 0.0)?);
    run.backward(&dx0, false, &dw0, &db0)?;
    let (gx, gw, gb) = (
        read(dx0.tensor())?,
        read(dw0.tensor())?,
        read(db0.tensor())?,
    );

    let (px, pw, pb) = (randn(10, rows * c), randn(11, c), randn(12, c));
    let (dx, dw, db) = (buf(&px)?, buf(&pw)?, buf(&pb)?);
    run.backward(&dx, false, &dw, &db)?;
    assert_close(
        "dinp, accumulate = false",
        &read(dx.tensor())?,
        &f64s(&gx),
        1e-6,
    );
    run.backward(&dx, true, &dw, &db)?;
    let expect = |p: Option<&[f32]>, g: &[f32], times: f64| -> Vec<f64> {
        (0..g.len())
            .map(|i| p.map_or(0.0, |p| p[i] as f64) + times * g[i] as f64)
            .collect()
    };
    assert_close(
        "dinp, accumulate = true",
        &read(dx.tensor())?,
        &expect(None, &gx, 2.0),
        1e-6,
    );
    assert_close(
        "dweight += twice",
        &read(dw.tensor())?,
        &expect(Some(&pw), &gw, 2.0),
        1e-6,
    );
    assert_close(
        "dbias += twice",
        &read(db.tensor())?,
        &expect(Some(&pb), &gb, 2.0),
        1e-6,
    );
    // GradStore::Write replaces what the parameter gradients held.
    run.backward_as(&dx, true, &dw, &db, GradStore::Write)?;
    assert_close("dweight, Write", &read(dw.tensor())?, &f64s(&gw), 1e-6);
    assert_close("dbias, Write", &read(db.tensor())?, &f64s(&gb), 1e-6);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// attention

/// Every layout and mask combination, each with and without dropout.
fn attention_cases() -> Vec<(AttentionShape, bool, Option<Dropout>)> {
    let mut cases = Vec::new();
    for batch_first in [true, false] {
        for causal in [false, true] {
            for padded in [false, true] {
                for dropout in [
                    None,
                    Some(Dropout {
                        p: 0.3,
                        seed: 17,
                        offset: 5,
                    }),
                ] {
                    let shape = AttentionShape {
                        batch: 3,
                        seq: 5,
                        heads: 2,
                        head_dim: 3,
                        batch_first,
                        causal,
                    };
                    cases.push((shape, padded, dropout));
                }
            }
        }
    }
    // Causal attention works in blocks of 64 queries: sequences of two and three blocks, the
    // last partial, in both token layouts, with and without padding and dropout.
    for (seq, batch_first, padded, p) in [
        (70, false, false, 0.0),
        (70, false, true, 0.2),
        (130, true, true, 0.1),
    ] {
        let shape = AttentionShape {
            batch: 3,
            seq,
            heads: 2,
            head_dim: 3,
            batch_first,
            causal: true,
        };
        let dropout = (p > 0.0).then_some(Dropout {
            p,
            seed: 3,
            offset: 9,
        });
        cases.push((shape, padded, dropout));
    }
    cases
}

fn attn(s: &AttentionShape) -> Attn {
    Attn {
        batch: s.batch,
        seq: s.seq,
        heads: s.heads,
        head_dim: s.head_dim,
        batch_first: s.batch_first,
        causal: s.causal,
    }
}

/// Key padding for batch 3, seq 5: element 0 pads nothing, 1 pads key 2, 2 pads keys 3 and 4
/// (key 0 is never padded, so no query row is fully masked).
fn key_padding(s: &AttentionShape) -> Vec<f32> {
    let mut kp = vec![0.0; s.batch * s.seq];
    for (b, j) in [(1, 2), (2, 3), (2, 4)] {
        kp[b * s.seq + j] = 1.0;
    }
    kp
}

fn describe(s: &AttentionShape, padded: bool, d: Option<Dropout>) -> String {
    format!(
        "attention batch_first={} causal={} padded={padded} dropout={}",
        s.batch_first,
        s.causal,
        d.is_some()
    )
}

/// Runs the attention forward; returns `(out, att)` buffers.
fn attention_forward(
    qkv: &CpuBuffer,
    kp: Option<&CpuBuffer>,
    s: &AttentionShape,
    d: Option<Dropout>,
) -> Result<(CpuBuffer, CpuBuffer)> {
    let out = filled(s.rows() * s.width(), 7.0)?;
    let att = filled(s.batch * s.heads * s.seq * s.seq, 7.0)?;
    Cpu.attention_forward(
        out.tensor(),
        att.tensor(),
        qkv.tensor(),
        kp.map(|k| k.tensor()),
        s,
        d,
    )?;
    Ok((out, att))
}

#[test]
fn attention_forward_matches_reference() -> Result<()> {
    for (s, padded, d) in attention_cases() {
        let qkv = randn(1, s.rows() * 3 * s.width());
        let kp = key_padding(&s);
        let (qb, kb) = (buf(&qkv)?, buf(&kp)?);
        let (out, att) = attention_forward(&qb, padded.then_some(&kb), &s, d)?;
        let m = mask(d, att.tensor().len());
        let kp64 = f64s(&kp);
        let (want_out, want_att) = reference::attention(
            &f64s(&qkv),
            padded.then_some(&kp64[..]),
            m.as_deref(),
            &attn(&s),
        );
        let what = describe(&s, padded, d);
        assert_close(
            &format!("{what}: att"),
            &read(att.tensor())?,
            &want_att,
            FORWARD_TOL,
        );
        assert_close(
            &format!("{what}: out"),
            &read(out.tensor())?,
            &want_out,
            FORWARD_TOL,
        );
    }
    Ok(())
}

#[test]
fn attention_backward_matches_finite_differences() -> Result<()> {
    for (s, padded, d) in attention_cases() {
        let qkv = randn(1, s.rows() * 3 * s.width());
        let r = randn(2, s.rows() * s.width());
        let kp = key_padding(&s);
        let (qb, kb, rb) = (buf(&qkv)?, buf(&kp)?, buf(&r)?);
        let (_, att) = attention_forward(&qb, padded.then_some(&kb), &s, d)?;
        // dqkv is written, not accumulated: start it on garbage.
        let dqkv = filled(qkv.len(), 7.0)?;
        Cpu.attention_backward(dqkv.tensor(), rb.tensor(), qb.tensor(), att.tensor(), &s, d)?;
        let m = mask(d, att.tensor().len());
        let kp64 = f64s(&kp);
        let a = attn(&s);
        assert_grads_match_fd(
            &describe(&s, padded, d),
            &[("qkv", &qkv)],
            &r,
            &[&read(dqkv.tensor())?],
            |p| reference::attention(&p[0], padded.then_some(&kp64[..]), m.as_deref(), &a).0,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// elementwise: activations, residual

/// Long enough to span several dropout blocks (1024) and two kernel chunks (16384).
const ELEMENTWISE_LEN: usize = (1 << 14) + 1500;

fn act_cases() -> Vec<(Activation, Act, Option<Dropout>)> {
    let mut cases = Vec::new();
    for (a, r) in [
        (Activation::Relu, Act::Relu),
        (Activation::Gelu, Act::Gelu),
        (Activation::GeluTanh, Act::GeluTanh),
    ] {
        for d in [
            None,
            Some(Dropout {
                p: 0.3,
                seed: 3,
                offset: 11,
            }),
        ] {
            cases.push((a, r, d));
        }
    }
    cases
}

/// Activation inputs kept at least 0.1 away from ReLU's kink at 0.
fn act_input(n: usize) -> Vec<f32> {
    randn(1, n)
        .iter()
        .map(|&v| v + 0.1f32.copysign(v))
        .collect()
}

#[test]
fn activation_forward_matches_reference() -> Result<()> {
    let x = act_input(ELEMENTWISE_LEN);
    let xb = buf(&x)?;
    for (a, r, d) in act_cases() {
        let out = filled(x.len(), 7.0)?;
        Cpu.activation_forward(out.tensor(), xb.tensor(), a, d)?;
        let want = reference::activation(&f64s(&x), r, mask(d, x.len()).as_deref());
        let what = format!("{a:?} dropout={}", d.is_some());
        assert_close(&what, &read(out.tensor())?, &want, FORWARD_TOL);
    }
    Ok(())
}

#[test]
fn activation_backward_matches_finite_differences() -> Result<()> {
    let x = act_input(ELEMENTWISE_LEN);
    let dout = randn(2, x.len());
    let (xb, rb) = (buf(&x)?, buf(&dout)?);
    for (a, r, d) in act_cases() {
        let dx = filled(x.len(), 7.0)?;
        Cpu.activation_backward(dx.tensor(), rb.tensor(), xb.tensor(), a, d)?;
        let m = mask(d, x.len());
        assert_grads_match_fd(
            &format!("{a:?} dropout={}", d.is_some()),
            &[("inp", &x)],
            &dout,
            &[&read(dx.tensor())?],
            |p| reference::activation(&p[0], r, m.as_deref()),
        );
    }
    Ok(())
}

#[test]
fn residual_forward_matches_reference() -> Result<()> {
    let (resid, x) = (randn(1, ELEMENTWISE_LEN), randn(2, ELEMENTWISE_LEN));
    let (rb, xb) = (buf(&resid)?, buf(&x)?);
    for d in [
        None,
        Some(Dropout {
            p: 0.3,
            seed: 9,
            offset: 2,
        }),
    ] {
        let out = filled(x.len(), 7.0)?;
        Cpu.residual_forward(out.tensor(), rb.tensor(), xb.tensor(), d)?;
        let want = reference::residual(&f64s(&resid), &f64s(&x), mask(d, x.len()).as_deref());
        let what = format!("residual dropout={}", d.is_some());
        assert_close(&what, &read(out.tensor())?, &want, FORWARD_TOL);
    }
    Ok(())
}

#[test]
fn residual_backward_matches_finite_differences_and_accumulates_dresid() -> Result<()> {
    let (resid, x, dout) = (
        randn(1, ELEMENTWISE_LEN),
        randn(2, ELEMENTWISE_LEN),
        randn(3, ELEMENTWISE_LEN),
    );
    let gb = buf(&dout)?;
    for d in [
        None,
        Some(Dropout {
            p: 0.3,
            seed: 9,
            offset: 2,
        }),
    ] {
        // Both gradients are overwritten: start them on garbage.
        let (dr, dx) = (filled(x.len(), 7.0)?, filled(x.len(), 7.0)?);
        Cpu.residual_backward(dr.tensor(), dx.tensor(), gb.tensor(), d)?;
        let m = mask(d, x.len());
        assert_grads_match_fd(
            &format!("residual dropout={}", d.is_some()),
            &[("resid", &resid), ("inp", &x)],
            &dout,
            &[&read(dr.tensor())?, &read(dx.tensor())?],
            |p| reference::residual(&p[0], &p[1], m.as_deref()),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// losses

#[test]
fn mse_loss_matches_reference_and_finite_differences() -> Result<()> {
    let (x, t) = (randn(1, 1000), randn(2, 1000));
    let (xb, tb, dx) = (buf(&x)?, buf(&t)?, filled(x.len(), 7.0)?);
    let loss = Cpu.mse_loss(dx.tensor(), xb.tensor(), tb.tensor())?;
    let t64 = f64s(&t);
    assert_close(
        "mse loss",
        &[loss],
        &[reference::mse(&f64s(&x), &t64)],
        FORWARD_TOL,
    );
    assert_grads_match_fd("mse", &[("inp", &x)], &[1.0], &[&read(dx.tensor())?], |p| {
        vec![reference::mse(&p[0], &t64)]
    });
    Ok(())
}

#[test]
fn cross_entropy_matches_reference_and_finite_differences_with_ignored_row() -> Result<()> {
    let (rows, vocab) = (6, 11);
    let logits: Vec<f32> = randn(1, rows * vocab).iter().map(|v| 2.0 * v).collect();
    let targets = [3, 0, -100, 10, 7, 3];
    let (lb, tb, dl) = (
        buf(&logits)?,
        buf_i32(&targets)?,
        filled(logits.len(), 7.0)?,
    );
    let loss = Cpu.cross_entropy(dl.tensor(), lb.tensor(), tb.tensor(), rows, vocab)?;
    let want = reference::cross_entropy(&f64s(&logits), &targets, vocab);
    assert_close("cross-entropy loss", &[loss], &[want], FORWARD_TOL);
    let grad = read(dl.tensor())?;
    assert!(
        grad[2 * vocab..3 * vocab].iter().all(|&g| g == 0.0),
        "ignored row has a gradient"
    );
    assert_grads_match_fd(
        "cross-entropy",
        &[("logits", &logits)],
        &[1.0],
        &[&grad],
        |p| vec![reference::cross_entropy(&p[0], &targets, vocab)],
    );
    Ok(())
}

#[test]
fn cross_entropy_rejects_out_of_range_targets() -> Result<()> {
    let (rows, vocab) = (3, 4);
    let lb = buf(&randn(1, rows * vocab))?;
    let dl = filled(rows * vocab, 0.0)?;
    for bad in [4, 1000, -1, -101] {
        let tb = buf_i32(&[0, bad, -100])?;
        let result = Cpu.cross_entropy(dl.tensor(), lb.tensor(), tb.tensor(), rows, vocab);
        assert!(
            result.is_err(),
            "target {bad} with vocab {vocab} was accepted"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// optimizer helpers

#[test]
fn sum_squares_matches_reference() -> Result<()> {
    let x = randn(1, 3 * (1 << 14) + 77);
    let got = Cpu.sum_squares(buf(&x)?.tensor())?;
    let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    assert!(
        (got - want).abs() <= 1e-12 * want,
        "sum_squares {got} vs {want}"
    );
    Ok(())
}

#[test]
fn scale_multiplies_every_element() -> Result<()> {
    let x = randn(1, (1 << 14) + 5);
    let b = buf(&x)?;
    Cpu.scale(b.tensor(), -0.375)?;
    let want: Vec<f64> = x.iter().map(|&v| v as f64 * -0.375).collect();
    assert_close("scale", &read(b.tensor())?, &want, 1e-7);
    Ok(())
}

#[test]
fn adamw_matches_torch_formula_over_three_steps() -> Result<()> {
    // A [43, 388] matrix: more than one plain chunk, and a partial last slab when mirrored.
    for mirrored in [false, true] {
        adamw_three_steps(43, 388, mirrored)?;
    }
    Ok(())
}

fn adamw_three_steps(rows: usize, cols: usize, mirrored: bool) -> Result<()> {
    let n = rows * cols;
    let mirror_buf = filled(n, 7.0)?;
    let mirror = mirrored.then(|| Mirror {
        out: mirror_buf.tensor(),
        rows,
        cols,
    });
    let (lr, beta1, beta2, eps, weight_decay) = (1e-2f32, 0.9f32, 0.999f32, 1e-8f32, 0.01f32);
    let p0 = randn(1, n);
    let (param, m, v, grad) = (buf(&p0)?, filled(n, 0.0)?, filled(n, 0.0)?, filled(n, 0.0)?);
    let mut want = reference::AdamWState {
        param: f64s(&p0),
        m: vec![0.0; n],
        v: vec![0.0; n],
    };
    for step in 1..=3u32 {
        let g = randn(10 + step as u64, n);
        Cpu.upload(grad.tensor(), &g)?;
        let hp = AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            step,
        };
        Cpu.adamw(
            param.tensor(),
            grad.tensor(),
            m.tensor(),
            v.tensor(),
            &hp,
            mirror,
        )?;
        let f = |x: f32| x as f64;
        reference::adamw_step(
            &mut want,
            &f64s(&g),
            f(lr),
            f(beta1),
            f(beta2),
            f(eps),
            f(weight_decay),
            step as i32,
        );
        assert_close(
            &format!("adamw step {step}: m"),
            &read(m.tensor())?,
            &want.m,
            FORWARD_TOL,
        );
        assert_close(
            &format!("adamw step {step}: v"),
            &read(v.tensor())?,
            &want.v,
            FORWARD_TOL,
        );
        let got = read(param.tensor())?;
        if mirrored {
            let transposed: Vec<f64> = (0..n)
                .map(|i| got[(i % rows) * cols + i / rows] as f64)
                .collect();
            assert_close(
                "adamw mirror",
                &read(mirror_buf.tensor())?,
                &transposed,
                0.0,
            );
        }
        assert_close(
            &format!("adamw step {step}: param"),
            &got,
            &want.param,
            FORWARD_TOL,
        );
        // The update itself, not just the parameter it lands on.
        let delta =
            |p: &[f64]| -> Vec<f64> { p.iter().zip(&p0).map(|(a, &b)| a - b as f64).collect() };
        let got_delta: Vec<f32> = got.iter().zip(&p0).map(|(a, b)| a - b).collect();
        assert_close(
            &format!("adamw step {step}: update"),
            &got_delta,
            &delta(&want.param),
            1e-4,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// determinism

/// Every output of matmul, layernorm and attention (forward and backward) at sizes the kernels
/// split across tasks, computed in the current rayon pool.
fn big_kernel_outputs() -> Result<Vec<Vec<f32>>> {
    let mut outputs = Vec::new();
    let (rows, k, n) = (300, 200, 200);
    let (x, w, b, r) = (
        buf(&randn(1, rows * k))?,
        buf(&randn(2, n * k))?,
        buf(&randn(3, n))?,
        buf(&randn(4, rows * n))?,
    );
    let out = filled(rows * n, 0.0)?;
    Cpu.matmul_forward(
        out.tensor(),
        x.tensor(),
        lin(w.tensor()),
        Some(b.tensor()),
        rows,
        k,
        n,
    )?;
    let (dx, dw, db) = (filled(rows * k, 0.0)?, filled(n * k, 0.0)?, filled(n, 0.0)?);
    Cpu.matmul_backward(
        Some(dx.tensor()),
        false,
        lin(dw.tensor()),
        Some(db.tensor()),
        GradStore::Write,
        r.tensor(),
        x.tensor(),
        lin(w.tensor()),
        rows,
        k,
        n,
    )?;
    for t in [&out, &dx, &dw, &db] {
        outputs.push(read(t.tensor())?);
    }

    let (rows, c) = (300, 200);
    let (x, w, b) = ln_inputs(rows, c);
    let run = LnRun::new(&x, &w, &b, &randn(4, rows * c), rows, c)?;
    let (dx, dw, db) = (filled(rows * c, 0.0)?, filled(c, 0.0)?, filled(c, 0.0)?);
    run.backward(&dx, false, &dw, &db)?;
    for t in [&run.mean, &run.rstd, &dx, &dw, &db] {
        outputs.push(read(t.tensor())?);
    }

    let s = AttentionShape {
        batch: 4,
        seq: 64,
        heads: 4,
        head_dim: 16,
        batch_first: false,
        causal: true,
    };
    let d = Some(Dropout {
        p: 0.1,
        seed: 1,
        offset: 2,
    });
    let (qkv, dout) = (
        buf(&randn(5, s.rows() * 3 * s.width()))?,
        buf(&randn(6, s.rows() * s.width()))?,
    );
    let (out, att) = attention_forward(&qkv, None, &s, d)?;
    let dqkv = filled(s.rows() * 3 * s.width(), 0.0)?;
    Cpu.attention_backward(
        dqkv.tensor(),
        dout.tensor(),
        qkv.tensor(),
        att.tensor(),
        &s,
        d,
    )?;
    for t in [&out, &att, &dqkv] {
        outputs.push(read(t.tensor())?);
    }
    Ok(outputs)
}

#[test]
fn kernels_are_bitwise_independent_of_thread_count() -> Result<()> {
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build()?;
    let a = one.install(big_kernel_outputs)?;
    let b = three.install(big_kernel_outputs)?;
    let names = [
        "matmul out",
        "matmul dinp",
        "matmul dweight",
        "matmul dbias",
        "layernorm mean",
        "layernorm rstd",
        "layernorm dinp",
        "layernorm dweight",
        "layernorm dbias",
        "attention out",
        "attention att",
        "attention dqkv",
    ];
    assert_eq!(a.len(), names.len());
    for ((name, a), b) in names.iter().zip(&a).zip(&b) {
        assert!(bits(a) == bits(b), "{name} differs between 1 and 3 threads");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// embedding

#[test]
fn embedding_matches_reference_and_finite_differences() -> Result<()> {
    let (vocab, positions, c, batch, seq) = (11, 6, 5, 3, 4);
    let rows = batch * seq;
    let ids: Vec<i32> = (0..rows).map(|r| ((r * 7 + 3) % vocab) as i32).collect();
    let (wte, wpe, r) = (
        randn(1, vocab * c),
        randn(2, positions * c),
        randn(3, rows * c),
    );
    let (idb, wteb, wpeb) = (buf_i32(&ids)?, buf(&wte)?, buf(&wpe)?);
    for dropout in [
        None,
        Some(Dropout {
            p: 0.3,
            seed: 5,
            offset: 2,
        }),
    ] {
        let mut mul = vec![1.0f32; rows * c];
        if let Some(d) = &dropout {
            philox::dropout_multipliers(d, 0, &mut mul);
        }
        // out[r] = (wte[ids[r]] + wpe[r % seq]) * mask
        let reference = |p: &[Vec<f64>]| -> Vec<f64> {
            (0..rows * c)
                .map(|i| {
                    let (row, j) = (i / c, i % c);
                    let t = ids[row] as usize;
                    (p[0][t * c + j] + p[1][(row % seq) * c + j]) * mul[i] as f64
                })
                .collect()
        };
        let out = filled(rows * c, 7.0)?;
        Cpu.embedding_forward(
            out.tensor(),
            idb.tensor(),
            wteb.tensor(),
            wpeb.tensor(),
            rows,
            seq,
            c,
            dropout,
        )?;
        let want = reference(&[f64s(&wte), f64s(&wpe)]);
        assert_close(
            "embedding forward",
            &read(out.tensor())?,
            &want,
            FORWARD_TOL,
        );
        let (dwte, dwpe, rb) = (
            filled(vocab * c, 0.0)?,
            filled(positions * c, 0.0)?,
            buf(&r)?,
        );
        Cpu.embedding_backward(
            dwte.tensor(),
            dwpe.tensor(),
            rb.tensor(),
            idb.tensor(),
            rows,
            seq,
            c,
            dropout,
        )?;
        let (gte, gpe) = (read(dwte.tensor())?, read(dwpe.tensor())?);
        let inputs = [("wte", &wte[..]), ("wpe", &wpe[..])];
        assert_grads_match_fd("embedding", &inputs, &r, &[&gte, &gpe], reference);
    }
    // An id outside the vocabulary is an error, not a read out of bounds.
    let bad = buf_i32(&vec![vocab as i32; rows])?;
    let out = filled(rows * c, 0.0)?;
    assert!(Cpu
        .embedding_forward(
            out.tensor(),
            bad.tensor(),
            wteb.tensor(),
            wpeb.tensor(),
            rows,
            seq,
            c,
            None
        )
        .is_err());
    Ok(())
}

/// A batch of zero rows: the parameter gradients are empty sums, written as zeros or left as
/// they were, and nothing reads past the empty operands.
#[test]
fn matmul_backward_over_zero_rows_stores_empty_sums() -> Result<()> {
    let (k, n) = (3, 100);
    let (x, r, w) = (filled(0, 0.0)?, filled(0, 0.0)?, buf(&randn(2, n * k))?);
    for (grads, want) in [(GradStore::Accumulate, 7.0), (GradStore::Write, 0.0)] {
        let (dw, db) = (filled(n * k, 7.0)?, filled(n, 7.0)?);
        Cpu.matmul_backward(
            None,
            false,
            lin(dw.tensor()),
            Some(db.tensor()),
            grads,
            r.tensor(),
            x.tensor(),
            lin(w.tensor()),
            0,
            k,
            n,
        )?;
        for (name, t) in [("dweight", &dw), ("dbias", &db)] {
            let got = read(t.tensor())?;
            assert!(got.iter().all(|&v| v == want), "{grads:?} {name}: {got:?}");
        }
    }
    Ok(())
}
