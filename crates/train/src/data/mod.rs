//! The data layer of GPT training: text in, token windows out.
//!
//! ```text
//!  --tokenizer bytes | PATH/tokenizer.json      Tokenizer::from_arg
//!  --data PATH (file, or folder of .txt/.jsonl)  Source::Path     ┐
//!  the embedded default corpus                    Source::Embedded ┘─ prepare ─> Dataset { train, val }
//!  --val-fraction F                               (the tail F of the token stream is `val`)
//!  --data-order sequential|shuffle, --batch-size B, --seq-len T    Loader::next_batch -> x, y
//! ```
//!
//! # Tokenizers
//! [`Tokenizer::Bytes`] maps text to its raw UTF-8 bytes (ids 0..=255, vocabulary 256).
//! [`Tokenizer::Hf`] is any Hugging Face `tokenizer.json`; [`train_bpe`] trains a GPT-2 style
//! byte-level BPE (ByteLevel pre-tokenizer and decoder, no prefix space, the 256 byte symbols
//! always in the vocabulary, `<|endoftext|>` as id 0) for `flint tokenizer train`.
//!
//! # Inputs
//! `--data PATH` is one text file (read as JSON lines when it ends in `.jsonl`) or a folder whose
//! `.txt` and `.jsonl` files are read recursively in path order; hidden entries (names starting
//! with `.`) and other extensions are ignored. A `.txt` file is one document, each line of a
//! `.jsonl` file one document (its string field `text`). Files that are not UTF-8, or contain NUL
//! bytes, are skipped with a warning ([`Dataset::warnings`]); it is an error when no document is
//! left, and when a folder holds no input file at all.
//!
//! Documents are joined in order: with the `<|endoftext|>` id after each document when the
//! tokenizer's vocabulary has that token, otherwise with the tokens of `"\n\n"` between documents
//! (always the case for `bytes`).
//!
//! # Cache
//! [`prepare`] tokenizes once into `cache_dir`:
//! `tokens-KEY.json` (the manifest, written last) and `tokens-KEY-NNNN.bin` (the shards, each at
//! most [`SHARD_TOKENS`] tokens, little-endian **u16 when the vocabulary has at most 65536 ids,
//! u32 otherwise**). KEY is a 128-bit FNV-1a hash of the inputs' canonical paths, sizes and
//! modification times (or, for embedded text, its name and content) and the tokenizer's
//! [`Tokenizer::fingerprint`]; a later `prepare` with the same KEY memory-maps the shards without
//! tokenizing ([`Dataset::reused`]). Every file is written atomically (temp file, fsync, rename),
//! so an interrupted run leaves no half cache behind. Old keys are not deleted.
//!
//! # Loaders
//! [`Loader`] fills `x` and `y` (`B` rows of `T` token ids, `y` shifted by one) per micro-batch.
//! *sequential* is llm.c's loader: read `B*T+1` tokens at the position, advance by `B*T`, and go
//! back to 0 first when fewer than `B*T+1` tokens remain. *shuffle* reads `B` windows of `T+1`
//! tokens starting at multiples of `T`, in an order that is a Fisher–Yates permutation per epoch
//! driven by Philox (`seed`, epoch). [`LoaderState`] is the whole position (serde), so a
//! checkpoint resumes the exact stream with [`Loader::restore`].

mod cache;
mod corpus;
mod loader;
mod tokenizer;

pub use cache::{prepare, Dataset, Tokens, SHARD_TOKENS};
pub use corpus::Source;
pub use loader::{DataOrder, Loader, LoaderState};
pub use tokenizer::{train_bpe, HfTokenizer, Tokenizer, EOT};

/// 128-bit FNV-1a of `bytes`, as 32 hex digits: the cache key and the tokenizer fingerprint.
/// (Stable across platforms and Rust versions, unlike `std`'s `DefaultHasher`.)
pub(crate) fn fnv128_hex(bytes: &[u8]) -> String {
    let mut h = Fnv128::new();
    h.write(bytes);
    h.hex()
}

pub(crate) struct Fnv128(u128);

impl Fnv128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

    pub(crate) fn new() -> Self {
        Self(Self::OFFSET)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u128).wrapping_mul(Self::PRIME);
        }
    }

    pub(crate) fn hex(&self) -> String {
        format!("{:032x}", self.0)
    }
}
