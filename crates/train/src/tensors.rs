//! Tensors in and out of safetensors files, with errors that name the file and the tensor.

use anyhow::{anyhow, bail, Context, Result};
use flint_model::layout::Layout;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
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

impl TensorFile {
    /// Every tensor of `layout`, read from `key(name)`, as one flat buffer in the layout's
    /// order. Every name and shape is checked before anything of the layout's size is
    /// allocated: a missing tensor or another shape is the error `mismatch(key, shape found,
    /// shape wanted)` gives.
    pub fn read_layout(
        &self,
        layout: &Layout,
        key: impl Fn(&str) -> String,
        mismatch: impl Fn(&str, Option<&[usize]>, &[usize]) -> anyhow::Error,
    ) -> Result<Vec<f32>> {
        for e in layout.entries() {
            let k = key(&e.name);
            match self.shape(&k) {
                Some(shape) if shape == e.shape => {}
                found => return Err(mismatch(&k, found.as_deref(), &e.shape)),
            }
        }
        let mut out = vec![0.0; layout.total()];
        for e in layout.entries() {
            let values = self.f32_checked(&key(&e.name), &e.shape)?;
            out[e.offset..e.offset + e.numel()].copy_from_slice(&values);
        }
        Ok(out)
    }
}

/// The tensors of `layout` in the flat buffer `data`, under the layout's names, to save.
pub fn named<'a>(layout: &Layout, data: &'a [f32]) -> Vec<Named<'a>> {
    layout
        .entries()
        .iter()
        .map(|e| Named {
            name: e.name.clone(),
            shape: e.shape.clone(),
            data: &data[e.offset..e.offset + e.numel()],
        })
        .collect()
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
    crate::files::write_atomic(path, &out)
}
