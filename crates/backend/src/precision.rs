//! `--precision`: the arithmetic matrix products use. Parameters, gradients and optimizer state
//! stay fp32 in every mode (the fp32 master weights of mixed precision); only the matmul inputs
//! are rounded to the low-precision type on the GPU's matrix units, with fp32 accumulation.

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    Fp32,
    /// fp32 storage, matmuls on the tensor cores' tf32 (10-bit mantissa) inputs.
    Tf32,
    Bf16,
    /// Needs loss scaling (the trainer's `GradScaler`): fp16's range is small.
    Fp16,
}

impl Precision {
    pub const ALL: [Precision; 4] = [
        Precision::Fp32,
        Precision::Tf32,
        Precision::Bf16,
        Precision::Fp16,
    ];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "fp32" => Precision::Fp32,
            "tf32" => Precision::Tf32,
            "bf16" => Precision::Bf16,
            "fp16" => Precision::Fp16,
            _ => bail!("--precision {s}: expected auto, fp32, tf32, bf16 or fp16"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    /// Largest relative error a kernel may show against the fp32 CPU twin in this precision:
    /// a few units of the input rounding (2^-24 fp32, 2^-11 tf32 and fp16, 2^-8 bf16) grown over
    /// a reduction.
    pub fn tolerance(self) -> f64 {
        match self {
            // Both backends compute in f32 and differ only in the order of their sums (cuBLASLt's
            // tiles against the `gemm` crate's, tree reductions against sequential loops, atomics
            // in the embedding backward): a few ulp per sum of the ~100 terms the parity cases
            // use, about 1e-6 of the largest output at worst. 1e-5 leaves a margin without
            // hiding a wrong index (an error of order 1); dropout masks are bit-identical.
            Precision::Fp32 => 1e-5,
            Precision::Tf32 => 1e-3,
            Precision::Fp16 => 1e-3,
            Precision::Bf16 => 1e-2,
        }
    }

    /// Dense matrix FLOPs per clock per streaming multiprocessor, by compute capability: what
    /// the architecture's matrix units (or fp32 cores) can issue. Peak FLOP/s is this times the
    /// SM count times the clock, both read from the device. `None`: the architecture has no
    /// such units (tf32 before sm_80, bf16 before sm_80).
    pub fn flops_per_clock_per_sm(self, cc: (i32, i32)) -> Option<f64> {
        // fp32 FMA lanes per SM: 64 on Volta, Turing and GA100, 128 from GA10x (sm_86) on.
        let fp32_lanes = if cc.0 < 8 || cc == (8, 0) {
            64.0
        } else {
            128.0
        };
        // fp16/bf16 dense tensor-core FLOPs per clock per SM.
        let half = match cc {
            (7, _) => 1024.0,
            (8, 0) => 2048.0,
            (8, _) => 1024.0,
            (9, _) => 4096.0,
            (10, _) => 8192.0,
            _ => 1024.0,
        };
        match self {
            Precision::Fp32 => Some(2.0 * fp32_lanes),
            Precision::Fp16 => Some(half),
            Precision::Bf16 | Precision::Tf32 if cc.0 < 8 => None,
            Precision::Bf16 => Some(half),
            Precision::Tf32 => Some(half / 2.0),
        }
    }
}
