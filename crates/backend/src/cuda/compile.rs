//! Compiling flint's CUDA C kernels with NVRTC, at first use, for the exact GPU architecture.
//!
//! The result (a cubin, which the driver loads without a JIT step and which, unlike PTX, runs on
//! any driver of the same CUDA major version) is cached on disk under a key made of the source,
//! the architecture and the NVRTC version, so only the first run on a machine pays the compile.

use super::libs::{self, Lib};
use super::raw;
use anyhow::{anyhow, bail, Context, Result};
use std::ffi::{c_char, c_void, CString};
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
    let nvrtc = Nvrtc::load()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the call writes two ints.
    nvrtc.check("nvrtcVersion", unsafe {
        (nvrtc.version)(&mut major, &mut minor)
    })?;
    Ok((major, minor))
}

/// NVRTC's entry points, with status codes as plain integers (see `raw`).
struct Nvrtc {
    version: unsafe extern "C" fn(*mut i32, *mut i32) -> i32,
    create: unsafe extern "C" fn(
        *mut *mut c_void,
        *const c_char,
        *const c_char,
        i32,
        *const *const c_char,
        *const *const c_char,
    ) -> i32,
    compile: unsafe extern "C" fn(*mut c_void, i32, *const *const c_char) -> i32,
    log_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> i32,
    log: unsafe extern "C" fn(*mut c_void, *mut c_char) -> i32,
    cubin_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> i32,
    cubin: unsafe extern "C" fn(*mut c_void, *mut c_char) -> i32,
    destroy: unsafe extern "C" fn(*mut *mut c_void) -> i32,
    error_string: unsafe extern "C" fn(i32) -> *const c_char,
}

impl Nvrtc {
    fn load() -> Result<Nvrtc> {
        require_nvrtc()?;
        // SAFETY: each type is the entry point's C signature in NVRTC 12 and 13.
        let bind = || unsafe {
            Ok::<_, String>(Nvrtc {
                version: raw::entry(Lib::Nvrtc, "nvrtcVersion")?,
                create: raw::entry(Lib::Nvrtc, "nvrtcCreateProgram")?,
                compile: raw::entry(Lib::Nvrtc, "nvrtcCompileProgram")?,
                log_size: raw::entry(Lib::Nvrtc, "nvrtcGetProgramLogSize")?,
                log: raw::entry(Lib::Nvrtc, "nvrtcGetProgramLog")?,
                cubin_size: raw::entry(Lib::Nvrtc, "nvrtcGetCUBINSize")?,
                cubin: raw::entry(Lib::Nvrtc, "nvrtcGetCUBIN")?,
                destroy: raw::entry(Lib::Nvrtc, "nvrtcDestroyProgram")?,
                error_string: raw::entry(Lib::Nvrtc, "nvrtcGetErrorString")?,
            })
        };
        bind().map_err(|e| {
            anyhow!(
                "NVRTC is not usable ({e}); fix: {}",
                Lib::Nvrtc.install_hint()
            )
        })
    }

    /// `Ok` for NVRTC_SUCCESS, else an error naming the call and NVRTC's name for `code`.
    fn check(&self, call: &str, code: i32) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString takes any code and returns a static string (or null).
        let name = unsafe { raw::c_str((self.error_string)(code)) };
        bail!(
            "{call} failed: {} ({code})",
            name.unwrap_or_else(|| "unknown NVRTC error".into())
        )
    }

    /// The program's compiler log (empty when NVRTC has none).
    ///
    /// SAFETY: `prog` must be a live program.
    unsafe fn program_log(&self, prog: *mut c_void) -> String {
        let mut size = 0usize;
        if (self.log_size)(prog, &mut size) != 0 || size == 0 || size > 1 << 30 {
            return String::new();
        }
        let mut log = vec![0u8; size];
        if (self.log)(prog, log.as_mut_ptr().cast()) != 0 {
            return String::new();
        }
        String::from_utf8_lossy(&log)
            .trim_end_matches('\0')
            .to_string()
    }

    /// The compiled program's cubin.
    ///
    /// SAFETY: `prog` must be a live, successfully compiled program.
    unsafe fn program_cubin(&self, prog: *mut c_void) -> Result<Vec<u8>> {
        let mut size = 0usize;
        self.check("nvrtcGetCUBINSize", (self.cubin_size)(prog, &mut size))?;
        if size > 1 << 30 {
            bail!("nvrtcGetCUBINSize reported {size} bytes: NVRTC is not working");
        }
        let mut cubin = vec![0u8; size];
        self.check(
            "nvrtcGetCUBIN",
            (self.cubin)(prog, cubin.as_mut_ptr().cast()),
        )?;
        Ok(cubin)
    }
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
    let nvrtc = Nvrtc::load()?;
    let csrc = CString::new(src).context("kernel source contains a NUL byte")?;
    let name = CString::new("flint_kernels.cu").expect("no NUL");
    let opts = options(arch).map(|o| CString::new(o).expect("no NUL"));
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog = std::ptr::null_mut();
    // SAFETY: the strings outlive the calls; no headers are passed.
    let created = unsafe {
        (nvrtc.create)(
            &mut prog,
            csrc.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    nvrtc.check("nvrtcCreateProgram", created)?;
    // SAFETY: `prog` was just created and is destroyed exactly once below.
    let compiled = unsafe { (nvrtc.compile)(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    let result = match nvrtc.check("nvrtcCompileProgram", compiled) {
        // SAFETY: as above.
        Ok(()) => unsafe { nvrtc.program_cubin(prog) },
        Err(e) => Err(anyhow!(
            "NVRTC failed to compile flint's kernels for sm_{}{} ({e}):\n{}",
            arch.0,
            arch.1,
            // SAFETY: as above.
            unsafe { nvrtc.program_log(prog) }
        )),
    };
    // SAFETY: as above. A failure to free the program is not worth losing the result for.
    unsafe { (nvrtc.destroy)(&mut prog) };
    result
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

/// `$FLINT_CACHE_DIR`, else `$XDG_CACHE_HOME/flint`, else `~/.cache/flint`, plus `kernels`. An
/// empty variable counts as unset (as the XDG specification says), not as the current folder.
fn cache_dir() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let base = var("FLINT_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("flint")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/flint")))?;
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
