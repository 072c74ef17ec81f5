//! Vectorisable elementary functions: loops over these compile to SIMD code (the library's
//! `expf` is a call per element), within 2 ulp of the library functions.

/// e^x for f32 in plain arithmetic (Cephes' `expf`: x = n ln2 + r, a degree-6 polynomial for
/// e^r, 2^n through the exponent bits), so loops over it vectorise; within 2 ulp of `f32::exp`
/// up to 88, where it saturates (e^88 = 1.7e38); 0 below -87; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // max/min, unlike clamp, turn NaN into a bound: the casts below always see a finite value
    // in range. NaN and the underflow are put back by the selects at the end.
    #[allow(clippy::manual_clamp)] // clamp would keep NaN
    let xc = x.max(-87.0).min(88.0);
    // floor(v) by truncation and a correction: `f32::floor` is a libm call without SSE4.1.
    let v = xc * std::f32::consts::LOG2_E + 0.5;
    // SAFETY: v is in [-125.1, 127.5], so the truncation is in range. A plain `as` cast
    // saturates, which LLVM does not vectorise (it goes through scalar registers).
    let t = unsafe { v.to_int_unchecked::<i32>() } as f32;
    let n = if t > v { t - 1.0 } else { t };
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // SAFETY: n is an integer in [-126, 127], in range for i32.
    let y = y * f32::from_bits(((unsafe { n.to_int_unchecked::<i32>() } + 127) << 23) as u32);
    // Below -87, e^x < 1.7e-38: 0, as `f32::exp` gives for -inf (masked softmax entries).
    if x < -87.0 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// tanh(u) = 1 - 2 / (e^{2u} + 1), with the vectorisable [`exp`]; absolute error ~1e-7.
#[inline(always)]
pub(crate) fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

/// The 16-lane forms of [`exp`] for AVX-512 kernels written with intrinsics.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// The first `n` lanes (all 16 from 16 on).
    #[inline(always)]
    pub(crate) fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// [`super::exp`] on 16 lanes: the same reduction and polynomial (with fused multiply-adds),
    /// 0 below -87, NaN kept.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn exp(x: __m512) -> __m512 {
        let c = _mm512_set1_ps;
        // max/min with x second return x when it is NaN, which the arithmetic below keeps.
        let xc = _mm512_min_ps(c(88.0), _mm512_max_ps(c(-87.0), x));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(
            _mm512_fmadd_ps(xc, c(std::f32::consts::LOG2_E), c(0.5)),
        );
        let r = _mm512_fnmadd_ps(n, c(0.693_359_4), xc);
        let r = _mm512_fnmadd_ps(n, c(-2.121_944_4e-4), r);
        let mut p = c(1.987_569_1e-4);
        for k in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, c(k));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), c(1.0));
        // 2^n through the exponent bits; n is in [-126, 127] after the clamp.
        let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        let y = _mm512_mul_ps(y, _mm512_castsi512_ps(pow2));
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, c(-87.0)), y)
    }
}

super::simd_fn!(pub(crate) exp_shifted => exp_shifted_plain(row: &mut [f32], max: f32) -> f32);

/// `row[j] = e^(row[j] - max)`, returning the sum: the exponentials of a softmax, vectorised.
#[inline(always)]
fn exp_shifted_plain(row: &mut [f32], max: f32) -> f32 {
    row.iter_mut().for_each(|x| *x = exp(*x - max));
    lane_sum(row.len(), |j| row[j])
}

/// The sum of `term(j)` over `0..n` in 16 running sums, one per vector lane, added in a fixed
/// order at the end: this vectorises (a plain `sum()` is one serial chain of dependent adds),
/// and the result does not depend on the SIMD level.
#[inline(always)]
pub(crate) fn lane_sum(n: usize, term: impl Fn(usize) -> f32) -> f32 {
    lane_fold(n, 0.0, term, |a, b| a + b)
}

/// [`lane_sum`] in f64, for sums of many terms (losses, gradient norms).
#[inline(always)]
pub(crate) fn lane_sum_f64(n: usize, term: impl Fn(usize) -> f64) -> f64 {
    lane_fold(n, 0.0, term, |a, b| a + b)
}

/// The largest `term(j)` over `0..n` (`-inf` for none), vectorised like [`lane_sum`].
#[inline(always)]
pub(crate) fn lane_max(n: usize, term: impl Fn(usize) -> f32) -> f32 {
    lane_fold(n, f32::NEG_INFINITY, term, f32::max)
}

#[inline(always)]
fn lane_fold<T: Copy>(
    n: usize,
    init: T,
    term: impl Fn(usize) -> T,
    op: impl Fn(T, T) -> T + Copy,
) -> T {
    let mut lanes = [init; 16];
    let full = n - n % 16;
    for base in (0..full).step_by(16) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane = op(*lane, term(base + l));
        }
    }
    let tail = (full..n).map(term).fold(init, op);
    op(lanes.into_iter().fold(init, op), tail)
}

/// `dst (+)= values`.
#[inline(always)]
pub(crate) fn store(dst: &mut [f32], accumulate: bool, values: &[f32]) {
    if accumulate {
        dst.iter_mut().zip(values).for_each(|(d, v)| *d += v);
    } else {
        dst.copy_from_slice(values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_shifted_matches_the_library_exp_and_sum() {
        let row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut got = row.clone();
        let sum = exp_shifted(&mut got, max);
        // The shift itself is an f32 subtraction; the comparison is of the exponential.
        let want: Vec<f64> = row.iter().map(|&x| ((x - max) as f64).exp()).collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 3e-7 * w, "{g} vs {w}");
        }
        let want_sum: f64 = want.iter().sum();
        assert!((sum as f64 - want_sum).abs() <= 1e-6 * want_sum);
    }

    #[test]
    fn polynomial_exp_and_tanh_match_the_library_ones() {
        for i in -20_000..=20_000 {
            let x = i as f32 * 4e-3;
            let (e, want) = (exp(x) as f64, (x as f64).exp());
            assert!(
                (e - want).abs() <= 3e-7 * want,
                "exp({x}) = {e}, expected {want}"
            );
            let t = tanh(x) as f64;
            assert!((t - (x as f64).tanh()).abs() <= 3e-7, "tanh({x}) = {t}");
        }
        assert_eq!(tanh(1e4), 1.0);
        assert_eq!(tanh(-1e4), -1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), exp(88.0));
        assert!(exp(f32::NAN).is_nan() && tanh(f32::NAN).is_nan());
    }
}
