//! The encoder's parameters: PyTorch `state_dict` names and shapes, in one flat buffer.

use crate::layout::Layout;
use crate::EncoderConfig;
use flint_backend::{philox, Tensor};

/// Parameters of one `TransformerEncoderLayer`, in `state_dict` order; other models map their
/// own names onto these roles in this order (GPT-2: `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
/// `mlp.c_proj`, `ln_1`, `ln_2`).
pub const LAYER_PARAMS: [&str; 12] = [
    "self_attn.in_proj_weight",
    "self_attn.in_proj_bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "linear1.weight",
    "linear1.bias",
    "linear2.weight",
    "linear2.bias",
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
];

pub fn param_layout(c: &EncoderConfig) -> Layout {
    let (e, f) = (c.d_model, c.dim_feedforward);
    let shapes: [&[usize]; 12] = [
        &[3 * e, e],
        &[3 * e],
        &[e, e],
        &[e],
        &[f, e],
        &[f],
        &[e, f],
        &[e],
        &[e],
        &[e],
        &[e],
        &[e],
    ];
    let mut layout = Layout::default();
    for l in 0..c.num_layers {
        for (name, shape) in LAYER_PARAMS.iter().zip(shapes) {
            layout.push(format!("layers.{l}.{name}"), shape);
        }
    }
    if c.final_norm {
        layout.push("norm.weight", &[e]);
        layout.push("norm.bias", &[e]);
    }
    layout
}

/// Views of one layer's tensors inside a buffer laid out by [`param_layout`] (parameters or
/// their gradients).
#[derive(Clone, Copy)]
pub struct LayerParams {
    pub in_proj_weight: Tensor,
    pub in_proj_bias: Tensor,
    pub out_proj_weight: Tensor,
    pub out_proj_bias: Tensor,
    pub linear1_weight: Tensor,
    pub linear1_bias: Tensor,
    pub linear2_weight: Tensor,
    pub linear2_bias: Tensor,
    pub norm1_weight: Tensor,
    pub norm1_bias: Tensor,
    pub norm2_weight: Tensor,
    pub norm2_bias: Tensor,
}

impl LayerParams {
    /// The views of the 12 tensors starting at layout entry `first`, in [`LAYER_PARAMS`] order.
    pub fn at(layout: &Layout, base: Tensor, first: usize) -> Self {
        let v = |i: usize| layout.view(base, first + i);
        LayerParams {
            in_proj_weight: v(0),
            in_proj_bias: v(1),
            out_proj_weight: v(2),
            out_proj_bias: v(3),
            linear1_weight: v(4),
            linear1_bias: v(5),
            linear2_weight: v(6),
            linear2_bias: v(7),
            norm1_weight: v(8),
            norm1_bias: v(9),
            norm2_weight: v(10),
            norm2_bias: v(11),
        }
    }
}

/// `(weight, bias)` of the final norm, when the config has one.
pub fn final_norm(layout: &Layout, base: Tensor, c: &EncoderConfig) -> Option<(Tensor, Tensor)> {
    c.final_norm.then(|| {
        let n = c.num_layers * LAYER_PARAMS.len();
        (layout.view(base, n), layout.view(base, n + 1))
    })
}

/// PyTorch's initialisation, drawn from Philox so it is reproducible on any machine:
/// `in_proj_weight` Xavier-uniform, projection biases of attention 0, `nn.Linear` weights and
/// biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), LayerNorm weight 1 and bias 0.
pub fn init_params(layout: &Layout, seed: u64) -> Vec<f32> {
    let mut out = vec![0.0; layout.total()];
    for (index, e) in layout.entries().iter().enumerate() {
        let dst = &mut out[e.offset..e.offset + e.numel()];
        let leaf = e
            .name
            .rsplit_once("layers.")
            .map_or(e.name.as_str(), |(_, r)| {
                r.split_once('.').map_or(r, |(_, name)| name)
            });
        let bound = match leaf {
            "self_attn.in_proj_weight" => (6.0 / (e.shape[0] + e.shape[1]) as f32).sqrt(),
            "self_attn.in_proj_bias" | "self_attn.out_proj.bias" => 0.0,
            l if l.starts_with("norm") => {
                dst.fill(if l.ends_with("weight") { 1.0 } else { 0.0 });
                continue;
            }
            "linear1.bias" | "linear2.bias" => {
                // fan_in of the bias's layer is the row length of its weight
                let w = &layout.entries()[index - 1];
                1.0 / (w.shape[1] as f32).sqrt()
            }
            _ => 1.0 / (e.shape[1] as f32).sqrt(),
        };
        for (i, x) in dst.iter_mut().enumerate() {
            *x = bound * (2.0 * philox::uniform(seed, index as u64, i as u64) - 1.0);
        }
    }
    out
}
