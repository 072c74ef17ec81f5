//! The row loops of attention's softmax and its backward in AVX-512, for tiles without key
//! padding. Rows are as short as one key under a causal mask, and the compiler's loops (a
//! vector body, then remainder loops) spent most of their time outside the vector body; here
//! a masked vector covers each row's end. The portable loops in `attention` remain for key
//! padding and other CPUs.

/// Row `i` of the `[seq, seq]` tile `p`: `softmax(p[i, ..n] * scale)` for `n = visible(i)`
/// keys (at least one), zero after. Returns false, leaving `p` as it was, without AVX-512.
pub(crate) fn forward(
    p: &mut [f32],
    seq: usize,
    visible: impl Fn(usize) -> usize,
    scale: f32,
) -> bool {
    assert!(p.len() >= seq * seq);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        for i in 0..seq {
            let n = visible(i);
            assert!((1..=seq).contains(&n));
            // SAFETY: the CPU has AVX-512F; the row is `seq` values inside `p` (asserted).
            unsafe { avx512::forward_row(&mut p[i * seq..(i + 1) * seq], n, scale) };
        }
        return true;
    }
    false
}

/// Row `i` of `ds` (holding dP): `dS = att * (dP - sum(att * dP)) * scale` over the first
/// `visible(i)` keys, zero after (where dP was not computed). Returns false without AVX-512.
pub(crate) fn backward(
    ds: &mut [f32],
    p: &[f32],
    seq: usize,
    visible: impl Fn(usize) -> usize,
    scale: f32,
) -> bool {
    assert!(p.len() >= seq * seq && ds.len() >= seq * seq);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        for i in 0..seq {
            let n = visible(i);
            assert!(n <= seq);
            let (ds, p) = (&mut ds[i * seq..(i + 1) * seq], &p[i * seq..(i + 1) * seq]);
            // SAFETY: as above.
            unsafe { avx512::backward_row(ds, p, n, scale) };
        }
        return true;
    }
    false
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::math::avx512::{exp, mask};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward_row(row: &mut [f32], n: usize, scale: f32) {
        let x = row.as_mut_ptr();
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in (0..n).step_by(16) {
            let m = mask(n - c);
            max = _mm512_mask_max_ps(max, m, max, _mm512_maskz_loadu_ps(m, x.add(c)));
        }
        let max = _mm512_reduce_max_ps(max);
        if max == f32::NEG_INFINITY {
            // Every score -inf: attend to nothing rather than produce NaN, as the portable rows.
            row.fill(0.0);
            return;
        }
        // exp((x - max) * scale) = exp(x * scale - max(x * scale)), as `scale` is positive.
        let (max, vscale) = (_mm512_set1_ps(max), _mm512_set1_ps(scale));
        let mut sum = _mm512_setzero_ps();
        for c in (0..n).step_by(16) {
            let m = mask(n - c);
            let v = _mm512_mul_ps(
                _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x.add(c)), max),
                vscale,
            );
            let e = _mm512_maskz_mov_ps(m, exp(v));
            sum = _mm512_add_ps(sum, e);
            _mm512_mask_storeu_ps(x.add(c), m, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for c in (0..n).step_by(16) {
            let m = mask(n - c);
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x.add(c)), inv);
            _mm512_mask_storeu_ps(x.add(c), m, v);
        }
        row[n..].fill(0.0);
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn backward_row(ds: &mut [f32], p: &[f32], n: usize, scale: f32) {
        let (d, a) = (ds.as_mut_ptr(), p.as_ptr());
        let mut dot = _mm512_setzero_ps();
        for c in (0..n).step_by(16) {
            let m = mask(n - c);
            let (dv, av) = (
                _mm512_maskz_loadu_ps(m, d.add(c)),
                _mm512_maskz_loadu_ps(m, a.add(c)),
            );
            dot = _mm512_fmadd_ps(av, dv, dot);
        }
        let (dot, vscale) = (
            _mm512_set1_ps(_mm512_reduce_add_ps(dot)),
            _mm512_set1_ps(scale),
        );
        for c in (0..n).step_by(16) {
            let m = mask(n - c);
            let (dv, av) = (
                _mm512_maskz_loadu_ps(m, d.add(c)),
                _mm512_maskz_loadu_ps(m, a.add(c)),
            );
            let v = _mm512_mul_ps(_mm512_mul_ps(av, _mm512_sub_ps(dv, dot)), vscale);
            _mm512_mask_storeu_ps(d.add(c), m, v);
        }
        ds[n..].fill(0.0);
    }
}
