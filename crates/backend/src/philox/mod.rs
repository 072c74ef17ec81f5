//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
//! counter-based generator cuRAND and PyTorch's CUDA dropout use. Random number `i` of a
//! stream is a pure function of `(seed, offset, i)`, so any thread, or a GPU, can produce any
//! element without sequential state: masks are identical for every thread count and device.

use crate::Dropout;

#[cfg(target_arch = "x86_64")]
mod avx512;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// The 4 words for counter `(block, offset)` under key `seed`.
#[inline(always)]
pub fn philox4x32(seed: u64, offset: u64, block: u64) -> [u32; 4] {
    let mut c = [
        block as u32,
        (block >> 32) as u32,
        offset as u32,
        (offset >> 32) as u32,
    ];
    let mut k = [seed as u32, (seed >> 32) as u32];
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Uniform u32 number `i` of the stream `(seed, offset)`.
pub fn uniform_u32(seed: u64, offset: u64, i: u64) -> u32 {
    philox4x32(seed, offset, i / 4)[(i % 4) as usize]
}

/// Writes the dropout multipliers of elements `start..start + out.len()`: 0 for a dropped
/// element, `1 / (1 - p)` for a kept one. Element `i` is dropped when its uniform u32 falls
/// below `p * 2^32`.
pub fn dropout_multipliers(d: &Dropout, start: usize, out: &mut [f32]) {
    if d.p >= 1.0 {
        out.fill(0.0);
        return;
    }
    // p < 1, so the threshold fits in a u32.
    let threshold = (d.p as f64 * 4294967296.0) as u32;
    let keep = 1.0 / (1.0 - d.p);
    #[cfg(target_arch = "x86_64")]
    {
        // The AVX-512 path computes a whole group per call: short spans take the narrower one.
        if std::arch::is_x86_feature_detected!("avx512f") && out.len() >= 4 * avx512::BLOCKS {
            return in_groups::<{ 4 * avx512::BLOCKS }>(start, out, |block, group| {
                // SAFETY: the CPU supports the features the function is compiled for.
                unsafe { avx512::multipliers(d.seed, d.offset, block, threshold, keep, group) }
            });
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { multipliers_avx2(d, start, threshold, keep, out) };
        }
    }
    multipliers(d, start, threshold, keep, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn multipliers_avx2(d: &Dropout, start: usize, threshold: u32, keep: f32, out: &mut [f32]) {
    multipliers(d, start, threshold, keep, out)
}

/// Philox blocks computed side by side: the rounds run on arrays, which the compiler turns
/// into SIMD lanes.
const LANES: usize = 16;

#[inline(always)]
fn multipliers(d: &Dropout, start: usize, threshold: u32, keep: f32, out: &mut [f32]) {
    in_groups::<{ 4 * LANES }>(start, out, |block, group| {
        let words = philox_lanes(d.seed, d.offset, block);
        for (o, &w) in group.iter_mut().zip(&words) {
            *o = if w < threshold { 0.0 } else { keep };
        }
    })
}

/// Fills `out` (elements `start..` of the stream) `N` values (`N / 4` blocks) at a time:
/// `group(block, values)` writes the values of the blocks from `block`. Groups that lie
/// wholly inside `out` are written in place; a short head or tail goes through a copy.
#[inline(always)]
fn in_groups<const N: usize>(
    start: usize,
    out: &mut [f32],
    mut group: impl FnMut(u64, &mut [f32; N]),
) {
    let (mut i, mut j) = (start, 0);
    while j < out.len() {
        let first = i - i % N;
        let from = i - first;
        let n = (N - from).min(out.len() - j);
        let block = (first / 4) as u64;
        if n == N {
            group(block, (&mut out[j..j + N]).try_into().expect("N values"));
        } else {
            let mut values = [0.0; N];
            group(block, &mut values);
            out[j..j + n].copy_from_slice(&values[from..from + n]);
        }
        i += n;
        j += n;
    }
}

/// Words of blocks `block..block + LANES`, in stream order (block-major, 4 words each).
#[inline(always)]
fn philox_lanes(seed: u64, offset: u64, block: u64) -> [u32; 4 * LANES] {
    let mut c0 = [0u32; LANES];
    let mut c1 = [0u32; LANES];
    let mut c2 = [offset as u32; LANES];
    let mut c3 = [(offset >> 32) as u32; LANES];
    for l in 0..LANES {
        let b = block + l as u64;
        c0[l] = b as u32;
        c1[l] = (b >> 32) as u32;
    }
    let mut k = [seed as u32, (seed >> 32) as u32];
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        for l in 0..LANES {
            let (hi0, lo0) = mulhilo(M0, c0[l]);
            let (hi1, lo1) = mulhilo(M1, c2[l]);
            (c0[l], c1[l], c2[l], c3[l]) = (hi1 ^ c1[l] ^ k[0], lo1, hi0 ^ c3[l] ^ k[1], lo0);
        }
    }
    let mut out = [0u32; 4 * LANES];
    for l in 0..LANES {
        out[4 * l..4 * l + 4].copy_from_slice(&[c0[l], c1[l], c2[l], c3[l]]);
    }
    out
}

/// Standard normal number `i` of the stream `(seed, offset)` (Box–Muller on two uniforms), for
/// parameter initialisation and synthetic inputs that must not depend on the thread count.
pub fn normal(seed: u64, offset: u64, i: u64) -> f32 {
    let w = philox4x32(seed, offset, i);
    let u1 = ((w[0] as f64) + 1.0) / 4294967297.0;
    let u2 = (w[1] as f64) / 4294967296.0;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Uniform number in `[0, 1)`, element `i` of the stream `(seed, offset)`.
pub fn uniform(seed: u64, offset: u64, i: u64) -> f32 {
    (uniform_u32(seed, offset, i) >> 8) as f32 / 16777216.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer test from the Random123 distribution (kat_vectors, philox4x32_10).
    #[test]
    fn matches_random123_known_answers() {
        assert_eq!(
            philox4x32(0, 0, 0),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        let all_ones = philox4x32(u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(all_ones, [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
    }

    #[test]
    fn dropout_keeps_about_one_minus_p_and_is_position_pure() {
        let d = Dropout {
            p: 0.25,
            seed: 7,
            offset: 3,
        };
        let mut all = vec![0.0; 10_000];
        dropout_multipliers(&d, 0, &mut all);
        let kept = all.iter().filter(|&&x| x > 0.0).count() as f64 / all.len() as f64;
        assert!((kept - 0.75).abs() < 0.02, "kept fraction {kept}");
        assert!(all
            .iter()
            .all(|&x| x == 0.0 || (x - 4.0 / 3.0).abs() < 1e-6));
        // Any sub-range, starting anywhere, reproduces the same multipliers.
        let mut part = vec![0.0; 37];
        dropout_multipliers(&d, 1001, &mut part);
        assert_eq!(&part[..], &all[1001..1038]);
    }

    /// Both vector paths (the one this CPU dispatches to, and the portable one) against the
    /// scalar definition: ragged heads and tails, whole groups, spans shorter than a group, and
    /// counters whose low word wraps (at a group boundary: groups are aligned).
    #[test]
    fn simd_multipliers_follow_the_scalar_definition() {
        let d = Dropout {
            p: 0.3,
            seed: 0x1234_5678_9abc_def0,
            offset: u64::MAX - 2,
        };
        let threshold = (0.3f64 * 4294967296.0) as u32;
        let keep = 1.0 / (1.0 - 0.3f32);
        type Path<'a> = &'a dyn Fn(usize, &mut [f32]);
        let paths: [(&str, Path); 2] = [
            ("dispatched", &|start, out| {
                dropout_multipliers(&d, start, out)
            }),
            ("portable", &|start, out| {
                multipliers(&d, start, threshold, keep, out)
            }),
        ];
        let spans = [
            (3, 300),
            (0, 600),
            (64, 1),
            (5, 40),
            (4 * (1 << 32) - 37, 300),
        ];
        for (name, path) in paths {
            for (start, len) in spans {
                let mut out = vec![f32::NAN; len];
                path(start, &mut out);
                for (j, m) in out.iter().enumerate() {
                    let i = (start + j) as u64;
                    let dropped = uniform_u32(d.seed, d.offset, i) < threshold;
                    assert_eq!(*m, if dropped { 0.0 } else { keep }, "{name}: element {i}");
                }
            }
        }
    }

    #[test]
    fn normal_has_unit_moments() {
        let n = 20_000;
        let xs: Vec<f64> = (0..n).map(|i| normal(1, 2, i) as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
