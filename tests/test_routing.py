"""Fused top-k routing: the Triton launcher (interpreter on CPU) against the torch reference, the reference against
a plain stable sort, ties, threshold/renormalize semantics, determinism, and the front function's validation.

Legend: T tokens, E experts, k top-k.
"""
import pytest
import torch

import lumoe_engine.kernels.topk_routing as topk_module
from lumoe_engine.kernels.topk_routing import MAX_BLOCK_E
from lumoe_engine.kernels.topk_routing import topk_routing as triton_topk
from lumoe_engine.ops import dispatch, routing
from lumoe_engine.ops.ref_routing import topk_routing as ref_topk
from tolerances import assert_close

F32 = torch.float32


def _logits(T, E, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g) * scale).to(dtype).to(device)


def _check_against_reference(logits, k, **opts):
    """Launcher vs reference on the same logits: ids exact, weights at fp32 tolerance; returns the launcher's."""
    w, i = triton_topk(logits, k, **opts)
    rw, ri = ref_topk(logits, k, **opts)
    assert w.dtype == F32 and i.dtype == torch.int32 and w.shape == i.shape == (logits.shape[0], k)
    assert torch.equal(i.cpu(), ri.cpu()), f"ids differ ({opts}):\n{i}\n{ri}"
    assert_close(w, rw, dtype=F32, what=f"weights {tuple(logits.shape)} k={k} {opts}")
    return w, i


def _stable_sort_oracle(logits, k, renormalize=False, threshold=None, scoring="softmax"):
    """The contract spelled out with a full stable sort (slow, obviously right)."""
    x = logits.float()
    s = torch.softmax(x, -1) if scoring == "softmax" else torch.sigmoid(x)
    v, order = torch.sort(s, dim=-1, descending=True, stable=True)
    w, ids = v[:, :k].clone(), order[:, :k].int()
    if threshold is not None:
        ids[w < threshold] = -1
        w[w < threshold] = 0.0
    if renormalize:
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / total.clamp_min(1e-38), torch.zeros_like(w))
    return w, ids


# --------------------------------------------------------------------------------------------- launcher vs reference
SHAPES = [(T, E, k) for E in (1, 2, 7, 61) for k in sorted({1, min(2, E), E}) for T in (1, 3, 7, 133)
          if not (k == E and E > 2 and T == 133)]  # k = E at T = 133 is slow in the interpreter (T=7 covers it)


@pytest.mark.parametrize("T,E,k", SHAPES)
def test_topk_fp32_matches_reference(T, E, k):
    _check_against_reference(_logits(T, E, seed=T * 1000 + E), k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,E,k", [(3, 7, 7), (7, 61, 2), (133, 61, 1)])
def test_topk_half_logits_match_reference(dtype, T, E, k):
    # Both sides read the same low-precision logits and score them in fp32: same ids, fp32 tolerance.
    _check_against_reference(_logits(T, E, dtype, seed=E + k), k, renormalize=True)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.0, 0.08, 0.5])
@pytest.mark.parametrize("E,k", [(7, 7), (61, 3)])
def test_topk_options_match_reference(scoring, renormalize, threshold, E, k):
    opts = dict(renormalize=renormalize, threshold=threshold, scoring=scoring)
    logits = _logits(7, E, seed=E, scale=2.0)
    w, i = _check_against_reference(logits, k, **opts)
    ow, oi = _stable_sort_oracle(logits, k, **opts)
    assert torch.equal(i, oi)
    assert_close(w, ow, dtype=F32, what="weights vs stable-sort oracle")


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_topk_chunked_rows(scoring, dtype, k):
    # E = 4096 > MAX_BLOCK_E: several chunks, online softmax statistics.
    assert 4096 > MAX_BLOCK_E
    _check_against_reference(_logits(3, 4096, dtype, seed=k), k, scoring=scoring, renormalize=k > 1, threshold=1e-4)


@pytest.mark.parametrize("scoring,k", [("softmax", 61), ("sigmoid", 9)])
def test_topk_many_small_chunks(monkeypatch, scoring, k):
    # Chunks of 16 experts: E = 61 is four chunks, the last one partial; k = E selects across all of them.
    monkeypatch.setattr(topk_module, "MAX_BLOCK_E", 16)
    logits = _logits(2, 61, seed=6)
    logits[0] = torch.linspace(-3.0, 3.0, 61)  # the running max grows in every chunk (online softmax rescaling)
    logits[1, [3, 17, 40, 60]] = 20.0  # ties in different chunks, above every other logit
    w, i = _check_against_reference(logits, k, scoring=scoring, renormalize=True, threshold=0.001)
    assert i[1, :4].tolist() == [3, 17, 40, 60]


def test_topk_chunked_partial_last_chunk_and_cross_chunk_ties():
    E = 2 * MAX_BLOCK_E + 453  # last chunk partly masked
    logits = _logits(3, E, seed=5, scale=1.0)
    top = [MAX_BLOCK_E + 1, MAX_BLOCK_E - 1, E - 1, 7, 2 * MAX_BLOCK_E]  # ties spread over three chunks
    logits[0, top] = 9.0
    logits[1, E - 1] = 12.0  # the best expert is the very last one
    logits[2, [E - 1, 0]] = 9.0
    w, i = _check_against_reference(logits, 6, renormalize=False)
    assert i[0, :5].tolist() == sorted(top)
    assert i[1, 0].item() == E - 1
    assert i[2, :2].tolist() == [0, E - 1]
    assert torch.equal(w[0, :5], w[0, :1].expand(5))


# ------------------------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("E", [7, 61, 2 * MAX_BLOCK_E])
def test_topk_exact_ties_lowest_index_first(E):
    logits = torch.zeros(4, E)
    logits[1, [5, 3, 6]] = 1.0  # three-way tie at the top, then a tie among the rest
    logits[2, :] = -2.0
    logits[2, E - 1] = logits[2, E - 2] = 4.0
    logits[3, ::2] = 0.5
    k = 5
    w, i = _check_against_reference(logits, k)
    assert i[0].tolist() == [0, 1, 2, 3, 4]
    assert i[1].tolist() == [3, 5, 6, 0, 1]
    assert i[2].tolist() == [E - 2, E - 1, 0, 1, 2]
    assert i[3].tolist() == (list(range(0, E, 2)) + list(range(1, E, 2)))[:k]  # evens tie first, then odds
    assert torch.allclose(w[0], torch.full((k,), 1.0 / E))


def test_topk_sigmoid_saturated_scores_tie_on_the_score_not_the_logit():
    # sigmoid(20) and sigmoid(30) are both exactly 1.0 in fp32: a tie in score, so the lower index wins.
    logits = torch.full((1, 9), -5.0)
    logits[0, 2], logits[0, 6] = 20.0, 30.0
    w, i = _check_against_reference(logits, 2, scoring="sigmoid")
    assert i.tolist() == [[2, 6]] and w.tolist() == [[1.0, 1.0]]


def test_topk_threshold_and_renormalize_semantics():
    # softmax rows: [0.54, 0.33, 0.07, 0.03, 0.03], [0.2] * 5, [~1, ~0, ...]
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0, -1.0], [0.0] * 5, [5.0, -5.0, -5.0, -5.0, -5.0]])
    s = torch.softmax(logits, -1)
    w, i = _check_against_reference(logits, 3, threshold=0.25)
    assert i.tolist() == [[0, 1, -1], [-1, -1, -1], [0, -1, -1]]  # the slot is kept, id -1
    assert w[0, 2].item() == 0.0 and w[1].abs().sum().item() == 0.0
    assert_close(w[0, :2], s[0, :2], dtype=F32, what="thresholded weights are the plain scores")
    w, i = _check_against_reference(logits, 3, threshold=0.25, renormalize=True)
    # renormalize == softmax over the surviving logits; a row with no survivor stays zero
    assert_close(w[0, :2], torch.softmax(logits[0, :2], -1), dtype=F32, what="renormalized = softmax of chosen")
    assert w[1].abs().sum().item() == 0.0 and w[2].tolist() == [1.0, 0.0, 0.0]
    w, i = _check_against_reference(logits, 2, renormalize=True)
    assert_close(w.sum(-1), torch.ones(3), dtype=F32, what="renormalized rows sum to 1")
    # a score equal to the threshold survives (only s < threshold is dropped); 0.25 is exact in fp32
    w, i = _check_against_reference(torch.zeros(2, 4), 2, threshold=0.25)
    assert i.tolist() == [[0, 1], [0, 1]] and w.tolist() == [[0.25, 0.25], [0.25, 0.25]]


def test_topk_k_equals_E_is_a_full_descending_order():
    logits = _logits(5, 13, seed=3)
    w, i = _check_against_reference(logits, 13)
    assert torch.equal(i.sort(-1).values, torch.arange(13, dtype=torch.int32).expand(5, 13))
    assert bool((w[:, :-1] >= w[:, 1:]).all())
    assert_close(w.sum(-1), torch.ones(5), dtype=F32, what="k = E weights sum to 1")


def test_reference_matches_stable_sort_on_heavy_ties():
    g = torch.Generator().manual_seed(11)
    for E in (1, 2, 3, 7, 61, 300):
        for k in sorted({1, min(2, E), min(5, E), E}):
            logits = torch.randint(0, 3, (9, E), generator=g).float()
            rw, ri = ref_topk(logits, k)
            ow, oi = _stable_sort_oracle(logits, k)
            assert torch.equal(ri, oi), (E, k)
            assert torch.equal(rw, ow), (E, k)


def test_topk_deterministic_five_runs():
    cases = [(_logits(7, 61, seed=1), 4), (_logits(3, 4096, torch.float16, seed=2), 3),
             (torch.randint(0, 2, (7, 61), generator=torch.Generator().manual_seed(3)).float(), 5)]
    for logits, k in cases:
        first = triton_topk(logits, k, renormalize=True)
        for _ in range(4):
            again = triton_topk(logits, k, renormalize=True)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_reference_needs_no_data_dependent_shapes():
    # On the meta device nothing can be read back: the reference decides every shape from shapes alone.
    w, i = ref_topk(torch.empty(5, 9, device="meta"), 3, renormalize=True, threshold=0.1)
    assert w.shape == i.shape == (5, 3) and w.dtype == F32 and i.dtype == torch.int32


# ------------------------------------------------------------------------------------------------ front function
@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LUMOE_BACKEND", request.param)
    dispatch.reset_backend()
    yield request.param
    dispatch.reset_backend()


def test_front_dispatches_to_backend(backend):
    logits = _logits(7, 61, seed=9)
    w, i = routing.topk_routing(logits, 2, renormalize=True, threshold=0.01)
    assert dispatch.backend_name() == backend
    rw, ri = ref_topk(logits, 2, renormalize=True, threshold=0.01)
    assert torch.equal(i, ri)
    assert_close(w, rw, dtype=F32, what=f"front ({backend})")


GOOD = torch.zeros(3, 5)
BAD_TOPK = [
    ("logits", dict(logits=torch.zeros(5)), "2-D"),
    ("logits", dict(logits=torch.zeros(2, 3, 5)), "2-D"),
    ("logits", dict(logits=torch.zeros(3, 5, dtype=torch.int32)), "floating"),
    ("logits", dict(logits=torch.zeros(3, 5, dtype=torch.float64)), "fp32/fp16/bf16"),
    ("logits", dict(logits=torch.zeros(3, 0)), "E >= 1"),
    ("logits", dict(logits=torch.zeros(5, 3).t()), ".contiguous()"),
    ("logits", dict(logits=[[0.0, 1.0]]), "torch.Tensor"),
    ("k", dict(k=0), "1 <= k <= E"),
    ("k", dict(k=6), "1 <= k <= E"),
    ("k", dict(k=1.5), "int"),
    ("k", dict(k=True), "int"),
    ("threshold", dict(threshold=-0.1), "[0, 1]"),
    ("threshold", dict(threshold=1.5), "[0, 1]"),
    ("threshold", dict(threshold=float("nan")), "[0, 1]"),
    ("threshold", dict(threshold="0.5"), "[0, 1]"),
    ("scoring", dict(scoring="relu"), "softmax"),
    ("renormalize", dict(renormalize="yes"), "bool"),
]


@pytest.mark.parametrize("arg,override,expected", BAD_TOPK, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_TOPK)])
def test_front_rejects_bad_input(arg, override, expected):
    kwargs = dict(logits=GOOD, k=2)
    kwargs.update(override)
    logits, k = kwargs.pop("logits"), kwargs.pop("k")
    with pytest.raises(ValueError) as err:
        routing.topk_routing(logits, k, **kwargs)
    assert arg in str(err.value) and expected in str(err.value), str(err.value)


def test_launcher_rejects_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="logits: on cpu"):
        triton_topk(GOOD, 2)


# ----------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
class TestTopkRoutingCuda:
    """The same checks on a CUDA device (bf16 included), plus no host synchronisation in the launcher."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("T,E,k", [(1, 1, 1), (3, 7, 7), (7, 61, 2), (133, 61, 61), (133, 1000, 2),
                                       (133, 4096, 8), (7, 4096, 4096), (64, 2 * MAX_BLOCK_E + 453, 3)])
    def test_matches_reference(self, dtype, T, E, k):
        logits = _logits(T, E, dtype, "cuda", seed=T + E + k)
        for opts in (dict(), dict(renormalize=True, threshold=1e-3), dict(scoring="sigmoid", threshold=0.5)):
            _check_against_reference(logits, k, **opts)

    def test_ties_and_determinism(self):
        logits = torch.randint(0, 2, (133, 4096), generator=torch.Generator().manual_seed(0)).float().cuda()
        w, i = _check_against_reference(logits, 9)
        for _ in range(4):
            w2, i2 = triton_topk(logits, 9)
            assert torch.equal(w, w2) and torch.equal(i, i2)

    def test_no_host_sync(self):
        logits = _logits(64, 1000, torch.bfloat16, "cuda")
        triton_topk(logits, 2)  # compile outside the guarded region
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            triton_topk(logits, 2, renormalize=True, threshold=0.01)
        finally:
            torch.cuda.set_sync_debug_mode("default")
