//! ReLU and GELU (exact and tanh) with fused dropout.

use super::math::tanh;
use super::{dropout, simd_fn, CHUNK};
use crate::{Activation, Dropout};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

#[inline(always)]
fn relu(x: f32) -> f32 {
    x.max(0.0)
}

#[inline(always)]
fn relu_grad(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else {
        0.0
    }
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2))
}

fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() * (FRAC_1_SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5);
    cdf + x * pdf
}

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    0.5 * x * (1.0 + tanh(u))
}

#[inline(always)]
fn gelu_tanh_grad(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    let t = tanh(u);
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
}

simd_fn!(map_simd => map(o: &mut [f32], x: &[f32], m: Option<&[f32]>, f: impl Fn(f32) -> f32 + Copy));
simd_fn!(map_grad_simd => map_grad(di: &mut [f32], g: &[f32], x: &[f32], m: Option<&[f32]>, f: impl Fn(f32) -> f32 + Copy));

/// o = f(x) * m
#[inline(always)]
fn map(o: &mut [f32], x: &[f32], m: Option<&[f32]>, f: impl Fn(f32) -> f32) {
    match m {
        None => o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x)),
        Some(m) => o
            .iter_mut()
            .zip(x)
            .zip(m)
            .for_each(|((o, &x), &m)| *o = f(x) * m),
    }
}

/// di = f'(x) * g * m
#[inline(always)]
fn map_grad(di: &mut [f32], g: &[f32], x: &[f32], m: Option<&[f32]>, f: impl Fn(f32) -> f32) {
    let gx = g.iter().zip(x);
    match m {
        None => di
            .iter_mut()
            .zip(gx)
            .for_each(|(di, (&g, &x))| *di = f(x) * g),
        Some(m) => di
            .iter_mut()
            .zip(gx)
            .zip(m)
            .for_each(|((di, (&g, &x)), &m)| *di = f(x) * g * m),
    }
}

/// out = dropout(act(inp))
pub(crate) fn forward(out: &mut [f32], inp: &[f32], a: Activation, d: Option<Dropout>) {
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(t, out)| {
        let base = t * CHUNK;
        dropout::blocks(d, base, out.len(), |r, mul| {
            let (o, x) = (&mut out[r.clone()], &inp[base + r.start..base + r.end]);
            match a {
                Activation::Relu => map_simd(o, x, mul, relu),
                Activation::Gelu => map(o, x, mul, gelu),
                Activation::GeluTanh => map_simd(o, x, mul, gelu_tanh),
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
            match a {
                Activation::Relu => map_grad_simd(di, g, x, mul, relu_grad),
                Activation::Gelu => map_grad(di, g, x, mul, gelu_grad),
                Activation::GeluTanh => map_grad_simd(di, g, x, mul, gelu_tanh_grad),
            }
        });
    });
}
