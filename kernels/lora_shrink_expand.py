"""Fused LoRA shrink + expand for small T (decode), straight from the routing (no alignment metadata):
``y[t, n_s] += sum_j w[t, j] * scales[e] * (x[t] @ lora_a[s, e, :r_e].T) @ lora_b[e, n_s, :r_e].T``, e = ids[t, j].

Legend: T tokens (rows of x and y), E experts, k top-k, S slices, H input features, N output features of all
slices together, R max rank.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# NOTE: one program per (token, slice, N block); the whole rank in one block (BLOCK_R = next power of two >= R) and
# H / N tiles of at most 4,096 / BLOCK_R elements (between 16 and 128). Vector products (tl.sum), no tl.dot: one
# token per program. Starting points, not measured yet; to be swept on a GPU (H100) with the benchmarks.
TILE_ELEMS = 4096


@triton.jit
def _lora_shrink_expand_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr,
    ids_ptr, weights_ptr, scales_ptr, ranks_ptr, slice_offsets_ptr,
    H, TOP_K,
    stride_x_row, stride_a_slice, stride_a_expert, stride_a_rank, stride_b_expert, stride_b_row, stride_y_row,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
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
    x_row = x_ptr + t * stride_x_row
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    touched = tl.zeros((1,), dtype=tl.int32)
    for j in range(TOP_K):                # fixed order over the k choices
        e = tl.load(ids_ptr + t * TOP_K + j)
        valid = e >= 0
        e64 = tl.maximum(e, 0).to(tl.int64)
        rank = tl.where(valid, tl.load(ranks_ptr + e64), 0)      # no expert: rank 0, every load masked
        r_ok = offs_r < rank
        a_base = a_ptr + s.to(tl.int64) * stride_a_slice + e64 * stride_a_expert + offs_r[:, None] * stride_a_rank
        u = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            xv = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)                 # [BLOCK_K]
            at = tl.load(a_base + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)                                                  # [BLOCK_R, BLOCK_K]
            u += tl.sum(at * xv[None, :], axis=1)
        bt = tl.load(b_ptr + e64 * stride_b_expert + offs_n[:, None].to(tl.int64) * stride_b_row + offs_r[None, :],
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)                  # [BLOCK_N, BLOCK_R]
        coef = tl.where(valid, tl.load(weights_ptr + t * TOP_K + j) * tl.load(scales_ptr + e64), 0.0)
        acc += coef * tl.sum(bt * u[None, :], axis=1)
        touched += valid.to(tl.int32)
    dst = y_ptr + t * stride_y_row + offs_n
    n_end = tl.where(tl.sum(touched, axis=0) > 0, n_hi, n0)   # a token with no expert is left untouched
    mask = offs_n < n_end
    old = tl.load(dst, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (old + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _rows_ok(t: torch.Tensor) -> bool:
    """Rows contiguous (the kernel steps columns by 1); any strides do for an empty tensor or a single column."""
    return t.stride(1) == 1 or t.shape[0] == 0 or t.shape[1] <= 1


def lora_shrink_expand(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slice_offsets: torch.Tensor,
                       ids: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
    """``lora_shrink`` then ``lora_expand`` in one launch, one program per (token, slice, N block); y in place.

    x: [T, H]; lora_a: [S, E, R, H]; lora_b: [E, N, R]; slice_offsets: [S+1] int32; ids: [T, k] int32 (-1 = none);
    weights: [T, k] fp32; scales: [E] fp32; ranks: [E] int32; y: [T, N]. Checked by ``lumoe_engine.ops``.
    """
    s_count, _, r_max, h_in = lora_a.shape                           # [S, E, R, H]
    _, n_out, _ = lora_b.shape                                       # [E, N, R]
    num_tokens, top_k = ids.shape                                    # [T, k]
    assert _rows_ok(x) and _rows_ok(y) and lora_a.is_contiguous() and lora_b.is_contiguous()
    assert ids.is_contiguous() and weights.is_contiguous() and slice_offsets.numel() == s_count + 1
    if num_tokens == 0 or n_out == 0:
        return y
    block_r = max(16, triton.next_power_of_2(r_max))
    tile = max(16, min(128, TILE_ELEMS // block_r))
    grid = (num_tokens, s_count, triton.cdiv(n_out, tile))
    _lora_shrink_expand_kernel[grid](
        x, lora_a, lora_b, y,
        ids, weights, scales, ranks, slice_offsets,
        h_in, top_k,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), lora_b.stride(0), lora_b.stride(1),
        y.stride(0),
        BLOCK_N=tile, BLOCK_R=block_r, BLOCK_K=tile,
    )
    return y
