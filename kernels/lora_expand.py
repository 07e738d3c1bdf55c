"""Grouped LoRA expand: ``y[t, n_s] += sum_j w[t, j] * scales[e] * buf[s, t*k+j, :r_e] @ lora_b[e, n_s, :r_e].T``.

Legend: T tokens (rows of y), E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), S slices,
N output features of all slices together, R max rank, P padded grouped length.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lumoe_engine.ops.meta import RoutingMeta

# NOTE: BLOCK_N = 64 and a rank block of the whole rank up to MAX_BLOCK_R = 64 are starting points (tl.dot needs
# >= 16; the reduction dim is the small LoRA rank); not measured yet, to be swept on a GPU (H100) with the
# benchmarks. The row block is meta.block_m (rounded up to a power of two, at least 16): one expert per tile.
BLOCK_N = 64
MAX_BLOCK_R = 64


@triton.jit
def _lora_expand_kernel(
    buf_ptr, b_ptr, dst_ptr,
    sorted_ids_ptr, block_expert_ptr, ranks_ptr, weights_ptr, scales_ptr, slice_offsets_ptr,
    M, ROWS_PER_BLOCK,
    stride_buf_slice, stride_buf_row, stride_b_expert, stride_b_row, stride_dst_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ADD_INTO: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    n_lo = tl.load(slice_offsets_ptr + s)
    n_hi = tl.load(slice_offsets_ptr + s + 1)
    n0 = n_lo + pid_n * BLOCK_N
    if n0 >= n_hi:                        # the grid covers N; this slice is narrower
        return
    rank = tl.load(ranks_ptr + e)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < ROWS_PER_BLOCK
    m = tl.load(sorted_ids_ptr + pid_m * ROWS_PER_BLOCK + offs_m, mask=row_ok, other=M)
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
        u = tl.load(buf_rows + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)    # [BLOCK_M, BLOCK_R]
        bt = tl.load(b_base + offs_r[:, None], mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)                                                     # [BLOCK_R, BLOCK_N]
        acc = tl.dot(u, bt, acc, input_precision="ieee")
    coef = tl.load(weights_ptr + m64, mask=row_ok, other=0.0) * tl.load(scales_ptr + e)
    acc = acc * coef[:, None]
    dst = dst_ptr + m64[:, None] * stride_dst_row + offs_n[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    if ADD_INTO:                          # k == 1: row m is token t; add into y in fp32
        old = tl.load(dst, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, (old + acc).to(dst_ptr.dtype.element_ty), mask=mask)
    else:                                 # k > 1: per-row contribution, summed over j by the launcher
        tl.store(dst, acc, mask=mask)


def _pow2_block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


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
    add_into = top_k == 1
    dst = y if add_into else torch.zeros(m_rows, n_out, dtype=torch.float32, device=y.device)   # [M, N]
    grid = (n_blocks, triton.cdiv(n_out, BLOCK_N), s_count)
    _lora_expand_kernel[grid](
        buf, lora_b, dst,
        meta.sorted_ids, meta.block_expert, ranks, weights, scales, slice_offsets,
        m_rows, meta.block_m,
        buf.stride(0), buf.stride(1), lora_b.stride(0), lora_b.stride(1), dst.stride(0),
        BLOCK_M=_pow2_block(meta.block_m), BLOCK_N=BLOCK_N, BLOCK_R=min(_pow2_block(r_max), MAX_BLOCK_R),
        ADD_INTO=add_into,
    )
    if not add_into:
        part = dst.view(num_tokens, top_k, n_out)
        total = part[:, 0]
        for j in range(1, top_k):                                    # fixed order over the k choices
            total = total + part[:, j]
        touched = (meta.ids >= 0).any(dim=1)[:, None]
        y.copy_(torch.where(touched, (y.float() + total).to(y.dtype), y))
    return y
