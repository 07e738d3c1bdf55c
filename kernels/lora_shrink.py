"""Grouped LoRA shrink: ``buf[s, m, :] = x[m // k] @ lora_a[s, e_m].T`` over expert-grouped row blocks.

One program per (row tile, rank block x H split, slice). A row tile is ``BLOCK_M`` rows of one block of
``meta.block_m`` rows (one expert), gathered through ``meta.sorted_ids``; the rank block is the whole padded rank up
to 64; H is walked in ``BLOCK_K`` steps, split over ``split_k`` programs when the table (``configs``) says so, their
partial sums added in a fixed order afterwards (deterministic, no float atomics). On a GPU, fp16/bf16 tiles go into
``tl.dot`` as they are (fp32 accumulation); see ``configs.dot_flags``.

Legend: T tokens (rows of x), E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), S slices,
H input features, R max rank, P padded grouped length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lumoe_engine.kernels import configs
from lumoe_engine.kernels.configs import cdiv
from lumoe_engine.kernels.configs import KernelConfig
from lumoe_engine.kernels.mma import load_tile, mma
from lumoe_engine.ops.meta import RoutingMeta


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr,
    sorted_ids_ptr, block_expert_ptr, ranks_ptr,
    M, H, R, TOP_K, ROWS_PER_BLOCK, SPLIT, K_PER_SPLIT,
    stride_x_row, stride_a_slice, stride_a_expert, stride_a_rank,
    stride_o_split, stride_o_slice, stride_o_row,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SUB_BLOCKS: tl.constexpr,
    DOT16: tl.constexpr, TF32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1) // SPLIT
    split = tl.program_id(1) % SPLIT
    s = tl.program_id(2).to(tl.int64)
    block = pid_m // SUB_BLOCKS
    e = tl.load(block_expert_ptr + block)
    if e < 0:
        return
    rank = tl.load(ranks_ptr + e)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:                        # the buffer is zeroed: columns past the rank stay 0
        return
    row0 = (pid_m % SUB_BLOCKS) * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < ROWS_PER_BLOCK
    m = tl.load(sorted_ids_ptr + block * ROWS_PER_BLOCK + offs_m, mask=row_ok, other=M)
    row_ok = row_ok & (m < M)             # sentinel M marks padding
    m64 = m.to(tl.int64)
    t64 = m64 // TOP_K
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    a_base = a_ptr + s * stride_a_slice + e.to(tl.int64) * stride_a_expert
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, H)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        xt = load_tile(x_ptr + t64[:, None] * stride_x_row + offs_k[None, :],
                       row_ok[:, None] & k_ok[None, :], DOT16)                              # [BLOCK_M, BLOCK_K]
        at = load_tile(a_base + offs_r[None, :].to(tl.int64) * stride_a_rank + offs_k[:, None],
                       r_ok[None, :] & k_ok[:, None], DOT16)                                # [BLOCK_K, BLOCK_R]
        acc = mma(xt, at, acc, DOT16, TF32)
    out = out_ptr + split.to(tl.int64) * stride_o_split + s * stride_o_slice + m64[:, None] * stride_o_row \
        + offs_r[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (offs_r[None, :] < R))


@dataclass(slots=True)
class ShrinkPlan:
    """Everything a launch decides, from shapes and the config alone (tests read it without launching)."""

    cfg: KernelConfig
    source: str
    grid: tuple
    block_m: int
    block_r: int
    block_k: int
    sub_blocks: int
    split: int
    k_per_split: int
    dot16: bool
    tf32: bool


def plan(dtype: torch.dtype, on_gpu: bool, h_in: int, r_max: int, m_rows: int, s_count: int, n_blocks: int,
         meta_block_m: int) -> ShrinkPlan:
    """The launch of ``lora_shrink`` for these shapes (``on_gpu``: compiled for a GPU, not interpreted)."""
    assert meta_block_m >= 16 and meta_block_m & (meta_block_m - 1) == 0, \
        f"meta.block_m={meta_block_m}: expected a power of two >= 16 (build the metadata with build_routing)"
    cfg, source = configs.lookup("lora_shrink", dtype, h_in, r_max, m_rows)
    block_m = min(cfg.block_m, meta_block_m)          # a row tile never mixes two experts' blocks
    br = configs.block_r(r_max)
    bk = cfg.block_k
    split = max(1, min(cfg.split_k, cdiv(h_in, bk)))
    k_per_split = cdiv(cdiv(h_in, split), bk) * bk
    split = cdiv(h_in, k_per_split)             # no empty split
    sub = meta_block_m // block_m
    dot16, tf32 = configs.dot_flags(dtype, on_gpu)
    grid = (n_blocks * sub, cdiv(r_max, br) * split, s_count)
    return ShrinkPlan(cfg, source, grid, block_m, br, bk, sub, split, k_per_split, dot16, tf32)


def _rows_ok(t: torch.Tensor) -> bool:
    """Rows contiguous (the kernel steps columns by 1); any strides do for an empty tensor or a single column."""
    return t.stride(1) == 1 or t.shape[0] == 0 or t.shape[1] <= 1


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: RoutingMeta, ranks: torch.Tensor, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``buf[s, m, :] = x[m // k] @ lora_a[s, e_m].T``; columns r >= ranks[e_m] and rows with e_m = -1 are zero.

    Rows of x are gathered through ``meta.sorted_ids``; each block of ``meta.block_m`` rows has one expert
    (``meta.block_expert``, -1 = unused block). Shapes are checked by ``lumoe_engine.ops.lora_shrink``.
    """
    s_count, _, r_max, h_in = lora_a.shape                           # [S, E, R, H]
    m_rows = meta.ids.numel()                                        # M = T*k
    assert x.dim() == 2 and x.shape[1] == h_in and _rows_ok(x)  # [T, H]
    assert lora_a.is_contiguous() and lora_a.dtype == x.dtype
    n_blocks = meta.block_expert.numel()                             # P // block_m
    p = plan(x.dtype, configs.compiled(x), h_in, r_max, m_rows, s_count, n_blocks, meta.block_m)
    shape = (s_count, m_rows, r_max)
    if out is not None:
        assert out.shape == shape and out.dtype == torch.float32 and out.is_contiguous()
    if m_rows == 0 or n_blocks == 0 or p.split == 1:
        out = torch.zeros(shape, dtype=torch.float32, device=x.device) if out is None else out.zero_()  # [S, M, R]
        dst = out
    else:                                                            # [split, S, M, R] partial sums
        dst = torch.zeros((p.split, *shape), dtype=torch.float32, device=x.device)
    if m_rows == 0 or n_blocks == 0:
        return out
    _lora_shrink_kernel[p.grid](
        x, lora_a, dst,
        meta.sorted_ids, meta.block_expert, ranks,
        m_rows, h_in, r_max, meta.top_k, meta.block_m, p.split, p.k_per_split,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        dst.stride(0) if p.split > 1 else 0, dst.stride(-3), dst.stride(-2),
        BLOCK_M=p.block_m, BLOCK_R=p.block_r, BLOCK_K=p.block_k, SUB_BLOCKS=p.sub_blocks,
        DOT16=p.dot16, TF32=p.tf32, **configs.launch_options(p.cfg),
    )
    if p.split > 1:                                                  # fixed order: deterministic
        if out is None:
            out = torch.empty(shape, dtype=torch.float32, device=x.device)
        torch.sum(dst, dim=0, out=out)
    return out
