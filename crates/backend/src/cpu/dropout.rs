//! Dropout masks inside elementwise kernels, a block at a time on the stack.

use crate::{philox, Dropout};
use std::ops::Range;

const BLOCK: usize = 1024;

/// Splits `0..len` (elements `start..start + len` of the dropout stream) into ranges and calls
/// `f(range, multipliers)` for each; without dropout, one call with `None` (all ones).
#[inline(always)]
pub(crate) fn blocks(
    dropout: Option<Dropout>,
    start: usize,
    len: usize,
    mut f: impl FnMut(Range<usize>, Option<&[f32]>),
) {
    let Some(d) = dropout else {
        return f(0..len, None);
    };
    let mut buf = [0.0f32; BLOCK];
    let mut off = 0;
    while off < len {
        let n = BLOCK.min(len - off);
        philox::dropout_multipliers(&d, start + off, &mut buf[..n]);
        f(off..off + n, Some(&buf[..n]));
        off += n;
    }
}
