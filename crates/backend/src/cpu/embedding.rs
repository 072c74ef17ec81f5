//! Token and position embeddings (GPT-2's `wte` and `wpe`).

use super::{dropout, simd_fn};
use crate::Dropout;
use anyhow::{bail, Result};
use rayon::prelude::*;

/// out[r] = dropout(wte[ids[r]] + wpe[r % seq])
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    out: &mut [f32],
    ids: &[i32],
    wte: &[f32],
    wpe: &[f32],
    rows: usize,
    seq: usize,
    c: usize,
    d: Option<Dropout>,
) -> Result<()> {
    let vocab = wte.len() / c;
    if let Some((r, &id)) = ids[..rows]
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= vocab)
    {
        bail!("token id {id} at position {r} is outside the vocabulary of {vocab} tokens");
    }
    out[..rows * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(r, o)| {
            let (t, p) = (ids[r] as usize, r % seq);
            let (te, pe) = (&wte[t * c..(t + 1) * c], &wpe[p * c..(p + 1) * c]);
            dropout::blocks(d, r * c, c, |span, mul| {
                for j in span.clone() {
                    let m = mul.map_or(1.0, |m| m[j - span.start]);
                    o[j] = (te[j] + pe[j]) * m;
                }
            });
        });
    Ok(())
}

/// dwte[ids[r]] += g[r];  dwpe[r % seq] += g[r];  g = dropout(dout)
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    ids: &[i32],
    rows: usize,
    seq: usize,
    c: usize,
    d: Option<Dropout>,
) {
    // Tasks own blocks of channels and walk the tokens in order: no two tasks write the same
    // element, and every sum has the same order for any thread count.
    const COLS: usize = 64;
    let blocks = c.div_ceil(COLS);
    let (te, pe) = (
        super::SendPtr(dwte.as_mut_ptr()),
        super::SendPtr(dwpe.as_mut_ptr()),
    );
    (0..blocks).into_par_iter().for_each(|blk| {
        let (c0, c1) = (blk * COLS, ((blk + 1) * COLS).min(c));
        let mut mul = [1.0f32; COLS];
        for r in 0..rows {
            if let Some(d) = d {
                crate::philox::dropout_multipliers(&d, r * c + c0, &mut mul[..c1 - c0]);
            }
            let (t, p) = (ids[r] as usize, r % seq);
            // SAFETY: this task alone writes channels c0..c1 of every row of both tables, and
            // the tables are distinct buffers.
            let (te, pe) = unsafe {
                (
                    std::slice::from_raw_parts_mut(te.at(t * c + c0), c1 - c0),
                    std::slice::from_raw_parts_mut(pe.at(p * c + c0), c1 - c0),
                )
            };
            add_to_both(te, pe, &dout[r * c + c0..r * c + c1], &mul[..c1 - c0]);
        }
    });
}

simd_fn!(add_to_both => add_to_both_plain(a: &mut [f32], b: &mut [f32], g: &[f32], mul: &[f32]));

/// `a += g * mul;  b += g * mul`
#[inline(always)]
fn add_to_both_plain(a: &mut [f32], b: &mut [f32], g: &[f32], mul: &[f32]) {
    for (((a, b), &g), &m) in a.iter_mut().zip(b.iter_mut()).zip(g).zip(mul) {
        let v = g * m;
        *a += v;
        *b += v;
    }
}
