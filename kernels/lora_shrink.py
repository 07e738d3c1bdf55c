"""Grouped LoRA shrink: ``buf[s, m, :] = x[m // k] @ lora_a[s, e_m].T`` over expert-grouped row blocks.

Legend: T tokens (rows of x), E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), S slices,
H input features, R max rank, P padded grouped length.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lumoe_engine.ops.meta import RoutingMeta

# NOTE: BLOCK_K = 64 and a rank block covering the whole rank up to MAX_BLOCK_R = 64 (so x is read once per row block
# for ranks <= 64) are starting points chosen for tl.dot's 16-minimum and a moderate register tile; they have not
# been measured yet and are to be swept on a GPU (H100) with the benchmarks. The row block is meta.block_m (rounded
# up to a power of two, at least 16), so that every tile belongs to one expert.
MAX_BLOCK_R = 64
BLOCK_K = 64


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr,
    sorted_ids_ptr, block_expert_ptr, ranks_ptr,
    M, H, R, TOP_K, ROWS_PER_BLOCK,
    stride_x_row, stride_a_slice, stride_a_expert, stride_a_rank,
    stride_o_slice, stride_o_row,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    s = tl.program_id(2).to(tl.int64)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rank = tl.load(ranks_ptr + e)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:                        # the launcher zeroed the buffer: columns past the rank stay 0
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < ROWS_PER_BLOCK
    m = tl.load(sorted_ids_ptr + pid_m * ROWS_PER_BLOCK + offs_m, mask=row_ok, other=M)
    row_ok = row_ok & (m < M)             # sentinel M marks padding
    m64 = m.to(tl.int64)
    t64 = m64 // TOP_K
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    a_base = a_ptr + s * stride_a_slice + e.to(tl.int64) * stride_a_expert
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        xt = tl.load(x_ptr + t64[:, None] * stride_x_row + offs_k[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)         # [BLOCK_M, BLOCK_K]
        at = tl.load(a_base + offs_r[None, :].to(tl.int64) * stride_a_rank + offs_k[:, None],
                     mask=r_ok[None, :] & k_ok[:, None], other=0.0).to(tl.float32)           # [BLOCK_K, BLOCK_R]
        if NATIVE_DOT:                    # 16-bit operands (exact round trip), fp32 accumulation
            acc = tl.dot(xt.to(x_ptr.dtype.element_ty), at.to(x_ptr.dtype.element_ty), acc)
        else:
            acc = tl.dot(xt, at, acc, input_precision="ieee")
    out = out_ptr + s * stride_o_slice + m64[:, None] * stride_o_row + offs_r[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (offs_r[None, :] < R))


def _pow2_block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


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
    if out is None:
        out = torch.zeros(s_count, m_rows, r_max, dtype=torch.float32, device=x.device)  # [S, M, R]
    else:
        assert out.shape == (s_count, m_rows, r_max) and out.dtype == torch.float32 and out.is_contiguous()
        out.zero_()
    n_blocks = meta.block_expert.numel()                             # P // block_m
    if m_rows == 0 or n_blocks == 0:
        return out
    block_r = min(_pow2_block(r_max), MAX_BLOCK_R)
    grid = (n_blocks, triton.cdiv(r_max, block_r), s_count)
    _lora_shrink_kernel[grid](
        x, lora_a, out,
        meta.sorted_ids, meta.block_expert, ranks,
        m_rows, h_in, r_max, meta.top_k, meta.block_m,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_M=_pow2_block(meta.block_m), BLOCK_R=block_r, BLOCK_K=BLOCK_K,
        NATIVE_DOT=bool(x.is_cuda and x.dtype != torch.float32),
    )
    return out
