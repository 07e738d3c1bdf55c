"""Grouped LoRA weight gradients: per expert, a sum over that expert's routed rows (segments of ``meta.sorted_ids``).

``grad_a[s, e, r, :] = sum_{m: e_m = e} c_m * buf_dy[s, m, r] * x[m // k]``
``grad_b[e, n, r]    = sum_{m: e_m = e} c_m * dy[m // k, n] * buf_x[s(n), m, r]``       c_m = w[m] * scales[e_m]

One kernel computes both as a segmented outer product
``out[s, e, i, j] = sum_m c_m * P[s, row(m), i] * Q[s, row(m), j]`` (row(m) = m or the token m // k), rank-masked
on i or j. Deterministic: each output tile is owned by one program, which walks its expert's rows in order.

Legend: T tokens, E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), S slices, H input features,
N output features of all slices together, R max rank.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lumoe_engine.ops.meta import RoutingMeta

# NOTE: BLOCK_ROWS = 32 rows of an expert's segment per step, 64-wide H / N tiles, the rank block the whole rank up
# to 64: starting points (tl.dot needs >= 16), not measured yet; to be swept on a GPU (H100) with the benchmarks.
BLOCK_ROWS = 32
BLOCK_WIDE = 64
MAX_BLOCK_R = 64


@triton.jit
def _lora_grad_kernel(
    p_ptr, q_ptr, out_ptr,
    sorted_ids_ptr, offsets_ptr, ranks_ptr, weights_ptr, scales_ptr, slice_offsets_ptr,
    M, TOP_K, I_SIZE, J_SIZE, N_I_BLOCKS,
    stride_p_slice, stride_p_row, stride_q_slice, stride_q_row,
    stride_o_slice, stride_o_expert, stride_o_i,
    P_BY_TOKEN: tl.constexpr, Q_BY_TOKEN: tl.constexpr, SLICED_I: tl.constexpr, RANK_ON_I: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    e = tl.program_id(0)
    s = tl.program_id(1) // N_I_BLOCKS
    pid_i = tl.program_id(1) % N_I_BLOCKS
    pid_j = tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    if start >= end:                      # expert without rows: its gradient stays 0 (zeroed by the launcher)
        return
    rank = tl.load(ranks_ptr + e)
    if SLICED_I:                          # i runs over slice s of N: columns slice_offsets[s]:slice_offsets[s+1]
        i_lo = tl.load(slice_offsets_ptr + s)
        i_extent = tl.load(slice_offsets_ptr + s + 1) - i_lo
    else:
        i_lo = 0
        i_extent = I_SIZE
    i0 = pid_i * BLOCK_I
    j0 = pid_j * BLOCK_J
    if RANK_ON_I:
        r_first = i0
    else:
        r_first = j0
    if (i0 >= i_extent) | (r_first >= rank):     # past this slice, or past the expert's rank: stays 0
        return
    offs_i = i0 + tl.arange(0, BLOCK_I)
    offs_j = j0 + tl.arange(0, BLOCK_J)
    i_ok = offs_i < i_extent
    j_ok = offs_j < J_SIZE
    if RANK_ON_I:
        i_ok = i_ok & (offs_i < rank)
    else:
        j_ok = j_ok & (offs_j < rank)
    scale = tl.load(scales_ptr + e)
    p_base = p_ptr + s.to(tl.int64) * stride_p_slice + (i_lo + offs_i)[None, :]
    q_base = q_ptr + s.to(tl.int64) * stride_q_slice + offs_j[None, :]
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < end
        m = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=M)
        row_ok = row_ok & (m < M)         # sentinel M marks padding
        m64 = m.to(tl.int64)
        if P_BY_TOKEN:
            p_row = m64 // TOP_K
        else:
            p_row = m64
        if Q_BY_TOKEN:
            q_row = m64 // TOP_K
        else:
            q_row = m64
        coef = tl.load(weights_ptr + m64, mask=row_ok, other=0.0) * scale
        p = tl.load(p_base + p_row[:, None] * stride_p_row, mask=row_ok[:, None] & i_ok[None, :],
                    other=0.0).to(tl.float32)                                                       # [BLOCK_M, BLOCK_I]
        q = tl.load(q_base + q_row[:, None] * stride_q_row, mask=row_ok[:, None] & j_ok[None, :],
                    other=0.0).to(tl.float32)                                                       # [BLOCK_M, BLOCK_J]
        acc = tl.dot(tl.trans(p * coef[:, None]), q, acc, input_precision="ieee")
    out = (out_ptr + s.to(tl.int64) * stride_o_slice + e.to(tl.int64) * stride_o_expert
           + (i_lo + offs_i)[:, None].to(tl.int64) * stride_o_i + offs_j[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


def _pow2_block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _rows_ok(t: torch.Tensor) -> bool:
    """Rows contiguous (the kernel steps columns by 1); any strides do for an empty tensor or a single column."""
    return t.stride(1) == 1 or t.shape[0] == 0 or t.shape[1] <= 1


def lora_weight_grad(x: torch.Tensor, dy: torch.Tensor, buf_x: torch.Tensor, buf_dy: torch.Tensor,
                     slice_offsets: torch.Tensor, meta: RoutingMeta, scales: torch.Tensor, ranks: torch.Tensor, *,
                     need_a: bool = True, need_b: bool = True):
    """Gradients of the stacked LoRA weights, segmented by expert (see the module docstring); absent experts get 0.

    x: [T, H]; dy: [T, N]; buf_x, buf_dy: [S, M, R] fp32; slice_offsets: [S+1] int32; scales: [E] fp32;
    ranks: [E] int32. Returns ``(grad_a [S, E, R, H] dtype of x or None, grad_b [E, N, R] dtype of dy or None)``.
    """
    s_count, m_rows, r_max = buf_dy.shape                            # [S, M, R]
    e_count = meta.num_experts
    h_in, n_out = x.shape[1], dy.shape[1]                            # x: [T, H], dy: [T, N]
    assert _rows_ok(x) and _rows_ok(dy) and buf_x.is_contiguous() and buf_dy.is_contiguous()
    assert slice_offsets.numel() == s_count + 1
    weights = meta.weights.contiguous()                              # [T, k] fp32, flat index m
    block_r = min(_pow2_block(r_max), MAX_BLOCK_R)
    common = dict(M=m_rows, TOP_K=meta.top_k, BLOCK_M=BLOCK_ROWS)
    grad_a = grad_b = None
    if need_a:
        grad_a = torch.zeros(s_count, e_count, r_max, h_in, dtype=x.dtype, device=x.device)     # [S, E, R, H]
        n_i = triton.cdiv(r_max, block_r)
        if m_rows and h_in:
            _lora_grad_kernel[(e_count, s_count * n_i, triton.cdiv(h_in, BLOCK_WIDE))](
                buf_dy, x, grad_a,
                meta.sorted_ids, meta.offsets, ranks, weights, scales, slice_offsets,
                I_SIZE=r_max, J_SIZE=h_in, N_I_BLOCKS=n_i,
                stride_p_slice=buf_dy.stride(0), stride_p_row=buf_dy.stride(1),
                stride_q_slice=0, stride_q_row=x.stride(0),
                stride_o_slice=grad_a.stride(0), stride_o_expert=grad_a.stride(1), stride_o_i=grad_a.stride(2),
                P_BY_TOKEN=False, Q_BY_TOKEN=True, SLICED_I=False, RANK_ON_I=True,
                BLOCK_I=block_r, BLOCK_J=BLOCK_WIDE, **common,
            )
    if need_b:
        grad_b = torch.zeros(e_count, n_out, r_max, dtype=dy.dtype, device=dy.device)           # [E, N, R]
        n_i = triton.cdiv(n_out, BLOCK_WIDE)
        if m_rows and n_out:
            _lora_grad_kernel[(e_count, s_count * n_i, triton.cdiv(r_max, block_r))](
                dy, buf_x, grad_b,
                meta.sorted_ids, meta.offsets, ranks, weights, scales, slice_offsets,
                I_SIZE=n_out, J_SIZE=r_max, N_I_BLOCKS=n_i,
                stride_p_slice=0, stride_p_row=dy.stride(0),
                stride_q_slice=buf_x.stride(0), stride_q_row=buf_x.stride(1),
                stride_o_slice=0, stride_o_expert=grad_b.stride(0), stride_o_i=grad_b.stride(1),
                P_BY_TOKEN=True, Q_BY_TOKEN=False, SLICED_I=True, RANK_ON_I=False,
                BLOCK_I=BLOCK_WIDE, BLOCK_J=block_r, **common,
            )
    return grad_a, grad_b
