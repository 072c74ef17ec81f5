//! Learning-rate schedules.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    Cosine,
}

/// The learning rate of optimizer step `step` (counted from 1) of `steps`:
/// - `constant`: `lr` (after the linear warm-up, if any);
/// - `cosine`: linear warm-up `lr * step / warmup_steps` for `step <= warmup_steps`, then
///   `min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2` with
///   `p = (step - warmup_steps) / (steps - warmup_steps)`, so the last step uses `min_lr`.
pub fn lr_at(
    schedule: LrSchedule,
    step: u64,
    steps: u64,
    lr: f64,
    min_lr: f64,
    warmup_steps: u64,
) -> f64 {
    if step <= warmup_steps && warmup_steps > 0 {
        return lr * step as f64 / warmup_steps as f64;
    }
    match schedule {
        LrSchedule::Constant => lr,
        LrSchedule::Cosine => {
            let span = steps.saturating_sub(warmup_steps).max(1) as f64;
            let p = ((step - warmup_steps) as f64 / span).min(1.0);
            min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warms_up_linearly_then_decays_to_min_lr() {
        let at = |s| lr_at(LrSchedule::Cosine, s, 110, 1e-3, 1e-4, 10);
        assert!((at(1) - 1e-4).abs() < 1e-12);
        assert!((at(10) - 1e-3).abs() < 1e-12);
        assert!((at(60) - 5.5e-4).abs() < 1e-12, "{}", at(60));
        assert!((at(110) - 1e-4).abs() < 1e-12);
        assert!(at(30) > at(31));
    }

    #[test]
    fn constant_holds_after_warmup() {
        assert_eq!(lr_at(LrSchedule::Constant, 50, 100, 3e-4, 0.0, 0), 3e-4);
        assert_eq!(lr_at(LrSchedule::Constant, 2, 100, 3e-4, 0.0, 4), 1.5e-4);
    }
}
