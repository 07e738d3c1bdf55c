"""Align by expert: the Triton launcher (interpreter on CPU) and the torch reference, each checked against the
definition (groups as sets, pads, counts, offsets, block experts, inverse), then against each other; popularity
sweeps (distinct, uniform, zipf, identical, skewed), rows with -1, empty experts, prime E, determinism, and the front
functions' validation.

Legend: T tokens, E experts, k top-k, M = T*k routed rows, P padded length.
"""
import pytest
import torch

import lumoe_engine.kernels.align_by_expert as align_module
from lumoe_engine.kernels.align_by_expert import align_by_expert as triton_align
from lumoe_engine.ops import dispatch, routing
from lumoe_engine.ops.meta import RoutingMeta, padded_length
from lumoe_engine.ops.ref_routing import align_by_expert as ref_align

POPULARITY = ("distinct", "uniform", "zipf", "identical", "skewed")


def make_ids(T, k, E, popularity, skip=0.0, seed=0, device="cpu"):
    """ids [T, k] int32 drawn with the given expert popularity; a fraction ``skip`` of the choices is -1."""
    g = torch.Generator().manual_seed(seed)
    M = T * k
    if popularity == "distinct":  # as many different experts as possible
        flat = torch.randperm(max(M, E), generator=g)[:M] % E
    elif popularity == "uniform":
        flat = torch.randint(0, E, (M,), generator=g)
    elif popularity == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        flat = torch.randperm(E, generator=g)[torch.multinomial(p, M, replacement=True, generator=g)]
    elif popularity == "identical":  # every row to one expert, the others empty
        flat = torch.full((M,), E // 2)
    elif popularity == "skewed":  # 90% to expert 0
        flat = torch.where(torch.rand(M, generator=g) < 0.9, 0, torch.randint(0, E, (M,), generator=g))
    else:
        raise ValueError(popularity)
    flat = torch.where(torch.rand(M, generator=g) < skip, -1, flat)
    return flat.reshape(T, k).to(torch.int32).to(device)


def check_meta(meta: RoutingMeta, ids: torch.Tensor, E: int, block_m: int) -> None:
    """Every field against the definition in docs/KERNELS.md; order inside a group is compared as a set."""
    ids, M = ids.cpu(), ids.numel()
    P = padded_length(M, E, block_m)
    sorted_ids, block_expert, counts, offsets, inverse = (
        t.cpu() for t in (meta.sorted_ids, meta.block_expert, meta.counts, meta.offsets, meta.inverse))
    for name, t, n in (("sorted_ids", sorted_ids, P), ("block_expert", block_expert, P // block_m),
                       ("counts", counts, E), ("offsets", offsets, E + 1), ("inverse", inverse, M)):
        assert t.dtype == torch.int32 and t.shape == (n,), f"{name}: {t.dtype} {tuple(t.shape)}, expected [{n}]"
    assert meta.block_m == block_m
    flat = ids.reshape(-1).long()
    expected_counts = torch.bincount(flat[flat >= 0], minlength=E)
    assert torch.equal(counts.long(), expected_counts)
    padded = (expected_counts + block_m - 1) // block_m * block_m
    assert offsets[0].item() == 0
    assert torch.equal(offsets[1:].long() - offsets[:-1].long(), padded)
    assert offsets[E].item() <= P
    blocks = torch.repeat_interleave(torch.arange(E), padded // block_m)
    expected_blocks = torch.cat([blocks, torch.full((P // block_m - blocks.numel(),), -1)])
    assert torch.equal(block_expert.long(), expected_blocks), "block_expert"
    # each position: its expert from its block; the first counts[e] positions of a group hold that expert's rows
    pos = torch.arange(P)
    e_of = block_expert.long()[pos // block_m]
    group_lo = offsets.long()[e_of.clamp(min=0)]
    filled = (e_of >= 0) & (pos < group_lo + counts.long()[e_of.clamp(min=0)])
    assert bool((sorted_ids[~filled] == M).all()), f"pads and the tail must hold the sentinel M={M}"
    rows = sorted_ids[filled].long()
    assert torch.equal(rows.sort().values, torch.nonzero(flat >= 0).flatten()), "every routed row exactly once"
    assert torch.equal(flat[rows], e_of[filled]), "each group holds the rows of its expert (compared as sets)"
    # inverse: position of each routed row, -1 for skipped rows; consistent with sorted_ids both ways
    valid = flat >= 0
    assert bool((inverse[~valid] == -1).all())
    assert torch.equal(sorted_ids[inverse[valid].long()].long(), torch.nonzero(valid).flatten())
    assert torch.equal(inverse[rows].long(), pos[filled]), "inverse[sorted_ids[p]] == p"


def check_pair(ids, E, block_m):
    meta = triton_align(ids, E, block_m)
    ref = ref_align(ids, E, block_m)
    check_meta(ref, ids, E, block_m)
    check_meta(meta, ids, E, block_m)
    for name in ("counts", "offsets", "block_expert"):
        assert torch.equal(getattr(meta, name).cpu(), getattr(ref, name).cpu()), name
    # groups as sets: sort by (position's expert, row) on both sides
    key = (meta.block_expert.cpu().long().repeat_interleave(block_m) * (ids.numel() + 1))
    assert torch.equal((key + meta.sorted_ids.cpu()).sort().values, (key + ref.sorted_ids.cpu()).sort().values)
    return meta, ref


# --------------------------------------------------------------------------------------------- launcher vs reference
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("E", [1, 2, 7, 61])
@pytest.mark.parametrize("T,k", [(1, 1), (3, 2), (7, 2), (133, 1), (133, 2)])
def test_align_popularity(popularity, E, T, k):
    check_pair(make_ids(T, k, E, popularity, skip=0.1, seed=T * 7 + E), E, 16)


@pytest.mark.parametrize("block_m", [32, 64])
@pytest.mark.parametrize("popularity", ["uniform", "zipf", "identical"])
def test_align_block_sizes(block_m, popularity):
    check_pair(make_ids(133, 2, 13, popularity, skip=0.2, seed=block_m), 13, block_m)


@pytest.mark.parametrize("popularity", ["uniform", "skewed", "identical"])
def test_align_several_tiles(popularity):
    # M = 1,400 > 512 rows per tile: the per-tile prefix matters
    check_pair(make_ids(700, 2, 61, popularity, skip=0.05, seed=1), 61, 16)


@pytest.mark.parametrize("popularity", ["uniform", "zipf"])
def test_align_every_loop_with_small_blocks(monkeypatch, popularity):
    # Shrunk block sizes make every loop of the kernels run several times at interpreter-friendly sizes:
    # 44 tiles (tile scan in steps of 2), 4 expert programs, 4 offset-scan steps, 37 pad programs.
    for name, value in (("MAX_TILE", 32), ("BLOCK_TILES", 2), ("BLOCK_EXPERTS", 16), ("BLOCK_SCAN", 16),
                        ("BLOCK_P", 64)):
        monkeypatch.setattr(align_module, name, value)
    check_pair(make_ids(700, 2, 61, popularity, skip=0.1, seed=9), 61, 16)


@pytest.mark.parametrize("popularity", ["distinct", "zipf"])
def test_align_many_experts(popularity):
    check_pair(make_ids(3, 2, 4096, popularity, seed=4), 4096, 16)
    check_pair(make_ids(40, 2, 4093, popularity, skip=0.1, seed=5), 4093, 16)  # prime E, most experts empty


def test_align_all_rows_skipped_and_empty_input():
    for ids in (torch.full((5, 2), -1, dtype=torch.int32), torch.empty((0, 2), dtype=torch.int32)):
        meta, _ = check_pair(ids, 7, 16)
        assert meta.offsets.abs().sum().item() == 0 and bool((meta.block_expert == -1).all())


def test_align_exact_small_example():
    ids = torch.tensor([[2, 0], [2, -1], [0, 2], [4, 2]], dtype=torch.int32)
    for meta in (triton_align(ids, 5, 16), ref_align(ids, 5, 16)):
        check_meta(meta, ids, 5, 16)
        assert meta.counts.tolist() == [2, 0, 4, 0, 1]
        assert meta.offsets.tolist() == [0, 16, 16, 32, 32, 48]
        assert meta.block_expert.tolist()[:4] == [0, 2, 4, -1]
        assert sorted(meta.sorted_ids[0:2].tolist()) == [1, 4]
        assert sorted(meta.sorted_ids[16:20].tolist()) == [0, 2, 5, 7]
        assert meta.sorted_ids[32].item() == 6 and meta.inverse[3].item() == -1


def test_reference_group_order_is_ascending_m():
    ids = make_ids(133, 2, 7, "uniform", skip=0.1, seed=3)
    ref = ref_align(ids, 7, 16)
    for e in range(7):
        lo, c = ref.offsets[e].item(), ref.counts[e].item()
        assert bool((ref.sorted_ids[lo + 1:lo + c] > ref.sorted_ids[lo:lo + c - 1]).all())


def test_align_deterministic_five_runs():
    ids = make_ids(700, 2, 61, "zipf", skip=0.1, seed=8)
    first = triton_align(ids, 61, 16)
    for _ in range(4):
        again = triton_align(ids, 61, 16)
        for name in ("sorted_ids", "block_expert", "counts", "offsets", "inverse"):
            assert torch.equal(getattr(first, name), getattr(again, name)), name


def test_reference_needs_no_data_dependent_shapes():
    # On the meta device nothing can be read back: every size comes from shapes (no host synchronisation).
    meta = ref_align(torch.empty(5, 2, dtype=torch.int32, device="meta"), 7, 16)
    assert meta.sorted_ids.shape == (padded_length(10, 7, 16),) and meta.inverse.shape == (10,)


# ------------------------------------------------------------------------------------------------ front functions
@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LUMOE_BACKEND", request.param)
    dispatch.reset_backend()
    yield request.param
    dispatch.reset_backend()


def test_front_align_and_build_routing(backend):
    ids = make_ids(7, 2, 61, "zipf", skip=0.2, seed=2)
    weights = torch.rand(7, 2) * (ids >= 0)
    meta = routing.align_by_expert(ids, 61, 32)
    assert dispatch.backend_name() == backend
    check_meta(meta, ids, 61, 32)
    built = routing.build_routing(weights, ids, 61, 32)
    check_meta(built, ids, 61, 32)
    assert built.ids is ids and built.weights is weights
    assert built.num_tokens == 7 and built.top_k == 2 and built.num_experts == 61
    unchecked = routing.build_routing(weights, ids, 61, validate=False)
    assert unchecked.block_m == 16 and torch.equal(unchecked.counts, built.counts)


IDS = torch.zeros(3, 2, dtype=torch.int32)
BAD_ALIGN = [
    ("ids", dict(ids=torch.zeros(6, dtype=torch.int32)), "[T, k]"),
    ("ids", dict(ids=torch.zeros(3, 2, dtype=torch.int64)), ".int()"),
    ("ids", dict(ids=torch.zeros(3, 2)), ".int()"),
    ("ids", dict(ids=torch.zeros(2, 3, dtype=torch.int32).t()), ".contiguous()"),
    ("ids", dict(ids=torch.tensor([[0, 7]], dtype=torch.int32)), "[-1, 7)"),
    ("ids", dict(ids=torch.tensor([[-2, 0]], dtype=torch.int32)), "[-1, 7)"),
    ("ids", dict(ids=[[0, 1]]), "torch.Tensor"),
    ("num_experts", dict(num_experts=0), ">= 1"),
    ("num_experts", dict(num_experts=7.0), "int"),
    ("block_m", dict(block_m=8), "power of two >= 16"),
    ("block_m", dict(block_m=24), "power of two >= 16"),
    ("block_m", dict(block_m=True), "power of two >= 16"),
]


@pytest.mark.parametrize("arg,override,expected", BAD_ALIGN, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_ALIGN)])
@pytest.mark.parametrize("front", ["align_by_expert", "build_routing"])
def test_front_rejects_bad_input(front, arg, override, expected):
    kwargs = dict(ids=IDS, num_experts=7, block_m=16)
    kwargs.update(override)
    if front == "build_routing":
        shape = kwargs["ids"].shape if isinstance(kwargs["ids"], torch.Tensor) else (1, 2)
        kwargs["weights"] = torch.zeros(shape)
    with pytest.raises(ValueError) as err:
        getattr(routing, front)(**kwargs)
    assert arg in str(err.value) and expected in str(err.value), str(err.value)


@pytest.mark.parametrize("weights,expected", [
    (torch.zeros(3, 1), "shape of ids"),
    (torch.zeros(3, 2, dtype=torch.float16), ".float()"),
    (torch.zeros(3, 2, device="meta"), "one device"),
    ("w", "torch.Tensor"),
])
def test_build_routing_rejects_bad_weights(weights, expected):
    with pytest.raises(ValueError) as err:
        routing.build_routing(weights, IDS, 7)
    assert "weights" in str(err.value) and expected in str(err.value), str(err.value)


def test_validate_false_skips_only_the_range_check():
    bad = torch.tensor([[0, 9]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"ids: values must lie in \[-1, 7\)"):
        routing.align_by_expert(bad, 7)
    with pytest.raises(ValueError, match="block_m"):
        routing.align_by_expert(IDS, 7, 12, validate=False)  # structural checks stay on


def test_launcher_rejects_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="ids: on cpu"):
        triton_align(IDS, 7, 16)


# ----------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
class TestAlignCuda:
    """The same checks on a CUDA device, at serving sizes, plus no host synchronisation in the launcher."""

    @pytest.mark.parametrize("popularity", POPULARITY)
    @pytest.mark.parametrize("T,k,E", [(1, 1, 1), (7, 2, 7), (133, 2, 61), (64, 2, 1000), (4096, 2, 61),
                                       (50_000, 2, 4096), (100_000, 1, 4093)])
    def test_matches_reference(self, popularity, T, k, E):
        ids = make_ids(T, k, E, popularity, skip=0.05, seed=T + E, device="cuda")
        for block_m in (16, 64):
            meta, ref = check_pair(ids, E, block_m)
            assert torch.equal(meta.sorted_ids, ref.sorted_ids)  # this kernel keeps ascending m inside a group

    def test_build_routing_from_topk_bf16(self):
        logits = torch.randn(133, 1000, device="cuda", dtype=torch.bfloat16)
        w, i = routing.topk_routing(logits, 2, renormalize=True, threshold=0.002)
        check_meta(routing.build_routing(w, i, 1000, validate=False), i, 1000, 16)

    def test_deterministic_and_no_host_sync(self):
        ids = make_ids(50_000, 2, 4096, "zipf", skip=0.05, device="cuda")
        first = triton_align(ids, 4096, 16)  # compile outside the guarded region
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            runs = [triton_align(ids, 4096, 16) for _ in range(4)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for again in runs:
            for name in ("sorted_ids", "block_expert", "counts", "offsets", "inverse"):
                assert torch.equal(getattr(first, name), getattr(again, name)), name
