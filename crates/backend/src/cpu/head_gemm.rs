//! The small products of one attention head (`[64..S, D]` tiles that are already in cache):
//! a register-blocked kernel that reads its operands in place. The `gemm` crate packs both
//! operands and plans its blocking on every call, which costs as much as the arithmetic at
//! these sizes (thousands of calls per step, each a few hundred kFLOP).

/// A strided matrix operand: base pointer, row stride, column stride (in elements).
#[derive(Clone, Copy)]
pub(crate) struct Mat(pub *const f32, pub usize, pub usize);

/// Which part of a causal product is needed, for row `i` of `dst` (query or key `i`): the rest
/// is skipped a register tile at a time, so a tile that straddles the diagonal still computes
/// (and, for `Lower`, stores) some of it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Causal {
    /// Everything.
    Full,
    /// Columns `j <= i` of `dst` (scores of query `i` against the keys it sees).
    Lower,
    /// Terms `kk <= i` of the sum (the other terms are exact zeros past the diagonal).
    SumToRow,
    /// Terms `kk >= i` of the sum.
    SumFromRow,
}

impl Causal {
    /// The columns and terms to compute for rows `i..i + rows`.
    fn limits(self, i: usize, rows: usize, k: usize, n: usize) -> (usize, std::ops::Range<usize>) {
        match self {
            Causal::Full => (n, 0..k),
            Causal::Lower => (n.min(i + rows), 0..k),
            Causal::SumToRow => (n, 0..k.min(i + rows)),
            Causal::SumFromRow => (n, i.min(k)..k),
        }
    }
}

/// `dst[m, n] (+)= lhs[m, k] @ rhs[k, n]`, single-threaded, skipping what `causal` says is not
/// needed. `dst` and `rhs` must have unit column stride (`dst.2 == rhs.2 == 1`); `lhs` may have
/// any strides (its elements are broadcast one at a time).
///
/// SAFETY: every operand must address its full extent; `dst` must not overlap the inputs or be
/// written concurrently.
pub(crate) unsafe fn product(
    dst: Mat,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    (m, k, n): (usize, usize, usize),
    causal: Causal,
) {
    debug_assert!(dst.2 == 1 && rhs.2 == 1);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return avx512::product(dst, accumulate, lhs, rhs, (m, k, n), causal);
    }
    portable(dst, accumulate, lhs, rhs, (m, k, n), causal)
}

/// The same product for CPUs without AVX-512: a row of `dst` at a time, vectorised by the
/// compiler along `n`.
unsafe fn portable(
    dst: Mat,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    (m, k, n): (usize, usize, usize),
    causal: Causal,
) {
    for i in 0..m {
        let (n, terms) = causal.limits(i, 1, k, n);
        let out = std::slice::from_raw_parts_mut(dst.0.add(i * dst.1) as *mut f32, n);
        if !accumulate {
            out.fill(0.0);
        }
        for kk in terms {
            let a = *lhs.0.add(i * lhs.1 + kk * lhs.2);
            let row = std::slice::from_raw_parts(rhs.0.add(kk * rhs.1), n);
            out.iter_mut().zip(row).for_each(|(o, &b)| *o += a * b);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::math::avx512::mask;
    use super::{Causal, Mat};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Rows per register tile: 8 rows x 2 vectors = 16 accumulators of AVX-512's 32 registers.
    const MR: usize = 8;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(
        dst: Mat,
        accumulate: bool,
        lhs: Mat,
        rhs: Mat,
        (m, k, n): (usize, usize, usize),
        causal: Causal,
    ) {
        let mut i = 0;
        while i < m {
            let rows = if m - i >= MR { MR } else { 1 };
            let (n, terms) = causal.limits(i, rows, k, n);
            let mut j = 0;
            while j < n {
                // Masked loads and stores cover a partial last tile (they never fault past it).
                let cols = 32.min(n - j);
                let masks = (mask(cols), mask(cols.saturating_sub(16)));
                let d = Mat(dst.0.add(i * dst.1 + j), dst.1, 1);
                let l = Mat(lhs.0.add(i * lhs.1), lhs.1, lhs.2);
                let r = Mat(rhs.0.add(j), rhs.1, 1);
                if rows == MR {
                    tile::<MR>(d, accumulate, l, r, terms.clone(), masks);
                } else {
                    tile::<1>(d, accumulate, l, r, terms.clone(), masks);
                }
                j += 32;
            }
            i += rows;
        }
    }

    /// One `R x 32` tile of `dst`, its accumulators held in registers over the whole sum.
    #[inline(always)]
    unsafe fn tile<const R: usize>(
        dst: Mat,
        accumulate: bool,
        lhs: Mat,
        rhs: Mat,
        terms: Range<usize>,
        (m0, m1): (__mmask16, __mmask16),
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for kk in terms {
            let row = rhs.0.add(kk * rhs.1);
            let b0 = _mm512_maskz_loadu_ps(m0, row);
            // `wrapping_add`: with a mask of 0 the address may lie past the operand.
            let b1 = _mm512_maskz_loadu_ps(m1, row.wrapping_add(16));
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*lhs.0.add(r * lhs.1 + kk * lhs.2));
                acc[0] = _mm512_fmadd_ps(a, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(a, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let out = dst.0.add(r * dst.1) as *mut f32;
            let (mut o0, mut o1) = (acc[0], acc[1]);
            if accumulate {
                o0 = _mm512_add_ps(o0, _mm512_maskz_loadu_ps(m0, out));
                o1 = _mm512_add_ps(o1, _mm512_maskz_loadu_ps(m1, out.wrapping_add(16)));
            }
            store(out, m0, o0);
            store(out.wrapping_add(16), m1, o1);
        }
    }

    /// `_mm512_mask_storeu_ps`, but a plain store when every lane is set: masked stores are
    /// slow on some CPUs (AMD's Zen 4) even then, and whole vectors are the usual case.
    #[inline(always)]
    unsafe fn store(p: *mut f32, m: __mmask16, v: __m512) {
        if m == u16::MAX {
            _mm512_storeu_ps(p, v)
        } else {
            _mm512_mask_storeu_ps(p, m, v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Kernel = unsafe fn(Mat, bool, Mat, Mat, (usize, usize, usize), Causal);

    /// Every path (row tiles and single rows, full and partial column tiles, strided and
    /// transposed lhs, accumulate, each causal mode) of both kernels against a plain f64 loop.
    #[test]
    fn matches_a_triple_loop() {
        let mut kernels: Vec<(&str, Kernel)> = vec![("portable", portable)];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            kernels.push(("avx512", avx512::product));
        }
        let modes = [
            Causal::Full,
            Causal::Lower,
            Causal::SumToRow,
            Causal::SumFromRow,
        ];
        for (name, kernel) in kernels {
            for &dims in &[
                (1, 1, 1),
                (10, 64, 10),
                (64, 32, 128),
                (13, 7, 45),
                (9, 33, 32),
            ] {
                for t in [false, true] {
                    for acc in [false, true] {
                        for causal in modes {
                            check(name, kernel, dims, t, acc, causal);
                        }
                    }
                }
            }
        }
    }

    fn check(
        name: &str,
        kernel: Kernel,
        (m, k, n): (usize, usize, usize),
        t: bool,
        acc: bool,
        causal: Causal,
    ) {
        // The sum modes require exact zeros in the terms they skip (as attention has).
        let skipped = |i: usize, p: usize| match causal {
            Causal::SumToRow => p > i,
            Causal::SumFromRow => p < i,
            _ => false,
        };
        let (lrs, lcs) = if t { (1, m) } else { (k, 1) };
        let mut lhs = vec![0.0f32; m * k];
        for i in 0..m {
            for p in 0..k {
                if !skipped(i, p) {
                    lhs[i * lrs + p * lcs] = ((i * k + p) as f32 * 0.37).sin();
                }
            }
        }
        let rhs: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        // Padding past each row that must be neither read into the result nor written.
        let (ldr, ldst) = (n + 3, n + 5);
        let mut rhs_strided = vec![f32::NAN; k * ldr];
        for p in 0..k {
            rhs_strided[p * ldr..p * ldr + n].copy_from_slice(&rhs[p * n..][..n]);
        }
        let mut dst = vec![0.5f32; m * ldst];
        // SAFETY: the strides address exactly the vectors above.
        unsafe {
            kernel(
                Mat(dst.as_mut_ptr(), ldst, 1),
                acc,
                Mat(lhs.as_ptr(), lrs, lcs),
                Mat(rhs_strided.as_ptr(), ldr, 1),
                (m, k, n),
                causal,
            );
        }
        for i in 0..m {
            for j in 0..ldst {
                let got = dst[i * ldst + j] as f64;
                let want = if j < n {
                    if causal == Causal::Lower && j > i {
                        continue; // not needed: may hold anything
                    }
                    let dot: f64 = (0..k)
                        .map(|p| lhs[i * lrs + p * lcs] as f64 * rhs[p * n + j] as f64)
                        .sum();
                    dot + if acc { 0.5 } else { 0.0 }
                } else {
                    0.5
                };
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{name} [{m},{k},{n}] t={t} acc={acc} {causal:?} ({i},{j}): {got} vs {want}"
                );
            }
        }
    }
}
