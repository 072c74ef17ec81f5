//! `--tokenizer bytes | PATH/tokenizer.json`, and training a byte-level BPE.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use super::corpus::{self, Read};

/// The end-of-text token that separates documents (GPT-2's spelling).
pub const EOT: &str = "<|endoftext|>";

/// A tokenizer: raw bytes, or a Hugging Face `tokenizer.json`.
pub enum Tokenizer {
    /// Ids 0..=255 are the text's UTF-8 bytes; vocabulary 256.
    Bytes,
    /// A Hugging Face tokenizer loaded from a `tokenizer.json`.
    Hf(Box<HfTokenizer>),
}

/// A loaded `tokenizer.json`, with what flint derives from it once.
pub struct HfTokenizer {
    /// The canonical path of the `tokenizer.json`.
    pub path: PathBuf,
    pub inner: tokenizers::Tokenizer,
    vocab_size: usize,
    eot: Option<u32>,
    fingerprint: String,
    /// Long documents may be encoded in independent pieces split at newlines (see `pieces`):
    /// exact only for a GPT-2 style pipeline (no normalizer, ByteLevel without prefix space).
    splittable: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({}, vocab {})", self.spec(), self.vocab_size())
    }
}

impl Tokenizer {
    /// `"bytes"`, or a path to a `tokenizer.json` (or to a folder that holds one).
    pub fn from_arg(arg: &str) -> Result<Self> {
        if arg == "bytes" {
            return Ok(Tokenizer::Bytes);
        }
        let mut path = PathBuf::from(arg);
        if path.is_dir() {
            path = path.join("tokenizer.json");
            if !path.is_file() {
                bail!("--tokenizer {arg}: a folder without a tokenizer.json; give the path to a tokenizer.json, or `bytes`");
            }
        }
        if !path.is_file() {
            bail!(
                "--tokenizer {arg}: no such file (expected `bytes` or a path to a tokenizer.json)"
            );
        }
        let path = path.canonicalize().unwrap_or(path);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("--tokenizer {}: cannot read", path.display()))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow!("--tokenizer {}: not a tokenizer.json ({e})", path.display()))?;
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
            .max(inner.get_vocab_size(true));
        if vocab_size == 0 {
            bail!("--tokenizer {}: the vocabulary is empty", path.display());
        }
        let eot = inner.token_to_id(EOT);
        let splittable = inner.get_normalizer().is_none()
            && matches!(
                inner.get_pre_tokenizer(),
                Some(PreTokenizerWrapper::ByteLevel(b)) if !b.add_prefix_space && b.use_regex
            );
        Ok(Tokenizer::Hf(Box::new(HfTokenizer {
            path,
            inner,
            vocab_size,
            eot,
            fingerprint: format!("hf-{}", super::fnv128_hex(&bytes)),
            splittable,
        })))
    }

    /// The `tokenizer.json` it was read from (none for `bytes`).
    pub fn file(&self) -> Option<&Path> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(t) => Some(&t.path),
        }
    }

    /// One more than the largest token id.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf(t) => t.vocab_size,
        }
    }

    /// The id of `<|endoftext|>`, if the vocabulary has it (never for `bytes`).
    pub fn eot(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(t) => t.eot,
        }
    }

    /// The ids of `text`, without added special tokens (no BOS/EOS post-processing).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf(t) => Ok(t
                .inner
                .encode(text, false)
                .map_err(|e| anyhow!("tokenizer {}: {e}", t.path.display()))?
                .get_ids()
                .to_vec()),
        }
    }

    /// The text of `ids`. For `bytes`, an incomplete or invalid UTF-8 sequence (a sample cut in
    /// the middle of a character) becomes U+FFFD; an id above 255 is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Bytes => {
                let bytes = ids
                    .iter()
                    .map(|&i| u8::try_from(i).map_err(|_| anyhow!("token id {i} is not a byte")))
                    .collect::<Result<Vec<u8>>>()?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::Hf(t) => t
                .inner
                .decode(ids, false)
                .map_err(|e| anyhow!("tokenizer {}: {e}", t.path.display())),
        }
    }

    /// What a checkpoint records to rebuild this tokenizer with [`Tokenizer::from_arg`]:
    /// `"bytes"` or the canonical path of the `tokenizer.json`.
    pub fn spec(&self) -> String {
        match self {
            Tokenizer::Bytes => "bytes".to_string(),
            Tokenizer::Hf(t) => t.path.display().to_string(),
        }
    }

    /// Changes whenever the vocabulary or the pipeline may change: `"bytes"`, or `hf-` and the
    /// FNV-1a hash of the `tokenizer.json` bytes as loaded.
    pub fn fingerprint(&self) -> String {
        match self {
            Tokenizer::Bytes => "bytes".to_string(),
            Tokenizer::Hf(t) => t.fingerprint.clone(),
        }
    }

    /// Whether a long document may be encoded as independent pieces split by [`pieces`].
    pub(crate) fn splittable(&self) -> bool {
        match self {
            Tokenizer::Bytes => true,
            Tokenizer::Hf(t) => t.splittable,
        }
    }
}

/// Splits `text` into pieces of about `target` bytes or more, only right after a `\n` that has a
/// non-whitespace character on both sides. The GPT-2 pre-tokenizer regex always ends a
/// pre-token there (the lone `\n` is one pre-token), so encoding the pieces one by one gives
/// exactly the ids of the whole text, and long documents encode in parallel.
pub(crate) fn pieces(text: &str, target: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > 2 * target {
        let bytes = rest.as_bytes();
        let cut = (target..bytes.len() - 1).find(|&k| {
            bytes[k] == b'\n'
                && rest[..k]
                    .chars()
                    .next_back()
                    .is_some_and(|c| !c.is_whitespace())
                && rest[k + 1..]
                    .chars()
                    .next()
                    .is_some_and(|c| !c.is_whitespace())
        });
        match cut {
            Some(k) => {
                out.push(&rest[..k + 1]);
                rest = &rest[k + 1..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// Trains a GPT-2 style byte-level BPE of `vocab_size` ids (256 byte symbols, `<|endoftext|>`,
/// merges) on `inputs` (files or folders, read like `--data`), and writes it atomically to `out`
/// as a `tokenizer.json`. Returns the warnings: skipped files, and a vocabulary smaller than asked
/// when the text has too few distinct pairs to merge.
pub fn train_bpe(inputs: &[PathBuf], vocab_size: usize, out: &Path) -> Result<Vec<String>> {
    const MIN: usize = 257;
    if vocab_size < MIN {
        bail!("--vocab-size {vocab_size} is too small: the 256 byte symbols and {EOT} need {MIN}");
    }
    if vocab_size > u32::MAX as usize {
        bail!(
            "--vocab-size {vocab_size} is too large: at most {}",
            u32::MAX
        );
    }
    if inputs.is_empty() {
        bail!("--data: no input given");
    }
    let mut files = Vec::new();
    for input in inputs {
        files.extend(corpus::list_files(input)?);
    }

    let trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .special_tokens(vec![AddedToken::from(EOT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let byte_level = ByteLevel::new(false, true, true);
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level));

    let warnings = Mutex::new(Vec::new());
    let errors = Mutex::new(Vec::new());
    let docs = AtomicUsize::new(0);
    // Files are read lazily, one at a time, as the trainer pulls documents.
    let documents = files
        .iter()
        .flat_map(|f| match corpus::read_documents(&f.path) {
            Ok(Read::Docs(d, w)) => {
                docs.fetch_add(d.len(), Ordering::Relaxed);
                warnings.lock().unwrap().extend(w);
                d
            }
            Ok(Read::Skipped(w)) => {
                warnings.lock().unwrap().push(w);
                Vec::new()
            }
            Err(e) => {
                errors.lock().unwrap().push(e);
                Vec::new()
            }
        });
    tok.train(&mut trainer, documents)
        .map_err(|e| anyhow!("training the BPE tokenizer: {e}"))?;
    if let Some(e) = errors.into_inner().unwrap().into_iter().next() {
        return Err(e);
    }
    let mut warnings = warnings.into_inner().unwrap();
    if docs.into_inner() == 0 {
        return Err(corpus::nothing_left(
            &inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
            &warnings,
        ));
    }
    let got = tok.get_vocab_size(true);
    if got < vocab_size {
        warnings.push(format!(
            "the text only supports {got} tokens, fewer than --vocab-size {vocab_size}"
        ));
    }
    let json = tok
        .to_string(false)
        .map_err(|e| anyhow!("serializing the tokenizer: {e}"))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--out {}: cannot create the folder", out.display()))?;
    }
    crate::files::write_atomic(out, json.as_bytes())?;
    Ok(warnings)
}
