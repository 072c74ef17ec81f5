//! Multi-head self-attention, fused per (batch, head): scores, masked softmax and the weighted
//! sum of values run in one task on data that stays in cache. Heads read and write their own
//! columns of the packed `[rows, 3 * E]` q|k|v and `[rows, E]` buffers in place, for either
//! token layout (`batch_first` or not), so no head is ever copied out.

use super::head_gemm::{product, Causal, Mat};
use super::softmax;
use super::transpose::{copy_column, transpose_block, TILE};
use super::{dropout, simd_fn, SendPtr};
use crate::{AttentionShape, Dropout};
use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    // Per-thread scratch, grown once: the step allocates nothing after the first.
    static TILES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Scratch for one head: two `[seq, seq]` tiles (dropped probabilities, dS) and a
/// `[head_dim, seq]` one (a transposed K or V, so every product reads its right operand by rows).
struct Tiles<'a> {
    probs: &'a mut [f32],
    ds: &'a mut [f32],
    transposed: &'a mut [f32],
}

fn with_tiles<R>(seq: usize, dh: usize, f: impl FnOnce(Tiles) -> R) -> R {
    TILES.with(|t| {
        let mut t = t.borrow_mut();
        let len = 2 * seq * seq + dh * seq;
        if t.len() < len {
            t.resize(len, 0.0);
        }
        let (probs, rest) = t[..len].split_at_mut(seq * seq);
        let (ds, transposed) = rest.split_at_mut(seq * seq);
        f(Tiles {
            probs,
            ds,
            transposed,
        })
    })
}

/// `out[d, j] = x[j * ld + d]`: one head's `[seq, dh]` keys or values, transposed, as a right
/// operand.
///
/// SAFETY: `x` must address `seq` rows of `dh` values at stride `ld`.
unsafe fn transpose_head(out: &mut [f32], x: *const f32, ld: usize, seq: usize, dh: usize) -> Mat {
    for j0 in (0..seq).step_by(TILE) {
        for d0 in (0..dh).step_by(TILE) {
            let (height, width) = (TILE.min(seq - j0), TILE.min(dh - d0));
            let src = |j: usize| std::slice::from_raw_parts(x.add((j0 + j) * ld + d0), width);
            transpose_block(height, width, src, |d, column| {
                copy_column(&mut out[(d0 + d) * seq + j0..][..height], column)
            });
        }
    }
    Mat(out.as_ptr(), seq, 1)
}

/// Asks for one head's `[seq, dh]` rows at stride `ld` to be brought into L2: issued for the
/// next head while this one computes, so its strided rows (a few lines each, far apart) arrive
/// from L3 without stalling the products that walk them.
fn prefetch_head(x: *const f32, ld: usize, seq: usize, dh: usize) {
    #[cfg(target_arch = "x86_64")]
    for j in 0..seq {
        for d in (0..dh).step_by(16) {
            let line = x.wrapping_add(j * ld + d) as *const i8;
            // SAFETY: prefetching is only a hint; it never faults, whatever the address.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line) };
        }
    }
}

/// [`prefetch_head`] of the q, k and v of head `bh` (`b * heads + h`), if there is one.
fn prefetch_qkv(qkv: &[f32], s: &AttentionShape, bh: usize) {
    if bh < s.batch * s.heads {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let (r0, step) = head_rows(s, b);
        let e = s.width();
        for part in 0..3 {
            let first = r0 * 3 * e + part * e + h * s.head_dim;
            prefetch_head(qkv[first..].as_ptr(), step * 3 * e, s.seq, s.head_dim);
        }
    }
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

/// How much of each product a causal mask lets [`product`] skip (everything is computed without
/// one).
fn causal(s: &AttentionShape, mode: Causal) -> Causal {
    if s.causal {
        mode
    } else {
        Causal::Full
    }
}

/// How many keys query `i` sees before key padding: `0..visible_keys`.
fn visible_keys(s: &AttentionShape, i: usize) -> usize {
    if s.causal {
        i + 1
    } else {
        s.seq
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
            prefetch_qkv(qkv, s, bh + 1);
            with_tiles(seq, dh, |t| {
                // SAFETY: q, k, v address seq tokens of dh columns inside qkv; p is this task's
                // tile; this head owns columns h*dh..(h+1)*dh of its batch element's output rows.
                let kt = unsafe { transpose_head(t.transposed, k, ld, seq, dh) };
                // Scores of each query against the keys it can see; the rest of each row is
                // masked below without being read.
                unsafe {
                    product(
                        Mat(p.as_mut_ptr(), seq, 1),
                        false,
                        Mat(q, ld, 1),
                        kt,
                        (seq, dh, seq),
                        causal(s, Causal::Lower),
                    );
                }
                if key_padding.is_some() || !softmax::forward(p, seq, |i| visible_keys(s, i), scale)
                {
                    softmax_simd(p, s, key_padding, b, scale);
                }
                let pd = dropped(p, t.probs, d, bh * seq * seq);
                // The probabilities past the diagonal are exactly zero and are skipped.
                unsafe {
                    product(
                        Mat(out_ptr.at(r0 * e + h * dh), step * e, 1),
                        false,
                        Mat(pd.as_ptr(), seq, 1),
                        Mat(v, ld, 1),
                        (seq, seq, dh),
                        causal(s, Causal::SumToRow),
                    );
                }
            });
        });
}

simd_fn!(softmax_simd => softmax(p: &mut [f32], s: &AttentionShape, key_padding: Option<&[f32]>, b: usize, scale: f32));

/// Scaled, masked softmax of each row of one head's `[seq, seq]` scores, in place. Keys past
/// the causal limit are zeroed without being read.
#[inline(always)]
fn softmax(p: &mut [f32], s: &AttentionShape, key_padding: Option<&[f32]>, b: usize, scale: f32) {
    let seq = s.seq;
    for i in 0..seq {
        let row = &mut p[i * seq..(i + 1) * seq];
        let (row, hidden) = row.split_at_mut(visible_keys(s, i));
        hidden.fill(0.0);
        let mut max = f32::NEG_INFINITY;
        match key_padding {
            // Branch-free, so it vectorises.
            None => {
                row.iter_mut().for_each(|x| *x *= scale);
                max = super::math::lane_max(row.len(), |j| row[j]);
            }
            Some(_) => {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if masked(s, key_padding, b, i, j) {
                        f32::NEG_INFINITY
                    } else {
                        *x * scale
                    };
                    max = max.max(*x);
                }
            }
        }
        if max == f32::NEG_INFINITY {
            // Every key masked: attend to nothing rather than produce NaN.
            row.fill(0.0);
            continue;
        }
        let inv = 1.0 / super::math::exp_shifted(row, max);
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

simd_fn!(softmax_backward_simd => softmax_backward(ds: &mut [f32], p: &[f32], s: &AttentionShape, scale: f32));

/// `dS = att * (dP - rowsum(att * dP)) * scale` in place of one head's `dP`; zero past the
/// keys each query sees (where dP was not computed, and att is zero).
#[inline(always)]
fn softmax_backward(ds: &mut [f32], p: &[f32], s: &AttentionShape, scale: f32) {
    let seq = s.seq;
    for i in 0..seq {
        let n = visible_keys(s, i);
        let (pr, dr) = (&p[i * seq..i * seq + n], &mut ds[i * seq..(i + 1) * seq]);
        let (dr, rest) = dr.split_at_mut(n);
        rest.fill(0.0);
        let dot = super::math::lane_sum(n, |j| pr[j] * dr[j]);
        // A `for` loop, not `for_each` with a closure: the closure was compiled out of line,
        // for the baseline instead of the SIMD level of this function.
        for (x, &a) in dr.iter_mut().zip(pr) {
            *x = a * (*x - dot) * scale;
        }
    }
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
        prefetch_qkv(qkv, s, bh + 1);
        if bh + 1 < s.batch * s.heads {
            let (nb, nh) = ((bh + 1) / s.heads, (bh + 1) % s.heads);
            let (nr0, nstep) = head_rows(s, nb);
            prefetch_head(dout[nr0 * e + nh * dh..].as_ptr(), nstep * e, seq, dh);
        }
        with_tiles(seq, dh, |t| {
            let pd = dropped(p, t.probs, d, bh * seq * seq);
            let ds = t.ds;
            // SAFETY: operands address seq tokens of dh columns; this head owns its columns of
            // dqkv. Under a causal mask, key j of dv only gathers from the queries that see it,
            // query i of dP only needs the keys it sees, and dS is zero past the diagonal.
            let vt = unsafe { transpose_head(t.transposed, v, ld, seq, dh) };
            unsafe {
                product(
                    Mat(dv, ld, 1),
                    false,
                    Mat(pd.as_ptr(), 1, seq),
                    Mat(go, step * e, 1),
                    (seq, seq, dh),
                    causal(s, Causal::SumFromRow),
                );
                product(
                    Mat(ds.as_mut_ptr(), seq, 1),
                    false,
                    Mat(go, step * e, 1),
                    vt,
                    (seq, dh, seq),
                    causal(s, Causal::Lower),
                );
            }
            if let Some(d) = d {
                dropout::blocks(Some(d), bh * seq * seq, seq * seq, |r, mul| {
                    let mul = mul.expect("dropout given");
                    ds[r].iter_mut().zip(mul).for_each(|(x, m)| *x *= m);
                });
            }
            if !softmax::backward(ds, p, seq, |i| visible_keys(s, i), scale) {
                softmax_backward_simd(ds, p, s, scale);
            }
            unsafe {
                product(
                    Mat(dq, ld, 1),
                    false,
                    Mat(ds.as_ptr(), seq, 1),
                    Mat(k, ld, 1),
                    (seq, seq, dh),
                    causal(s, Causal::SumToRow),
                );
                product(
                    Mat(dk, ld, 1),
                    false,
                    Mat(ds.as_ptr(), 1, seq),
                    Mat(q, ld, 1),
                    (seq, seq, dh),
                    causal(s, Causal::SumFromRow),
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

#[cfg(test)]
mod tests {
    use super::super::assert_close as close;
    use super::*;

    /// The AVX-512 softmax rows (`super::softmax`) against the portable loops, causal and not,
    /// for a tile whose rows end mid-vector.
    #[test]
    fn avx512_softmax_rows_match_the_portable_loops() {
        let seq = 37;
        let mut scores: Vec<f32> = (0..seq * seq)
            .map(|i| (i as f32 * 0.37).sin() * 4.0)
            .collect();
        // Under the causal mask, row 0 then sees only -inf: it attends to nothing.
        scores[0] = f32::NEG_INFINITY;
        let dp: Vec<f32> = (0..seq * seq).map(|i| (i as f32 * 0.13).cos()).collect();
        for causal in [false, true] {
            let s = AttentionShape {
                batch: 1,
                seq,
                heads: 1,
                head_dim: 16,
                batch_first: true,
                causal,
            };
            let (mut want, mut got) = (scores.clone(), scores.clone());
            softmax(&mut want, &s, None, 0, 0.25);
            if !softmax::forward(&mut got, seq, |i| visible_keys(&s, i), 0.25) {
                return; // no AVX-512 here
            }
            close(&got, &want);
            let (mut want_ds, mut got_ds) = (dp.clone(), dp.clone());
            softmax_backward(&mut want_ds, &want, &s, 0.25);
            assert!(softmax::backward(
                &mut got_ds,
                &want,
                seq,
                |i| visible_keys(&s, i),
                0.25
            ));
            close(&got_ds, &want_ds);
        }
    }
}
