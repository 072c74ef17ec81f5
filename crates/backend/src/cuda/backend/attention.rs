//! Attention on the GPU: the flash kernels (bf16, sm80+) when they apply, otherwise batched
//! cuBLASLt products over per-head copies with the softmax kernels between them, in chunks of
//! batch elements that bound the `[seq, seq]` scratch.

use super::*;

impl Cuda {
    /// `dst[..n] = dropout(att[start..start + n])`, element `i` with multiplier `start + i` of the
    /// dropout stream.
    pub(super) fn attention_dropout(
        &self,
        dst: u64,
        att: u64,
        start: usize,
        n: usize,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let args = [ptr(dst), ptr(att), size(n), size(start)];
        let args = args.into_iter().chain(dropout_args(dropout));
        self.launch(&self.kernels.attention_dropout, elementwise(n), args)
    }

    /// `kernel` (heads_split or heads_merge) from `src` to `dst`, over `parts` column blocks of
    /// a `[rows, parts * E]` buffer and the per-head layout of [`HeadMajor`].
    pub(super) fn heads(
        &self,
        kernel: &launch::Kernel,
        dst: u64,
        src: u64,
        parts: usize,
        s: &AttentionShape,
    ) -> Result<()> {
        let n = parts * s.rows() * s.width();
        let args = [ptr(dst), ptr(src), size(parts), size(s.batch), size(s.seq)];
        let args = args.into_iter().chain([
            size(s.heads),
            size(s.head_dim),
            Arg::I32(s.batch_first as i32),
        ]);
        self.launch(kernel, elementwise(n), args)
    }

    /// Dynamic shared memory for a row of `n` floats, checked against the per-block limit.
    pub(super) fn shared_row(n: usize, what: &str) -> Result<usize> {
        if n * 4 > launch::MAX_SHARED_BYTES {
            bail!(
                "{what}: a row of {n} keys does not fit in shared memory (at most {})",
                launch::MAX_SHARED_BYTES / 4
            );
        }
        Ok(n)
    }
}

/// The `seq, heads, hd, causal` parameters of the attention kernels.
pub(super) fn attention_args(s: &AttentionShape) -> [Arg; 4] {
    [
        size(s.seq),
        size(s.heads),
        size(s.head_dim),
        Arg::I32(s.causal as i32),
    ]
}

/// Whether the softmax kernels hold an attention row in shared memory (`seq` floats, when they
/// fit) or work on it in place in global memory, and the dynamic shared floats that takes.
pub(super) fn row_cache(seq: usize) -> (Arg, usize) {
    let fits = seq * 4 <= launch::MAX_SHARED_BYTES;
    (Arg::I32(fits as i32), if fits { seq } else { 0 })
}

// The flash kernels tile 128 rows per block as 8 warps of 16.
const _: () = assert!(THREADS == 256);

/// Floats of `[heads, seq, seq]` scratch (dropout(att), dP) attention may use at once: batch
/// elements are processed in chunks that fit (at least one element), so the scratch stays
/// bounded whatever the batch: 256 MiB. `FLINT_ATTENTION_CHUNK_FLOATS` lowers it, so that a
/// parity run on small shapes goes through several chunks too (scripts/gpu-check.sh).
pub(super) fn chunk(batch: usize, square: usize) -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let limit = *LIMIT.get_or_init(|| {
        std::env::var("FLINT_ATTENTION_CHUNK_FLOATS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64 << 20)
    });
    (limit / square.max(1)).clamp(1, batch.max(1))
}

/// `(first, count)` of each chunk of `per` batch elements.
pub(super) fn chunks(batch: usize, per: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..batch)
        .step_by(per)
        .map(move |b0| (b0, per.min(batch - b0)))
}

/// Attention's per-head copies at `base` (heads_split's layout): part `p` is `[batch, heads,
/// seq, head_dim]`, so the `[seq, head_dim]` matrices of every (batch, head) pair are one
/// stride apart and a single batched product covers them.
pub(super) struct HeadMajor<'a> {
    s: &'a AttentionShape,
    base: u64,
}

impl HeadMajor<'_> {
    /// Part `p`'s matrix for batch element `b0`, head 0 (or its transpose), then one per head
    /// and batch element.
    pub(super) fn part(&self, p: usize, b0: usize, transposed: bool) -> Strided {
        let (s, hd) = (self.s, self.s.head_dim);
        let at = (p * s.batch + b0) * s.heads * s.seq * hd;
        Strided {
            op: Operand {
                addr: self.base + 4 * at as u64,
                transposed,
            },
            ld: hd,
            stride: s.seq * hd,
        }
    }
}

/// The first `[seq, seq]` matrix (or its transpose) of `[.., seq, seq]` ones at `addr`.
pub(super) fn square_of(s: &AttentionShape, addr: u64, transposed: bool) -> Strided {
    Strided {
        op: Operand { addr, transposed },
        ld: s.seq,
        stride: s.seq * s.seq,
    }
}

/// What the flash forward leaves in `att` for the backward, in place of the probabilities: each
/// attention row's log-sum-exp, the per-head output (for the backward's rowsum(dout * out)), and
/// the key padding mask (zeros without one). `att` has room for them when `seq > head_dim + 1`.
pub(super) struct FlashSaved {
    lse: u64,
    out: u64,
    key_padding: u64,
}

impl FlashSaved {
    /// The floats it takes: a log-sum-exp and a head's output row per attention row, and the
    /// mask.
    pub(super) fn len(s: &AttentionShape) -> usize {
        s.batch * s.heads * s.seq * (1 + s.head_dim) + s.batch * s.seq
    }

    pub(super) fn new(att: u64, s: &AttentionShape) -> FlashSaved {
        let rows = s.batch * s.heads * s.seq;
        FlashSaved {
            lse: att,
            out: att + 4 * rows as u64,
            key_padding: att + 4 * (rows * (1 + s.head_dim)) as u64,
        }
    }
}

/// One block per 128 rows (queries or keys) of each head.
pub(super) fn flash_grid(s: &AttentionShape) -> LaunchConfig {
    grid(s.seq.div_ceil(128) * s.batch * s.heads, 0)
}

/// The flash kernels' trailing `batch, heads, seq, causal, scale, hd, batch_first` parameters.
pub(super) fn flash_args(s: &AttentionShape) -> [Arg; 7] {
    [
        size(s.batch),
        size(s.heads),
        size(s.seq),
        Arg::I32(s.causal as i32),
        Arg::F32(1.0 / (s.head_dim as f32).sqrt()),
        size(s.head_dim),
        Arg::I32(s.batch_first as i32),
    ]
}

impl Cuda {
    /// Whether attention takes the flash path: bf16 products on sm_80 or newer, no attention
    /// dropout, a head size the kernels are built for (32 or 64), sequences longer than
    /// `head_dim + 1` (so that what the forward keeps also fits an `att` sized for the
    /// `[B, H, T, T]` probabilities, as callers that do not ask
    /// [`Backend::attention_saved_len`] size it), and a passed self-test on this GPU (see
    /// `self_test.rs`: a GPU whose flash results disagree with the cuBLASLt path's keeps to the
    /// latter, and says so). `FLINT_FLASH_ATTENTION=0` (or `off`) turns it off. The forward and
    /// the backward decide alike, from the same arguments and precision: the precision must not
    /// change between a forward and its backward (the trainer sets it once per run).
    pub(super) fn flash(&self, s: &AttentionShape, dropout: Option<Dropout>) -> Result<bool> {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let enabled = *ENABLED.get_or_init(|| {
            let off = ["0", "off", "false", "no"];
            std::env::var("FLINT_FLASH_ATTENTION").map_or(true, |v| !off.contains(&v.as_str()))
        });
        let eligible = enabled
            && self.precision() == Precision::Bf16
            && self.arch.0 >= 8
            && dropout.is_none_or(|d| d.p == 0.0)
            && matches!(s.head_dim, 32 | 64)
            && s.seq > s.head_dim + 1;
        if !eligible {
            return Ok(false);
        }
        checked(&self.flash_passed, || self.flash_checked())
    }
}

impl Cuda {
    /// [`Backend::attention_forward`], on the flash kernels when `flash`.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::cuda) fn attention_forward_on(
        &self,
        flash: bool,
        out: Tensor,
        att: Tensor,
        qkv: Tensor,
        key_padding: Option<Tensor>,
        shape: &AttentionShape,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let s = shape;
        let (rows, e, seq, heads, hd) = (s.rows(), s.width(), s.seq, s.heads, s.head_dim);
        let att_rows = s.batch * heads * seq;
        let out = f32s(out, rows * e, "attention_forward out")?;
        let saved = if flash {
            FlashSaved::len(s)
        } else {
            att_rows * seq
        };
        let att = f32s(att, saved, "attention_forward att")?;
        let qkv = f32s(qkv, rows * 3 * e, "attention_forward qkv")?;
        let key_padding = match key_padding {
            Some(kp) => f32s(kp, s.batch * seq, "attention_forward key_padding")?,
            None => 0, // a null pointer: no padding
        };
        if att_rows == 0 {
            return Ok(());
        }
        if hd == 0 {
            bail!("attention_forward: head_dim is 0");
        }
        if flash {
            let saved = FlashSaved::new(att, s);
            match key_padding {
                0 => self.launch(
                    &self.kernels.fill,
                    elementwise(s.batch * seq),
                    [ptr(saved.key_padding), size(s.batch * seq), Arg::F32(0.0)],
                )?,
                kp => self.copy_rows(saved.key_padding, seq, kp, seq, s.batch, seq)?,
            }
            let args = [out, saved.out, saved.lse, qkv, saved.key_padding];
            let args = args.into_iter().map(ptr).chain(flash_args(s));
            return self.launch(&self.kernels.flash_forward, flash_grid(s), args);
        }
        let square = heads * seq * seq;
        let per = chunk(s.batch, square);
        let mut scratch = lock(&self.attention_scratch, "the attention scratch buffer")?;
        // q, k, v and out per head, then dropout(att) of a chunk when dropout is on.
        let base = scratch.reserve(
            &self.stream,
            4 * rows * e + dropout.map_or(0, |_| per * square),
        )?;
        let h = HeadMajor { s, base };
        self.heads(&self.kernels.heads_split, base, qkv, 3, s)?;
        // Scores q @ k^T of every (batch, head) pair, then the masked softmax over all of them in
        // place.
        let bh = s.batch * heads;
        self.gemm_batched(
            square_of(s, att, false),
            false,
            h.part(0, 0, false),
            h.part(1, 0, true),
            seq,
            hd,
            seq,
            bh,
        )?;
        let (cached, floats) = row_cache(seq);
        let args = [ptr(att), ptr(key_padding), size(s.batch)];
        let args = args.into_iter().chain(attention_args(s)).chain([cached]);
        self.launch(
            &self.kernels.attention_softmax,
            grid(att_rows, floats),
            args,
        )?;
        for (b0, nb) in chunks(s.batch, per) {
            let probs = match dropout {
                Some(_) => {
                    let buf = base + 4 * (4 * rows * e) as u64;
                    self.attention_dropout(buf, att, b0 * square, nb * square, dropout)?;
                    square_of(s, buf, false)
                }
                None => square_of(s, att + 4 * (b0 * square) as u64, false),
            };
            self.gemm_batched(
                h.part(3, b0, false),
                false,
                probs,
                h.part(2, b0, false),
                seq,
                seq,
                hd,
                nb * heads,
            )?;
        }
        self.heads(
            &self.kernels.heads_merge,
            out,
            base + 4 * (3 * rows * e) as u64,
            1,
            s,
        )
    }

    /// [`Backend::attention_backward`], on the flash kernels when `flash` (as the forward was).
    #[allow(clippy::too_many_arguments)]
    pub(in crate::cuda) fn attention_backward_on(
        &self,
        flash: bool,
        dqkv: Tensor,
        dout: Tensor,
        qkv: Tensor,
        att: Tensor,
        shape: &AttentionShape,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let s = shape;
        let (rows, e, seq, heads, hd) = (s.rows(), s.width(), s.seq, s.heads, s.head_dim);
        let att_rows = s.batch * heads * seq;
        if hd == 0 {
            bail!("attention_backward: head_dim is 0");
        }
        let dqkv = f32s(dqkv, rows * 3 * e, "attention_backward dqkv")?;
        let dout = f32s(dout, rows * e, "attention_backward dout")?;
        let qkv = f32s(qkv, rows * 3 * e, "attention_backward qkv")?;
        let saved = if flash {
            FlashSaved::len(s)
        } else {
            att_rows * seq
        };
        let att = f32s(att, saved, "attention_backward att")?;
        if att_rows == 0 {
            return Ok(());
        }
        if flash {
            let saved = FlashSaved::new(att, s);
            let mut scratch = lock(&self.attention_scratch, "the attention scratch buffer")?;
            let delta = scratch.reserve(&self.stream, att_rows)?;
            let args = [delta, dout, saved.out].into_iter().map(ptr);
            let layout = [s.batch, heads, seq, hd].map(size);
            let args = args.chain(layout).chain([Arg::I32(s.batch_first as i32)]);
            self.launch(&self.kernels.flash_delta, elementwise(att_rows), args)?;
            let args = [dqkv, qkv, dout, saved.lse, delta, saved.key_padding].map(ptr);
            for kernel in [
                &self.kernels.flash_backward_kv,
                &self.kernels.flash_backward_q,
            ] {
                self.launch(kernel, flash_grid(s), args.into_iter().chain(flash_args(s)))?;
            }
            return Ok(());
        }
        let square = heads * seq * seq;
        let per = chunk(s.batch, square);
        let mut scratch = lock(&self.attention_scratch, "the attention scratch buffer")?;
        // Per head: q, k, v, dout, then dq, dk, dv (merged back in one pass); then a chunk's
        // dropout(att), and its dP turned into dS.
        let base = scratch.reserve(&self.stream, 7 * rows * e + per * square)?;
        let h = HeadMajor { s, base };
        let buf = base + 4 * (7 * rows * e) as u64;
        self.heads(&self.kernels.heads_split, base, qkv, 3, s)?;
        self.heads(
            &self.kernels.heads_split,
            base + 4 * (3 * rows * e) as u64,
            dout,
            1,
            s,
        )?;
        for (b0, nb) in chunks(s.batch, per) {
            let count = nb * heads;
            let go = h.part(3, b0, false);
            // dv = dropout(att)^T @ dout, before dP takes the scratch over.
            let probs = match dropout {
                Some(_) => {
                    self.attention_dropout(buf, att, b0 * square, nb * square, dropout)?;
                    buf
                }
                None => att + 4 * (b0 * square) as u64,
            };
            self.gemm_batched(
                h.part(6, b0, false),
                false,
                square_of(s, probs, true),
                go,
                seq,
                seq,
                hd,
                count,
            )?;
            // dP = dout @ v^T, then dS in place.
            self.gemm_batched(
                square_of(s, buf, false),
                false,
                go,
                h.part(2, b0, true),
                seq,
                hd,
                seq,
                count,
            )?;
            let (cached, floats) = row_cache(seq);
            let args = [ptr(buf), ptr(att), size(b0), size(nb)].into_iter();
            let args = args.chain(attention_args(s)).chain(dropout_args(dropout));
            let cfg = grid(count * seq, floats);
            self.launch(
                &self.kernels.attention_softmax_backward,
                cfg,
                args.chain([cached]),
            )?;
            // dq = dS @ k;  dk = dS^T @ q (parts: dq 4, dk 5, q 0, k 1).
            for (grad, transposed, other) in [(4, false, 1), (5, true, 0)] {
                let ds = square_of(s, buf, transposed);
                let (dst, rhs) = (h.part(grad, b0, false), h.part(other, b0, false));
                self.gemm_batched(dst, false, ds, rhs, seq, seq, hd, count)?;
            }
        }
        self.heads(
            &self.kernels.heads_merge,
            dqkv,
            base + 4 * (4 * rows * e) as u64,
            3,
            s,
        )
    }
}
