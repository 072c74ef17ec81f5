//! Writing files safely: atomic writes (temporary file, fsync, rename), removing the
//! temporaries a killed writer leaves, and write errors that say the fix that fits.

use anyhow::{anyhow, Result};
use std::io::Write;
use std::path::Path;

/// The process that writes `name`, when it is one of [`write_atomic`]'s temporary files
/// (`.NAME.tmpPID.N`).
fn atomic_temporary_writer(name: &str) -> Option<u32> {
    let (head, n) = name.rsplit_once('.')?;
    let (file, pid) = head.rsplit_once(".tmp")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (name.starts_with('.') && file.len() > 1 && digits(n) && digits(pid))
        .then(|| pid.parse().ok())
        .flatten()
}

/// Removes the temporary files of [`write_atomic`] in `dir` whose writer is gone (a kill
/// mid-write leaves them; a token shard's can be hundreds of MB). A live writer's are kept: two
/// runs may share a folder such as the data cache. On a folder shared between machines the
/// writer may live elsewhere, so a file also has to be untouched for [`STALE`].
pub fn remove_dead_temporaries(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(pid) = atomic_temporary_writer(&name.to_string_lossy()) else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE));
        if !alive && stale && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// How long a temporary file must have been untouched to count as abandoned: far longer than
/// any single write takes.
pub const STALE: std::time::Duration = std::time::Duration::from_secs(600);

/// Writes `bytes` to a temporary file next to `path`, syncs it, and renames it over `path`:
/// readers see the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file path", path.display()))?;
    // Unique per process and per call: two threads may write the same file (two runs sharing
    // a data cache), and each must rename a whole file of its own.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp{}.{n}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable once the directory entry is.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        cannot_write(path, e)
    })
}

/// The error for a failed write of `path`, with the fix that fits the cause.
pub fn cannot_write(path: &Path, e: std::io::Error) -> anyhow::Error {
    let fix = match e.kind() {
        std::io::ErrorKind::NotFound => "create its folder first",
        std::io::ErrorKind::IsADirectory => "it is a folder: give a file path",
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            "fix the folder's permissions, or write elsewhere"
        }
        _ => "free space on its disk (or fix the folder's permissions)",
    };
    anyhow!(
        "{}: cannot write ({e}); {fix}, and run again",
        path.display()
    )
}
