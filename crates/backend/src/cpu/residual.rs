//! Residual connection with fused dropout on the branch.

use super::{dropout, simd_fn, CHUNK};
use crate::Dropout;
use rayon::prelude::*;

/// out = resid + dropout(inp)
pub(crate) fn forward(out: &mut [f32], resid: &[f32], inp: &[f32], d: Option<Dropout>) {
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(t, out)| {
        let base = t * CHUNK;
        dropout::blocks(d, base, out.len(), |span, mul| {
            let src = base + span.start..base + span.end;
            add(&mut out[span], &resid[src.clone()], &inp[src], mul);
        });
    });
}

/// dresid = dout;  dinp = dropout(dout)
pub(crate) fn backward(dresid: &mut [f32], dinp: &mut [f32], dout: &[f32], d: Option<Dropout>) {
    dresid
        .par_chunks_mut(CHUNK)
        .zip(dinp.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(t, (dr, di))| {
            let base = t * CHUNK;
            dropout::blocks(d, base, dr.len(), |span, mul| {
                let g = &dout[base + span.start..base + span.end];
                copy_and_mask(&mut dr[span.clone()], &mut di[span], g, mul);
            });
        });
}

simd_fn!(add => add_plain(out: &mut [f32], resid: &[f32], inp: &[f32], mul: Option<&[f32]>));
simd_fn!(copy_and_mask => copy_and_mask_plain(dresid: &mut [f32], dinp: &mut [f32], dout: &[f32], mul: Option<&[f32]>));

#[inline(always)]
fn add_plain(out: &mut [f32], resid: &[f32], inp: &[f32], mul: Option<&[f32]>) {
    let pairs = out.iter_mut().zip(resid.iter().zip(inp));
    match mul {
        None => pairs.for_each(|(o, (&r, &x))| *o = r + x),
        Some(m) => pairs.zip(m).for_each(|((o, (&r, &x)), &m)| *o = r + x * m),
    }
}

#[inline(always)]
fn copy_and_mask_plain(dresid: &mut [f32], dinp: &mut [f32], dout: &[f32], mul: Option<&[f32]>) {
    dresid.copy_from_slice(dout);
    match mul {
        None => dinp.copy_from_slice(dout),
        Some(m) => dinp
            .iter_mut()
            .zip(dout.iter().zip(m))
            .for_each(|(d, (&g, &m))| *d = g * m),
    }
}
