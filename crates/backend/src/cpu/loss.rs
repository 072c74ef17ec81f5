//! Losses fused with their gradient: one pass writes `dinp` and returns the mean loss.

use super::{deterministic_sum, CHUNK};
use anyhow::{bail, Result};
use rayon::prelude::*;

/// `F.mse_loss(inp, target)`; dinp = 2 (inp - target) / n
pub(crate) fn mse(dinp: &mut [f32], inp: &[f32], target: &[f32]) -> f32 {
    let n = inp.len();
    let scale = 2.0 / n as f32;
    dinp.par_chunks_mut(CHUNK).enumerate().for_each(|(t, d)| {
        let base = t * CHUNK;
        for (j, d) in d.iter_mut().enumerate() {
            *d = scale * (inp[base + j] - target[base + j]);
        }
    });
    let sum = deterministic_sum(n, CHUNK, |r| {
        inp[r.clone()]
            .iter()
            .zip(&target[r])
            .map(|(&x, &y)| ((x - y) as f64).powi(2))
            .sum()
    });
    (sum / n as f64) as f32
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
    dlogits[..rows * vocab]
        .par_chunks_mut(vocab)
        .enumerate()
        .for_each(|(r, d)| {
            let x = &logits[r * vocab..(r + 1) * vocab];
            if targets[r] == IGNORE_INDEX {
                d.fill(0.0);
                return;
            }
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f32 = x.iter().map(|&v| (v - max).exp()).sum();
            for (j, d) in d.iter_mut().enumerate() {
                *d = (x[j] - max).exp() / sum * inv;
            }
            d[targets[r] as usize] -= inv;
        });
    let total = deterministic_sum(rows, 64, |range| {
        range
            .filter(|&r| targets[r] != IGNORE_INDEX)
            .map(|r| {
                let x = &logits[r * vocab..(r + 1) * vocab];
                let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                lse - x[targets[r] as usize] as f64
            })
            .sum()
    });
    Ok((total * inv as f64) as f32)
}
