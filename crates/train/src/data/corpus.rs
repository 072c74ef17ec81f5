//! Where documents come from: `--data PATH` (a file, or a folder of `.txt` / `.jsonl` files) or
//! text embedded in the binary.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, Context, Result};

/// The text to train on.
#[derive(Clone, Debug)]
pub enum Source<'a> {
    /// `--data PATH`: a text file (JSON lines when it ends in `.jsonl`), or a folder read
    /// recursively.
    Path(PathBuf),
    /// Text held in memory (the embedded default corpus): one document named `name`.
    Embedded { name: &'a str, text: &'a str },
}

/// One input file and what identifies its version for the cache.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct InputFile {
    pub path: PathBuf,
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch (0 where the platform has none).
    pub mtime_ns: u64,
}

/// What reading one file gave: its documents (and warnings about lines dropped from it), or
/// the warning that it was skipped whole.
pub(crate) enum Read {
    Docs(Vec<String>, Vec<String>),
    Skipped(String),
}

fn is_input(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("txt") || e.eq_ignore_ascii_case("jsonl"))
}

fn is_jsonl(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
}

fn hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn input_file(path: PathBuf) -> Result<InputFile> {
    let meta =
        std::fs::metadata(&path).with_context(|| format!("{}: cannot stat", path.display()))?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    Ok(InputFile {
        path,
        size: meta.len(),
        mtime_ns,
    })
}

/// The input files of `--data PATH`: the file itself, or the `.txt` / `.jsonl` files under the
/// folder (recursively, symbolic links followed except back up the tree, each file once under
/// its first path however many links reach it, hidden names skipped), sorted by path. Paths
/// are canonical so that `data` and `./data` name the same cache. An empty folder is an error.
pub(crate) fn list_files(path: &Path) -> Result<Vec<InputFile>> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!(
            "--data {}: no such file or folder; give a text file or a folder of .txt / .jsonl files",
            path.display()
        ),
        _ => anyhow::anyhow!("--data {}: cannot read ({e})", path.display()),
    })?;
    let root = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if !meta.is_dir() {
        return Ok(vec![input_file(utf8_named(path, root)?)?]);
    }
    // Every file path with its (device, inode); each folder with the canonical paths of the
    // folders above it, so that a link back up the tree is not followed into a loop. Which
    // folders are read does not depend on the order the file system lists them in.
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let mut stack = vec![(root.clone(), vec![root.clone()])];
    while let Some((dir, above)) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .with_context(|| format!("--data {}: cannot list the folder", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("--data {}: cannot list", dir.display()))?;
            let p = entry.path();
            if hidden(&p) {
                continue;
            }
            // `metadata` follows symbolic links; a broken link is ignored like other non-files.
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => {
                    let real = p.canonicalize().unwrap_or_else(|_| p.clone());
                    if !above.contains(&real) {
                        let mut path = above.clone();
                        path.push(real);
                        stack.push((p, path));
                    }
                }
                Ok(m) if m.is_file() && is_input(&p) => found.push((p, (m.dev(), m.ino()))),
                _ => {}
            }
        }
    }
    if found.is_empty() {
        bail!(
            "--data {}: the folder holds no .txt or .jsonl file (searched recursively)",
            path.display()
        );
    }
    // A file reached through several links is one document, read under its first path.
    found.sort();
    let mut files = std::collections::HashSet::new();
    found.retain(|(_, id)| files.insert(*id));
    let found = found
        .into_iter()
        .map(|(p, _)| utf8_named(path, p))
        .collect::<Result<Vec<_>>>()?;
    found.into_iter().map(input_file).collect()
}

/// `file`, if its name is UTF-8: the cache's manifest and `config.toml` store paths as text.
fn utf8_named(data: &Path, file: PathBuf) -> Result<PathBuf> {
    if file.to_str().is_none() {
        bail!(
            "--data {}: the name of {} is not UTF-8; rename it",
            data.display(),
            file.display()
        );
    }
    Ok(file)
}

/// Checks that `bytes` is text: UTF-8 without NUL bytes. Returns it as `&str` without a leading
/// byte-order mark (Windows editors write one; it is no part of the text), or why not.
fn as_text(bytes: &[u8]) -> std::result::Result<&str, String> {
    if let Some(i) = bytes.iter().position(|&b| b == 0) {
        return Err(format!("binary (a NUL byte at offset {i})"));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("not UTF-8 (an invalid byte at offset {})", e.valid_up_to()))?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

#[derive(serde::Deserialize)]
struct JsonLine {
    text: String,
}

/// The one-line error when no input gave any text: the first skip's reason (the warnings say
/// the rest), and what to give instead.
pub(crate) fn nothing_left(data: &str, warnings: &[String]) -> anyhow::Error {
    let first = warnings.first().map_or("the inputs hold no text", |w| {
        w.trim_end_matches(", skipped")
    });
    let more = match warnings.len() {
        0 | 1 => String::new(),
        n => format!(" (and {} more inputs skipped)", n - 1),
    };
    anyhow::anyhow!(
        "--data {data}: nothing left to train on: {first}{more}; give UTF-8 text: .txt files, \
         or .jsonl files whose lines are objects with a string field `text`"
    )
}

/// The documents of one file: the whole text of a `.txt` file, or the `text` field of each line
/// of a `.jsonl` file. Empty documents are dropped. Unreadable files are errors; binary and
/// non-UTF-8 files are [`Read::Skipped`] with the warning to show.
pub(crate) fn read_documents(path: &Path) -> Result<Read> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let text = match as_text(&bytes) {
        Ok(t) => t,
        Err(why) => return Ok(Read::Skipped(format!("{}: {why}, skipped", path.display()))),
    };
    if !is_jsonl(path) {
        let docs = if text.is_empty() {
            Vec::new()
        } else {
            vec![text.to_string()]
        };
        return Ok(Read::Docs(docs, Vec::new()));
    }
    let mut docs = Vec::new();
    let (mut bad, mut first_bad, mut lines) = (0usize, 0usize, 0usize);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        match serde_json::from_str::<JsonLine>(line) {
            Ok(l) if !l.text.is_empty() => docs.push(l.text),
            Ok(_) => {}
            Err(_) => {
                if bad == 0 {
                    first_bad = i + 1;
                }
                bad += 1;
            }
        }
    }
    let mut warnings = Vec::new();
    if bad > 0 {
        let w = format!(
            "{}: {bad} of {lines} lines are not JSON objects with a string field `text` \
             (the first is line {first_bad})",
            path.display()
        );
        if docs.is_empty() {
            return Ok(Read::Skipped(format!("{w}, skipped")));
        }
        warnings.push(format!("{w}, those lines skipped"));
    }
    Ok(Read::Docs(docs, warnings))
}
