//! `torch.optim.AdamW` over a flat buffer, and the sum of squares for global-norm clipping.

use super::{deterministic_sum, simd, CHUNK};
use crate::AdamW;
use rayon::prelude::*;

/// One AdamW update, in PyTorch's order of operations:
/// p *= 1 - lr*wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
/// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
pub(crate) fn step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamW) {
    let t = hp.step as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bc2_sqrt = (1.0 - (hp.beta2 as f64).powi(t)).sqrt() as f32;
    let step_size = (hp.lr as f64 / bc1) as f32;
    let decay = 1.0 - hp.lr * hp.weight_decay;
    param
        .par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, ((p, m), v))| {
            let g = &grad[c * CHUNK..c * CHUNK + p.len()];
            simd(|| {
                for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                    *m += (1.0 - hp.beta1) * (g - *m);
                    *v = hp.beta2 * *v + (1.0 - hp.beta2) * g * g;
                    let denom = v.sqrt() / bc2_sqrt + hp.eps;
                    *p = *p * decay - step_size * *m / denom;
                }
            })
        });
}

pub(crate) fn sum_squares(x: &[f32]) -> f64 {
    deterministic_sum(x.len(), CHUNK, |r| {
        x[r].iter().map(|&v| (v as f64) * (v as f64)).sum()
    })
}
