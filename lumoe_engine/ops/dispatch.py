"""Backend dispatch, decided once per process and logged once.

``LUMOE_BACKEND`` = ``auto`` (default) | ``triton`` | ``torch`` | ``cpp``.

- ``auto``: Triton when CUDA is available; otherwise the C++ CPU op for the grouped LoRA matmuls (if it compiles)
  and the torch reference for the rest.
- ``triton``: the Triton kernels (on CPU only under ``TRITON_INTERPRET=1``, which is how the tests run them).
- ``torch``: the torch reference (the CPU backend and the test oracle).
- ``cpp``: the C++ op for grouped LoRA shrink/expand, the torch reference for routing and alignment; falls back to
  the torch reference, with one warning, when no compiler is there.

Every backend module exposes functions with the same signatures; a backend missing one falls back to the reference.
"""
from __future__ import annotations

import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger("lumoe_engine.ops")

BACKENDS = ("auto", "triton", "torch", "cpp")
OPS = ("topk_routing", "align_by_expert", "lora_shrink", "lora_expand", "lora_shrink_expand", "lora_weight_grad")

_resolved: dict[str, object] | None = None
_name: str | None = None


def _triton_module() -> ModuleType:
    from lumoe_engine.ops import triton_backend

    return triton_backend


def _cpp_module() -> ModuleType | None:
    from lumoe_engine.ops import cpp

    return cpp if cpp.available() else None


def _resolve() -> dict[str, object]:
    global _resolved, _name
    if _resolved is not None:
        return _resolved
    from lumoe_engine.ops import reference

    choice = os.environ.get("LUMOE_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"LUMOE_BACKEND={choice!r} is not one of {BACKENDS}; unset it or pick one of those")
    table = {op: getattr(reference, op) for op in OPS}
    name = "torch"
    if choice == "triton" or (choice == "auto" and torch.cuda.is_available()):
        mod = _triton_module()
        table.update({op: getattr(mod, op) for op in OPS if hasattr(mod, op)})
        name = "triton"
    elif choice in ("cpp", "auto"):
        mod = _cpp_module()
        if mod is not None:
            table.update({op: getattr(mod, op) for op in OPS if hasattr(mod, op)})
            name = "cpp"
    _resolved, _name = table, name
    logger.info("lumoe_engine ops backend: %s (LUMOE_BACKEND=%s)", name, choice)
    return table


def backend_name() -> str:
    """The backend in use (``triton``, ``cpp`` or ``torch``), resolving it on first call."""
    _resolve()
    assert _name is not None
    return _name


def get_op(op: str):
    """The implementation of ``op`` for the backend in use."""
    return _resolve()[op]


def reset_backend() -> None:
    """Forget the decision (tests switch ``LUMOE_BACKEND`` within one process)."""
    global _resolved, _name
    _resolved, _name = None, None
