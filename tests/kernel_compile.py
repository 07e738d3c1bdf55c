"""Compile the Triton kernels for real GPUs ahead of time, without one: the launchers run on CPU tensors with the
kernels replaced by recorders (and ``configs.compiled`` pretended true, so the launch is what a GPU would get:
16-bit tiles into tl.dot), then every recorded launch is compiled with ``triton.compile`` for the given targets
(sm_80, sm_90) down to a cubin by the ptxas Triton ships. Catches what the interpreter accepts but a GPU compile
rejects (dot blocks below 16, mixed dot dtypes, constexpr misuse, too much shared memory for the target).

    python tests/kernel_compile.py [--set quick|full] [--targets 80,90]     (prints one JSON line per launch)

Must run without ``TRITON_INTERPRET`` (the decorators then build compilable kernels); ``tests/test_kernel_compile.py``
runs it in a subprocess. Legend: T tokens, E experts, k top-k, S slices, H input features, N output features, R rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402

# Shared memory per block a kernel may use (opt-in maximum): A100 (sm_80) 163 KB, H100 / H200 (sm_90) 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


class Recorder:
    """Stands in for a @triton.jit kernel: records (kernel, args, kwargs) instead of launching."""

    def __init__(self, name: str, fn, sink: list):
        self.name, self.fn, self.sink = name, fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.name, self.fn, args, kwargs))
        return launch


@contextmanager
def recording(sink: list):
    from lumoe_engine.kernels import (align_by_expert, configs, lora_decode_expand, lora_decode_shrink, lora_expand,
                                      lora_grad, lora_shrink, topk_routing)

    kernels = [(lora_shrink, "_lora_shrink_kernel"), (lora_expand, "_lora_expand_kernel"),
               (lora_grad, "_lora_grad_kernel"), (lora_decode_shrink, "_lora_decode_shrink_kernel"),
               (lora_decode_expand, "_lora_decode_expand_kernel"), (topk_routing, "_topk_routing_kernel")] + \
        [(align_by_expert, n) for n in ("_align_count_kernel", "_align_tile_scan_kernel", "_align_offsets_kernel",
                                        "_align_pad_kernel", "_align_scatter_kernel")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in kernels]
    try:
        for mod, name, fn in saved:
            setattr(mod, name, Recorder(name, fn, sink))
        real_compiled = configs.compiled
        configs.compiled = lambda t: True
        os.environ["TRITON_INTERPRET"] = "1"          # the launchers' CPU-tensor checks (not the decorators)
        yield
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        configs.compiled = real_compiled
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def record(which: str) -> list:
    """Run the launchers at shapes that take every path under the default configs: bf16 at ranks 16 and 64, fp32,
    tf32 (``quick``); or every dtype and also every tuning candidate of one key per op (``full``). Returns the
    recorded launches."""
    import lora_cases
    from lora_cases import Case

    from lumoe_engine.kernels import align_by_expert, configs, lora_grad, lora_shrink_expand, topk_routing
    from lumoe_engine.kernels.lora_expand import lora_expand
    from lumoe_engine.kernels.lora_shrink import lora_shrink
    from lumoe_engine.ops.ref_routing import align_by_expert as ref_align

    sink: list = []
    cases = [Case("r16", 40, 2, 5, 4096, 16, (256, 128), (16, 9, 16, 1, 16), "random"),
             Case("r64", 40, 1, 3, 4096, 64, (512,), (64, 7, 64), "random")]
    dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def run_all(case, dtype, grads=True):
        d = lora_cases.make(case, dtype)
        meta = ref_align(d["ids"], case.E, 16)._replace(weights=d["weights"])
        buf = lora_shrink(d["x"], d["lora_a"], meta, d["ranks"])
        lora_expand(buf, d["lora_b"], d["slice_offsets"], meta, d["scales"], d["ranks"], d["y"])
        lora_shrink_expand.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"],
                                              d["weights"], d["scales"], d["ranks"], d["y"])
        if grads:
            dy = torch.zeros(case.T, case.N, dtype=dtype)
            lora_grad.lora_weight_grad(d["x"], dy, buf, buf, d["slice_offsets"], meta, d["scales"], d["ranks"])

    with recording(sink):
        for case in cases:
            for dtype in dtypes if which == "full" else [torch.bfloat16]:
                run_all(case, dtype)
        if which == "quick":
            run_all(cases[0], torch.float32)
        os.environ["LUMOE_TF32"] = "1"
        run_all(cases[0], torch.float32)
        os.environ.pop("LUMOE_TF32")
        d = lora_cases.make(Case("k1", 33, 1, 3, 64, 16, (64,), (16, 16, 16), "random"), torch.bfloat16)
        meta = ref_align(d["ids"], 3, 16)._replace(weights=d["weights"])
        buf = lora_shrink(d["x"], d["lora_a"], meta, d["ranks"])
        lora_expand(buf, d["lora_b"], d["slice_offsets"], meta, d["scales"], d["ranks"], d["y"])   # k = 1: into y
        for dt in (torch.float32, torch.bfloat16):
            for E in (61, 4096):
                topk_routing.topk_routing(torch.randn(7, E).to(dt), 2, renormalize=True, threshold=0.01)
        align_by_expert.align_by_expert(torch.zeros(700, 2, dtype=torch.int32), 61, 16)
        if which == "full":
            for op, case in (("lora_shrink", cases[0]), ("lora_expand", cases[0]), ("lora_decode_shrink", cases[0]),
                             ("lora_decode_expand", cases[0]), ("lora_grad_a", cases[1]), ("lora_grad_b", cases[1])):
                for cfg in configs.candidates(op, torch.bfloat16, 4096, case.R, 4096 if "grad" in op else 40):
                    with ExitStack() as stack:
                        stack.enter_context(configs.override(op, cfg))
                        run_all(case, torch.bfloat16, grads="grad" in op)
    return sink


def _sig(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                      torch.int64: "i64"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2 ** 31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported launch argument {value!r}")


def compile_launch(fn, args: tuple, kwargs: dict, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    values = dict(zip(names, args))
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values.update(kwargs)
    const_names = {p.name for p in fn.params if p.is_constexpr}
    sig, consts = {}, {}
    for i, n in enumerate(names):
        if n in const_names:
            sig[n] = "constexpr"
            consts[(i,)] = values[n]
        else:
            sig[n] = _sig(values[n])
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = out.asm["ptx"]
    return dict(shared=out.metadata.shared, mma=ptx.count("mma.sync") + ptx.count("wgmma."),
                constexprs={n: values[n] for n in names if n in const_names}, **options)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", choices=("quick", "full"), default="quick")
    ap.add_argument("--targets", default="80,90")
    args = ap.parse_args(argv)
    launches = record(args.set)
    seen, failures = set(), 0
    for name, fn, a, kw in launches:
        const_names = {p.name for p in fn.params if p.is_constexpr}
        values = dict(zip(fn.arg_names, a), **kw)
        for arch in (int(t) for t in args.targets.split(",")):
            const_key = (name, arch, tuple(sorted((k, str(v)) for k, v in values.items()
                                                  if k in const_names or k in ("num_warps", "num_stages"))),
                         tuple(_sig(v) for v in values.values() if isinstance(v, torch.Tensor)))
            if const_key in seen:
                continue
            seen.add(const_key)
            t0 = time.perf_counter()
            try:
                res = compile_launch(fn, a, dict(kw), arch)
                ok = res["shared"] <= SMEM_LIMIT[arch]
                rec = dict(kernel=name, arch=arch, ok=ok, seconds=round(time.perf_counter() - t0, 2), **res)
                if not ok:
                    rec["error"] = f"shared memory {res['shared']} > {SMEM_LIMIT[arch]}"
            except Exception as exc:
                rec = dict(kernel=name, arch=arch, ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}",
                           constexprs={k: str(v) for k, v in kw.items()})
            failures += not rec["ok"]
            print(json.dumps(rec, default=str), flush=True)
    print(json.dumps(dict(summary=True, launches=len(seen), failures=failures, triton=triton.__version__)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
