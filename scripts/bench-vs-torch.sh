#!/usr/bin/env bash
# Runs `flint bench seed` and PyTorch's counterpart (bench/torch_seed_bench.py) one
# after the other on this machine with the same threads, and prints a Markdown table with the
# ratio and each process's peak memory. Needs: cargo, python3 with torch.
# Usage: scripts/bench-vs-torch.sh [THREADS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
steps=${2:-20}
torch_script=${TORCH_BENCH:-bench/torch_seed_bench.py}
cargo build --release --bin flint -q
out=$(mktemp -d)
/usr/bin/time -f '%M' -o "$out/flint.mem" ./target/release/flint bench seed --threads "$threads" --steps "$steps" --json > "$out/flint.json"
/usr/bin/time -f '%M' -o "$out/torch.mem" python3 "$torch_script" --threads "$threads" --steps "$steps" --json > "$out/torch.json"
python3 - "$out" "$threads" <<'PY'
import json, platform, subprocess, sys
out, threads = sys.argv[1], sys.argv[2]
rows = lambda f: {r["config"]: r for r in map(json.loads, open(f"{out}/{f}").read().split("\n")[:-1])}
flint, torch = rows("flint.json"), rows("torch.json")
mem = lambda f: int(open(f"{out}/{f}").read().split()[-1]) / 1024
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
impl = next(iter(torch.values()))["impl"]
print(f"Machine: {cpu}, {threads} threads. PyTorch: {impl}.\n")
print("| config | shape | flint median ms | PyTorch median ms | flint tokens/s | PyTorch tokens/s | ratio (tokens/s) | flint GFLOP/s |")
print("|---|---|---|---|---|---|---|---|")
for c in flint:
    f, t = flint[c], torch[c]
    print(f"| {c} | [{f['seq']}, {f['batch']}, 512] | {f['median_ms']:.1f} | {t['median_ms']:.1f} | {f['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | **{f['tokens_per_s']/t['tokens_per_s']:.2f}x** | {f['gflops']:.0f} |")
print(f"\nPeak resident memory of the whole benchmark process (A then B): flint {mem('flint.mem'):.0f} MiB, PyTorch {mem('torch.mem'):.0f} MiB.")
PY
