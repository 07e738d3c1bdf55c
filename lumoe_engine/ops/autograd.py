"""Grouped multi-LoRA as an autograd Function: training runs through the same ops as inference.

``delta[t, n_s] = sum_j w[t, j] * scales[e] * (x[t] @ A[s, e, :r_e].T) @ B[e, n_s, :r_e].T``, e = ids[t, j].

Backward, with dy = d delta and c_m = w[m] * scales[e_m]:
- ``buf_dy[s, m] = dy[t, n_s] @ B[e, n_s]``: a shrink of dy with the transposed B of each slice;
- ``dx[t] = sum_{j, s} c_m * buf_dy[s, m] @ A[s, e]``: an expand with A transposed to [E, S*H, R];
- ``dA``, ``dB``: the expert-segmented sums of ``lora_weight_grad`` (experts without rows get 0).
No gradient for the routing weights, scales or ranks.

One expert (E = 1, known from the shapes: training a new expert routes every row to it) takes a dense path instead
(``single_expert_lora``): ``delta = ((x @ A^T) * c) @ B^T`` with plain matmuls (tensor cores, no gather, no
metadata), differentiated by torch; the same values and gradients, without a host synchronisation for one slice.

Legend: T tokens (rows of x), E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), S slices,
H input features, N output features of all slices together, R max rank.
"""
from __future__ import annotations

import torch

from lumoe_engine.ops import lora as _lora
from lumoe_engine.ops.lora import get_lora_op
from lumoe_engine.ops.meta import RoutingMeta


class GroupedLoRAFunction(torch.autograd.Function):
    """Forward: ``lora_shrink`` + ``lora_expand`` into a zero delta. Backward: shrink/expand for dx, the segmented
    weight gradient for dA/dB. Arguments as in ``grouped_lora`` (validated there)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, slice_offsets, meta, scales, ranks):
        s_count, _, r_max, _ = lora_a.shape
        buf = get_lora_op("lora_shrink")(x, lora_a, meta, ranks)                               # [S, M, R] fp32
        delta = torch.zeros(x.shape[0], lora_b.shape[1], dtype=x.dtype, device=x.device)        # [T, N]
        get_lora_op("lora_expand")(buf, lora_b, slice_offsets, meta, scales, ranks, delta)
        ctx.save_for_backward(x, lora_a, lora_b, slice_offsets, scales, ranks, buf)
        ctx.meta = meta
        return delta

    @staticmethod
    def backward(ctx, d_delta):
        x, lora_a, lora_b, slice_offsets, scales, ranks, buf = ctx.saved_tensors
        meta: RoutingMeta = ctx.meta
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        s_count, e_count, r_max, h_in = lora_a.shape
        num_tokens, n_out = d_delta.shape
        dy = d_delta.to(x.dtype)
        if dy.stride(1) != 1:
            dy = dy.contiguous()
        dx = grad_a = grad_b = None
        buf_dy = None
        if need_x or need_a:
            shrink = get_lora_op("lora_shrink")
            buf_dy = torch.empty(s_count, meta.ids.numel(), r_max, dtype=torch.float32, device=x.device)
            # Python ints for the column ranges (one small read; none when S == 1).
            offs = [0, n_out] if s_count == 1 else [int(v) for v in slice_offsets.tolist()]
            for s in range(s_count):
                n0, n1 = offs[s], offs[s + 1]
                b_t = lora_b[:, n0:n1, :].transpose(1, 2).contiguous()[None]                   # [1, E, R, N_s]
                shrink(dy[:, n0:n1].contiguous(), b_t, meta, ranks, out=buf_dy[s:s + 1])
        if need_x:
            a_t = lora_a.permute(1, 0, 3, 2).reshape(e_count, s_count * h_in, r_max).contiguous()  # [E, S*H, R]
            h_offsets = torch.arange(s_count + 1, dtype=torch.int32, device=x.device) * h_in
            dxs = torch.zeros(num_tokens, s_count * h_in, dtype=x.dtype, device=x.device)    # [T, S*H]
            get_lora_op("lora_expand")(buf_dy, a_t, h_offsets, meta, scales, ranks, dxs)
            dx = dxs if s_count == 1 else dxs.view(num_tokens, s_count, h_in).float().sum(dim=1).to(x.dtype)
        if need_a or need_b:
            grad_a, grad_b = get_lora_op("lora_weight_grad")(
                x, dy, buf, buf_dy if buf_dy is not None else buf, slice_offsets, meta, scales, ranks,
                need_a=need_a, need_b=need_b)
        return dx, grad_a, grad_b, None, None, None, None


def single_expert_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor,
                       meta: RoutingMeta, scales: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """``grouped_lora`` for E = 1, as dense matmuls: ``delta[:, n_s] = (where(routed, (x @ A_s^T) * mask_r * c)) @
    B[n_s]^T`` with ``c[t] = scales[0] * sum_j w[t, j] [ids[t, j] = 0]`` and ``mask_r = r < ranks[0]``.

    Matmuls in the dtype of x (fp32 accumulation inside torch's GEMMs); rows without the expert get exactly 0 and
    no gradient. Every quantity stays on the device (no ``.item()``), except the column ranges of several slices
    (``slice_offsets`` read once when S > 1). Shapes as in ``grouped_lora``.
    """
    s_count, _, r_max, _ = lora_a.shape                                                      # [S, 1, R, H]
    n_out = lora_b.shape[1]                                                                  # [1, N, R]
    routed = meta.ids == 0                                                                   # [T, k]
    coef = torch.where(routed, meta.weights, torch.zeros((), device=x.device)).sum(dim=1) * scales[0]   # [T] fp32
    keep = routed.any(dim=1)[:, None]                                                        # [T, 1]
    col = (torch.arange(r_max, device=x.device) < ranks[0]).to(torch.float32)               # [R]
    c = (coef[:, None] * col[None, :]).detach()                                              # [T, R] fp32
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    offs = [0, n_out] if s_count == 1 else [int(v) for v in slice_offsets.tolist()]
    parts = []
    for s in range(s_count):
        u = x @ lora_a[s, 0].t()                                                             # [T, R]
        v = torch.where(keep, (u.float() * c).to(x.dtype), zero)
        parts.append(v @ lora_b[0, offs[s]:offs[s + 1]].t())                                 # [T, N_s]
    return parts[0] if s_count == 1 else torch.cat(parts, dim=1)


def grouped_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor,
                 meta: RoutingMeta, scales: torch.Tensor, ranks: torch.Tensor, *,
                 validate: bool = True) -> torch.Tensor:
    """``delta[t, n_s] = sum_j w[t, j] * scales[e] * (x[t] @ A[s, e, :r_e].T) @ B[e, n_s, :r_e].T`` (autograd).

    Gradients flow to x, lora_a and lora_b (only the experts present get non-zero gradients), through the grouped
    kernels of the backend in use; none to the routing weights, scales or ranks. A token with no expert gets 0.
    x: [T, H] fp32/fp16/bf16 (rows contiguous); lora_a: [S, E, R, H] dtype of x; lora_b: [E, N, R] dtype of x;
    slice_offsets: [S+1] int32 from 0 to N; meta: ``build_routing`` of T tokens; scales: [E] fp32;
    ranks: [E] int32 in [0, R]. Returns delta [T, N] dtype of x.
    One expert (E = 1) runs as dense matmuls (``single_expert_lora``), several through the grouped kernels.
    """
    x = _lora._rows_2d(x, "x", "[T, H]")
    s_count, e_count, r_max = _lora._lora_a(lora_a, x)
    n_out = _lora._lora_b(lora_b, e_count, r_max, x.device)
    if lora_b.dtype != x.dtype:
        raise ValueError(f"lora_b: expected the dtype of x ({x.dtype}) (delta has the dtype of x), "
                         f"got {lora_b.dtype}; cast with .to(x.dtype)")
    _lora._meta(meta, x.shape[0], e_count, x.device)
    _lora._slice_offsets(slice_offsets, s_count, x.device)
    _lora._per_expert(scales, "scales", e_count, torch.float32, x.device)
    _lora._per_expert(ranks, "ranks", e_count, torch.int32, x.device)
    _lora._values([_lora._rank_check(ranks, r_max), _lora._slice_check(slice_offsets, n_out)], validate)
    if e_count == 1:
        return single_expert_lora(x, lora_a, lora_b, slice_offsets, meta, scales, ranks)
    return GroupedLoRAFunction.apply(x, lora_a, lora_b, slice_offsets, meta, scales, ranks)
