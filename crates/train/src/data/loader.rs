//! Micro-batches of `B` rows of `T` tokens, in order or shuffled, resumable from a small state.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::cache::Tokens;

/// `--data-order`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataOrder {
    /// llm.c's loader: consecutive `B*T+1` token reads, advancing by `B*T`.
    Sequential,
    /// Windows of `T+1` tokens at the starts `0, T, 2T, ...`, in a seeded order per epoch.
    Shuffle,
}

/// Where a [`Loader`] is: everything a checkpoint needs to continue the exact stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LoaderState {
    pub order: DataOrder,
    /// Sequential: how many times the position went back to 0. Shuffle: the permutation in use.
    pub epoch: u64,
    /// Sequential: the token position of the next read. Shuffle: how many windows of this
    /// epoch's permutation were used.
    pub pos: u64,
}

/// Fills micro-batches from a token stream of a fixed length.
pub struct Loader {
    len: usize,
    batch: usize,
    seq: usize,
    order: DataOrder,
    seed: u64,
    epoch: u64,
    pos: usize,
    /// Shuffle: the window indices of `epoch`, a permutation of `0..windows`.
    perm: Vec<u32>,
    /// Shuffle: the number of windows, `(len - 1) / seq`.
    windows: usize,
}

impl Loader {
    /// A loader over `tokens_len` tokens: `batch` rows (`--batch-size`) of `seq` tokens
    /// (`--seq-len`). The stream must hold at least `batch * seq + 1` tokens.
    pub fn new(
        tokens_len: usize,
        batch: usize,
        seq: usize,
        order: DataOrder,
        seed: u64,
    ) -> Result<Self> {
        if batch == 0 {
            bail!("--batch-size must be at least 1");
        }
        if seq == 0 {
            bail!("--seq-len must be at least 1");
        }
        let need = batch.checked_mul(seq).and_then(|n| n.checked_add(1));
        if need.is_none_or(|n| n > tokens_len) {
            bail!(
                "--seq-len {seq} is too long for the data: a micro-batch of --batch-size {batch} \
                 rows needs {batch} x {seq} + 1 = {} tokens, but there are only {tokens_len} \
                 (lower --seq-len or --batch-size, or add data)",
                need.map_or_else(|| "too many".to_string(), |n| n.to_string())
            );
        }
        let windows = (tokens_len - 1) / seq;
        if order == DataOrder::Shuffle && windows > u32::MAX as usize {
            bail!("--data-order shuffle: {windows} windows are too many (at most 2^32 - 1)");
        }
        let mut l = Loader {
            len: tokens_len,
            batch,
            seq,
            order,
            seed,
            epoch: 0,
            pos: 0,
            perm: Vec::new(),
            windows,
        };
        l.shuffle();
        Ok(l)
    }

    /// Fills `x` and `y` (each `batch * seq` ids, row-major `[batch][seq]`) with the next
    /// micro-batch: `y` is `x` shifted one token ahead.
    pub fn next_batch(&mut self, tokens: &Tokens, x: &mut [i32], y: &mut [i32]) {
        let (b, t) = (self.batch, self.seq);
        assert_eq!(
            tokens.len(),
            self.len,
            "the loader was made for another stream"
        );
        assert_eq!(x.len(), b * t, "x must hold batch * seq ids");
        assert_eq!(y.len(), b * t, "y must hold batch * seq ids");
        match self.order {
            DataOrder::Sequential => {
                if self.pos + b * t + 1 > self.len {
                    self.pos = 0;
                    self.epoch += 1;
                }
                let mut prev = tokens.get(self.pos) as i32;
                for i in 0..b * t {
                    let next = tokens.get(self.pos + i + 1) as i32;
                    x[i] = prev;
                    y[i] = next;
                    prev = next;
                }
                self.pos += b * t;
            }
            DataOrder::Shuffle => {
                for r in 0..b {
                    if self.pos == self.windows {
                        self.epoch += 1;
                        self.pos = 0;
                        self.shuffle();
                    }
                    let start = self.perm[self.pos] as usize * t;
                    self.pos += 1;
                    for i in 0..t {
                        x[r * t + i] = tokens.get(start + i) as i32;
                        y[r * t + i] = tokens.get(start + i + 1) as i32;
                    }
                }
            }
        }
    }

    /// The position, to save in a checkpoint.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            order: self.order,
            epoch: self.epoch,
            pos: self.pos as u64,
        }
    }

    /// Continues from a saved [`Loader::state`] of a loader with the same settings and data.
    pub fn restore(&mut self, s: &LoaderState) -> Result<()> {
        if s.order != self.order {
            bail!(
                "the checkpoint's data order is {:?}, not --data-order {:?}",
                s.order,
                self.order
            );
        }
        let limit = match self.order {
            DataOrder::Sequential => self.len,
            DataOrder::Shuffle => self.windows,
        };
        if s.pos > limit as u64 {
            bail!(
                "the checkpoint's data position {} is past the end ({limit}): the data shrank since; restore it, or start a new run with --init-from RUN/model",
                s.pos
            );
        }
        self.epoch = s.epoch;
        self.pos = s.pos as usize;
        self.shuffle();
        Ok(())
    }

    /// Shuffle: sets `perm` to this epoch's permutation of the windows, by Fisher–Yates with
    /// Philox stream `(seed, epoch)`: step `i` swaps `i` with `j = floor(r * (i + 1) / 2^64)`,
    /// `r` the 64-bit number made of the stream's u32s `2i` (high) and `2i + 1` (low).
    fn shuffle(&mut self) {
        if self.order != DataOrder::Shuffle {
            return;
        }
        self.perm.clear();
        self.perm.extend(0..self.windows as u32);
        for i in (1..self.windows).rev() {
            let u = |k: usize| flint_backend::philox::uniform_u32(self.seed, self.epoch, k as u64);
            let r = ((u(2 * i) as u64) << 32) | u(2 * i + 1) as u64;
            let j = ((r as u128 * (i as u128 + 1)) >> 64) as usize;
            self.perm.swap(i, j);
        }
    }
}
