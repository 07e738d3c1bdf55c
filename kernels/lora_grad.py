"""Grouped LoRA weight gradients: per expert, a sum over that expert's routed rows (segments of ``meta.sorted_ids``).

``grad_a[s, e, r, :] = sum_{m: e_m = e} c_m * buf_dy[s, m, r] * x[m // k]``
``grad_b[e, n, r]    = sum_{m: e_m = e} c_m * dy[m // k, n] * buf_x[s(n), m, r]``       c_m = w[m] * scales[e_m]

One kernel computes both as a segmented outer product
``out[s, e, i, j] = sum_m c_m * P[s, row(m), i] * Q[s, row(m), j]`` (row(m) = m or the token m // k), rank-masked
on i or j. An expert's rows are split over up to ``split_k`` programs (``configs``; at least ``ROWS_PER_SPLIT`` rows
each on average), so that a long segment (T = 4096 rows of one expert) runs on many programs; each program writes
its own fp32 partial tile and the partials are added in a fixed order afterwards (deterministic, no float atomics).
On a GPU, fp16/bf16 operands go into ``tl.dot`` as they are (fp32 accumulation; the fp32 operand - buf_dy scaled
by c_m, or buf_x - is rounded to that dtype); see ``configs.dot_flags``.

Legend: T tokens, E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), S slices, H input features,
N output features of all slices together, R max rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lumoe_engine.kernels import configs
from lumoe_engine.kernels.configs import cdiv
from lumoe_engine.kernels.configs import KernelConfig
from lumoe_engine.kernels.mma import mma
from lumoe_engine.ops.meta import RoutingMeta

# NOTE: at least 256 rows per split on average (rows / experts), and partial sums of at most 2^26 fp32 elements
# (256 MiB): by counting, the memset + reduction of the partials then costs at most ~1/8 of reading the rows
# (256 rows x H vs R x H per split). Not measured on a GPU yet.
ROWS_PER_SPLIT = 256
MAX_PARTIAL_ELEMS = 1 << 26


@triton.jit
def _lora_grad_kernel(
    p_ptr, q_ptr, out_ptr,
    sorted_ids_ptr, offsets_ptr, counts_ptr, ranks_ptr, weights_ptr, scales_ptr, slice_offsets_ptr,
    M, TOP_K, I_SIZE, J_SIZE, N_I_BLOCKS, SPLIT,
    stride_p_slice, stride_p_row, stride_q_slice, stride_q_row,
    stride_o_split, stride_o_slice, stride_o_expert, stride_o_i,
    P_BY_TOKEN: tl.constexpr, Q_BY_TOKEN: tl.constexpr, SLICED_I: tl.constexpr, RANK_ON_I: tl.constexpr,
    LOW_IS_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    DOT16: tl.constexpr, TF32: tl.constexpr,
):
    e = tl.program_id(0) // SPLIT
    split = tl.program_id(0) % SPLIT
    s = tl.program_id(1) // N_I_BLOCKS
    pid_i = tl.program_id(1) % N_I_BLOCKS
    pid_j = tl.program_id(2)
    count = tl.load(counts_ptr + e)
    if count == 0:                        # expert without rows: its gradient stays 0 (zeroed by the launcher)
        return
    start = tl.load(offsets_ptr + e)
    chunk = tl.cdiv(tl.cdiv(count, SPLIT), BLOCK_M) * BLOCK_M
    lo = start + split * chunk
    hi = tl.minimum(start + count, lo + chunk)
    if lo >= hi:                          # fewer rows than splits: this partial stays 0
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
    for r0 in range(lo, hi, BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < hi
        m = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=M)
        row_ok = row_ok & (m < M)
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
                    other=0.0)                                                                      # [BLOCK_M, BLOCK_J]
        pc = p * coef[:, None]
        if DOT16:                         # both operands in the 16-bit dtype of x / dy
            if LOW_IS_P:
                acc = mma(tl.trans(pc.to(p_ptr.dtype.element_ty)), q.to(p_ptr.dtype.element_ty), acc, DOT16, TF32)
            else:
                acc = mma(tl.trans(pc.to(q_ptr.dtype.element_ty)), q, acc, DOT16, TF32)
        else:
            acc = mma(tl.trans(pc), q.to(tl.float32), acc, DOT16, TF32)
    out = (out_ptr + split.to(tl.int64) * stride_o_split + s.to(tl.int64) * stride_o_slice
           + e.to(tl.int64) * stride_o_expert + (i_lo + offs_i)[:, None].to(tl.int64) * stride_o_i + offs_j[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


@dataclass(slots=True)
class GradPlan:
    """Everything one of the two launches decides, from shapes and the config alone."""

    cfg: KernelConfig
    source: str
    grid: tuple
    block_m: int
    block_i: int
    block_j: int
    n_i: int
    split: int
    dot16: bool
    tf32: bool


def plan(which: str, dtype: torch.dtype, on_gpu: bool, h_in: int, n_out: int, r_max: int, m_rows: int,
         s_count: int, e_count: int) -> GradPlan:
    """The launch of ``grad_a`` (``which="a"``: out [S, E, R, H]) or ``grad_b`` (``"b"``: out [E, N, R])."""
    op = "lora_grad_a" if which == "a" else "lora_grad_b"
    hidden = h_in if which == "a" else n_out
    cfg, source = configs.lookup(op, dtype, hidden, r_max, m_rows)
    br = configs.block_r(r_max)
    if which == "a":
        block_i, block_j, n_i = br, cfg.block_n, cdiv(r_max, br)
        grid_ij = (s_count * n_i, cdiv(h_in, cfg.block_n))
        elems = s_count * e_count * r_max * h_in
    else:
        block_i, block_j, n_i = cfg.block_n, br, cdiv(n_out, cfg.block_n)
        grid_ij = (s_count * n_i, cdiv(r_max, br))
        elems = e_count * n_out * r_max
    per_expert = cdiv(max(m_rows, 1), e_count)
    split = max(1, min(cfg.split_k, per_expert // ROWS_PER_SPLIT, MAX_PARTIAL_ELEMS // max(1, elems)))
    dot16, tf32 = configs.dot_flags(dtype, on_gpu)
    return GradPlan(cfg, source, (e_count * split, *grid_ij), cfg.block_k, block_i, block_j, n_i, split, dot16, tf32)


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
    common = dict(M=m_rows, TOP_K=meta.top_k)
    index = (meta.sorted_ids, meta.offsets, meta.counts, ranks, weights, scales, slice_offsets)
    grad_a = grad_b = None
    if need_a:
        grad_a = torch.zeros(s_count, e_count, r_max, h_in, dtype=x.dtype, device=x.device)     # [S, E, R, H]
        if m_rows and h_in:
            p = plan("a", x.dtype, configs.compiled(x), h_in, n_out, r_max, m_rows, s_count, e_count)
            dst = grad_a if p.split == 1 else \
                torch.zeros(p.split, *grad_a.shape, dtype=torch.float32, device=x.device)       # [split, S, E, R, H]
            _lora_grad_kernel[p.grid](
                buf_dy, x, dst, *index,
                I_SIZE=r_max, J_SIZE=h_in, N_I_BLOCKS=p.n_i, SPLIT=p.split,
                stride_p_slice=buf_dy.stride(0), stride_p_row=buf_dy.stride(1),
                stride_q_slice=0, stride_q_row=x.stride(0),
                stride_o_split=dst.stride(0) if p.split > 1 else 0, stride_o_slice=dst.stride(-4),
                stride_o_expert=dst.stride(-3), stride_o_i=dst.stride(-2),
                P_BY_TOKEN=False, Q_BY_TOKEN=True, SLICED_I=False, RANK_ON_I=True, LOW_IS_P=False,
                BLOCK_M=p.block_m, BLOCK_I=p.block_i, BLOCK_J=p.block_j, DOT16=p.dot16, TF32=p.tf32,
                **common, **configs.launch_options(p.cfg),
            )
            if p.split > 1:                                          # fixed order: deterministic
                grad_a.copy_(dst.sum(dim=0))
    if need_b:
        grad_b = torch.zeros(e_count, n_out, r_max, dtype=dy.dtype, device=dy.device)           # [E, N, R]
        if m_rows and n_out:
            p = plan("b", dy.dtype, configs.compiled(dy), h_in, n_out, r_max, m_rows, s_count, e_count)
            dst = grad_b if p.split == 1 else \
                torch.zeros(p.split, *grad_b.shape, dtype=torch.float32, device=dy.device)      # [split, E, N, R]
            _lora_grad_kernel[p.grid](
                dy, buf_x, dst, *index,
                I_SIZE=n_out, J_SIZE=r_max, N_I_BLOCKS=p.n_i, SPLIT=p.split,
                stride_p_slice=0, stride_p_row=dy.stride(0),
                stride_q_slice=buf_x.stride(0), stride_q_row=buf_x.stride(1),
                stride_o_split=dst.stride(0) if p.split > 1 else 0, stride_o_slice=0,
                stride_o_expert=dst.stride(-3), stride_o_i=dst.stride(-2),
                P_BY_TOKEN=True, Q_BY_TOKEN=False, SLICED_I=True, RANK_ON_I=False, LOW_IS_P=True,
                BLOCK_M=p.block_m, BLOCK_I=p.block_i, BLOCK_J=p.block_j, DOT16=p.dot16, TF32=p.tf32,
                **common, **configs.launch_options(p.cfg),
            )
            if p.split > 1:
                grad_b.copy_(dst.sum(dim=0))
    return grad_a, grad_b
