//! One Transformer block, forward and backward: self-attention and a feed-forward network,
//! each with a residual connection and a LayerNorm before (pre-norm, GPT-2, `norm_first`) or
//! after (post-norm, PyTorch's default). The encoder and GPT-2 are stacks of this block.

use crate::activations::{Acts, LayerActs};
use crate::params::LayerParams;
use anyhow::Result;
use flint_backend::{
    Activation, AttentionShape, Backend, Dropout, GradStore, Tensor, Weight, WeightLayout,
};

/// The shape and options shared by every block of a model.
pub struct Block {
    pub rows: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub eps: f32,
    pub norm_first: bool,
    pub act: Activation,
    pub attention: AttentionShape,
    pub key_padding: Option<Tensor>,
    /// How the parameters store their projection matrices; the mirrors hold the other layout.
    pub layout: WeightLayout,
}

/// A block's output among its saved activations.
pub fn output(norm_first: bool, la: &LayerActs) -> Tensor {
    if norm_first {
        la.res2
    } else {
        la.norm2
    }
}

/// One layer's keys and values of the tokens so far (`[max_len, d_model]` each), and the
/// position of the token being added.
#[derive(Clone, Copy)]
pub struct KvCache {
    pub k: Tensor,
    pub v: Tensor,
    pub pos: usize,
}

/// Dropout of the four sites of a block: attention probabilities, the attention branch, the
/// activation, the feed-forward branch.
pub type Dropouts = [Option<Dropout>; 4];

impl Block {
    /// The weight the forward multiplies with: `[in, out]` (gemm's fast operand order on the CPU).
    fn fwd(&self, params: Tensor, mirror: Tensor) -> Weight {
        let tensor = match self.layout {
            WeightLayout::InOut => params,
            WeightLayout::OutIn => mirror,
        };
        Weight {
            tensor,
            layout: WeightLayout::InOut,
        }
    }

    /// The weight backward multiplies `dout` with: `[out, in]`.
    fn bwd(&self, params: Tensor, mirror: Tensor) -> Weight {
        let tensor = match self.layout {
            WeightLayout::OutIn => params,
            WeightLayout::InOut => mirror,
        };
        Weight {
            tensor,
            layout: WeightLayout::OutIn,
        }
    }

    fn grad(&self, tensor: Tensor) -> Weight {
        Weight {
            tensor,
            layout: self.layout,
        }
    }

    pub fn output(&self, la: &LayerActs) -> Tensor {
        output(self.norm_first, la)
    }

    /// Runs the block on `x`, saving what backward needs in `la` (see [`LayerActs`]). With a
    /// `cache`, `x` is the one new token of a causal sequence, attending to the cached ones.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        w: &LayerParams,
        m: &LayerParams,
        x: Tensor,
        la: &LayerActs,
        a: &Acts,
        d: Dropouts,
        cache: Option<KvCache>,
    ) -> Result<Tensor> {
        let (rows, e, f) = (self.rows, self.d_model, self.d_ff);
        let norm = |out, mean, rstd, inp, weight, bias| {
            b.layernorm_forward(out, mean, rstd, inp, weight, bias, rows, e, self.eps)
        };
        let attn_in = if self.norm_first {
            norm(
                la.norm1,
                la.mean1,
                la.rstd1,
                x,
                w.norm1_weight,
                w.norm1_bias,
            )?;
            la.norm1
        } else {
            x
        };
        let qkv_w = self.fwd(w.in_proj_weight, m.in_proj_weight);
        b.matmul_forward(la.qkv, attn_in, qkv_w, Some(w.in_proj_bias), rows, e, 3 * e)?;
        match cache {
            None => b.attention_forward(
                la.atty,
                la.att,
                la.qkv,
                self.key_padding,
                &self.attention,
                d[0],
            )?,
            Some(c) => {
                let (heads, dh) = (self.attention.heads, self.attention.head_dim);
                b.attention_decode(la.atty, la.qkv, c.k, c.v, c.pos, heads, dh)?
            }
        }
        let out_w = self.fwd(w.out_proj_weight, m.out_proj_weight);
        b.matmul_forward(a.sa, la.atty, out_w, Some(w.out_proj_bias), rows, e, e)?;
        b.residual_forward(la.res1, x, a.sa, d[1])?;
        let ff_in = if self.norm_first {
            norm(
                la.norm2,
                la.mean2,
                la.rstd2,
                la.res1,
                w.norm2_weight,
                w.norm2_bias,
            )?;
            la.norm2
        } else {
            norm(
                la.norm1,
                la.mean1,
                la.rstd1,
                la.res1,
                w.norm1_weight,
                w.norm1_bias,
            )?;
            la.norm1
        };
        let fc_w = self.fwd(w.linear1_weight, m.linear1_weight);
        b.linear_activation_forward(
            (la.fch, la.ff),
            ff_in,
            fc_w,
            Some(w.linear1_bias),
            (self.act, d[2]),
            rows,
            e,
            f,
        )?;
        let proj_w = self.fwd(w.linear2_weight, m.linear2_weight);
        b.matmul_forward(a.ffo, la.ff, proj_w, Some(w.linear2_bias), rows, f, e)?;
        let ff_resid = if self.norm_first { la.res1 } else { la.norm1 };
        b.residual_forward(la.res2, ff_resid, a.ffo, d[3])?;
        if !self.norm_first {
            norm(
                la.norm2,
                la.mean2,
                la.rstd2,
                la.res2,
                w.norm2_weight,
                w.norm2_bias,
            )?;
        }
        Ok(self.output(la))
    }

    /// Given `dy` = d loss / d output, stores the parameter gradients into `g` as `grads` says
    /// and writes d loss / d x into `dx` (`dx` is skipped where only it needs a matmul, when
    /// `need_dx` is false).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        b: &B,
        w: &LayerParams,
        m: &LayerParams,
        g: &LayerParams,
        x: Tensor,
        la: &LayerActs,
        a: &Acts,
        dy: Tensor,
        dx: Tensor,
        need_dx: bool,
        d: Dropouts,
        grads: GradStore,
    ) -> Result<()> {
        let (rows, e, f) = (self.rows, self.d_model, self.d_ff);
        let norm_back = |dinp, acc, dw, db, dout, inp, weight, mean, rstd| {
            b.layernorm_backward(
                dinp, acc, dw, db, grads, dout, inp, weight, mean, rstd, rows, e,
            )
        };

        // Feed-forward half: d res2 arrives in `dy` (pre-norm) or through LN2 (post-norm).
        let (dres2, ff_in, dff_resid) = if self.norm_first {
            (dy, la.norm2, a.dres)
        } else {
            norm_back(
                a.dres,
                false,
                g.norm2_weight,
                g.norm2_bias,
                dy,
                la.res2,
                w.norm2_weight,
                la.mean2,
                la.rstd2,
            )?;
            (a.dres, la.norm1, a.dnorm)
        };
        b.residual_backward(dff_resid, a.dffo, dres2, d[3])?;
        let proj = (
            self.grad(g.linear2_weight),
            self.bwd(w.linear2_weight, m.linear2_weight),
        );
        b.matmul_activation_backward(
            (a.dfch, a.dff),
            (la.fch, self.act, d[2]),
            proj.0,
            Some(g.linear2_bias),
            grads,
            a.dffo,
            la.ff,
            proj.1,
            rows,
            f,
            e,
        )?;
        // Post-norm adds into d norm1 (already holding the residual path); pre-norm writes
        // d norm2 fresh and routes it through LN2 into d res1.
        let fc = (
            self.grad(g.linear1_weight),
            self.bwd(w.linear1_weight, m.linear1_weight),
        );
        b.matmul_backward(
            Some(a.dnorm),
            !self.norm_first,
            fc.0,
            Some(g.linear1_bias),
            grads,
            a.dfch,
            ff_in,
            fc.1,
            rows,
            e,
            f,
        )?;
        if self.norm_first {
            norm_back(
                a.dres,
                true,
                g.norm2_weight,
                g.norm2_bias,
                a.dnorm,
                la.res1,
                w.norm2_weight,
                la.mean2,
                la.rstd2,
            )?;
        } else {
            norm_back(
                a.dres,
                false,
                g.norm1_weight,
                g.norm1_bias,
                a.dnorm,
                la.res1,
                w.norm1_weight,
                la.mean1,
                la.rstd1,
            )?;
        }

        // Attention half: d res1 is in `dres`.
        b.residual_backward(dx, a.dsa, a.dres, d[1])?;
        let out = (
            self.grad(g.out_proj_weight),
            self.bwd(w.out_proj_weight, m.out_proj_weight),
        );
        b.matmul_backward(
            Some(a.datty),
            false,
            out.0,
            Some(g.out_proj_bias),
            grads,
            a.dsa,
            la.atty,
            out.1,
            rows,
            e,
            e,
        )?;
        b.attention_backward(a.dqkv, a.datty, la.qkv, la.att, &self.attention, d[0])?;
        let qkv = (
            self.grad(g.in_proj_weight),
            self.bwd(w.in_proj_weight, m.in_proj_weight),
        );
        if self.norm_first {
            b.matmul_backward(
                Some(a.dnorm),
                false,
                qkv.0,
                Some(g.in_proj_bias),
                grads,
                a.dqkv,
                la.norm1,
                qkv.1,
                rows,
                e,
                3 * e,
            )?;
            norm_back(
                dx,
                true,
                g.norm1_weight,
                g.norm1_bias,
                a.dnorm,
                x,
                w.norm1_weight,
                la.mean1,
                la.rstd1,
            )?;
        } else {
            // The first layer's input gradient is the costliest matmul nobody may need.
            let dinp = need_dx.then_some(dx);
            b.matmul_backward(
                dinp,
                true,
                qkv.0,
                Some(g.in_proj_bias),
                grads,
                a.dqkv,
                x,
                qkv.1,
                rows,
                e,
                3 * e,
            )?;
        }
        Ok(())
    }
}
