"""Kernel microbenchmarks as tidy CSV rows: the GPU suite (every op over the serving/training grid), the CPU
comparison (torch reference vs C++ op vs per-expert loop), and the tune mode that writes the per-shape config table.

    python benchmarks/bench_kernels.py --device cpu --out runs/bench            # CPU: torch, cpp, cpp_fused, loop
    python benchmarks/bench_kernels.py --device cuda --out runs/bench           # GPU suite (bf16)
    python benchmarks/bench_kernels.py --device cuda --tune --out runs/bench    # GPU: tune, write kernel_configs.json
    python benchmarks/bench_kernels.py --device cuda --dry-run --out /tmp/b     # the GPU code paths, tiny, on CPU
                                                                                # (Triton in the interpreter)

**GPU suite** (``--device cuda``): every op at T in {1, 16, 256, 4096, 16384}, H = N in {4096, 11008}, r in {8, 16,
64}, 1 / 8 / 64 / 1,000 active experts (``uniform``: every expert T / experts tokens, k = 1; a count above T is
left out), bf16; the done-when shapes first, then the rest while ``--budget-s`` lasts. Ops and providers:
- ``lora_shrink``, ``lora_expand`` (grouped, metadata built beforehand), ``lora_shrink_expand`` (one linear's LoRA
  forward: the decode op up to T = 256, the grouped pair), ``lora_weight_grad`` (dA and dB), ``lora_train``
  (forward + backward of ``ops.grouped_lora``, T >= 256), ``topk_routing`` (k = 2 over E in {8, 64, 1000}),
  ``align_by_expert``;
- ``triton`` (the kernels; ``lora_shrink_expand``: the decode op, and ``triton_grouped``: shrink + expand over the
  metadata), ``ops`` (``lora_train``: ``ops.grouped_lora``, the dense path for one expert), ``torch`` (the
  reference; left out where it would gather more than 2^31 elements), ``loop`` (peft's per-adapter gather +
  index_add, row indices precomputed), ``dense`` (one dense LoRA of rank r with the same FLOPs: ``x @ A^T``,
  ``y.addmm_(u, B^T)``; the limit), ``dense_bytes`` (one dense LoRA of rank r x active, the same weight bytes; only
  when several experts are active), ``grouped`` (``lora_train`` with one expert forced through the grouped kernels,
  as before the dense path), ``torch_chain`` (routing: ``softmax(logits.float()).topk(k)``).
GB/s counts the bytes an op must move at least (the same for every provider of a row group); ``bw_share`` divides
it by the bandwidth of a 1 GiB device copy measured in the same run (``copy_gbps``). Timing:
``triton.testing.do_bench`` (L2 flushed before every run), median and 20th / 80th percentiles.

**CPU** (``--device cpu``, the default): ``lora_forward`` (y += scale * (x @ A_e^T) @ B_e^T, k = 1, S = 1) with
providers ``torch`` / ``cpp`` / ``cpp_fused`` / ``loop`` (peft's per-adapter gather + index_add, row indices
precomputed: a lower bound) over ``uniform`` / ``zipf`` / ``identical`` token distributions, ``topk_routing``,
and ``lora_train`` (forward + backward of ``ops.grouped_lora`` with one expert, the dense path,
against the grouped ops of the torch / C++ backends, and with 4 experts); interleaved rounds of
``time.perf_counter`` (a shared machine's load hits all providers alike).

**Tune** (``--tune``): for the suite's key shapes, every candidate of ``configs.candidates`` is timed and the fastest
that agrees with the default is kept; writes ``OUT/kernel_configs.json`` (and, on a GPU, the cache file the kernels
read: ``$LUMOE_CACHE/kernel_configs/<device>.json``) and ``OUT/tune.csv``.

Writes ``OUT/kernels.csv`` (a provider that fails is a row with ``error`` set), ``OUT/speedup.csv`` (CPU: best
provider vs the loop), ``OUT/targets.csv`` (GPU: the acceptance checks), ``OUT/kernels_config.json``.

Legend: T tokens, E experts, k top-k, H input features, N output features, r rank.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

FIELDS = ["op", "provider", "dtype", "T", "H", "N", "r", "experts", "active", "k", "distribution", "block_m",
          "p50_ms", "p20_ms", "p80_ms", "min_ms", "bytes", "gbps", "bw_share", "copy_gbps", "flops", "tflops",
          "config", "device", "threads", "clock", "torch", "triton", "error"]
SPEEDUP_FIELDS = ["op", "T", "H", "r", "experts", "distribution", "dtype", "threads", "best_provider", "best_p50_ms",
                  "loop_p50_ms", "speedup_vs_loop", "best_min_ms", "loop_min_ms", "speedup_vs_loop_min", "device"]
TARGET_FIELDS = ["check", "op", "T", "H", "r", "experts", "value", "threshold", "passed", "device"]
TUNE_FIELDS = ["key", "config", "ms", "default_ms", "speedup", "tried", "failed", "device"]


@dataclass
class Sizes:
    """What to measure (a named preset per mode)."""

    # GPU suite
    T: tuple = (1, 16, 256, 4096, 16384)
    H: tuple = (4096, 11008)
    r: tuple = (8, 16, 64)
    experts: tuple = (1, 8, 64, 1000)
    fused_max_T: int = 256        # the decode op is measured up to here (the model's FUSED_MAX_ROWS)
    train_min_T: int = 256        # training steps from here
    route_T: tuple = (1, 16, 256, 4096, 16384)
    route_E: tuple = (8, 64, 1000)
    route_k: int = 2
    ref_max_elems: int = 1 << 31  # the torch reference gathers M x r x max(H, N) elements: left out above this
    warmup_ms: float = 3.0        # do_bench
    rep_ms: float = 15.0
    # CPU comparison
    lora_T: int = 1024
    lora_H: int = 1024
    lora_r: int = 16
    lora_experts: tuple = (4, 16, 64, 256)
    distributions: tuple = ("uniform", "zipf", "identical")
    reps: int = 15                # CPU timer: runs measured (fewer when one run takes long)
    budget_s: float = 3.0         # CPU timer: time budget of one measurement
    clock: str = "wall"           # CPU timer: "wall" (time.perf_counter) or "process" (CPU time of the process)


PRESETS = {
    "full": Sizes(),
    "quick": Sizes(T=(1, 16, 4096), H=(4096,), r=(16,), experts=(1, 8, 64), route_T=(16, 4096), route_E=(1000,),
                   lora_experts=(16, 64, 256), distributions=("uniform", "zipf"), reps=10, budget_s=2.0),
    "dry-run": Sizes(T=(1, 16), H=(64,), r=(16,), experts=(1, 8), fused_max_T=256, train_min_T=1,
                     route_T=(16,), route_E=(8, 1000), lora_T=48, lora_H=64, lora_r=16, lora_experts=(4, 8),
                     distributions=("uniform", "identical"), reps=2, budget_s=0.5),
}


@dataclass
class Env:
    device: str           # where tensors live: "cpu" or "cuda"
    gpu_providers: bool   # the GPU suite / Triton providers (True for --device cuda, also in a CPU dry run)
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


def time_ops(env: Env, fns: list) -> list[tuple[float, float, float, float]]:
    """(p50, p20, p80, min) in ms per function: ``triton.testing.do_bench`` on CUDA, interleaved rounds on CPU."""
    if env.use_do_bench:
        import triton.testing

        out = []
        for fn in fns:
            qs = triton.testing.do_bench(fn, warmup=env.sizes.warmup_ms, rep=env.sizes.rep_ms,
                                         quantiles=[0.5, 0.2, 0.8, 0.0])
            out.append(tuple(float(q) for q in qs))
        return out
    return time_cpu_interleaved(fns, env.sizes.reps, env.sizes.budget_s, env.sizes.clock)


def copy_bandwidth(env: Env) -> float:
    """GB/s of a large device copy (bytes read + written): the practical bandwidth ceiling of this device."""
    import torch

    n = (1 << 30) // 4 if env.use_do_bench else (64 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=env.device).uniform_()
    dst = torch.empty_like(src)
    (p50, _, _, _), = time_ops(env, [lambda: dst.copy_(src)])
    return 2 * n * 4 / (p50 * 1e-3) / 1e9


def sync(env: Env) -> None:
    if env.device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------- rows
def base_row(env: Env, **kw) -> dict:
    import torch

    row = {f: "" for f in FIELDS}
    row.update(device=torch.cuda.get_device_name() if env.device == "cuda" else f"cpu ({platform.machine()})",
               threads=torch.get_num_threads(), clock="do_bench" if env.use_do_bench else env.sizes.clock,
               dtype=str(env.dtype).replace("torch.", ""), **env.versions)
    if env.copy_gbps:
        row["copy_gbps"] = f"{env.copy_gbps:.1f}"
    row.update(kw)
    return row


def measure(env: Env, rows: list[dict], builds: list, nbytes: float, flops: float = 0.0) -> list[dict]:
    """Fill p50/p20/p80/min, GB/s, bw_share and TFLOP/s of the functions ``build()`` returns, providers of one size
    together; a provider whose build or run raises gets its ``error`` filled instead (a row, not a crash)."""

    def fail(row: dict, exc: Exception) -> None:
        row["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        traceback.print_exc(limit=3, file=sys.stderr)

    ready = []
    for row, build in zip(rows, builds):
        try:
            fn = build()
            fn()                                   # a first run outside the timer (compiles): errors surface here
            sync(env)
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
        row.update(p50_ms=f"{p50:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}", min_ms=f"{low:.4f}",
                   bytes=f"{nbytes:.0f}")
        gbps = nbytes / (p50 * 1e-3) / 1e9
        row["gbps"] = f"{gbps:.1f}"
        if env.copy_gbps:
            row["bw_share"] = f"{gbps / env.copy_gbps:.3f}"
        if flops:
            row["flops"] = f"{flops:.0f}"
            row["tflops"] = f"{flops / (p50 * 1e-3) / 1e12:.3f}"
    return rows


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
    """The CPU comparison's inputs: T x H tokens over E experts of rank r (S = 1, N = H)."""
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
    d["meta"] = align_by_expert(ids, E, 16)._replace(weights=weights)
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


# ---------------------------------------------------------------------------------------------------------- CPU
def cpu_lora_providers(d: dict) -> list[tuple[str, object]]:
    from lumoe_engine.ops import ref_lora

    meta = d["meta"]

    def unfused(shrink, expand):
        def fn():
            buf = shrink(d["x"], d["lora_a"], meta, d["ranks"])
            return expand(buf, d["lora_b"], d["slice_offsets"], meta, d["scales"], d["ranks"], d["y"])
        return fn

    def cpp_op(fused: bool):
        def build():
            from lumoe_engine.ops import cpp
            if not cpp.available():
                raise RuntimeError(f"C++ op unavailable: {cpp._error}")
            if fused:
                return lambda: cpp.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"],
                                                      d["weights"], d["scales"], d["ranks"], d["y"])
            return unfused(cpp.lora_shrink, cpp.lora_expand)
        return build

    return [("torch", lambda: unfused(ref_lora.lora_shrink, ref_lora.lora_expand)), ("cpp", cpp_op(False)),
            ("cpp_fused", cpp_op(True)), ("loop", lambda: (lambda: peft_loop(d)))]


def bench_cpu_lora(env: Env, emit) -> None:
    import torch

    s = env.sizes
    el = torch.empty((), dtype=env.dtype).element_size()
    for dist in s.distributions:
        for E in s.lora_experts:
            d = lora_inputs(env, E, dist)
            nbytes = (s.lora_T * s.lora_H + d["active"] * s.lora_r * 2 * s.lora_H + 2 * s.lora_T * s.lora_H) * el
            provs = cpu_lora_providers(d)
            rows = [base_row(env, op="lora_forward", provider=name, T=s.lora_T, H=s.lora_H, N=s.lora_H, r=s.lora_r,
                             experts=E, active=d["active"], k=1, distribution=dist,
                             block_m=16 if name in ("torch", "cpp") else "") for name, _ in provs]
            for row in measure(env, rows, [b for _, b in provs], nbytes, 4.0 * s.lora_T * s.lora_r * s.lora_H):
                emit(row)


def bench_cpu_routing(env: Env, emit) -> None:
    import torch

    from lumoe_engine.ops.ref_routing import topk_routing as ref_topk

    s = env.sizes
    el = torch.empty((), dtype=env.dtype).element_size()
    for T in (64, 1024):
        for E in (64, 1000, 4096):
            logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T + E)).to(env.device, env.dtype)
            provs = [("torch", lambda: (lambda: ref_topk(logits, s.route_k))),
                     ("torch_chain", lambda: (lambda: torch.softmax(logits.float(), -1).topk(s.route_k, -1)))]
            rows = [base_row(env, op="topk_routing", provider=name, T=T, experts=E, active=E, k=s.route_k,
                             distribution="randn") for name, _ in provs]
            for row in measure(env, rows, [b for _, b in provs], T * E * el + T * s.route_k * 8):
                emit(row)


def bench_cpu_train(env: Env, emit) -> None:
    """A training step (forward + backward of ``ops.grouped_lora``, every row to one expert, as a new expert trains;
    and over 4 experts): the one-expert dense path against the grouped ops of the torch and C++ backends."""
    import torch

    from lumoe_engine import ops
    from lumoe_engine.ops import dispatch

    s = env.sizes
    el = torch.empty((), dtype=env.dtype).element_size()
    T, H, R = s.lora_T, s.lora_H, s.lora_r

    def on_backend(name, fn):
        def run():
            old = os.environ.get("LUMOE_BACKEND")
            os.environ["LUMOE_BACKEND"] = name
            dispatch.reset_backend()
            try:
                return fn()
            finally:
                if old is None:
                    os.environ.pop("LUMOE_BACKEND", None)
                else:
                    os.environ["LUMOE_BACKEND"] = old
                dispatch.reset_backend()
        return run

    for E in (1, 4):
        d = lora_inputs(env, E, "uniform")
        dy = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(env.dtype)
        x = d["x"].detach().requires_grad_(True)
        a = d["lora_a"].detach().requires_grad_(True)
        b = d["lora_b"].detach().requires_grad_(True)
        args = (d["slice_offsets"], d["meta"], d["scales"], d["ranks"])

        def step(fn):
            def run():
                fn(x, a, b, *args).backward(dy)
                x.grad = a.grad = b.grad = None
            return run

        front = step(lambda *t: ops.grouped_lora(*t, validate=False))
        grouped = step(lambda *t: ops.GroupedLoRAFunction.apply(*t))
        provs = [("ops", lambda: on_backend("cpp", front)), ("grouped_torch", lambda: on_backend("torch", grouped))]
        from lumoe_engine.ops import cpp

        if cpp.available():
            provs.append(("grouped_cpp", lambda: on_backend("cpp", grouped)))
        a0, b0 = a[0, 0].detach().clone().requires_grad_(True), b[0].detach().clone().requires_grad_(True)

        def dense():
            ((x @ a0.t()) @ b0.t() * 2.0).backward(dy)
            x.grad = a0.grad = b0.grad = None
        provs.append(("dense", lambda: dense))
        rows = [base_row(env, op="lora_train", provider=name, T=T, H=H, N=H, r=R, experts=E, active=d["active"], k=1,
                         distribution="uniform") for name, _ in provs]
        nbytes = (6 * T * H + 3 * d["active"] * R * 2 * H) * el
        for row in measure(env, rows, [bld for _, bld in provs], nbytes, 12.0 * T * R * H):
            emit(row)


def speedups(rows: list[dict]) -> list[dict]:
    """Per CPU lora_forward size: the fastest provider other than the loop (by median), and its speedup over the
    loop, by median and by best run (the best run is what an otherwise idle machine gives)."""
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
        out.append(dict(op="lora_forward", T=T, H=H, r=r, experts=E, distribution=dist, dtype=dtype, threads=threads,
                        best_provider=best["provider"], best_p50_ms=best["p50_ms"], loop_p50_ms=loop[0]["p50_ms"],
                        speedup_vs_loop=f"{float(loop[0]['p50_ms']) / float(best['p50_ms']):.2f}",
                        best_min_ms=f"{best_min:.4f}", loop_min_ms=loop[0]["min_ms"],
                        speedup_vs_loop_min=f"{float(loop[0]['min_ms']) / best_min:.2f}", device=device))
    return out


# ---------------------------------------------------------------------------------------------------------- GPU suite
@dataclass(frozen=True)
class Shape:
    T: int
    H: int
    r: int
    experts: int

    @property
    def N(self) -> int:
        return self.H


def suite_shapes(s: Sizes) -> list[Shape]:
    """Every (T, H, r, experts) of the grid, experts <= T; the acceptance shapes first (T = 4096, r = 16, 64
    experts; T <= 16 decode), so that a run cut short by its budget still has them."""
    grid = [Shape(T, H, r, E) for T in s.T for H in s.H for r in s.r for E in s.experts if E <= T]

    def priority(sh: Shape) -> tuple:
        target = (sh.T == 4096 and sh.r == 16 and sh.experts == 64) or (sh.T <= 16 and sh.r == 16)
        return (0 if target else 1, sh.T, sh.r, sh.experts, sh.H)
    return sorted(grid, key=priority)


class Inputs:
    """Tensors of one shape; the stacked weights are kept per (H, r, experts) across T."""

    def __init__(self, env: Env):
        self.env = env
        self._weights = {}

    def weights(self, H: int, N: int, r: int, E: int):
        import torch

        key = (H, N, r, E)
        if key not in self._weights:
            self._weights.clear()                 # one set at a time (E = 1,000 at H = 11,008, r = 64: 2.8 GB)
            if self.env.device == "cuda":
                torch.cuda.empty_cache()
            g = torch.Generator(device=self.env.device).manual_seed(1)
            a = (torch.randn(1, E, r, H, generator=g, device=self.env.device) / H ** 0.5).to(self.env.dtype)
            b = (torch.randn(E, N, r, generator=g, device=self.env.device) / r ** 0.5).to(self.env.dtype)
            self._weights[key] = (a, b)
        return self._weights[key]

    def build(self, sh: Shape) -> dict:
        import torch

        env, dev = self.env, self.env.device
        T, H, N, r, E = sh.T, sh.H, sh.N, sh.r, sh.experts
        g = torch.Generator(device=dev).manual_seed(2)
        a, b = self.weights(H, N, r, E)
        ids = make_ids(T, 1, E, "uniform", dev)
        w = torch.ones(T, 1, device=dev)
        if env.gpu_providers and env.device == "cuda":
            from lumoe_engine.kernels.align_by_expert import align_by_expert
        else:
            from lumoe_engine.ops.ref_routing import align_by_expert
        meta = align_by_expert(ids, E, 16)._replace(ids=ids, weights=w)
        active = min(E, T)
        d = dict(x=torch.randn(T, H, generator=g, device=dev).to(env.dtype), lora_a=a, lora_b=b,
                 y=torch.zeros(T, N, device=dev, dtype=env.dtype),
                 dy=torch.randn(T, N, generator=g, device=dev).to(env.dtype),
                 slice_offsets=torch.tensor([0, N], dtype=torch.int32, device=dev),
                 ids=ids, weights=w, meta=meta, active=active,
                 scales=torch.full((E,), 2.0, device=dev), ranks=torch.full((E,), r, dtype=torch.int32, device=dev))
        flat = ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E).tolist()                                # setup only: a host read
        d["groups"] = [(e, idx) for e, idx in enumerate(torch.split(order, counts)) if idx.numel()]
        d["buf"] = torch.randn(1, T, r, generator=g, device=dev)                          # [S, M, r] fp32
        d["u"] = d["buf"][0].to(env.dtype)                                                 # [T, r]
        d["a0"], d["b0"] = a[0, 0], b[0]                                                   # one expert
        if active > 1:                                                                     # rank r x active
            d["a_all"] = a[0, :active].reshape(active * r, H)
            d["b_all"] = b[:active].permute(1, 0, 2).reshape(N, active * r).contiguous()
            d["u_all"] = torch.randn(T, active * r, generator=g, device=dev).to(env.dtype)
        return d


def _config_text(*lookups) -> str:
    from lumoe_engine.kernels import configs

    parts = []
    for op, dtype, hidden, rank, rows in lookups:
        cfg, source = configs.lookup(op, dtype, hidden, rank, rows)
        parts.append(f"{op}:{cfg.short()}({source})")
    return " ".join(parts)


def suite_lora(env: Env, emit, shapes: list[Shape], deadline: float) -> int:
    """The grouped LoRA ops over ``shapes``; returns how many shapes were left out by the deadline."""
    import torch

    from lumoe_engine import ops
    from lumoe_engine.kernels.lora_expand import lora_expand
    from lumoe_engine.kernels.lora_grad import lora_weight_grad
    from lumoe_engine.kernels.lora_shrink import lora_shrink
    from lumoe_engine.kernels.lora_shrink_expand import lora_shrink_expand
    from lumoe_engine.ops import ref_lora

    s = env.sizes
    dt = env.dtype
    el = torch.empty((), dtype=dt).element_size()
    inputs = Inputs(env)
    for i, sh in enumerate(shapes):
        if time.perf_counter() > deadline:
            return len(shapes) - i
        T, H, N, r, E = sh.T, sh.H, sh.N, sh.r, sh.experts
        d = inputs.build(sh)
        a_cnt, meta = d["active"], d["meta"]
        ref_ok = T * r * max(H, N) <= s.ref_max_elems

        def rows_for(op, names, **kw):
            return [base_row(env, op=op, provider=n, T=T, H=H, N=N, r=r, experts=E, active=a_cnt, k=1,
                             distribution="uniform", **kw) for n in names]

        def run(op, provs, nbytes, flops, cfg=""):
            rows = rows_for(op, [n for n, _ in provs])
            for row in rows:
                if row["provider"] in ("triton", "triton_grouped", "torch"):
                    row["block_m"] = meta.block_m
                if row["provider"].startswith("triton") or row["provider"] == "ops":
                    row["config"] = cfg
            for row in measure(env, rows, [b for _, b in provs], nbytes, flops):
                emit(row)

        # ---- shrink: buf [1, T, r] = x @ A_e^T
        provs = [("triton", lambda: (lambda: lora_shrink(d["x"], d["lora_a"], meta, d["ranks"])))]
        if ref_ok:
            provs.append(("torch", lambda: (lambda: ref_lora.lora_shrink(d["x"], d["lora_a"], meta, d["ranks"]))))
        provs.append(("dense", lambda: (lambda: d["x"] @ d["a0"].t())))
        if a_cnt > 1:
            provs.append(("dense_bytes", lambda: (lambda: d["x"] @ d["a_all"].t())))
        run("lora_shrink", provs, (T * H + a_cnt * r * H) * el + T * r * 4, 2.0 * T * r * H,
            _config_text(("lora_shrink", dt, H, r, T)))

        # ---- expand: y += scale * buf @ B_e^T
        provs = [("triton", lambda: (lambda: lora_expand(d["buf"], d["lora_b"], d["slice_offsets"], meta,
                                                         d["scales"], d["ranks"], d["y"])))]
        if ref_ok:
            provs.append(("torch", lambda: (lambda: ref_lora.lora_expand(d["buf"], d["lora_b"], d["slice_offsets"],
                                                                         meta, d["scales"], d["ranks"], d["y"]))))
        provs.append(("dense", lambda: (lambda: d["y"].addmm_(d["u"], d["b0"].t()))))
        if a_cnt > 1:
            provs.append(("dense_bytes", lambda: (lambda: d["y"].addmm_(d["u_all"], d["b_all"].t()))))
        run("lora_expand", provs, T * r * 4 + a_cnt * N * r * el + 2 * T * N * el, 2.0 * T * r * N,
            _config_text(("lora_expand", dt, N, r, T)))

        # ---- one linear's LoRA forward: the decode op (T <= fused_max_T), the grouped shrink + expand, peft's loop
        args = (d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"], d["weights"], d["scales"],
                d["ranks"], d["y"])

        def grouped():
            buf = lora_shrink(d["x"], d["lora_a"], meta, d["ranks"])
            return lora_expand(buf, d["lora_b"], d["slice_offsets"], meta, d["scales"], d["ranks"], d["y"])
        provs = [("triton", lambda: (lambda: lora_shrink_expand(*args)))] if T <= s.fused_max_T else []
        provs.append(("triton_grouped", lambda: grouped))
        if ref_ok:
            provs.append(("torch", lambda: (lambda: ref_lora.lora_shrink_expand(*args))))
        provs.append(("loop", lambda: (lambda: peft_loop(dict(d, scaling=2.0)))))
        provs.append(("dense", lambda: (lambda: d["y"].addmm_(d["x"] @ d["a0"].t(), d["b0"].t()))))
        if a_cnt > 1:
            provs.append(("dense_bytes", lambda: (lambda: d["y"].addmm_(d["x"] @ d["a_all"].t(), d["b_all"].t()))))
        run("lora_shrink_expand", provs, (T * H + a_cnt * r * (H + N) + 2 * T * N) * el, 2.0 * T * r * (H + N),
            _config_text(("lora_decode_shrink", dt, H, r, T), ("lora_decode_expand", dt, N, r, T))
            if T <= s.fused_max_T else "grouped: " + _config_text(("lora_shrink", dt, H, r, T),
                                                                   ("lora_expand", dt, N, r, T)))

        # ---- weight gradients: dA [1, E, r, H], dB [E, N, r]
        gargs = (d["x"], d["dy"], d["buf"], d["buf"], d["slice_offsets"], meta, d["scales"], d["ranks"])
        provs = [("triton", lambda: (lambda: lora_weight_grad(*gargs)))]
        if ref_ok:
            provs.append(("torch", lambda: (lambda: ref_lora.lora_weight_grad(*gargs))))
        provs.append(("dense", lambda: (lambda: (d["u"].t() @ d["x"], d["dy"].t() @ d["u"]))))
        run("lora_weight_grad", provs, (T * H + T * N + a_cnt * r * (H + N)) * el + 2 * T * r * 4,
            2.0 * T * r * (H + N),
            _config_text(("lora_grad_a", dt, H, r, T), ("lora_grad_b", dt, N, r, T)))

        # ---- a training step: forward + backward of ops.grouped_lora (one expert: the dense path)
        if T >= s.train_min_T:
            def train(fn, a_leaf, b_leaf):
                x = d["x"].detach().requires_grad_(True)

                def step():
                    delta = fn(x, a_leaf, b_leaf)
                    delta.backward(d["dy"])
                    a_leaf.grad = b_leaf.grad = x.grad = None
                return step

            so, sc, rk = d["slice_offsets"], d["scales"], d["ranks"]
            a_p, b_p = d["lora_a"].detach().requires_grad_(True), d["lora_b"].detach().requires_grad_(True)
            provs = [("ops", lambda: train(lambda x, a, b: ops.grouped_lora(x, a, b, so, meta, sc, rk,
                                                                              validate=False), a_p, b_p))]
            if E == 1:
                provs.append(("grouped", lambda: train(lambda x, a, b: ops.GroupedLoRAFunction.apply(
                    x, a, b, so, meta, sc, rk), a_p, b_p)))
            if T * r * max(H, N) * 2 <= s.ref_max_elems // 8:
                provs.append(("torch", lambda: train(lambda x, a, b: ref_lora.grouped_lora(x, a, b, so, meta, sc, rk),
                                                     a_p, b_p)))
            a0 = d["a0"].detach().clone().requires_grad_(True)
            b0 = d["b0"].detach().clone().requires_grad_(True)
            provs.append(("dense", lambda: train(lambda x, a, b: (x @ a.t()) @ b.t() * 2.0, a0, b0)))
            run("lora_train", provs, (3 * T * H + 3 * T * N + 3 * a_cnt * r * (H + N)) * el, 6.0 * T * r * (H + N),
                "ops.grouped_lora: dense path" if E == 1 else
                _config_text(("lora_shrink", dt, H, r, T), ("lora_expand", dt, N, r, T),
                             ("lora_grad_a", dt, H, r, T), ("lora_grad_b", dt, N, r, T)))
    return 0


def suite_routing(env: Env, emit, deadline: float) -> int:
    import torch

    from lumoe_engine.ops.ref_routing import align_by_expert as ref_align
    from lumoe_engine.ops.ref_routing import topk_routing as ref_topk

    s = env.sizes
    el = torch.empty((), dtype=env.dtype).element_size()
    shapes = sorted(((T, E) for T in s.route_T for E in s.route_E), key=lambda te: (te[1] != 1000, te))
    for i, (T, E) in enumerate(shapes):
        if time.perf_counter() > deadline:
            return len(shapes) - i
        logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T + E)).to(env.device, env.dtype)
        k = min(s.route_k, E)

        def triton_topk():
            from lumoe_engine.kernels.topk_routing import topk_routing
            return lambda: topk_routing(logits, k)
        provs = [("triton", triton_topk),
                 ("torch_chain", lambda: (lambda: torch.softmax(logits.float(), -1).topk(k, -1)))]
        if T * E <= (1 << 24):
            provs.append(("torch", lambda: (lambda: ref_topk(logits, k))))
        rows = [base_row(env, op="topk_routing", provider=n, T=T, experts=E, active=E, k=k, distribution="randn")
                for n, _ in provs]
        for row in measure(env, rows, [b for _, b in provs], T * E * el + T * k * 8, 0.0):
            emit(row)

        ids = make_ids(T, 1, E, "uniform", env.device)

        def triton_align():
            from lumoe_engine.kernels.align_by_expert import align_by_expert
            return lambda: align_by_expert(ids, E, 16)
        provs = [("triton", triton_align), ("torch", lambda: (lambda: ref_align(ids, E, 16)))]
        from lumoe_engine.ops.meta import padded_length

        P = padded_length(T, E, 16)
        rows = [base_row(env, op="align_by_expert", provider=n, T=T, experts=E, active=min(E, T), k=1,
                         distribution="uniform", block_m=16) for n, _ in provs]
        for row in measure(env, rows, [b for _, b in provs], 4 * (2 * T + P + P // 16 + 2 * E + 1), 0.0):
            emit(row)
    return 0


def targets(rows: list[dict]) -> list[dict]:
    """The acceptance checks, from the suite's rows (``passed`` empty when a row is missing)."""
    out = []

    def find(op, provider, **kw):
        for r in rows:
            if r["op"] == op and r["provider"] == provider and r["p50_ms"] and \
                    all(r[k] == str(v) for k, v in kw.items()):
                return r
        return None

    device = rows[0]["device"] if rows else ""
    for H in sorted({r["H"] for r in rows if r["op"] == "lora_shrink"}, key=int):
        for op in ("lora_shrink", "lora_expand"):
            r = find(op, "triton", T=4096, H=H, r=16, experts=64)
            out.append(dict(check="bw_share >= 0.70", op=op, T=4096, H=H, r=16, experts=64,
                            value=r["bw_share"] if r else "", threshold="0.70",
                            passed=(float(r["bw_share"]) >= 0.70) if r and r["bw_share"] else "", device=device))
        for T in (1, 16):
            for E in (1, 8):
                mine = find("lora_shrink_expand", "triton", T=T, H=H, r=16, experts=E)
                dense = find("lora_shrink_expand", "dense_bytes" if E > 1 else "dense", T=T, H=H, r=16, experts=E)
                if E > T:
                    continue
                ratio = float(mine["p50_ms"]) / float(dense["p50_ms"]) if mine and dense else None
                out.append(dict(check="fused / dense LoRA of the same bytes <= 1.5", op="lora_shrink_expand", T=T,
                                H=H, r=16, experts=E, value=f"{ratio:.2f}" if ratio else "", threshold="1.5",
                                passed=(ratio <= 1.5) if ratio else "", device=device))
    for T in sorted({int(r["T"]) for r in rows if r["op"] == "topk_routing" and r["experts"] == "1000"}):
        mine, chain = find("topk_routing", "triton", T=T, experts=1000), find("topk_routing", "torch_chain", T=T,
                                                                              experts=1000)
        ratio = float(chain["p50_ms"]) / float(mine["p50_ms"]) if mine and chain else None
        out.append(dict(check="torch softmax+topk / triton >= 3", op="topk_routing", T=T, H="", r="", experts=1000,
                        value=f"{ratio:.2f}" if ratio else "", threshold="3", passed=(ratio >= 3) if ratio else "",
                        device=device))
    return out


# ---------------------------------------------------------------------------------------------------------- tune
def tune_keys(s: Sizes) -> list[tuple[str, int, int, int, int]]:
    """(op, T, H, r, experts) the tune mode sweeps, most important first: the acceptance shapes, then the
    training and serving sizes around them."""
    keys = []
    big_t = 4096 if 4096 in s.T else max(s.T)
    small = [t for t in s.T if t <= 16] or [min(s.T)]
    for H in s.H:
        keys += [("lora_shrink", big_t, H, 16 if 16 in s.r else s.r[0], 64 if 64 in s.experts else max(s.experts)),
                 ("lora_expand", big_t, H, 16 if 16 in s.r else s.r[0], 64 if 64 in s.experts else max(s.experts))]
    for H in s.H:
        for t in small:
            keys += [("lora_decode_shrink", t, H, 16 if 16 in s.r else s.r[0], 1),
                     ("lora_decode_expand", t, H, 16 if 16 in s.r else s.r[0], 1)]
    for H in s.H:
        keys += [("lora_grad_a", big_t, H, 16 if 16 in s.r else s.r[0], 8 if 8 in s.experts else max(s.experts)),
                 ("lora_grad_b", big_t, H, 16 if 16 in s.r else s.r[0], 8 if 8 in s.experts else max(s.experts))]
    return keys


def run_tune(env: Env, out: Path, budget_s: float) -> list[dict]:
    """Sweep the candidates of ``tune_keys`` within ``budget_s``; write the table and ``tune.csv``."""
    from lumoe_engine.kernels import configs
    from lumoe_engine.kernels.lora_decode_expand import lora_decode_expand
    from lumoe_engine.kernels.lora_decode_shrink import lora_decode_shrink
    from lumoe_engine.kernels.lora_expand import lora_expand
    from lumoe_engine.kernels.lora_grad import lora_weight_grad
    from lumoe_engine.kernels.lora_shrink import lora_shrink

    deadline = time.perf_counter() + budget_s
    inputs = Inputs(env)
    entries, report = {}, []
    device = configs.device_name()

    def timer(fn):
        return time_ops(env, [fn])[0][0]

    for op, T, H, r, E in tune_keys(env.sizes):
        if time.perf_counter() > deadline:
            print(f"tune: budget of {budget_s:.0f} s reached; {op} T={T} H={H} keeps its default")
            continue
        d = inputs.build(Shape(T, H, r, E))
        meta = d["meta"]
        if op == "lora_shrink":
            run = lambda: lora_shrink(d["x"], d["lora_a"], meta, d["ranks"])                         # noqa: E731
            timed, hidden = None, H
        elif op == "lora_expand":
            run = lambda: lora_expand(d["buf"], d["lora_b"], d["slice_offsets"], meta, d["scales"],  # noqa: E731
                                      d["ranks"], d["y"].clone().zero_())
            timed = lambda: lora_expand(d["buf"], d["lora_b"], d["slice_offsets"], meta, d["scales"],  # noqa: E731
                                        d["ranks"], d["y"])
            hidden = d["lora_b"].shape[1]
        elif op == "lora_decode_shrink":
            part = lambda: lora_decode_shrink(d["x"], d["lora_a"], d["ids"], d["ranks"])              # noqa: E731
            run, timed, hidden = (lambda: part().sum(0)), part, H
        elif op == "lora_decode_expand":
            p0 = lora_decode_shrink(d["x"], d["lora_a"], d["ids"], d["ranks"])
            run = lambda: lora_decode_expand(p0, d["lora_b"], d["slice_offsets"], d["ids"], d["weights"],  # noqa
                                             d["scales"], d["ranks"], d["y"].clone().zero_())
            timed = lambda: lora_decode_expand(p0, d["lora_b"], d["slice_offsets"], d["ids"], d["weights"],  # noqa
                                               d["scales"], d["ranks"], d["y"])
            hidden = d["lora_b"].shape[1]
        else:
            which = "a" if op == "lora_grad_a" else "b"
            run = lambda w=which: lora_weight_grad(d["x"], d["dy"], d["buf"], d["buf"], d["slice_offsets"],  # noqa
                                                   meta, d["scales"], d["ranks"], need_a=w == "a",
                                                   need_b=w == "b")[0 if w == "a" else 1]
            timed, hidden = None, H if which == "a" else d["lora_b"].shape[1]
        try:
            res = configs.tune(op, env.dtype, hidden, r, T, run, timer, timed=timed,
                               log=lambda m: print(m, flush=True))
        except RuntimeError as exc:
            print(f"tune: {exc}")
            continue
        entries[res.key] = res.best
        failed = [f"{c.short()}: {n}" for c, ms, n in res.tried if ms is None]
        report.append(dict(key=res.key, config=res.best.short(), ms=f"{res.best_ms:.4f}",
                           default_ms=f"{res.default_ms:.4f}", speedup=f"{res.default_ms / res.best_ms:.2f}",
                           tried=len(res.tried), failed=" | ".join(failed)[:500], device=device))
        print(f"tune: {res.key}: {res.best.short()} {res.best_ms:.4f} ms (default {res.default_ms:.4f} ms)")
        configs.write_table(out / "kernel_configs.json", entries, device, extra=dict(env.versions), merge=False)
    versions = dict(env.versions, written=time.strftime("%Y-%m-%d %H:%M:%S"))
    path = configs.write_table(out / "kernel_configs.json", entries, device, extra=versions, merge=False)
    print(f"tune: {len(entries)} entries -> {path}")
    if env.device == "cuda" and entries:
        cached = configs.write_table(configs.cache_table_path(device), entries, device, extra=versions)
        print(f"tune: merged into {cached} (read by the kernels on this device)")
    with (out / "tune.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TUNE_FIELDS)
        writer.writeheader()
        writer.writerows(report)
    configs.reset_configs()
    return report


# ---------------------------------------------------------------------------------------------------------- output
def print_table(title: str, rows: list[dict], cols: list[str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in cols:
            table.add_column(c, justify="right" if c not in ("op", "provider", "distribution", "error", "check")
                             else "left")
        for r in rows:
            table.add_row(*[str(r.get(c, "")) for c in cols])
        Console(width=220).print(table)
    except ImportError:
        print(f"\n{title}")
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(str(r.get(c, "")) for c in cols))


def write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for kernels.csv (created)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes, simple timer: runs the code paths (with --device cuda and no GPU: Triton in the "
                         "interpreter)")
    ap.add_argument("--tune", action="store_true",
                    help="sweep the launch configurations of the key shapes and write OUT/kernel_configs.json "
                         "(on a GPU also the kernels' cache table), instead of benchmarking")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new shapes after this many seconds (suite or tune); rows so far are kept")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="data type (default fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--ops", nargs="*", default=["lora", "routing", "train"], choices=("lora", "routing", "train"),
                    help="lora: the grouped LoRA ops (CPU: lora_forward; GPU: with lora_train); routing: topk_routing "
                         "(+ align on GPU); train: the CPU training step (one expert: dense path vs grouped ops)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    ap.add_argument("--experts", type=int, nargs="*", default=None, help="override the expert counts")
    ap.add_argument("--distributions", nargs="*", default=None, choices=("uniform", "zipf", "identical"),
                    help="override the distributions of the CPU lora_forward")
    ap.add_argument("--reps", type=int, default=None, help="override the number of timed runs (CPU)")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="CPU timer: wall time, or the process's CPU time (robust to other load; use with --threads 1)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda and not args.dry_run:
        ap.error("--device cuda needs a CUDA device (use --dry-run to run the code paths on CPU)")
    if args.device == "cuda" and not has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before any @triton.jit runs
    gpu_providers = args.device == "cuda"
    if gpu_providers:
        os.environ.setdefault("LUMOE_BACKEND", "triton")  # ops.grouped_lora in lora_train runs the kernels
    device = "cuda" if gpu_providers and has_cuda else "cpu"
    sizes = PRESETS["dry-run" if args.dry_run else "quick" if args.quick else "full"]
    sizes = replace(sizes, clock=args.clock)
    if args.experts:
        sizes = replace(sizes, experts=tuple(args.experts), lora_experts=tuple(args.experts))
    if args.distributions:
        sizes = replace(sizes, distributions=tuple(args.distributions))
    if args.reps:
        sizes = replace(sizes, reps=args.reps, budget_s=max(sizes.budget_s, args.reps * 0.2))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if gpu_providers else "fp32")]
    if gpu_providers and dtype == torch.bfloat16 and device == "cpu":
        print("note: bf16 in the interpreter is converted to fp32 after every load (the GPU's dot path needs a GPU)")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    env = Env(device=device, gpu_providers=gpu_providers, use_do_bench=device == "cuda", dtype=dtype,
              sizes=sizes, versions=dict(torch=torch.__version__, triton=triton_version))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    if args.tune:
        if not gpu_providers:
            ap.error("--tune tunes the Triton kernels: use --device cuda (with --dry-run on a CPU)")
        report = run_tune(env, args.out, args.budget_s or 1e9)
        print_table(f"tuned ({args.out / 'kernel_configs.json'})", report,
                    ["key", "config", "ms", "default_ms", "speedup", "tried"])
        return 0

    env.copy_gbps = copy_bandwidth(env)
    print(f"device copy bandwidth (read + write): {env.copy_gbps:.1f} GB/s")
    path = args.out / "kernels.csv"
    rows: list[dict] = []
    left_out = 0
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        fh.flush()

        def emit(row: dict) -> None:
            row = {k: str(v) for k, v in row.items()}             # as the CSV holds it
            rows.append(row)
            writer.writerow(row)
            fh.flush()
            status = row["error"] or f"p50 {row['p50_ms']} ms  {row['gbps']} GB/s  share {row['bw_share']}"
            print(f"{row['op']:>18} {row['provider']:>14} T={row['T']} H={row['H']} r={row['r']} "
                  f"E={row['experts']}: {status}", flush=True)

        deadline = start + (args.budget_s or 1e9)
        if gpu_providers:
            from lumoe_engine.kernels import configs

            print(f"kernel configs: {configs.table_path() or 'defaults'}")
            if "routing" in args.ops:                      # short, and one of the acceptance checks: first
                left_out += suite_routing(env, emit, deadline)
            if "lora" in args.ops:
                left_out += suite_lora(env, emit, suite_shapes(sizes), deadline)
        else:
            if "lora" in args.ops:
                bench_cpu_lora(env, emit)
            if "routing" in args.ops:
                bench_cpu_routing(env, emit)
            if "train" in args.ops:
                bench_cpu_train(env, emit)

    config = dict(args={k: str(v) for k, v in vars(args).items()}, sizes=asdict(sizes), device=device,
                  copy_gbps=env.copy_gbps, threads=torch.get_num_threads(), python=sys.version.split()[0],
                  machine=platform.machine(), processor=platform.processor(), seconds=time.perf_counter() - start,
                  shapes_left_out_by_budget=left_out, **env.versions)
    if gpu_providers:
        from lumoe_engine.kernels import configs

        config["kernel_configs"] = configs.table_path() or "defaults"
        tg = targets(rows)
        write_csv(args.out / "targets.csv", TARGET_FIELDS, tg)
        print_table(f"kernels ({path}), shares of {env.copy_gbps:.0f} GB/s",
                    [r for r in rows if r["T"] in ("16", "4096") and r["r"] in ("16", "")],
                    ["op", "provider", "T", "H", "r", "experts", "p50_ms", "gbps", "bw_share", "error"])
        print_table("acceptance checks", tg, ["check", "op", "T", "H", "experts", "value", "threshold", "passed"])
        if left_out:
            print(f"budget of {args.budget_s:.0f} s reached: {left_out} shape(s) not measured")
    else:
        sp = speedups(rows)
        write_csv(args.out / "speedup.csv", SPEEDUP_FIELDS, sp)
        print_table(f"kernels ({path})", rows, ["op", "provider", "T", "experts", "active", "distribution", "p50_ms",
                                                 "p20_ms", "p80_ms", "min_ms", "error"])
        print_table("lora_forward: best provider vs the per-expert loop", sp,
                    ["experts", "distribution", "threads", "best_provider", "best_p50_ms", "loop_p50_ms",
                     "speedup_vs_loop", "best_min_ms", "loop_min_ms", "speedup_vs_loop_min"])
    (args.out / "kernels_config.json").write_text(json.dumps(config, indent=2) + "\n")
    failed = [r for r in rows if r["error"]]
    if failed:
        print(f"{len(failed)} measurement(s) failed; see the error column of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
