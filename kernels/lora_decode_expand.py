"""Decode expand, straight from the routing: ``y[t, n_s] += sum_j w[t, j] * scales[e] * u[s, t*k+j, :r] @
lora_b[e, n_s, :r].T`` with ``u = sum_p part[p]`` (the partials of ``lora_decode_shrink``, added in order p = 0, 1,
...); the second half of ``lora_shrink_expand``.

One program per (token, slice, N block), the token's k choices in a fixed order (deterministic, no atomics). Each
program reads the token's finished rank-r vector (R floats per split) instead of recomputing x @ A^T. Vector
products (``tl.sum``; one token per program, no tl.dot): tiles are fp32 after the load on every device.

Legend: T tokens (rows of y), E experts, k top-k, M = T*k routed rows, S slices, N output features of all slices
together, R max rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lumoe_engine.kernels import configs
from lumoe_engine.kernels.configs import cdiv
from lumoe_engine.kernels.configs import KernelConfig
from lumoe_engine.kernels.lora_decode_shrink import decode_block_r


@triton.jit
def _lora_decode_expand_kernel(
    part_ptr, b_ptr, y_ptr,
    ids_ptr, weights_ptr, scales_ptr, ranks_ptr, slice_offsets_ptr,
    TOP_K, SPLIT,
    stride_p_split, stride_p_slice, stride_p_row, stride_b_expert, stride_b_row, stride_y_row,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    pid_n = tl.program_id(2)
    n_lo = tl.load(slice_offsets_ptr + s)
    n_hi = tl.load(slice_offsets_ptr + s + 1)
    n0 = n_lo + pid_n * BLOCK_N
    if n0 >= n_hi:                        # the grid covers N; this slice is narrower
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_hi
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    touched = tl.zeros((1,), dtype=tl.int32)
    for j in range(TOP_K):                # fixed order over the k choices
        m = t * TOP_K + j
        e = tl.load(ids_ptr + m)
        valid = e >= 0
        e64 = tl.maximum(e, 0).to(tl.int64)
        rank = tl.where(valid, tl.load(ranks_ptr + e64), 0)      # no expert: rank 0, every load masked
        r_ok = offs_r < rank
        u_ptr = part_ptr + s.to(tl.int64) * stride_p_slice + m * stride_p_row + offs_r
        u = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for split in range(SPLIT):        # fixed order over the H splits
            u += tl.load(u_ptr + split * stride_p_split, mask=r_ok, other=0.0)
        bt = tl.load(b_ptr + e64 * stride_b_expert + offs_n[:, None].to(tl.int64) * stride_b_row + offs_r[None, :],
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)                  # [BLOCK_N, BLOCK_R]
        coef = tl.where(valid, tl.load(weights_ptr + m) * tl.load(scales_ptr + e64), 0.0)
        acc += coef * tl.sum(bt * u[None, :], axis=1)
        touched += valid.to(tl.int32)
    dst = y_ptr + t * stride_y_row + offs_n
    n_end = tl.where(tl.sum(touched, axis=0) > 0, n_hi, n0)   # a token with no expert is left untouched
    mask = offs_n < n_end
    old = tl.load(dst, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (old + acc).to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(slots=True)
class DecodeExpandPlan:
    cfg: KernelConfig
    source: str
    grid: tuple
    block_n: int
    block_r: int


def plan(dtype: torch.dtype, n_out: int, r_max: int, num_tokens: int, top_k: int, s_count: int) -> DecodeExpandPlan:
    cfg, source = configs.lookup("lora_decode_expand", dtype, n_out, r_max, num_tokens * top_k)
    return DecodeExpandPlan(cfg, source, (num_tokens, s_count, cdiv(n_out, cfg.block_n)), cfg.block_n,
                            decode_block_r(r_max))


def lora_decode_expand(part: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor, ids: torch.Tensor,
                       weights: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
    """Add the experts' outputs into y in place (see the module docstring); rows whose ids are all -1 untouched.

    part: [split, S, M, R] fp32 from ``lora_decode_shrink``; lora_b: [E, N, R] dtype of y, contiguous;
    slice_offsets: [S+1] int32; ids, weights: [T, k] int32 / fp32; scales: [E] fp32; ranks: [E] int32; y: [T, N].
    """
    _, n_out, r_max = lora_b.shape                                   # [E, N, R]
    num_tokens, top_k = ids.shape                                    # [T, k]
    split, s_count = part.shape[:2]
    if num_tokens == 0 or n_out == 0:
        return y
    p = plan(lora_b.dtype, n_out, r_max, num_tokens, top_k, s_count)
    _lora_decode_expand_kernel[p.grid](
        part, lora_b, y,
        ids, weights, scales, ranks, slice_offsets,
        top_k, split,
        part.stride(0), part.stride(1), part.stride(2), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        BLOCK_N=p.block_n, BLOCK_R=p.block_r, **configs.launch_options(p.cfg),
    )
    return y
