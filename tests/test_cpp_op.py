"""The C++ CPU op for grouped LoRA (``csrc/grouped_lora.cpp`` via ``lumoe_engine.ops.cpp``) against the torch
reference: shrink, expand and the fused op; fp32 / fp16 / bf16; T in {1, 3, 7, 133}; odd H; mixed ranks (0 and R);
k in {1, 2}; S in {1, 3}; experts without rows; all rows to one expert (several chunks, several threads); rows with
-1 untouched bitwise; rank masking; determinism across runs and thread counts; argument errors.

Skips only when no C++ compiler is on PATH; with a compiler, a failed build fails the tests.

Legend: T tokens, E experts, k top-k, M = T*k routed rows, S slices, H input features, N output features, R max rank.
"""
from __future__ import annotations

import os
import shutil
import pytest
import torch

from lumoe_engine.ops import ref_lora
from lumoe_engine.ops.ref_routing import align_by_expert as ref_align
import lora_cases
from lora_cases import Case
from tolerances import assert_close

if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip(f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not on PATH): the C++ op cannot be built",
                allow_module_level=True)

from lumoe_engine.ops import cpp  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpp.available(), f"a C++ compiler is present but the op did not build: {cpp._error}"


CASES = [
    Case("t1_h59_s1_k1", 1, 1, 3, 59, 16, (37,), (16, 5, 0), "random"),
    Case("t3_h111_s3_k2", 3, 2, 5, 111, 24, (20, 33, 9), (1, 24, 17, 0, 8), "random"),
    Case("t7_h2049_s1_k2", 7, 2, 4, 2049, 16, (48,), (16, 3, 9, 16), "minus1"),
    Case("t133_h59_s3_k2_minus1", 133, 2, 7, 59, 24, (16, 48, 5), (24, 3, 0, 11, 24, 7, 1), "minus1"),
    Case("t133_h111_s1_k1_one", 133, 1, 3, 111, 16, (29,), (4, 16, 9), "one_last"),
    Case("t133_h65_s3_k2_one_r64", 133, 2, 2, 65, 64, (40, 24, 77), (64, 33), "one_last"),
    Case("t133_h64_s1_k1_r1", 133, 1, 5, 64, 1, (256,), (1, 1, 0, 1, 1), "random"),
]
IDS = [c.name for c in CASES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(case: Case, dtype=torch.float32, seed: int = 0) -> dict:
    """Random inputs of ``case`` (lora_cases.make); meta from the reference alignment."""
    d = lora_cases.make(case, dtype, seed)
    d["meta"] = ref_align(d["ids"], case.E, 16)._replace(weights=d["weights"])
    return d


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def untouched(d: dict) -> torch.Tensor:
    return (d["ids"] < 0).all(dim=1)


def cpp_fused(d: dict, y: torch.Tensor) -> torch.Tensor:
    return cpp.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"], d["weights"],
                                  d["scales"], d["ranks"], y)


def cpp_unfused(d: dict, y: torch.Tensor) -> torch.Tensor:
    buf = cpp.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    return cpp.lora_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shrink_matches_reference(case, dtype):
    d = make(case, dtype)
    want = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    got = cpp.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_close(got, want, torch.float32, scale=1 if dtype == torch.float32 else 10, what=f"shrink {case.name}")
    flat = d["ids"].reshape(-1).long()
    assert (got[:, flat < 0] == 0).all(), "rows with -1 must be zero"
    for e, r in enumerate(case.ranks):
        assert (got[:, flat == e, r:] == 0).all(), f"columns >= rank {r} of expert {e} must be zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_expand_and_fused_match_reference(case, dtype):
    d = make(case, dtype)
    y0 = d["y"].clone()
    buf = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    want = ref_lora.lora_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], y0.clone())
    y = y0.clone()
    got = cpp.lora_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], y)
    assert got is y, "lora_expand must update y in place and return it"
    assert_close(got, want, dtype, what=f"expand {case.name}")
    assert torch.equal(bits(got[untouched(d)]), bits(y0[untouched(d)])), "rows whose ids are all -1 changed"

    y = y0.clone()
    fused = cpp_fused(d, y)
    assert fused is y
    assert_close(fused, want, dtype, what=f"fused {case.name}")
    assert torch.equal(bits(fused[untouched(d)]), bits(y0[untouched(d)])), "fused: rows with all -1 changed"
    # the fused op runs the same arithmetic in the same order as shrink + expand: bitwise equal
    assert torch.equal(bits(fused), bits(cpp_unfused(d, y0.clone()))), "fused and unfused C++ results differ"


@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=[CASES[3].name, CASES[5].name])
def test_deterministic_across_runs_and_threads(case):
    d = make(case, torch.bfloat16, seed=3)
    first = cpp_fused(d, d["y"].clone())
    unfused = cpp_unfused(d, d["y"].clone())
    for _ in range(4):
        assert torch.equal(bits(cpp_fused(d, d["y"].clone())), bits(first))
        assert torch.equal(bits(cpp_unfused(d, d["y"].clone())), bits(unfused))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(bits(cpp_fused(d, d["y"].clone())), bits(first)), "1 thread differs from the default"
    finally:
        torch.set_num_threads(threads)


def test_popular_expert_spans_several_chunks_and_zipf_routing():
    """400 rows (several 64-row tasks) on expert 0, a zipf tail on the others, k = 2, 3 slices, fp32."""
    g = torch.Generator().manual_seed(5)
    T, k, E, H, R = 200, 2, 9, 96, 16
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.5
    ids = torch.multinomial(p, T * k, replacement=True, generator=g).view(T, k).to(torch.int32)
    ids[:, 0] = 0
    ids[ids[:, 1] == 0, 1] = -1
    weights = torch.rand(T, k, generator=g)
    weights[ids < 0] = 0
    widths = (64, 16, 48)
    d = dict(x=torch.randn(T, H, generator=g), lora_a=torch.randn(3, E, R, H, generator=g) * 0.1,
             lora_b=torch.randn(E, sum(widths), R, generator=g) * 0.1,
             slice_offsets=torch.tensor([0, 64, 80, 128], dtype=torch.int32), ids=ids, weights=weights,
             scales=torch.rand(E, generator=g), ranks=torch.randint(1, R + 1, (E,), generator=g).to(torch.int32),
             y=torch.randn(T, sum(widths), generator=g))
    d["meta"] = ref_align(ids, E, 32)._replace(weights=weights)
    want = ref_lora.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], ids, weights,
                                       d["scales"], d["ranks"], d["y"].clone())
    assert_close(cpp_fused(d, d["y"].clone()), want, torch.float32, what="fused zipf")
    assert_close(cpp_unfused(d, d["y"].clone()), want, torch.float32, what="unfused zipf")


def test_out_is_fully_overwritten_and_noncontiguous_y_is_updated_in_place():
    d = make(CASES[3])
    out = torch.full((3, d["ids"].numel(), 24), 7.0)
    got = cpp.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"], out=out)
    assert got is out
    assert_close(out, ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"]), what="shrink into out")
    want = ref_lora.lora_expand(out, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"],
                                d["y"].clone())
    base = d["y"].t().contiguous()           # y as a transposed view: not contiguous
    y = base.t()
    got = cpp.lora_expand(out, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], y)
    assert got is y and not y.is_contiguous()
    assert_close(base.t(), want, what="expand into a strided y")


def test_no_routed_rows_and_zero_ranks_leave_y_unchanged():
    d = make(CASES[3])
    d["ids"] = torch.full_like(d["ids"], -1)
    d["weights"] = torch.zeros_like(d["weights"])
    d["meta"] = ref_align(d["ids"], 7, 16)._replace(weights=d["weights"])
    y0 = d["y"].clone()
    assert torch.equal(cpp_fused(d, d["y"].clone()), y0)
    assert torch.equal(cpp_unfused(d, d["y"].clone()), y0)
    d = make(CASES[3])
    d["ranks"] = torch.zeros_like(d["ranks"])
    assert torch.equal(cpp_fused(d, d["y"].clone()), d["y"])


def test_errors_are_value_errors_naming_the_argument():
    d = make(CASES[1])
    with pytest.raises(ValueError, match="ranks"):
        cpp.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"] + 100)
    with pytest.raises(ValueError, match="lora_a"):
        cpp.lora_shrink(d["x"], d["lora_a"].double(), d["meta"], d["ranks"])
    with pytest.raises(ValueError, match="x must be fp32"):
        cpp.lora_shrink(d["x"].double(), d["lora_a"].double(), d["meta"], d["ranks"])
    other = ref_align(torch.flip(d["ids"], [0]).contiguous(), 5, 16)
    with pytest.raises(ValueError, match="sorted_ids"):
        cpp.lora_shrink(d["x"], d["lora_a"], d["meta"]._replace(sorted_ids=other.sorted_ids), d["ranks"])
    buf = cpp.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    with pytest.raises(ValueError, match="slice_offsets"):
        cpp.lora_expand(buf, d["lora_b"], torch.tensor([0, 20, 60], dtype=torch.int32), d["meta"], d["scales"],
                        d["ranks"], d["y"])
    with pytest.raises(ValueError, match="weights"):
        cpp.lora_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"]._replace(weights=None), d["scales"],
                        d["ranks"], d["y"])
    with pytest.raises(ValueError, match="ids"):
        bad = d["ids"].clone()
        bad[0, 0] = 5
        cpp.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], bad, d["weights"],
                               d["scales"], d["ranks"], d["y"])
    with pytest.raises(ValueError, match="lora_b"):
        cpp.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"].half(), d["slice_offsets"], d["ids"], d["weights"],
                               d["scales"], d["ranks"], d["y"])
