"""Kernel microbenchmarks: the grouped LoRA forward (shrink + expand) and fused top-k routing, as tidy CSV rows.

    python benchmarks/bench_kernels.py --device cpu --out runs/bench            # CPU: torch, cpp, cpp_fused, loop
    python benchmarks/bench_kernels.py --device cuda --out runs/bench           # GPU: triton, torch, loop, chain
    python benchmarks/bench_kernels.py --device cuda --dry-run --out /tmp/b     # the GPU code path, tiny, on CPU

Writes ``OUT/kernels.csv`` (one row per op x provider x size: p50/p20/p80 ms, GB/s and % of the measured copy
bandwidth on GPU, versions; a provider that fails is a row with ``error`` set), ``OUT/speedup.csv`` (per size: the
best provider against the per-expert loop) and ``OUT/kernels_config.json``; prints both tables.

Providers of ``lora_forward`` (y += scale * (x @ A_e^T) @ B_e^T for the expert e of each token, k = 1, S = 1):
- ``torch``: the torch reference (``lumoe_engine.ops.ref_lora``), shrink then expand, metadata built beforehand;
- ``cpp`` / ``cpp_fused``: the C++ op, shrink then expand (metadata built beforehand) / the fused op from ids;
- ``triton`` / ``triton_fused`` (GPU): the Triton launchers, same split, for each ``block_m`` swept;
- ``loop``: what peft's mixed-batch forward does: for each adapter present, gather its rows,
  ``lora_B(lora_A(x_sub)) * scaling``, ``index_add`` into the result. Its per-adapter row indices are computed
  before timing (peft recomputes them in Python at every call), so the loop's times are a lower bound.
Metadata (``align_by_expert``) is built once per step and shared by every wrapped linear, so it is not timed.

Distributions of the T tokens over ``experts`` experts: ``uniform`` (every expert exactly T / experts tokens, in a
random order: ``experts`` active experts), ``zipf`` (popularity ~ 1 / rank^1.2), ``identical`` (all tokens to one).

Providers of ``topk_routing`` (k = 2, softmax): ``torch`` (the reference: softmax, stable sort, slice),
``torch_chain`` (``softmax(logits.float(), -1).topk(k)``, what one writes by hand), ``triton`` (GPU).

Timing: median (and 20th / 80th percentiles, and the best run) of repeated runs after warm-up; on CPU ``time.perf_counter`` in
rounds that run every provider of a size once (a shared machine's load then hits all alike), on CUDA
``triton.testing.do_bench``. GB/s counts the bytes an op must move at least (x, the A and B of the active
experts, y read and written; logits read, weights and ids written), the same for every provider.

Legend: T tokens, E experts, k top-k, H input features (= N output features here), r rank.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

FIELDS = ["op", "provider", "T", "H", "r", "experts", "active", "k", "distribution", "block_m", "dtype", "p50_ms",
          "p20_ms", "p80_ms", "min_ms", "gbps", "pct_copy_bw", "device", "threads", "clock", "torch", "triton", "error"]
SPEEDUP_FIELDS = ["op", "T", "H", "r", "experts", "distribution", "dtype", "threads", "best_provider", "best_p50_ms",
                  "loop_p50_ms", "speedup_vs_loop", "best_min_ms", "loop_min_ms", "speedup_vs_loop_min", "device"]


@dataclass
class Sizes:
    """What to measure (a named preset per mode)."""

    lora_T: int = 1024
    lora_H: int = 1024
    lora_r: int = 16
    lora_experts: tuple = (4, 16, 64, 256)
    distributions: tuple = ("uniform", "zipf", "identical")
    block_ms: tuple = (16,)
    route_T: tuple = (64, 1024)
    route_E: tuple = (64, 1000, 4096)
    route_k: int = 2
    reps: int = 15              # CPU timer: runs measured (fewer when one run takes long)
    budget_s: float = 3.0       # CPU timer: time budget of one measurement
    clock: str = "wall"         # CPU timer: "wall" (time.perf_counter) or "process" (CPU time of the process)


PRESETS = {
    "full": Sizes(),
    "quick": Sizes(lora_experts=(16, 64, 256), distributions=("uniform", "zipf"), route_T=(1024,),
                   route_E=(64, 4096), reps=10, budget_s=2.0),
    "dry-run": Sizes(lora_T=48, lora_H=64, lora_r=16, lora_experts=(4, 8), distributions=("uniform", "identical"),
                     block_ms=(16,), route_T=(16,), route_E=(64, 1100), reps=2, budget_s=0.5),
}


@dataclass
class Env:
    device: str           # where tensors live: "cpu" or "cuda"
    gpu_providers: bool   # Triton providers and do_bench / GB/s (True for --device cuda, also in a CPU dry run)
    use_do_bench: bool
    dtype: object
    sizes: Sizes
    copy_gbps: float | None = None
    versions: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- timing
def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def time_cpu_interleaved(fns: list, reps: int, budget_s: float, clock: str = "wall") -> list[tuple]:
    """(p50, p20, p80, min) in ms of each ``fn()``, measured in rounds (each round runs every function once), so that
    a change of machine load (a shared CPU) hits all providers alike: warm-up, then up to ``reps`` rounds within
    ``budget_s`` per function (at least 3 rounds). ``clock="process"`` counts the CPU time of this process instead
    of wall time: insensitive to other processes on a shared machine, meaningful with one thread (with several it
    also counts threads spinning at a barrier)."""
    tick = time.process_time if clock == "process" else time.perf_counter
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        if time.perf_counter() - t0 < 0.05:
            fn()
    times = [[] for _ in fns]
    deadline = time.perf_counter() + budget_s * len(fns)
    rounds = 0
    while rounds < reps and (rounds < 3 or time.perf_counter() < deadline):
        for i, fn in enumerate(fns):
            t0 = tick()
            fn()
            times[i].append((tick() - t0) * 1e3)
        rounds += 1
    return [(quantile(t, 0.5), quantile(t, 0.2), quantile(t, 0.8), min(t)) for t in times]


def time_ops(env: Env, fns: list) -> list[tuple[float, float, float]]:
    """(p50, p20, p80, min) in ms per function: ``triton.testing.do_bench`` on CUDA, interleaved rounds on CPU."""
    if env.use_do_bench:
        import triton.testing

        out = []
        for fn in fns:
            qs = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8, 0.0])
            out.append(tuple(float(q) for q in qs))
        return out
    return time_cpu_interleaved(fns, env.sizes.reps, env.sizes.budget_s, env.sizes.clock)


def copy_bandwidth(env: Env) -> float:
    """GB/s of a large device-to-device copy (bytes read + written): the practical bandwidth ceiling."""
    import torch

    n = (512 << 20) // 4 if env.use_do_bench else (8 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=env.device).uniform_()
    dst = torch.empty_like(src)
    (p50, _, _, _), = time_ops(env, [lambda: dst.copy_(src)])
    return 2 * n * 4 / (p50 * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------------------- inputs
def make_ids(T: int, k: int, E: int, distribution: str, device, seed: int = 0):
    """ids [T, k] int32: each token's experts, drawn with the given popularity (k distinct experts per token)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if distribution == "uniform":       # balanced: every expert the same number of tokens (+-1), shuffled
        first = torch.randperm(T, generator=g) % E
    elif distribution == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        first = torch.randperm(E, generator=g)[torch.multinomial(p, T, replacement=True, generator=g)]
    elif distribution == "identical":
        first = torch.zeros(T, dtype=torch.long)
    else:
        raise ValueError(f"distribution {distribution!r}: expected uniform, zipf or identical")
    cols = [first] + [(first + j) % E for j in range(1, k)]
    return torch.stack(cols, dim=1).to(torch.int32).to(device)


def lora_inputs(env: Env, E: int, distribution: str) -> dict:
    import torch

    from lumoe_engine.ops.ref_routing import align_by_expert

    s = env.sizes
    g = torch.Generator().manual_seed(1)
    T, H, R = s.lora_T, s.lora_H, s.lora_r
    ids = make_ids(T, 1, E, distribution, env.device)
    weights = torch.ones(T, 1, device=env.device)
    d = dict(
        x=torch.randn(T, H, generator=g).to(env.device, env.dtype),
        lora_a=(torch.randn(1, E, R, H, generator=g) / H ** 0.5).to(env.device, env.dtype),
        lora_b=(torch.randn(E, H, R, generator=g) / R ** 0.5).to(env.device, env.dtype),
        slice_offsets=torch.tensor([0, H], dtype=torch.int32, device=env.device),
        ids=ids, weights=weights,
        scales=torch.full((E,), 2.0, device=env.device),
        scaling=2.0,                          # the same, as the Python float peft keeps per adapter
        ranks=torch.full((E,), R, dtype=torch.int32, device=env.device),
        y=torch.zeros(T, H, device=env.device, dtype=env.dtype),
    )
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    d["groups"] = [(e, idx) for e, idx in enumerate(torch.split(order, counts)) if idx.numel()]
    d["active"] = len(d["groups"])
    d["metas"] = {bm: align_by_expert(ids, E, bm)._replace(weights=weights) for bm in s.block_ms}
    return d


def peft_loop(d: dict):
    """peft's mixed-batch LoRA forward: per adapter present, gather rows, B(A(x_sub)) * scaling, index_add."""
    import torch.nn.functional as F

    x, a, b, y = d["x"], d["lora_a"], d["lora_b"], d["y"]
    scaling = d["scaling"]
    for e, idx in d["groups"]:
        sub = x[idx]
        out = F.linear(F.linear(sub, a[0, e]), b[e]) * scaling
        y.index_add_(0, idx, out.to(y.dtype))
    return y


def lora_providers(env: Env, d: dict) -> list[tuple[str, int | None, object]]:
    """(provider, block_m, fn) for the device."""
    from lumoe_engine.ops import ref_lora

    bm0 = env.sizes.block_ms[0]
    meta0 = d["metas"][bm0]
    provs = []

    def unfused(shrink, expand, meta):
        def fn():
            buf = shrink(d["x"], d["lora_a"], meta, d["ranks"])
            return expand(buf, d["lora_b"], d["slice_offsets"], meta, d["scales"], d["ranks"], d["y"])
        return fn

    def fused(fn_mod):
        return lambda: fn_mod(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"], d["weights"],
                              d["scales"], d["ranks"], d["y"])

    if env.gpu_providers:
        def triton_unfused(bm):
            def build():
                from lumoe_engine.kernels.lora_expand import lora_expand
                from lumoe_engine.kernels.lora_shrink import lora_shrink
                return unfused(lora_shrink, lora_expand, d["metas"][bm])
            return build

        def triton_fused():
            from lumoe_engine.kernels.lora_shrink_expand import lora_shrink_expand
            return fused(lora_shrink_expand)

        for bm in env.sizes.block_ms:
            provs.append(("triton", bm, triton_unfused(bm)))
        provs.append(("triton_fused", None, triton_fused))
        provs.append(("torch", bm0, lambda: unfused(ref_lora.lora_shrink, ref_lora.lora_expand, meta0)))
    else:
        def cpp_unfused():
            from lumoe_engine.ops import cpp
            if not cpp.available():
                raise RuntimeError(f"C++ op unavailable: {cpp._error}")
            return unfused(cpp.lora_shrink, cpp.lora_expand, meta0)

        def cpp_fused():
            from lumoe_engine.ops import cpp
            if not cpp.available():
                raise RuntimeError(f"C++ op unavailable: {cpp._error}")
            return fused(cpp.lora_shrink_expand)

        provs.append(("torch", bm0, lambda: unfused(ref_lora.lora_shrink, ref_lora.lora_expand, meta0)))
        provs.append(("cpp", bm0, cpp_unfused))
        provs.append(("cpp_fused", None, cpp_fused))
    provs.append(("loop", None, lambda: (lambda: peft_loop(d))))
    return provs


def routing_providers(env: Env, logits, k: int) -> list[tuple[str, object]]:
    import torch

    from lumoe_engine.ops.ref_routing import topk_routing as ref_topk

    provs = []
    if env.gpu_providers:
        def triton_topk():
            from lumoe_engine.kernels.topk_routing import topk_routing
            return lambda: topk_routing(logits, k)
        provs.append(("triton", triton_topk))
    provs.append(("torch", lambda: (lambda: ref_topk(logits, k))))
    provs.append(("torch_chain", lambda: (lambda: torch.softmax(logits.float(), dim=-1).topk(k, dim=-1))))
    return provs


# ---------------------------------------------------------------------------------------------------------- rows
def base_row(env: Env, **kw) -> dict:
    import torch

    row = {f: "" for f in FIELDS}
    row.update(device=torch.cuda.get_device_name() if env.device == "cuda" else f"cpu ({platform.machine()})",
               threads=torch.get_num_threads(), clock="do_bench" if env.use_do_bench else env.sizes.clock,
               dtype=str(env.dtype).replace("torch.", ""), **env.versions)
    row.update(kw)
    return row


def measure(env: Env, rows: list[dict], builds: list, nbytes: float) -> list[dict]:
    """Fill p50/p20/p80 (and GB/s on GPU) of the functions ``build()`` returns, providers of one size together;
    a provider whose build or run raises gets its ``error`` filled instead (a row, not a crash)."""

    def fail(row: dict, exc: Exception) -> None:
        row["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        traceback.print_exc(limit=3, file=sys.stderr)

    ready = []
    for row, build in zip(rows, builds):
        try:
            fn = build()
            fn()                                   # a first run outside the timer: errors surface here
            if env.device == "cuda":
                import torch

                torch.cuda.synchronize()
            ready.append((row, fn))
        except Exception as exc:
            fail(row, exc)
    try:
        results = time_ops(env, [fn for _, fn in ready])
    except Exception:                              # one failed mid-way: time them one by one to blame the culprit
        results = []
        for row, fn in ready:
            try:
                results.append(time_ops(env, [fn])[0])
            except Exception as exc:
                fail(row, exc)
                results.append(None)
    for (row, _), res in zip(ready, results):
        if res is None:
            continue
        p50, p20, p80, low = res
        row.update(p50_ms=f"{p50:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}", min_ms=f"{low:.4f}")
        if env.gpu_providers:
            gbps = nbytes / (p50 * 1e-3) / 1e9
            row["gbps"] = f"{gbps:.1f}"
            if env.copy_gbps:
                row["pct_copy_bw"] = f"{100 * gbps / env.copy_gbps:.1f}"
    return rows


def bench_lora(env: Env, emit) -> None:
    import torch

    s = env.sizes
    el = torch.empty((), dtype=env.dtype).element_size()
    for dist in s.distributions:
        for E in s.lora_experts:
            d = lora_inputs(env, E, dist)
            nbytes = (s.lora_T * s.lora_H + d["active"] * s.lora_r * 2 * s.lora_H + 2 * s.lora_T * s.lora_H) * el
            provs = lora_providers(env, d)
            rows = [base_row(env, op="lora_forward", provider=provider, T=s.lora_T, H=s.lora_H, r=s.lora_r,
                             experts=E, active=d["active"], k=1, distribution=dist, block_m=bm or "")
                    for provider, bm, _ in provs]
            for row in measure(env, rows, [build for _, _, build in provs], nbytes):
                emit(row)


def bench_routing(env: Env, emit) -> None:
    import torch

    s = env.sizes
    el = torch.empty((), dtype=env.dtype).element_size()
    for T in s.route_T:
        for E in s.route_E:
            g = torch.Generator().manual_seed(T + E)
            logits = torch.randn(T, E, generator=g).to(env.device, env.dtype)
            nbytes = T * E * el + T * s.route_k * 8
            provs = routing_providers(env, logits, s.route_k)
            rows = [base_row(env, op="topk_routing", provider=provider, T=T, experts=E, active=E, k=s.route_k,
                             distribution="randn") for provider, _ in provs]
            for row in measure(env, rows, [build for _, build in provs], nbytes):
                emit(row)


def speedups(rows: list[dict]) -> list[dict]:
    """Per lora_forward size: the fastest provider other than the loop (by median), and its speedup over the loop,
    by median and by best run (the best run is what an otherwise idle machine gives)."""
    out = []
    keys = {}
    for r in rows:
        if r["op"] == "lora_forward" and r["p50_ms"]:
            key = (r["T"], r["H"], r["r"], r["experts"], r["distribution"], r["dtype"], r["threads"], r["device"])
            keys.setdefault(key, []).append(r)
    for (T, H, r, E, dist, dtype, threads, device), group in keys.items():
        loop = [g for g in group if g["provider"] == "loop"]
        others = [g for g in group if g["provider"] != "loop"]
        if not loop or not others:
            continue
        best = min(others, key=lambda g: float(g["p50_ms"]))
        best_min = min(float(g["min_ms"]) for g in others)
        provider = best["provider"] + (f"(bm={best['block_m']})" if best["provider"] == "triton" else "")
        out.append(dict(op="lora_forward", T=T, H=H, r=r, experts=E, distribution=dist, dtype=dtype, threads=threads,
                        best_provider=provider, best_p50_ms=best["p50_ms"], loop_p50_ms=loop[0]["p50_ms"],
                        speedup_vs_loop=f"{float(loop[0]['p50_ms']) / float(best['p50_ms']):.2f}",
                        best_min_ms=f"{best_min:.4f}", loop_min_ms=loop[0]["min_ms"],
                        speedup_vs_loop_min=f"{float(loop[0]['min_ms']) / best_min:.2f}", device=device))
    return out


def print_table(title: str, rows: list[dict], cols: list[str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in cols:
            table.add_column(c, justify="right" if c not in ("op", "provider", "distribution", "error") else "left")
        for r in rows:
            table.add_row(*[str(r.get(c, "")) for c in cols])
        Console(width=200).print(table)
    except ImportError:
        print(f"\n{title}")
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(str(r.get(c, "")) for c in cols))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for kernels.csv (created)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes, simple timer: runs the code path (with --device cuda and no GPU: Triton in the "
                         "interpreter)")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="data type (default fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--block-m", type=int, nargs="*", default=None,
                    help="block_m values of the Triton providers (default 16 on CPU dry runs, 16 32 64 on CUDA)")
    ap.add_argument("--ops", nargs="*", default=["lora_forward", "topk_routing"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    ap.add_argument("--experts", type=int, nargs="*", default=None, help="override the expert counts of lora_forward")
    ap.add_argument("--distributions", nargs="*", default=None, choices=("uniform", "zipf", "identical"),
                    help="override the distributions of lora_forward")
    ap.add_argument("--reps", type=int, default=None, help="override the number of timed runs (CPU)")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="CPU timer: wall time, or the process's CPU time (robust to other load; use with --threads 1)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda and not args.dry_run:
        ap.error("--device cuda needs a CUDA device (use --dry-run to run the code path on CPU)")
    if args.device == "cuda" and not has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before any @triton.jit runs
    device = "cuda" if args.device == "cuda" and has_cuda else "cpu"
    sizes = PRESETS["dry-run" if args.dry_run else "quick" if args.quick else "full"]
    sizes = replace(sizes, clock=args.clock)
    if args.experts:
        sizes = replace(sizes, lora_experts=tuple(args.experts))
    if args.distributions:
        sizes = replace(sizes, distributions=tuple(args.distributions))
    if args.reps:
        sizes = replace(sizes, reps=args.reps, budget_s=max(sizes.budget_s, args.reps * 0.2))
    if args.block_m:
        sizes = replace(sizes, block_ms=tuple(args.block_m))
    elif device == "cuda":
        sizes = replace(sizes, block_ms=(16, 64) if args.quick else (16, 32, 64))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    env = Env(device=device, gpu_providers=args.device == "cuda", use_do_bench=device == "cuda", dtype=dtype,
              sizes=sizes, versions=dict(torch=torch.__version__, triton=triton_version))
    if env.gpu_providers:
        env.copy_gbps = copy_bandwidth(env)
        print(f"device copy bandwidth (read + write): {env.copy_gbps:.1f} GB/s")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernels.csv"
    rows: list[dict] = []
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        fh.flush()

        def emit(row: dict) -> None:
            rows.append(row)
            writer.writerow(row)
            fh.flush()
            status = row["error"] or f"p50 {row['p50_ms']} ms"
            print(f"{row['op']:>13} {row['provider']:>12} T={row['T']} E={row['experts']} "
                  f"{row['distribution']} bm={row['block_m']}: {status}", flush=True)

        if "lora_forward" in args.ops:
            bench_lora(env, emit)
        if "topk_routing" in args.ops:
            bench_routing(env, emit)

    sp = speedups(rows)
    with (args.out / "speedup.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SPEEDUP_FIELDS)
        writer.writeheader()
        writer.writerows(sp)
    config = dict(args={k: str(v) for k, v in vars(args).items()}, sizes=asdict(sizes), device=device,
                  copy_gbps=env.copy_gbps, threads=torch.get_num_threads(), python=sys.version.split()[0],
                  machine=platform.machine(), processor=platform.processor(), **env.versions)
    (args.out / "kernels_config.json").write_text(json.dumps(config, indent=2) + "\n")

    cols = ["op", "provider", "T", "experts", "active", "distribution", "block_m", "p50_ms", "p20_ms", "p80_ms",
            "min_ms"]
    if env.gpu_providers:
        cols += ["gbps", "pct_copy_bw"]
    print_table(f"kernels ({path})", rows, cols + ["error"])
    print_table("lora_forward: best provider vs the per-expert loop", sp,
                ["experts", "distribution", "threads", "best_provider", "best_p50_ms", "loop_p50_ms", "speedup_vs_loop",
                 "best_min_ms", "loop_min_ms", "speedup_vs_loop_min"])
    failed = [r for r in rows if r["error"]]
    if failed:
        print(f"{len(failed)} measurement(s) failed; see the error column of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
