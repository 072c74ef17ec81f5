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
                (*m, *s) = match avx512::forward_row(o, x, &weight[..c], &bias[..c], eps) {
                    Some(stats) => stats,
                    None => forward_row_simd(o, x, &weight[..c], &bias[..c], eps),
                };
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
                if !avx512::backward_row(di, accumulate, x, g, &weight[..c], stats) {
                    backward_row_simd(di, accumulate, x, g, &weight[..c], stats);
                }
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

/// The rows in AVX-512 intrinsics: the portable rows' sums (`lane_sum` over an indexing
/// closure) compile to scalar adds, one per element. `None` / false without AVX-512.
mod avx512 {
    #[cfg(target_arch = "x86_64")]
    use super::super::math::avx512::mask;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// [`super::forward_row`].
    pub(super) fn forward_row(
        o: &mut [f32],
        x: &[f32],
        weight: &[f32],
        bias: &[f32],
        eps: f32,
    ) -> Option<(f32, f32)> {
        let c = x.len();
        assert!(o.len() == c && weight.len() == c && bias.len() == c);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; every access is masked to the `c` elements.
            return Some(unsafe {
                forward(
                    o.as_mut_ptr(),
                    x.as_ptr(),
                    weight.as_ptr(),
                    bias.as_ptr(),
                    c,
                    eps,
                )
            });
        }
        None
    }

    /// [`super::backward_row`].
    pub(super) fn backward_row(
        di: &mut [f32],
        accumulate: bool,
        x: &[f32],
        g: &[f32],
        weight: &[f32],
        stats: (f32, f32),
    ) -> bool {
        let c = x.len();
        assert!(di.len() == c && g.len() == c && weight.len() == c);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            let (d, x, g, w) = (di.as_mut_ptr(), x.as_ptr(), g.as_ptr(), weight.as_ptr());
            // SAFETY: as above.
            unsafe { backward(d, accumulate, x, g, w, c, stats) };
            return true;
        }
        false
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn forward(
        o: *mut f32,
        x: *const f32,
        w: *const f32,
        b: *const f32,
        c: usize,
        eps: f32,
    ) -> (f32, f32) {
        let load = |p: *const f32, j: usize| _mm512_maskz_loadu_ps(mask(c - j), p.add(j));
        let mut sum = _mm512_setzero_ps();
        for j in (0..c).step_by(16) {
            sum = _mm512_add_ps(sum, load(x, j));
        }
        let mu = _mm512_reduce_add_ps(sum) / c as f32;
        let vmu = _mm512_set1_ps(mu);
        let mut sq = _mm512_setzero_ps();
        for j in (0..c).step_by(16) {
            // Masked-off lanes load 0 and give mu^2: keep them out of the sum.
            let d = _mm512_maskz_sub_ps(mask(c - j), load(x, j), vmu);
            sq = _mm512_fmadd_ps(d, d, sq);
        }
        let rs = 1.0 / (_mm512_reduce_add_ps(sq) / c as f32 + eps).sqrt();
        let vrs = _mm512_set1_ps(rs);
        for j in (0..c).step_by(16) {
            let xhat = _mm512_mul_ps(_mm512_sub_ps(load(x, j), vmu), vrs);
            let y = _mm512_fmadd_ps(xhat, load(w, j), load(b, j));
            _mm512_mask_storeu_ps(o.add(j), mask(c - j), y);
        }
        (mu, rs)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn backward(
        di: *mut f32,
        accumulate: bool,
        x: *const f32,
        g: *const f32,
        w: *const f32,
        c: usize,
        (mu, rs): (f32, f32),
    ) {
        let load = |p: *const f32, j: usize| _mm512_maskz_loadu_ps(mask(c - j), p.add(j));
        let (vmu, vrs) = (_mm512_set1_ps(mu), _mm512_set1_ps(rs));
        let (mut sum_g, mut sum_gx) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for j in (0..c).step_by(16) {
            let gw = _mm512_mul_ps(load(g, j), load(w, j));
            // Masked-off lanes stay 0 whatever mu is.
            let xhat = _mm512_mul_ps(_mm512_maskz_sub_ps(mask(c - j), load(x, j), vmu), vrs);
            sum_g = _mm512_add_ps(sum_g, gw);
            sum_gx = _mm512_fmadd_ps(gw, xhat, sum_gx);
        }
        let mean_g = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g) / c as f32);
        let mean_gx = _mm512_set1_ps(_mm512_reduce_add_ps(sum_gx) / c as f32);
        for j in (0..c).step_by(16) {
            let gw = _mm512_mul_ps(load(g, j), load(w, j));
            let xhat = _mm512_mul_ps(_mm512_sub_ps(load(x, j), vmu), vrs);
            let v = _mm512_mul_ps(
                vrs,
                _mm512_sub_ps(_mm512_sub_ps(gw, mean_g), _mm512_mul_ps(xhat, mean_gx)),
            );
            let v = if accumulate {
                _mm512_add_ps(v, load(di, j))
            } else {
                v
            };
            _mm512_mask_storeu_ps(di.add(j), mask(c - j), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::assert_close;
    use super::*;

    /// The AVX-512 rows against the portable ones, for widths that end mid-vector.
    #[test]
    fn avx512_rows_match_the_portable_rows() {
        for c in [1, 7, 16, 33, 128] {
            let at = |k: f32| {
                (0..c)
                    .map(move |i| (i as f32 * k).sin() + 0.3)
                    .collect::<Vec<_>>()
            };
            let (x, g, w, b) = (at(0.7), at(0.3), at(1.1), at(0.2));
            let (mut want, mut got) = (vec![0.0; c], vec![0.0; c]);
            let stats = forward_row(&mut want, &x, &w, &b, 1e-5);
            let Some(got_stats) = avx512::forward_row(&mut got, &x, &w, &b, 1e-5) else {
                return; // no AVX-512 here
            };
            assert_close(&got, &want);
            assert_close(&[got_stats.0, got_stats.1], &[stats.0, stats.1]);
            for accumulate in [false, true] {
                let (mut want, mut got) = (vec![0.5; c], vec![0.5; c]);
                backward_row(&mut want, accumulate, &x, &g, &w, stats);
                assert!(avx512::backward_row(
                    &mut got, accumulate, &x, &g, &w, stats
                ));
                assert_close(&got, &want);
            }
        }
    }
}
