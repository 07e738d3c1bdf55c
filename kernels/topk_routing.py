"""Fused top-k routing: gate logits -> scores (softmax or sigmoid) -> top-k -> threshold -> renormalize, one launch.

One program per token row. A row of at most ``MAX_BLOCK_E`` experts is scored once and kept in registers; a wider
row is processed in chunks of ``MAX_BLOCK_E``: an online max/sum pass gives the softmax statistics, then each of the
k selection passes rescans the row. Pass j picks the best score that ranks after pick j-1 in the order
(score descending, expert index ascending), so ties go to the lowest index and the result is deterministic.

Legend: T tokens, E experts, k top-k.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lumoe_engine.kernels.configs import next_pow2

# NOTE: one block holds the gate's typical 1,000 experts (one chunk, one load); wider rows loop over chunks.
# Not yet swept on a GPU.
MAX_BLOCK_E = 1024


@triton.jit
def _scores(row_ptr, idx, E, row_max, row_sum, SIGMOID: tl.constexpr):
    """fp32 scores of experts ``idx`` of one row (-1 where idx >= E, below every score)."""
    x = tl.load(row_ptr + idx, mask=idx < E, other=0.0).to(tl.float32)
    if SIGMOID:
        s = tl.sigmoid(x)
    else:
        s = tl.exp(x - row_max) / row_sum
    return tl.where(idx < E, s, -1.0)


@triton.jit
def _best_after(s, idx, E, prev_v, prev_i):
    """Best (score, index) among experts ranking strictly after (prev_v, prev_i); (-1, E) when there is none."""
    cand = (idx < E) & ((s < prev_v) | ((s == prev_v) & (idx > prev_i)))
    sv = tl.where(cand, s, -1.0)
    best_v = tl.max(sv, axis=0)
    best_i = tl.min(tl.where(cand & (sv == best_v), idx, E), axis=0)
    return best_v, best_i


@triton.jit
def _topk_routing_kernel(
    logits_ptr,  # [T, E] fp32/fp16/bf16, rows contiguous
    weights_ptr,  # [T, K] fp32 out
    ids_ptr,  # [T, K] int32 out
    E,
    K,
    stride_logits_row,
    threshold,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_row
    offs = tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    w_vec = tl.zeros([BLOCK_K], dtype=tl.float32)
    i_vec = tl.full([BLOCK_K], -1, dtype=tl.int32)
    prev_v = float("inf")
    prev_i = -1

    if SINGLE_CHUNK:
        # The whole row in registers: score once, then k selection passes over the registers.
        if SIGMOID:
            s = _scores(row_ptr, offs, E, 0.0, 1.0, SIGMOID)
        else:
            x = tl.load(row_ptr + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
            row_max = tl.max(x, axis=0)
            e = tl.exp(x - row_max)
            s = tl.where(offs < E, e / tl.sum(e, axis=0), -1.0)
        for j in range(K):
            best_v, best_i = _best_after(s, offs, E, prev_v, prev_i)
            w_vec = tl.where(kk == j, best_v, w_vec)
            i_vec = tl.where(kk == j, best_i, i_vec)
            prev_v = best_v
            prev_i = best_i
    else:
        row_max = 0.0
        row_sum = 1.0
        if not SIGMOID:
            # Online softmax statistics over the chunks.
            row_max = float("-inf")
            row_sum = 0.0
            for start in range(0, E, BLOCK_E):
                idx = start + offs
                x = tl.load(row_ptr + idx, mask=idx < E, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(row_max, tl.max(x, axis=0))
                row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
                row_max = new_max
        for j in range(K):
            best_v = -1.0
            best_i = E
            for start in range(0, E, BLOCK_E):
                idx = start + offs
                s = _scores(row_ptr, idx, E, row_max, row_sum, SIGMOID)
                chunk_v, chunk_i = _best_after(s, idx, E, prev_v, prev_i)
                # Chunks come in ascending index order: on equal scores the earlier chunk keeps its pick.
                better = chunk_v > best_v
                best_i = tl.where(better, chunk_i, best_i)
                best_v = tl.where(better, chunk_v, best_v)
            w_vec = tl.where(kk == j, best_v, w_vec)
            i_vec = tl.where(kk == j, best_i, i_vec)
            prev_v = best_v
            prev_i = best_i

    # A pass with no candidate (only NaN scores left) yields index E: no expert.
    keep = (kk < K) & (i_vec < E)
    if HAS_THRESHOLD:
        keep = keep & (w_vec >= threshold)
    w_vec = tl.where(keep, w_vec, 0.0)
    i_vec = tl.where(keep, i_vec, -1)
    if RENORMALIZE:
        total = tl.sum(w_vec, axis=0)
        w_vec = tl.where(total > 0.0, w_vec / tl.where(total > 0.0, total, 1.0), 0.0)
    out = row * K + kk
    tl.store(weights_ptr + out, w_vec, mask=kk < K)
    tl.store(ids_ptr + out, i_vec, mask=kk < K)


def topk_routing(logits: torch.Tensor, k: int, *, renormalize: bool = False, threshold: float | None = None,
                 scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """The k best experts of each token: scores ``softmax(logits)`` (or ``sigmoid``), top-k, threshold, renormalize.

    Scores in fp32, descending, ties to the lowest expert index; a choice below ``threshold`` becomes id -1 and
    weight 0; ``renormalize`` divides the surviving weights by their sum (all-zero rows stay zero).

    logits: [T, E] fp32/fp16/bf16, rows contiguous        k: 1 <= k <= E
    returns weights: [T, k] fp32, ids: [T, k] int32
    """
    assert logits.dim() == 2 and logits.dtype in (torch.float32, torch.float16, torch.bfloat16), \
        f"logits: expected [T, E] fp32/fp16/bf16, got {tuple(logits.shape)} {logits.dtype}"
    T, E = logits.shape
    assert 1 <= k <= E, f"k={k}: expected 1 <= k <= E={E}"
    assert E == 1 or logits.stride(1) == 1, "logits: rows must be contiguous"
    assert scoring in ("softmax", "sigmoid"), f"scoring={scoring!r}"
    if not logits.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"logits: on {logits.device}, but the Triton kernels need CUDA tensors (or "
                         "TRITON_INTERPRET=1); move them to the GPU or set LUMOE_BACKEND=torch")
    weights = torch.empty((T, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, k), dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    block_e = min(next_pow2(E), MAX_BLOCK_E)
    _topk_routing_kernel[(T,)](
        logits, weights, ids, E, k, logits.stride(0), 0.0 if threshold is None else float(threshold),
        BLOCK_E=block_e,
        BLOCK_K=next_pow2(k),
        SINGLE_CHUNK=E <= block_e,
        SIGMOID=scoring == "sigmoid",
        HAS_THRESHOLD=threshold is not None,
        RENORMALIZE=bool(renormalize),
        num_warps=4 if block_e <= 512 else 8,
    )
    return weights, ids
