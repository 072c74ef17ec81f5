//! `nn.LayerNorm` over the last dimension (biased variance, as PyTorch).

use super::math::{lane_sum, store};
use super::simd_fn;
use rayon::prelude::*;

fn rows_per_task(c: usize) -> usize {
    (super::CHUNK / c).max(1)
}

/// out[rows, c] = (inp - mean) * rstd * weight + bias;  mean[rows], rstd[rows] saved
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    rows: usize,
    c: usize,
    eps: f32,
) {
    let rpt = rows_per_task(c);
    out[..rows * c]
        .par_chunks_mut(rpt * c)
        .zip(mean[..rows].par_chunks_mut(rpt))
        .zip(rstd[..rows].par_chunks_mut(rpt))
        .enumerate()
        .for_each(|(t, ((out, mean), rstd))| {
            let inp = &inp[t * rpt * c..];
            for (i, (o, (m, s))) in out
                .chunks_mut(c)
                .zip(mean.iter_mut().zip(rstd.iter_mut()))
                .enumerate()
            {
                let x = &inp[i * c..(i + 1) * c];
                (*m, *s) = forward_row_simd(o, x, &weight[..c], &bias[..c], eps);
            }
        });
}

simd_fn!(forward_row_simd => forward_row(o: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> (f32, f32));

/// One row of [`forward`]; returns its mean and 1 / std.
#[inline(always)]
fn forward_row(o: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> (f32, f32) {
    let c = x.len();
    let mu = lane_sum(c, |j| x[j]) / c as f32;
    let var = lane_sum(c, |j| (x[j] - mu) * (x[j] - mu)) / c as f32;
    let rs = 1.0 / (var + eps).sqrt();
    for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (x - mu) * rs * w + b;
    }
    (mu, rs)
}

/// dinp (+)= rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * weight;
/// dweight += sum_rows dout * xhat;  dbias += sum_rows dout
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dinp: &mut [f32],
    accumulate: bool,
    dweight: &mut [f32],
    dbias: &mut [f32],
    accumulate_grads: bool,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    rows: usize,
    c: usize,
) {
    let rpt = rows_per_task(c);
    let (mean, rstd) = (&mean[..rows], &rstd[..rows]);
    dinp[..rows * c]
        .par_chunks_mut(rpt * c)
        .enumerate()
        .for_each(|(t, dinp)| {
            for (i, di) in dinp.chunks_mut(c).enumerate() {
                let r = t * rpt + i;
                let (x, g) = (&inp[r * c..(r + 1) * c], &dout[r * c..(r + 1) * c]);
                let stats = (mean[r], rstd[r]);
                backward_row_simd(di, accumulate, x, g, &weight[..c], stats);
            }
        });
    // Parameter gradients: each task owns a block of columns and walks all rows in order, so
    // the sums do not depend on the thread count.
    dweight[..c]
        .par_chunks_mut(COLS)
        .zip(dbias[..c].par_chunks_mut(COLS))
        .enumerate()
        .for_each(|(blk, (dw, db))| {
            let columns = (blk * COLS, c);
            param_grads_simd(dw, db, accumulate_grads, columns, dout, inp, (mean, rstd));
        });
}

simd_fn!(backward_row_simd => backward_row(di: &mut [f32], accumulate: bool, x: &[f32], g: &[f32], weight: &[f32], stats: (f32, f32)));

/// One row of [`backward`]'s input gradient.
#[inline(always)]
fn backward_row(
    di: &mut [f32],
    accumulate: bool,
    x: &[f32],
    g: &[f32],
    weight: &[f32],
    (mu, rs): (f32, f32),
) {
    let c = x.len();
    // Equal lengths, visibly to the compiler, so that the indexed sums carry no bounds checks.
    let (g, weight) = (&g[..c], &weight[..c]);
    let sum_g = lane_sum(c, |j| g[j] * weight[j]);
    let sum_gx = lane_sum(c, |j| g[j] * weight[j] * (x[j] - mu) * rs);
    let (mean_g, mean_gx) = (sum_g / c as f32, sum_gx / c as f32);
    let grad = |(&x, &g), &w| rs * (g * w - mean_g - (x - mu) * rs * mean_gx);
    let grads = x.iter().zip(g).zip(weight).map(|(xg, w)| grad(xg, w));
    // Two loops rather than a select per element, which stays scalar.
    match accumulate {
        true => di.iter_mut().zip(grads).for_each(|(d, v)| *d += v),
        false => di.iter_mut().zip(grads).for_each(|(d, v)| *d = v),
    }
}

/// Columns per task of the parameter gradients.
const COLS: usize = 64;

simd_fn!(param_grads_simd => param_grads(dw: &mut [f32], db: &mut [f32], accumulate: bool, columns: (usize, usize), dout: &[f32], inp: &[f32], stats: (&[f32], &[f32])));

/// `dw`, `db` (columns `c0..` of the `c` weight and bias gradients) (+)= their sums over all
/// rows.
#[inline(always)]
fn param_grads(
    dw: &mut [f32],
    db: &mut [f32],
    accumulate: bool,
    (c0, c): (usize, usize),
    dout: &[f32],
    inp: &[f32],
    (mean, rstd): (&[f32], &[f32]),
) {
    let w = dw.len();
    let mut aw = [0.0f32; COLS];
    let mut ab = [0.0f32; COLS];
    for (r, (&mu, &rs)) in mean.iter().zip(rstd).enumerate() {
        let x = &inp[r * c + c0..r * c + c0 + w];
        let g = &dout[r * c + c0..r * c + c0 + w];
        for (((aw, ab), &x), &g) in aw.iter_mut().zip(ab.iter_mut()).zip(x).zip(g) {
            *aw += g * (x - mu) * rs;
            *ab += g;
        }
    }
    store(dw, accumulate, &aw[..w]);
    store(db, accumulate, &ab[..w]);
}
