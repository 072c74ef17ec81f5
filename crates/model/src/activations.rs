//! The activation plan: every buffer a training step touches, sized from the batch shape
//! before the first step, in one allocation.

use crate::layout::{shape_str, Layout};
use anyhow::{Context, Result};
use flint_backend::{AttentionShape, Backend, Buffer, DType, Dropout, Tensor};

/// The activations of one batch shape, allocated.
pub struct Planned<B: Backend> {
    pub shape: BatchShape,
    pub plan: Layout,
    _buffer: B::Buffer,
    pub acts: Acts,
}

impl<B: Backend> Planned<B> {
    /// Plans and allocates for `shape` unless `slot` already holds that shape, so steps of one
    /// shape allocate nothing after the first.
    pub fn ensure(slot: &mut Option<Self>, b: &B, dims: Dims, shape: BatchShape) -> Result<()> {
        if slot.as_ref().map(|p| p.shape) != Some(shape) {
            *slot = None;
            let attention = AttentionShape {
                batch: shape.batch,
                seq: shape.seq,
                heads: dims.nhead,
                head_dim: dims.d_model / dims.nhead.max(1),
                batch_first: true,
                causal: false,
            };
            // Planned for the training step: its dropout decides what attention keeps.
            let dropout = Dropout {
                p: dims.attention_dropout,
                seed: 0,
                offset: 0,
            };
            let att = b.attention_saved_len(&attention, Some(dropout));
            let plan = plan(dims, shape, att);
            let buffer = b.alloc(DType::F32, plan.total()).with_context(|| {
                format!(
                    "the activations of a [batch {}, seq {}] step need {:.1} MiB",
                    shape.batch,
                    shape.seq,
                    (plan.total() * 4) as f64 / 1048576.0
                )
            })?;
            let acts = Acts::new(&plan, buffer.tensor(), dims.num_layers);
            *slot = Some(Planned {
                shape,
                plan,
                _buffer: buffer,
                acts,
            });
        }
        Ok(())
    }
}

/// Shape of one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    pub batch: usize,
    pub seq: usize,
}

/// What one layer keeps from forward for backward. Pre-norm: `norm1 = LN1(x)`,
/// `res1 = x + attn`, `norm2 = LN2(res1)`, `res2 = res1 + ff` (the output). Post-norm:
/// `res1 = x + attn`, `norm1 = LN1(res1)`, `res2 = norm1 + ff`, `norm2 = LN2(res2)` (the output).
#[derive(Clone, Copy)]
pub struct LayerActs {
    pub qkv: Tensor,
    pub att: Tensor,
    pub atty: Tensor,
    pub res1: Tensor,
    pub norm1: Tensor,
    pub fch: Tensor,
    /// `dropout(act(fch))`, kept so backward needs neither the activation nor the mask again.
    pub ff: Tensor,
    pub res2: Tensor,
    pub norm2: Tensor,
    pub mean1: Tensor,
    pub rstd1: Tensor,
    pub mean2: Tensor,
    pub rstd2: Tensor,
}

/// Every view into the activation buffer.
pub struct Acts {
    pub input: Tensor,
    /// `[batch, seq]`, 1.0 where a key is padding.
    pub key_padding: Tensor,
    pub layers: Vec<LayerActs>,
    pub final_out: Tensor,
    pub final_mean: Tensor,
    pub final_rstd: Tensor,
    // Forward scratch, shared by all layers.
    pub sa: Tensor,
    pub ffo: Tensor,
    // Gradients: one layer's worth, reused by every layer.
    pub dout: Tensor,
    pub dstream: [Tensor; 2],
    pub dres: Tensor,
    pub dnorm: Tensor,
    pub dffo: Tensor,
    pub dff: Tensor,
    pub dfch: Tensor,
    pub dsa: Tensor,
    pub datty: Tensor,
    pub dqkv: Tensor,
}

const LAYER_ACTS: [&str; 13] = [
    "qkv", "att", "atty", "res1", "norm1", "fch", "ff", "res2", "norm2", "mean1", "rstd1", "mean2",
    "rstd2",
];

/// The sizes of a stack of blocks.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub num_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub nhead: usize,
    /// The attention dropout of a training step.
    pub attention_dropout: f32,
}

/// The layout of every activation; `att_len` floats per layer for what attention keeps (see
/// [`Backend::attention_saved_len`]).
pub fn plan(c: Dims, s: BatchShape, att_len: usize) -> Layout {
    let (r, e, f) = (s.batch * s.seq, c.d_model, c.d_ff);
    let probs = [s.batch, c.nhead, s.seq, s.seq];
    let saved = [att_len];
    let att: &[usize] = if att_len == probs.iter().product::<usize>() {
        &probs
    } else {
        &saved
    };
    // 64-byte starts: a cache line, and a multiple of every alignment cuBLASLt asks for.
    let mut p = Layout::aligned(16);
    p.push("input", &[r, e]);
    p.push("key_padding", &[s.batch, s.seq]);
    for l in 0..c.num_layers {
        let shapes: [&[usize]; 13] = [
            &[r, 3 * e],
            att,
            &[r, e],
            &[r, e],
            &[r, e],
            &[r, f],
            &[r, f],
            &[r, e],
            &[r, e],
            &[r],
            &[r],
            &[r],
            &[r],
        ];
        for (name, shape) in LAYER_ACTS.iter().zip(shapes) {
            p.push(format!("layers.{l}.{name}"), shape);
        }
    }
    for (name, shape) in [
        ("norm.out", &[r, e][..]),
        ("norm.mean", &[r]),
        ("norm.rstd", &[r]),
        ("scratch.sa", &[r, e]),
        ("scratch.ffo", &[r, e]),
        ("grad.out", &[r, e]),
        ("grad.stream0", &[r, e]),
        ("grad.stream1", &[r, e]),
        ("grad.res", &[r, e]),
        ("grad.norm", &[r, e]),
        ("grad.ffo", &[r, e]),
        ("grad.ff", &[r, f]),
        ("grad.fch", &[r, f]),
        ("grad.sa", &[r, e]),
        ("grad.atty", &[r, e]),
        ("grad.qkv", &[r, 3 * e]),
    ] {
        p.push(name, shape);
    }
    p
}

impl Acts {
    /// Views of a buffer laid out by [`plan`] for `num_layers` layers.
    pub fn new(plan: &Layout, base: Tensor, num_layers: usize) -> Self {
        let v = |i: usize| plan.view(base, i);
        let layers = (0..num_layers)
            .map(|l| {
                let w = |i: usize| v(2 + l * LAYER_ACTS.len() + i);
                LayerActs {
                    qkv: w(0),
                    att: w(1),
                    atty: w(2),
                    res1: w(3),
                    norm1: w(4),
                    fch: w(5),
                    ff: w(6),
                    res2: w(7),
                    norm2: w(8),
                    mean1: w(9),
                    rstd1: w(10),
                    mean2: w(11),
                    rstd2: w(12),
                }
            })
            .collect();
        let t = 2 + num_layers * LAYER_ACTS.len();
        Acts {
            input: v(0),
            key_padding: v(1),
            layers,
            final_out: v(t),
            final_mean: v(t + 1),
            final_rstd: v(t + 2),
            sa: v(t + 3),
            ffo: v(t + 4),
            dout: v(t + 5),
            dstream: [v(t + 6), v(t + 7)],
            dres: v(t + 8),
            dnorm: v(t + 9),
            dffo: v(t + 10),
            dff: v(t + 11),
            dfch: v(t + 12),
            dsa: v(t + 13),
            datty: v(t + 14),
            dqkv: v(t + 15),
        }
    }
}

/// The plan as a table: one line per kind of buffer (layers folded together), then the total.
pub fn describe(plan: &Layout, num_layers: usize) -> String {
    let mut rows: Vec<(String, String, usize, usize)> = Vec::new();
    for e in plan.entries() {
        let (name, per_layer) = match e.name.strip_prefix("layers.") {
            Some(rest) => (
                format!("layers.*.{}", rest.split_once('.').map_or(rest, |(_, n)| n)),
                true,
            ),
            None => (e.name.clone(), false),
        };
        match rows.iter_mut().find(|r| r.0 == name) {
            Some(row) => row.3 += e.numel() * 4,
            None => rows.push((
                name,
                shape_str(&e.shape),
                if per_layer { num_layers } else { 1 },
                e.numel() * 4,
            )),
        }
    }
    let mut out = String::from("activation plan (f32):\n");
    for (name, shape, count, bytes) in rows {
        let times = if count > 1 {
            format!(" x {count}")
        } else {
            String::new()
        };
        out += &format!("  {name:<20} {shape:<22}{times:<6} {}\n", mib(bytes));
    }
    out += &format!("  {:<49} {}", "total", mib(plan.total() * 4));
    out
}

pub fn mib(bytes: usize) -> String {
    format!("{:>10.2} MiB", bytes as f64 / 1048576.0)
}
