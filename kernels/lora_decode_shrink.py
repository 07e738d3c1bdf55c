"""Decode shrink, straight from the routing: ``part[p, s, m, :] = x[m // k, K_p] @ lora_a[s, e_m, :r, K_p].T`` for
the H range K_p of split p; the first half of ``lora_shrink_expand`` (``lora_decode_expand`` adds the partials).

One program per (routed row m, slice, H split): each row's rank-r intermediate is computed once (not once per N
block of the expand), with H split over ``split_k`` programs (``configs``) so that a handful of decode rows still
spread over many programs. Vector products (``tl.sum``; one row per program, no tl.dot): tiles are fp32 after the
load on every device.

Legend: T tokens (rows of x), E experts, k top-k, M = T*k routed rows (m = t*k + j), S slices, H input features,
R max rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lumoe_engine.kernels import configs
from lumoe_engine.kernels.configs import cdiv, next_pow2
from lumoe_engine.kernels.configs import KernelConfig


@triton.jit
def _lora_decode_shrink_kernel(
    x_ptr, a_ptr, part_ptr,
    ids_ptr, ranks_ptr,
    H, TOP_K, K_PER_SPLIT,
    stride_x_row, stride_a_slice, stride_a_expert, stride_a_rank, stride_p_split, stride_p_slice, stride_p_row,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    e = tl.load(ids_ptr + m)
    if e < 0:                             # no expert: nothing to compute, the expand skips this row
        return
    rank = tl.load(ranks_ptr + e)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    x_row = x_ptr + (m // TOP_K) * stride_x_row
    a_base = a_ptr + s * stride_a_slice + e.to(tl.int64) * stride_a_expert + offs_r[:, None] * stride_a_rank
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, H)
    u = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        xv = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)                        # [BLOCK_K]
        at = tl.load(a_base + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)                                                     # [BLOCK_R, BLOCK_K]
        u += tl.sum(at * xv[None, :], axis=1)
    dst = part_ptr + split.to(tl.int64) * stride_p_split + s * stride_p_slice + m * stride_p_row + offs_r
    tl.store(dst, u, mask=r_ok)


@dataclass(slots=True)
class DecodeShrinkPlan:
    cfg: KernelConfig
    source: str
    grid: tuple
    block_r: int
    block_k: int
    split: int
    k_per_split: int


def decode_block_r(r_max: int) -> int:
    """The whole rank in one block (no tl.dot here, but at least 16 lanes)."""
    return max(16, next_pow2(max(1, r_max)))


def plan(dtype: torch.dtype, h_in: int, r_max: int, m_rows: int, s_count: int) -> DecodeShrinkPlan:
    cfg, source = configs.lookup("lora_decode_shrink", dtype, h_in, r_max, m_rows)
    bk = cfg.block_k
    split = max(1, min(cfg.split_k, cdiv(h_in, bk)))
    k_per_split = cdiv(cdiv(h_in, split), bk) * bk
    split = cdiv(h_in, k_per_split)             # no empty split: every partial of a routed row is written
    return DecodeShrinkPlan(cfg, source, (m_rows, s_count, split), decode_block_r(r_max), bk, split, k_per_split)


def lora_decode_shrink(x: torch.Tensor, lora_a: torch.Tensor, ids: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """The partial rank-r intermediates of every routed row: ``part [split, S, M, R]`` fp32, with
    ``sum_p part[p, s, m, :r_e] = x[m // k] @ lora_a[s, e_m, :r_e].T``. Entries of rows with ``ids = -1`` and
    columns r >= ranks[e_m] are left unwritten (``lora_decode_expand`` never reads them).

    x: [T, H] rows contiguous; lora_a: [S, E, R, H] dtype of x, contiguous; ids: [T, k] int32; ranks: [E] int32.
    """
    s_count, _, r_max, h_in = lora_a.shape                           # [S, E, R, H]
    m_rows = ids.numel()                                             # M = T*k
    p = plan(lora_a.dtype, h_in, r_max, m_rows, s_count)
    part = torch.empty(p.split, s_count, m_rows, r_max, dtype=torch.float32, device=x.device)   # [split, S, M, R]
    if m_rows == 0 or h_in == 0:
        return part.zero_()
    _lora_decode_shrink_kernel[p.grid](
        x, lora_a, part, ids, ranks,
        h_in, ids.shape[1], p.k_per_split,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        part.stride(0), part.stride(1), part.stride(2),
        BLOCK_R=p.block_r, BLOCK_K=p.block_k, **configs.launch_options(p.cfg),
    )
    return part
