"""Routing front functions: validate, then run the backend chosen once (``lumoe_engine.ops.dispatch``).

- ``topk_routing``: gate logits -> (weights, ids), softmax or sigmoid scores, top-k, threshold, renormalize.
- ``align_by_expert``: ids -> routed rows grouped by expert (``RoutingMeta`` without ids/weights).
- ``build_routing``: both pieces of the metadata the grouped LoRA ops read, built once per forward step.

Validation raises ``ValueError`` naming the argument, what was expected and what to do. It never synchronises with
the device except for the value-range check of ``ids`` (one small reduction), which ``validate=False`` skips.

Legend: T tokens, E experts, k top-k, M = T*k routed rows (flat index m = t*k + j).
"""
from __future__ import annotations

import numbers

import torch

from lumoe_engine.ops.dispatch import get_op
from lumoe_engine.ops.meta import RoutingMeta

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCORINGS = ("softmax", "sigmoid")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits: expected a torch.Tensor [T, E], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-D tensor [T, E], got shape {tuple(logits.shape)}; "
                         "flatten the leading dimensions with .reshape(-1, E)")
    if not logits.is_floating_point():
        raise ValueError(f"logits: expected a floating tensor (fp32/fp16/bf16), got {logits.dtype}; cast with .float()")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits: dtype {logits.dtype} is not supported; expected fp32/fp16/bf16, cast with .float()")
    if logits.shape[1] < 1:
        raise ValueError(f"logits: expected at least one expert (E >= 1), got shape {tuple(logits.shape)}")
    if logits.shape[0] > 0 and logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits: rows must be contiguous (stride(1) == 1), got strides {logits.stride()}; "
                         "call .contiguous()")


def _check_ids(ids, num_experts, validate: bool, name: str = "ids") -> None:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor [T, k] int32, got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [T, k], got shape {tuple(ids.shape)}")
    if ids.dtype != torch.int32:
        raise ValueError(f"{name}: expected int32, got {ids.dtype}; cast with .int()")
    if not ids.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {ids.stride()}; call .contiguous()")
    if validate and ids.numel():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())  # the one device sync
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"{name}: values must lie in [-1, {num_experts}) (-1 = no expert, num_experts="
                             f"{num_experts}), got min {lo} and max {hi}")


def _check_align_args(num_experts, block_m) -> None:
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts: expected an int >= 1, got {num_experts!r}")
    if not _is_int(block_m) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two >= 16 (16, 32, 64, ...), got {block_m!r}")


def topk_routing(logits: torch.Tensor, k: int, *, renormalize: bool = False, threshold: float | None = None,
                 scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """The k best experts of each token: scores ``softmax(logits)`` (or ``sigmoid``), top-k, threshold, renormalize.

    Scores are computed in fp32; the k largest come in descending order, ties to the lowest expert index,
    deterministically. A choice whose score is below ``threshold`` becomes ``id = -1``, ``weight = 0`` (it keeps its
    slot). ``renormalize`` divides the surviving weights of a row by their sum (for softmax: the softmax over the
    chosen logits); a row with no survivor stays all-zero.

    logits: [T, E] fp32/fp16/bf16, rows contiguous        k: int, 1 <= k <= E
    threshold: float in [0, 1] or None                     scoring: "softmax" | "sigmoid"
    returns weights: [T, k] fp32, ids: [T, k] int32 (-1 = no expert)
    """
    _check_logits(logits)
    num_experts = logits.shape[1]
    if not _is_int(k) or not 1 <= k <= num_experts:
        raise ValueError(f"k: expected an int with 1 <= k <= E = {num_experts} (experts in logits [T, E]), got {k!r}")
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize: expected a bool, got {renormalize!r}")
    if threshold is not None:
        if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) \
                or not (0.0 <= float(threshold) <= 1.0):
            raise ValueError(f"threshold: expected None or a float in [0, 1] (a score, like the softmax/sigmoid "
                             f"outputs), got {threshold!r}")
        threshold = float(threshold)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    return get_op("topk_routing")(logits, int(k), renormalize=renormalize, threshold=threshold, scoring=scoring)


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int = 16, *, validate: bool = True) -> RoutingMeta:
    """Group the flat routed rows m = t*k + j by expert (ascending), each group padded to a multiple of ``block_m``.

    Pads hold the sentinel M; rows with ``ids == -1`` are skipped (``inverse = -1``). Order within a group is
    ascending m for the torch backend and may differ for kernels. No host synchronisation, except the range check
    of ``ids`` when ``validate`` (skip it on a hot path whose ids come from ``topk_routing``).

    ids: [T, k] int32 in [-1, E), contiguous       num_experts: E >= 1       block_m: power of two >= 16
    returns RoutingMeta: sorted_ids [P], block_expert [P // block_m], counts [E], offsets [E + 1], inverse [M]
    (int32); ``ids`` is the input, ``weights`` None (``build_routing`` attaches both).
    """
    _check_align_args(num_experts, block_m)
    _check_ids(ids, num_experts, validate)
    return get_op("align_by_expert")(ids, int(num_experts), int(block_m))


def build_routing(weights: torch.Tensor, ids: torch.Tensor, num_experts: int, block_m: int = 16, *,
                  validate: bool = True) -> RoutingMeta:
    """The routing metadata of one forward step: ``align_by_expert(ids)`` with ``ids`` and ``weights`` attached.

    weights: [T, k] fp32 (0 where ids == -1)       ids: [T, k] int32 in [-1, E)
    returns RoutingMeta (see ``lumoe_engine.ops.meta``), shared by every wrapped linear of the step.
    """
    _check_align_args(num_experts, block_m)
    _check_ids(ids, num_experts, validate)
    if not isinstance(weights, torch.Tensor):
        raise ValueError(f"weights: expected a torch.Tensor [T, k] fp32, got {type(weights).__name__}")
    if weights.shape != ids.shape:
        raise ValueError(f"weights: expected the shape of ids {tuple(ids.shape)} ([T, k]), "
                         f"got {tuple(weights.shape)}")
    if weights.dtype != torch.float32:
        raise ValueError(f"weights: expected fp32, got {weights.dtype}; cast with .float()")
    if weights.device != ids.device:
        raise ValueError(f"weights: on {weights.device} but ids on {ids.device}; move both to one device")
    meta = get_op("align_by_expert")(ids, int(num_experts), int(block_m))
    return meta._replace(ids=ids, weights=weights)
