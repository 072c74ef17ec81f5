//! The fast paths checked on the GPU they are about to run on, once, before their first use:
//! the flash attention kernels and cuBLASLt's GELU epilogues, each on small random problems
//! against the plain path (which the parity tests hold to the CPU). The flash kernels'
//! `mma.sync` fragment layouts were written from the PTX ISA and the epilogues' semantics from
//! cuBLASLt's documentation, both checked only in an emulator; this keeps a GPU on which they
//! disagree from training a model with them.

use super::backend::{Cuda, CudaBuffer};
use crate::parity::{max_rel_err, ParityRow};
use crate::{philox, Activation, AttentionShape, Backend, Buffer, DType, GradStore, Tensor};
use crate::{Weight, WeightLayout};
use anyhow::Result;

/// The largest relative difference (see [`max_rel_err`]) accepted between a fast path and the
/// plain one. Both round their operands to bf16: in the emulated parity each came within 2e-3 to
/// 8e-3 of the CPU, so their difference stays under this, and a wrong index, fragment layout or
/// epilogue shows as an error of order 1.
const TOLERANCE: f64 = 2e-2;

/// The attention shapes checked: each head size the kernels are built for, a causal and a
/// padded non-causal mask, both token layouts, and sequences that end in a partial 128-row tile.
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

/// What a fast path's self-test found: the largest difference from the plain path, or `None`
/// when the test could not run (an error that left the GPU usable).
#[derive(Clone, Copy, Debug)]
pub(super) struct Verdict {
    difference: Option<f64>,
}

impl Verdict {
    pub(super) fn passed(self) -> bool {
        self.difference.is_some_and(|d| d <= TOLERANCE)
    }
}

impl Cuda {
    /// The self-tests run so far, as parity rows (`flint doctor --parity` lists them with the
    /// kernels'): a fast path that failed its test is a failed row, though training goes on
    /// without it.
    pub fn self_test_rows(&self) -> Vec<ParityRow> {
        let tests = [
            (
                "flash attention against cuBLASLt attention",
                &self.flash_passed,
            ),
            ("GELU epilogues against a separate GELU", &self.gelu_passed),
        ];
        let mut rows = Vec::new();
        for (name, verdict) in tests {
            let Some(verdict) = verdict.get() else {
                continue;
            };
            let verdict = verdict.as_ref().ok().copied();
            rows.push(ParityRow {
                kernel: format!("self-test: {name}"),
                dtype: "bf16",
                max_rel_err: verdict.and_then(|v| v.difference).unwrap_or(f64::INFINITY),
                threshold: TOLERANCE,
                passed: verdict.is_some_and(Verdict::passed),
            });
        }
        rows
    }

    /// Flash attention's self-test here.
    pub(super) fn flash_checked(&self) -> Result<Verdict> {
        self.passed("flash attention", "attention runs on cuBLASLt", |c| {
            c.flash_self_test()
        })
    }

    /// The self-test of cuBLASLt's GELU epilogues here.
    pub(super) fn gelu_checked(&self) -> Result<Verdict> {
        self.passed(
            "cuBLASLt's GELU epilogue",
            "GELU runs as its own kernel",
            |c| c.gelu_self_test(),
        )
    }

    /// Runs a self-test and says (on stderr) when it turns a fast path off. An error that left
    /// the GPU unusable (a kernel fault is sticky: every later call fails) is returned instead,
    /// so that the run stops with its cause.
    fn passed(
        &self,
        what: &str,
        instead: &str,
        test: impl Fn(&Cuda) -> Result<f64>,
    ) -> Result<Verdict> {
        let device = self.device();
        match test(self) {
            Ok(err) if err <= TOLERANCE => Ok(Verdict {
                difference: Some(err),
            }),
            Ok(err) => {
                super::note(&format!(
                    "{what} is off on {device}: its self-test differs from the plain path by {err:.1e} (more than {TOLERANCE:.0e}); {instead}"
                ));
                Ok(Verdict {
                    difference: Some(err),
                })
            }
            Err(e) => {
                if let Err(fault) = self.synchronize() {
                    anyhow::bail!("the GPU failed in the self-test of {what} ({e:#}): {fault:#}");
                }
                super::note(&format!(
                    "{what} is off on {device}: its self-test failed ({e:#}); {instead}"
                ));
                Ok(Verdict { difference: None })
            }
        }
    }

    /// `len` standard normal numbers of stream `(seed, stream)`, on the GPU.
    fn random(&self, len: usize, seed: u64, stream: u64) -> Result<CudaBuffer> {
        let data: Vec<f32> = (0..len as u64)
            .map(|i| philox::normal(seed, stream, i))
            .collect();
        self.uploaded(&data)
    }

    fn uploaded(&self, data: &[f32]) -> Result<CudaBuffer> {
        let buf = self.alloc(DType::F32, data.len())?;
        self.upload(buf.tensor(), data)?;
        Ok(buf)
    }

    fn zeros(&self, len: usize) -> Result<CudaBuffer> {
        self.alloc(DType::F32, len)
    }

    fn host(&self, t: Tensor) -> Result<Vec<f32>> {
        let mut out = vec![0.0; t.len()];
        self.download(t, &mut out)?;
        Ok(out)
    }

    /// The largest relative difference of the output and of d qkv between the flash and the
    /// cuBLASLt path, over [`SHAPES`].
    fn flash_self_test(&self) -> Result<f64> {
        let mut worst = 0.0f64;
        for (n, s) in SHAPES.iter().enumerate() {
            let (rows, e) = (s.rows(), s.width());
            let (qkv, dout) = (
                self.random(rows * 3 * e, n as u64, 0)?,
                self.random(rows * e, n as u64, 1)?,
            );
            // Without a causal mask, the last keys of every other sequence are padding.
            let padding = (!s.causal)
                .then(|| {
                    let kp: Vec<f32> = (0..s.batch * s.seq)
                        .map(|r| (r / s.seq % 2 == 1 && r % s.seq >= s.seq - 9) as u8 as f32)
                        .collect();
                    self.uploaded(&kp)
                })
                .transpose()?;
            let mut results = Vec::new();
            for flash in [false, true] {
                let out = self.zeros(rows * e)?;
                let att = self.zeros(s.batch * s.heads * s.seq * s.seq)?;
                let dqkv = self.zeros(rows * 3 * e)?;
                let kp = padding.as_ref().map(|b| b.tensor());
                let (o, a, q) = (out.tensor(), att.tensor(), qkv.tensor());
                self.attention_forward_on(flash, o, a, q, kp, s, None)?;
                self.attention_backward_on(flash, dqkv.tensor(), dout.tensor(), q, a, s, None)?;
                results.push([self.host(o)?, self.host(dqkv.tensor())?]);
            }
            worst = worst.max(difference(&results[0], &results[1]));
        }
        Ok(worst)
    }

    /// The largest relative difference between the fused and the separate product and GELU:
    /// forward (`pre`, `out`) with a bias, and the input gradient through the GELU, with the
    /// weight layouts GPT-2 uses (Conv1D `[in, out]` forward, the `[out, in]` mirror backward).
    /// An error when cuBLASLt ran no epilogue for them: a fused path never seen to work is not
    /// used.
    fn gelu_self_test(&self) -> Result<f64> {
        // `n` a multiple of 8 and the buffers fresh allocations: the epilogue's conditions.
        let (rows, k, n, e) = (64, 48, 128, 40);
        let act = (Activation::GeluTanh, None);
        let (inp, w, bias) = (
            self.random(rows * k, 0, 0)?,
            self.random(k * n, 0, 1)?,
            self.random(n, 0, 2)?,
        );
        let (w2, dout) = (self.random(n * e, 0, 3)?, self.random(rows * e, 0, 4)?);
        let weight = |b: &CudaBuffer, layout| Weight {
            tensor: b.tensor(),
            layout,
        };
        let (forward, backward) = (WeightLayout::InOut, WeightLayout::OutIn);
        let mut results = Vec::new();
        for fused in [false, true] {
            let (pre, out) = (self.zeros(rows * n)?, self.zeros(rows * n)?);
            let outs = (pre.tensor(), out.tensor());
            let (i, b) = (inp.tensor(), Some(bias.tensor()));
            let w = weight(&w, forward);
            let ran_forward =
                self.linear_activation_forward_on(fused, outs, i, w, b, act, rows, k, n)?;
            let (dpre, scratch) = (self.zeros(rows * n)?, self.zeros(rows * n)?);
            let (dw, db) = (self.zeros(n * e)?, self.zeros(e)?);
            let ran_backward = self.matmul_activation_backward_on(
                fused,
                (dpre.tensor(), scratch.tensor()),
                (pre.tensor(), act.0, act.1),
                weight(&dw, backward),
                Some(db.tensor()),
                GradStore::Write,
                dout.tensor(),
                out.tensor(),
                weight(&w2, backward),
                rows,
                n,
                e,
            )?;
            if fused && !(ran_forward && ran_backward) {
                anyhow::bail!(
                    "cuBLASLt offered no algorithm with the epilogue for the test's products"
                );
            }
            results.push([
                self.host(pre.tensor())?,
                self.host(out.tensor())?,
                self.host(dpre.tensor())?,
            ]);
        }
        Ok(difference(&results[0], &results[1]))
    }
}

/// The largest relative difference between the outputs of the plain and the fast path.
fn difference(plain: &[Vec<f32>], fast: &[Vec<f32>]) -> f64 {
    plain
        .iter()
        .zip(fast)
        .map(|(p, f)| max_rel_err(p, f))
        .fold(0.0, f64::max)
}
