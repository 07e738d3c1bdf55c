"""Routing metadata: built once per forward step, shared by every wrapped linear.

Legend: T tokens (rows of x), E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), P padded length.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class RoutingMeta(NamedTuple):
    """Tokens grouped by expert (output of ``align_by_expert``), plus the routing it came from.

    ids:          [T, k] int32   expert of each choice, -1 = no expert
    weights:      [T, k] fp32    routing weight of each choice (0 where ids == -1)
    sorted_ids:   [P] int32      flat indices m grouped by expert (ascending expert); pads hold the sentinel M
    block_expert: [P // block_m] int32  expert owning each block of sorted_ids, -1 for blocks past the end
    counts:       [E] int32      routed rows per expert
    offsets:      [E + 1] int32  start of each expert's padded group in sorted_ids; offsets[E] = used length
    inverse:      [M] int32      position of row m in sorted_ids, -1 where ids == -1
    block_m:      int            group padding (and the row block of the grouped LoRA kernels)

    P = round_up(M + min(E, M) * (block_m - 1), block_m): a bound known from shapes alone (no host sync).
    """

    ids: torch.Tensor
    weights: torch.Tensor
    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    inverse: torch.Tensor
    block_m: int

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]


def padded_length(num_rows: int, num_experts: int, block_m: int) -> int:
    """Static upper bound P on the padded, expert-grouped length of ``num_rows`` routed rows."""
    bound = num_rows + min(num_experts, num_rows) * (block_m - 1)
    return max(block_m, -(-bound // block_m) * block_m)
