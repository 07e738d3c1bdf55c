"""Torch reference of the routing ops: the CPU backend and the test oracle of the Triton kernels.

Same signatures as ``lumoe_engine.kernels.topk_routing`` and ``lumoe_engine.kernels.align_by_expert``; no input
validation here (the front functions in ``lumoe_engine.ops.routing`` validate). Both are vectorised and, like the
kernels, free of host synchronisation.

Legend: T tokens, E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), P padded length.
"""
from __future__ import annotations

import torch

from lumoe_engine.ops.meta import RoutingMeta, padded_length


def topk_routing(logits: torch.Tensor, k: int, *, renormalize: bool = False, threshold: float | None = None,
                 scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """The k best experts of each token: scores ``softmax(logits)`` (or ``sigmoid``), top-k, threshold, renormalize.

    Scores are computed in fp32; the k largest come in descending order, ties to the lowest expert index. A choice
    whose score is below ``threshold`` becomes ``id = -1``, ``weight = 0`` (it keeps its slot). ``renormalize``
    divides the surviving weights of a row by their sum (a row with no survivor stays all-zero).

    logits: [T, E] fp32/fp16/bf16            k: 1 <= k <= E
    returns weights: [T, k] fp32, ids: [T, k] int32
    """
    x = logits.float()
    if scoring == "softmax":
        scores = torch.softmax(x, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(x)
    else:
        raise ValueError(f"scoring={scoring!r}: expected 'softmax' or 'sigmoid'")
    weights, ids = _topk_lowest_index(scores, k)
    if threshold is not None:
        keep = weights >= threshold
        weights = torch.where(keep, weights, torch.zeros_like(weights))
        ids = torch.where(keep, ids, torch.full_like(ids, -1))
    if renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        weights = torch.where(total > 0, weights / torch.where(total > 0, total, torch.ones_like(total)),
                              torch.zeros_like(weights))
    return weights, ids


def _topk_lowest_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row, descending, ties to the lowest index: scores [T, E] -> values [T, k], ids [T, k].

    ``torch.topk`` does not promise which of equal values it returns. On CPU (where reading a flag costs nothing):
    the top k+1 of a row, when strictly decreasing, are unambiguous, and only rows with a tie among them take the
    exact path. Elsewhere (CUDA, meta) every row takes the exact path, which needs no host synchronisation.
    NOTE: T=1024, E=4096, k=2 on this 2-core CPU: 46 ms with the fast path, ~330 ms exact path only.
    """
    if scores.device.type != "cpu":
        return _topk_ties(scores, k)
    E = scores.shape[-1]
    vals, idx = torch.topk(scores, min(k + 1, E), dim=-1)
    values, ids = vals[:, :k].contiguous(), idx[:, :k].to(torch.int32)
    tied = (vals[:, :-1] == vals[:, 1:]).any(dim=-1)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(-1)
        v, i = _topk_ties(scores.index_select(0, rows), k)
        values = values.index_copy(0, rows, v)
        ids = ids.index_copy(0, rows, i)
    return values, ids


def _topk_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact lowest-index tie-break without host sync: the k-th largest value, every score above it plus the
    lowest-index scores equal to it (exactly k per row), taken in index order, then a stable sort of those k."""
    E = scores.shape[-1]
    kth = torch.topk(scores, k, dim=-1).values[:, k - 1:]
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(dim=-1, keepdim=True)
    chosen = above | (tied & (torch.cumsum(tied, dim=-1) <= room))
    position = torch.arange(E, device=scores.device, dtype=scores.dtype).expand_as(scores)
    ids = torch.topk(torch.where(chosen, -position, float("-inf")), k, dim=-1).indices  # ascending index
    values, order = torch.sort(scores.gather(-1, ids), dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, order).to(torch.int32)


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> RoutingMeta:
    """Group the flat routed rows m = t*k + j by expert (ascending), each group padded to a multiple of ``block_m``.

    Within a group rows are in ascending m; pads hold the sentinel M; rows with ``ids == -1`` are skipped
    (``inverse = -1``). The padded length P = ``padded_length(M, E, block_m)`` comes from shapes alone.

    ids: [T, k] int32 in [-1, E)
    returns RoutingMeta with sorted_ids [P], block_expert [P // block_m] (-1 past the end), counts [E],
    offsets [E + 1] (offsets[E] = used length), inverse [M], all int32; ``ids`` is the input and ``weights`` is None
    (``build_routing`` attaches the routing weights).
    """
    device = ids.device
    E, M = num_experts, ids.numel()
    P = padded_length(M, E, block_m)
    flat = ids.reshape(-1).long()
    # Skipped rows (-1) go to an extra bucket E, sorted last and dropped.
    key = torch.where(flat < 0, torch.full_like(flat, E), flat)
    counts_ext = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(0, key, torch.ones_like(key))
    counts = counts_ext[:E]
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(E + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(padded, 0)
    group_start = torch.cumsum(counts_ext, 0) - counts_ext  # start of each bucket in the unpadded sorted order

    order = torch.argsort(key, stable=True)  # ascending expert, ascending m within one expert
    key_sorted = key[order]
    rank = torch.arange(M, device=device) - group_start[key_sorted]
    valid = key_sorted < E
    # Skipped rows are written to a scratch slot P that is cut off afterwards.
    pos = torch.where(valid, offsets[key_sorted.clamp(max=E - 1)] + rank, torch.full_like(rank, P))

    sorted_ids = torch.full((P + 1,), M, dtype=torch.long, device=device)
    sorted_ids.scatter_(0, pos, order)
    inverse = torch.empty(M, dtype=torch.long, device=device)
    inverse[order] = torch.where(valid, pos, torch.full_like(pos, -1))

    block_start = torch.arange(P // block_m, device=device) * block_m
    block_expert = torch.searchsorted(offsets[1:], block_start, right=True)  # first e with offsets[e+1] > start
    block_expert = torch.where(block_start < offsets[E], block_expert, torch.full_like(block_expert, -1))

    i32 = torch.int32
    return RoutingMeta(ids=ids, weights=None, sorted_ids=sorted_ids[:P].to(i32), block_expert=block_expert.to(i32),
                       counts=counts.to(i32), offsets=offsets.to(i32), inverse=inverse.to(i32), block_m=block_m)
