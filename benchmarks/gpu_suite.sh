#!/usr/bin/env bash
# The GPU check, in one go (a CUDA machine, no network, lumoe-engine not installed), under 8 minutes (each step has
# its own limit: pip 60 s, tests 165 s, tune 60 s of sweeping (80 s hard), benchmarks 150 s of shapes (190 s hard)):
#   1. make `lumoe_engine` (with kernels/ as lumoe_engine.kernels) importable: pip install -e . without deps, else a
#      staged copy of the package on PYTHONPATH;
#   2. pytest -m gpu over the kernel tests (compiled Triton, bf16 tensor-core dots, other launch configs);
#   3. bench_kernels.py --tune: sweeps the launch configs of the key shapes, writes kernel_configs.json (the
#      per-shape table; also merged into the kernels' cache on this machine);
#   4. bench_kernels.py --device cuda with that table: every op over T x H x r x experts in bf16, triton vs the
#      torch reference vs one dense LoRA of the same FLOPs / bytes (and the softmax+topk chain for routing),
#      do_bench medians, GB/s and the share of the copy bandwidth measured on the device (bw_share), and the
#      acceptance checks (targets.csv);
#   5. a short summary.
# Results (kernels.csv, targets.csv, kernel_configs.json, tune.csv, logs) go to "$OUT" when set, else
# benchmarks/results/gpu (a --dry-run: runs/gpu_suite_dry_run).
# Usage: bash benchmarks/gpu_suite.sh [--quick] [--dry-run] [--stage] [--skip-tests] [--skip-tune]
#   --quick: fewer benchmark sizes; --dry-run: tiny sizes, no do_bench (runs on a CPU, Triton in the interpreter: to
#   check the script itself); --stage: skip pip and use the staged copy (to check that path); --skip-tests /
#   --skip-tune: leave out step 2 / 3 (a rerun of the benchmarks alone).
set -uo pipefail
export PYTHONUNBUFFERED=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
BENCH_ARGS=()
FORCE_STAGE=0
SKIP_TESTS=0
SKIP_TUNE=0
DRY=0
for arg in "$@"; do
  case "$arg" in
    --quick) BENCH_ARGS+=("$arg") ;;
    --dry-run) BENCH_ARGS+=("$arg"); DRY=1 ;;
    --stage) FORCE_STAGE=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-tune) SKIP_TUNE=1 ;;
    *) echo "unknown argument $arg (expected --quick, --dry-run, --stage, --skip-tests, --skip-tune)" >&2; exit 2 ;;
  esac
done
if [ "$DRY" = 1 ]; then DEFAULT_OUT="$REPO/runs/gpu_suite_dry_run"; else DEFAULT_OUT="$REPO/benchmarks/results/gpu"; fi
OUT_DIR="${OUT:-$DEFAULT_OUT}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/suite.log"
: > "$LOG"
START=$(date +%s)

say() { echo "[gpu_suite +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# ------------------------------------------------------------------------------------------------ 0. environment
say "repo $REPO -> results $OUT_DIR"
{
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  "$PY" - <<'EOF' 2>&1
import platform, sys
print("python", sys.version.split()[0], platform.machine())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as exc:
    print("torch import failed:", exc)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton import failed:", exc)
for mod in ("pytest", "rich", "setuptools"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception:
        print(mod, "missing")
EOF
} > "$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt" | tee -a "$LOG"

# ------------------------------------------------------------------------------------------------ 1. importable
check_import() {  # from a neutral folder, then from the run folder (as pytest sees it)
  (cd /tmp && "$PY" -c "import lumoe_engine.kernels.topk_routing, lumoe_engine.ops, lumoe_engine.ops.ref_lora") &&
    (cd "$1" && "$PY" -c "import lumoe_engine.kernels.lora_shrink, lumoe_engine.kernels.align_by_expert")
}

RUN_DIR="$REPO"
if [ "$FORCE_STAGE" = 0 ] && check_import "$REPO" >/dev/null 2>&1; then
  say "lumoe_engine already importable"
else
  say "pip install --no-deps --no-build-isolation -e ."
  if [ "$FORCE_STAGE" = 0 ] &&
     timeout -k 5 60 "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT_DIR/pip_install.log" 2>&1 &&
     check_import "$REPO" >> "$OUT_DIR/pip_install.log" 2>&1; then
    say "editable install ok"
  else
    say "editable install failed (see pip_install.log); staging a copy of the package on PYTHONPATH"
    STAGE="$(mktemp -d /tmp/lumoe_stage.XXXXXX)"
    trap 'rm -rf "$STAGE"' EXIT
    cp -r "$REPO/lumoe_engine" "$STAGE/lumoe_engine"
    rm -rf "$STAGE/lumoe_engine/kernels" "$STAGE/lumoe_engine/csrc"
    cp -r "$REPO/kernels" "$STAGE/lumoe_engine/kernels"
    cp -r "$REPO/csrc" "$STAGE/lumoe_engine/csrc"
    cp -r "$REPO/tests" "$REPO/benchmarks" "$STAGE/"
    [ -f "$REPO/pytest.ini" ] && cp "$REPO/pytest.ini" "$STAGE/"
    export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
    RUN_DIR="$STAGE"
    if check_import "$RUN_DIR" >> "$OUT_DIR/pip_install.log" 2>&1; then
      say "staged package importable from $STAGE"
    else
      say "FATAL: lumoe_engine is not importable (see pip_install.log)"
      exit 1
    fi
  fi
fi
cd "$RUN_DIR"

# ------------------------------------------------------------------------------------------------ 2. GPU tests
PYTEST_RC="skipped"
if [ "$SKIP_TESTS" = 1 ]; then
  say "GPU tests skipped (--skip-tests)"
elif "$PY" -c "import pytest" >/dev/null 2>&1; then
  TESTS=()
  for f in tests/test_routing.py tests/test_align.py tests/test_lora_ops.py tests/test_autograd.py \
           tests/test_kernel_configs.py; do
    [ -f "$f" ] && TESTS+=("$f")
  done
  if [ "${#TESTS[@]}" -eq 0 ]; then
    say "no kernel test files found under tests/"
    PYTEST_RC="missing"
  else
    say "pytest -m gpu ${TESTS[*]}"
    timeout -k 10 165 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs "${TESTS[@]}" 2>&1 |
      tee "$OUT_DIR/pytest_gpu.log" | tail -n 40
    PYTEST_RC=${PIPESTATUS[0]}
    say "pytest exit code $PYTEST_RC (124 = timed out)"
  fi
else
  say "pytest is not installed: GPU tests skipped"
fi

# ------------------------------------------------------------------------------------------------ 3. tune
TUNE_RC="skipped"
if [ "$SKIP_TUNE" = 0 ]; then
  say "bench_kernels --tune ${BENCH_ARGS[*]+${BENCH_ARGS[*]}}"
  timeout -k 10 80 "$PY" benchmarks/bench_kernels.py --device cuda --tune --budget-s 60 --out "$OUT_DIR" \
    ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} 2>&1 | tee "$OUT_DIR/tune.log" | tail -n 14
  TUNE_RC=${PIPESTATUS[0]}
  say "tune exit code $TUNE_RC (124 = timed out: the defaults stay)"
fi
if [ -f "$OUT_DIR/kernel_configs.json" ]; then
  export LUMOE_KERNEL_CONFIGS="$OUT_DIR/kernel_configs.json"
fi

# ------------------------------------------------------------------------------------------------ 4. benchmarks
say "bench_kernels --device cuda ${BENCH_ARGS[*]+${BENCH_ARGS[*]}} (configs: ${LUMOE_KERNEL_CONFIGS:-defaults})"
timeout -k 10 190 "$PY" benchmarks/bench_kernels.py --device cuda --budget-s 150 --out "$OUT_DIR" \
  ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} 2>&1 | tee "$OUT_DIR/bench.log" | tail -n 3
BENCH_RC=${PIPESTATUS[0]}
say "bench exit code $BENCH_RC (124 = timed out; rows measured so far are in kernels.csv)"

# ------------------------------------------------------------------------------------------------ 5. summary
"$PY" - "$OUT_DIR" <<'EOF' 2>&1 | tee "$OUT_DIR/summary.txt" | tee -a "$LOG"
import csv, sys
from pathlib import Path

out = Path(sys.argv[1])
path = out / "kernels.csv"
if not path.exists():
    print("no kernels.csv")
    sys.exit(0)
rows = list(csv.DictReader(path.open()))
first = rows[0] if rows else {}
print(f"device: {first.get('device', '?')}  torch {first.get('torch', '?')}  triton {first.get('triton', '?')}  "
      f"copy bandwidth {first.get('copy_gbps', '?')} GB/s")
cols = ("op", "provider", "T", "H", "r", "experts", "p50_ms", "gbps", "bw_share", "error")
keep = [r for r in rows
        if r["T"] in ("1", "16", "4096") and r["r"] in ("16", "") and r["experts"] in ("1", "64", "1000")]
width = {c: max(len(c), *(len(r.get(c, "")[:40]) for r in keep)) for c in cols} if keep else {}
print("  ".join(c.ljust(width[c]) for c in cols))
for r in keep:
    print("  ".join(r.get(c, "")[:40].ljust(width[c]) for c in cols))
tg = out / "targets.csv"
if tg.exists():
    print("\nacceptance checks")
    for r in csv.DictReader(tg.open()):
        print(f"  {r['check']:<45} {r['op']:<19} T={r['T']:<5} H={r['H']:<6} E={r['experts']:<5} "
              f"value {r['value'] or '-':>8} (threshold {r['threshold']}): {r['passed'] or 'not measured'}")
failed = [r for r in rows if r.get("error")]
print(f"\n{len(rows)} rows, {len(failed)} failed" + (": " + "; ".join(
    f"{r['op']}/{r['provider']} T={r['T']} E={r['experts']}: {r['error'][:80]}" for r in failed[:5]) if failed else ""))
EOF
say "pytest: $PYTEST_RC, tune: $TUNE_RC, bench: $BENCH_RC; results in $OUT_DIR"
[ "$PYTEST_RC" = "0" ] || [ "$PYTEST_RC" = "skipped" ] || exit 1
[ "$BENCH_RC" = "0" ] || exit 1
exit 0
