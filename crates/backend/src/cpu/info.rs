//! The host CPU and OS, as `flint doctor` reports them.

/// What the CPU backend can use on this machine.
#[derive(Clone, Debug)]
pub struct CpuInfo {
    pub model: String,
    pub cores: usize,
    pub avx2: bool,
    pub avx512: bool,
    pub avx512_bf16: bool,
    /// e.g. `Debian GNU/Linux 12 (bookworm), Linux 6.1.0`.
    pub os: String,
}

pub fn cpu_info() -> CpuInfo {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    #[cfg(target_arch = "x86_64")]
    let (avx2, avx512, avx512_bf16) = (
        std::arch::is_x86_feature_detected!("avx2"),
        std::arch::is_x86_feature_detected!("avx512f"),
        std::arch::is_x86_feature_detected!("avx512bf16"),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let (avx2, avx512, avx512_bf16) = (false, false, false);
    CpuInfo {
        model,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        avx2,
        avx512,
        avx512_bf16,
        os: os_name(),
    }
}

fn os_name() -> String {
    let distro = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| format!("{} {}", std::env::consts::OS, k.trim()))
        .unwrap_or_else(|_| std::env::consts::OS.to_string());
    match distro {
        Some(d) => format!("{d}, {kernel}"),
        None => kernel,
    }
}
