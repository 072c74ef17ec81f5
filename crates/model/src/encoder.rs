//! `nn.TransformerEncoder` forward and backward, explicit layer by layer, on the backend API.

use crate::activations::{self, Acts, BatchShape, LayerActs};
use crate::layout::Layout;
use crate::params::{self, LayerParams};
use crate::EncoderConfig;
use anyhow::{bail, Result};
use flint_backend::{Activation, AttentionShape, Backend, Buffer, DType, Dropout, Mirror, Tensor};

/// Training (dropout on, drawn from `(seed, step)`) or evaluation (dropout off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train { seed: u64, step: u64 },
    Eval,
}

/// Options of one forward call, PyTorch's `mask` / `src_key_padding_mask` arguments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Masks {
    pub causal: bool,
    /// Whether a key-padding mask was uploaded with [`Encoder::set_input`].
    pub key_padding: bool,
}

struct Planned<B: Backend> {
    shape: BatchShape,
    plan: Layout,
    _buffer: B::Buffer,
    acts: Acts,
}

pub struct Encoder<B: Backend> {
    pub config: EncoderConfig,
    backend: B,
    layout: Layout,
    params: B::Buffer,
    /// The linear weights transposed to `[in, out]`, at the same offsets as in `params`
    /// (biases and norms unused): the forward's fast gemm operand order. Written here from the
    /// initial parameters, then by the optimizer through [`Encoder::mirrors`].
    weights_t: B::Buffer,
    grads: B::Buffer,
    planned: Option<Planned<B>>,
    last: Option<(Masks, Mode)>,
}

/// Dropout call sites of a layer, for distinct Philox streams.
const SITES: u64 = 4;

impl<B: Backend> Encoder<B> {
    /// An encoder with parameters `init` (laid out by [`Encoder::layout`]) and zero gradients.
    pub fn new(backend: B, config: EncoderConfig, init: &[f32]) -> Result<Self> {
        config.validate()?;
        let layout = params::param_layout(&config);
        if init.len() != layout.total() {
            bail!(
                "{} initial values for {} parameters",
                init.len(),
                layout.total()
            );
        }
        let params = backend.alloc(DType::F32, layout.total())?;
        backend.upload(params.tensor(), init)?;
        let grads = backend.alloc(DType::F32, layout.total())?;
        let weights_t = backend.alloc(DType::F32, layout.total())?;
        let encoder = Encoder {
            config,
            backend,
            layout,
            params,
            weights_t,
            grads,
            planned: None,
            last: None,
        };
        for (index, mirror) in encoder.mirrors().into_iter().enumerate() {
            if let Some(m) = mirror {
                let src = encoder.layout.view(encoder.params.tensor(), index);
                encoder.backend.transpose(m.out, src, m.rows, m.cols)?;
            }
        }
        Ok(encoder)
    }

    /// For each parameter tensor (in layout order), the transposed copy the forward reads, if
    /// any: whoever updates the parameters must update these too (the optimizer passes them to
    /// [`Backend::adamw`]).
    pub fn mirrors(&self) -> Vec<Option<Mirror>> {
        let t = self.weights_t.tensor();
        self.layout
            .entries()
            .iter()
            .enumerate()
            .map(|(index, e)| {
                let linear = e.shape.len() == 2;
                linear.then(|| Mirror {
                    out: self.layout.view(t, index),
                    rows: e.shape[0],
                    cols: e.shape[1],
                })
            })
            .collect()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn params(&self) -> Tensor {
        self.params.tensor()
    }
    pub fn grads(&self) -> Tensor {
        self.grads.tensor()
    }

    /// Plans and allocates the activations for `shape`; a no-op when already planned for it, so
    /// steps of one shape allocate nothing after the first.
    pub fn plan(&mut self, shape: BatchShape) -> Result<()> {
        if self.planned.as_ref().map(|p| p.shape) != Some(shape) {
            self.planned = None;
            let plan = activations::plan(&self.config, shape);
            let buffer = self.backend.alloc(DType::F32, plan.total())?;
            let acts = Acts::new(&plan, buffer.tensor(), self.config.num_layers);
            self.planned = Some(Planned {
                shape,
                plan,
                _buffer: buffer,
                acts,
            });
        }
        Ok(())
    }

    /// The activation plan as a table (bytes per buffer, total), for `--verbose`.
    pub fn describe_plan(&self) -> Result<String> {
        let n = self.layout.total();
        let line =
            |name: &str, count: usize| format!("  {name:<49} {}\n", activations::mib(count * 4));
        let model = format!(
            "model buffers (f32, {n} parameters):\n{}{}{}{}",
            line("parameters", n),
            line("gradients", n),
            line("transposed weight copies (forward)", n),
            line("AdamW moments m and v (when training)", 2 * n),
        );
        let plan = &self.planned()?.plan;
        Ok(model + &activations::describe(plan, self.config.num_layers))
    }

    fn planned(&self) -> Result<&Planned<B>> {
        match &self.planned {
            Some(p) => Ok(p),
            None => bail!("call plan() with the batch shape before running the encoder"),
        }
    }

    /// Uploads `src` (`[seq, batch, d_model]`, or `[batch, seq, d_model]` when `batch_first`)
    /// and an optional key-padding mask (`[batch, seq]`, true = padding).
    pub fn set_input(&mut self, src: &[f32], key_padding: Option<&[bool]>) -> Result<()> {
        let p = self.planned()?;
        if src.len() != p.acts.input.len() {
            bail!(
                "input has {} values, the plan expects {}",
                src.len(),
                p.acts.input.len()
            );
        }
        self.backend.upload(p.acts.input, src)?;
        if let Some(mask) = key_padding {
            let m: Vec<f32> = mask.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
            if m.len() != p.acts.key_padding.len() {
                bail!(
                    "key padding mask has {} values, expected {}",
                    m.len(),
                    p.acts.key_padding.len()
                );
            }
            self.backend.upload(p.acts.key_padding, &m)?;
        }
        Ok(())
    }

    fn attention_shape(&self, shape: BatchShape, causal: bool) -> AttentionShape {
        AttentionShape {
            batch: shape.batch,
            seq: shape.seq,
            heads: self.config.nhead,
            head_dim: self.config.head_dim(),
            batch_first: self.config.batch_first,
            causal,
        }
    }

    fn dropout(&self, mode: Mode, layer: usize, site: u64) -> Option<Dropout> {
        match mode {
            Mode::Train { seed, step } if self.config.dropout > 0.0 => Some(Dropout {
                p: self.config.dropout,
                seed,
                offset: (step << 24) | (layer as u64 * SITES + site),
            }),
            _ => None,
        }
    }

    /// The output of the last forward, laid out like the input.
    pub fn output(&self) -> Result<Tensor> {
        let p = self.planned()?;
        let c = &self.config;
        Ok(if c.final_norm {
            p.acts.final_out
        } else {
            layer_output(c, &p.acts.layers[c.num_layers - 1])
        })
    }

    /// Where the loss writes d loss / d output before [`Encoder::backward`].
    pub fn output_grad(&self) -> Result<Tensor> {
        Ok(self.planned()?.acts.dout)
    }

    pub fn forward(&mut self, masks: Masks, mode: Mode) -> Result<Tensor> {
        let p = self.planned()?;
        let (b, c, a) = (&self.backend, &self.config, &p.acts);
        let (rows, e, f) = (p.shape.batch * p.shape.seq, c.d_model, c.dim_feedforward);
        let att_shape = self.attention_shape(p.shape, masks.causal);
        let kp = masks.key_padding.then_some(a.key_padding);
        let act: Activation = c.activation.into();
        let params = self.params.tensor();
        let mut x = a.input;
        for (l, la) in a.layers.iter().enumerate() {
            let w = LayerParams::new(&self.layout, params, l);
            let wt = LayerParams::new(&self.layout, self.weights_t.tensor(), l);
            let norm = |out, mean, rstd, inp, weight, bias| {
                b.layernorm_forward(
                    out,
                    mean,
                    rstd,
                    inp,
                    weight,
                    bias,
                    rows,
                    e,
                    c.layer_norm_eps,
                )
            };
            let attn_in = if c.norm_first {
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
            b.matmul_forward_t(
                la.qkv,
                attn_in,
                wt.in_proj_weight,
                Some(w.in_proj_bias),
                rows,
                e,
                3 * e,
            )?;
            b.attention_forward(
                la.atty,
                la.att,
                la.qkv,
                kp,
                &att_shape,
                self.dropout(mode, l, 0),
            )?;
            b.matmul_forward_t(
                a.sa,
                la.atty,
                wt.out_proj_weight,
                Some(w.out_proj_bias),
                rows,
                e,
                e,
            )?;
            b.residual_forward(la.res1, x, a.sa, self.dropout(mode, l, 1))?;
            let ff_in = if c.norm_first {
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
            b.matmul_forward_t(
                la.fch,
                ff_in,
                wt.linear1_weight,
                Some(w.linear1_bias),
                rows,
                e,
                f,
            )?;
            b.activation_forward(la.ff, la.fch, act, self.dropout(mode, l, 2))?;
            b.matmul_forward_t(
                a.ffo,
                la.ff,
                wt.linear2_weight,
                Some(w.linear2_bias),
                rows,
                f,
                e,
            )?;
            let ff_resid = if c.norm_first { la.res1 } else { la.norm1 };
            b.residual_forward(la.res2, ff_resid, a.ffo, self.dropout(mode, l, 3))?;
            if !c.norm_first {
                norm(
                    la.norm2,
                    la.mean2,
                    la.rstd2,
                    la.res2,
                    w.norm2_weight,
                    w.norm2_bias,
                )?;
            }
            x = layer_output(c, la);
        }
        if let Some((weight, bias)) = params::final_norm(&self.layout, params, c) {
            b.layernorm_forward(
                a.final_out,
                a.final_mean,
                a.final_rstd,
                x,
                weight,
                bias,
                rows,
                e,
                c.layer_norm_eps,
            )?;
        }
        self.last = Some((masks, mode));
        self.output()
    }

    /// `grads += d loss / d params` from the gradient in [`Encoder::output_grad`], through the
    /// activations of the last forward (which must have been a training or eval forward of the
    /// same batch). With `input_grad`, also leaves d loss / d input in the returned tensor.
    pub fn backward(&mut self, input_grad: bool) -> Result<Option<Tensor>> {
        let Some((masks, mode)) = self.last else {
            bail!("backward() needs a forward() first");
        };
        let p = self.planned()?;
        let (b, c, a) = (&self.backend, &self.config, &p.acts);
        let (rows, e, f) = (p.shape.batch * p.shape.seq, c.d_model, c.dim_feedforward);
        let att_shape = self.attention_shape(p.shape, masks.causal);
        let act: Activation = c.activation.into();
        let (params, grads) = (self.params.tensor(), self.grads.tensor());
        let norm_back = |dinp, acc, dw, db, dout, inp, w, mean, rstd| {
            b.layernorm_backward(dinp, acc, dw, db, dout, inp, w, mean, rstd, rows, e)
        };

        let last = c.num_layers - 1;
        let mut dy = a.dout;
        if let (Some((w, _)), Some((dw, db))) = (
            params::final_norm(&self.layout, params, c),
            params::final_norm(&self.layout, grads, c),
        ) {
            let x = layer_output(c, &a.layers[last]);
            norm_back(
                a.dstream[0],
                false,
                dw,
                db,
                a.dout,
                x,
                w,
                a.final_mean,
                a.final_rstd,
            )?;
            dy = a.dstream[0];
        }
        for l in (0..c.num_layers).rev() {
            let (la, w, g) = (
                &a.layers[l],
                LayerParams::new(&self.layout, params, l),
                LayerParams::new(&self.layout, grads, l),
            );
            let x = if l == 0 {
                a.input
            } else {
                layer_output(c, &a.layers[l - 1])
            };
            let dx = if dy == a.dstream[0] {
                a.dstream[1]
            } else {
                a.dstream[0]
            };

            // Feed-forward block: d res2 arrives in `dy` (pre-norm) or via LN2 (post-norm).
            let (dres2, ff_in, dff_resid) = if c.norm_first {
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
            b.fill(dff_resid, 0.0)?;
            b.residual_backward(dff_resid, a.dffo, dres2, self.dropout(mode, l, 3))?;
            b.matmul_backward(
                Some(a.dff),
                false,
                g.linear2_weight,
                Some(g.linear2_bias),
                a.dffo,
                la.ff,
                w.linear2_weight,
                rows,
                f,
                e,
            )?;
            b.activation_backward(a.dfch, a.dff, la.fch, act, self.dropout(mode, l, 2))?;
            // Post-norm adds into d norm1 (already holding the residual path); pre-norm writes
            // d norm2 fresh and routes it through LN2 into d res1.
            b.matmul_backward(
                Some(a.dnorm),
                !c.norm_first,
                g.linear1_weight,
                Some(g.linear1_bias),
                a.dfch,
                ff_in,
                w.linear1_weight,
                rows,
                e,
                f,
            )?;
            if c.norm_first {
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

            // Attention block: d res1 is in `dres`.
            b.fill(dx, 0.0)?;
            b.residual_backward(dx, a.dsa, a.dres, self.dropout(mode, l, 1))?;
            b.matmul_backward(
                Some(a.datty),
                false,
                g.out_proj_weight,
                Some(g.out_proj_bias),
                a.dsa,
                la.atty,
                w.out_proj_weight,
                rows,
                e,
                e,
            )?;
            b.attention_backward(
                a.dqkv,
                a.datty,
                la.qkv,
                la.att,
                &att_shape,
                self.dropout(mode, l, 0),
            )?;
            if c.norm_first {
                b.matmul_backward(
                    Some(a.dnorm),
                    false,
                    g.in_proj_weight,
                    Some(g.in_proj_bias),
                    a.dqkv,
                    la.norm1,
                    w.in_proj_weight,
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
                let dinp = (l > 0 || input_grad).then_some(dx);
                b.matmul_backward(
                    dinp,
                    true,
                    g.in_proj_weight,
                    Some(g.in_proj_bias),
                    a.dqkv,
                    x,
                    w.in_proj_weight,
                    rows,
                    e,
                    3 * e,
                )?;
            }
            dy = dx;
        }
        Ok(input_grad.then_some(dy))
    }

    pub fn zero_grad(&self) -> Result<()> {
        self.backend.fill(self.grads.tensor(), 0.0)
    }
}

fn layer_output(c: &EncoderConfig, la: &LayerActs) -> Tensor {
    if c.norm_first {
        la.res2
    } else {
        la.norm2
    }
}
