//! `nn.Linear` forward and backward on the `gemm` crate. Transposes are expressed as strides, so
//! no operand is ever copied.

use super::math::store;
use super::simd_fn;
use crate::WeightLayout;
use gemm::Parallelism;
use rayon::prelude::*;

/// Pieces a product is cut into along its larger side, each at least [`MIN_PIECE`] wide: the
/// `gemm` crate threads poorly when one side is small (the weight gradients of a 128-wide model
/// ran on one core), and whole pieces on separate threads do not. The count depends on the shape
/// only, never on the thread count, so results do not either.
const MAX_PIECES: usize = 4;
const MIN_PIECE: usize = 64;

/// What a product is added to.
#[derive(Clone, Copy)]
pub(crate) enum Start<'a> {
    /// Nothing: `dst = lhs @ rhs`.
    Zero,
    /// `dst` itself: `dst += lhs @ rhs`.
    Dst,
    /// A bias per column: `dst = bias + lhs @ rhs`. Each piece writes its part of the bias just
    /// before its product, which then reads it back from cache rather than from a separate pass.
    Bias(&'a [f32]),
}

impl Start<'_> {
    pub(crate) fn accumulate(accumulate: bool) -> Self {
        if accumulate {
            Start::Dst
        } else {
            Start::Zero
        }
    }
}

/// `dst[m, n] = start + lhs[m, k] @ rhs[k, n]` with explicit (row, column) strides for each
/// operand.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    dst: &mut [f32],
    start: Start,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(dst.len() >= m * n);
    if let Start::Bias(bias) = start {
        assert_eq!(bias.len(), n);
    }
    if k == 0 {
        // An empty sum (a weight gradient over zero rows): dst is what it starts from.
        let dst = &mut dst[..m * n];
        match start {
            Start::Zero => dst.fill(0.0),
            Start::Dst => {}
            Start::Bias(bias) => dst
                .chunks_mut(n.max(1))
                .for_each(|row| row.copy_from_slice(bias)),
        }
        return;
    }
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    let split_rows = m >= n;
    let side = m.max(n);
    let pieces = (side / MIN_PIECE).clamp(1, MAX_PIECES);
    let step = side.div_ceil(pieces);
    // Threads left over once every piece has one thread, for the crate to use inside a piece.
    let inner = rayon::current_num_threads().div_ceil(pieces);
    let (dst, lhs, rhs) = (
        super::SendPtr(dst.as_mut_ptr()),
        super::SendPtr(lhs.as_ptr() as *mut f32),
        super::SendPtr(rhs.as_ptr() as *mut f32),
    );
    (0..pieces).into_par_iter().for_each(|piece| {
        let (first, end) = (piece * step, ((piece + 1) * step).min(side));
        let (dst, lhs, rhs, pm, pn, c0) = if split_rows {
            let (dst, lhs) = (dst.at(first * n), lhs.at(first * lhs_rs));
            (dst, lhs, rhs.at(0), end - first, n, 0)
        } else {
            let (dst, rhs) = (dst.at(first), rhs.at(first * rhs_cs));
            (dst, lhs.at(0), rhs, m, end - first, first)
        };
        let accumulate = match start {
            Start::Zero => false,
            Start::Dst => true,
            Start::Bias(bias) => {
                for r in 0..pm {
                    // SAFETY: row r of this piece: pn columns inside dst (asserted above),
                    // written by this piece alone.
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.add(r * n), pn) };
                    row.copy_from_slice(&bias[c0..c0 + pn]);
                }
                true
            }
        };
        // SAFETY: the asserts above keep every access inside the three slices, and the
        // pieces write disjoint rows (or columns) of `dst`.
        unsafe {
            gemm::gemm(
                pm,
                pn,
                k,
                dst,
                1,
                n as isize,
                accumulate,
                lhs,
                lhs_cs as isize,
                lhs_rs as isize,
                rhs,
                rhs_cs as isize,
                rhs_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::Rayon(inner),
            )
        }
    });
}

/// out[rows, n] = inp[rows, k] @ W + bias[n]
pub(crate) fn forward(
    out: &mut [f32],
    inp: &[f32],
    (weight, layout): (&[f32], WeightLayout),
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    n: usize,
) {
    // W[k, n] as strides into the stored matrix; InOut is gemm's fast (row-major) case.
    let strides = match layout {
        WeightLayout::OutIn => (1, k),
        WeightLayout::InOut => (n, 1),
    };
    gemm_strided(
        out,
        bias.map_or(Start::Zero, Start::Bias),
        inp,
        (k, 1),
        weight,
        strides,
        rows,
        k,
        n,
    );
}

/// dinp[rows, k] (+)= dout @ W^T;  dW += inp^T @ dout (stored in its layout);  dbias[n] += sum_rows dout
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dinp: Option<&mut [f32]>,
    accumulate: bool,
    (dweight, dlayout): (&mut [f32], WeightLayout),
    dbias: Option<&mut [f32]>,
    accumulate_grads: bool,
    dout: &[f32],
    inp: &[f32],
    (weight, layout): (&[f32], WeightLayout),
    rows: usize,
    k: usize,
    n: usize,
) {
    if let Some(dinp) = dinp {
        // W^T[n, k] as strides; OutIn is gemm's fast case here.
        let strides = match layout {
            WeightLayout::OutIn => (k, 1),
            WeightLayout::InOut => (1, n),
        };
        let start = Start::accumulate(accumulate);
        gemm_strided(dinp, start, dout, (n, 1), weight, strides, rows, n, k);
    }
    let start = Start::accumulate(accumulate_grads);
    match dlayout {
        // dW[n, k] (+)= dout^T @ inp
        WeightLayout::OutIn => gemm_strided(dweight, start, dout, (1, n), inp, (k, 1), n, rows, k),
        // dW[k, n] (+)= inp^T @ dout
        WeightLayout::InOut => gemm_strided(dweight, start, inp, (1, k), dout, (n, 1), k, rows, n),
    }
    if let Some(dbias) = dbias {
        // Each task owns a block of columns and sums all rows in order: deterministic.
        const COLS: usize = 64;
        dbias
            .par_chunks_mut(COLS)
            .enumerate()
            .for_each(|(blk, db)| {
                column_sums(db, accumulate_grads, dout, (blk * COLS, rows, n));
            });
    }
}

simd_fn!(column_sums => column_sums_plain(dst: &mut [f32], accumulate: bool, src: &[f32], shape: (usize, usize, usize)));

/// `dst[j] (+)= sum over r < rows of src[r * stride + c0 + j]` for up to 64 columns, rows added
/// in order.
#[inline(always)]
fn column_sums_plain(
    dst: &mut [f32],
    accumulate: bool,
    src: &[f32],
    (c0, rows, stride): (usize, usize, usize),
) {
    let mut acc = [0.0f32; 64];
    let acc = &mut acc[..dst.len()];
    for r in 0..rows {
        let row = &src[r * stride + c0..][..acc.len()];
        acc.iter_mut().zip(row).for_each(|(a, &g)| *a += g);
    }
    store(dst, accumulate, acc);
}
