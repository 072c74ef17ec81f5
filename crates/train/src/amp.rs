//! Dynamic loss scaling for `--precision fp16`, as `torch.amp.GradScaler` does it.
//!
//! fp16 has 5 exponent bits: small gradients underflow to zero. The loss (so every gradient) is
//! multiplied by a large scale before backward and the gradients divided by it afterwards; a
//! step whose gradients overflowed (inf or NaN) is skipped and the scale halved, and after
//! `growth_interval` clean steps in a row the scale doubles. bf16 has fp32's exponent range and
//! needs none of this.

use anyhow::Result;
use flint_backend::{Backend, Tensor};
use serde::{Deserialize, Serialize};

/// `torch.amp.GradScaler`'s state and defaults (`init_scale=2**16`, `growth_factor=2`,
/// `backoff_factor=0.5`, `growth_interval=2000`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    pub scale: f32,
    /// Clean steps since the scale last changed.
    pub growth_tracker: u32,
    pub growth_interval: u32,
}

impl Default for GradScaler {
    fn default() -> Self {
        GradScaler {
            scale: 65536.0,
            growth_tracker: 0,
            growth_interval: 2000,
        }
    }
}

impl GradScaler {
    /// `unscale_`, the inf/NaN check and `update` of a step whose loss was multiplied by
    /// `self.scale`: divides `grads` by it and returns whether the optimizer may step.
    pub fn unscale_and_update<B: Backend>(&mut self, backend: &B, grads: Tensor) -> Result<bool> {
        backend.scale(grads, 1.0 / self.scale)?;
        let finite = backend.sum_squares(grads)?.is_finite();
        Ok(self.update(finite))
    }

    /// Records a step's outcome (were the unscaled gradients all finite?) and returns whether
    /// the optimizer may step.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale *= 0.5;
            self.growth_tracker = 0;
            return false;
        }
        self.growth_tracker += 1;
        if self.growth_tracker == self.growth_interval {
            self.scale *= 2.0;
            self.growth_tracker = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flint_backend::cpu::Cpu;
    use flint_backend::{Buffer, DType};

    #[test]
    fn unscaling_divides_the_gradients_and_an_overflow_skips_the_step() {
        let grads = Cpu.alloc(DType::F32, 3).unwrap();
        let mut s = GradScaler::default();
        Cpu.upload(grads.tensor(), &[65536.0, -32768.0, 0.0])
            .unwrap();
        assert!(s.unscale_and_update(&Cpu, grads.tensor()).unwrap());
        let mut g = [0.0; 3];
        Cpu.download(grads.tensor(), &mut g).unwrap();
        assert_eq!(g, [1.0, -0.5, 0.0]);
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 1));
        for bad in [f32::INFINITY, f32::NAN] {
            Cpu.upload(grads.tensor(), &[1.0, bad, 2.0]).unwrap();
            assert!(!s.unscale_and_update(&Cpu, grads.tensor()).unwrap());
        }
        assert_eq!((s.scale, s.growth_tracker), (16384.0, 0));
    }

    #[test]
    fn overflow_skips_and_halves_clean_steps_double_after_the_interval() {
        let mut s = GradScaler {
            growth_interval: 3,
            ..GradScaler::default()
        };
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 32768.0, "two clean steps are not yet the interval");
        // An overflow resets the count of clean steps.
        assert!(!s.update(false));
        assert_eq!((s.scale, s.growth_tracker), (16384.0, 0));
        for _ in 0..3 {
            assert!(s.update(true));
        }
        assert_eq!((s.scale, s.growth_tracker), (32768.0, 0));
    }
}
