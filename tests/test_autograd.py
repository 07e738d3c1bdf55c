"""``grouped_lora`` (autograd): forward and gradients against torch's autograd of the plain reference, absent experts,
partial requires_grad, bad input, a tiny training loop whose loss curve is the same under triton and torch, and the
one-expert dense path (same values and gradients as the grouped kernels, none of them called, no host sync).

Legend: T tokens, E experts, k top-k, S slices, H input features, N output features, R max rank.
"""
from __future__ import annotations

import pytest
import torch

from lumoe_engine.ops import GroupedLoRAFunction, autograd, build_routing, grouped_lora, ref_lora, reset_backend
from lumoe_engine.ops.ref_routing import align_by_expert as ref_align
from lora_cases import Case
from test_lora_ops import make
from tolerances import assert_close

CASES = [
    Case("s1_k1", 7, 1, 3, 59, 16, (37,), (16, 5, 1), "random"),
    Case("s3_k2_minus1", 33, 2, 5, 59, 24, (16, 29, 5), (24, 3, 0, 11, 7), "minus1"),
    Case("s3_k_eq_e", 5, 3, 3, 111, 8, (9, 24, 17), (8, 1, 5), "distinct"),
]
CASE_IDS = [c.name for c in CASES]


def _cpp_available() -> bool:
    from lumoe_engine.ops import cpp

    return cpp.available()


@pytest.fixture(params=["torch", "triton", "cpp"])
def backend(request, monkeypatch):
    if request.param == "cpp" and not _cpp_available():
        pytest.skip("the C++ op did not build here (no compiler)")
    monkeypatch.setenv("LUMOE_BACKEND", request.param)
    reset_backend()
    yield request.param
    reset_backend()


def _leaves(d: dict, which=("x", "lora_a", "lora_b")) -> dict:
    return {key: (d[key].detach().clone().requires_grad_(key in which) if key in ("x", "lora_a", "lora_b") else d[key])
            for key in d}


def _run(fn, d: dict, g: torch.Tensor):
    delta = fn(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"])
    (delta.float() * g).sum().backward()
    return delta


def _absent(d: dict, num_experts: int) -> torch.Tensor:
    present = torch.zeros(num_experts, dtype=torch.bool)
    present[d["ids"][d["ids"] >= 0].long().cpu()] = True
    return ~present


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_gradients_match_torch_autograd(backend, case):
    d = make(case)
    g = torch.randn(case.T, case.N, generator=torch.Generator().manual_seed(3))
    ours, ref = _leaves(d), _leaves(d)
    delta = _run(grouped_lora, ours, g)
    want = _run(ref_lora.grouped_lora, ref, g)
    assert delta.dtype == torch.float32 and delta.shape == (case.T, case.N)
    assert_close(delta, want, torch.float32, what=f"delta [{backend}]")
    for key in ("x", "lora_a", "lora_b"):
        assert_close(ours[key].grad, ref[key].grad, torch.float32, scale=10, what=f"d{key} [{backend}]")
    absent = _absent(d, case.E)
    assert (ours["lora_a"].grad[:, absent] == 0).all() and (ours["lora_b"].grad[absent] == 0).all()
    skipped = (d["ids"] < 0).all(dim=1)
    assert (delta[skipped] == 0).all() and (ours["x"].grad[skipped] == 0).all()
    for e, r in enumerate(case.ranks):                              # rank masking reaches the gradients
        assert (ours["lora_a"].grad[:, e, r:] == 0).all() and (ours["lora_b"].grad[e, :, r:] == 0).all()
    if absent.any():
        assert not absent.all()
    present = ~absent & (torch.tensor(case.ranks) > 0)
    assert (ours["lora_b"].grad[present] != 0).any()


def test_only_lora_b_requires_grad(backend):
    case = CASES[1]
    d = make(case)
    g = torch.randn(case.T, case.N, generator=torch.Generator().manual_seed(4))
    ours, ref = _leaves(d, which=("lora_b",)), _leaves(d, which=("lora_b",))
    _run(grouped_lora, ours, g)
    _run(ref_lora.grouped_lora, ref, g)
    assert ours["x"].grad is None and ours["lora_a"].grad is None
    assert_close(ours["lora_b"].grad, ref["lora_b"].grad, torch.float32, scale=10, what="dB only")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_against_reference(monkeypatch, dtype):
    """16-bit inputs (converted to fp32 in the kernels): forward and gradients at the dtype's tolerance."""
    case = CASES[1]
    d = make(case, dtype)
    g = torch.randn(case.T, case.N, generator=torch.Generator().manual_seed(5))
    ours, ref = _leaves(d), _leaves(d)
    monkeypatch.setenv("LUMOE_BACKEND", "triton")
    reset_backend()
    try:
        delta = _run(grouped_lora, ours, g)
    finally:
        reset_backend()
    want = _run(ref_lora.grouped_lora, ref, g)
    assert delta.dtype == dtype
    assert_close(delta, want, dtype, what=f"delta {dtype}")
    for key in ("x", "lora_a", "lora_b"):
        assert ours[key].grad.dtype == dtype
        assert_close(ours[key].grad, ref[key].grad, dtype, scale=2, what=f"d{key} {dtype}")


def test_bad_input_raises_value_error_naming_argument():
    d = make(CASES[0])
    args = [d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"]]
    for index, bad, name in [
        (0, d["x"][None], "x"),
        (2, d["lora_b"].half(), "lora_b"),
        (1, d["lora_a"][:, :, :, :-1].contiguous(), "lora_a"),
        (3, torch.tensor([0, 36], dtype=torch.int32), "slice_offsets"),
        (4, build_routing(d["weights"][:-1].contiguous(), d["ids"][:-1].contiguous(), 3), "meta"),
        (5, d["scales"].double(), "scales"),
        (6, torch.tensor([16, 17, 1], dtype=torch.int32), "ranks"),
    ]:
        wrong = list(args)
        wrong[index] = bad
        with pytest.raises(ValueError, match=rf"^{name}:"):
            grouped_lora(*wrong)


# ------------------------------------------------------------------------------------------------ one expert
SINGLE = [
    Case("e1_s1_all_rows", 33, 1, 1, 59, 16, (37,), (16,), "distinct"),
    Case("e1_s3_k2_rank_lt_r", 21, 2, 1, 111, 24, (16, 29, 5), (11,), "one_last"),
]
SINGLE_IDS = [c.name for c in SINGLE]


def _single(case: Case, dtype=torch.float32) -> dict:
    """One expert: every 4th token without it (ids -1, weight 0), weights != 1."""
    d = make(case, dtype)
    d["ids"][::4] = -1
    d["weights"][::4] = 0.0
    d["meta"] = build_routing(d["weights"], d["ids"], 1, 16)
    return d


def _grouped_kernels(x, lora_a, lora_b, slice_offsets, meta, scales, ranks):
    """The grouped kernels' path, which grouped_lora takes for several experts."""
    return GroupedLoRAFunction.apply(x, lora_a, lora_b, slice_offsets, meta, scales, ranks)


@pytest.mark.parametrize("case", SINGLE, ids=SINGLE_IDS)
def test_single_expert_dense_path_matches_grouped_kernels(backend, case):
    d = _single(case)
    g = torch.randn(case.T, case.N, generator=torch.Generator().manual_seed(3))
    dense, grouped, ref = _leaves(d), _leaves(d), _leaves(d)
    delta = _run(grouped_lora, dense, g)
    want = _run(_grouped_kernels, grouped, g)
    _run(ref_lora.grouped_lora, ref, g)
    assert_close(delta, want, torch.float32, what=f"one expert delta [{backend}]")
    skipped = (d["ids"] < 0).all(dim=1)
    assert skipped.any() and (delta[skipped] == 0).all() and (dense["x"].grad[skipped] == 0).all()
    r = case.ranks[0]
    assert (dense["lora_a"].grad[:, 0, r:] == 0).all() and (dense["lora_b"].grad[0, :, r:] == 0).all()
    for key in ("x", "lora_a", "lora_b"):
        assert_close(dense[key].grad, grouped[key].grad, torch.float32, scale=10, what=f"d{key} vs grouped")
        assert_close(dense[key].grad, ref[key].grad, torch.float32, scale=10, what=f"d{key} vs reference")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_single_expert_dense_path_low_precision(dtype):
    case = SINGLE[1]
    d = _single(case, dtype)
    g = torch.randn(case.T, case.N, generator=torch.Generator().manual_seed(5))
    ours, ref = _leaves(d), _leaves(d)
    delta = _run(grouped_lora, ours, g)
    want = _run(ref_lora.grouped_lora, ref, g)
    assert delta.dtype == dtype
    assert_close(delta, want, dtype, what=f"one expert delta {dtype}")
    for key in ("x", "lora_a", "lora_b"):
        assert ours[key].grad.dtype == dtype
        assert_close(ours[key].grad, ref[key].grad, dtype, scale=2, what=f"one expert d{key} {dtype}")


def test_single_expert_path_skips_the_grouped_kernels(monkeypatch):
    """E = 1 is decided from the shapes: no grouped op runs, forward or backward; E = 2 still takes them."""
    def refuse(op):
        raise AssertionError(f"grouped op {op} called")

    monkeypatch.setattr(autograd, "get_lora_op", refuse)
    case = SINGLE[1]
    d = _leaves(_single(case))
    _run(grouped_lora, d, torch.ones(case.T, case.N))
    assert d["lora_a"].grad is not None and d["lora_b"].grad is not None and d["x"].grad is not None
    two = _leaves(make(CASES[1]))
    with pytest.raises(AssertionError, match="grouped op"):
        _run(grouped_lora, two, torch.ones(CASES[1].T, CASES[1].N))


def test_single_expert_path_needs_no_host_sync():
    """On the meta device nothing can be read back to the host: forward and backward of one slice still run."""
    T, H, N, R = 5, 8, 6, 4
    dev = "meta"
    ids = torch.zeros(T, 1, dtype=torch.int32, device=dev)
    meta = ref_align(ids, 1, 16)._replace(weights=torch.ones(T, 1, device=dev))
    x = torch.empty(T, H, device=dev, requires_grad=True)
    a = torch.empty(1, 1, R, H, device=dev, requires_grad=True)
    b = torch.empty(1, N, R, device=dev, requires_grad=True)
    so = torch.empty(2, dtype=torch.int32, device=dev)
    delta = grouped_lora(x, a, b, so, meta, torch.empty(1, device=dev), torch.empty(1, dtype=torch.int32, device=dev),
                         validate=False)
    delta.sum().backward()
    assert delta.shape == (T, N) and x.grad.shape == (T, H) and a.grad.shape == a.shape and b.grad.shape == b.shape


def test_single_expert_training_curve_matches_grouped(monkeypatch):
    """A new expert's training loop (every row to it, as the model's trainable expert is routed): the dense path
    gives the loss curve of the grouped kernels."""
    curves = {}
    for name, fn in (("dense", grouped_lora), ("grouped", _grouped_kernels)):
        monkeypatch.setenv("LUMOE_BACKEND", "triton")
        reset_backend()
        g = torch.Generator().manual_seed(9)
        T, H, N, R = 24, 40, 32, 8
        base = torch.randn(N, H, generator=g) * 0.1
        x = torch.randn(T, H, generator=g)
        target = torch.randn(T, N, generator=g)
        ids = torch.zeros(T, 1, dtype=torch.int32)
        w = torch.ones(T, 1)
        meta = build_routing(w, ids, 1, 16)
        a = (torch.randn(1, 1, R, H, generator=g) * 0.1).requires_grad_()
        b = (torch.randn(1, N, R, generator=g) * 0.1).requires_grad_()
        opt = torch.optim.SGD([a, b], lr=0.5)
        losses = []
        for _ in range(6):
            y = x @ base.T + fn(x, a, b, torch.tensor([0, N], dtype=torch.int32), meta, torch.tensor([2.0]),
                                torch.tensor([R], dtype=torch.int32))
            loss = torch.nn.functional.mse_loss(y, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[name] = losses
    reset_backend()
    print(curves)
    assert curves["dense"][-1] < curves["dense"][0]
    torch.testing.assert_close(torch.tensor(curves["dense"]), torch.tensor(curves["grouped"]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ training
def _train(slices: tuple, steps: int = 6) -> list[float]:
    """A frozen linear plus grouped LoRA experts, trained with SGD on a fixed regression target."""
    g = torch.Generator().manual_seed(7)
    T, H, E, R, k = 24, 40, 3, 8, 2
    N = sum(slices)
    base = torch.randn(N, H, generator=g) * 0.1
    x = torch.randn(T, H, generator=g)
    target = torch.randn(T, N, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    ids[::4, 1] = -1
    ids[::6] = -1
    weights = torch.where(ids >= 0, torch.rand(T, k, generator=g) + 0.2, torch.zeros(()))
    meta = build_routing(weights, ids, E, 16)
    offs = torch.tensor([0, *torch.tensor(slices).cumsum(0).tolist()], dtype=torch.int32)
    lora_a = (torch.randn(len(slices), E, R, H, generator=g) * 0.1).requires_grad_()
    lora_b = (torch.randn(E, N, R, generator=g) * 0.1).requires_grad_()
    scales = torch.tensor([1.0, 0.5, 2.0])
    ranks = torch.tensor([8, 4, 6], dtype=torch.int32)
    opt = torch.optim.SGD([lora_a, lora_b], lr=0.5)
    losses = []
    for _ in range(steps):
        y = x @ base.T + grouped_lora(x, lora_a, lora_b, offs, meta, scales, ranks)
        loss = torch.nn.functional.mse_loss(y, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("slices", [(32,), (8, 16, 5)], ids=["s1", "s3"])
def test_training_loss_curve_same_under_triton_and_torch(monkeypatch, slices):
    curves = {}
    for name in ("torch", "triton", "cpp") if _cpp_available() else ("torch", "triton"):
        monkeypatch.setenv("LUMOE_BACKEND", name)
        reset_backend()
        curves[name] = _train(slices)
    reset_backend()
    print(curves)
    assert curves["torch"][-1] < curves["torch"][0]
    for name in curves:
        torch.testing.assert_close(torch.tensor(curves[name]), torch.tensor(curves["torch"]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
class TestOnGPU:
    """Forward and gradients on CUDA (the triton backend there), fp32 and bf16."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
    def test_gradients(self, case, dtype):
        reset_backend()
        d = make(case, dtype, device="cuda")
        g = torch.randn(case.T, case.N, device="cuda")
        ours, ref = _leaves(d), _leaves(d)
        delta = _run(grouped_lora, ours, g)
        want = _run(ref_lora.grouped_lora, ref, g)
        assert_close(delta, want, dtype, scale=1 if dtype == torch.float32 else 2, what="gpu delta")
        for key in ("x", "lora_a", "lora_b"):
            assert_close(ours[key].grad, ref[key].grad, dtype, scale=10 if dtype == torch.float32 else 2,
                         what=f"gpu d{key}")
        absent = _absent(d, case.E).cuda()
        assert (ours["lora_a"].grad[:, absent] == 0).all() and (ours["lora_b"].grad[absent] == 0).all()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_single_expert_dense_path(self, dtype):
        reset_backend()
        case = SINGLE[1]
        d = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _single(case, dtype).items()}
        d["meta"] = build_routing(d["weights"], d["ids"], 1, 16)
        g = torch.randn(case.T, case.N, device="cuda")
        ours, ref, grouped = _leaves(d), _leaves(d), _leaves(d)
        delta = _run(grouped_lora, ours, g)
        want = _run(ref_lora.grouped_lora, ref, g)
        _run(_grouped_kernels, grouped, g)
        low = dtype != torch.float32
        assert_close(delta, want, dtype, scale=2 if low else 1, what="gpu one-expert delta")
        for key in ("x", "lora_a", "lora_b"):
            assert_close(ours[key].grad, ref[key].grad, dtype, scale=2 if low else 10, what=f"gpu one-expert d{key}")
            assert_close(ours[key].grad, grouped[key].grad, dtype, scale=2 if low else 10,
                         what=f"gpu one-expert d{key} vs grouped")
