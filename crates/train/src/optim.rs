//! `torch.optim.AdamW` over the flat parameter buffer: moments in two more flat buffers, one
//! fused update per run of tensors that share a weight decay.

use anyhow::Result;
use flint_backend::{AdamW as Hyper, Backend, Buffer, DType, Mirror, Tensor};
use flint_model::gpt::{self, Gpt};
use flint_model::layout::{Entry, Layout};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// `torch.optim.AdamW`'s defaults.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    m: B::Buffer,
    v: B::Buffer,
    /// Maximal runs of consecutive tensors with the same decay choice and no mirror; a
    /// mirrored tensor is a group of its own.
    groups: Vec<Group>,
    step: u32,
}

#[derive(Clone, Copy)]
struct Group {
    offset: usize,
    len: usize,
    decays: bool,
    mirror: Option<Mirror>,
}

impl<B: Backend> AdamW<B> {
    /// `decays(entry)` says whether weight decay applies to a tensor (all of them, as
    /// PyTorch's default param group, or matrices only, as GPT training does); `mirrors` are
    /// the model's transposed copies per tensor (`Encoder::mirrors`), updated in the same pass.
    pub fn new(
        backend: &B,
        layout: &Layout,
        config: AdamWConfig,
        decays: impl Fn(&Entry) -> bool,
        mirrors: &[Option<Mirror>],
    ) -> Result<Self> {
        let mut groups: Vec<Group> = Vec::new();
        for (i, e) in layout.entries().iter().enumerate() {
            let (decays, mirror) = (decays(e), mirrors.get(i).copied().flatten());
            match groups.last_mut() {
                Some(g) if g.decays == decays && g.mirror.is_none() && mirror.is_none() => {
                    g.len += e.numel()
                }
                _ => groups.push(Group {
                    offset: e.offset,
                    len: e.numel(),
                    decays,
                    mirror,
                }),
            }
        }
        let m = backend.alloc(DType::F32, layout.total())?;
        let v = backend.alloc(DType::F32, layout.total())?;
        Ok(AdamW {
            config,
            m,
            v,
            groups,
            step: 0,
        })
    }

    /// The optimizer of GPT training: weight decay on matrices only, as nanoGPT's param groups.
    pub fn for_gpt(model: &Gpt<B>, config: AdamWConfig) -> Result<Self> {
        AdamW::new(
            model.backend(),
            model.layout(),
            config,
            gpt::decays,
            &model.mirrors(),
        )
    }

    /// The first and second moments and the number of updates so far, for checkpoints.
    pub fn state(&self) -> (Tensor, Tensor, u32) {
        (self.m.tensor(), self.v.tensor(), self.step)
    }

    /// Continues from a checkpoint whose moments were uploaded into [`AdamW::state`]'s tensors.
    pub fn set_updates(&mut self, step: u32) {
        self.step = step;
    }

    pub fn step(&mut self, backend: &B, params: Tensor, grads: Tensor) -> Result<()> {
        self.step += 1;
        let c = self.config;
        for &Group {
            offset,
            len,
            decays,
            mirror,
        } in &self.groups
        {
            let hp = Hyper {
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: if decays { c.weight_decay } else { 0.0 },
                step: self.step,
            };
            let view = |t: Tensor| t.slice(offset, len);
            backend.adamw(
                view(params),
                view(grads),
                view(self.m.tensor()),
                view(self.v.tensor()),
                &hp,
                mirror,
            )?;
        }
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` over the flat gradient buffer: scales the
/// gradients by `max_norm / (norm + 1e-6)` when that is below 1. Returns the norm before
/// clipping.
pub fn clip_grad_norm<B: Backend>(backend: &B, grads: Tensor, max_norm: f32) -> Result<f32> {
    let norm = backend.sum_squares(grads)?.sqrt() as f32;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        backend.scale(grads, coef)?;
    }
    Ok(norm)
}
