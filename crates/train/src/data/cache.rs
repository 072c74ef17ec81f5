//! Tokenizing once into memory-mapped shards, and reading them back.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::corpus::{self, InputFile, Read, Source};
use super::tokenizer::{pieces, Tokenizer};
use super::{fnv128_hex, Fnv128};
use crate::files::write_atomic;

/// The most tokens in one shard file (128 MiB of u16, 256 MiB of u32).
pub const SHARD_TOKENS: usize = 1 << 26;

/// Pieces encoded per parallel step.
const GROUP_PIECES: usize = 256;
/// The size a long document is cut to, in bytes (see `pieces`).
const PIECE_BYTES: usize = 64 << 10;

const FORMAT: &str = "flint-tokens 2";

/// A read-only run of token ids over memory-mapped shards; cheap to clone and to slice.
#[derive(Clone)]
pub struct Tokens {
    shards: Arc<[Mmap]>,
    /// u32 ids when true, u16 otherwise.
    wide: bool,
    shard_tokens: usize,
    start: usize,
    len: usize,
}

impl Tokens {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token `i`; panics when `i >= len()`.
    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        assert!(i < self.len, "token {i} of {}", self.len);
        let g = self.start + i;
        let (s, o) = (g / self.shard_tokens, g % self.shard_tokens);
        let m = &self.shards[s];
        if self.wide {
            u32::from_le_bytes(m[4 * o..4 * o + 4].try_into().unwrap())
        } else {
            u16::from_le_bytes(m[2 * o..2 * o + 2].try_into().unwrap()) as u32
        }
    }

    /// Tokens `range` of this run.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Tokens {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "{range:?} of {} tokens",
            self.len
        );
        Tokens {
            start: self.start + range.start,
            len: range.end - range.start,
            ..self.clone()
        }
    }

    /// 2 (u16 ids) or 4 (u32 ids).
    pub fn bytes_per_token(&self) -> usize {
        if self.wide {
            4
        } else {
            2
        }
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tokens({} x u{}, {} shards)",
            self.len,
            8 * self.bytes_per_token(),
            self.shards.len()
        )
    }
}

/// The token stream of a data source, split for training and validation.
#[derive(Debug)]
pub struct Dataset {
    /// The head of the stream.
    pub train: Tokens,
    /// The tail `--val-fraction` of the stream; `None` for a fraction of 0.
    pub val: Option<Tokens>,
    /// Skipped files and dropped lines, to show the user (also when the cache is reused).
    pub warnings: Vec<String>,
    /// Whether the shards came from the cache rather than from tokenizing now.
    pub reused: bool,
    /// The cache's manifest, `cache_dir/tokens-KEY.json`.
    pub manifest: PathBuf,
    /// What the split holds: a hash of every token and the training length. A checkpoint
    /// records it, so a resume on other data says so.
    pub fingerprint: String,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    key: String,
    source: String,
    tokenizer: String,
    fingerprint: String,
    vocab_size: usize,
    /// "u16" or "u32", little-endian.
    dtype: String,
    tokens: u64,
    /// FNV-1a 128 of the token stream as stored: what the data is, whatever the file times.
    content: String,
    documents: u64,
    shard_tokens: u64,
    shards: Vec<String>,
    inputs: Vec<InputFile>,
    warnings: Vec<String>,
}

/// Tokenizes `source` into `cache_dir` (or re-uses the cache made from the same inputs and
/// tokenizer), memory-maps it, and holds out the tail `val_fraction` for validation.
pub fn prepare(
    source: Source,
    tokenizer: &Tokenizer,
    cache_dir: &Path,
    val_fraction: f64,
) -> Result<Dataset> {
    prepare_with(source, tokenizer, cache_dir, val_fraction, SHARD_TOKENS)
}

fn prepare_with(
    source: Source,
    tokenizer: &Tokenizer,
    cache_dir: &Path,
    val_fraction: f64,
    shard_tokens: usize,
) -> Result<Dataset> {
    if !(0.0..1.0).contains(&val_fraction) {
        bail!("--val-fraction {val_fraction} must be at least 0 and below 1");
    }
    let inputs = match &source {
        Source::Path(p) => corpus::list_files(p)?,
        Source::Embedded { .. } => Vec::new(),
    };
    let source_name = match &source {
        Source::Path(p) => p.display().to_string(),
        Source::Embedded { name, .. } => format!("embedded:{name}"),
    };

    let mut h = Fnv128::new();
    let fingerprint = tokenizer.fingerprint();
    h.write(format!("{FORMAT}\nshard {shard_tokens}\ntokenizer {fingerprint}\n").as_bytes());
    for f in &inputs {
        h.write(b"file ");
        h.write(f.path.as_os_str().as_encoded_bytes());
        h.write(format!("\0{}\0{}\n", f.size, f.mtime_ns).as_bytes());
    }
    if let Source::Embedded { name, text } = &source {
        let t = fnv128_hex(text.as_bytes());
        h.write(format!("embedded {name}\0{}\0{t}\n", text.len()).as_bytes());
    }
    let key = h.hex();
    let manifest_path = cache_dir.join(format!("tokens-{key}.json"));
    crate::files::remove_dead_temporaries(cache_dir);

    let (manifest, all, reused) = match load(cache_dir, &manifest_path, &key) {
        Some((m, t)) => (m, t, true),
        None => {
            std::fs::create_dir_all(cache_dir).with_context(|| {
                format!("{}: cannot create the token cache", cache_dir.display())
            })?;
            let m = tokenize(
                &source,
                &source_name,
                inputs,
                tokenizer,
                cache_dir,
                &key,
                shard_tokens,
            )?;
            let json = serde_json::to_vec_pretty(&m)?;
            write_atomic(&manifest_path, &json)?;
            let t = open(cache_dir, &m)?;
            (m, t, false)
        }
    };

    let n = all.len();
    let val_len = if val_fraction > 0.0 {
        ((n as f64 * val_fraction).round() as usize).max(1)
    } else {
        0
    };
    if val_len >= n {
        bail!("--val-fraction {val_fraction} leaves no training tokens out of {n}");
    }
    Ok(Dataset {
        fingerprint: format!("{} train {}", manifest.content, n - val_len),
        train: all.slice(0..n - val_len),
        val: (val_len > 0).then(|| all.slice(n - val_len..n)),
        warnings: manifest.warnings,
        reused,
        manifest: manifest_path,
    })
}

/// The cache for `key`, when its manifest and every shard are there and consistent.
fn load(dir: &Path, manifest_path: &Path, key: &str) -> Option<(Manifest, Tokens)> {
    let bytes = std::fs::read(manifest_path).ok()?;
    let m: Manifest = serde_json::from_slice(&bytes).ok()?;
    if m.format != FORMAT || m.key != key {
        return None;
    }
    let t = open(dir, &m).ok()?;
    Some((m, t))
}

fn open(dir: &Path, m: &Manifest) -> Result<Tokens> {
    let wide = match m.dtype.as_str() {
        "u16" => false,
        "u32" => true,
        d => bail!("token cache: unknown dtype {d}"),
    };
    let width = if wide { 4 } else { 2 };
    let shard_tokens = m.shard_tokens as usize;
    let total = m.tokens as usize;
    if shard_tokens == 0 || m.shards.len() != total.div_ceil(shard_tokens) {
        bail!("token cache: {} shards for {total} tokens", m.shards.len());
    }
    let mut maps = Vec::with_capacity(m.shards.len());
    for (i, name) in m.shards.iter().enumerate() {
        let path = dir.join(name);
        let want = width * shard_tokens.min(total - i * shard_tokens);
        let file = File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
        let len = file.metadata()?.len();
        if len != want as u64 {
            bail!("{}: {len} bytes, expected {want}", path.display());
        }
        // SAFETY: shards are written once (atomically, under a name that includes the hash of
        // their inputs) and never modified in place; the map is read-only.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        maps.push(map);
    }
    Ok(Tokens {
        shards: maps.into(),
        wide,
        shard_tokens,
        start: 0,
        len: total,
    })
}

/// Writes ids into shard files of `shard_tokens` ids each.
struct ShardWriter<'a> {
    dir: &'a Path,
    key: &'a str,
    wide: bool,
    vocab: usize,
    shard_tokens: usize,
    buf: Vec<u8>,
    in_buf: usize,
    names: Vec<String>,
    total: u64,
    content: Fnv128,
}

impl ShardWriter<'_> {
    fn push(&mut self, ids: &[u32]) -> Result<()> {
        for &id in ids {
            if id as usize >= self.vocab {
                bail!(
                    "the tokenizer produced id {id}, outside its vocabulary of {}",
                    self.vocab
                );
            }
            if self.wide {
                self.buf.extend_from_slice(&id.to_le_bytes());
            } else {
                self.buf.extend_from_slice(&(id as u16).to_le_bytes());
            }
            self.in_buf += 1;
            self.total += 1;
            if self.in_buf == self.shard_tokens {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.in_buf == 0 {
            return Ok(());
        }
        let name = format!("tokens-{}-{:04}.bin", self.key, self.names.len());
        self.content.write(&self.buf);
        write_atomic(&self.dir.join(&name), &self.buf)?;
        self.buf.clear();
        self.in_buf = 0;
        self.names.push(name);
        Ok(())
    }
}

/// Tokenizes every document of `source` into shards, and returns their manifest (not yet
/// written).
fn tokenize(
    source: &Source,
    source_name: &str,
    inputs: Vec<InputFile>,
    tokenizer: &Tokenizer,
    dir: &Path,
    key: &str,
    shard_tokens: usize,
) -> Result<Manifest> {
    let vocab = tokenizer.vocab_size();
    let wide = vocab > 1 << 16;
    let mut w = ShardWriter {
        dir,
        key,
        wide,
        vocab,
        shard_tokens,
        buf: Vec::new(),
        in_buf: 0,
        names: Vec::new(),
        total: 0,
        content: Fnv128::new(),
    };
    let eot = tokenizer.eot();
    let sep = match eot {
        Some(_) => Vec::new(),
        None => tokenizer.encode("\n\n")?,
    };
    let mut warnings = Vec::new();
    let mut documents = 0u64;
    let mut emit = |docs: &[String], w: &mut ShardWriter| -> Result<()> {
        // (index of the document, piece of it); a document's pieces are contiguous.
        let mut all = Vec::new();
        for (d, doc) in docs.iter().enumerate() {
            if matches!(tokenizer, Tokenizer::Bytes) {
                all.push((d, doc.as_str()));
            } else if tokenizer.splittable() {
                all.extend(pieces(doc, PIECE_BYTES).into_iter().map(|p| (d, p)));
            } else {
                all.push((d, doc.as_str()));
            }
        }
        let mut prev = None;
        for group in all.chunks(GROUP_PIECES) {
            let ids = group
                .par_iter()
                .map(|(_, p)| tokenizer.encode(p))
                .collect::<Result<Vec<_>>>()?;
            for ((d, _), ids) in group.iter().zip(ids) {
                if prev != Some(*d) {
                    // A new document starts.
                    if let (Some(_), Some(e)) = (prev, eot) {
                        w.push(&[e])?;
                    }
                    if eot.is_none() && documents > 0 {
                        w.push(&sep)?;
                    }
                    documents += 1;
                    prev = Some(*d);
                }
                w.push(&ids)?;
            }
        }
        if let (Some(_), Some(e)) = (prev, eot) {
            w.push(&[e])?;
        }
        Ok(())
    };
    match source {
        Source::Embedded { text, .. } => {
            if !text.is_empty() {
                emit(&[text.to_string()], &mut w)?;
            }
        }
        Source::Path(_) => {
            for f in &inputs {
                match corpus::read_documents(&f.path)? {
                    Read::Docs(docs, warn) => {
                        warnings.extend(warn);
                        emit(&docs, &mut w)?;
                    }
                    Read::Skipped(warn) => warnings.push(warn),
                }
            }
        }
    }
    w.flush()?;
    if w.total == 0 {
        return Err(corpus::nothing_left(source_name, &warnings));
    }
    Ok(Manifest {
        format: FORMAT.to_string(),
        key: key.to_string(),
        source: source_name.to_string(),
        tokenizer: tokenizer.spec(),
        fingerprint: tokenizer.fingerprint(),
        vocab_size: vocab,
        dtype: if wide { "u32" } else { "u16" }.to_string(),
        tokens: w.total,
        content: w.content.hex(),
        documents,
        shard_tokens: shard_tokens as u64,
        shards: w.names,
        inputs,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_span_shards_and_slices_index_from_their_start() {
        let dir = std::env::temp_dir().join(format!("flint-shards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = "abcdefghijklmnopqrst"; // 20 bytes: shards of 7, 7, 6
        let d = prepare_with(
            Source::Embedded { name: "t", text },
            &Tokenizer::Bytes,
            &dir,
            0.25,
            7,
        )
        .unwrap();
        let got: Vec<u8> = (0..d.train.len()).map(|i| d.train.get(i) as u8).collect();
        assert_eq!(got, b"abcdefghijklmno");
        let val = d.val.unwrap();
        let got: Vec<u8> = (0..val.len()).map(|i| val.get(i) as u8).collect();
        assert_eq!(got, b"pqrst");
        assert_eq!(val.slice(1..3).get(1), b'r' as u32);
        let shards = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "bin")
            .count();
        assert_eq!(shards, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
