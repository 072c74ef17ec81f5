//! Finding and loading the CUDA libraries at run time.
//!
//! flint is built without CUDA; on a GPU machine it uses whatever the user already has: the
//! driver's `libcuda.so.1`, and NVRTC, cuBLASLt and NCCL from a CUDA toolkit, a conda
//! environment or the `nvidia-*` wheels pip installed with PyTorch. cudarc opens libraries by
//! their soname through the system loader, which knows none of the pip or conda folders, so we
//! search those folders ourselves and open what we find by its full path first: the loader then
//! hands cudarc the same, already loaded library when it asks for the soname. cudarc asks for
//! the unversioned names first, though, which the loader may resolve to other files:
//! [`cudarc_binding`] finds those out.

use super::isolate;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One CUDA library flint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lib {
    Driver,
    Nvrtc,
    CublasLt,
    Nccl,
}

impl Lib {
    pub const ALL: [Lib; 4] = [Lib::Driver, Lib::Nvrtc, Lib::CublasLt, Lib::Nccl];

    pub fn name(self) -> &'static str {
        match self {
            Lib::Driver => "libcuda",
            Lib::Nvrtc => "libnvrtc",
            Lib::CublasLt => "libcublasLt",
            Lib::Nccl => "libnccl",
        }
    }

    /// File names to look for, newest CUDA first (flint supports CUDA 12.x and 13.x).
    pub fn sonames(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &["libcuda.so.1"],
            Lib::Nvrtc => &["libnvrtc.so.13", "libnvrtc.so.12"],
            Lib::CublasLt => &["libcublasLt.so.13", "libcublasLt.so.12"],
            Lib::Nccl => &["libnccl.so.2"],
        }
    }

    /// The entry points flint calls, beyond the version query doctor makes itself. cudarc binds
    /// each on first use and panics when one is missing, so a library that lacks one (a wrong
    /// file under the right name, a stub) is refused when it is loaded instead. The probe binds
    /// the driver's entry points itself (see `driver`) and reports a missing one.
    fn symbols(self) -> &'static [&'static str] {
        match self {
            Lib::Driver | Lib::Nccl => &[],
            Lib::Nvrtc => &[
                "nvrtcVersion",
                "nvrtcCreateProgram",
                "nvrtcCompileProgram",
                "nvrtcGetProgramLogSize",
                "nvrtcGetProgramLog",
                "nvrtcGetCUBINSize",
                "nvrtcGetCUBIN",
                "nvrtcDestroyProgram",
                "nvrtcGetErrorString",
            ],
            Lib::CublasLt => &[
                "cublasLtCreate",
                "cublasLtDestroy",
                "cublasLtMatmul",
                "cublasLtMatmulAlgoGetHeuristic",
                "cublasLtMatmulDescCreate",
                "cublasLtMatmulDescDestroy",
                "cublasLtMatmulDescSetAttribute",
                "cublasLtMatmulPreferenceCreate",
                "cublasLtMatmulPreferenceDestroy",
                "cublasLtMatmulPreferenceSetAttribute",
                "cublasLtMatrixLayoutCreate",
                "cublasLtMatrixLayoutDestroy",
                "cublasLtMatrixLayoutSetAttribute",
            ],
        }
    }

    /// Folders of a Python environment's `site-packages` where NVIDIA's wheels put it
    /// (`nvidia-*-cu12` wheels use one folder per library, the CUDA 13 wheels share `cu13`).
    fn wheel_dirs(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &[],
            Lib::Nvrtc => &["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"],
            Lib::CublasLt => &["nvidia/cu13/lib", "nvidia/cublas/lib"],
            Lib::Nccl => &["nvidia/nccl/lib"],
        }
    }

    /// What a user runs to get it.
    pub fn install_hint(self) -> &'static str {
        match self {
            Lib::Driver => "install the NVIDIA driver (e.g. `sudo apt install nvidia-driver-580`, or your distribution's package), then reboot",
            Lib::Nvrtc => "`pip install nvidia-cuda-nvrtc-cu12` (or nvidia-cuda-nvrtc for CUDA 13), or add your CUDA toolkit's lib64 folder to LD_LIBRARY_PATH",
            Lib::CublasLt => "`pip install nvidia-cublas-cu12` (or nvidia-cublas for CUDA 13), or add your CUDA toolkit's lib64 folder to LD_LIBRARY_PATH",
            Lib::Nccl => "`pip install nvidia-nccl-cu12` (only needed for multi-GPU training)",
        }
    }
}

/// Where a library was found and whether it loaded.
#[derive(Clone, Debug)]
pub struct Found {
    pub lib: Lib,
    /// The file, or the bare soname when only the system loader knew where it is.
    pub path: PathBuf,
    /// `Err` holds the loader's message: a wrong architecture, a truncated file, a missing
    /// dependency. Such a library is reported, never used.
    pub loaded: Result<(), String>,
    /// Files earlier in the search that did not load (with the loader's message), passed over
    /// for this one.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The search result for every library.
pub fn libraries() -> Vec<(Lib, Option<&'static Found>)> {
    Lib::ALL.iter().map(|&lib| (lib, found(lib))).collect()
}

/// Where `lib` was found (loaded or not), searched once per process and only when first asked
/// for: a CPU run never maps the GPU libraries, and loading one library twice from different
/// folders would mix versions.
pub fn found(lib: Lib) -> Option<&'static Found> {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    static FOUND: [OnceLock<Option<Found>>; 4] = [const { OnceLock::new() }; 4];
    let slot = Lib::ALL
        .iter()
        .position(|&l| l == lib)
        .expect("every Lib is in ALL");
    FOUND[slot]
        .get_or_init(|| find(lib, DIRS.get_or_init(search_dirs)))
        .as_ref()
}

/// The library when it was found and loaded.
pub fn loaded(lib: Lib) -> Option<&'static Found> {
    found(lib).filter(|f| f.loaded.is_ok())
}

fn find(lib: Lib, dirs: &[PathBuf]) -> Option<Found> {
    // cuBLASLt, NVRTC and NCCL open libcuda.so.1 themselves as they load, and a truncated one
    // kills the process inside the loader: with a broken driver library, they are not loaded.
    let broken_driver = match lib {
        Lib::Driver => None,
        _ => found(Lib::Driver).filter(|d| d.loaded.is_err()),
    };
    let open = |path: &Path| match broken_driver {
        Some(d) => Err(format!(
            "not loaded, as it would open the broken driver library {}",
            d.path.display()
        )),
        None => open(lib, path),
    };
    // A library built for a newer CUDA than the driver supports cannot run: while one the
    // driver can run exists anywhere in the search (a machine may hold both the cu12 and the
    // cu13 wheels), it comes first.
    let driver_major = match lib {
        Lib::Nvrtc | Lib::CublasLt => loaded(Lib::Driver)
            .and_then(|d| driver_cuda_version(&d.path).ok())
            .map(|v| v / 1000),
        _ => None,
    };
    let runs = |soname: &str| match (driver_major, soname.rsplit('.').next()) {
        (Some(d), Some(major)) => major.parse::<i32>().is_ok_and(|m| m <= d),
        _ => true,
    };
    // The first candidate file that loads wins, in search order; the broken ones before it are
    // passed over (and reported), so a damaged copy in one environment does not hide a good one
    // in another.
    let mut skipped: Vec<(PathBuf, String)> = Vec::new();
    // One folder may be on the list under two names (`/lib` and `/usr/lib` on a merged /usr).
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    for only_runnable in [true, false] {
        for dir in dirs {
            for &soname in lib.sonames() {
                let path = dir.join(soname);
                let tried = skipped
                    .iter()
                    .any(|(p, _)| canonical(p) == canonical(&path));
                if (runs(soname) || !only_runnable) && !tried && path.exists() {
                    match open(&path) {
                        Ok(()) => {
                            return Some(Found {
                                lib,
                                path,
                                loaded: Ok(()),
                                skipped,
                            })
                        }
                        Err(e) => skipped.push((path, e)),
                    }
                }
            }
        }
    }
    // Then the loader's own paths (/etc/ld.so.cache, the default folders); the file it picked
    // is read back from the process's memory map. Not for a name refused above: the loader
    // would find that same file through LD_LIBRARY_PATH, and map a truncated one (SIGBUS).
    for soname in lib.sonames() {
        if skipped
            .iter()
            .any(|(p, _)| p.file_name() == Some(soname.as_ref()))
        {
            continue;
        }
        match open(Path::new(soname)) {
            Ok(()) => {
                return Some(Found {
                    lib,
                    path: mapped_path(&format!("{}.so", lib.name()))
                        .unwrap_or_else(|| PathBuf::from(soname)),
                    loaded: Ok(()),
                    skipped,
                })
            }
            Err(e) if !e.contains("No such file or directory") => {
                skipped.push((PathBuf::from(soname), e))
            }
            Err(_) => {}
        }
    }
    // Nothing loads: the first broken file is the one reported, since it is what the user's
    // setup points at.
    if skipped.is_empty() {
        return None;
    }
    let (path, e) = skipped.remove(0);
    Some(Found {
        lib,
        path,
        loaded: Err(e),
        skipped,
    })
}

/// A file cudarc would open for a library in place of the one flint found and checked.
pub struct OtherFile {
    /// The name cudarc asked the loader for (`libcublasLt.so`).
    pub name: String,
    pub path: PathBuf,
}

/// The file cudarc would open for `lib` when that is another file than the one flint found,
/// checked and reports (`Ok(None)` when they are one file, or for a library flint binds
/// itself). cudarc asks the loader for its own list of names, the unversioned `libcuda.so` and
/// `libcublasLt.so` first, before the sonames flint loaded; under such a name the loader may
/// find another copy (a toolkit's `lib64`, or its `lib64/stubs`, on LD_LIBRARY_PATH or in
/// /etc/ld.so.cache). `Err` when opening it crashes, or it lacks an entry point flint calls
/// (cudarc would panic on the call).
pub fn cudarc_binding(lib: Lib) -> Result<Option<OtherFile>, String> {
    let Some(found) = loaded(lib) else {
        return Ok(None);
    };
    let (stems, symbols): (&[&str], &[&str]) = match lib {
        Lib::Driver => (&["cuda", "nvcuda"], &["cuInit"]),
        Lib::CublasLt => (&["cublasLt"], lib.symbols()),
        Lib::Nvrtc | Lib::Nccl => return Ok(None),
    };
    let names: Vec<String> = stems
        .iter()
        .flat_map(|stem| cudarc::get_lib_name_candidates(stem))
        .collect();
    // As cudarc's `culib` does: the first name that opens. Opening runs the file's initialisers,
    // so first in a child.
    // SAFETY: loading a library NVIDIA ships under a CUDA name, as cudarc would.
    let first = || {
        names.iter().find_map(|name| {
            unsafe { libloading::Library::new(name) }
                .ok()
                .map(|library| (name, library))
        })
    };
    isolate::survives(&format!("the {} cudarc opens", lib.name()), || {
        let _ = first();
    })?;
    // The soname flint loaded is on cudarc's list, so some name opens.
    let Some((name, library)) = first() else {
        return Ok(None);
    };
    let mut address = None;
    for symbol in symbols {
        // SAFETY: only the symbol's address is read; nothing is called.
        match unsafe { library.get::<*const ()>(symbol.as_bytes()) } {
            Ok(a) => address = address.or(Some(*a)),
            Err(e) => {
                return Err(format!(
                    "as {name} has no {symbol} ({})",
                    loader_message(&e)
                ))
            }
        }
    }
    let file = address
        .and_then(file_of)
        .ok_or_else(|| format!("as {name}: its file is unknown (dladdr)"))?;
    Ok((!same_file(&file, &found.path)).then(|| OtherFile {
        name: name.clone(),
        path: file,
    }))
}

/// Whether two driver libraries are one release: their files' real names
/// (`libcuda.so.580.65.06`) agree, whatever the links to them. The user-space driver must match
/// the kernel module exactly, so another release does not run even where its CUDA version is
/// the same.
pub fn same_release(a: &Path, b: &Path) -> bool {
    let real = |p: &Path| {
        p.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_owned()))
    };
    real(a).is_some() && real(a) == real(b)
}

/// The file the code at `address` was loaded from.
fn file_of(address: *const ()) -> Option<PathBuf> {
    // SAFETY: dladdr only reads the loader's tables; `dli_fname` points into them.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(address.cast(), &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr(info.dli_fname);
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
    }
}

/// Whether two paths name one file (links followed): the loader maps a file once. Only two
/// files that both exist can be told apart (a bare soname, when `/proc` could not say where
/// the loader found it, counts as the same).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => true,
    }
}

/// The file a loaded library whose name starts with `stem` (`libcuda.so`) was mapped from, from
/// `/proc/self/maps`.
fn mapped_path(stem: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(stem))
        })
        .map(PathBuf::from)
}

/// Opens a library for the life of the process (RTLD_GLOBAL, so that later opens by soname
/// resolve to it), if it is whole, loads without crashing, and has the entry points flint calls.
fn open(lib: Lib, path: &Path) -> Result<(), String> {
    if path.parent().is_some_and(|d| !d.as_os_str().is_empty()) {
        check_elf(path)?;
    }
    isolate::survives(&path.display().to_string(), || {
        let _ = load(lib, path);
    })?;
    load(lib, path)
}

/// [`open`]'s loading, run first in a child and then, when that survived, in this process.
fn load(lib: Lib, path: &Path) -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading a shared library runs its initialisers; NVIDIA's libraries are meant to be
    // loaded this way, and a file that is not a valid library is refused by the loader.
    let library = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| loader_message(&e))?;
    for symbol in lib.symbols() {
        // SAFETY: only the symbol's presence is checked; nothing is called.
        if let Err(e) = unsafe { library.get::<*const ()>(symbol.as_bytes()) } {
            return Err(format!(
                "is not a usable {} (no {symbol}: {})",
                lib.name(),
                loader_message(&e)
            ));
        }
    }
    // The toolkit's link-time stub loads like the driver but does nothing: refused (and
    // unloaded), so the search goes on to the real one.
    if lib == Lib::Driver {
        if let Err(e) = driver_cuda_version(path) {
            if e.contains("stub") {
                return Err(e);
            }
        }
    }
    std::mem::forget(library);
    Ok(())
}

/// This CPU's ELF `e_machine` (EM_X86_64, EM_AARCH64), where flint knows it.
const MACHINE: Option<u16> = if cfg!(target_arch = "x86_64") {
    Some(62)
} else if cfg!(target_arch = "aarch64") {
    Some(183)
} else {
    None
};

/// Checks that the file is built for this CPU and holds every segment its ELF header says the
/// loader maps: the loader maps a truncated library (a partial download, a full disk) anyway,
/// and the process dies with SIGBUS on the first touch of the missing pages. Files that are not
/// 64-bit little-endian ELF are left to the loader, which refuses them with its own message.
fn check_elf(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    let read = |offset: u64, n: usize| -> Option<Vec<u8>> {
        let mut buf = vec![0; n];
        file.read_exact_at(&mut buf, offset).ok().map(|()| buf)
    };
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let Some(header) = read(0, 64) else {
        return Ok(());
    };
    if header[..4] != *b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Ok(());
    }
    // The loader says "No such file or directory" for a library built for another CPU.
    let machine = u16_at(&header, 18);
    if MACHINE.is_some_and(|m| m != machine) {
        return Err(format!(
            "is built for another CPU (ELF machine {machine}; this one is {}): install the {} build",
            std::env::consts::ARCH,
            std::env::consts::ARCH
        ));
    }
    let (table, entry, count) = (
        u64_at(&header, 32),
        u16_at(&header, 54),
        u16_at(&header, 56),
    );
    // Only the standard 56-byte program headers, and not PN_XNUM (the count kept elsewhere):
    // anything else is left to the loader.
    const PHDR: u16 = 56;
    const PN_XNUM: u16 = 0xffff;
    if entry != PHDR || count == PN_XNUM {
        return Ok(());
    }
    let truncated = |needed: u64| {
        format!("truncated: the file has {len} bytes, its ELF header needs {needed} (reinstall it)")
    };
    let size = PHDR as u64 * count as u64;
    let table_end = table.saturating_add(size);
    if table_end > len {
        return Err(truncated(table_end));
    }
    let headers = read(table, size as usize).ok_or_else(|| truncated(table_end))?;
    for h in headers.chunks_exact(PHDR as usize) {
        const PT_LOAD: u32 = 1;
        let kind = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
        let end = u64_at(h, 8).saturating_add(u64_at(h, 32));
        if kind == PT_LOAD && end > len {
            return Err(truncated(end));
        }
    }
    Ok(())
}

/// What the toolkit's link-only `lib64/stubs/libcuda.so` returns from every call.
pub const STUB_LIBRARY: i32 = 34;

/// The CUDA version the driver library at `path` supports, as `cuDriverGetVersion` gives it
/// (12040 for 12.4); an error names a missing entry point (a wrong or stub library).
pub fn driver_cuda_version(path: &Path) -> Result<i32, String> {
    use libloading::os::unix::{Library, RTLD_NOW};
    // SAFETY: the library is loaded already (this takes a reference); cuDriverGetVersion takes
    // one out-pointer in every CUDA, and needs no cuInit.
    unsafe {
        let l = Library::open(Some(path), RTLD_NOW).map_err(|e| loader_message(&e))?;
        let f = l
            .get::<unsafe extern "C" fn(*mut i32) -> i32>(b"cuDriverGetVersion")
            .map_err(|e| format!("cuDriverGetVersion: {}", loader_message(&e)))?;
        let mut v = 0;
        match f(&mut v) {
            0 => Ok(v),
            STUB_LIBRARY => Err(format!(
                "a stub: cuDriverGetVersion failed with CUDA_ERROR_STUB_LIBRARY ({STUB_LIBRARY})"
            )),
            code => Err(format!("cuDriverGetVersion failed ({code})")),
        }
    }
}

/// libloading's own message is just "dlopen failed"; the loader's reason is its source.
pub fn loader_message(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(reason) => reason.to_string(),
        None => e.to_string(),
    }
}

/// Folders to search, in order: what the user set, then toolkits, conda, and every Python
/// environment's NVIDIA wheels we can see.
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = std::env::var_os(var) {
            dirs.push(PathBuf::from(root).join("lib64"));
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut env_roots: Vec<PathBuf> = Vec::new();
    for var in ["CONDA_PREFIX", "VIRTUAL_ENV"] {
        if let Some(root) = std::env::var_os(var) {
            env_roots.push(root.into());
        }
    }
    // Every environment whose `bin` is on PATH: the python3 a user runs is usually one of them
    // (e.g. /opt/torch/.venv/bin), activated or not.
    if let Some(paths) = std::env::var_os("PATH") {
        env_roots.extend(
            std::env::split_paths(&paths)
                .filter(|p| p.ends_with("bin") && p.join("python3").exists())
                .filter_map(|p| p.parent().map(Path::to_path_buf)),
        );
    }
    env_roots.extend(glob_dirs(Path::new("/usr/local"), "cuda"));
    for base in ["/opt/conda", "/opt/miniconda3", "/opt/anaconda3"] {
        env_roots.push(base.into());
        env_roots.extend(glob_dirs(&Path::new(base).join("envs"), ""));
    }
    if let Some(home) = &home {
        for base in [
            "miniconda3",
            "anaconda3",
            "miniforge3",
            "mambaforge",
            ".venv",
            "venv",
        ] {
            env_roots.push(home.join(base));
            env_roots.extend(glob_dirs(&home.join(base).join("envs"), ""));
        }
        env_roots.extend(glob_dirs(&home.join(".pyenv/versions"), ""));
        env_roots.push(home.join(".local"));
    }
    env_roots.push("/usr/local".into());
    env_roots.push("/usr".into());
    // Per environment, in the order above: its own lib folders, then the NVIDIA wheels in its
    // lib/python3.X/{site,dist}-packages (so the active venv's wheels come before a system
    // toolkit); Debian's python3 last.
    for root in &env_roots {
        dirs.push(root.join("lib64"));
        dirs.push(root.join("lib"));
        for py in glob_dirs(&root.join("lib"), "python3") {
            dirs.extend(wheel_dirs(&py.join("site-packages")));
            dirs.extend(wheel_dirs(&py.join("dist-packages")));
        }
    }
    dirs.extend(wheel_dirs(Path::new("/usr/lib/python3/dist-packages")));
    // The loader's own folders, where the driver's libcuda.so.1 lives (WSL's, Debian's
    // multiarch folders, RHEL's lib64): found here, it is checked like any other file before it
    // is opened, rather than opened blind by its soname. WSL's first: where it exists, a
    // libcuda.so.1 in the multiarch folder is a Linux driver's that cannot run there.
    for dir in [
        "/usr/lib/wsl/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/lib64",
    ] {
        dirs.push(dir.into());
    }
    dirs.retain(|d| d.is_dir());
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// Where NVIDIA's wheels put the libraries inside one `site-packages` folder.
fn wheel_dirs(site_packages: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    Lib::ALL
        .iter()
        .flat_map(|lib| lib.wheel_dirs())
        .map(move |w| site_packages.join(w))
}

/// Sub-folders of `dir` whose names start with `prefix`: the exact name first (`/usr/local/cuda`
/// is the toolkit the user selected), then newest version first (`cuda-13.0` before `cuda-12.4`).
fn glob_dirs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort_by_key(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        (
            name.as_deref() != Some(prefix),
            std::cmp::Reverse(p.clone()),
        )
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C library this test process runs with: a real, complete ELF shared library.
    fn libc_path() -> PathBuf {
        mapped_path("libc.so").expect("libc is mapped")
    }

    #[test]
    fn a_truncated_library_is_refused_before_the_loader_maps_it() {
        let libc = libc_path();
        assert_eq!(check_elf(&libc), Ok(()));
        let dir = std::env::temp_dir().join(format!("flint-libs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cut = dir.join("libcuda.so.1");
        let bytes = std::fs::read(&libc).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = open(Lib::Driver, &cut).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        // Whole, but for another CPU (the loader would say "No such file or directory").
        let mut other = bytes.clone();
        if let Some(m) = MACHINE {
            other[18..20].copy_from_slice(&(m ^ 1).to_le_bytes());
            std::fs::write(&cut, &other).unwrap();
            let err = open(Lib::Driver, &cut).unwrap_err();
            assert!(err.contains("another CPU"), "{err}");
        }
        // Not ELF at all: left to the loader, which refuses it with its reason.
        std::fs::write(&cut, b"not a library").unwrap();
        assert_eq!(check_elf(&cut), Ok(()));
        assert!(open(Lib::Driver, &cut).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Headers a broken or hostile file may carry: nothing allocates their sizes or overflows.
    #[test]
    fn malformed_elf_headers_neither_panic_nor_allocate_their_sizes() {
        let dir = std::env::temp_dir().join(format!("flint-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("libnvrtc.so.12");
        let header = |table: u64, entry: u16, count: u16| {
            let mut h = vec![0u8; 64];
            h[..6].copy_from_slice(b"\x7fELF\x02\x01");
            h[18..20].copy_from_slice(&MACHINE.unwrap_or(0).to_le_bytes());
            h[32..40].copy_from_slice(&table.to_le_bytes());
            h[54..56].copy_from_slice(&entry.to_le_bytes());
            h[56..58].copy_from_slice(&count.to_le_bytes());
            h
        };
        // A 4 GiB table of unusual entries: left to the loader.
        std::fs::write(&file, header(64, 0xffff, 0xfffe)).unwrap();
        assert_eq!(check_elf(&file), Ok(()));
        // A table past the end, at an offset that would overflow when its size is added.
        std::fs::write(&file, header(u64::MAX - 8, 56, 2)).unwrap();
        assert!(check_elf(&file).unwrap_err().contains("truncated"));
        std::fs::write(&file, header(64, 56, 1)).unwrap();
        assert!(check_elf(&file).unwrap_err().contains("truncated"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_library_without_the_entry_points_flint_calls_is_refused() {
        let err = open(Lib::Nvrtc, &libc_path()).unwrap_err();
        assert!(
            err.contains("not a usable libnvrtc") && err.contains("nvrtcVersion"),
            "{err}"
        );
        let err = open(Lib::CublasLt, &libc_path()).unwrap_err();
        assert!(err.contains("cublasLtCreate"), "{err}");
    }
}
