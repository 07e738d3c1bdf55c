"""One set of inputs through every backend (``LUMOE_BACKEND=torch``, ``cpp``, ``triton`` in the interpreter) via the
validated front functions: routing (ids exact, weights close), alignment (groups as sets), the grouped LoRA ops and
the autograd Function give the same results; ``auto`` picks the C++ op on a CPU with a compiler; an unknown
``LUMOE_BACKEND`` is a ValueError that names the variable and the choices; ``cpp`` without a compiler falls back to
the torch reference with one warning.

Legend: T tokens, E experts, k top-k, M = T*k routed rows, S slices, H input features, N output features, R max rank.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from lumoe_engine import ops
from lumoe_engine.ops import dispatch
from tolerances import assert_close

HAVE_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None
BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")), "triton"]
T, K, E, H, R = 37, 2, 6, 59, 16
WIDTHS = (24, 8, 40)


@pytest.fixture
def use_backend(monkeypatch):
    """Switch ``LUMOE_BACKEND`` for one test; the decision is reset before and after."""

    def switch(name: str) -> None:
        monkeypatch.setenv("LUMOE_BACKEND", name)
        dispatch.reset_backend()
        assert dispatch.backend_name() == name, f"LUMOE_BACKEND={name} resolved to {dispatch.backend_name()}"

    yield switch
    dispatch.reset_backend()


def inputs(dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(T, E, generator=g) * 2
    logits[3] = 0.0                                  # ties everywhere: lowest index first
    return dict(
        logits=logits,
        x=torch.randn(T, H, generator=g).to(dtype),
        lora_a=(torch.randn(len(WIDTHS), E, R, H, generator=g) * 0.2).to(dtype),
        lora_b=(torch.randn(E, sum(WIDTHS), R, generator=g) * 0.2).to(dtype),
        slice_offsets=torch.tensor([0, 24, 32, 72], dtype=torch.int32),
        scales=torch.rand(E, generator=g) + 0.5,
        ranks=torch.tensor([16, 3, 0, 9, 1, 16], dtype=torch.int32),
        y=torch.randn(T, sum(WIDTHS), generator=g).to(dtype),
    )


def run_all(d: dict) -> dict:
    """Routing (with a threshold, so some choices are -1), metadata, and the LoRA ops through the front functions."""
    weights, ids = ops.topk_routing(d["logits"], K, renormalize=True, threshold=0.2)
    meta = ops.build_routing(weights, ids, E, 16)
    buf = ops.lora_shrink(d["x"], d["lora_a"], meta, d["ranks"])
    y = ops.lora_expand(buf, d["lora_b"], d["slice_offsets"], meta, d["scales"], d["ranks"], d["y"].clone())
    fused = ops.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], ids, weights, d["scales"],
                                   d["ranks"], d["y"].clone())
    x = d["x"].clone().requires_grad_(True)
    a = d["lora_a"].clone().requires_grad_(True)
    b = d["lora_b"].clone().requires_grad_(True)
    delta = ops.grouped_lora(x, a, b, d["slice_offsets"], meta, d["scales"], d["ranks"])
    (delta.float() * torch.linspace(-1, 1, delta.shape[1])).sum().backward()
    return dict(weights=weights, ids=ids, meta=meta, buf=buf, y=y, fused=fused, delta=delta.detach(),
                dx=x.grad, da=a.grad, db=b.grad)


def groups(meta) -> list[list[int]]:
    """Each expert's padded group of sorted_ids as a sorted list (pads included): order-free comparison."""
    offs = meta.offsets.tolist()
    return [sorted(meta.sorted_ids[offs[e]:offs[e + 1]].tolist()) for e in range(E)]


@pytest.fixture(scope="module")
def expected():
    """The torch backend's results, the yardstick of the other backends."""
    old = os.environ.get("LUMOE_BACKEND")
    os.environ["LUMOE_BACKEND"] = "torch"
    dispatch.reset_backend()
    try:
        return {dtype: run_all(inputs(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    finally:
        if old is None:
            os.environ.pop("LUMOE_BACKEND", None)
        else:
            os.environ["LUMOE_BACKEND"] = old
        dispatch.reset_backend()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend, dtype, use_backend, expected):
    use_backend(backend)
    want = expected[dtype]
    got = run_all(inputs(dtype))
    assert torch.equal(got["ids"], want["ids"]), "routing ids differ"
    assert (got["ids"] == -1).any() and (got["ids"] >= 0).any(), "the threshold should drop some choices"
    assert_close(got["weights"], want["weights"], torch.float32, what=f"{backend} routing weights")
    gm, wm = got["meta"], want["meta"]
    for field in ("counts", "offsets", "block_expert"):
        assert torch.equal(getattr(gm, field), getattr(wm, field)), f"{backend}: meta.{field} differs"
    assert groups(gm) == groups(wm), f"{backend}: expert groups differ as sets"
    flat = got["ids"].reshape(-1)
    valid = flat >= 0
    inv = gm.inverse.long()
    assert (inv[~valid] == -1).all()
    assert torch.equal(gm.sorted_ids.long()[inv[valid]], torch.arange(flat.numel())[valid]), "inverse is wrong"
    low = dtype != torch.float32
    assert_close(got["buf"], want["buf"], torch.float32, scale=10 if low else 1, what=f"{backend} shrink")
    for key in ("y", "fused", "delta", "dx"):
        assert_close(got[key], want[key], dtype, what=f"{backend} {key}")
    for key in ("da", "db"):
        assert_close(got[key], want[key], dtype, scale=2, what=f"{backend} {key}")


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_auto_on_cpu_picks_the_cpp_op(use_backend, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("auto picks Triton when CUDA is available")
    monkeypatch.setenv("LUMOE_BACKEND", "auto")
    dispatch.reset_backend()                          # use_backend resets it again afterwards
    assert dispatch.backend_name() == "cpp"
    from lumoe_engine.ops import cpp

    assert dispatch.get_op("lora_shrink") is cpp.lora_shrink
    assert dispatch.get_op("topk_routing").__module__ == "lumoe_engine.ops.ref_routing"


def test_cpp_without_a_compiler_falls_back_to_torch_with_one_warning():
    """A fresh process whose CXX does not exist: LUMOE_BACKEND=cpp resolves to the torch reference, one warning."""
    code = (
        "import warnings\n"
        "from lumoe_engine.ops import cpp, dispatch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    names = [dispatch.backend_name(), str(cpp.available()), str(cpp.available())]\n"
        "print('|'.join(names), len(caught), caught[0].message if caught else '')\n"
    )
    env = dict(os.environ, CXX="/nonexistent/c++", LUMOE_BACKEND="cpp")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names, count, message = done.stdout.strip().split(" ", 2)
    assert names == "torch|False|False" and count == "1", done.stdout
    assert "no C++ compiler" in message and "LUMOE_BACKEND=torch" in message


def test_unknown_backend_is_a_value_error(use_backend, monkeypatch):
    monkeypatch.setenv("LUMOE_BACKEND", "cuda-fast")
    dispatch.reset_backend()
    with pytest.raises(ValueError, match=r"LUMOE_BACKEND='cuda-fast'.*auto.*triton.*torch.*cpp"):
        dispatch.backend_name()
    with pytest.raises(ValueError, match="LUMOE_BACKEND"):
        ops.topk_routing(torch.randn(2, 3), 1)
