//! The run folder: which folder a run may use, and its logs, `metrics.jsonl` (one JSON object
//! per line) and TensorBoard event files.

pub mod folder;
pub mod metrics;
pub mod tensorboard;
