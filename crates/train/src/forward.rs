//! `flint forward`: run an encoder trained in PyTorch, in eval mode, from files.

use crate::state_dict;
use crate::tensors::{save_f32, Named, TensorFile};
use anyhow::{bail, Result};
use flint_backend::Backend;
use flint_model::layout::shape_str;
use flint_model::{BatchShape, Encoder, EncoderConfig, Masks, Mode};
use std::collections::HashMap;
use std::path::PathBuf;

pub struct ForwardRequest {
    pub config: PathBuf,
    pub weights: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    pub causal: bool,
}

pub struct ForwardReport {
    pub output_shape: Vec<usize>,
    /// The activation plan, for `--verbose`.
    pub plan: String,
}

pub fn describe(c: &EncoderConfig) -> String {
    format!(
        "d_model={}, nhead={}, dim_feedforward={}, num_layers={}, final_norm={}",
        c.d_model, c.nhead, c.dim_feedforward, c.num_layers, c.final_norm
    )
}

pub fn run<B: Backend>(backend: B, req: &ForwardRequest) -> Result<ForwardReport> {
    let config = EncoderConfig::from_json_file(&req.config)?;
    let weights = TensorFile::open(&req.weights)?;
    let layers = state_dict::layer_count(&weights)?;
    if layers != config.num_layers {
        bail!(
            "{}: the state_dict has {layers} layers (`layers.0.` to `layers.{}.`), but {} says num_layers={}",
            req.weights.display(),
            layers - 1,
            req.config.display(),
            config.num_layers
        );
    }
    let layout = flint_model::params::param_layout(&config);
    let params = state_dict::load(&weights, &layout, &describe(&config))?;

    let input = TensorFile::open(&req.input)?;
    let (shape, _) = input.f32("src")?;
    if shape.len() != 3 || shape[2] != config.d_model {
        let layout = if config.batch_first {
            "[batch, seq, d_model]"
        } else {
            "[seq, batch, d_model]"
        };
        let want = match shape[..] {
            [a, b, _] => format!("{} = ", shape_str(&[a, b, config.d_model])),
            _ => String::new(),
        };
        bail!(
            "{}: tensor `src` has shape {}, expected {want}{layout} with d_model={} from {}",
            req.input.display(),
            shape_str(&shape),
            config.d_model,
            req.config.display()
        );
    }
    let (seq, batch) = if config.batch_first {
        (shape[1], shape[0])
    } else {
        (shape[0], shape[1])
    };
    if seq == 0 || batch == 0 {
        bail!(
            "{}: tensor `src` has shape {}: nothing to run",
            req.input.display(),
            shape_str(&shape)
        );
    }
    let src = input.f32_checked("src", &shape)?;
    let mask = if input.contains("src_key_padding_mask") {
        Some(input.mask("src_key_padding_mask", &[batch, seq])?)
    } else {
        None
    };

    let mut encoder = Encoder::new(backend, config, &params)?;
    encoder.plan(BatchShape { batch, seq })?;
    let plan = encoder.describe_plan()?;
    encoder.set_input(&src, mask.as_deref())?;
    let masks = Masks {
        causal: req.causal,
        key_padding: mask.is_some(),
    };
    let out = encoder.forward(masks, Mode::Eval)?;
    let mut values = vec![0.0; out.len()];
    encoder.backend().download(out, &mut values)?;
    let meta = HashMap::from([(
        "producer".to_string(),
        format!("flint {}", env!("CARGO_PKG_VERSION")),
    )]);
    save_f32(
        &req.output,
        &[Named {
            name: "output".into(),
            shape: shape.clone(),
            data: &values,
        }],
        meta,
    )?;
    Ok(ForwardReport {
        output_shape: shape,
        plan,
    })
}
