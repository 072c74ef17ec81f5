//! GPT-2 (`transformers.GPT2LMHeadModel`): token and position embeddings, pre-norm causal
//! blocks with tanh-GELU, a final LayerNorm and an output head tied to the token embedding.
//! Parameters use Hugging Face's names and `Conv1D` `[in, out]` layout, so checkpoints move
//! both ways without conversion.

use crate::activations::{self, BatchShape, Dims, Planned};
use crate::block::{Block, Dropouts, KvCache};
use crate::layout::{Entry, Layout};
use crate::params::LAYER_PARAMS;
use crate::weights::Weights;
use anyhow::{bail, Result};
use flint_backend::{
    Activation, AttentionShape, Backend, Buffer, DType, Dropout, GradStore, Mirror, Tensor, Weight,
    WeightLayout,
};
use serde::{Deserialize, Serialize};

/// GPT-2's hyper-parameters, with `GPT2Config`'s names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// The context length.
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// The feed-forward width; `None` is GPT-2's `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    pub layer_norm_epsilon: f32,
    /// One rate for `embd_pdrop`, `attn_pdrop` and `resid_pdrop`.
    pub dropout: f32,
}

/// Far past any machine's memory (16 bytes each with gradients and AdamW's moments): a
/// larger model is refused before any size is computed or allocated.
const MAX_PARAMETERS: usize = 1 << 40;

impl GptConfig {
    /// Named presets: `tiny` (byte vocabulary, trains in minutes on 2 cores) and the GPT-2
    /// family of OpenAI's release.
    pub fn preset(name: &str) -> Result<Self> {
        let (vocab_size, n_positions, n_embd, n_layer, n_head) = match name {
            "tiny" => (256, 128, 128, 4, 4),
            "gpt2" => (50257, 1024, 768, 12, 12),
            "gpt2-medium" => (50257, 1024, 1024, 24, 16),
            "gpt2-large" => (50257, 1024, 1280, 36, 20),
            other => {
                bail!("unknown preset `{other}`; choose tiny, gpt2, gpt2-medium or gpt2-large")
            }
        };
        Ok(GptConfig {
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            dropout: 0.0,
        })
    }

    pub fn validate(&self) -> Result<()> {
        let sizes = [
            self.vocab_size,
            self.n_positions,
            self.n_embd,
            self.n_layer,
            self.n_head,
        ];
        if sizes.contains(&0) || self.n_inner == Some(0) {
            bail!("vocab_size, n_positions, n_embd, n_layer, n_head and n_inner must be positive");
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            bail!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.n_embd,
                self.n_head
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout ({}) must be in [0, 1)", self.dropout);
        }
        if self.parameters().is_none_or(|n| n > MAX_PARAMETERS) {
            bail!(
                "the model is too large: over {MAX_PARAMETERS} parameters (n_layer {}, n_embd {}, n_inner {:?}, n_positions {}, vocab_size {})",
                self.n_layer,
                self.n_embd,
                self.n_inner,
                self.n_positions,
                self.vocab_size
            );
        }
        Ok(())
    }

    /// The number of parameters (the tied head counted once, as the layout holds them), or
    /// `None` past `usize`: computed without overflow, for any sizes.
    pub fn parameters(&self) -> Option<usize> {
        let d = self.n_embd;
        let inner = self.n_inner.map_or(d.checked_mul(4), Some)?;
        // Per block: qkv and output projections with biases (4d(d+1)), the feed-forward pair
        // (2 d inner, biases inner + d), two norms (4d).
        let block = d
            .checked_add(1)?
            .checked_mul(d)?
            .checked_mul(4)?
            .checked_add(d.checked_mul(inner)?.checked_mul(2)?)?
            .checked_add(inner)?
            .checked_add(d.checked_mul(5)?)?;
        let embeddings = self
            .vocab_size
            .checked_add(self.n_positions)?
            .checked_mul(d)?;
        block
            .checked_mul(self.n_layer)?
            .checked_add(embeddings)?
            .checked_add(d.checked_mul(2)?)
    }

    /// The feed-forward width.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    fn dims(&self) -> Dims {
        Dims {
            num_layers: self.n_layer,
            d_model: self.n_embd,
            d_ff: self.inner(),
            nhead: self.n_head,
            attention_dropout: self.dropout,
        }
    }
}

/// Layout entries before the first block.
const WTE: usize = 0;
const WPE: usize = 1;
const FIRST_BLOCK: usize = 2;

/// Hugging Face's names in `transformer.h.<l>.`, in [`LAYER_PARAMS`]'s roles and order.
const BLOCK_NAMES: [&str; 12] = [
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
    "ln_1.weight",
    "ln_1.bias",
    "ln_2.weight",
    "ln_2.bias",
];

/// `GPT2LMHeadModel`'s parameters by their `state_dict` names (the tied `lm_head.weight` is
/// `transformer.wte.weight`).
pub fn param_layout(c: &GptConfig) -> Layout {
    let (e, f) = (c.n_embd, c.inner());
    let mut layout = Layout::default();
    layout.push("transformer.wte.weight", &[c.vocab_size, e]);
    layout.push("transformer.wpe.weight", &[c.n_positions, e]);
    let shapes: [&[usize]; 12] = [
        &[e, 3 * e],
        &[3 * e],
        &[e, e],
        &[e],
        &[e, f],
        &[f],
        &[f, e],
        &[e],
        &[e],
        &[e],
        &[e],
        &[e],
    ];
    for l in 0..c.n_layer {
        for (name, shape) in BLOCK_NAMES.iter().zip(shapes) {
            layout.push(format!("transformer.h.{l}.{name}"), shape);
        }
    }
    layout.push("transformer.ln_f.weight", &[e]);
    layout.push("transformer.ln_f.bias", &[e]);
    debug_assert_eq!(BLOCK_NAMES.len(), LAYER_PARAMS.len());
    layout
}

/// Whether weight decay applies: matrices (and embeddings) only, as GPT-2 training does.
pub fn decays(e: &Entry) -> bool {
    e.shape.len() >= 2
}

/// GPT-2's initialisation: N(0, 0.02) weights, residual projections scaled by
/// 1/sqrt(2 n_layer), zero biases, unit LayerNorm weights; drawn from Philox.
pub fn init_params(c: &GptConfig, layout: &Layout, seed: u64) -> Vec<f32> {
    let mut out = vec![0.0; layout.total()];
    let residual = 0.02 / (2.0 * c.n_layer as f32).sqrt();
    for (index, e) in layout.entries().iter().enumerate() {
        let dst = &mut out[e.offset..e.offset + e.numel()];
        let std = if e.name.ends_with("c_proj.weight") {
            residual
        } else if e.shape.len() == 2 {
            0.02
        } else {
            let is_norm_weight = e.name.contains(".ln_") && e.name.ends_with("weight");
            dst.fill(if is_norm_weight { 1.0 } else { 0.0 });
            continue;
        };
        for (i, x) in dst.iter_mut().enumerate() {
            *x = std * flint_backend::philox::normal(seed, index as u64, i as u64);
        }
    }
    out
}

/// Buffers only GPT-2 has: token ids in, logits out.
struct Head<B: Backend> {
    rows: usize,
    ids: B::Buffer,
    targets: B::Buffer,
    logits: B::Buffer,
    dlogits: B::Buffer,
}

/// The key/value cache of [`Gpt::decode`]: `[n_layer, max_len, n_embd]` each.
struct Decoder<B: Backend> {
    max_len: usize,
    k: B::Buffer,
    v: B::Buffer,
    len: usize,
}

pub struct Gpt<B: Backend> {
    pub config: GptConfig,
    backend: B,
    weights: Weights<B>,
    planned: Option<Planned<B>>,
    head: Option<Head<B>>,
    decoder: Option<Decoder<B>>,
    last: Option<Option<(u64, u64)>>,
}

impl<B: Backend> Gpt<B> {
    /// The projection matrices get `[out, in]` mirrors for backward, and `wte` a `[n_embd,
    /// vocab]` mirror for the output head's forward.
    pub fn new(backend: B, config: GptConfig, init: &[f32]) -> Result<Self> {
        config.validate()?;
        let layout = param_layout(&config);
        let mirrored = |e: &Entry| e.shape.len() == 2 && e.name != "transformer.wpe.weight";
        let weights = Weights::new(&backend, layout, init, mirrored)?;
        Ok(Gpt {
            config,
            backend,
            weights,
            planned: None,
            head: None,
            decoder: None,
            last: None,
        })
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
    pub fn mirrors(&self) -> Vec<Option<Mirror>> {
        self.weights.mirrors()
    }
    /// See [`Weights::zero_grad`]: the next backward overwrites the gradients.
    pub fn zero_grad(&mut self) {
        self.weights.zero_grad()
    }

    /// Plans and allocates the activations for `[batch, seq]` token batches.
    pub fn plan(&mut self, shape: BatchShape) -> Result<()> {
        if shape.seq > self.config.n_positions {
            bail!(
                "sequence length {} is above the model's context of {} positions",
                shape.seq,
                self.config.n_positions
            );
        }
        Planned::ensure(&mut self.planned, &self.backend, self.config.dims(), shape)?;
        let rows = shape.batch * shape.seq;
        if self.head.as_ref().map(|h| h.rows) != Some(rows) {
            let b = &self.backend;
            let v = self.config.vocab_size;
            self.head = Some(Head {
                rows,
                ids: b.alloc(DType::I32, rows)?,
                targets: b.alloc(DType::I32, rows)?,
                logits: b.alloc(DType::F32, rows * v)?,
                dlogits: b.alloc(DType::F32, rows * v)?,
            });
        }
        Ok(())
    }

    /// The plan as a table, for `--verbose`.
    pub fn describe_plan(&self) -> Result<String> {
        let (p, h) = self.planned()?;
        let head = format!(
            "  {:<49} {}\n",
            "logits and their gradient",
            activations::mib(2 * h.rows * self.config.vocab_size * 4)
        );
        Ok(self.weights.describe()
            + &activations::describe(&p.plan, self.config.n_layer)
            + "\n"
            + &head)
    }

    fn planned(&self) -> Result<(&Planned<B>, &Head<B>)> {
        match (&self.planned, &self.head) {
            (Some(p), Some(h)) => Ok((p, h)),
            _ => bail!("call plan() with the batch shape before running the model"),
        }
    }

    fn block(&self, shape: BatchShape) -> Block {
        let c = &self.config;
        Block {
            rows: shape.batch * shape.seq,
            d_model: c.n_embd,
            d_ff: c.inner(),
            eps: c.layer_norm_epsilon,
            norm_first: true,
            act: Activation::GeluTanh,
            attention: AttentionShape {
                batch: shape.batch,
                seq: shape.seq,
                heads: c.n_head,
                head_dim: c.n_embd / c.n_head,
                batch_first: true,
                causal: true,
            },
            key_padding: None,
            layout: WeightLayout::InOut,
        }
    }

    /// Dropout at site `site` of layer `layer` (the embedding is layer `n_layer`); GPT-2's MLP
    /// has no dropout between the activation and its projection.
    fn dropout(&self, rng: Option<(u64, u64)>, layer: usize, site: u64) -> Option<Dropout> {
        let (seed, step) = rng?;
        (self.config.dropout > 0.0 && site != 2).then_some(Dropout {
            p: self.config.dropout,
            seed,
            offset: (step << 24) | (layer as u64 * 4 + site),
        })
    }

    fn dropouts(&self, rng: Option<(u64, u64)>, layer: usize) -> Dropouts {
        [0, 1, 2, 3].map(|site| self.dropout(rng, layer, site))
    }

    /// Uploads token ids and the next-token targets, each `[batch, seq]`.
    pub fn set_batch(&mut self, ids: &[i32], targets: &[i32]) -> Result<()> {
        let (_, h) = self.planned()?;
        if ids.len() != h.rows || targets.len() != h.rows {
            bail!(
                "batch has {} ids and {} targets, the plan expects {}",
                ids.len(),
                targets.len(),
                h.rows
            );
        }
        self.backend.upload_i32(h.ids.tensor(), ids)?;
        self.backend.upload_i32(h.targets.tensor(), targets)
    }

    /// Forward to the logits `[batch, seq, vocab]`; `rng` is `Some((seed, step))` in training
    /// (dropout on), `None` in evaluation.
    pub fn forward(&mut self, rng: Option<(u64, u64)>) -> Result<Tensor> {
        self.run(rng, None)
    }

    /// Prepares [`Gpt::decode`] for a sequence of up to `max_len` tokens: one-token activations
    /// and an empty key/value cache per layer.
    pub fn start_decoding(&mut self, max_len: usize) -> Result<()> {
        if max_len > self.config.n_positions {
            bail!(
                "{max_len} tokens exceed the model's context of {}",
                self.config.n_positions
            );
        }
        self.plan(BatchShape { batch: 1, seq: 1 })?;
        let n = self.config.n_layer * max_len * self.config.n_embd;
        let (k, v) = (
            self.backend.alloc(DType::F32, n)?,
            self.backend.alloc(DType::F32, n)?,
        );
        self.decoder = Some(Decoder {
            max_len,
            k,
            v,
            len: 0,
        });
        Ok(())
    }

    /// Appends `token` to the sequence being decoded and returns the logits `[vocab]` of the
    /// next token: one position of compute, attending to the cached keys and values.
    pub fn decode(&mut self, token: u32) -> Result<Tensor> {
        let Some(d) = &self.decoder else {
            bail!("call start_decoding() before decode()");
        };
        if d.len == d.max_len {
            bail!("the decoding cache is full ({} tokens)", d.max_len);
        }
        let pos = d.len;
        self.set_batch(&[token as i32], &[0])?;
        let logits = self.run(None, Some(pos))?;
        self.decoder.as_mut().expect("checked above").len += 1;
        Ok(logits)
    }

    /// The forward of a batch, or with `decode_pos` of one token at that position of the
    /// sequence in the KV cache.
    fn run(&mut self, rng: Option<(u64, u64)>, decode_pos: Option<usize>) -> Result<Tensor> {
        let (p, h) = self.planned()?;
        let (b, c, a, w) = (&self.backend, &self.config, &p.acts, &self.weights);
        let block = self.block(p.shape);
        let (rows, e) = (block.rows, c.n_embd);
        let (wte, wte_t, _) = w.entry(WTE);
        let (wpe, _, _) = w.entry(WPE);
        // Decoding one token: its position's row of wpe serves as a one-row table.
        let wpe = decode_pos.map_or(wpe, |pos| wpe.slice(pos * c.n_embd, c.n_embd));
        let emb_drop = self.dropout(rng, c.n_layer, 1);
        b.embedding_forward(
            a.input,
            h.ids.tensor(),
            wte,
            wpe,
            rows,
            p.shape.seq,
            e,
            emb_drop,
        )?;
        let mut x = a.input;
        for (l, la) in a.layers.iter().enumerate() {
            let (wl, ml, _) = w.layer(FIRST_BLOCK + l * LAYER_PARAMS.len());
            let cache = match (decode_pos, &self.decoder) {
                (Some(pos), Some(d)) => {
                    let n = d.max_len * c.n_embd;
                    let (k, v) = (d.k.tensor().slice(l * n, n), d.v.tensor().slice(l * n, n));
                    Some(KvCache { k, v, pos })
                }
                _ => None,
            };
            x = block.forward(b, &wl, &ml, x, la, a, self.dropouts(rng, l), cache)?;
        }
        let ((lnw, _, _), (lnb, _, _)) = (w.entry(self.ln_f()), w.entry(self.ln_f() + 1));
        b.layernorm_forward(
            a.final_out,
            a.final_mean,
            a.final_rstd,
            x,
            lnw,
            lnb,
            rows,
            e,
            c.layer_norm_epsilon,
        )?;
        let head = Weight {
            tensor: wte_t,
            layout: WeightLayout::InOut,
        };
        let logits = h.logits.tensor();
        b.matmul_forward(logits, a.final_out, head, None, rows, e, c.vocab_size)?;
        self.last = Some(rng);
        Ok(logits)
    }

    fn ln_f(&self) -> usize {
        FIRST_BLOCK + self.config.n_layer * LAYER_PARAMS.len()
    }

    /// Mean cross-entropy of the last forward's logits against the targets; also writes its
    /// gradient, scaled by `grad_scale` (1 / grad_accum_steps when accumulating), for
    /// [`Gpt::backward`].
    pub fn loss(&self, grad_scale: f32) -> Result<f32> {
        let (_, h) = self.planned()?;
        let (b, v) = (&self.backend, self.config.vocab_size);
        let loss = b.cross_entropy(
            h.dlogits.tensor(),
            h.logits.tensor(),
            h.targets.tensor(),
            h.rows,
            v,
        )?;
        if grad_scale != 1.0 {
            b.scale(h.dlogits.tensor(), grad_scale)?;
        }
        Ok(loss)
    }

    /// `grads += d loss / d params` (`=` after [`Gpt::zero_grad`]) through the last forward.
    pub fn backward(&mut self) -> Result<()> {
        let Some(rng) = self.last else {
            bail!("backward() needs a forward() first");
        };
        let grads = self.weights.grad_store();
        let (p, h) = self.planned()?;
        let (b, c, a, w) = (&self.backend, &self.config, &p.acts, &self.weights);
        let block = self.block(p.shape);
        let (rows, e) = (block.rows, c.n_embd);
        let (wte, _, dwte) = w.entry(WTE);
        let (_, _, dwpe) = w.entry(WPE);
        let lin = |tensor| Weight {
            tensor,
            layout: WeightLayout::OutIn,
        };
        b.matmul_backward(
            Some(a.dstream[0]),
            false,
            lin(dwte),
            None,
            grads,
            h.dlogits.tensor(),
            a.final_out,
            lin(wte),
            rows,
            e,
            c.vocab_size,
        )?;
        let last = block.output(&a.layers[c.n_layer - 1]);
        let ((lnw, _, dlnw), (_, _, dlnb)) = (w.entry(self.ln_f()), w.entry(self.ln_f() + 1));
        b.layernorm_backward(
            a.dstream[1],
            false,
            dlnw,
            dlnb,
            grads,
            a.dstream[0],
            last,
            lnw,
            a.final_mean,
            a.final_rstd,
            rows,
            e,
        )?;
        let mut dy = a.dstream[1];
        for l in (0..c.n_layer).rev() {
            let (wl, ml, gl) = w.layer(FIRST_BLOCK + l * LAYER_PARAMS.len());
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
            block.backward(
                b,
                &wl,
                &ml,
                &gl,
                x,
                &a.layers[l],
                a,
                dy,
                dx,
                true,
                self.dropouts(rng, l),
                grads,
            )?;
            dy = dx;
        }
        // The output head wrote (or added) all of d wte above, and the embedding adds to it;
        // d wpe gets only the positions in use, so a write starts from zeros.
        if grads == GradStore::Write {
            b.fill(dwpe, 0.0)?;
        }
        let emb_drop = self.dropout(rng, c.n_layer, 1);
        b.embedding_backward(
            dwte,
            dwpe,
            dy,
            h.ids.tensor(),
            rows,
            p.shape.seq,
            e,
            emb_drop,
        )?;
        self.weights.backward_done();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameter_count_is_the_layouts_and_never_overflows() {
        for (preset, n_inner) in [("tiny", None), ("gpt2", None), ("tiny", Some(40))] {
            let c = GptConfig {
                n_inner,
                ..GptConfig::preset(preset).unwrap()
            };
            assert_eq!(c.parameters(), Some(param_layout(&c).total()), "{preset}");
        }
        assert_eq!(
            GptConfig::preset("gpt2").unwrap().parameters(),
            Some(124_439_808)
        );
        let huge = GptConfig {
            n_embd: 1 << 40,
            ..GptConfig::preset("tiny").unwrap()
        };
        assert_eq!(huge.parameters(), None);
        let wrapping = GptConfig {
            n_embd: 1 << 62,
            n_head: 1,
            ..huge
        };
        assert_eq!(wrapping.parameters(), None);
        let err = GptConfig {
            n_embd: 100_000_000,
            ..huge
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("too large"), "{err}");
    }
}
