//! The flash attention kernels checked on the GPU they are about to run on, once, before their
//! first use: forward and backward on small random problems, against the cuBLASLt path (which
//! the parity tests hold to the CPU). The kernels' `mma.sync` fragment layouts were written from
//! the PTX ISA and checked in an emulator; this keeps a GPU on which they disagree from training
//! a model with them.

use super::backend::Cuda;
use crate::parity::max_rel_err;
use crate::{philox, AttentionShape, Backend, Buffer, DType};
use anyhow::Result;

/// The largest relative difference (see [`max_rel_err`]) accepted between the two paths. Both
/// round their operands to bf16: each came within 2.7e-3 to 5.5e-3 of the CPU in the emulated
/// parity, so their difference stays well under this, and a wrong index or fragment layout
/// shows as an error of order 1.
const TOLERANCE: f64 = 2e-2;

/// The shapes checked: each head size the kernels are built for, a causal and a padded
/// non-causal mask, both token layouts, and sequences that end in a partial 128-row tile.
const SHAPES: [AttentionShape; 2] = [
    AttentionShape {
        batch: 2,
        seq: 130,
        heads: 2,
        head_dim: 64,
        batch_first: true,
        causal: true,
    },
    AttentionShape {
        batch: 3,
        seq: 70,
        heads: 2,
        head_dim: 32,
        batch_first: false,
        causal: false,
    },
];

impl Cuda {
    /// Whether flash attention passed its self-test here; when it did not, says so on stderr
    /// (attention then runs on cuBLASLt).
    pub(super) fn flash_checked(&self) -> bool {
        let device = self.device();
        match self.flash_self_test() {
            Ok(err) if err <= TOLERANCE => true,
            Ok(err) => {
                eprintln!(
                    "note: flash attention is off on {device}: its self-test differs from the cuBLASLt path by {err:.1e} (more than {TOLERANCE:.0e}); attention runs on cuBLASLt"
                );
                false
            }
            Err(e) => {
                eprintln!(
                    "note: flash attention is off on {device}: its self-test failed ({e:#}); attention runs on cuBLASLt"
                );
                false
            }
        }
    }

    /// The largest relative difference of the output and of d qkv between the flash and the
    /// cuBLASLt path, over [`SHAPES`].
    fn flash_self_test(&self) -> Result<f64> {
        let mut worst = 0.0f64;
        for (n, s) in SHAPES.iter().enumerate() {
            let (rows, e) = (s.rows(), s.width());
            let random = |len: usize, stream: u64| -> Result<_> {
                let data: Vec<f32> = (0..len as u64)
                    .map(|i| philox::normal(n as u64, stream, i))
                    .collect();
                let buf = self.alloc(DType::F32, len)?;
                self.upload(buf.tensor(), &data)?;
                Ok(buf)
            };
            let (qkv, dout) = (random(rows * 3 * e, 0)?, random(rows * e, 1)?);
            // Without a causal mask, the last keys of every other sequence are padding.
            let padding = (!s.causal)
                .then(|| {
                    let kp: Vec<f32> = (0..s.batch * s.seq)
                        .map(|r| (r / s.seq % 2 == 1 && r % s.seq >= s.seq - 9) as u8 as f32)
                        .collect();
                    let buf = self.alloc(DType::F32, kp.len())?;
                    self.upload(buf.tensor(), &kp)?;
                    anyhow::Ok(buf)
                })
                .transpose()?;
            let mut results = Vec::new();
            for flash in [false, true] {
                let out = self.alloc(DType::F32, rows * e)?;
                let att = self.alloc(DType::F32, s.batch * s.heads * s.seq * s.seq)?;
                let dqkv = self.alloc(DType::F32, rows * 3 * e)?;
                let kp = padding.as_ref().map(|b| b.tensor());
                let (o, a, q) = (out.tensor(), att.tensor(), qkv.tensor());
                self.attention_forward_on(flash, o, a, q, kp, s, None)?;
                self.attention_backward_on(flash, dqkv.tensor(), dout.tensor(), q, a, s, None)?;
                let mut host = (vec![0.0; rows * e], vec![0.0; rows * 3 * e]);
                self.download(o, &mut host.0)?;
                self.download(dqkv.tensor(), &mut host.1)?;
                results.push(host);
            }
            let (reference, flash) = (&results[0], &results[1]);
            worst = worst
                .max(max_rel_err(&reference.0, &flash.0))
                .max(max_rel_err(&reference.1, &flash.1));
        }
        Ok(worst)
    }
}
