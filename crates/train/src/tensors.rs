//! Tensors in and out of safetensors files, with errors that name the file and the tensor.

use anyhow::{anyhow, bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A safetensors file read into memory and checked once.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow!(
                "{}: not a valid safetensors file ({e}); save it with safetensors.torch.save_file",
                path.display()
            )
        })?;
        Ok(TensorFile {
            path: path.to_path_buf(),
            bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("checked in open()")
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.st().names().into_iter().map(String::from).collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.st().tensor(name).ok().map(|t| t.shape().to_vec())
    }

    /// The `__metadata__` strings of the file.
    pub fn metadata(&self) -> HashMap<String, String> {
        SafeTensors::read_metadata(&self.bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .unwrap_or_default()
    }

    fn missing(&self, name: &str) -> anyhow::Error {
        anyhow!(
            "{}: no tensor `{name}` (the file has: {})",
            self.path.display(),
            abbreviate(&self.names())
        )
    }

    /// Tensor `name` as f32 (from f32, f64, f16 or bf16) with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        let d = t.data();
        let values: Vec<f32> = match t.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => bail!(
                "{}: tensor `{name}` is {other:?}; expected a float tensor (F32, F64, F16 or BF16)",
                self.path.display()
            ),
        };
        Ok((t.shape().to_vec(), values))
    }

    /// Tensor `name` as i32 (from i32 or i64, e.g. token ids) with its shape.
    pub fn i32(&self, name: &str) -> Result<(Vec<usize>, Vec<i32>)> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        let d = t.data();
        let values = match t.dtype() {
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as i32)
                .collect(),
            other => bail!(
                "{}: tensor `{name}` is {other:?}; expected an integer tensor (I32 or I64)",
                self.path.display()
            ),
        };
        Ok((t.shape().to_vec(), values))
    }

    /// Tensor `name` as f32, checked to be finite and to have `shape`.
    pub fn f32_checked(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (got, values) = self.f32(name)?;
        self.check_shape(name, &got, shape)?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: tensor `{name}` holds {} at flat index {i}; inputs must be finite",
                self.path.display(),
                values[i]
            );
        }
        Ok(values)
    }

    /// Tensor `name` as a boolean mask (from BOOL or U8, nonzero = true), checked to have `shape`.
    pub fn mask(&self, name: &str, shape: &[usize]) -> Result<Vec<bool>> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        if !matches!(t.dtype(), Dtype::BOOL | Dtype::U8) {
            bail!(
                "{}: tensor `{name}` is {:?}; expected a bool or uint8 mask",
                self.path.display(),
                t.dtype()
            );
        }
        self.check_shape(name, t.shape(), shape)?;
        Ok(t.data().iter().map(|&b| b != 0).collect())
    }

    pub fn check_shape(&self, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got != want {
            bail!(
                "{}: tensor `{name}` has shape {}, expected {}",
                self.path.display(),
                flint_model::layout::shape_str(got),
                flint_model::layout::shape_str(want)
            );
        }
        Ok(())
    }
}

fn abbreviate(names: &[String]) -> String {
    if names.len() <= 6 {
        names.join(", ")
    } else {
        format!("{}, … ({} tensors)", names[..6].join(", "), names.len())
    }
}

/// A named f32 tensor to save.
pub struct Named<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

/// Writes f32 tensors to `path` as safetensors, atomically.
pub fn save_f32(path: &Path, tensors: &[Named], metadata: HashMap<String, String>) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            Ok((
                t.name.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, t.shape.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = (!metadata.is_empty()).then_some(metadata);
    let out = safetensors::serialize(views, meta)?;
    write_atomic(path, &out)
}

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
