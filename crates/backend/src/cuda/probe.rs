//! What this machine offers for CUDA, and what stands in the way: the facts `flint doctor`
//! prints and `--device auto` decides on. Probing never crashes: a missing, corrupt or wrong
//! library becomes a [`Problem`] with its cause and a fix.

use super::compile;
use super::libs::{self, Lib};
use cudarc::driver::{result as cu, sys};

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
    /// Peak SM clock, MHz.
    pub clock_mhz: i32,
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
        // cudarc panics on a library that lacks a symbol it binds; a wrong libcuda must be
        // reported, not crash doctor, so the driver calls run behind catch_unwind, silently.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let result = std::panic::catch_unwind(probe_driver);
        std::panic::set_hook(hook);
        match result {
            Ok(Ok((cuda, gpus))) => {
                p.driver_cuda = Some(cuda);
                p.gpus = gpus;
            }
            Ok(Err(problem)) => p.problems.push(problem),
            Err(panic) => p.problems.push(Problem {
                what: format!(
                    "the CUDA driver library {} is not one flint can use: {}",
                    found_path(Lib::Driver),
                    panic_message(&panic)
                ),
                fix: "reinstall the NVIDIA driver; make sure LD_LIBRARY_PATH does not point at a stub libcuda.so.1 (e.g. the toolkit's lib64/stubs)".into(),
                blocking: true,
            }),
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
                e.lines().next().unwrap_or_default()
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

fn found_path(lib: Lib) -> String {
    libs::found(lib)
        .map(|f| f.path.display().to_string())
        .unwrap_or_else(|| format!("{}.so", lib.name()))
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown error".into())
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
                Ok(format!("CUDA {}.{}", v / 1000, (v % 1000) / 10))
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

/// Problems with the libraries themselves; returns whether the driver library is usable.
fn library_problems(p: &mut GpuProbe) -> bool {
    let mut driver_ok = true;
    // A driver library that does not load keeps the others unloaded (they would open it): its
    // problem is the one to fix.
    let driver_broken = libs::found(Lib::Driver).is_some_and(|d| d.loaded.is_err());
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
                    format!("no NVIDIA driver on this machine (no /dev/nvidia0): {}", lib.install_hint())
                },
            ),
            _ if s.path.is_some() => (
                format!("{file} {err}"),
                format!(
                    "that file is damaged or not NVIDIA's: take its folder out of LD_LIBRARY_PATH or replace the file; {}",
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

/// Initialises the driver and lists the GPUs.
fn probe_driver() -> Result<((i32, i32), Vec<Gpu>), Problem> {
    let mut v = 0;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut v) };
    let cuda = (v / 1000, (v % 1000) / 10);
    if let Err(e) = cu::init() {
        let fix = match e.0 {
            sys::CUresult::CUDA_ERROR_NO_DEVICE => "no GPU is visible to this process: check `nvidia-smi`, and that CUDA_VISIBLE_DEVICES (if set) names existing GPUs",
            sys::CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH => "the kernel module and libcuda.so.1 belong to different driver versions: reboot after a driver update, or reinstall the driver",
            _ => "check `nvidia-smi`; if it fails too, reinstall the NVIDIA driver",
        };
        return Err(Problem {
            what: format!("the CUDA driver does not initialise: {e:?}"),
            fix: fix.into(),
            blocking: true,
        });
    }
    let count = cu::device::get_count().map_err(|e| Problem {
        what: format!("cannot count GPUs: {e:?}"),
        fix: "check `nvidia-smi`".into(),
        blocking: true,
    })?;
    let gpus = (0..count as usize).filter_map(|i| gpu(i).ok()).collect();
    Ok((cuda, gpus))
}

fn gpu(index: usize) -> Result<Gpu, cu::DriverError> {
    use sys::CUdevice_attribute as A;
    let dev = cu::device::get(index as i32)?;
    // SAFETY: `dev` came from cuDeviceGet.
    let attr = |a| unsafe { cu::device::get_attribute(dev, a) };
    let cc = (
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    // Free memory needs a context; the primary context is the one training will use.
    let memory_free = cudarc::driver::CudaContext::new(index)
        .and_then(|ctx| ctx.mem_get_info())
        .ok()
        .map(|(free, _)| free as u64);
    Ok(Gpu {
        index,
        name: cu::device::get_name(dev)?,
        compute_capability: cc,
        // SAFETY: as above.
        memory_total: unsafe { cu::device::total_mem(dev)? } as u64,
        memory_free,
        sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        clock_mhz: attr(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)? / 1000,
        kernels: Ok(()),
        unusable: None,
    })
}

/// The driver must support the CUDA major version of the libraries it runs.
fn driver_too_old(p: &mut GpuProbe) {
    let Some((driver_major, driver_minor)) = p.driver_cuda else {
        return;
    };
    for s in &p.libraries {
        let Some(major) = library_cuda_major(s) else {
            continue;
        };
        if major > driver_major {
            let needed = if major >= 13 { "580" } else { "525" };
            p.problems.push(Problem {
                what: format!(
                    "{} is CUDA {major}.x but the driver supports CUDA {driver_major}.{driver_minor} at most",
                    s.path.as_deref().unwrap_or(s.name)
                ),
                fix: format!(
                    "upgrade the NVIDIA driver to {needed} or newer, or use CUDA {driver_major} libraries (e.g. `pip install nvidia-cuda-nvrtc-cu{driver_major} nvidia-cublas-cu{driver_major}`) and put them first in LD_LIBRARY_PATH"
                ),
                blocking: true,
            });
        }
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
    for g in &mut p.gpus {
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
                let first = e.lines().next().unwrap_or_default().to_string();
                g.unusable = Some(format!(
                    "flint's kernels do not compile for {}: {first}",
                    g.arch()
                ));
                p.problems.push(Problem {
                    what: g.unusable.clone().expect("just set"),
                    fix: "use an NVRTC that knows this GPU (a newer nvidia-cuda-nvrtc wheel or toolkit); `flint doctor --json` has the whole compiler log (gpus[].kernels_error)".into(),
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
