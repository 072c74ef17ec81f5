//! Transposes through 16 x 16 tiles: of whole matrices (the backend's `transpose`), and as the
//! building block of AdamW's mirror writes and attention's transposed heads.

use rayon::prelude::*;

/// Side of the square blocks transposes go through.
pub(crate) const TILE: usize = 16;

/// `dst.copy_from_slice(column)` for a tile column: a fixed-size copy (vector moves) when the
/// column is full, since a memcpy call per 64 bytes would cost more than the copy itself.
#[inline(always)]
pub(crate) fn copy_column(dst: &mut [f32], column: &[f32]) {
    if let (Ok(d), Ok(c)) = (
        <&mut [f32; TILE]>::try_from(&mut *dst),
        <&[f32; TILE]>::try_from(column),
    ) {
        *d = *c;
        return;
    }
    dst.copy_from_slice(column);
}

/// Transposes a `height x width` block (both at most [`TILE`]) through a tile on the stack:
/// row `i` of the block is `src(i)` (`width` values); `dst(j, column)` receives the block's
/// column `j` (`height` values). Reads and writes are then whole cache lines.
#[inline(always)]
pub(crate) fn transpose_block<'a>(
    height: usize,
    width: usize,
    src: impl Fn(usize) -> &'a [f32],
    mut dst: impl FnMut(usize, &[f32]),
) {
    let mut tile = [[0.0f32; TILE]; TILE];
    for (i, line) in tile.iter_mut().enumerate().take(height) {
        match <&[f32; TILE]>::try_from(src(i)) {
            // A fixed-size copy compiles to vector moves; a memcpy call per 64 bytes would cost
            // more than the copy.
            Ok(full) => *line = *full,
            Err(_) => line[..width].copy_from_slice(src(i)),
        }
    }
    let columns = transpose_tile(&tile);
    for (j, column) in columns.iter().enumerate().take(width) {
        dst(j, &column[..height]);
    }
}

type Tile = [[f32; TILE]; TILE];

/// The transpose of a whole tile: in registers with AVX-512, element by element otherwise.
#[inline(always)]
fn transpose_tile(tile: &Tile) -> Tile {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::transpose_tile(tile) };
    }
    let mut out = [[0.0f32; TILE]; TILE];
    for (i, line) in tile.iter().enumerate() {
        for (j, &x) in line.iter().enumerate() {
            out[j][i] = x;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Tile;
    use std::arch::x86_64::*;

    /// The 16 x 16 transpose in four rounds of shuffles (2 x 2 blocks of 1, 2, 4 and 8 values
    /// at a time are swapped across the diagonal): 64 shuffles instead of 256 scalar moves.
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose_tile(tile: &Tile) -> Tile {
        // SAFETY: every load and store addresses a whole row of a 16 x 16 array.
        let r: [__m512; 16] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(tile[i].as_ptr()) });
        // Within each 128-bit lane: pairs of rows interleaved value by value, then the pairs
        // of pairs two values at a time. b[4g + c] then holds, in lane L, column 4L + c of
        // rows 4g..4g + 4.
        let a: [__m512; 16] = std::array::from_fn(|i| {
            let (x, y) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(x, y)
            } else {
                _mm512_unpackhi_ps(x, y)
            }
        });
        let b: [__m512; 16] = std::array::from_fn(|i| {
            let (g, c) = (i / 4, i % 4);
            let (x, y) = (
                _mm512_castps_pd(a[4 * g + c / 2]),
                _mm512_castps_pd(a[4 * g + 2 + c / 2]),
            );
            _mm512_castpd_ps(if c % 2 == 0 {
                _mm512_unpacklo_pd(x, y)
            } else {
                _mm512_unpackhi_pd(x, y)
            })
        });
        // Across lanes: column 4L + c is lane L of b[c], b[4 + c], b[8 + c], b[12 + c].
        let mut out = [[0.0f32; 16]; 16];
        for c in 0..4 {
            let t0 = _mm512_shuffle_f32x4::<0x88>(b[c], b[4 + c]);
            let t1 = _mm512_shuffle_f32x4::<0xDD>(b[c], b[4 + c]);
            let t2 = _mm512_shuffle_f32x4::<0x88>(b[8 + c], b[12 + c]);
            let t3 = _mm512_shuffle_f32x4::<0xDD>(b[8 + c], b[12 + c]);
            let columns = [
                _mm512_shuffle_f32x4::<0x88>(t0, t2),
                _mm512_shuffle_f32x4::<0x88>(t1, t3),
                _mm512_shuffle_f32x4::<0xDD>(t0, t2),
                _mm512_shuffle_f32x4::<0xDD>(t1, t3),
            ];
            for (lane, column) in columns.into_iter().enumerate() {
                // SAFETY: as above.
                unsafe { _mm512_storeu_ps(out[4 * lane + c].as_mut_ptr(), column) };
            }
        }
        out
    }
}

/// out[cols, rows] = inp[rows, cols]^T
pub(crate) fn transpose(out: &mut [f32], inp: &[f32], rows: usize, cols: usize) {
    // Each task owns TILE output rows (TILE input columns).
    out[..rows * cols]
        .par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(t, out)| {
            let c0 = t * TILE;
            let width = out.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                let height = TILE.min(rows - r0);
                let src = |i: usize| &inp[(r0 + i) * cols + c0..(r0 + i) * cols + c0 + width];
                transpose_block(height, width, src, |j, column| {
                    copy_column(&mut out[j * rows + r0..j * rows + r0 + height], column)
                });
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape class: whole tiles, ragged edges, a single row or column.
    #[test]
    fn transpose_matches_the_definition() {
        for &(rows, cols) in &[(16, 16), (32, 48), (17, 5), (1, 40), (40, 1), (37, 29)] {
            let inp: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut out = vec![f32::NAN; rows * cols];
            transpose(&mut out, &inp, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        out[c * rows + r],
                        inp[r * cols + c],
                        "[{rows}, {cols}] ({r}, {c})"
                    );
                }
            }
        }
    }
}
