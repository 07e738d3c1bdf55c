"""``grouped_lora`` (autograd): forward and gradients against torch's autograd of the plain reference, absent experts,
partial requires_grad, bad input, and a tiny training loop whose loss curve is the same under triton and torch.

Legend: T tokens, E experts, k top-k, S slices, H input features, N output features, R max rank.
"""
from __future__ import annotations

import pytest
import torch

from lumoe_engine.ops import build_routing, grouped_lora, ref_lora, reset_backend
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
