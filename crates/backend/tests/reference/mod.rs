//! Naive f64 reference forwards, written from the math (PyTorch semantics) in plain loops and
//! sharing no code with the kernels. Gradient checks differentiate these numerically.

/// `nn.Linear`: `y[rows, n] = x[rows, k] @ w[n, k]^T + b[n]`.
pub fn linear(
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; rows * n];
    for r in 0..rows {
        for o in 0..n {
            let mut acc = b.map_or(0.0, |b| b[o]);
            for i in 0..k {
                acc += x[r * k + i] * w[o * k + i];
            }
            y[r * n + o] = acc;
        }
    }
    y
}

/// `nn.LayerNorm(c, eps)` over the last dimension, with biased variance.
/// Returns `(y, mean, rstd)`.
pub fn layernorm(
    x: &[f64],
    w: &[f64],
    b: &[f64],
    rows: usize,
    c: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut y, mut means, mut rstds) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
    for r in 0..rows {
        let row = &x[r * c..(r + 1) * c];
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for j in 0..c {
            y[r * c + j] = (row[j] - mean) * rstd * w[j] + b[j];
        }
        means[r] = mean;
        rstds[r] = rstd;
    }
    (y, means, rstds)
}

/// Layout and masking of [`attention`].
#[derive(Clone, Copy, Debug)]
pub struct Attn {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub batch_first: bool,
    pub causal: bool,
}

impl Attn {
    /// Row of token `t` of batch element `b` (PyTorch's `batch_first` or `[seq, batch]`).
    fn row(&self, b: usize, t: usize) -> usize {
        if self.batch_first {
            b * self.seq + t
        } else {
            t * self.batch + b
        }
    }
}

/// Multi-head self-attention over packed `qkv[rows, 3 * heads * head_dim]` (q | k | v, head
/// `h` in columns `h * head_dim..`): scores `q.k / sqrt(head_dim)`, keys `j > i` masked when
/// causal, keys with `key_padding[b * seq + j] == 1` masked, softmax over the rest, then
/// `out = (att * mult) @ v` where `mult[b, h, i, j]` are fixed dropout multipliers.
/// Returns `(out[rows, heads * head_dim], att[batch, heads, seq, seq])`.
pub fn attention(
    qkv: &[f64],
    key_padding: Option<&[f64]>,
    mult: Option<&[f64]>,
    s: &Attn,
) -> (Vec<f64>, Vec<f64>) {
    let (seq, dh) = (s.seq, s.head_dim);
    let e = s.heads * dh;
    let mut out = vec![0.0; s.batch * seq * e];
    let mut att = vec![0.0; s.batch * s.heads * seq * seq];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let q = |t: usize, d: usize| qkv[s.row(b, t) * 3 * e + h * dh + d];
            let k = |t: usize, d: usize| qkv[s.row(b, t) * 3 * e + e + h * dh + d];
            let v = |t: usize, d: usize| qkv[s.row(b, t) * 3 * e + 2 * e + h * dh + d];
            for i in 0..seq {
                let base = ((b * s.heads + h) * seq + i) * seq;
                let visible = |j: usize| {
                    !(s.causal && j > i) && key_padding.is_none_or(|kp| kp[b * seq + j] != 1.0)
                };
                let scores: Vec<Option<f64>> = (0..seq)
                    .map(|j| {
                        visible(j).then(|| {
                            (0..dh).map(|d| q(i, d) * k(j, d)).sum::<f64>() / (dh as f64).sqrt()
                        })
                    })
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .fold(f64::NEG_INFINITY, |m, &x| m.max(x));
                let z: f64 = scores.iter().flatten().map(|x| (x - max).exp()).sum();
                for (j, sc) in scores.iter().enumerate() {
                    att[base + j] = sc.map_or(0.0, |x| (x - max).exp() / z);
                }
                for d in 0..dh {
                    out[s.row(b, i) * e + h * dh + d] = (0..seq)
                        .map(|j| att[base + j] * mult.map_or(1.0, |m| m[base + j]) * v(j, d))
                        .sum();
                }
            }
        }
    }
    (out, att)
}

/// The activations of a feed-forward block.
#[derive(Clone, Copy, Debug)]
pub enum Act {
    Relu,
    /// `0.5 x (1 + erf(x / sqrt 2))`.
    Gelu,
    /// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
    GeluTanh,
}

pub fn act(a: Act, x: f64) -> f64 {
    match a {
        Act::Relu => {
            if x > 0.0 {
                x
            } else {
                0.0
            }
        }
        Act::Gelu => 0.5 * x * (1.0 + libm::erf(x / 2f64.sqrt())),
        Act::GeluTanh => {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + u.tanh())
        }
    }
}

/// `act(x) * mult` elementwise (`mult` the fixed dropout multipliers, or all ones).
pub fn activation(x: &[f64], a: Act, mult: Option<&[f64]>) -> Vec<f64> {
    (0..x.len())
        .map(|i| act(a, x[i]) * mult.map_or(1.0, |m| m[i]))
        .collect()
}

/// `resid + x * mult` elementwise.
pub fn residual(resid: &[f64], x: &[f64], mult: Option<&[f64]>) -> Vec<f64> {
    (0..x.len())
        .map(|i| resid[i] + x[i] * mult.map_or(1.0, |m| m[i]))
        .collect()
}

/// `F.mse_loss(x, target)`, reduction mean.
pub fn mse(x: &[f64], target: &[f64]) -> f64 {
    x.iter()
        .zip(target)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        / x.len() as f64
}

/// `F.cross_entropy(logits[rows, vocab], targets)`, mean over rows whose target is not -100.
pub fn cross_entropy(logits: &[f64], targets: &[i32], vocab: usize) -> f64 {
    let (mut total, mut count) = (0.0, 0);
    for (r, &t) in targets.iter().enumerate() {
        if t == -100 {
            continue;
        }
        let row = &logits[r * vocab..(r + 1) * vocab];
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        total += lse - row[t as usize];
        count += 1;
    }
    total / count as f64
}

/// `torch.optim.AdamW` state of one tensor.
pub struct AdamWState {
    pub param: Vec<f64>,
    pub m: Vec<f64>,
    pub v: Vec<f64>,
}

/// One `torch.optim.AdamW` step `t` (from 1), as documented by PyTorch:
/// `p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
/// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    st: &mut AdamWState,
    grad: &[f64],
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    t: i32,
) {
    for (i, &g) in grad.iter().enumerate() {
        st.param[i] *= 1.0 - lr * weight_decay;
        st.m[i] = beta1 * st.m[i] + (1.0 - beta1) * g;
        st.v[i] = beta2 * st.v[i] + (1.0 - beta2) * g * g;
        let denom = st.v[i].sqrt() / (1.0 - beta2.powi(t)).sqrt() + eps;
        st.param[i] -= lr / (1.0 - beta1.powi(t)) * st.m[i] / denom;
    }
}
