//! The run folder's logs: `metrics.jsonl` (one JSON object per line) and TensorBoard event files.

pub mod metrics;
pub mod tensorboard;
