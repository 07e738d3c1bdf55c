"""Launch configurations of the LoRA kernels, per shape, and how 16-bit operands reach ``tl.dot``.

**The key** of a configuration is ``(op, dtype, hidden, rank, rows bucket)`` (``config_key``):
- ``op``: ``lora_shrink``, ``lora_expand`` (grouped, over ``RoutingMeta``), ``lora_decode_shrink``,
  ``lora_decode_expand`` (the two halves of ``lora_shrink_expand``), ``lora_grad_a``, ``lora_grad_b``
  (``lora_weight_grad``);
- ``dtype``: ``bf16`` / ``fp16`` / ``fp32``, the dtype of the LoRA weights;
- ``hidden``: the feature size the op streams over: H (input features) for the shrinks and ``lora_grad_a``, N (output
  features of all slices) for the expands and ``lora_grad_b``;
- ``rank``: R, the max rank of the stacked weights;
- rows bucket: routed rows M = T*k rounded up to a power of two, at most 16,384 (``rows_bucket``).

**The lookup** (``get_config``): an override (``override``, used by the tuner and the tests), else the table in effect
(``LUMOE_KERNEL_CONFIGS=path.json``; else, on a GPU, ``kernels/tables/<device>.json`` shipped with the code, updated
by ``$LUMOE_CACHE/kernel_configs/<device>.json`` as written by ``benchmarks/bench_kernels.py --tune`` on that device):
the exact key, else the nearest rows bucket with the same (op, dtype, hidden, rank); else ``default_config``,
computed from the key alone and safe on every device (every dot block >= 16, at most 48 KB of tiles in flight). The
table is read once per process (``reset_configs`` forgets it). A table written for another device is ignored with a
warning (block sizes that fit one GPU's shared memory may not fit another's). No table is shipped yet: none has
been measured on a GPU.

**Dot operands** (``dot_flags``): on a GPU, fp16/bf16 tiles go into ``tl.dot`` as they are (tensor cores, fp32
accumulation; ``DOT16``); fp32 tiles use exact fp32 products (``input_precision="ieee"``) unless ``LUMOE_TF32=1``
(``TF32``). Under the Triton interpreter every tile is converted to fp32 right after ``tl.load`` (the interpreter's
bf16 arithmetic is wrong), so neither flag is set there; ``force_dot16`` turns DOT16 on anyway (fp16 is exact in the
interpreter: the tests run the GPU code path with it).

Legend: T tokens, k top-k, M = T*k routed rows, H input features, N output features, R max rank.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

logger = logging.getLogger("lumoe_engine.kernels")

OPS = ("lora_shrink", "lora_expand", "lora_decode_shrink", "lora_decode_expand", "lora_grad_a", "lora_grad_b")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MAX_ROWS_BUCKET = 16384
MAX_BLOCK_R = 64      # rank tile: the whole rank up to 64 (x is read once per row block), ranks padded to >= 16
MIN_DOT = 16          # tl.dot needs every block dimension >= 16 on a GPU (the interpreter would accept less)
# NOTE: 48 KB of tiles in flight (all pipeline stages together) leaves room on every GPU Triton supports (the
# smallest shared memory per block is 64 KB on sm75 / consumer parts); a tuned table may go beyond it.
SAFE_SMEM_BYTES = 48 * 1024


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# Host-side helpers for the launchers: ``triton.cdiv`` / ``triton.next_power_of_2`` are constexpr functions that cost
# ~2.5 us per host call (triton 3.9, measured here), a launch makes several, and a decode launch has a few us to
# spend in all.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. Which fields an op reads:

    - ``lora_shrink``: block_m (rows per program, <= meta.block_m), block_k (H per step), split_k (H split over
      programs; partial sums added in a fixed order), num_warps, num_stages;
    - ``lora_expand``: block_m, block_n (N per program), num_warps, num_stages;
    - ``lora_decode_shrink``: block_k, split_k, num_warps;  ``lora_decode_expand``: block_n, num_warps;
    - ``lora_grad_a`` / ``lora_grad_b``: block_n (H resp. N per program), block_k (rows per step), split_k (most
      programs one expert's rows are split over; partials added in a fixed order), num_warps, num_stages.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or not _pow2(v) or v < MIN_DOT:
                raise ValueError(f"KernelConfig.{name}={v!r}: expected a power of two >= {MIN_DOT} "
                                 "(tl.dot blocks below 16 fail on GPUs)")
        if not isinstance(self.split_k, int) or not 1 <= self.split_k <= 256:
            raise ValueError(f"KernelConfig.split_k={self.split_k!r}: expected an int in [1, 256]")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps={self.num_warps!r}: expected 1, 2, 4, 8 or 16")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"KernelConfig.num_stages={self.num_stages!r}: expected an int in [1, 8]")

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        return (f"bm{self.block_m}_bn{self.block_n}_bk{self.block_k}_sk{self.split_k}_w{self.num_warps}"
                f"_s{self.num_stages}")


# ---------------------------------------------------------------------------------------------------------- keys
def rows_bucket(rows: int) -> int:
    """M = T*k rounded up to a power of two, in [1, 16384]."""
    return min(MAX_ROWS_BUCKET, next_pow2(max(1, int(rows))))


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype}: expected fp32, fp16 or bf16")
    return DTYPE_NAMES[dtype]


def config_key(op: str, dtype: torch.dtype | str, hidden: int, rank: int, rows: int) -> str:
    """``op/dtype/h<hidden>/r<rank>/m<rows bucket>``, e.g. ``lora_shrink/bf16/h4096/r16/m4096``."""
    if op not in OPS:
        raise ValueError(f"op {op!r}: expected one of {OPS}")
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    return f"{op}/{name}/h{int(hidden)}/r{int(rank)}/m{rows_bucket(rows)}"


def parse_key(key: str) -> tuple[str, str, int, int, int]:
    op, dtype, h, r, m = key.split("/")
    return op, dtype, int(h[1:]), int(r[1:]), int(m[1:])


def block_r(rank: int) -> int:
    """The rank tile: the whole (padded) rank up to 64, at least 16 (a dot dimension)."""
    return min(MAX_BLOCK_R, max(MIN_DOT, next_pow2(max(1, int(rank)))))


# ---------------------------------------------------------------------------------------------------------- defaults
def _prev_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def default_config(op: str, dtype: torch.dtype | str, hidden: int, rank: int, rows: int) -> KernelConfig:
    """The configuration used when the table has none: a function of the key alone, safe on every device.

    NOTE: none of these has been measured on a GPU yet (the starting points are vLLM's LoRA defaults, block_m 16-64,
    block_k 16-256, num_warps 4, num_stages 2, and the tile arithmetic below); ``bench_kernels.py --tune`` replaces
    them per shape on a GPU. What they follow:
    - grouped shrink: a program per 16 routed rows (one expert each); H split over up to 8 programs while there are
      fewer than ~128 row blocks (small T would otherwise run on a handful of programs);
    - decode shrink: one routed row per program, so H is split until ~64 programs per row or one step each;
    - weight gradients: an expert's rows split over up to 32 programs (the launcher caps it by rows per expert).
    """
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    el = 4 if name == "fp32" else 2
    br = block_r(rank)
    m = rows_bucket(rows)
    if op == "lora_shrink":
        block_k = 128 if el == 2 else 64          # tiles per stage: 16 x bk + bk x 64, 20 KB (bf16) / 24 KB (fp32)
        blocks = cdiv(m, 16)
        split = max(1, min(8, _prev_pow2(max(1, 128 // blocks)), max(1, hidden // (4 * block_k))))
        return KernelConfig(block_m=16, block_k=block_k, split_k=split if blocks < 128 else 1)
    if op == "lora_expand":
        block_n = 128 if el == 2 else 64          # tiles: 16 x br (fp32 buf) + br x bn, <= 20 KB per stage
        return KernelConfig(block_m=16, block_n=block_n)
    if op == "lora_decode_shrink":
        block_k = max(64, min(512, 4096 // br))   # a [br, bk] fp32 tile of 4,096 elements (32 registers/thread)
        steps = cdiv(hidden, block_k)
        return KernelConfig(block_k=block_k, split_k=max(1, min(16 if m <= 64 else 4, steps)))
    if op == "lora_decode_expand":
        return KernelConfig(block_n=max(32, min(256, 4096 // br)))
    if op in ("lora_grad_a", "lora_grad_b"):
        return KernelConfig(block_n=64, block_k=32, split_k=32)
    raise ValueError(f"op {op!r}: expected one of {OPS}")


def candidates(op: str, dtype: torch.dtype | str, hidden: int, rank: int, rows: int) -> list[KernelConfig]:
    """What the tuner tries for one key: the default first, then a small sweep around it (valid everywhere the
    tuner runs; it keeps only those that compile and agree with the default's result)."""
    base = default_config(op, dtype, hidden, rank, rows)
    m = rows_bucket(rows)
    out = [base]

    def add(**kw):
        cfg = KernelConfig(**{**base.to_dict(), **kw})
        if cfg not in out:
            out.append(cfg)

    if op == "lora_shrink":
        for bk in (64, 128, 256):
            for sk in sorted({1, 2, 4, 8} if m <= 1024 else {1, 2}):
                add(block_k=bk, split_k=sk)
        add(block_m=32, block_k=128, split_k=1)
        add(block_m=64, block_k=64, split_k=1)
        add(block_k=128, num_stages=3)
        add(block_k=128, num_warps=8)
    elif op == "lora_expand":
        for bn in (64, 128, 256):
            add(block_n=bn)
            add(block_n=bn, num_warps=8)
        add(block_m=32, block_n=128)
        add(block_m=64, block_n=64)
        add(block_n=128, num_stages=3)
    elif op == "lora_decode_shrink":
        for bk in (64, 128, 256, 512):
            for sk in (1, 4, 8, 16, 32):
                add(block_k=bk, split_k=sk)
    elif op == "lora_decode_expand":
        for bn in (32, 64, 128, 256):
            add(block_n=bn)
            add(block_n=bn, num_warps=8)
    else:
        for bn in (64, 128):
            for bk in (32, 64):
                for sk in (8, 32, 64):
                    add(block_n=bn, block_k=bk, split_k=sk)
    return out


# ---------------------------------------------------------------------------------------------------------- the table
_lock = threading.Lock()
_table: dict | None = None
_table_path: str | None = None
_overrides: dict[str, KernelConfig] = {}
_memo: dict[tuple, tuple[KernelConfig, str]] = {}
_force_dot16 = False


def device_name(device: torch.device | str | None = None) -> str:
    """The device a table belongs to: the CUDA device name, or ``interpreter`` (Triton on the CPU)."""
    if torch.cuda.is_available() and not interpreting():
        return torch.cuda.get_device_name(device)
    return "interpreter"


def device_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "device"


def cache_table_path(name: str | None = None) -> Path:
    """``$LUMOE_CACHE/kernel_configs/<device>.json`` (default cache ``~/.cache/lumoe-engine``)."""
    base = os.environ.get("LUMOE_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "lumoe-engine"
    return root / "kernel_configs" / f"{device_slug(name or device_name())}.json"


def shipped_table_path(name: str | None = None) -> Path:
    """``lumoe_engine/kernels/tables/<device>.json``: a table measured on that device and committed with the code."""
    return Path(__file__).resolve().parent / "tables" / f"{device_slug(name or device_name())}.json"


def _read_table(path: Path, here: str) -> dict:
    """The entries of one table file, or {} (with a warning) when it is another device's or unreadable."""
    try:
        doc = json.loads(path.read_text())
        if doc.get("device") != here:
            warnings.warn(f"kernel config table {path} was written on {doc.get('device')!r}, this is {here!r}: "
                          "ignored (tune on this device with benchmarks/bench_kernels.py --tune)", RuntimeWarning,
                          stacklevel=4)
            return {}
        return {k: KernelConfig.from_dict(v) for k, v in doc.get("entries", {}).items()}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        warnings.warn(f"kernel config table {path} is unreadable ({exc}); using the defaults", RuntimeWarning,
                      stacklevel=4)
        return {}


def _load() -> dict:
    """The table in effect: ``LUMOE_KERNEL_CONFIGS`` alone when set; otherwise, on a GPU, the shipped table of this
    device updated by the cached one (``cache_table_path``). The interpreter reads a table only when named."""
    global _table, _table_path
    if _table is not None:
        return _table
    with _lock:
        if _table is not None:
            return _table
        env = os.environ.get("LUMOE_KERNEL_CONFIGS", "").strip()
        here = device_name()
        entries: dict = {}
        used = []
        if env:
            path = Path(env).expanduser()
            if path.is_file():
                entries = _read_table(path, here)
                used = [str(path)] if entries else []
            else:
                warnings.warn(f"LUMOE_KERNEL_CONFIGS={env}: no such file; using the defaults", RuntimeWarning,
                              stacklevel=3)
        elif here != "interpreter":
            for path in (shipped_table_path(here), cache_table_path(here)):
                if path.is_file():
                    found = _read_table(path, here)
                    entries.update(found)
                    used += [str(path)] if found else []
        if entries:
            logger.info("kernel configs: %d entries from %s", len(entries), ", ".join(used))
        _table, _table_path = entries, ", ".join(used) or None
        return _table


def reset_configs() -> None:
    """Forget the loaded table (it is read again on the next lookup)."""
    global _table, _table_path
    with _lock:
        _table, _table_path = None, None
        _memo.clear()


def table_path() -> str | None:
    """The file the table in effect came from (None: defaults only)."""
    _load()
    return _table_path


def lookup(op: str, dtype: torch.dtype, hidden: int, rank: int, rows: int) -> tuple[KernelConfig, str]:
    """(config, source) for a launch; source is ``override``, ``table``, ``table~`` (nearest rows bucket) or
    ``default``. Memoised per key (a launch pays one dict lookup; ``reset_configs`` clears it)."""
    if _overrides and op in _overrides:
        return _overrides[op], "override"
    memo_key = (op, dtype, hidden, rank, rows_bucket(rows))
    hit = _memo.get(memo_key)
    if hit is not None:
        return hit
    key = config_key(op, dtype, hidden, rank, rows)
    table = _load()
    found = None
    if key in table:
        found = table[key], "table"
    elif table:
        op_, dt, h, r, m = parse_key(key)
        near = [(abs(pm.bit_length() - m.bit_length()), -pm, k) for k in table
                for (po, pd, ph, pr, pm) in [parse_key(k)] if (po, pd, ph, pr) == (op_, dt, h, r)]
        if near:
            found = table[min(near)[2]], "table~"
    if found is None:
        found = default_config(op, dtype, hidden, rank, rows), "default"
    _memo[memo_key] = found
    return found


def get_config(op: str, dtype: torch.dtype, hidden: int, rank: int, rows: int) -> KernelConfig:
    return lookup(op, dtype, hidden, rank, rows)[0]


@contextmanager
def override(op: str, cfg: KernelConfig):
    """Use ``cfg`` for every launch of ``op`` inside the block (the tuner's sweep, tests of non-default paths)."""
    if op not in OPS:
        raise ValueError(f"op {op!r}: expected one of {OPS}")
    old = _overrides.get(op)
    _overrides[op] = cfg
    try:
        yield cfg
    finally:
        if old is None:
            _overrides.pop(op, None)
        else:
            _overrides[op] = old


def write_table(path: Path | str, entries: dict[str, KernelConfig | dict], device: str, extra: dict | None = None,
                merge: bool = True) -> Path:
    """Write (or merge into) a table file: ``{"device", "entries": {key: config}, ...extra}``, atomically."""
    path = Path(path)
    doc = {"device": device, "entries": {}}
    if merge and path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("device") == device:
                doc["entries"].update(old.get("entries", {}))
        except (OSError, ValueError):
            pass
    for key, cfg in entries.items():
        parse_key(key)
        doc["entries"][key] = cfg.to_dict() if isinstance(cfg, KernelConfig) else dict(cfg)
    doc.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------------- dots
def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compiled(t: torch.Tensor) -> bool:
    """True when a launch on ``t`` compiles for a GPU (a CUDA tensor, no interpreter)."""
    return t.is_cuda and not interpreting()


def tf32_enabled() -> bool:
    """``LUMOE_TF32=1``: fp32 dots may use tf32 tensor cores (10-bit mantissa products); off by default."""
    return os.environ.get("LUMOE_TF32", "0") == "1"


def dot_flags(dtype: torch.dtype, on_gpu: bool) -> tuple[bool, bool]:
    """(DOT16, TF32) constexprs of a launch: DOT16 = 16-bit tiles straight into tl.dot (GPU, fp16/bf16, or forced
    by ``force_dot16`` for fp16 in the interpreter); TF32 = fp32 dots in tf32 (GPU, fp32, ``LUMOE_TF32=1``)."""
    if dtype == torch.float32:
        return False, bool(on_gpu and tf32_enabled())
    if on_gpu:
        return True, False
    return bool(_force_dot16 and dtype == torch.float16), False


@contextmanager
def force_dot16(enabled: bool = True):
    """Inside the block, fp16 launches in the interpreter take the GPU's 16-bit dot path (bf16 never does there:
    the interpreter's bf16 arithmetic is wrong)."""
    global _force_dot16
    old = _force_dot16
    _force_dot16 = bool(enabled)
    try:
        yield
    finally:
        _force_dot16 = old


def launch_options(cfg: KernelConfig) -> dict:
    """The ``num_warps`` / ``num_stages`` launch options of ``cfg`` (the interpreter ignores them)."""
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ---------------------------------------------------------------------------------------------------------- tuning
@dataclass
class TuneResult:
    key: str
    best: KernelConfig
    best_ms: float
    default_ms: float
    tried: list            # (config, ms or None, note)


def tune(op: str, dtype: torch.dtype, hidden: int, rank: int, rows: int, run, timer, *, timed=None, check=None,
         sweep: list[KernelConfig] | None = None, log=None) -> TuneResult:
    """Time ``run()`` under every candidate configuration of one key and keep the fastest that agrees with the
    default's result.

    run: () -> tensor, one launch of ``op`` at the key's shape on fresh outputs (called under ``override(op, cfg)``);
    timed: what the timer runs (default ``run``; e.g. the launch alone, updating an output in place);
    timer: (fn) -> ms (``triton.testing.do_bench`` on a GPU; any timer on the CPU, e.g. in the interpreter);
    check: (got, want) -> bool, default ``torch.allclose`` at 1e-2 (a config must compute the same thing).
    sweep: the configurations to try (default ``candidates``; the first is the reference result).
    A candidate that fails to compile or run, or disagrees, is skipped (noted in ``tried``).
    """
    key = config_key(op, dtype, hidden, rank, rows)
    cands = sweep or candidates(op, dtype, hidden, rank, rows)
    check = check or (lambda got, want: torch.allclose(got.float(), want.float(), atol=1e-2, rtol=1e-2))
    want = None
    tried = []
    for cfg in cands:
        try:
            with override(op, cfg):
                got = run()
                if want is None:
                    want = got.clone()
                elif not check(got, want):
                    tried.append((cfg, None, "disagrees with the default"))
                    continue
                ms = float(timer(timed or run))
        except Exception as exc:  # out of shared memory, registers, ...: not a candidate on this device
            tried.append((cfg, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"))
            continue
        tried.append((cfg, ms, ""))
        if log:
            log(f"  {key} {cfg.short()}: {ms:.4f} ms")
    timed = [(ms, i, cfg) for i, (cfg, ms, _) in enumerate(tried) if ms is not None]
    if not timed:
        raise RuntimeError(f"{key}: no candidate ran ({[n for _, _, n in tried]})")
    best_ms, _, best = min(timed)
    default_ms = next((ms for cfg, ms, _ in tried if cfg == cands[0] and ms is not None), float("nan"))
    return TuneResult(key, best, best_ms, default_ms, tried)
