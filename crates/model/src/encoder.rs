//! `nn.TransformerEncoder` forward and backward, explicit layer by layer, on the backend API.

use crate::activations::{self, Acts, BatchShape, Planned};
use crate::block::{self, Block, Dropouts};
use crate::layout::Layout;
use crate::params::{self, LayerParams};
use crate::weights::Weights;
use crate::EncoderConfig;
use anyhow::{bail, Result};
use flint_backend::{AttentionShape, Backend, Dropout, Mirror, Tensor, WeightLayout};

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

pub struct Encoder<B: Backend> {
    pub config: EncoderConfig,
    backend: B,
    weights: Weights<B>,
    planned: Option<Planned<B>>,
    last: Option<(Masks, Mode)>,
}

/// Dropout call sites of a layer, for distinct Philox streams.
const SITES: u64 = 4;

impl<B: Backend> Encoder<B> {
    /// An encoder with parameters `init` (laid out by [`Encoder::layout`]) and zero gradients.
    /// The `nn.Linear` weights get `[in, out]` mirrors for the forward.
    pub fn new(backend: B, config: EncoderConfig, init: &[f32]) -> Result<Self> {
        config.validate()?;
        let layout = params::param_layout(&config);
        let weights = Weights::new(&backend, layout, init, |e| e.shape.len() == 2)?;
        Ok(Encoder {
            config,
            backend,
            weights,
            planned: None,
            last: None,
        })
    }

    /// See [`Weights::mirrors`].
    pub fn mirrors(&self) -> Vec<Option<Mirror>> {
        self.weights.mirrors()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }
    pub fn layout(&self) -> &Layout {
        &self.weights.layout
    }
    pub fn params(&self) -> Tensor {
        self.weights.params()
    }
    pub fn grads(&self) -> Tensor {
        self.weights.grads()
    }

    /// Plans and allocates the activations for `shape`; a no-op when already planned for it, so
    /// steps of one shape allocate nothing after the first.
    pub fn plan(&mut self, shape: BatchShape) -> Result<()> {
        Planned::ensure(&mut self.planned, &self.backend, self.config.dims(), shape)
    }

    /// The activation plan as a table (bytes per buffer, total), for `--verbose`.
    pub fn describe_plan(&self) -> Result<String> {
        let plan = &self.planned()?.plan;
        Ok(self.weights.describe() + &activations::describe(plan, self.config.num_layers))
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
            block::output(c.norm_first, &p.acts.layers[c.num_layers - 1])
        })
    }

    /// Where the loss writes d loss / d output before [`Encoder::backward`].
    pub fn output_grad(&self) -> Result<Tensor> {
        Ok(self.planned()?.acts.dout)
    }

    fn block(&self, shape: BatchShape, masks: Masks, acts: &Acts) -> Block {
        let c = &self.config;
        Block {
            rows: shape.batch * shape.seq,
            d_model: c.d_model,
            d_ff: c.dim_feedforward,
            eps: c.layer_norm_eps,
            norm_first: c.norm_first,
            act: c.activation.into(),
            attention: self.attention_shape(shape, masks.causal),
            key_padding: masks.key_padding.then_some(acts.key_padding),
            layout: WeightLayout::OutIn,
        }
    }

    fn dropouts(&self, mode: Mode, layer: usize) -> Dropouts {
        [0, 1, 2, 3].map(|site| self.dropout(mode, layer, site))
    }

    /// Parameters, their transposed mirrors and gradients of layer `l`.
    fn layer_views(&self, l: usize) -> (LayerParams, LayerParams, LayerParams) {
        self.weights.layer(l * params::LAYER_PARAMS.len())
    }

    pub fn forward(&mut self, masks: Masks, mode: Mode) -> Result<Tensor> {
        let p = self.planned()?;
        let (b, c, a) = (&self.backend, &self.config, &p.acts);
        let block = self.block(p.shape, masks, a);
        let mut x = a.input;
        for (l, la) in a.layers.iter().enumerate() {
            let (w, m, _) = self.layer_views(l);
            x = block.forward(b, &w, &m, x, la, a, self.dropouts(mode, l), None)?;
        }
        if let Some((weight, bias)) = params::final_norm(self.layout(), self.params(), c) {
            let (rows, e) = (block.rows, c.d_model);
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

    /// `grads += d loss / d params` (`=` after [`Encoder::zero_grad`]) from the gradient in
    /// [`Encoder::output_grad`], through the activations of the last forward (which must have
    /// been a training or eval forward of the same batch). With `input_grad`, also leaves
    /// d loss / d input in the returned tensor.
    pub fn backward(&mut self, input_grad: bool) -> Result<Option<Tensor>> {
        let Some((masks, mode)) = self.last else {
            bail!("backward() needs a forward() first");
        };
        let grads = self.weights.grad_store();
        let p = self.planned()?;
        let (b, c, a) = (&self.backend, &self.config, &p.acts);
        let block = self.block(p.shape, masks, a);
        let last = c.num_layers - 1;
        let mut dy = a.dout;
        if let (Some((w, _)), Some((dw, db))) = (
            params::final_norm(self.layout(), self.params(), c),
            params::final_norm(self.layout(), self.grads(), c),
        ) {
            let x = block.output(&a.layers[last]);
            b.layernorm_backward(
                a.dstream[0],
                false,
                dw,
                db,
                grads,
                a.dout,
                x,
                w,
                a.final_mean,
                a.final_rstd,
                block.rows,
                c.d_model,
            )?;
            dy = a.dstream[0];
        }
        for l in (0..c.num_layers).rev() {
            let (w, m, g) = self.layer_views(l);
            let x = if l == 0 {
                a.input
            } else {
                block.output(&a.layers[l - 1])
            };
            let dx = if dy == a.dstream[0] {
                a.dstream[1]
            } else {
                a.dstream[0]
            };
            let need_dx = l > 0 || input_grad;
            block.backward(
                b,
                &w,
                &m,
                &g,
                x,
                &a.layers[l],
                a,
                dy,
                dx,
                need_dx,
                self.dropouts(mode, l),
                grads,
            )?;
            dy = dx;
        }
        self.weights.backward_done();
        Ok(input_grad.then_some(dy))
    }

    /// See [`Weights::zero_grad`]: the next backward overwrites the gradients.
    pub fn zero_grad(&mut self) {
        self.weights.zero_grad()
    }
}
