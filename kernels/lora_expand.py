"""Grouped LoRA expand: ``y[t, n_s] += sum_j w[t, j] * scales[e] * buf[s, t*k+j, :r_e] @ lora_b[e, n_s, :r_e].T``.

One program per (row tile, N block, slice): a row tile is ``BLOCK_M`` rows of one block of ``meta.block_m`` rows
(one expert); the rank is walked in blocks of the whole padded rank up to 64. On a GPU, fp16/bf16 B tiles go into
``tl.dot`` as they are and the fp32 ``buf`` tile is rounded to that dtype (fp32 accumulation, as vLLM and Punica
do); see ``configs.dot_flags``. Block sizes, warps and stages come from the table (``configs``).

Legend: T tokens (rows of y), E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), S slices,
N output features of all slices together, R max rank, P padded grouped length.
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
def _lora_expand_kernel(
    buf_ptr, b_ptr, dst_ptr,
    sorted_ids_ptr, block_expert_ptr, ranks_ptr, weights_ptr, scales_ptr, slice_offsets_ptr,
    M, ROWS_PER_BLOCK,
    stride_buf_slice, stride_buf_row, stride_b_expert, stride_b_row, stride_dst_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SUB_BLOCKS: tl.constexpr,
    ADD_INTO: tl.constexpr, DOT16: tl.constexpr, TF32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    block = pid_m // SUB_BLOCKS
    e = tl.load(block_expert_ptr + block)
    if e < 0:
        return
    n_lo = tl.load(slice_offsets_ptr + s)
    n_hi = tl.load(slice_offsets_ptr + s + 1)
    n0 = n_lo + pid_n * BLOCK_N
    if n0 >= n_hi:                        # the grid covers N; this slice is narrower
        return
    rank = tl.load(ranks_ptr + e)
    offs_m = (pid_m % SUB_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < ROWS_PER_BLOCK
    m = tl.load(sorted_ids_ptr + block * ROWS_PER_BLOCK + offs_m, mask=row_ok, other=M)
    row_ok = row_ok & (m < M)             # sentinel M marks padding
    m64 = m.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_hi
    buf_rows = buf_ptr + s.to(tl.int64) * stride_buf_slice + m64[:, None] * stride_buf_row
    b_base = b_ptr + e.to(tl.int64) * stride_b_expert + offs_n[None, :].to(tl.int64) * stride_b_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        u = tl.load(buf_rows + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
        bt = load_tile(b_base + offs_r[:, None], r_ok[:, None] & n_ok[None, :], DOT16)           # [BLOCK_R, BLOCK_N]
        if DOT16:
            u = u.to(b_ptr.dtype.element_ty)
        acc = mma(u, bt, acc, DOT16, TF32)
    coef = tl.load(weights_ptr + m64, mask=row_ok, other=0.0) * tl.load(scales_ptr + e)
    acc = acc * coef[:, None]
    dst = dst_ptr + m64[:, None] * stride_dst_row + offs_n[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    if ADD_INTO:                          # k == 1: row m is token t; add into y in fp32
        old = tl.load(dst, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, (old + acc).to(dst_ptr.dtype.element_ty), mask=mask)
    else:                                 # k > 1: per-row contribution, summed over j by the launcher
        tl.store(dst, acc, mask=mask)


@dataclass(slots=True)
class ExpandPlan:
    """Everything a launch decides, from shapes and the config alone (tests read it without launching)."""

    cfg: KernelConfig
    source: str
    grid: tuple
    block_m: int
    block_n: int
    block_r: int
    sub_blocks: int
    dot16: bool
    tf32: bool


def plan(dtype: torch.dtype, on_gpu: bool, n_out: int, r_max: int, m_rows: int, s_count: int, n_blocks: int,
         meta_block_m: int) -> ExpandPlan:
    """The launch of ``lora_expand`` for these shapes (``on_gpu``: compiled for a GPU, not interpreted)."""
    assert meta_block_m >= 16 and meta_block_m & (meta_block_m - 1) == 0, \
        f"meta.block_m={meta_block_m}: expected a power of two >= 16 (build the metadata with build_routing)"
    cfg, source = configs.lookup("lora_expand", dtype, n_out, r_max, m_rows)
    block_m = min(cfg.block_m, meta_block_m)
    sub = meta_block_m // block_m
    dot16, tf32 = configs.dot_flags(dtype, on_gpu)
    grid = (n_blocks * sub, cdiv(n_out, cfg.block_n), s_count)
    return ExpandPlan(cfg, source, grid, block_m, cfg.block_n, configs.block_r(r_max), sub, dot16, tf32)


def _rows_ok(t: torch.Tensor) -> bool:
    """Rows contiguous (the kernel steps columns by 1); any strides do for an empty tensor or a single column."""
    return t.stride(1) == 1 or t.shape[0] == 0 or t.shape[1] <= 1


def lora_expand(buf: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor, meta: RoutingMeta,
                scales: torch.Tensor, ranks: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y[t, n_s] += sum_j w[t, j] * scales[e] * buf[s, t*k+j, :r_e] @ lora_b[e, n_s, :r_e].T``, in place.

    Several slices in one launch (grid axis 2). k == 1 adds straight into y; k > 1 writes each routed row's fp32
    contribution to a [M, N] buffer and sums the k terms in order j = 0..k-1 (deterministic, no atomics). Rows whose
    ids are all -1 stay untouched (bitwise). Shapes are checked by ``lumoe_engine.ops.lora_expand``.
    """
    e_count, n_out, r_max = lora_b.shape                             # [E, N, R]
    s_count = buf.shape[0]                                           # buf: [S, M, R] fp32
    num_tokens, top_k = meta.ids.shape                               # [T, k]
    m_rows = num_tokens * top_k
    assert buf.is_contiguous() and buf.dtype == torch.float32 and buf.shape[1:] == (m_rows, r_max)
    assert lora_b.is_contiguous() and y.dtype == lora_b.dtype and _rows_ok(y) and y.shape == (num_tokens, n_out)
    assert slice_offsets.numel() == s_count + 1
    weights = meta.weights.contiguous()                              # [T, k] fp32, flat index m
    n_blocks = meta.block_expert.numel()
    if m_rows == 0 or n_blocks == 0 or n_out == 0:
        return y
    p = plan(lora_b.dtype, configs.compiled(y), n_out, r_max, m_rows, s_count, n_blocks, meta.block_m)
    add_into = top_k == 1
    dst = y if add_into else torch.zeros(m_rows, n_out, dtype=torch.float32, device=y.device)   # [M, N]
    _lora_expand_kernel[p.grid](
        buf, lora_b, dst,
        meta.sorted_ids, meta.block_expert, ranks, weights, scales, slice_offsets,
        m_rows, meta.block_m,
        buf.stride(0), buf.stride(1), lora_b.stride(0), lora_b.stride(1), dst.stride(0),
        BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_R=p.block_r, SUB_BLOCKS=p.sub_blocks,
        ADD_INTO=add_into, DOT16=p.dot16, TF32=p.tf32, **configs.launch_options(p.cfg),
    )
    if not add_into:
        part = dst.view(num_tokens, top_k, n_out)
        total = part[:, 0]
        for j in range(1, top_k):                                    # fixed order over the k choices
            total = total + part[:, j]
        touched = (meta.ids >= 0).any(dim=1)[:, None]
        y.copy_(torch.where(touched, (y.float() + total).to(y.dtype), y))
    return y
