"""Shared random cases for the grouped multi-LoRA op tests (tests/test_lora_ops.py, tests/test_cpp_op.py).

Legend: T tokens, E experts, k top-k, S slices, H input features, N output features, R max rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTES = ("random", "distinct", "minus1", "one", "one_last")


@dataclass(frozen=True)
class Case:
    """One shape of the op. route: how tokens pick experts -
    "random": k distinct experts per token, expert E-1 never chosen; "distinct": k = E, every expert per token;
    "minus1": as random, then 30% of the choices and every 5th token entirely -1;
    "one": every choice is expert 1; "one_last": choice 0 is expert E-1, the others -1."""

    name: str
    T: int
    k: int
    E: int
    H: int
    R: int
    widths: tuple          # N of each slice
    ranks: tuple           # per expert, in [0, R]
    route: str

    def __post_init__(self):
        if self.route not in ROUTES:
            raise ValueError(f"Case {self.name}: route {self.route!r} not in {ROUTES}")

    @property
    def N(self) -> int:
        return sum(self.widths)


def make(case: Case, dtype=torch.float32, seed: int = 0, device="cpu", signed_zero_rows: bool = False) -> dict:
    """Random inputs of ``case`` (x, lora_a, lora_b, slice_offsets, ids, weights, scales, ranks, y); weights are 0
    where ids == -1. signed_zero_rows: every other entry of the rows without any expert is -0.0 (y + 0.0 would flip
    those bits, so a bitwise check of untouched rows really tests that they were not written)."""
    g = torch.Generator().manual_seed(seed)
    T, k, E = case.T, case.k, case.E
    pool = E - 1 if case.route in ("random", "minus1") else E
    draws = [torch.randperm(pool, generator=g)[:k] for _ in range(T)]
    if case.route in ("one", "one_last"):        # fixed experts (the draws still advance the generator)
        ids = torch.zeros(T, k, dtype=torch.int32)
    else:
        ids = torch.stack(draws).to(torch.int32)
    if case.route == "one":
        ids.fill_(1)
    if case.route == "one_last":
        ids[:, 0] = E - 1
        ids[:, 1:] = -1
    if case.route == "minus1":
        ids[torch.rand(T, k, generator=g) < 0.3] = -1
        ids[::5] = -1
    weights = torch.rand(T, k, generator=g) + 0.1
    weights[ids < 0] = 0.0
    offs = torch.tensor([0, *torch.tensor(case.widths).cumsum(0).tolist()], dtype=torch.int32)
    d = dict(
        x=torch.randn(T, case.H, generator=g).to(dtype),
        lora_a=(torch.randn(len(case.widths), E, case.R, case.H, generator=g) * 0.2).to(dtype),
        lora_b=(torch.randn(E, case.N, case.R, generator=g) * 0.2).to(dtype),
        slice_offsets=offs,
        ids=ids,
        weights=weights,
        scales=torch.rand(E, generator=g) + 0.5,
        ranks=torch.tensor(case.ranks, dtype=torch.int32),
        y=torch.randn(T, case.N, generator=g).to(dtype),
    )
    if signed_zero_rows:
        d["y"][(ids < 0).all(dim=1), ::2] = -0.0
    return {key: v.to(device) for key, v in d.items()}
