//! A training step with dropout gives bitwise the same parameters for any thread count.

use flint_backend::{cpu::Cpu, philox, Backend, Buffer, DType};
use flint_model::{params, BatchShape, Encoder, EncoderActivation, EncoderConfig, Masks, Mode};
use flint_train::optim::{AdamW, AdamWConfig};

fn train_two_steps(config: &EncoderConfig) -> Vec<f32> {
    let layout = params::param_layout(config);
    let mut enc = Encoder::new(Cpu, config.clone(), &params::init_params(&layout, 3)).unwrap();
    let shape = BatchShape { batch: 5, seq: 37 };
    enc.plan(shape).unwrap();
    let n = shape.batch * shape.seq * config.d_model;
    let x: Vec<f32> = (0..n).map(|i| philox::normal(1, 0, i as u64)).collect();
    let mask: Vec<bool> = (0..shape.batch * shape.seq)
        .map(|i| i % shape.seq > 30 && i / shape.seq == 2)
        .collect();
    enc.set_input(&x, Some(&mask)).unwrap();
    let target = Cpu.alloc(DType::F32, n).unwrap();
    Cpu.upload(
        target.tensor(),
        &x.iter().map(|v| v * 0.5).collect::<Vec<_>>(),
    )
    .unwrap();
    let mut opt = AdamW::new(
        &Cpu,
        &layout,
        AdamWConfig::default(),
        |_| true,
        &enc.mirrors(),
    )
    .unwrap();
    for step in 1..=2 {
        enc.zero_grad();
        let masks = Masks {
            causal: true,
            key_padding: true,
        };
        let out = enc.forward(masks, Mode::Train { seed: 9, step }).unwrap();
        Cpu.mse_loss(enc.output_grad().unwrap(), out, target.tensor())
            .unwrap();
        enc.backward(false).unwrap();
        opt.step(&Cpu, enc.params(), enc.grads()).unwrap();
    }
    let mut p = vec![0.0; layout.total()];
    Cpu.download(enc.params(), &mut p).unwrap();
    p
}

#[test]
fn training_with_dropout_is_bitwise_independent_of_thread_count() {
    for norm_first in [false, true] {
        let config = EncoderConfig {
            d_model: 64,
            nhead: 4,
            dim_feedforward: 96,
            dropout: 0.2,
            activation: EncoderActivation::Gelu,
            layer_norm_eps: 1e-5,
            batch_first: norm_first,
            norm_first,
            num_layers: 2,
            final_norm: true,
        };
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| train_two_steps(&config))
        };
        let one = run(1);
        assert!(one.iter().all(|v| v.is_finite()));
        for threads in [2, 3] {
            let other = run(threads);
            let same = one
                .iter()
                .zip(&other)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "norm_first={norm_first}: {threads} threads differ from 1"
            );
        }
    }
}
