"""Torch reference of the grouped multi-LoRA ops: the CPU backend and the test oracle.

Same signatures as the Triton launchers (``lumoe_engine.kernels.lora_*``). Plain torch: the stacked weights are
gathered per routed row and contracted with einsum, in fp32, over bounded chunks of rows (so memory stays bounded);
the only Python loops are over slices, over the k choices of a token (a fixed summation order) and over row chunks.
The reference reads ``meta.ids`` / ``meta.weights`` only, never the expert-grouped order: it is independent of the
alignment it checks.

Legend: T tokens (rows of x), E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), S slices,
H input features, N output features of all slices together, R max rank.
"""
from __future__ import annotations

import torch

from lumoe_engine.ops.meta import RoutingMeta

# Upper bound on the elements of one gathered weight chunk ([rows, R, H] or [rows, N_s, R]), fp32: 64 MiB.
_CHUNK_ELEMS = 1 << 24


def _rows_per_chunk(per_row: int, multiple: int = 1) -> int:
    rows = max(1, _CHUNK_ELEMS // max(1, per_row))
    return max(multiple, rows // multiple * multiple)


def _routing(ids: torch.Tensor, ranks: torch.Tensor, r_max: int):
    """Flat expert per row (clamped to 0 where -1), validity, and the rank mask ``[M, R]`` (False on -1 rows)."""
    flat = ids.reshape(-1).long()
    valid = flat >= 0
    expert = flat.clamp(min=0)
    rank_mask = torch.arange(r_max, device=ids.device)[None, :] < ranks.long()[expert][:, None]
    return expert, valid, rank_mask & valid[:, None]


def _shrink_rows(x, lora_a, ids, ranks, out):
    s_count, _, r_max, _ = lora_a.shape
    num_tokens, top_k = ids.shape
    expert, _, mask = _routing(ids, ranks, r_max)
    step = _rows_per_chunk(r_max * lora_a.shape[-1])
    for m0 in range(0, num_tokens * top_k, step):
        m1 = min(num_tokens * top_k, m0 + step)
        rows = torch.arange(m0, m1, device=x.device) // top_k
        xr = x[rows].float()                                                   # [c, H]
        for s in range(s_count):
            a = lora_a[s][expert[m0:m1]].float()                               # [c, R, H]
            val = torch.einsum("ch,crh->cr", xr, a)
            out[s, m0:m1] = torch.where(mask[m0:m1], val, torch.zeros((), device=val.device))
    return out


def _expand_rows(buf, lora_b, slice_offsets, ids, weights, scales, ranks, y):
    _, _, r_max = lora_b.shape
    num_tokens, top_k = ids.shape
    expert, valid, mask = _routing(ids, ranks, r_max)
    coef = torch.where(valid, weights.reshape(-1).float() * scales.float()[expert], torch.zeros((), device=y.device))
    offs = [int(v) for v in slice_offsets.tolist()]
    acc = torch.zeros(num_tokens, lora_b.shape[1], dtype=torch.float32, device=y.device)
    for s in range(len(offs) - 1):
        n0, n1 = offs[s], offs[s + 1]
        b_s = lora_b[:, n0:n1]                                                  # [E, N_s, R] (view)
        step = _rows_per_chunk((n1 - n0) * r_max, top_k) // top_k              # tokens per chunk
        for t0 in range(0, num_tokens, step):
            t1 = min(num_tokens, t0 + step)
            m0, m1 = t0 * top_k, t1 * top_k
            u = torch.where(mask[m0:m1], buf[s, m0:m1].float(), torch.zeros((), device=y.device)) * coef[m0:m1, None]
            contrib = torch.einsum("cr,cnr->cn", u, b_s[expert[m0:m1]].float()).view(t1 - t0, top_k, n1 - n0)
            total = contrib[:, 0]
            for j in range(1, top_k):                                          # fixed order over the k choices
                total = total + contrib[:, j]
            acc[t0:t1, n0:n1] = total
    touched = valid.view(num_tokens, top_k).any(dim=1)[:, None]
    y.copy_(torch.where(touched, (y.float() + acc).to(y.dtype), y))
    return y


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: RoutingMeta, ranks: torch.Tensor, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``buf[s, m, :] = x[m // k] @ lora_a[s, e_m].T``; columns r >= ranks[e_m] and rows with e_m = -1 are zero.

    x: [T, H] fp32/fp16/bf16; lora_a: [S, E, R, H] dtype of x; meta: routing of T tokens; ranks: [E] int32 in [0, R];
    out: [S, M, R] fp32 (every row is written; allocated when None). Returns buf [S, M, R] fp32.
    """
    s_count, _, r_max, _ = lora_a.shape
    m_rows = meta.ids.numel()
    if out is None:
        out = torch.zeros(s_count, m_rows, r_max, dtype=torch.float32, device=x.device)
    return _shrink_rows(x, lora_a, meta.ids, ranks, out)


def lora_expand(buf: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor, meta: RoutingMeta,
                scales: torch.Tensor, ranks: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y[t, n_s] += sum_j w[t, j] * scales[e] * buf[s, t*k+j, :ranks[e]] @ lora_b[e, n_s, :ranks[e]].T``.

    Per slice s, ``n_s = slice_offsets[s]:slice_offsets[s+1]``, e = meta.ids[t, j]; fp32 accumulation, the k terms
    summed in order j = 0..k-1; rows whose ids are all -1 are left untouched (bitwise).
    buf: [S, M, R] fp32; lora_b: [E, N, R] dtype of y; slice_offsets: [S+1] int32; scales: [E] fp32;
    ranks: [E] int32; y: [T, N] fp32/fp16/bf16, updated in place and returned.
    """
    return _expand_rows(buf, lora_b, slice_offsets, meta.ids, meta.weights, scales, ranks, y)


def lora_shrink_expand(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor,
                       ids: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
    """``lora_shrink`` then ``lora_expand`` in one call, from the routing itself (no alignment metadata).

    x: [T, H]; lora_a: [S, E, R, H] dtype of x; lora_b: [E, N, R] dtype of y; slice_offsets: [S+1] int32;
    ids: [T, k] int32 (-1 = no expert); weights: [T, k] fp32; scales: [E] fp32; ranks: [E] int32;
    y: [T, N], updated in place and returned.
    """
    s_count, _, r_max, _ = lora_a.shape
    buf = torch.zeros(s_count, ids.numel(), r_max, dtype=torch.float32, device=x.device)
    _shrink_rows(x, lora_a, ids, ranks, buf)
    return _expand_rows(buf, lora_b, slice_offsets, ids, weights, scales, ranks, y)


def lora_weight_grad(x: torch.Tensor, dy: torch.Tensor, buf_x: torch.Tensor, buf_dy: torch.Tensor,
                     slice_offsets: torch.Tensor, meta: RoutingMeta, scales: torch.Tensor, ranks: torch.Tensor, *,
                     need_a: bool = True, need_b: bool = True):
    """Gradients of the stacked LoRA weights, segmented by expert (``c_m = w[m] * scales[e_m]``, r < ranks[e]):

    ``grad_a[s, e, r, :] = sum_{m: e_m = e} c_m * buf_dy[s, m, r] * x[m // k]``
    ``grad_b[e, n, r]    = sum_{m: e_m = e} c_m * dy[m // k, n] * buf_x[s(n), m, r]``   (s(n): the slice holding n)

    Experts without rows get zero gradients. x: [T, H]; dy: [T, N] (gradient of the LoRA output);
    buf_x: [S, M, R] fp32 (``lora_shrink`` of x with A); buf_dy: [S, M, R] fp32 (``dy[:, n_s] @ B_e[n_s]`` per slice,
    unscaled); slice_offsets: [S+1] int32; scales: [E] fp32; ranks: [E] int32.
    Returns ``(grad_a [S, E, R, H] dtype of x or None, grad_b [E, N, R] dtype of dy or None)``.
    """
    s_count, m_rows, r_max = buf_dy.shape
    num_tokens, top_k = meta.ids.shape
    e_count, h_in, n_out = meta.num_experts, x.shape[1], dy.shape[1]
    expert, valid, mask = _routing(meta.ids, ranks, r_max)
    zero = torch.zeros((), device=x.device)
    coef = torch.where(valid, meta.weights.reshape(-1).float() * scales.float()[expert], zero)
    offs = [int(v) for v in slice_offsets.tolist()]
    grad_a = torch.zeros(s_count, e_count, r_max, h_in, dtype=torch.float32, device=x.device) if need_a else None
    grad_b = torch.zeros(e_count, n_out, r_max, dtype=torch.float32, device=x.device) if need_b else None
    step = _rows_per_chunk(r_max * max(h_in, n_out))
    for m0 in range(0, m_rows, step):
        m1 = min(m_rows, m0 + step)
        rows = torch.arange(m0, m1, device=x.device) // top_k
        msk, c, e = mask[m0:m1], coef[m0:m1, None], expert[m0:m1]
        for s in range(s_count):
            if need_a:
                p = torch.where(msk, buf_dy[s, m0:m1], zero) * c                             # [c, R]
                grad_a[s].index_add_(0, e, p[:, :, None] * x[rows].float()[:, None, :])      # [c, R, H]
            if need_b:
                n0, n1 = offs[s], offs[s + 1]
                q = torch.where(msk, buf_x[s, m0:m1], zero)                                  # [c, R]
                g = (dy[rows, n0:n1].float() * c)[:, :, None] * q[:, None, :]                # [c, N_s, R]
                grad_b[:, n0:n1].index_add_(0, e, g)
    return (grad_a.to(x.dtype) if need_a else None, grad_b.to(dy.dtype) if need_b else None)


def grouped_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor,
                 meta: RoutingMeta, scales: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """``delta[t, n_s] = sum_j w[t,j] * scales[e] * (x[t] @ A[s, e, :r].T) @ B[e, n_s, :r].T``, in plain torch.

    The autograd oracle: torch differentiates it (gradients for x, lora_a, lora_b). Gathers the weights of every
    routed row at once (no chunking): for tests and small inputs.
    x: [T, H]; lora_a: [S, E, R, H]; lora_b: [E, N, R]; returns delta [T, N] dtype of x.
    """
    s_count, _, r_max, _ = lora_a.shape
    num_tokens, top_k = meta.ids.shape
    expert, valid, mask = _routing(meta.ids, ranks, r_max)
    zero = torch.zeros((), device=x.device)
    coef = torch.where(valid, meta.weights.reshape(-1).float() * scales.float()[expert], zero)
    rows = torch.arange(num_tokens * top_k, device=x.device) // top_k
    xr = x[rows].float()
    offs = [int(v) for v in slice_offsets.tolist()]
    parts = []
    for s in range(s_count):
        u = torch.einsum("mh,mrh->mr", xr, lora_a[s][expert].float())
        u = torch.where(mask, u, zero) * coef[:, None]
        b = lora_b[:, offs[s]:offs[s + 1]][expert].float()
        parts.append(torch.einsum("mr,mnr->mn", u, b).view(num_tokens, top_k, -1).sum(dim=1))
    return torch.cat(parts, dim=1).to(x.dtype)
