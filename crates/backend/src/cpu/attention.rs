//! Multi-head self-attention, fused per (batch, head): scores, masked softmax and the weighted
//! sum of values run in one task on data that stays in cache. Heads read and write their own
//! columns of the packed `[rows, 3 * E]` q|k|v and `[rows, E]` buffers in place, for either
//! token layout (`batch_first` or not), so no head is ever copied out.

use super::{dropout, SendPtr};
use crate::{AttentionShape, Dropout};
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    // Two [seq, seq] tiles per thread, grown once: the step allocates nothing after the first.
    static TILES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_tiles<R>(seq: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    TILES.with(|t| {
        let mut t = t.borrow_mut();
        if t.len() < 2 * seq * seq {
            t.resize(2 * seq * seq, 0.0);
        }
        let (a, b) = t[..2 * seq * seq].split_at_mut(seq * seq);
        f(a, b)
    })
}

/// A strided matrix operand: base pointer, row stride, column stride (in elements).
#[derive(Clone, Copy)]
struct Mat(*const f32, usize, usize);

/// `dst (+)= lhs[m, k] @ rhs[k, n]`, single-threaded (parallelism is across heads).
///
/// SAFETY: every operand must address its full extent; `dst` must not be written concurrently.
unsafe fn gemm(dst: Mat, accumulate: bool, lhs: Mat, rhs: Mat, m: usize, k: usize, n: usize) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0 as *mut f32,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// Where head `h` of batch element `b` lives: the row of its token 0, and the row step between
/// consecutive tokens.
fn head_rows(s: &AttentionShape, b: usize) -> (usize, usize) {
    if s.batch_first {
        (b * s.seq, 1)
    } else {
        (b, s.batch)
    }
}

fn masked(s: &AttentionShape, key_padding: Option<&[f32]>, b: usize, i: usize, j: usize) -> bool {
    (s.causal && j > i) || key_padding.is_some_and(|kp| kp[b * s.seq + j] != 0.0)
}

/// Writes `dropout(att)` of one head into `tile` and returns it, or returns `att` unchanged.
fn dropped<'a>(att: &'a [f32], tile: &'a mut [f32], d: Option<Dropout>, start: usize) -> &'a [f32] {
    match d {
        None => att,
        Some(d) => {
            dropout::blocks(Some(d), start, att.len(), |r, mul| {
                let mul = mul.expect("dropout given");
                for (j, t) in r.clone().zip(mul) {
                    tile[j] = att[j] * t;
                }
            });
            tile
        }
    }
}

/// att[b, h, i, j] = softmax_j(q_i . k_j / sqrt(D), masked);  out[row(b, i), h*D..] = dropout(att) @ v
pub(crate) fn forward(
    out: &mut [f32],
    att: &mut [f32],
    qkv: &[f32],
    key_padding: Option<&[f32]>,
    s: &AttentionShape,
    d: Option<Dropout>,
) {
    let (seq, dh, e) = (s.seq, s.head_dim, s.width());
    let scale = 1.0 / (dh as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    att[..s.batch * s.heads * seq * seq]
        .par_chunks_mut(seq * seq)
        .enumerate()
        .for_each(|(bh, p)| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let (r0, step) = head_rows(s, b);
            let q = qkv[r0 * 3 * e + h * dh..].as_ptr();
            let k = qkv[r0 * 3 * e + e + h * dh..].as_ptr();
            let v = qkv[r0 * 3 * e + 2 * e + h * dh..].as_ptr();
            let ld = step * 3 * e;
            // SAFETY: q, k, v address seq tokens of dh columns inside qkv; p is this task's tile.
            unsafe {
                gemm(
                    Mat(p.as_ptr(), seq, 1),
                    false,
                    Mat(q, ld, 1),
                    Mat(k, 1, ld),
                    seq,
                    dh,
                    seq,
                );
            }
            for i in 0..seq {
                let row = &mut p[i * seq..(i + 1) * seq];
                let mut max = f32::NEG_INFINITY;
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if masked(s, key_padding, b, i, j) {
                        f32::NEG_INFINITY
                    } else {
                        *x * scale
                    };
                    max = max.max(*x);
                }
                if max == f32::NEG_INFINITY {
                    // Every key masked: attend to nothing rather than produce NaN.
                    row.fill(0.0);
                    continue;
                }
                let mut sum = 0.0;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
            }
            with_tiles(seq, |tile, _| {
                let pd = dropped(p, tile, d, bh * seq * seq);
                let o = out_ptr.at(r0 * e + h * dh);
                // SAFETY: this head owns columns h*dh..(h+1)*dh of its batch element's rows.
                unsafe {
                    gemm(
                        Mat(o, step * e, 1),
                        false,
                        Mat(pd.as_ptr(), seq, 1),
                        Mat(v, ld, 1),
                        seq,
                        seq,
                        dh,
                    );
                }
            });
        });
}

/// Given dout[rows, E]: dv = dropout(att)^T @ dout;  dP = dropout(dout @ v^T);
/// dS = att * (dP - rowsum(att * dP)) / sqrt(D);  dq = dS @ k;  dk = dS^T @ q
pub(crate) fn backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    s: &AttentionShape,
    d: Option<Dropout>,
) {
    let (seq, dh, e) = (s.seq, s.head_dim, s.width());
    let scale = 1.0 / (dh as f32).sqrt();
    let dqkv_ptr = SendPtr(dqkv.as_mut_ptr());
    (0..s.batch * s.heads).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let (r0, step) = head_rows(s, b);
        let p = &att[bh * seq * seq..(bh + 1) * seq * seq];
        let col = |part: usize| r0 * 3 * e + part * e + h * dh;
        let (q, k, v) = (
            qkv[col(0)..].as_ptr(),
            qkv[col(1)..].as_ptr(),
            qkv[col(2)..].as_ptr(),
        );
        let (dq, dk, dv) = (
            dqkv_ptr.at(col(0)),
            dqkv_ptr.at(col(1)),
            dqkv_ptr.at(col(2)),
        );
        let go = dout[r0 * e + h * dh..].as_ptr();
        let ld = step * 3 * e;
        with_tiles(seq, |tile, ds| {
            let pd = dropped(p, tile, d, bh * seq * seq);
            // SAFETY: operands address seq tokens of dh columns; this head owns its columns of dqkv.
            unsafe {
                gemm(
                    Mat(dv, ld, 1),
                    false,
                    Mat(pd.as_ptr(), 1, seq),
                    Mat(go, step * e, 1),
                    seq,
                    seq,
                    dh,
                );
                gemm(
                    Mat(ds.as_ptr(), seq, 1),
                    false,
                    Mat(go, step * e, 1),
                    Mat(v, 1, ld),
                    seq,
                    dh,
                    seq,
                );
            }
            if let Some(d) = d {
                dropout::blocks(Some(d), bh * seq * seq, seq * seq, |r, mul| {
                    let mul = mul.expect("dropout given");
                    ds[r].iter_mut().zip(mul).for_each(|(x, m)| *x *= m);
                });
            }
            for i in 0..seq {
                let (pr, dr) = (&p[i * seq..(i + 1) * seq], &mut ds[i * seq..(i + 1) * seq]);
                let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                dr.iter_mut()
                    .zip(pr)
                    .for_each(|(x, &a)| *x = a * (*x - dot) * scale);
            }
            // SAFETY: as above.
            unsafe {
                gemm(
                    Mat(dq, ld, 1),
                    false,
                    Mat(ds.as_ptr(), seq, 1),
                    Mat(k, ld, 1),
                    seq,
                    seq,
                    dh,
                );
                gemm(
                    Mat(dk, ld, 1),
                    false,
                    Mat(ds.as_ptr(), 1, seq),
                    Mat(q, ld, 1),
                    seq,
                    seq,
                    dh,
                );
            }
        });
    });
}

/// k_cache[pos] = k;  v_cache[pos] = v;  out = softmax(q . k_j / sqrt(D), j <= pos) @ v_j, per head
pub(crate) fn decode<'a>(
    out: &mut [f32],
    qkv: &[f32],
    k_cache: &'a mut [f32],
    v_cache: &'a mut [f32],
    pos: usize,
    heads: usize,
    dh: usize,
) {
    let e = heads * dh;
    k_cache[pos * e..(pos + 1) * e].copy_from_slice(&qkv[e..2 * e]);
    v_cache[pos * e..(pos + 1) * e].copy_from_slice(&qkv[2 * e..3 * e]);
    let (k_cache, v_cache): (&'a [f32], &'a [f32]) = (k_cache, v_cache);
    let scale = 1.0 / (dh as f32).sqrt();
    out[..e].par_chunks_mut(dh).enumerate().for_each(|(h, o)| {
        let q = &qkv[h * dh..(h + 1) * dh];
        let (ks, vs) = (&k_cache[h * dh..], &v_cache[h * dh..]);
        let head = |cache: &'a [f32], j: usize| &cache[j * e..j * e + dh];
        let scores: Vec<f32> = (0..=pos)
            .map(|j| q.iter().zip(head(ks, j)).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let weights: Vec<f32> = scores.iter().map(|&x| (x - max).exp()).collect();
        let inv = 1.0 / weights.iter().sum::<f32>();
        o.fill(0.0);
        for (j, w) in weights.iter().enumerate() {
            for (o, v) in o.iter_mut().zip(head(vs, j)) {
                *o += w * inv * v;
            }
        }
    });
}
