//! ReLU and GELU (exact and tanh) with fused dropout.

use super::{dropout, CHUNK};
use crate::{Activation, Dropout};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

fn act(a: Activation, x: f32) -> f32 {
    match a {
        Activation::Relu => x.max(0.0),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + u.tanh())
        }
    }
}

fn act_grad(a: Activation, x: f32) -> f32 {
    match a {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2));
            let pdf =
                (-0.5 * x * x).exp() * (FRAC_1_SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5);
            cdf + x * pdf
        }
        Activation::GeluTanh => {
            let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
            let t = u.tanh();
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
        }
    }
}

/// out = dropout(act(inp))
pub(crate) fn forward(out: &mut [f32], inp: &[f32], a: Activation, d: Option<Dropout>) {
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(t, out)| {
        let base = t * CHUNK;
        dropout::blocks(d, base, out.len(), |r, mul| {
            let (o, x) = (&mut out[r.clone()], &inp[base + r.start..base + r.end]);
            match mul {
                None => o.iter_mut().zip(x).for_each(|(o, &x)| *o = act(a, x)),
                Some(m) => o
                    .iter_mut()
                    .zip(x)
                    .zip(m)
                    .for_each(|((o, &x), &m)| *o = act(a, x) * m),
            }
        });
    });
}

/// dinp = act'(inp) * dropout(dout)
pub(crate) fn backward(
    dinp: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    a: Activation,
    d: Option<Dropout>,
) {
    dinp.par_chunks_mut(CHUNK).enumerate().for_each(|(t, di)| {
        let base = t * CHUNK;
        dropout::blocks(d, base, di.len(), |r, mul| {
            let span = base + r.start..base + r.end;
            let (di, g, x) = (&mut di[r], &dout[span.clone()], &inp[span]);
            match mul {
                None => di
                    .iter_mut()
                    .zip(g.iter().zip(x))
                    .for_each(|(di, (&g, &x))| *di = act_grad(a, x) * g),
                Some(m) => di
                    .iter_mut()
                    .zip(g.iter().zip(x))
                    .zip(m)
                    .for_each(|((di, (&g, &x)), &m)| *di = act_grad(a, x) * g * m),
            }
        });
    });
}
