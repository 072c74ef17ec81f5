//! Compiling flint's CUDA C kernels with NVRTC, at first use, for the exact GPU architecture.
//!
//! The result (a cubin, which the driver loads without a JIT step and which, unlike PTX, runs on
//! any driver of the same CUDA major version) is cached on disk under a key made of the source,
//! the architecture and the NVRTC version, so only the first run on a machine pays the compile.

use super::libs::{self, Lib};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::nvrtc::{result as nvrtc, sys};
use std::ffi::CString;
use std::path::PathBuf;

/// Every kernel file, in the order they are concatenated into one translation unit (the shared
/// helpers first). One folder, one list: a kernel that is not listed here is not compiled.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("layernorm.cu", include_str!("kernels/layernorm.cu")),
    ("attention.cu", include_str!("kernels/attention.cu")),
    ("flash.cu", include_str!("kernels/flash.cu")),
    ("embedding.cu", include_str!("kernels/embedding.cu")),
    ("loss.cu", include_str!("kernels/loss.cu")),
    ("optim.cu", include_str!("kernels/optim.cu")),
];

/// The whole kernel source, as NVRTC compiles it.
pub fn source() -> String {
    let mut src = String::new();
    for (name, text) in SOURCES {
        src.push_str(&format!("// ---- {name}\n{text}\n"));
    }
    src
}

/// NVRTC's version, e.g. `(12, 8)`. Fails when NVRTC was not found or did not load.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded; the call writes two ints.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| anyhow!("nvrtcVersion failed: {e:?}"))?;
    Ok((major, minor))
}

fn require_nvrtc() -> Result<()> {
    match libs::found(Lib::Nvrtc) {
        Some(f) => f.loaded.clone().map_err(|e| {
            anyhow!(
                "NVRTC at {} does not load: {e}; fix: {}",
                f.path.display(),
                Lib::Nvrtc.install_hint()
            )
        }),
        _ => bail!(
            "NVRTC (libnvrtc.so.12 or .13) not found; fix: {}",
            Lib::Nvrtc.install_hint()
        ),
    }
}

/// NVRTC's options for `arch` (part of the cache key).
fn options(arch: (i32, i32)) -> [String; 5] {
    [
        format!("--gpu-architecture=sm_{}{}", arch.0, arch.1),
        "--std=c++17".to_string(),
        // NVRTC's defaults already keep denormals and IEEE division and square root, which the
        // fp32 parity with the CPU twin relies on; say so explicitly so a change is deliberate.
        "--ftz=false".to_string(),
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
    ]
}

/// Compiles `src` to a cubin for compute capability `arch` (e.g. `(9, 0)`); the error carries
/// NVRTC's log.
pub fn compile(src: &str, arch: (i32, i32)) -> Result<Vec<u8>> {
    require_nvrtc()?;
    let csrc = CString::new(src).context("kernel source contains a NUL byte")?;
    let name = CString::new("flint_kernels.cu").expect("no NUL");
    let prog = nvrtc::create_program(&csrc, Some(&name))
        .map_err(|e| anyhow!("nvrtcCreateProgram: {e:?}"))?;
    let opts = options(arch);
    // SAFETY: `prog` was just created and is destroyed exactly once below.
    let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
    let result = match compiled {
        Ok(()) => get_cubin(prog),
        Err(e) => {
            // SAFETY: as above.
            let log = unsafe { nvrtc::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> = l.iter().map(|&c| c as u8).collect();
                    String::from_utf8_lossy(&bytes)
                        .trim_end_matches('\0')
                        .to_string()
                })
                .unwrap_or_default();
            Err(anyhow!(
                "NVRTC failed to compile flint's kernels for sm_{}{} ({e:?}):\n{log}",
                arch.0,
                arch.1
            ))
        }
    };
    // SAFETY: as above.
    unsafe { nvrtc::destroy_program(prog) }.map_err(|e| anyhow!("nvrtcDestroyProgram: {e:?}"))?;
    result
}

fn get_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    // SAFETY: `prog` compiled successfully; the buffer is sized from NVRTC's answer.
    unsafe {
        sys::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .map_err(|e| anyhow!("nvrtcGetCUBINSize: {e:?}"))?;
        let mut cubin = vec![0u8; size];
        sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
            .result()
            .map_err(|e| anyhow!("nvrtcGetCUBIN: {e:?}"))?;
        Ok(cubin)
    }
}

/// flint's kernels for `arch`, from the disk cache or freshly compiled (and then cached).
pub fn kernels_cubin(arch: (i32, i32)) -> Result<Vec<u8>> {
    let src = source();
    let version = nvrtc_version()?;
    let key = fnv1a(format!("{src}\0{:?}\0nvrtc {version:?}", options(arch)).as_bytes());
    let path =
        cache_dir().map(|d| d.join(format!("kernels-sm{}{}-{key:016x}.cubin", arch.0, arch.1)));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            return Ok(bytes);
        }
    }
    let cubin = compile(&src, arch)?;
    if let Some(p) = &path {
        // A cache that cannot be written only costs a compile next time.
        let _ = write_atomic(p, &cubin);
    }
    Ok(cubin)
}

/// `$FLINT_CACHE_DIR`, else `$XDG_CACHE_HOME/flint`, else `~/.cache/flint`, plus `kernels`.
fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("FLINT_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("flint")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/flint")))?;
    Some(base.join("kernels"))
}

fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("cache files live in a folder");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// FNV-1a: a cache key that is stable across builds and Rust versions, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
