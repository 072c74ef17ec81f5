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
                Activation::GeluTanh => {
                    if !avx512::gelu_tanh(o, x, mul) {
                        map_simd(o, x, mul, gelu_tanh)
                    }
                }
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
                Activation::GeluTanh => {
                    if !avx512::gelu_tanh_grad(di, g, x, mul) {
                        map_grad_simd(di, g, x, mul, gelu_tanh_grad)
                    }
                }
            }
        });
    });
}

/// GPT-2's GELU in AVX-512 intrinsics: the portable form with the compiler's loops around it
/// (a vector body, remainder loops, the library-exact `exp` selects) took about 1.6 times as
/// long. Each returns false, writing nothing, without
/// AVX-512.
mod avx512 {
    #[cfg(target_arch = "x86_64")]
    use super::super::math::avx512::{exp, mask};
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// `o = gelu_tanh(x) * m`
    pub(super) fn gelu_tanh(o: &mut [f32], x: &[f32], m: Option<&[f32]>) -> bool {
        assert!(x.len() == o.len() && m.is_none_or(|m| m.len() == o.len()));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the lengths are checked above.
            unsafe {
                lanes(
                    o.len(),
                    m,
                    |i, k| gelu(k, x.as_ptr().add(i)).0,
                    o.as_mut_ptr(),
                )
            };
            return true;
        }
        false
    }

    /// `di = gelu_tanh'(x) * g * m`
    pub(super) fn gelu_tanh_grad(di: &mut [f32], g: &[f32], x: &[f32], m: Option<&[f32]>) -> bool {
        assert!(x.len() == di.len() && g.len() == di.len());
        assert!(m.is_none_or(|m| m.len() == di.len()));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: as above.
            unsafe {
                let grad = |i: usize, k| {
                    let d = gelu(k, x.as_ptr().add(i)).1;
                    _mm512_mul_ps(d, _mm512_maskz_loadu_ps(k, g.as_ptr().add(i)))
                };
                lanes(di.len(), m, grad, di.as_mut_ptr())
            };
            return true;
        }
        false
    }

    /// `out[i..i + 16] = f(i, mask) * m[i..]` over `0..n`, the last vector masked.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn lanes(
        n: usize,
        m: Option<&[f32]>,
        f: impl Fn(usize, __mmask16) -> __m512,
        out: *mut f32,
    ) {
        for i in (0..n).step_by(16) {
            let k = mask(n - i);
            let mut v = f(i, k);
            if let Some(m) = m {
                v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, m.as_ptr().add(i)));
            }
            _mm512_mask_storeu_ps(out.add(i), k, v);
        }
    }

    /// `(gelu_tanh(x), gelu_tanh'(x))` of the masked lanes at `x`, in the portable functions'
    /// arithmetic: `tanh(u) = 1 - 2 / (e^{2u} + 1)`, then `0.5 x (1 + tanh(u))`, which is how
    /// PyTorch rounds it too (`x sigmoid(2u)` is the same function but rounds differently for
    /// negative `x`, and AdamW's normalised updates make that visible within a few steps).
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn gelu(k: __mmask16, x: *const f32) -> (__m512, __m512) {
        let c = _mm512_set1_ps;
        let x = _mm512_maskz_loadu_ps(k, x);
        let x2 = _mm512_mul_ps(x, x);
        let u = _mm512_mul_ps(
            c(super::SQRT_2_OVER_PI),
            _mm512_fmadd_ps(_mm512_mul_ps(x2, x), c(0.044715), x),
        );
        let e = exp(_mm512_add_ps(u, u));
        let t = _mm512_sub_ps(c(1.0), _mm512_div_ps(c(2.0), _mm512_add_ps(e, c(1.0))));
        let half_x = _mm512_mul_ps(c(0.5), x);
        let du = _mm512_mul_ps(
            c(super::SQRT_2_OVER_PI),
            _mm512_fmadd_ps(x2, c(3.0 * 0.044715), c(1.0)),
        );
        let half_1_plus_t = _mm512_mul_ps(c(0.5), _mm512_add_ps(c(1.0), t));
        let slope = _mm512_mul_ps(_mm512_mul_ps(half_x, _mm512_fnmadd_ps(t, t, c(1.0))), du);
        (
            _mm512_mul_ps(half_x, _mm512_add_ps(c(1.0), t)),
            _mm512_add_ps(half_1_plus_t, slope),
        )
    }
}
#[cfg(test)]
mod tests {
    use super::super::assert_close as close;
    use super::*;

    /// The AVX-512 GELU (value and gradient, with and without a dropout mask, over lengths that
    /// end mid-vector) against the portable loops, which the gradient checks cover elsewhere.
    #[test]
    fn avx512_gelu_tanh_matches_the_portable_loops() {
        for n in [1, 15, 16, 17, 100] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 6.0).collect();
            let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let m: Vec<f32> = (0..n).map(|i| (i % 3) as f32 * 0.5).collect();
            for mask in [None, Some(&m[..])] {
                let (mut want, mut got) = (vec![0.0; n], vec![7.0; n]);
                map(&mut want, &x, mask, gelu_tanh);
                if !avx512::gelu_tanh(&mut got, &x, mask) {
                    return; // no AVX-512 here
                }
                close(&got, &want);
                map_grad(&mut want, &g, &x, mask, gelu_tanh_grad);
                assert!(avx512::gelu_tanh_grad(&mut got, &g, &x, mask));
                close(&got, &want);
            }
        }
    }
}
