//! Losses fused with their gradient: one pass writes `dinp` and returns the mean loss.

use super::math::exp_shifted;
use super::math::lane_sum_f64;
use super::{deterministic_sum, simd_fn, SendPtr, CHUNK};
use anyhow::{bail, Result};
use rayon::prelude::*;

/// `F.mse_loss(inp, target)`; dinp = 2 (inp - target) / n
pub(crate) fn mse(dinp: &mut [f32], inp: &[f32], target: &[f32]) -> f32 {
    let n = inp.len();
    let scale = 2.0 / n as f32;
    dinp.par_chunks_mut(CHUNK).enumerate().for_each(|(t, d)| {
        let r = t * CHUNK..t * CHUNK + d.len();
        scaled_difference(d, &inp[r.clone()], &target[r], scale);
    });
    let sum = deterministic_sum(n, CHUNK, |r| squared_error(&inp[r.clone()], &target[r]));
    (sum / n as f64) as f32
}

simd_fn!(scaled_difference => scaled_difference_plain(d: &mut [f32], x: &[f32], y: &[f32], scale: f32));
simd_fn!(squared_error => squared_error_plain(x: &[f32], y: &[f32]) -> f64);

#[inline(always)]
fn scaled_difference_plain(d: &mut [f32], x: &[f32], y: &[f32], scale: f32) {
    for ((d, &x), &y) in d.iter_mut().zip(x).zip(y) {
        *d = scale * (x - y);
    }
}

#[inline(always)]
fn squared_error_plain(x: &[f32], y: &[f32]) -> f64 {
    lane_sum_f64(x.len().min(y.len()), |j| ((x[j] - y[j]) as f64).powi(2))
}

/// PyTorch's `ignore_index` default: rows with this target add nothing to the loss.
pub const IGNORE_INDEX: i32 = -100;

/// `F.cross_entropy(logits[rows, vocab], targets[rows])`, mean over non-ignored rows;
/// dlogits = (softmax(logits) - onehot(target)) / count
pub(crate) fn cross_entropy(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[i32],
    rows: usize,
    vocab: usize,
) -> Result<f32> {
    if let Some((r, &t)) = targets[..rows]
        .iter()
        .enumerate()
        .find(|(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab))
    {
        bail!("target {t} at row {r} is outside the vocabulary of {vocab} tokens");
    }
    let count = targets[..rows]
        .iter()
        .filter(|&&t| t != IGNORE_INDEX)
        .count();
    let inv = if count > 0 { 1.0 / count as f32 } else { 0.0 };
    // One pass per row: the exponentials go straight into `dlogits`, then become the softmax
    // gradient; the row's loss, log(sum) + max - logit[target], comes from the same sum (in
    // f64 from there on). Rows are summed in fixed chunks, so the loss is thread-independent.
    assert!(dlogits.len() >= rows * vocab && logits.len() >= rows * vocab);
    let out = SendPtr(dlogits.as_mut_ptr());
    let total = deterministic_sum(rows, 64, |range| {
        let mut loss = 0.0f64;
        for r in range {
            let x = &logits[r * vocab..(r + 1) * vocab];
            // SAFETY: each row of `dlogits` is written by the one task that owns its range.
            let d = unsafe { std::slice::from_raw_parts_mut(out.at(r * vocab), vocab) };
            if targets[r] == IGNORE_INDEX {
                d.fill(0.0);
                continue;
            }
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            d.copy_from_slice(x);
            let sum = exp_shifted(d, max);
            let scale = inv / sum;
            d.iter_mut().for_each(|v| *v *= scale);
            let t = targets[r] as usize;
            d[t] -= inv;
            loss += (sum as f64).ln() + max as f64 - x[t] as f64;
        }
        loss
    });
    Ok((total * inv as f64) as f32)
}
