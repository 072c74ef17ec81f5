//! Residual connection with fused dropout on the branch.

use super::{dropout, CHUNK};
use crate::Dropout;
use rayon::prelude::*;

/// out = resid + dropout(inp)
pub(crate) fn forward(out: &mut [f32], resid: &[f32], inp: &[f32], d: Option<Dropout>) {
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(t, out)| {
        let base = t * CHUNK;
        dropout::blocks(d, base, out.len(), |span, mul| {
            let src = base + span.start..base + span.end;
            let (o, r, x) = (&mut out[span], &resid[src.clone()], &inp[src]);
            match mul {
                None => o
                    .iter_mut()
                    .zip(r.iter().zip(x))
                    .for_each(|(o, (&r, &x))| *o = r + x),
                Some(m) => o
                    .iter_mut()
                    .zip(r.iter().zip(x))
                    .zip(m)
                    .for_each(|((o, (&r, &x)), &m)| *o = r + x * m),
            }
        });
    });
}

/// dresid += dout;  dinp = dropout(dout)
pub(crate) fn backward(dresid: &mut [f32], dinp: &mut [f32], dout: &[f32], d: Option<Dropout>) {
    dresid
        .par_chunks_mut(CHUNK)
        .zip(dinp.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(t, (dr, di))| {
            let base = t * CHUNK;
            dropout::blocks(d, base, dr.len(), |span, mul| {
                let g = &dout[base + span.start..base + span.end];
                let (dr, di) = (&mut dr[span.clone()], &mut di[span]);
                for j in 0..g.len() {
                    dr[j] += g[j];
                    di[j] = mul.map_or(g[j], |m| g[j] * m[j]);
                }
            });
        });
}
