//! What this machine offers for CUDA, and what stands in the way: the facts `flint doctor`
//! prints and `--device auto` decides on. Probing never crashes: a missing, corrupt or wrong
//! library becomes a [`Problem`] with its cause and a fix.

use super::compile;
use super::driver::{self, Driver, DriverError};
use super::libs::{self, Lib};

/// A CUDA library: where it is and which version, or why not.
#[derive(Clone, Debug)]
pub struct LibraryStatus {
    pub name: &'static str,
    pub path: Option<String>,
    pub version: Option<String>,
    /// Why it is unusable (not found, does not load, wrong symbols); `None` when fine.
    pub error: Option<String>,
}

/// One GPU as the driver reports it.
#[derive(Clone, Debug)]
pub struct Gpu {
    pub index: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_total: u64,
    pub memory_free: Option<u64>,
    pub sm_count: i32,
    /// Peak SM clock, MHz (`None` when the driver does not say).
    pub clock_mhz: Option<i32>,
    /// Result of compiling flint's kernels for this GPU's architecture.
    pub kernels: Result<(), String>,
    /// Why flint cannot train on it; `None` when it can.
    pub unusable: Option<String>,
}

impl Gpu {
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
    pub fn supports_bf16(&self) -> bool {
        self.compute_capability.0 >= 8
    }
}

/// Something wrong, why, and what to do about it.
#[derive(Clone, Debug)]
pub struct Problem {
    pub what: String,
    pub fix: String,
    /// A blocking problem keeps flint off the GPU; the others are worth knowing.
    pub blocking: bool,
}

#[derive(Clone, Debug, Default)]
pub struct GpuProbe {
    /// The kernel module's version, e.g. `580.65.06`.
    pub driver_version: Option<String>,
    /// The newest CUDA the driver supports, e.g. `(13, 0)`.
    pub driver_cuda: Option<(i32, i32)>,
    pub libraries: Vec<LibraryStatus>,
    pub gpus: Vec<Gpu>,
    /// Trial compile when there is no GPU to compile for (a build machine): sm_80.
    pub nvrtc_trial: Option<Result<(), String>>,
    pub problems: Vec<Problem>,
}

impl GpuProbe {
    /// The GPU flint would train on for `cuda:index`, or why not.
    pub fn usable(&self, index: usize) -> Result<&Gpu, String> {
        if let Some(p) = self.problems.iter().find(|p| p.blocking) {
            return Err(p.what.clone());
        }
        // By the driver's index: a GPU whose properties could not be read is missing from
        // `gpus`, and must not shift the others.
        match self.gpus.iter().find(|g| g.index == index) {
            None if self.gpus.is_empty() => Err("no NVIDIA GPU found".into()),
            None => Err(format!(
                "cuda:{index} does not exist or cannot be queried: this machine has {}",
                self.gpus
                    .iter()
                    .map(|g| format!("cuda:{}", g.index))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some(g) => match &g.unusable {
                Some(why) => Err(why.clone()),
                None => Ok(g),
            },
        }
    }
}

/// Probes the driver, the libraries and every GPU.
pub fn probe() -> GpuProbe {
    let mut p = GpuProbe {
        driver_version: kernel_module_version(),
        ..GpuProbe::default()
    };
    for (lib, found) in libs::libraries() {
        p.libraries.push(library_status(lib, found));
    }
    let driver_ok = library_problems(&mut p);
    if driver_ok {
        // Before the driver is initialised: the check forks.
        cudarc_problems(&mut p);
        // Known even when the driver then fails to start, for `driver_too_old`.
        p.driver_cuda = libs::loaded(Lib::Driver)
            .and_then(|d| libs::driver_cuda_version(&d.path).ok())
            .map(cuda_version);
        match probe_driver() {
            Ok((gpus, problems)) => {
                p.gpus = gpus;
                p.problems.extend(problems);
            }
            Err(problem) => p.problems.push(problem),
        }
    }
    driver_too_old(&mut p);
    check_gpus(&mut p);
    p
}

/// On a machine without the driver (a build machine), compiles flint's kernels for sm_80 to
/// show that the NVRTC found works; a failure is a problem with its fix. Not with a driver that
/// shows no GPU: NVRTC opens `libcuda.so.1` itself, and a broken or stub one can crash it.
pub fn nvrtc_trial(p: &mut GpuProbe) {
    if !p.gpus.is_empty() || libs::found(Lib::Driver).is_some() {
        return;
    }
    if libs::loaded(Lib::Nvrtc).is_none() {
        return;
    }
    let trial = compile::kernels_cubin((8, 0))
        .map(|_| ())
        .map_err(|e| format!("{e:#}"));
    if let Err(e) = &trial {
        p.problems.push(Problem {
            what: format!(
                "NVRTC ({}) cannot compile flint's kernels: {}",
                found_path(Lib::Nvrtc),
                compile_summary(e)
            ),
            fix: format!(
                "install a complete NVRTC (it needs its libnvrtc-builtins next to it): {}",
                Lib::Nvrtc.install_hint()
            ),
            blocking: false,
        });
    }
    p.nvrtc_trial = Some(trial);
}

/// A failed compile in one line: NVRTC's verdict, then the first line of its log (which says
/// what it refused).
fn compile_summary(error: &str) -> String {
    let lines: Vec<&str> = error
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(2)
        .collect();
    lines.join(" ")
}

fn found_path(lib: Lib) -> String {
    libs::found(lib)
        .map(|f| f.path.display().to_string())
        .unwrap_or_else(|| format!("{}.so", lib.name()))
}

fn library_status(lib: Lib, found: Option<&libs::Found>) -> LibraryStatus {
    let mut s = LibraryStatus {
        name: lib.name(),
        path: found.map(|f| f.path.display().to_string()),
        version: None,
        error: None,
    };
    match found.map(|f| &f.loaded) {
        None => s.error = Some("not found".into()),
        // The loader's message starts with the path, which the report shows beside it.
        Some(Err(e)) => {
            let path = format!("{}: ", found.expect("found").path.display());
            s.error = Some(format!("does not load: {}", e.replace(&path, "")))
        }
        Some(Ok(())) => match library_version(lib, found.expect("found")) {
            Ok(v) => s.version = Some(v),
            Err(e) => s.error = Some(e),
        },
    }
    s
}

/// Asks the library itself for its version, through its own entry point; a library without
/// that entry point is the wrong library.
fn library_version(lib: Lib, found: &libs::Found) -> Result<String, String> {
    use libloading::os::unix::{Library, RTLD_NOW};
    // SAFETY: the library is already loaded (this only takes a reference); the version entry
    // points take no arguments but out-pointers and have these C signatures in every CUDA 12/13.
    unsafe {
        let l = Library::open(Some(&found.path), RTLD_NOW).map_err(|e| libs::loader_message(&e))?;
        let missing = |sym: &str, e: libloading::Error| {
            format!(
                "is not a usable {} ({sym}: {})",
                lib.name(),
                libs::loader_message(&e)
            )
        };
        match lib {
            Lib::Driver => {
                let v = libs::driver_cuda_version(&found.path)
                    .map_err(|e| format!("is not a usable {} ({e})", lib.name()))?;
                let (major, minor) = cuda_version(v);
                Ok(format!("CUDA {major}.{minor}"))
            }
            Lib::Nvrtc => {
                let f = l
                    .get::<unsafe extern "C" fn(*mut i32, *mut i32) -> i32>(b"nvrtcVersion")
                    .map_err(|e| missing("nvrtcVersion", e))?;
                let (mut a, mut b) = (0, 0);
                f(&mut a, &mut b);
                Ok(format!("{a}.{b}"))
            }
            Lib::CublasLt => {
                let f = l
                    .get::<unsafe extern "C" fn() -> usize>(b"cublasLtGetVersion")
                    .map_err(|e| missing("cublasLtGetVersion", e))?;
                let v = f();
                Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
            }
            Lib::Nccl => {
                let f = l
                    .get::<unsafe extern "C" fn(*mut i32) -> i32>(b"ncclGetVersion")
                    .map_err(|e| missing("ncclGetVersion", e))?;
                let mut v = 0;
                f(&mut v);
                Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
            }
        }
    }
}

/// Where cudarc, which flint calls the driver and cuBLASLt through, would open another file than
/// the one flint checked and lists (see [`libs::cudarc_binding`]). Blocking when that file does
/// not open or lacks an entry point, when it is another driver release (or a stub), or a
/// cuBLASLt the driver cannot run: the checks were not of what would run. A copy of the same
/// driver release is no problem, and another cuBLASLt the driver runs is worth knowing.
fn cudarc_problems(p: &mut GpuProbe) {
    let driver_major = libs::loaded(Lib::Driver)
        .and_then(|d| libs::driver_cuda_version(&d.path).ok())
        .map(|v| cuda_version(v).0);
    for lib in [Lib::Driver, Lib::CublasLt] {
        let checked = found_path(lib);
        let (what, blocking) = match libs::cudarc_binding(lib) {
            Ok(None) => continue,
            Err(e) => (
                format!(
                    "the {} that cudarc (which flint calls it through) opens {e}",
                    lib.name()
                ),
                true,
            ),
            Ok(Some(other)) => {
                let found = libs::Found {
                    lib,
                    path: other.path.clone(),
                    loaded: Ok(()),
                    skipped: Vec::new(),
                };
                let version = library_version(lib, &found);
                let blocking = match (lib, &version) {
                    (_, Err(_)) => true,
                    (Lib::Driver, Ok(_)) if libs::same_release(&other.path, checked.as_ref()) => {
                        continue
                    }
                    (Lib::Driver, Ok(_)) => true,
                    (_, Ok(v)) => {
                        let major = v.split('.').next().and_then(|m| m.parse::<i32>().ok());
                        !matches!((major, driver_major), (Some(m), Some(d)) if (12..=d).contains(&m))
                    }
                };
                let version = version.unwrap_or_else(|e| e);
                (
                    format!(
                        "cudarc, which flint calls {} through, would open {} ({version}) instead of {checked}, the file checked here: it asks the loader for {} first, and that name is this other file",
                        lib.name(),
                        other.path.display(),
                        other.name,
                    ),
                    blocking,
                )
            }
        };
        p.problems.push(Problem {
            what,
            fix: format!(
                "make {0}.so name {checked}: put a link to it first on the loader's path (`mkdir -p ~/.flint-libs && ln -sf {checked} ~/.flint-libs/{0}.so && export LD_LIBRARY_PATH=~/.flint-libs${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}`), or take the other file's folder out of LD_LIBRARY_PATH",
                lib.name()
            ),
            blocking,
        });
    }
}

/// Problems with the libraries themselves; returns whether the driver library is usable.
fn library_problems(p: &mut GpuProbe) -> bool {
    let mut driver_ok = true;
    // A driver library that does not load keeps the others unloaded (they would open it): its
    // problem is the one to fix.
    let driver_broken = libs::found(Lib::Driver).is_some_and(|d| d.loaded.is_err());
    // Broken copies passed over for one that loads are worth knowing, not blocking.
    for (lib, found) in libs::libraries() {
        let loaded = found.filter(|f| f.loaded.is_ok());
        for (path, err) in loaded.map_or(&[][..], |f| &f.skipped[..]) {
            let file = path.display().to_string();
            let err = err.replace(&format!("{file}: "), "");
            p.problems.push(Problem {
                what: format!(
                    "{file} does not load ({err}); flint uses {} instead",
                    found_path(lib)
                ),
                fix: format!(
                    "that file is damaged or not NVIDIA's: {}",
                    remove_hint(&file)
                ),
                blocking: false,
            });
        }
    }
    for s in &p.libraries {
        let Some(err) = &s.error else { continue };
        let lib = Lib::ALL
            .into_iter()
            .find(|l| l.name() == s.name)
            .expect("known");
        if driver_broken && lib != Lib::Driver {
            continue;
        }
        let file = s.path.clone().unwrap_or_else(|| lib.sonames().join(" or "));
        let (what, fix) = match lib {
            Lib::Driver if s.path.is_none() => (
                "libcuda.so.1 (the NVIDIA driver's CUDA library) not found".to_string(),
                if std::path::Path::new("/dev/nvidia0").exists() {
                    "a GPU device node exists but not its driver library: in a container, start it with `--gpus all` (NVIDIA Container Toolkit); otherwise reinstall the NVIDIA driver".to_string()
                } else {
                    format!(
                        "no NVIDIA driver on this machine (no /dev/nvidia0): {}",
                        lib.install_hint()
                    )
                },
            ),
            Lib::Driver if err.contains("stub") || file.contains("/stubs/") => {
                (format!("{file} {err}"), STUB_FIX.to_string())
            }
            _ if s.path.is_some() => (
                format!("{file} {err}"),
                format!(
                    "that file is damaged or not NVIDIA's: {}; {}",
                    remove_hint(&file),
                    lib.install_hint()
                ),
            ),
            _ => (format!("{file} {err}"), lib.install_hint().to_string()),
        };
        // NCCL only matters for several GPUs; the others are needed to train at all.
        let blocking = lib != Lib::Nccl;
        if lib == Lib::Driver {
            driver_ok = false;
        }
        p.problems.push(Problem {
            what,
            fix,
            blocking,
        });
    }
    driver_ok
}

/// How to get a bad library file out of the way: its folder is in LD_LIBRARY_PATH, or it
/// belongs to whatever installed it there (a wheel, a conda package, a toolkit).
fn remove_hint(file: &str) -> String {
    let dir = std::path::Path::new(file)
        .parent()
        .filter(|d| !d.as_os_str().is_empty());
    let Some(folder) = dir else {
        return "the system loader found it (/etc/ld.so.cache): remove or replace that file, then run `sudo ldconfig`".into();
    };
    let in_ld_path = std::env::var_os("LD_LIBRARY_PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| Some(p.as_path()) == dir));
    if in_ld_path {
        "take its folder out of LD_LIBRARY_PATH or replace the file".into()
    } else {
        format!(
            "reinstall the package that put it in {} (or delete the file)",
            folder.display()
        )
    }
}

/// Initialises the driver and lists the GPUs, with a problem for each that cannot be opened.
type DriverFacts = (Vec<Gpu>, Vec<Problem>);

fn probe_driver() -> Result<DriverFacts, Problem> {
    let unusable = |e: String| Problem {
        what: format!(
            "the CUDA driver library {} is not one flint can use ({e})",
            found_path(Lib::Driver)
        ),
        fix: format!("reinstall the NVIDIA driver; {STUB_FIX}"),
        blocking: true,
    };
    let v = libs::loaded(Lib::Driver)
        .ok_or_else(|| "it did not load".to_string())
        .and_then(|d| libs::driver_cuda_version(&d.path))
        .map_err(unusable)?;
    // A driver older than CUDA 12 lacks entry points flint binds (and cannot run its
    // libraries): its version alone decides, and `driver_too_old` says what to do.
    if v < 12000 {
        return Ok((Vec::new(), Vec::new()));
    }
    let driver = Driver::load().map_err(unusable)?;
    let failed = |e: DriverError| {
        let fix = match e.code {
            driver::NO_DEVICE => "no GPU is visible to this process: check `nvidia-smi`, and that CUDA_VISIBLE_DEVICES (if set) names existing GPUs".to_string(),
            driver::SYSTEM_DRIVER_MISMATCH => "the kernel module and libcuda.so.1 belong to different driver versions: reboot after a driver update, or reinstall the driver".to_string(),
            driver::STUB_LIBRARY => STUB_FIX.to_string(),
            _ => "check `nvidia-smi`; if it fails too, reinstall the NVIDIA driver".to_string(),
        };
        Problem {
            what: format!(
                "the CUDA driver ({}) does not work: {e}",
                found_path(Lib::Driver)
            ),
            fix,
            blocking: true,
        }
    };
    driver.init().map_err(failed)?;
    let count = driver.device_count().map_err(failed)?;
    let mut problems = Vec::new();
    // A GPU whose properties cannot be read is left out of the list, with the reason.
    let gpus = (0..count)
        .filter_map(|i| {
            gpu(&driver, i, &mut problems)
                .map_err(|e| {
                    problems.push(Problem {
                        what: format!("cannot read the properties of cuda:{i}: {e}"),
                        fix: "check `nvidia-smi`; choose another GPU with --device cuda:N, or train on the CPU with --device cpu".into(),
                        blocking: false,
                    })
                })
                .ok()
        })
        .collect();
    Ok((gpus, problems))
}

/// `(major, minor)` of a CUDA version as the driver gives it (`13000` is 13.0).
fn cuda_version(v: i32) -> (i32, i32) {
    (v / 1000, (v % 1000) / 10)
}

/// What to do about a stub `libcuda.so.1`.
const STUB_FIX: &str = "make sure LD_LIBRARY_PATH does not point at the CUDA toolkit's stub libcuda.so.1 (lib64/stubs, which only serves linking); the real one comes with the NVIDIA driver";

fn gpu(driver: &Driver, index: usize, problems: &mut Vec<Problem>) -> Result<Gpu, DriverError> {
    let d = driver.device(index)?;
    // A GPU whose context cannot be opened (exclusive to another process, out of memory) is
    // listed, but unusable, with the reason.
    let (memory_free, unusable) = match driver.free_memory(d.handle) {
        Ok(free) => (Some(free), None),
        Err(e) => {
            let problem = context_failure(index, &e);
            let what = problem.what.clone();
            problems.push(problem);
            (None, Some(what))
        }
    };
    Ok(Gpu {
        index,
        name: d.name,
        compute_capability: d.compute_capability,
        memory_total: d.memory_total,
        memory_free,
        sm_count: d.sm_count,
        clock_mhz: (d.clock_khz > 0).then_some(d.clock_khz / 1000),
        kernels: match unusable {
            Some(_) => Err("not compiled: the GPU cannot be opened".into()),
            None => Ok(()),
        },
        unusable,
    })
}

/// Why `cuda:index` cannot be used when its context does not open, and the fix.
fn context_failure(index: usize, e: &DriverError) -> Problem {
    let fix = match e.code {
        driver::DEVICE_UNAVAILABLE => "another process holds it in exclusive-process mode: `nvidia-smi` shows the compute mode and the processes; stop that process, choose another GPU with --device cuda:N, or set the compute mode to Default (`sudo nvidia-smi -c 0`)",
        driver::OUT_OF_MEMORY => "its memory is full: `nvidia-smi` lists the processes using it; stop them or choose another GPU with --device cuda:N",
        _ => "check `nvidia-smi`; choose another GPU with --device cuda:N, or train on the CPU with --device cpu",
    };
    Problem {
        what: format!("cannot open cuda:{index}: {e}"),
        fix: fix.into(),
        blocking: false,
    }
}

/// The driver must support CUDA 12 or newer, and the CUDA major version of the libraries.
fn driver_too_old(p: &mut GpuProbe) {
    let Some((driver_major, driver_minor)) = p.driver_cuda else {
        return;
    };
    let driver = format!("the driver supports CUDA {driver_major}.{driver_minor} at most");
    if driver_major < 12 {
        p.problems.push(Problem {
            what: format!("{driver}, and flint needs CUDA 12 or 13"),
            fix: "upgrade the NVIDIA driver to 525 or newer (580 or newer for CUDA 13)".into(),
            blocking: true,
        });
        return;
    }
    for s in &p.libraries {
        let Some(major) = library_cuda_major(s) else {
            continue;
        };
        if major > driver_major {
            let needed = if major >= 13 { "580" } else { "525" };
            let older = match cuda_wheels(driver_major) {
                Some(wheels) => format!(", or use CUDA {driver_major} libraries ({wheels}) and put their folders first in LD_LIBRARY_PATH"),
                None => String::new(),
            };
            p.problems.push(Problem {
                what: format!(
                    "{} is CUDA {major}.x but {driver}",
                    s.path.as_deref().unwrap_or(s.name)
                ),
                fix: format!("upgrade the NVIDIA driver to {needed} or newer{older}"),
                blocking: true,
            });
        }
    }
}

/// The pip command that installs NVRTC and cuBLASLt for CUDA `major`: NVIDIA's CUDA 13 wheels
/// dropped the `-cuXX` suffix (the `-cu13` names are empty placeholders).
fn cuda_wheels(major: i32) -> Option<&'static str> {
    match major {
        12 => Some("`pip install nvidia-cuda-nvrtc-cu12 nvidia-cublas-cu12`"),
        13 => Some("`pip install nvidia-cuda-nvrtc nvidia-cublas`"),
        _ => None,
    }
}

/// The CUDA major version of NVRTC or cuBLASLt, from their own version numbers.
fn library_cuda_major(s: &LibraryStatus) -> Option<i32> {
    if s.name != Lib::Nvrtc.name() && s.name != Lib::CublasLt.name() {
        return None;
    }
    s.version.as_ref()?.split('.').next()?.parse().ok()
}

/// Per GPU: too old, kernels do not compile, memory taken by others.
fn check_gpus(p: &mut GpuProbe) {
    const MIN_CC: (i32, i32) = (7, 0);
    let compiler_ok = !p.problems.iter().any(|x| x.blocking);
    let nvrtc_major = p.libraries.iter().find_map(|s| {
        (s.name == Lib::Nvrtc.name())
            .then(|| library_cuda_major(s))
            .flatten()
    });
    for g in &mut p.gpus {
        if g.unusable.is_some() {
            continue; // its context does not open: reported where it was found
        }
        if g.compute_capability < MIN_CC {
            g.unusable = Some(format!(
                "cuda:{} ({}, {}) is older than flint's kernels support (sm_70)",
                g.index,
                g.name,
                g.arch()
            ));
            g.kernels = Err("not compiled: GPU too old".into());
            p.problems.push(Problem {
                what: g.unusable.clone().expect("just set"),
                fix: "train on the CPU (`--device cpu`) or on a Volta (V100) or newer GPU".into(),
                blocking: false,
            });
            continue;
        }
        if compiler_ok {
            g.kernels = compile::kernels_cubin(g.compute_capability)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"));
            if let Err(e) = &g.kernels {
                g.unusable = Some(format!(
                    "flint's kernels do not compile for {}: {}",
                    g.arch(),
                    compile_summary(e)
                ));
                let fix = if g.compute_capability < (7, 5) && nvrtc_major >= Some(13) {
                    format!(
                        "CUDA 13 no longer compiles for {} (Volta and older): use CUDA 12's NVRTC and cuBLASLt ({}) and put their folders first in LD_LIBRARY_PATH",
                        g.arch(),
                        cuda_wheels(12).expect("CUDA 12 has wheels")
                    )
                } else {
                    "use an NVRTC that knows this GPU (a newer nvidia-cuda-nvrtc wheel or toolkit)"
                        .into()
                };
                p.problems.push(Problem {
                    what: g.unusable.clone().expect("just set"),
                    fix: format!("{fix}; `flint doctor --json` has the whole compiler log (gpus[].kernels_error)"),
                    blocking: false,
                });
            }
        }
        if let Some(free) = g.memory_free {
            let used = g.memory_total.saturating_sub(free);
            if used * 10 > g.memory_total {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                p.problems.push(Problem {
                    what: format!(
                        "cuda:{}: {:.1} GiB of {:.1} GiB is already in use by other processes",
                        g.index,
                        gib(used),
                        gib(g.memory_total)
                    ),
                    fix: "`nvidia-smi` lists the processes; stop them, or choose another GPU with --device cuda:N".into(),
                    blocking: false,
                });
            }
        }
    }
}

/// The NVIDIA kernel module's version, from sysfs or procfs.
fn kernel_module_version() -> Option<String> {
    if let Ok(v) = std::fs::read_to_string("/sys/module/nvidia/version") {
        return Some(v.trim().to_string());
    }
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 ..."
    text.lines()
        .next()?
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        .map(str::to_string)
}
