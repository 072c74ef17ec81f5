//! `torch.optim.AdamW` over a flat buffer, and the sum of squares for global-norm clipping.

use super::{deterministic_sum, CHUNK};
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
            for j in 0..p.len() {
                m[j] += (1.0 - hp.beta1) * (g[j] - m[j]);
                v[j] = hp.beta2 * v[j] + (1.0 - hp.beta2) * g[j] * g[j];
                let denom = v[j].sqrt() / bc2_sqrt + hp.eps;
                p[j] = p[j] * decay - step_size * m[j] / denom;
            }
        });
}

pub(crate) fn sum_squares(x: &[f32]) -> f64 {
    deterministic_sum(x.len(), CHUNK, |r| {
        x[r].iter().map(|&v| (v as f64) * (v as f64)).sum()
    })
}
