//! `--device auto|cpu|cuda|cuda:N`: which backend a command runs on, and why.

use anyhow::{bail, Result};
use flint_backend::cuda::libs::{self, Lib};
use flint_backend::cuda::probe::{self, Gpu};
use flint_backend::Precision;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The first GPU when every check passes, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceRequest {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => DeviceRequest::Auto,
            "cpu" => DeviceRequest::Cpu,
            "cuda" => DeviceRequest::Cuda(0),
            // Digits only: `usize::from_str` would also take `cuda:+1`.
            _ => match s
                .strip_prefix("cuda:")
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .map(str::parse::<usize>)
            {
                Some(Ok(n)) => DeviceRequest::Cuda(n),
                _ => bail!("--device {s}: expected auto, cpu, cuda or cuda:N (N = 0, 1, ...)"),
            },
        })
    }
}

/// The device a command runs on.
#[derive(Clone, Debug)]
pub enum Device {
    Cpu,
    Cuda(Gpu),
}

impl Device {
    /// `cpu`, or `cuda:0 (NVIDIA H200, sm_90, 139 GiB)`, as printed after `Using device:`.
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(g) => format!(
                "cuda:{} ({}, {}, {} GiB)",
                g.index,
                g.name,
                g.arch(),
                (g.memory_total as f64 / (1u64 << 30) as f64).round()
            ),
        }
    }
}

/// The chosen device and, when `auto` fell back to the CPU, why.
#[derive(Clone, Debug)]
pub struct Selection {
    pub device: Device,
    pub fallback_reason: Option<String>,
}

/// Resolves a request: `cpu` touches no GPU library; `cuda:N` fails with the reason when that
/// GPU cannot train; `auto` falls back to the CPU and says why.
pub fn select(request: DeviceRequest) -> Result<Selection> {
    let cpu = |why: String| Selection {
        device: Device::Cpu,
        fallback_reason: Some(why),
    };
    let index = match request {
        DeviceRequest::Cpu => {
            return Ok(Selection {
                device: Device::Cpu,
                fallback_reason: None,
            })
        }
        DeviceRequest::Auto => 0,
        DeviceRequest::Cuda(n) => n,
    };
    // Without the driver there is nothing to probe (and no reason to map the big libraries).
    if request == DeviceRequest::Auto {
        match libs::found(Lib::Driver).map(|f| (&f.path, &f.loaded)) {
            None => return Ok(cpu("no NVIDIA driver (libcuda.so.1 not found)".into())),
            Some((path, Err(e))) => {
                return Ok(cpu(format!("{} does not load: {e}", path.display())))
            }
            Some((_, Ok(()))) => {}
        }
    }
    let probe = probe::probe();
    match probe.usable(index) {
        Ok(gpu) => Ok(Selection {
            device: Device::Cuda(gpu.clone()),
            fallback_reason: None,
        }),
        Err(why) if request == DeviceRequest::Auto => Ok(cpu(why)),
        Err(why) => bail!("--device cuda:{index}: {why} (`flint doctor` says how to fix it)"),
    }
}

/// `--precision` on `device`: `auto` is bf16 on a GPU that has it (sm_80+), else fp32; the CPU
/// computes in fp32 only; bf16 and tf32 need sm_80+.
pub fn precision(request: &str, device: &Device) -> Result<Precision> {
    let bf16 = matches!(device, Device::Cuda(g) if g.supports_bf16());
    if request == "auto" {
        return Ok(if bf16 {
            Precision::Bf16
        } else {
            Precision::Fp32
        });
    }
    let p = Precision::parse(request)?;
    match device {
        Device::Cpu if p != Precision::Fp32 => bail!(
            "--precision {request}: the CPU backend computes in fp32; use --precision fp32 (or auto), or --device cuda"
        ),
        Device::Cuda(g) if !bf16 && matches!(p, Precision::Bf16 | Precision::Tf32) => bail!(
            "--precision {request} needs a GPU with compute capability 8.0 or newer; cuda:{} ({}) is {}: use --precision fp16 or fp32",
            g.index,
            g.name,
            g.arch()
        ),
        _ => Ok(p),
    }
}

/// The backends a [`Device`] maps to, for [`on_backend!`].
pub mod backends {
    pub use flint_backend::cpu::Cpu;
    pub use flint_backend::cuda::Cuda;
    pub use flint_backend::Backend;
}

/// What `flint doctor` reports: the CPU, the CUDA probe, and the CUDA-vs-CPU parity rows.
pub mod diagnosis {
    pub use flint_backend::cpu::{cpu_info, CpuInfo};
    pub use flint_backend::cuda::probe::{nvrtc_trial, probe, GpuProbe, Problem};
    pub use flint_backend::parity::{table, ParityRow};

    /// Every CUDA kernel of GPU `index` against its CPU twin on inputs drawn from `seed`, then
    /// the fast paths' self-tests (which the bf16 cases set off).
    pub fn parity(index: usize, seed: u64) -> anyhow::Result<Vec<ParityRow>> {
        let cuda = super::backends::Cuda::new(index)?;
        let mut rows = flint_backend::parity::run(&super::backends::Cpu, &cuda, seed)?;
        rows.extend(cuda.self_test_rows());
        Ok(rows)
    }
}

/// Evaluates `$body` with `$b` bound to the backend of `$device` (a [`Device`]) computing in
/// `$precision`: commands are written once, generic over the backend, and this is the one
/// place that picks it.
#[macro_export]
macro_rules! on_backend {
    ($device:expr, $precision:expr, |$b:ident| $body:expr) => {
        match $device {
            $crate::device::Device::Cpu => {
                let $b = $crate::device::backends::Cpu;
                $crate::device::backends::Backend::set_precision(&$b, $precision)?;
                $body
            }
            $crate::device::Device::Cuda(gpu) => {
                let $b = $crate::device::backends::Cuda::new(gpu.index)?;
                $crate::device::backends::Backend::set_precision(&$b, $precision)?;
                $body
            }
        }
    };
}

/// The host memory available to a new allocation (Linux's `MemAvailable`), in bytes; `None`
/// where the system does not say.
pub fn host_memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
