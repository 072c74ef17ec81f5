//! Philox4x32-10 for dropout masks with AVX-512 intrinsics: 16 counters per register, the
//! 32 x 32 -> 64-bit products as two `vpmuludq` (even and odd lanes), and the four words of
//! each counter put back in stream order with shuffles. The compiler's vectorisation of the
//! array version widens every lane to 64 bits and back, at about twice the instructions.
//! Several registers of counters go through the rounds side by side, so that one register's
//! multiply latency is hidden behind the others' work.

use super::{M0, M1, W0, W1};
use std::arch::x86_64::*;

/// Registers of 16 counters computed side by side.
const REGISTERS: usize = 4;

/// Counters (blocks of four words) per call.
pub(super) const BLOCKS: usize = 16 * REGISTERS;

/// `(hi, lo)` halves of `m * c` in each 32-bit lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn mulhilo(m: __m512i, c: __m512i) -> (__m512i, __m512i) {
    const ODD: __mmask16 = 0xAAAA;
    let even = _mm512_mul_epu32(c, m);
    let odd = _mm512_mul_epu32(_mm512_srli_epi64::<32>(c), m);
    let hi = _mm512_mask_blend_epi32(ODD, _mm512_srli_epi64::<32>(even), odd);
    let lo = _mm512_mask_blend_epi32(ODD, even, _mm512_slli_epi64::<32>(odd));
    (hi, lo)
}

/// `a ^ b ^ c`.
#[inline]
#[target_feature(enable = "avx512f")]
fn xor3(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
    _mm512_ternarylogic_epi32::<0x96>(a, b, c)
}

/// Dropout multipliers (`0` where the word is below `threshold`, else `keep`) of the words
/// of blocks `block..block + BLOCKS`, in stream order.
#[target_feature(enable = "avx512f")]
pub(super) fn multipliers(
    seed: u64,
    offset: u64,
    block: u64,
    threshold: u32,
    keep: f32,
    out: &mut [f32; 4 * BLOCKS],
) {
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // `block` is a multiple of BLOCKS (groups are aligned in the stream), so a register's 16
    // counters share their high word: the low word cannot wrap inside one.
    debug_assert_eq!(block % BLOCKS as u64, 0);
    let mut c: [[__m512i; 4]; REGISTERS] = std::array::from_fn(|g| {
        let first = block + 16 * g as u64;
        [
            _mm512_add_epi32(_mm512_set1_epi32(first as u32 as i32), iota),
            _mm512_set1_epi32((first >> 32) as u32 as i32),
            _mm512_set1_epi32(offset as u32 as i32),
            _mm512_set1_epi32((offset >> 32) as u32 as i32),
        ]
    });
    let (m0, m1) = (_mm512_set1_epi32(M0 as i32), _mm512_set1_epi32(M1 as i32));
    let mut k = [seed as u32, (seed >> 32) as u32];
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (k0, k1) = (
            _mm512_set1_epi32(k[0] as i32),
            _mm512_set1_epi32(k[1] as i32),
        );
        for c in &mut c {
            let (hi0, lo0) = mulhilo(m0, c[0]);
            let (hi1, lo1) = mulhilo(m1, c[2]);
            *c = [xor3(hi1, c[1], k0), lo1, xor3(hi0, c[3], k1), lo0];
        }
    }
    let (threshold, keep) = (_mm512_set1_epi32(threshold as i32), _mm512_set1_ps(keep));
    for (g, c) in c.iter().enumerate() {
        for (q, w) in stream_order(c).into_iter().enumerate() {
            let kept = _mm512_cmpge_epu32_mask(w, threshold);
            // SAFETY: `out` holds 4 registers' worth of values per register of counters.
            unsafe {
                let dst = out.as_mut_ptr().add(64 * g + 16 * q);
                _mm512_storeu_ps(dst, _mm512_maskz_mov_ps(kept, keep));
            }
        }
    }
}

/// The words of 16 counters (`c[w]` holds word `w` of each) in stream order, which is
/// block-major: word `w` of block `l` is element `4l + w`, and register `q` gets blocks
/// `4q..4q + 4`.
#[inline]
#[target_feature(enable = "avx512f")]
fn stream_order(c: &[__m512i; 4]) -> [__m512i; 4] {
    // First each 128-bit lane gathers one block's four words (r[j] holds blocks j, j + 4,
    // j + 8, j + 12) ...
    let (a_lo, a_hi) = (
        _mm512_unpacklo_epi32(c[0], c[1]),
        _mm512_unpackhi_epi32(c[0], c[1]),
    );
    let (b_lo, b_hi) = (
        _mm512_unpacklo_epi32(c[2], c[3]),
        _mm512_unpackhi_epi32(c[2], c[3]),
    );
    let r = [
        _mm512_unpacklo_epi64(a_lo, b_lo),
        _mm512_unpackhi_epi64(a_lo, b_lo),
        _mm512_unpacklo_epi64(a_hi, b_hi),
        _mm512_unpackhi_epi64(a_hi, b_hi),
    ];
    // ... then a 4 x 4 transpose of 128-bit lanes.
    let u = [
        _mm512_shuffle_i32x4::<0x44>(r[0], r[1]),
        _mm512_shuffle_i32x4::<0x44>(r[2], r[3]),
        _mm512_shuffle_i32x4::<0xEE>(r[0], r[1]),
        _mm512_shuffle_i32x4::<0xEE>(r[2], r[3]),
    ];
    [
        _mm512_shuffle_i32x4::<0x88>(u[0], u[1]),
        _mm512_shuffle_i32x4::<0xDD>(u[0], u[1]),
        _mm512_shuffle_i32x4::<0x88>(u[2], u[3]),
        _mm512_shuffle_i32x4::<0xDD>(u[2], u[3]),
    ]
}
