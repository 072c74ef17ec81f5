#!/usr/bin/env bash
# The proof on a GPU, in one run of under 8 minutes, for a GPU machine with no cargo and no
# network (the binary is built on the CPU machine and carried):
#
#   here:   cargo build --release && mkdir -p target/gpu && strip -o target/gpu/flint target/release/flint
#   there:  scripts/gpu-check.sh OUTDIR          (python3 with torch for the PyTorch columns)
#
# Steps: flint doctor; every CUDA kernel against its CPU twin on fresh random inputs (fp32,
# tf32, bf16 thresholds); a GPT `tiny` training smoke run in fp32 and bf16 (the loss falls and
# bf16 tracks fp32); `flint bench seed` and `flint bench gpt --preset gpt2 --seq-len 1024` on the
# GPU next to their PyTorch counterparts (bf16 autocast, SDPA); where ncu is installed, one step
# of each benchmark profiled kernel by kernel. Full logs go to OUTDIR; a short table is printed
# last. Exit status: 0 when every check passed.
set -uo pipefail
OUT=${1:?usage: scripts/gpu-check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
FLINT=${FLINT:-target/gpu/flint}
[ -x "$FLINT" ] || FLINT=target/release/flint
PY=${PYTHON:-python3}
SEED_BENCH=${SEED_BENCH:-bench/torch_seed_bench.py}
GPT_BATCH=${GPT_BATCH:-8}
export FLINT_CACHE_DIR="$OUT/cache"
status=0
# Every step has its own limit, and all of them together stop at 7.5 minutes (or
# GPU_CHECK_SECONDS, for a shorter lease).
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-450}))

# run NAME TIMEOUT CMD...: runs one step, logs to OUT/NAME.log, records its exit status.
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS)) t0=$SECONDS
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 0 ]; then
        echo "SKIPPED: $name (out of time)"; status=1; return 1
    fi
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" >>"$OUT/steps.txt"
    [ $rc -eq 0 ] || { status=1; echo "FAILED: $name (exit $rc; see $OUT/$name.log)"; tail -5 "$OUT/$name.log"; }
    return $rc
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
run doctor 120 "$FLINT" doctor --device cuda
"$FLINT" doctor --json >"$OUT/doctor.json" 2>/dev/null
run parity 120 "$FLINT" doctor --parity --device cuda
# Again with attention's batch split into one chunk per element, as long sequences are.
run parity-chunked 120 env FLINT_ATTENTION_CHUNK_FLOATS=1 "$FLINT" doctor --parity --device cuda
# And without the flash attention kernels (on by default in bf16, after their self-test), so
# that bf16 attention on cuBLASLt, their fallback, is checked too.
run parity-noflash 120 env FLINT_FLASH_ATTENTION=0 "$FLINT" doctor --parity --device cuda
for p in fp32 bf16 bf16-noflash; do
    rm -rf "$OUT/smoke-$p"
    flash=$([ "$p" = bf16-noflash ] && echo 0 || echo 1)
    run "smoke-$p" 120 env FLINT_FLASH_ATTENTION=$flash "$FLINT" train --device cuda --precision "${p%-noflash}" \
        --steps 200 --eval-every 50 --checkpoint-every 1000 --out "$OUT/smoke-$p"
done
# fp32 on both sides: the PyTorch script runs the seed model without autocast (and, by
# PyTorch's default, without TF32).
run flint-seed 90 "$FLINT" bench seed --device cuda --precision fp32 --json
run torch-seed 90 "$PY" "$SEED_BENCH" --json
run flint-gpt2 150 "$FLINT" bench gpt --device cuda --precision bf16 --preset gpt2 --seq-len 1024 \
    --batch-size "$GPT_BATCH" --json
run flint-gpt2-noflash 150 env FLINT_FLASH_ATTENTION=0 "$FLINT" bench gpt --device cuda --precision bf16 \
    --preset gpt2 --seq-len 1024 --batch-size "$GPT_BATCH" --json
run torch-gpt2 150 "$PY" bench/torch_gpt_bench.py --preset gpt2 --seq-len 1024 --batch-size "$GPT_BATCH" \
    --amp bf16 --json
# Where one step's GPU time goes, kernel by kernel (ncu runs them one at a time, so the sum is
# GPU time, and a sum far below the step's wall time means launch-bound). Optional.
if command -v ncu >/dev/null; then
    NCU=(ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw)
    run profile-gpt2 90 "${NCU[@]}" "$FLINT" bench gpt --device cuda --precision bf16 --preset gpt2 \
        --seq-len 1024 --batch-size "$GPT_BATCH" --warmup 0 --steps 1
    run profile-seed 90 "${NCU[@]}" "$FLINT" bench seed --device cuda --precision fp32 --warmup 0 --steps 1
fi

# A fast path whose self-test failed (flash attention, the GELU epilogue) turns itself off
# with a note: a failed check here.
for log in parity smoke-bf16 flint-gpt2; do
    if grep -qs " is off on " "$OUT/$log.log"; then
        status=1
        echo "FAILED: a fast path turned itself off (see $OUT/$log.log)"
    fi
done

"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])

def rows(name):
    try:
        return [json.loads(l) for l in (out / f"{name}.log").read_text().splitlines() if l.startswith("{")]
    except OSError:
        return []

def losses(run):
    try:
        lines = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
        return [l["loss"] for l in lines if "loss" in l]
    except OSError:
        return []

print("\n== parity (CUDA vs CPU twin, max relative error) ==")
for name in ("parity", "parity-chunked", "parity-noflash"):
    log = (out / f"{name}.log").read_text() if (out / f"{name}.log").exists() else ""
    summary = [l for l in log.splitlines() if l.startswith("parity (seed")]
    print(f"{name:<16}" + (summary[-1] if summary else f"did not run (see {name}.log)"))
    for l in log.splitlines():
        if l.rstrip().endswith("FAILED") or " is off on " in l:
            print("  " + l)
print("\n== training smoke (GPT tiny, 200 steps) ==")
f32 = losses("smoke-fp32")
for name in ("fp32", "bf16", "bf16-noflash"):
    l = losses(f"smoke-{name}")
    if not l:
        print(f"{name}: no metrics")
        continue
    print(f"{name}: loss {l[0]:.3f} -> {l[-1]:.3f}  ({'falls' if l[-1] < 0.8 * l[0] else 'DOES NOT FALL'})")
    if f32 and name != "fp32":
        gap = abs(l[-1] - f32[-1]) / f32[-1]
        print(f"  {name} vs fp32 final loss: {gap:.1%} apart ({'tracks' if gap < 0.05 else 'DOES NOT TRACK'})")
print("\n== speed (tokens/s, same GPU) ==")
print(f"{'benchmark':<28}{'flint':>12}{'pytorch':>12}{'ratio':>8}{'MFU':>8}")
pairs = [(f"seed {r['config']} fp32", r, next((t for t in rows("torch-seed") if t.get("config") == r["config"]), None))
         for r in rows("flint-seed")]
pairs += [(f"gpt2 seq1024 bf16", r, (rows("torch-gpt2") or [None])[0]) for r in rows("flint-gpt2")]
pairs += [(f"gpt2 seq1024 bf16 no flash", r, (rows("torch-gpt2") or [None])[0]) for r in rows("flint-gpt2-noflash")]
for name, f, t in pairs:
    ratio = f"{f['tokens_per_s'] / t['tokens_per_s']:.2f}x" if t else "n/a"
    mfu = f"{f['mfu']:.1%}" if f.get("mfu") is not None else ""
    tt = f"{t['tokens_per_s']:.0f}" if t else "n/a"
    print(f"{name:<28}{f['tokens_per_s']:>12.0f}{tt:>12}{ratio:>8}{mfu:>8}")
if not pairs:
    print("(no flint benchmark rows)")

import collections, csv
for name in ("profile-gpt2", "profile-seed"):
    try:
        table = list(csv.reader((out / f"{name}.log").read_text().splitlines()))
    except OSError:
        continue
    head = next((r for r in table if "Kernel Name" in r), None)
    if head is None:
        print(f"\n{name}: no kernels (see {name}.log)")
        continue
    kernel, time = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    spent = collections.defaultdict(lambda: [0, 0.0])
    for r in table:
        if len(r) == len(head) and r[0].isdigit():
            spent[r[kernel][:70]][0] += 1
            spent[r[kernel][:70]][1] += float(r[time].replace(",", "")) / 1e6
    total = sum(t for _, t in spent.values())
    print(f"\n== {name}: {sum(c for c, _ in spent.values())} kernels, {total:.2f} ms of GPU time ==")
    for k, (c, t) in sorted(spent.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"{t:8.2f} ms {c:5d}x  {k}")
EOF
echo "gpu-check: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED); logs in $OUT"
exit $status
