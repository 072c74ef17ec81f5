//! A model's parameter, mirror and gradient buffers: one allocation each, laid out by the
//! model's parameter [`Layout`].

use crate::activations::mib;
use crate::layout::{Entry, Layout};
use crate::params::LayerParams;
use anyhow::{bail, Result};
use flint_backend::{Backend, Buffer, DType, GradStore, Mirror, Tensor};

pub struct Weights<B: Backend> {
    pub layout: Layout,
    params: B::Buffer,
    /// Transposed copies of the projection matrices, at the same offsets as in `params` (other
    /// entries unused): the layout the forward (or backward) multiplies with fastest. Written
    /// here from the initial parameters, then by the optimizer through [`Weights::mirrors`].
    mirrors: B::Buffer,
    grads: B::Buffer,
    mirrored: Vec<bool>,
    /// Set by [`Weights::zero_grad`] (and at the start): the next backward writes the
    /// gradients instead of adding to them.
    grads_zeroed: bool,
}

impl<B: Backend> Weights<B> {
    /// Uploads `init` (laid out by `layout`) and fills the mirrors of the entries `mirrored`
    /// selects; the gradients start zeroed, as after [`Weights::zero_grad`].
    pub fn new(
        b: &B,
        layout: Layout,
        init: &[f32],
        mirrored: impl Fn(&Entry) -> bool,
    ) -> Result<Self> {
        if init.len() != layout.total() {
            bail!(
                "{} initial values for {} parameters",
                init.len(),
                layout.total()
            );
        }
        let alloc = || b.alloc(DType::F32, layout.total());
        let (params, mirrors, grads) = (alloc()?, alloc()?, alloc()?);
        b.upload(params.tensor(), init)?;
        let mirrored = layout.entries().iter().map(mirrored).collect();
        let w = Weights {
            layout,
            params,
            mirrors,
            grads,
            mirrored,
            grads_zeroed: true,
        };
        for (index, mirror) in w.mirrors().into_iter().enumerate() {
            if let Some(m) = mirror {
                b.transpose(m.out, w.layout.view(w.params(), index), m.rows, m.cols)?;
            }
        }
        Ok(w)
    }

    pub fn params(&self) -> Tensor {
        self.params.tensor()
    }
    pub fn grads(&self) -> Tensor {
        self.grads.tensor()
    }

    /// Zeroes the gradients the way PyTorch's `zero_grad()` (`set_to_none=True`) does: nothing
    /// is written now; the next backward writes the gradients instead of adding to them, which
    /// saves a pass over the buffer and a read of it in every weight-gradient product. Until
    /// that backward, [`Weights::grads`] holds stale values.
    pub fn zero_grad(&mut self) {
        self.grads_zeroed = true;
    }

    /// How a backward stores its gradients: [`GradStore::Write`] until one has completed since
    /// [`Weights::zero_grad`] (so a backward that failed halfway is written over, not added
    /// to), [`GradStore::Accumulate`] after that.
    pub fn grad_store(&self) -> GradStore {
        match self.grads_zeroed {
            true => GradStore::Write,
            false => GradStore::Accumulate,
        }
    }

    /// Records a completed backward: the next one adds to its gradients.
    pub fn backward_done(&mut self) {
        self.grads_zeroed = false;
    }

    /// For each parameter tensor (in layout order), its transposed copy, if any: whoever
    /// updates the parameters must update these too (the optimizer passes them to
    /// [`Backend::adamw`]).
    pub fn mirrors(&self) -> Vec<Option<Mirror>> {
        let t = self.mirrors.tensor();
        let entries = self.layout.entries().iter().zip(&self.mirrored).enumerate();
        entries
            .map(|(index, (e, &on))| {
                on.then(|| Mirror {
                    out: self.layout.view(t, index),
                    rows: e.shape[0],
                    cols: e.shape[1],
                })
            })
            .collect()
    }

    /// Entry `index` as (parameter, mirror, gradient).
    pub fn entry(&self, index: usize) -> (Tensor, Tensor, Tensor) {
        let v = |t: Tensor| self.layout.view(t, index);
        (v(self.params()), v(self.mirrors.tensor()), v(self.grads()))
    }

    /// The block starting at entry `first` as (parameters, mirrors, gradients).
    pub fn layer(&self, first: usize) -> (LayerParams, LayerParams, LayerParams) {
        let view = |t: Tensor| LayerParams::at(&self.layout, t, first);
        (
            view(self.params()),
            view(self.mirrors.tensor()),
            view(self.grads()),
        )
    }

    /// The buffers as table lines for `--verbose`.
    pub fn describe(&self) -> String {
        let n = self.layout.total();
        let line = |name: &str, count: usize| format!("  {name:<49} {}\n", mib(count * 4));
        format!(
            "model buffers (f32, {n} parameters):\n{}{}{}{}",
            line("parameters", n),
            line("gradients", n),
            line("transposed weight copies", n),
            line("AdamW moments m and v (when training)", 2 * n),
        )
    }
}
