//! `flint doctor`: what this machine can train on, what is wrong, and how to fix it.

use anyhow::Result;
use flint_train::device::diagnosis::{
    cpu_info, nvrtc_trial, probe, table, CpuInfo, GpuProbe, ParityRow, Problem,
};
use flint_train::device::{Device, DeviceRequest};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text (fields in README.md).
    #[arg(long)]
    json: bool,
    /// Also run every CUDA kernel against its CPU twin on fresh random inputs (fp32, and the
    /// matrix products in tf32, bf16 and fp16) and print the table; fails without a GPU.
    #[arg(long)]
    parity: bool,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Prints the report; returns whether the requested device (default `auto`: any) can train.
pub fn run(a: Args, device: Option<&str>) -> Result<bool> {
    let request = DeviceRequest::parse(device.unwrap_or("auto"))?;
    let cpu = cpu_info();
    let mut gpus = probe();
    nvrtc_trial(&mut gpus);
    // The device `--device` would get, decided from the same probe the report shows.
    let chosen: Result<Device, String> = match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto => Ok(gpus
            .usable(0)
            .map_or(Device::Cpu, |g| Device::Cuda(g.clone()))),
        DeviceRequest::Cuda(n) => gpus.usable(n).map(|g| Device::Cuda(g.clone())),
    };
    // A request no probe problem explains (a GPU index this machine lacks, no GPU at all) is a
    // problem of its own, so the report says how to fix it too.
    if let Err(why) = &chosen {
        if !gpus.problems.iter().any(|p| &p.what == why) {
            let fix = if gpus.gpus.is_empty() {
                "train on the CPU with --device cpu, or on a machine with an NVIDIA GPU"
            } else {
                "choose a GPU listed above with --device cuda:N (CUDA_VISIBLE_DEVICES numbers the GPUs a process sees from 0)"
            };
            // Not blocking: it keeps this request, not flint, off the GPU.
            gpus.problems.push(Problem {
                what: why.clone(),
                fix: fix.into(),
                blocking: false,
            });
        }
    }
    let reason = match (&chosen, request) {
        (Ok(Device::Cpu), DeviceRequest::Auto) => gpus.usable(0).err(),
        (Ok(Device::Cpu), _) => Some("--device cpu".to_string()),
        (Err(why), _) => Some(why.clone()),
        _ => None,
    };
    let parity = a.parity.then(|| parity(&chosen));
    if a.json {
        let mut report = report_json(&cpu, &gpus, &chosen, reason.as_deref());
        if let Some(p) = &parity {
            report["parity"] = parity_json(p);
        }
        println!("{report}");
    } else {
        print_text(&cpu, &gpus, &chosen, reason.as_deref());
        if let Some(p) = &parity {
            print_parity(p);
        }
    }
    Ok(match &parity {
        Some(p) => p.as_ref().is_ok_and(|p| p.rows.iter().all(|r| r.passed)),
        None => chosen.is_ok(),
    })
}

/// The outcome of `--parity`.
struct Parity {
    seed: u64,
    rows: Vec<ParityRow>,
}

/// Every CUDA kernel against its CPU twin on the chosen GPU, or why it could not run.
fn parity(chosen: &Result<Device, String>) -> Result<Parity, String> {
    let Ok(Device::Cuda(gpu)) = chosen else {
        return Err("no usable GPU".into());
    };
    // Fresh inputs every run: the kernels must compute the same function on any valid input.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let rows =
        flint_train::device::diagnosis::parity(gpu.index, seed).map_err(|e| format!("{e:#}"))?;
    Ok(Parity { seed, rows })
}

fn print_parity(p: &Result<Parity, String>) {
    match p {
        Err(why) => println!("parity: not run, {why}"),
        Ok(p) => {
            print!("{}", table(&p.rows));
            let failed = p.rows.iter().filter(|r| !r.passed).count();
            println!(
                "parity (seed {}): {} of {} outputs within threshold, {failed} failed",
                p.seed,
                p.rows.len() - failed,
                p.rows.len()
            );
        }
    }
}

fn parity_json(p: &Result<Parity, String>) -> Value {
    match p {
        Err(why) => json!({ "ran": false, "error": why }),
        Ok(p) => json!({
            "ran": true,
            "seed": p.seed,
            "passed": p.rows.iter().all(|r| r.passed),
            "rows": p.rows.iter().map(|r| json!({
                "kernel": r.kernel,
                "dtype": r.dtype,
                // JSON has no infinity: a failed call's error is null.
                "max_rel_err": r.max_rel_err.is_finite().then_some(r.max_rel_err),
                "threshold": r.threshold,
                "passed": r.passed,
            })).collect::<Vec<_>>(),
        }),
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn print_text(cpu: &CpuInfo, p: &GpuProbe, chosen: &Result<Device, String>, reason: Option<&str>) {
    println!("System");
    println!("  OS:   {}", cpu.os);
    println!(
        "  CPU:  {} ({} cores; AVX2 {}, AVX-512 {}, AVX512-BF16 {})",
        cpu.model,
        cpu.cores,
        yes(cpu.avx2),
        yes(cpu.avx512),
        yes(cpu.avx512_bf16)
    );
    println!("NVIDIA driver");
    match (&p.driver_version, p.driver_cuda) {
        (None, None) => println!("  not found"),
        (v, cuda) => println!(
            "  {} (supports CUDA {})",
            v.as_deref().unwrap_or("version unknown"),
            cuda.map_or("?".to_string(), |(a, b)| format!("{a}.{b}"))
        ),
    }
    println!("GPUs");
    if p.gpus.is_empty() {
        println!("  none");
    }
    for g in &p.gpus {
        println!(
            "  cuda:{}  {}  {}  {:.1} GiB total, {} free, {} SMs, {} MHz  kernels: {}",
            g.index,
            g.name,
            g.arch(),
            g.memory_total as f64 / GIB,
            g.memory_free
                .map_or("?".to_string(), |f| format!("{:.1} GiB", f as f64 / GIB)),
            g.sm_count,
            g.clock_mhz.map_or("?".to_string(), |c| c.to_string()),
            match &g.kernels {
                Ok(()) => "compiled".to_string(),
                Err(e) => format!("FAILED ({})", e.lines().next().unwrap_or_default()),
            }
        );
    }
    println!("CUDA libraries");
    for l in &p.libraries {
        let status = match (&l.version, &l.error) {
            (_, Some(e)) => e.clone(),
            (Some(v), None) => v.clone(),
            (None, None) => "found".into(),
        };
        let line = format!(
            "  {:<12} {:<24} {}",
            l.name,
            status,
            l.path.as_deref().unwrap_or("")
        );
        println!("{}", line.trim_end());
    }
    if let Some(trial) = &p.nvrtc_trial {
        match trial {
            Ok(()) => println!("  kernels compile for sm_80 (trial, no GPU here)"),
            Err(e) => println!("  kernels do NOT compile for sm_80: {e}"),
        }
    }
    if !p.problems.is_empty() {
        println!("Problems");
        for x in &p.problems {
            println!("  - {}", x.what);
            println!("    fix: {}", x.fix);
        }
    }
    match chosen {
        Ok(d) => {
            println!("Using device: {}", d.describe());
            if let Some(why) = reason {
                println!("  because: {why}");
            }
        }
        Err(why) => println!("Cannot use the requested device: {why}"),
    }
}

fn report_json(
    cpu: &CpuInfo,
    p: &GpuProbe,
    chosen: &Result<Device, String>,
    reason: Option<&str>,
) -> Value {
    json!({
        "device": chosen.as_ref().ok().map(Device::describe),
        "device_reason": reason,
        "os": cpu.os,
        "cpu": {
            "model": cpu.model,
            "cores": cpu.cores,
            "avx2": cpu.avx2,
            "avx512": cpu.avx512,
            "avx512_bf16": cpu.avx512_bf16,
        },
        "driver": {
            "version": p.driver_version,
            "cuda": p.driver_cuda.map(|(a, b)| format!("{a}.{b}")),
        },
        "gpus": p.gpus.iter().map(|g| json!({
            "index": g.index,
            "name": g.name,
            "compute_capability": format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
            "arch": g.arch(),
            "memory_total_bytes": g.memory_total,
            "memory_free_bytes": g.memory_free,
            "sm_count": g.sm_count,
            "clock_mhz": g.clock_mhz,
            "bf16": g.supports_bf16(),
            "kernels_compile": g.kernels.is_ok(),
            "kernels_error": g.kernels.as_ref().err(),
            "usable": g.unusable.is_none(),
        })).collect::<Vec<_>>(),
        "libraries": p.libraries.iter().map(|l| json!({
            "name": l.name,
            "found": l.path.is_some(),
            "path": l.path,
            "version": l.version,
            "error": l.error,
        })).collect::<Vec<_>>(),
        "nvrtc_trial_sm80": p.nvrtc_trial.as_ref().map(|t| match t {
            Ok(()) => json!(true),
            Err(e) => json!(e),
        }),
        "problems": p.problems.iter().map(|x| json!({
            "what": x.what,
            "fix": x.fix,
            "blocking": x.blocking,
        })).collect::<Vec<_>>(),
    })
}
