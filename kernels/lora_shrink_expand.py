"""Fused LoRA shrink + expand for small T (decode), straight from the routing (no alignment metadata):
``y[t, n_s] += sum_j w[t, j] * scales[e] * (x[t] @ lora_a[s, e, :r_e].T) @ lora_b[e, n_s, :r_e].T``, e = ids[t, j].

Two launches: ``lora_decode_shrink`` computes each routed row's rank-r intermediate once (H split over programs,
partial sums in a small fp32 buffer), then ``lora_decode_expand`` adds ``u @ B^T`` over N blocks. The single-kernel
form it replaces (one program per (token, slice, N block)) recomputed x @ A^T for every N block: N / BLOCK_N times
the shrink's reads and FLOPs (N = 11,008, BLOCK_N = 128: 86x). Chosen by counting work (docs/KERNELS.md): both
launches read x, A and B once (B and x tiles from L2 when tokens share an expert) and the buffer costs
2 x split x M x R x 4 bytes, while keeping the rank vector in registers across N blocks would serialise all of N on
one program per token (T = 1: one program for the whole layer).

Legend: T tokens (rows of x and y), E experts, k top-k, S slices, H input features, N output features of all
slices together, R max rank.
"""
from __future__ import annotations

import torch

from lumoe_engine.kernels.lora_decode_expand import lora_decode_expand
from lumoe_engine.kernels.lora_decode_shrink import lora_decode_shrink


def _rows_ok(t: torch.Tensor) -> bool:
    """Rows contiguous (the kernel steps columns by 1); any strides do for an empty tensor or a single column."""
    return t.stride(1) == 1 or t.shape[0] == 0 or t.shape[1] <= 1


def lora_shrink_expand(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor,
                       ids: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
    """``lora_shrink`` then ``lora_expand`` from the routing itself: two launches, y in place.

    x: [T, H]; lora_a: [S, E, R, H]; lora_b: [E, N, R]; slice_offsets: [S+1] int32; ids: [T, k] int32 (-1 = none);
    weights: [T, k] fp32; scales: [E] fp32; ranks: [E] int32; y: [T, N]. Checked by ``lumoe_engine.ops``.
    """
    s_count = lora_a.shape[0]                                        # [S, E, R, H]
    num_tokens = ids.shape[0]                                        # [T, k]
    assert _rows_ok(x) and _rows_ok(y) and lora_a.is_contiguous() and lora_b.is_contiguous()
    assert ids.is_contiguous() and weights.is_contiguous() and slice_offsets.numel() == s_count + 1
    if num_tokens == 0 or lora_b.shape[1] == 0:
        return y
    part = lora_decode_shrink(x, lora_a, ids, ranks)                 # [split, S, M, R] fp32
    return lora_decode_expand(part, lora_b, slice_offsets, ids, weights, scales, ranks, y)
