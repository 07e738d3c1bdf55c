"""The C++ CPU backend of the grouped LoRA ops (``csrc/grouped_lora.cpp``), compiled on first use.

Same signatures as the torch reference (``lumoe_engine.ops.ref_lora``) and the Triton launchers. The extension is
built once per machine / Python / torch version with ``torch.utils.cpp_extension.load`` into
``$LUMOE_CACHE/torch_extensions`` (default ``~/.cache/lumoe-engine/torch_extensions``), with ``-O3``, OpenMP (the
runtime torch itself uses, so ``torch.set_num_threads`` applies) and ``-march=native`` (the build directory is keyed
by the CPU, so a shared cache never serves code built for another CPU). Flags the compiler rejects are dropped one
at a time; if nothing builds (no C++ compiler, no ninja), ``available()`` warns once and returns False, and
``lumoe_engine.ops.dispatch`` keeps the torch reference.

Legend: T tokens (rows of x), E experts, k top-k, M = T*k routed rows, S slices, H input features,
N output features of all slices together, R max rank.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from lumoe_engine.ops.meta import RoutingMeta

logger = logging.getLogger("lumoe_engine.ops")

_SOURCE = "grouped_lora.cpp"
_lock = threading.Lock()
_ext: ModuleType | None = None
_tried = False
_error: str | None = None


def source_dir() -> Path:
    """The folder holding ``grouped_lora.cpp``: the installed ``lumoe_engine.csrc`` package data, else the repo's
    ``csrc/`` next to the package."""
    candidates = []
    try:
        import lumoe_engine.csrc as csrc_pkg

        candidates.append(Path(csrc_pkg.__file__).parent)
    except ImportError:
        pass
    import lumoe_engine

    candidates.append(Path(lumoe_engine.__file__).resolve().parent.parent / "csrc")
    for folder in candidates:
        if (folder / _SOURCE).is_file():
            return folder
    raise FileNotFoundError(f"{_SOURCE} not found in {[str(c) for c in candidates]}; reinstall lumoe-engine "
                            "(pip install -e .) so that csrc/ ships with the package")


def build_root() -> Path:
    """``$LUMOE_CACHE/torch_extensions`` or ``~/.cache/lumoe-engine/torch_extensions``, per Python and torch."""
    base = os.environ.get("LUMOE_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "lumoe-engine"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return root / "torch_extensions" / tag


def _cpu_key() -> str:
    """A short hash naming this CPU (architecture, model, feature flags): -march=native code is keyed by it."""
    text = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features", "CPU part")):
                text += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _variants() -> list[tuple[str, list[str], list[str]]]:
    """(name suffix, cflags, ldflags), best first: a flag the compiler rejects costs one variant."""
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp
    native = ["-march=native"] if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64") else []
    out = []
    if native and openmp:
        out.append((f"omp_native_{_cpu_key()}", ["-O3", *openmp, *native], openmp))
    if openmp:
        out.append(("omp", ["-O3", *openmp], openmp))
    out.append(("serial", ["-O3"], []))
    return out


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH); install g++ or clang++, or set CXX")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts its binary next to the interpreter)
        except ImportError:
            raise RuntimeError("ninja is not installed; pip install ninja") from None
    source = source_dir() / _SOURCE
    errors = []
    for suffix, cflags, ldflags in _variants():
        folder = build_root() / f"lumoe_grouped_lora_{suffix}"
        if not any(folder.glob("*.so")):
            logger.info("building the C++ op in %s (first use: about a minute)", folder)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            mod = cpp_extension.load(name=f"lumoe_grouped_lora_{suffix}", sources=[str(source)],
                                     extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(folder),
                                     verbose=os.environ.get("LUMOE_CPP_VERBOSE") == "1")
        except Exception as exc:  # a rejected flag, a compiler error: try the next variant
            errors.append(f"{' '.join(cflags)}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}")
            logger.debug("building %s with %s failed: %s", source, cflags, exc)
            continue
        if suffix == "serial":
            warnings.warn("lumoe_engine C++ op built without OpenMP: it runs on one thread", stacklevel=3)
        logger.info("lumoe_engine C++ op: %s (%s)", folder, " ".join(cflags))
        return mod
    raise RuntimeError("; ".join(errors))


def available() -> bool:
    """True when the C++ op is built and loaded (builds it on the first call; later calls are free).

    On failure, warns once with the reason and returns False (callers fall back to the torch reference).
    """
    global _ext, _tried, _error
    if _tried:
        return _ext is not None
    with _lock:
        if not _tried:
            try:
                _ext = _build()
            except Exception as exc:
                _error = str(exc)
                warnings.warn(f"lumoe_engine C++ op unavailable, using the torch reference instead: {exc}. "
                              "Set LUMOE_BACKEND=torch to silence this.", RuntimeWarning, stacklevel=2)
            _tried = True
    return _ext is not None


def _module() -> ModuleType:
    if not available():
        raise RuntimeError(f"the lumoe_engine C++ op could not be built ({_error}); use LUMOE_BACKEND=torch")
    assert _ext is not None
    return _ext


def _index(t: torch.Tensor | None, name: str) -> torch.Tensor:
    """An int32, contiguous CPU view of an index tensor (copied only when it is not one already)."""
    if t is None:
        raise ValueError(f"{name} is None; build the routing metadata with lumoe_engine.ops.build_routing")
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (int32), got {getattr(t, 'dtype', type(t))}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; the C++ op is the CPU backend, use LUMOE_BACKEND=triton on a GPU")
    return t.to(torch.int32).contiguous()


def _fp32(t: torch.Tensor | None, name: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"{name} is None; build the routing metadata with lumoe_engine.ops.build_routing")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be fp32, got {t.dtype}")
    return t.contiguous()


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: RoutingMeta, ranks: torch.Tensor, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``buf[s, m, :] = x[m // k] @ lora_a[s, e_m].T``; columns r >= ranks[e_m] and rows with e_m = -1 are zero.

    x: [T, H] fp32/fp16/bf16; lora_a: [S, E, R, H] dtype of x; meta: routing of T tokens (sorted_ids, offsets, ids);
    ranks: [E] int32 in [0, R]; out: [S, M, R] fp32 (every element written; allocated when None).
    Returns buf [S, M, R] fp32.
    """
    ext = _module()
    if lora_a.dim() != 4:
        raise ValueError(f"lora_a must have shape [S, E, R, H], got {tuple(lora_a.shape)}")
    s_count, _, r_max, _ = lora_a.shape
    ids = _index(meta.ids, "meta.ids")
    shape = (s_count, ids.numel(), r_max)
    if out is not None and (tuple(out.shape) != shape or out.dtype != torch.float32):
        raise ValueError(f"out must be fp32 [S, M, R] = {list(shape)}, got {out.dtype} {list(out.shape)}")
    target = out if out is not None and out.is_contiguous() else torch.empty(shape, dtype=torch.float32)
    ext.lora_shrink(x, lora_a, _index(meta.sorted_ids, "meta.sorted_ids"), _index(meta.offsets, "meta.offsets"),
                    ids, _index(ranks, "ranks"), target)
    if out is not None and target is not out:          # a strided out: computed contiguous, then copied in
        out.copy_(target)
        return out
    return target


def lora_expand(buf: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor, meta: RoutingMeta,
                scales: torch.Tensor, ranks: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y[t, n_s] += sum_j w[t, j] * scales[e] * buf[s, t*k+j, :ranks[e]] @ lora_b[e, n_s, :ranks[e]].T``.

    Per slice s, ``n_s = slice_offsets[s]:slice_offsets[s+1]``, e = meta.ids[t, j]; fp32 accumulation, the k terms
    summed in order j = 0..k-1 (deterministic); rows whose ids are all -1 are left untouched (bitwise).
    buf: [S, M, R] fp32; lora_b: [E, N, R] dtype of y; slice_offsets: [S+1] int32; scales: [E] fp32;
    ranks: [E] int32; y: [T, N] fp32/fp16/bf16, updated in place and returned.
    """
    ext = _module()
    return ext.lora_expand(buf, lora_b, _index(slice_offsets, "slice_offsets"),
                           _index(meta.sorted_ids, "meta.sorted_ids"), _index(meta.offsets, "meta.offsets"),
                           _index(meta.ids, "meta.ids"), _fp32(meta.weights, "meta.weights"), _fp32(scales, "scales"),
                           _index(ranks, "ranks"), y)


def lora_shrink_expand(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor,
                       ids: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
    """``lora_shrink`` then ``lora_expand`` in one call, from the routing itself (no alignment metadata).

    The rows are grouped by expert inside the op; the rank vectors stay in per-thread scratch (no [S, M, R] buffer).
    x: [T, H]; lora_a: [S, E, R, H] dtype of x; lora_b: [E, N, R] dtype of y; slice_offsets: [S+1] int32;
    ids: [T, k] int32 (-1 = no expert); weights: [T, k] fp32; scales: [E] fp32; ranks: [E] int32;
    y: [T, N], updated in place and returned.
    """
    ext = _module()
    return ext.lora_shrink_expand(x, lora_a, lora_b, _index(slice_offsets, "slice_offsets"), _index(ids, "ids"),
                                  _fp32(weights, "weights"), _fp32(scales, "scales"), _index(ranks, "ranks"), y)
