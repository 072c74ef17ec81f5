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

/// Query rows per block of causal attention (64 measured a little faster than 32 on GPT tiny):
/// a block of rows `i0..i1` only needs keys `0..i1`
/// (and key block `j0..j1` only queries `j0..`), which skips most of the masked upper triangle
/// of every product. Without a causal mask there is one block.
const CAUSAL_BLOCK: usize = 64;

/// The blocks `(start, end)` over `0..seq`.
fn blocks(s: &AttentionShape) -> impl Iterator<Item = (usize, usize)> {
    let (seq, step) = (s.seq, if s.causal { CAUSAL_BLOCK } else { s.seq.max(1) });
    (0..seq)
        .step_by(step)
        .map(move |i0| (i0, (i0 + step).min(seq)))
}

/// Keys that queries of a block ending at `i1` can see: `0..key_end`.
fn key_end(s: &AttentionShape, i1: usize) -> usize {
    if s.causal {
        i1
    } else {
        s.seq
    }
}

/// Queries that can see keys of a block starting at `j0`: `query_start..seq`.
fn query_start(s: &AttentionShape, j0: usize) -> usize {
    if s.causal {
        j0
    } else {
        0
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
            // Scores of each block of queries against the keys they can see; the rest of each
            // row is masked below without being read.
            for (i0, i1) in blocks(s) {
                let kn = key_end(s, i1);
                // SAFETY: q, k, v address seq tokens of dh columns inside qkv; p is this task's
                // tile.
                unsafe {
                    gemm(
                        Mat(p[i0 * seq..].as_mut_ptr(), seq, 1),
                        false,
                        Mat(q.add(i0 * ld), ld, 1),
                        Mat(k, 1, ld),
                        i1 - i0,
                        dh,
                        kn,
                    );
                }
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
                let inv = 1.0 / super::math::exp_shifted(row, max);
                row.iter_mut().for_each(|x| *x *= inv);
            }
            with_tiles(seq, |tile, _| {
                let pd = dropped(p, tile, d, bh * seq * seq);
                for (i0, i1) in blocks(s) {
                    let o = out_ptr.at((r0 + i0 * step) * e + h * dh);
                    // SAFETY: this head owns columns h*dh..(h+1)*dh of its batch element's rows;
                    // the probabilities past `key_end` are exactly zero and are skipped.
                    unsafe {
                        gemm(
                            Mat(o, step * e, 1),
                            false,
                            Mat(pd[i0 * seq..].as_ptr(), seq, 1),
                            Mat(v, ld, 1),
                            i1 - i0,
                            key_end(s, i1),
                            dh,
                        );
                    }
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
            for (i0, i1) in blocks(s) {
                let q0 = query_start(s, i0);
                // SAFETY: operands address seq tokens of dh columns; this head owns its columns
                // of dqkv. Key block i0..i1 of dv only gathers from queries q0.. that see it;
                // query block i0..i1 of dP only needs the keys it sees.
                unsafe {
                    gemm(
                        Mat(dv.add(i0 * ld), ld, 1),
                        false,
                        Mat(pd[q0 * seq + i0..].as_ptr(), 1, seq),
                        Mat(go.add(q0 * step * e), step * e, 1),
                        i1 - i0,
                        seq - q0,
                        dh,
                    );
                    gemm(
                        Mat(ds[i0 * seq..].as_mut_ptr(), seq, 1),
                        false,
                        Mat(go.add(i0 * step * e), step * e, 1),
                        Mat(v, 1, ld),
                        i1 - i0,
                        dh,
                        key_end(s, i1),
                    );
                }
            }
            if let Some(d) = d {
                dropout::blocks(Some(d), bh * seq * seq, seq * seq, |r, mul| {
                    let mul = mul.expect("dropout given");
                    ds[r].iter_mut().zip(mul).for_each(|(x, m)| *x *= m);
                });
            }
            for i in 0..seq {
                // Past the keys row i can see, dP was not computed (and att is zero): dS is 0.
                let n = if s.causal { i + 1 } else { seq };
                let (pr, dr) = (&p[i * seq..i * seq + n], &mut ds[i * seq..(i + 1) * seq]);
                let (dr, rest) = dr.split_at_mut(n);
                rest.fill(0.0);
                let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                dr.iter_mut()
                    .zip(pr)
                    .for_each(|(x, &a)| *x = a * (*x - dot) * scale);
            }
            for (i0, i1) in blocks(s) {
                let q0 = query_start(s, i0);
                // SAFETY: as above; dS is zero outside the blocks' ranges.
                unsafe {
                    gemm(
                        Mat(dq.add(i0 * ld), ld, 1),
                        false,
                        Mat(ds[i0 * seq..].as_ptr(), seq, 1),
                        Mat(k, ld, 1),
                        i1 - i0,
                        key_end(s, i1),
                        dh,
                    );
                    gemm(
                        Mat(dk.add(i0 * ld), ld, 1),
                        false,
                        Mat(ds[q0 * seq + i0..].as_ptr(), 1, seq),
                        Mat(q.add(q0 * ld), ld, 1),
                        i1 - i0,
                        seq - q0,
                        dh,
                    );
                }
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
