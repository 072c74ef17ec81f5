//! `torch.optim.AdamW` over a flat buffer, and the sum of squares for global-norm clipping.

use super::math::lane_sum_f64;
use super::transpose::{copy_column, transpose_block, TILE};
use super::{deterministic_sum, simd_fn, SendPtr, CHUNK};
use crate::AdamW;
use rayon::prelude::*;

/// One AdamW update, in PyTorch's order of operations:
/// p *= 1 - lr*wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
/// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
/// With a mirror `(out, rows, cols)`, also `out[cols, rows] = p^T`, a slab of rows at a time
/// while the slab is still in cache.
pub(crate) fn step(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: &AdamW,
    mirror: Option<(&mut [f32], usize, usize)>,
) {
    let t = hp.step as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let c = Consts {
        beta1: hp.beta1,
        beta2: hp.beta2,
        eps: hp.eps,
        bc2_sqrt: (1.0 - (hp.beta2 as f64).powi(t)).sqrt() as f32,
        step_size: (hp.lr as f64 / bc1) as f32,
        decay: 1.0 - hp.lr * hp.weight_decay,
    };
    // Row slabs for a mirrored matrix (16 rows: one cache line of each mirror row), plain
    // chunks otherwise.
    let (chunk, mirror) = match mirror {
        Some((out, rows, cols)) => {
            assert_eq!(param.len(), rows * cols);
            (TILE * cols, Some((SendPtr(out.as_mut_ptr()), rows, cols)))
        }
        None => (CHUNK, None),
    };
    param
        .par_chunks_mut(chunk)
        .zip(m.par_chunks_mut(chunk))
        .zip(v.par_chunks_mut(chunk))
        .enumerate()
        .for_each(|(i, ((p, m), v))| {
            let g = &grad[i * chunk..i * chunk + p.len()];
            update_simd(p, g, m, v, &c);
            if let Some((out, rows, cols)) = mirror {
                let (r0, height) = (i * TILE, p.len() / cols);
                for c0 in (0..cols).step_by(TILE) {
                    let width = TILE.min(cols - c0);
                    let src = |r: usize| &p[r * cols + c0..r * cols + c0 + width];
                    transpose_block(height, width, src, |j, column| {
                        // SAFETY: this slab owns rows r0..r0 + height of the matrix, i.e.
                        // those columns of every mirror row; (c0 + j) * rows + r0 + height
                        // <= rows * cols.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(out.at((c0 + j) * rows + r0), height)
                        };
                        copy_column(dst, column);
                    });
                }
            }
        });
}

struct Consts {
    beta1: f32,
    beta2: f32,
    eps: f32,
    bc2_sqrt: f32,
    step_size: f32,
    decay: f32,
}

simd_fn!(update_simd => update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &Consts));

#[inline(always)]
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &Consts) {
    for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        *m += (1.0 - c.beta1) * (g - *m);
        *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
        let denom = v.sqrt() / c.bc2_sqrt + c.eps;
        *p = *p * c.decay - c.step_size * *m / denom;
    }
}

pub(crate) fn sum_squares(x: &[f32]) -> f64 {
    deterministic_sum(x.len(), CHUNK, |r| squares(&x[r]))
}

simd_fn!(squares => squares_plain(x: &[f32]) -> f64);

#[inline(always)]
fn squares_plain(x: &[f32]) -> f64 {
    lane_sum_f64(x.len(), |j| (x[j] as f64) * (x[j] as f64))
}
