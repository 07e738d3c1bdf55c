"""Align by expert: routed rows m = t*k + j grouped by expert, each group padded to ``block_m``, no host sync.

Five small launches, all sizes from shapes (P = ``padded_length``):
1. ``_align_count_kernel``    one program per tile of rows: per-tile expert histogram (integer atomics).
2. ``_align_tile_scan_kernel`` one program per block of experts: exclusive scan of the histograms over tiles
                               (each tile's first slot inside every group) and the counts.
3. ``_align_offsets_kernel``  one program: exclusive scan of the padded counts -> offsets.
4. ``_align_pad_kernel``      one program per block of positions: expert of each block (binary search in offsets),
                               sentinel M in the pads and past the used length.
5. ``_align_scatter_kernel``  one program per tile: rank of each row among the earlier rows of its tile with the
                               same expert -> position; writes sorted_ids and inverse.
Positions follow ascending m inside each group (tile prefix + rank in tile), so the result is deterministic and equal
to the torch reference.

Legend: T tokens, E experts, k top-k, M = T*k routed rows, P padded length.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lumoe_engine.kernels.configs import cdiv, next_pow2

from lumoe_engine.ops.meta import RoutingMeta, padded_length

MAX_TILE = 512  # rows per tile; scratch is cdiv(M, tile) * E int32 (M = 100k, E = 4,096: 3.2 MB)
SUB = 32  # rows compared at once in the in-tile rank ([tile, SUB] comparisons per step)
BLOCK_TILES = 32  # tiles scanned at once by the tile scan
BLOCK_EXPERTS = 64  # experts per program of the tile scan
BLOCK_SCAN = 1024  # experts per step of the offsets scan
BLOCK_P = 1024  # positions per program of the pad kernel


@triton.jit
def _align_count_kernel(
    ids_ptr,  # [M] int32 in [-1, E)
    tile_counts_ptr,  # [num_tiles, E] int32, zeroed; out: rows of each expert in each tile
    M,
    E,
    TILE: tl.constexpr,
):
    tile = tl.program_id(0)
    m = tile * TILE + tl.arange(0, TILE)
    e = tl.load(ids_ptr + m, mask=m < M, other=-1)
    tl.atomic_add(tile_counts_ptr + tile.to(tl.int64) * E + e, 1, mask=e >= 0)


@triton.jit
def _align_tile_scan_kernel(
    tile_counts_ptr,  # [num_tiles, E] int32; out (in place): rows of the expert in earlier tiles
    counts_ptr,  # [E] int32 out
    num_tiles,
    E,
    BLOCK_TILES: tl.constexpr,
    BLOCK_EXPERTS: tl.constexpr,
):
    e = tl.program_id(0) * BLOCK_EXPERTS + tl.arange(0, BLOCK_EXPERTS)
    carry = tl.zeros([BLOCK_EXPERTS], dtype=tl.int32)
    for t0 in range(0, num_tiles, BLOCK_TILES):
        t = t0 + tl.arange(0, BLOCK_TILES)
        ptrs = tile_counts_ptr + t.to(tl.int64)[:, None] * E + e[None, :]
        mask = (t[:, None] < num_tiles) & (e[None, :] < E)
        c = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(c, axis=0) - c + carry[None, :], mask=mask)
        carry += tl.sum(c, axis=0)
    tl.store(counts_ptr + e, carry, mask=e < E)


@triton.jit
def _align_offsets_kernel(
    counts_ptr,  # [E] int32
    offsets_ptr,  # [E + 1] int32 out: exclusive scan of the padded counts
    E,
    block_m,
    BLOCK: tl.constexpr,
):
    carry = 0
    for start in range(0, E, BLOCK):
        e = start + tl.arange(0, BLOCK)
        c = tl.load(counts_ptr + e, mask=e < E, other=0)
        padded = (c + block_m - 1) // block_m * block_m
        tl.store(offsets_ptr + e, tl.cumsum(padded, axis=0) - padded + carry, mask=e < E)
        carry += tl.sum(padded, axis=0)
    tl.store(offsets_ptr + E, carry)


@triton.jit
def _align_pad_kernel(
    offsets_ptr,  # [E + 1] int32
    counts_ptr,  # [E] int32
    sorted_ids_ptr,  # [P] int32 out: sentinel M at pads and past offsets[E]
    block_expert_ptr,  # [P // block_m] int32 out: expert of each block, -1 past offsets[E]
    P,
    M,
    E,
    block_m,
    search_steps,
    BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = p < P
    start = p // block_m * block_m
    # Binary search: the first expert e with offsets[e + 1] > start (offsets are non-decreasing).
    lo = tl.zeros([BLOCK_P], dtype=tl.int32)
    hi = tl.zeros([BLOCK_P], dtype=tl.int32) + E
    for _ in range(search_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        upper = tl.load(offsets_ptr + mid + 1, mask=active & in_range, other=0)
        right = upper <= start
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    used = tl.load(offsets_ptr + E)
    in_use = start < used
    e = tl.where(in_use, lo, -1)
    group_end = tl.load(offsets_ptr + e, mask=in_use & in_range, other=0) \
        + tl.load(counts_ptr + e, mask=in_use & in_range, other=0)
    pad = ~in_use | (p >= group_end)
    tl.store(sorted_ids_ptr + p, tl.zeros([BLOCK_P], dtype=tl.int32) + M, mask=in_range & pad)
    tl.store(block_expert_ptr + p // block_m, e, mask=in_range & (p % block_m == 0))


@triton.jit
def _align_scatter_kernel(
    ids_ptr,  # [M] int32 in [-1, E)
    tile_base_ptr,  # [num_tiles, E] int32: rows of each expert in earlier tiles
    offsets_ptr,  # [E + 1] int32
    sorted_ids_ptr,  # [P] int32 out (rows)
    inverse_ptr,  # [M] int32 out
    M,
    E,
    TILE: tl.constexpr,
    SUB: tl.constexpr,
):
    tile = tl.program_id(0)
    r = tl.arange(0, TILE)
    m = tile * TILE + r
    e = tl.load(ids_ptr + m, mask=m < M, other=-1)
    valid = e >= 0
    # Rank among the earlier rows of this tile with the same expert, SUB columns at a time.
    rank = tl.zeros([TILE], dtype=tl.int32)
    for j0 in range(0, TILE, SUB):
        rj = j0 + tl.arange(0, SUB)
        ej = tl.load(ids_ptr + tile * TILE + rj, mask=tile * TILE + rj < M, other=-1)
        same = (e[:, None] == ej[None, :]) & (rj[None, :] < r[:, None])
        rank += tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(tile_base_ptr + tile.to(tl.int64) * E + e, mask=valid, other=0)
    pos = tl.load(offsets_ptr + e, mask=valid, other=0) + base + rank
    tl.store(sorted_ids_ptr + pos, m, mask=valid)
    tl.store(inverse_ptr + m, tl.where(valid, pos, -1), mask=m < M)


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> RoutingMeta:
    """Group the flat routed rows m = t*k + j by expert (ascending), each group padded to a multiple of ``block_m``.

    Rows inside a group in ascending m; pads hold the sentinel M; rows with ``ids == -1`` are skipped
    (``inverse = -1``). No host synchronisation: P = ``padded_length(M, E, block_m)``.

    ids: [T, k] int32 in [-1, E), contiguous       num_experts: E >= 1       block_m: power of two >= 16
    returns RoutingMeta: sorted_ids [P], block_expert [P // block_m], counts [E], offsets [E + 1], inverse [M]
    (int32); ``ids`` is the input, ``weights`` None (``build_routing`` attaches both).
    """
    assert ids.dim() == 2 and ids.dtype == torch.int32 and ids.is_contiguous(), \
        f"ids: expected contiguous [T, k] int32, got {tuple(ids.shape)} {ids.dtype}"
    assert num_experts >= 1 and block_m >= 16 and block_m & (block_m - 1) == 0
    _check_device(ids)
    E, M, dev = num_experts, ids.numel(), ids.device
    P = padded_length(M, E, block_m)
    i32 = torch.int32
    sorted_ids = torch.empty(P, dtype=i32, device=dev)
    block_expert = torch.empty(P // block_m, dtype=i32, device=dev)
    counts = torch.empty(E, dtype=i32, device=dev)
    offsets = torch.empty(E + 1, dtype=i32, device=dev)
    inverse = torch.empty(M, dtype=i32, device=dev)

    tile = min(MAX_TILE, max(SUB, next_pow2(max(M, 1))))
    num_tiles = cdiv(M, tile)
    tile_counts = torch.zeros(max(num_tiles, 1) * E, dtype=i32, device=dev)
    if num_tiles:
        _align_count_kernel[(num_tiles,)](ids, tile_counts, M, E, TILE=tile)
    _align_tile_scan_kernel[(cdiv(E, BLOCK_EXPERTS),)](
        tile_counts, counts, num_tiles, E, BLOCK_TILES=BLOCK_TILES, BLOCK_EXPERTS=BLOCK_EXPERTS)
    _align_offsets_kernel[(1,)](counts, offsets, E, block_m, BLOCK=min(BLOCK_SCAN, max(16, next_pow2(E))))
    _align_pad_kernel[(cdiv(P, BLOCK_P),)](
        offsets, counts, sorted_ids, block_expert, P, M, E, block_m, E.bit_length() + 1, BLOCK_P=BLOCK_P)
    if num_tiles:
        _align_scatter_kernel[(num_tiles,)](ids, tile_counts, offsets, sorted_ids, inverse, M, E, TILE=tile, SUB=SUB)
    return RoutingMeta(ids=ids, weights=None, sorted_ids=sorted_ids, block_expert=block_expert, counts=counts,
                       offsets=offsets, inverse=inverse, block_m=block_m)


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"ids: on {t.device}, but the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1); "
                         "move them to the GPU or set LUMOE_BACKEND=torch")
