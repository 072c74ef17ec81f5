//! `nn.LayerNorm` over the last dimension (biased variance, as PyTorch).

use super::math::lane_sum;
use super::simd;
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
            simd(|| {
                for (i, (o, (m, s))) in out
                    .chunks_mut(c)
                    .zip(mean.iter_mut().zip(rstd.iter_mut()))
                    .enumerate()
                {
                    let r = t * rpt + i;
                    let (x, o) = (&inp[r * c..(r + 1) * c], &mut o[..c]);
                    let (weight, bias) = (&weight[..c], &bias[..c]);
                    let mu = lane_sum(c, |j| x[j]) / c as f32;
                    let var = lane_sum(c, |j| (x[j] - mu) * (x[j] - mu)) / c as f32;
                    let rs = 1.0 / (var + eps).sqrt();
                    for j in 0..c {
                        o[j] = (x[j] - mu) * rs * weight[j] + bias[j];
                    }
                    *m = mu;
                    *s = rs;
                }
            })
        });
}

/// dinp (+)= rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * weight;
/// dweight += sum_rows dout * xhat;  dbias += sum_rows dout
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dinp: &mut [f32],
    accumulate: bool,
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    rows: usize,
    c: usize,
) {
    let rpt = rows_per_task(c);
    dinp[..rows * c]
        .par_chunks_mut(rpt * c)
        .enumerate()
        .for_each(|(t, dinp)| {
            simd(|| {
                for (i, di) in dinp.chunks_mut(c).enumerate() {
                    let r = t * rpt + i;
                    let (x, g) = (&inp[r * c..(r + 1) * c], &dout[r * c..(r + 1) * c]);
                    let (weight, di) = (&weight[..c], &mut di[..c]);
                    let (mu, rs) = (mean[r], rstd[r]);
                    let sum_g = lane_sum(c, |j| g[j] * weight[j]);
                    let sum_gx = lane_sum(c, |j| g[j] * weight[j] * (x[j] - mu) * rs);
                    let (mean_g, mean_gx) = (sum_g / c as f32, sum_gx / c as f32);
                    for j in 0..c {
                        let xhat = (x[j] - mu) * rs;
                        let v = rs * (g[j] * weight[j] - mean_g - xhat * mean_gx);
                        di[j] = if accumulate { di[j] + v } else { v };
                    }
                }
            })
        });
    // Parameter gradients: each task owns a block of columns and walks all rows in order, so
    // the sums do not depend on the thread count.
    const COLS: usize = 64;
    dweight[..c]
        .par_chunks_mut(COLS)
        .zip(dbias[..c].par_chunks_mut(COLS))
        .enumerate()
        .for_each(|(blk, (dw, db))| {
            simd(|| {
                let c0 = blk * COLS;
                let w = dw.len();
                let mut aw = [0.0f32; COLS];
                let mut ab = [0.0f32; COLS];
                for r in 0..rows {
                    let (mu, rs) = (mean[r], rstd[r]);
                    let x = &inp[r * c + c0..r * c + c0 + w];
                    let g = &dout[r * c + c0..r * c + c0 + w];
                    for j in 0..w {
                        aw[j] += g[j] * (x[j] - mu) * rs;
                        ab[j] += g[j];
                    }
                }
                for j in 0..w {
                    dw[j] += aw[j];
                    db[j] += ab[j];
                }
            })
        });
}
