//! The backend API: every kernel flint's models call, as one trait.
//!
//! Kernels take [`Tensor`]s, which are plain views (address, length, dtype) into buffers the
//! backend allocated, like device pointers in CUDA: the model plans its buffers up front and
//! hands out non-overlapping views, so a kernel call never allocates. The CPU backend
//! ([`cpu::Cpu`]) is the reference; a CUDA backend implements the same trait on device memory
//! and a stream (`synchronize` waits for it).
//!
//! Conventions, as in llm.c: shapes in the doc comment of each call; `rows` are tokens;
//! parameter gradients are written or accumulated as the call's [`GradStore`] says (the first
//! micro-batch of a step writes, the others add), input gradients accumulate only where the
//! call says so.

pub mod cpu;
pub mod cuda;
pub mod parity;
pub mod philox;
mod precision;
mod tensor;

pub use precision::Precision;
pub use tensor::{Buffer, DType, Tensor};

use anyhow::Result;

/// Pointwise activation of a feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// `F.gelu(x)`: exact, with erf.
    Gelu,
    /// `F.gelu(x, approximate="tanh")`, as in GPT-2.
    GeluTanh,
}

/// Dropout applied inside a kernel. The mask is a pure function of `(seed, offset, index)`
/// through Philox (see [`philox`]), so forward and backward regenerate the same mask, and it
/// does not depend on the thread count or the device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of zeroing an element; kept elements are scaled by `1 / (1 - p)`.
    pub p: f32,
    pub seed: u64,
    /// Distinguishes call sites and steps: two dropouts with the same seed and offset share masks.
    pub offset: u64,
}

/// Shape of multi-head self-attention over a `[rows, 3 * heads * head_dim]` packed q|k|v input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Token `(b, t)` is row `b * seq + t` when true, `t * batch + b` otherwise (PyTorch's
    /// `batch_first`), so neither layout needs a transpose.
    pub batch_first: bool,
    /// Query `t` sees keys `0..=t` only.
    pub causal: bool,
}

impl AttentionShape {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
    pub fn row(&self, b: usize, t: usize) -> usize {
        if self.batch_first {
            b * self.seq + t
        } else {
            t * self.batch + b
        }
    }
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// `torch.optim.AdamW` hyper-parameters for one update; `step` counts from 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u32,
}

/// How a weight matrix of a `k -> n` projection is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[n, k]`, as `nn.Linear.weight`.
    OutIn,
    /// `[k, n]`, as Hugging Face's `Conv1D.weight`.
    InOut,
}

/// A weight matrix and its layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weight {
    pub tensor: Tensor,
    pub layout: WeightLayout,
}

/// How a backward kernel stores the gradients of its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradStore {
    /// `grad = ...`: the first backward after `zero_grad`, which then needs neither a zeroing
    /// pass over the gradient buffer nor a read of the old values.
    Write,
    /// `grad += ...`, as autograd accumulates into `.grad` (later micro-batches of a step, or
    /// a second contribution to a shared parameter).
    Accumulate,
}

impl GradStore {
    pub fn accumulates(self) -> bool {
        self == GradStore::Accumulate
    }
}

/// A transposed copy of a `[rows, cols]` parameter matrix, kept in step with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub out: Tensor,
    pub rows: usize,
    pub cols: usize,
}

pub trait Backend: Send + Sync {
    type Buffer: Buffer;

    /// Human-readable device, e.g. `cpu`.
    fn device(&self) -> String;
    fn alloc(&self, dtype: DType, len: usize) -> Result<Self::Buffer>;
    fn upload(&self, dst: Tensor, src: &[f32]) -> Result<()>;
    fn upload_i32(&self, dst: Tensor, src: &[i32]) -> Result<()>;
    fn download(&self, src: Tensor, dst: &mut [f32]) -> Result<()>;
    fn fill(&self, dst: Tensor, value: f32) -> Result<()>;
    /// Waits until every queued kernel has finished.
    fn synchronize(&self) -> Result<()>;

    /// Sets the arithmetic of the matrix products from now on; an error when the device cannot
    /// compute in it (the CPU computes in fp32 only).
    fn set_precision(&self, precision: Precision) -> Result<()>;
    fn precision(&self) -> Precision;
    /// Peak dense FLOP/s of the device in the current precision, from its properties and clock
    /// (for MFU); `None` where unknown.
    fn peak_flops(&self) -> Option<f64>;

    /// `out[rows, n] = inp[rows, k] @ W + bias[n]`, where `weight` holds W^T (`nn.Linear`) or W
    /// (`Conv1D`).
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &self,
        out: Tensor,
        inp: Tensor,
        weight: Weight,
        bias: Option<Tensor>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;

    /// `out[cols, rows] = inp[rows, cols]^T`.
    fn transpose(&self, out: Tensor, inp: Tensor, rows: usize, cols: usize) -> Result<()>;

    /// Backward of [`Backend::matmul_forward`] given `dout[rows, n]`: `dinp[rows, k]` (`+=` when
    /// `accumulate`, else `=`) from `weight`, and `dweight` (in its own layout) and `dbias[n]`
    /// as `grads` says. `weight` may be a mirror of the forward's weight in the other layout.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: Option<Tensor>,
        accumulate: bool,
        dweight: Weight,
        dbias: Option<Tensor>,
        grads: GradStore,
        dout: Tensor,
        inp: Tensor,
        weight: Weight,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;

    /// `out[rows, c] = (inp - mean) * rstd * weight + bias` per row; saves `mean[rows]`, `rstd[rows]`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: Tensor,
        mean: Tensor,
        rstd: Tensor,
        inp: Tensor,
        weight: Tensor,
        bias: Tensor,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;

    /// Backward of [`Backend::layernorm_forward`]: `dinp` (`+=` when `accumulate`), and
    /// `dweight`, `dbias` as `grads` says.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: Tensor,
        accumulate: bool,
        dweight: Tensor,
        dbias: Tensor,
        grads: GradStore,
        dout: Tensor,
        inp: Tensor,
        weight: Tensor,
        mean: Tensor,
        rstd: Tensor,
        rows: usize,
        c: usize,
    ) -> Result<()>;

    /// Scaled dot-product attention per (batch, head): `att[batch, heads, seq, seq]` saves the
    /// softmax probabilities (before dropout); `out[rows, heads * head_dim]` is
    /// `dropout(att) @ v`. `key_padding[batch, seq]` is 1.0 where a key is padding. `att` is
    /// the backward's input: a backend may keep other state there (the CUDA flash path keeps
    /// each row's log-sum-exp, the per-head output and the padding mask), which only its own
    /// `attention_backward` reads; it needs at least [`Backend::attention_saved_len`] floats.
    fn attention_forward(
        &self,
        out: Tensor,
        att: Tensor,
        qkv: Tensor,
        key_padding: Option<Tensor>,
        shape: &AttentionShape,
        dropout: Option<Dropout>,
    ) -> Result<()>;

    /// Backward of [`Backend::attention_forward`]: writes (`=`) all of `dqkv[rows, 3 * width]`.
    fn attention_backward(
        &self,
        dqkv: Tensor,
        dout: Tensor,
        qkv: Tensor,
        att: Tensor,
        shape: &AttentionShape,
        dropout: Option<Dropout>,
    ) -> Result<()>;

    /// Token plus position embedding: `out[r] = dropout(wte[ids[r]] + wpe[r % seq])` for
    /// `rows` tokens in `[batch, seq]` order, `c` channels; `ids` is an i32 tensor.
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: Tensor,
        ids: Tensor,
        wte: Tensor,
        wpe: Tensor,
        rows: usize,
        seq: usize,
        c: usize,
        dropout: Option<Dropout>,
    ) -> Result<()>;

    /// Backward of [`Backend::embedding_forward`]: `dwte[ids[r]] += g[r]`, `dwpe[r % seq] += g[r]`
    /// with `g = dropout(dout)`.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        dwte: Tensor,
        dwpe: Tensor,
        dout: Tensor,
        ids: Tensor,
        rows: usize,
        seq: usize,
        c: usize,
        dropout: Option<Dropout>,
    ) -> Result<()>;

    /// One decoding step of causal self-attention with a KV cache, for one sequence: copies the
    /// new token's k and v (from its packed `qkv[3 * heads * head_dim]` row) into row `pos` of
    /// `k_cache` and `v_cache` (`[max_len, heads * head_dim]`), then writes
    /// `out[heads * head_dim]` = softmax(q . k_j / sqrt(head_dim)) @ v over `j <= pos`.
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        out: Tensor,
        qkv: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        pos: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    /// `out = dropout(act(inp))`, elementwise.
    fn activation_forward(
        &self,
        out: Tensor,
        inp: Tensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<()>;

    /// Backward of [`Backend::activation_forward`]: `dinp = act'(inp) * dropout(dout)`.
    fn activation_backward(
        &self,
        dinp: Tensor,
        dout: Tensor,
        inp: Tensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<()>;

    /// The feed-forward's first half: `pre = inp @ W + bias` ([`Backend::matmul_forward`]), then
    /// `out = dropout(act(pre))` ([`Backend::activation_forward`]). A device may do both in one
    /// pass (cuBLASLt's GELU epilogue), writing `pre` for the backward as it goes.
    #[allow(clippy::too_many_arguments)]
    fn linear_activation_forward(
        &self,
        (pre, out): (Tensor, Tensor),
        inp: Tensor,
        weight: Weight,
        bias: Option<Tensor>,
        (act, dropout): (Activation, Option<Dropout>),
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.matmul_forward(pre, inp, weight, bias, rows, k, n)?;
        self.activation_forward(out, pre, act, dropout)
    }

    /// [`Backend::matmul_backward`] of a product whose input came out of an activation
    /// (`inp = dropout(act(pre))`, see [`Backend::linear_activation_forward`]), carried through
    /// that activation's backward: `dpre = act'(pre) * dropout(dout @ W^T)`, with `dweight` and
    /// `dbias` as [`Backend::matmul_backward`] stores them. `scratch` (`[rows, k]`) holds
    /// `dout @ W^T` where the device does not fuse the two (cuBLASLt's GELU-gradient epilogue).
    #[allow(clippy::too_many_arguments)]
    fn matmul_activation_backward(
        &self,
        (dpre, scratch): (Tensor, Tensor),
        (pre, act, dropout): (Tensor, Activation, Option<Dropout>),
        dweight: Weight,
        dbias: Option<Tensor>,
        grads: GradStore,
        dout: Tensor,
        inp: Tensor,
        weight: Weight,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let params = (dweight, dbias, grads);
        let act = (pre, act, dropout);
        separate_matmul_activation_backward(
            self,
            (dpre, scratch),
            act,
            params,
            (dout, inp, weight),
            [rows, k, n],
        )
    }

    /// How many floats [`Backend::attention_forward`] keeps in `att` for the backward when run
    /// with this shape and dropout: the `[batch, heads, seq, seq]` probabilities, or less where
    /// the device recomputes them in the backward (flash attention). The activation plan sizes
    /// `att` with it.
    fn attention_saved_len(&self, s: &AttentionShape, dropout: Option<Dropout>) -> usize {
        let _ = dropout;
        s.batch * s.heads * s.seq * s.seq
    }

    /// `out = resid + dropout(inp)`, the residual connection of a Transformer block.
    fn residual_forward(
        &self,
        out: Tensor,
        resid: Tensor,
        inp: Tensor,
        dropout: Option<Dropout>,
    ) -> Result<()>;

    /// Backward of [`Backend::residual_forward`]: `dresid = dout`, `dinp = dropout(dout)`.
    fn residual_backward(
        &self,
        dresid: Tensor,
        dinp: Tensor,
        dout: Tensor,
        dropout: Option<Dropout>,
    ) -> Result<()>;

    /// `F.mse_loss(inp, target)` (mean); writes `dinp = d loss / d inp`, returns the loss.
    fn mse_loss(&self, dinp: Tensor, inp: Tensor, target: Tensor) -> Result<f32>;

    /// `F.cross_entropy(logits[rows, vocab], targets[rows])` (mean over rows); fused with its
    /// backward: writes `dlogits`, returns the loss. `targets` is an i32 tensor.
    fn cross_entropy(
        &self,
        dlogits: Tensor,
        logits: Tensor,
        targets: Tensor,
        rows: usize,
        vocab: usize,
    ) -> Result<f32>;

    /// Sum of squares of `t` (for global-norm clipping).
    fn sum_squares(&self, t: Tensor) -> Result<f64>;

    /// `t *= s`.
    fn scale(&self, t: Tensor, s: f32) -> Result<()>;

    /// One `torch.optim.AdamW` update of `param` from `grad`, with moments `m` and `v`. With a
    /// `mirror`, `param` is a `[rows, cols]` matrix whose updated values are also written
    /// transposed to `mirror.out` (the copy the forward multiplies with), in the same pass.
    fn adamw(
        &self,
        param: Tensor,
        grad: Tensor,
        m: Tensor,
        v: Tensor,
        hp: &AdamW,
        mirror: Option<Mirror>,
    ) -> Result<()>;
}

/// [`Backend::matmul_activation_backward`] as its two calls, [`Backend::matmul_backward`] into
/// `scratch` and then [`Backend::activation_backward`]: the default, and a device's way when it
/// cannot fuse them.
pub fn separate_matmul_activation_backward<B: Backend + ?Sized>(
    b: &B,
    (dpre, scratch): (Tensor, Tensor),
    (pre, act, dropout): (Tensor, Activation, Option<Dropout>),
    (dweight, dbias, grads): (Weight, Option<Tensor>, GradStore),
    (dout, inp, weight): (Tensor, Tensor, Weight),
    [rows, k, n]: [usize; 3],
) -> Result<()> {
    let dinp = Some(scratch);
    b.matmul_backward(
        dinp, false, dweight, dbias, grads, dout, inp, weight, rows, k, n,
    )?;
    b.activation_backward(dpre, scratch, pre, act, dropout)
}
