"""Grouped multi-LoRA ops: Triton launchers (interpreter on CPU) vs the torch reference in fp32/fp16/bf16, the
reference vs a per-token loop, launch configurations other than the defaults (row sub-tiles, split-K, split rows of
the weight gradients, the GPU's 16-bit dot path with fp16), determinism, rows with -1, rank masking, the validated
front functions and their errors.

Legend: T tokens, E experts, k top-k, M = T*k routed rows, S slices, H input features, N output features, R max rank.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from lumoe_engine.kernels import configs
from lumoe_engine.kernels import lora_decode_shrink as decode_shrink
from lumoe_engine.kernels import lora_grad as grad_module
from lumoe_engine.kernels import lora_shrink as shrink_module
from lumoe_engine.kernels.align_by_expert import align_by_expert as triton_align
from lumoe_engine.kernels.lora_expand import lora_expand as triton_expand
from lumoe_engine.kernels.lora_grad import lora_weight_grad as triton_weight_grad
from lumoe_engine.kernels.lora_shrink import lora_shrink as triton_shrink
from lumoe_engine.kernels.lora_shrink_expand import lora_shrink_expand as triton_shrink_expand
from lumoe_engine.ops import build_routing, lora, ref_lora, reset_backend
import lora_cases
from lora_cases import Case
from tolerances import assert_close, assert_within_lowp_error, tol_for_buf


CASES = [
    Case("t1_s1_k1", 1, 1, 3, 59, 16, (37,), (16, 5, 1), "random"),
    Case("t3_k2_prime_e_r64", 3, 2, 5, 111, 64, (20, 33, 9), (1, 64, 17, 33, 8), "random"),
    Case("t7_k_eq_e", 7, 3, 3, 59, 32, (13, 40, 7), (32, 1, 19), "distinct"),
    Case("t133_minus1_absent", 133, 2, 7, 59, 24, (16, 48, 5), (24, 3, 0, 11, 24, 7, 1), "minus1"),
    Case("t133_one_expert", 133, 1, 3, 111, 16, (29,), (4, 16, 9), "one"),
    Case("t7_h2049_minus1", 7, 2, 4, 2049, 16, (48,), (16, 3, 9, 16), "minus1"),
]
CASE_IDS = [c.name for c in CASES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(case: Case, dtype=torch.float32, seed: int = 0, device="cpu") -> dict:
    """Random inputs of ``case`` (lora_cases.make, rows without an expert carry -0.0) and their routing meta."""
    d = lora_cases.make(case, dtype, seed, device, signed_zero_rows=True)
    d["meta"] = build_routing(d["weights"], d["ids"], case.E, 16)
    return d


def red(case: Case) -> float:
    """Tolerance scale of the fp32 comparisons: 10x for the long reductions over H = 2049 (the reference's and the
    kernel's summation orders differ; magnitudes ~10)."""
    return 10.0 if case.H > 1024 else 1.0


def naive(d: dict) -> torch.Tensor:
    """The contract, one token, choice and slice at a time (the reference's own oracle): y + delta, fp32."""
    x, a, b, ids = d["x"].float(), d["lora_a"].float(), d["lora_b"].float(), d["ids"]
    offs = d["slice_offsets"].tolist()
    out = d["y"].float().clone()
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            r = int(d["ranks"][e])
            c = float(d["weights"][t, j]) * float(d["scales"][e])
            for s in range(len(offs) - 1):
                u = x[t] @ a[s, e, :r].T
                out[t, offs[s]:offs[s + 1]] += c * (u @ b[e, offs[s]:offs[s + 1], :r].T)
    return out


def untouched_rows(d: dict) -> torch.Tensor:
    return (d["ids"] < 0).all(dim=1)


def _check_untouched(y, y0, d, what):
    """Rows whose ids are all -1 keep their exact bits (their -0.0 entries included)."""
    skip = untouched_rows(d)
    bits = torch.int16 if y.element_size() == 2 else torch.int32
    assert torch.equal(y[skip].view(bits), y0[skip].view(bits)), f"{what}: rows without an expert changed"


# ------------------------------------------------------------------------------------------------ the reference
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_matches_per_token_loop(case):
    d = make(case)
    y0 = d["y"].clone()
    buf = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    got = ref_lora.lora_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], d["y"])
    assert got is d["y"]
    assert_close(got, naive(dict(d, y=y0)), torch.float32, what="reference vs loop")
    _check_untouched(got, y0, d, "reference")
    fused = ref_lora.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"],
                                        d["weights"], d["scales"], d["ranks"], y0.clone())
    assert_close(fused, got, torch.float32, what="reference fused vs unfused")


def test_reference_buf_rank_masking_and_skipped_rows():
    d = make(CASES[3])
    buf = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    flat = d["ids"].reshape(-1).long()
    assert (buf[:, flat < 0] == 0).all()
    for m, e in enumerate(flat.tolist()):
        if e >= 0:
            r = int(d["ranks"][e])
            assert (buf[:, m, r:] == 0).all()
            if r:
                assert (buf[:, m, :r] != 0).any()


# ------------------------------------------------------------------------------------------------ launchers
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shrink_matches_reference(case, dtype):
    d = make(case, dtype)
    got = triton_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    want = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_close(got, want, tol_for_buf(dtype), scale=red(case), what=f"shrink {case.name}")
    flat = d["ids"].reshape(-1)
    assert (got[:, flat < 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_expand_matches_reference(case, dtype):
    d = make(case, dtype)
    buf = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    y0 = d["y"].clone()
    want = ref_lora.lora_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], y0.clone())
    y = y0.clone()
    got = triton_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], y)
    assert got is y
    assert_close(got, want, dtype, what=f"expand {case.name}")
    _check_untouched(got, y0, d, "expand")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fused_matches_reference_and_unfused(case, dtype):
    d = make(case, dtype)
    y0 = d["y"].clone()
    want = ref_lora.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"], d["weights"],
                                       d["scales"], d["ranks"], y0.clone())
    fused = triton_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"], d["weights"],
                                 d["scales"], d["ranks"], y0.clone())
    assert_close(fused, want, dtype, scale=red(case), what=f"fused {case.name}")
    _check_untouched(fused, y0, d, "fused")
    buf = triton_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    unfused = triton_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], y0.clone())
    assert_close(fused, unfused, dtype, scale=red(case), what=f"fused vs unfused {case.name}")


def test_fused_computes_each_rows_intermediate_once(monkeypatch):
    """The decode op: one shrink launch of (routed rows, slices, H splits) programs, whatever N is, whose partials
    add up to the shrink of every routed row; the expand never reads x or A (it reads the finished [R] vectors)."""
    case = CASES[5]                                                 # H = 2049: several H splits by default
    d = make(case)
    part = decode_shrink.lora_decode_shrink(d["x"], d["lora_a"], d["ids"], d["ranks"])
    want = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])                   # [S, M, R]
    split = part.shape[0]
    assert split > 1
    flat = d["ids"].reshape(-1).long()
    for m in range(flat.numel()):
        if flat[m] >= 0:
            r = case.ranks[flat[m]]
            assert_close(part[:, :, m, :r].sum(0), want[:, m, :r], torch.float32, scale=red(case), what=f"row {m}")
    grids = []
    real = decode_shrink._lora_decode_shrink_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(decode_shrink, "_lora_decode_shrink_kernel", Spy())
    for n_out in (48, 2048):
        b = torch.randn(case.E, n_out, case.R) * 0.2
        y = torch.zeros(case.T, n_out)
        so = torch.tensor([0, n_out], dtype=torch.int32)
        triton_shrink_expand(d["x"], d["lora_a"], b, so, d["ids"], d["weights"], d["scales"], d["ranks"], y)
        assert_close(y, ref_lora.lora_shrink_expand(d["x"], d["lora_a"], b, so, d["ids"], d["weights"], d["scales"],
                                                    d["ranks"], torch.zeros(case.T, n_out)), torch.float32,
                     scale=red(case), what=f"fused N={n_out}")
    assert grids == [(case.T * case.k, 1, split)] * 2


def test_kernels_accept_any_order_within_groups():
    """The Triton alignment may order rows differently inside a group: same results, still deterministic."""
    case = CASES[3]
    d = make(case)
    meta_t = triton_align(d["ids"], case.E, 16)._replace(ids=d["ids"], weights=d["weights"])
    y0 = d["y"].clone()
    want = ref_lora.lora_expand(ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"]), d["lora_b"],
                                d["slice_offsets"], d["meta"], d["scales"], d["ranks"], y0.clone())
    buf = triton_shrink(d["x"], d["lora_a"], meta_t, d["ranks"])
    got = triton_expand(buf, d["lora_b"], d["slice_offsets"], meta_t, d["scales"], d["ranks"], y0.clone())
    assert_close(got, want, torch.float32, what="triton alignment")


def test_out_buffer_is_fully_rewritten():
    case = CASES[3]
    d = make(case)
    fresh = triton_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    out = torch.full_like(fresh, float("nan"))
    got = triton_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"], out=out)
    assert got is out and torch.equal(got, fresh)


def test_five_runs_identical():
    d = make(CASES[3], torch.float16)                               # k = 2: the k-sum order matters
    small = make(CASES[2], torch.float16)                           # k = 3 (the fused kernel: one program per token)
    outs = []
    for _ in range(5):
        buf = triton_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
        y = triton_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], d["y"].clone())
        f = triton_shrink_expand(small["x"], small["lora_a"], small["lora_b"], small["slice_offsets"], small["ids"],
                                 small["weights"], small["scales"], small["ranks"], small["y"].clone())
        outs.append((buf, y, f))
    for buf, y, f in outs[1:]:
        assert torch.equal(buf, outs[0][0]) and torch.equal(y, outs[0][1]) and torch.equal(f, outs[0][2])


def test_strided_rows_of_x_and_y():
    """x and y may be column slices of wider tensors (rows contiguous, row stride larger than H / N)."""
    case = CASES[2]
    d = make(case)
    x_wide = torch.zeros(case.T, case.H + 5)
    x_wide[:, 2:2 + case.H] = d["x"]
    y_wide = torch.zeros(case.T, case.N + 3)
    y_wide[:, 1:1 + case.N] = d["y"]
    buf = triton_shrink(x_wide[:, 2:2 + case.H], d["lora_a"], d["meta"], d["ranks"])
    triton_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], y_wide[:, 1:1 + case.N])
    assert_close(y_wide[:, 1:1 + case.N], naive(d), torch.float32, what="strided")
    assert (y_wide[:, 0] == 0).all() and (y_wide[:, 1 + case.N:] == 0).all()


# ------------------------------------------------------------------------------------------------ weight gradients
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=[CASES[1].name, CASES[3].name, CASES[4].name])
def test_weight_grad_matches_reference(case):
    d = make(case)
    g = torch.Generator().manual_seed(1)
    buf_x = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    buf_dy = torch.randn(buf_x.shape, generator=g)
    dy = torch.randn(case.T, case.N, generator=g)
    args = (d["x"], dy, buf_x, buf_dy, d["slice_offsets"], d["meta"], d["scales"], d["ranks"])
    ga, gb = triton_weight_grad(*args)
    ra, rb = ref_lora.lora_weight_grad(*args)
    assert_close(ga, ra, torch.float32, scale=10, what="grad_a")
    assert_close(gb, rb, torch.float32, scale=10, what="grad_b")
    present = torch.zeros(case.E, dtype=torch.bool)
    present[d["ids"][d["ids"] >= 0].long()] = True
    assert (ga[:, ~present] == 0).all() and (gb[~present] == 0).all()
    for e in range(case.E):                                         # rank masking
        r = case.ranks[e]
        assert (ga[:, e, r:] == 0).all() and (gb[e, :, r:] == 0).all()
    only_b = triton_weight_grad(*args, need_a=False)
    assert only_b[0] is None and torch.equal(only_b[1], gb)


# ------------------------------------------------------------------------------------------------ launch configs
KC = configs.KernelConfig
CONFIG_VARIANTS = [
    # (name, meta block_m, {op: config})
    ("shrink_split3", 16, {"lora_shrink": KC(block_k=16, split_k=3)}),
    ("shrink_subtiles_split2", 64, {"lora_shrink": KC(block_m=16, block_k=32, split_k=2)}),
    ("shrink_tile32_of_64", 64, {"lora_shrink": KC(block_m=32, block_k=64, split_k=1)}),
    ("expand_subtiles", 64, {"lora_expand": KC(block_m=16, block_n=16)}),
    ("expand_tile32_bn128", 32, {"lora_expand": KC(block_m=32, block_n=128, num_warps=8, num_stages=3)}),
]


@pytest.mark.parametrize("name,block_m,cfgs", CONFIG_VARIANTS, ids=[v[0] for v in CONFIG_VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_ops_under_other_configs(name, block_m, cfgs, dtype):
    """Row sub-tiles of larger metadata blocks, split-K with partial sums: the same results as the reference."""
    case = CASES[3]                                                 # k = 2, E = 7 with an absent expert, S = 3
    d = make(case, dtype)
    meta = build_routing(d["weights"], d["ids"], case.E, block_m)
    y0 = d["y"].clone()
    want_buf = ref_lora.lora_shrink(d["x"], d["lora_a"], meta, d["ranks"])
    want = ref_lora.lora_expand(want_buf, d["lora_b"], d["slice_offsets"], meta, d["scales"], d["ranks"], y0.clone())
    with contextlib.ExitStack() as stack:
        for op, cfg in cfgs.items():
            stack.enter_context(configs.override(op, cfg))
        n_blocks = meta.block_expert.numel()
        if "lora_shrink" in cfgs:
            p = shrink_module.plan(dtype, False, case.H, case.R, case.T * case.k, 3, n_blocks, block_m)
            assert p.source == "override" and p.sub_blocks == block_m // p.block_m
            assert (p.split > 1) == (cfgs["lora_shrink"].split_k > 1)
        buf = triton_shrink(d["x"], d["lora_a"], meta, d["ranks"])
        y = triton_expand(buf, d["lora_b"], d["slice_offsets"], meta, d["scales"], d["ranks"], y0.clone())
    assert_close(buf, want_buf, tol_for_buf(dtype), what=f"{name} shrink")
    assert_close(y, want, dtype, what=f"{name} expand")
    _check_untouched(y, y0, d, name)


@pytest.mark.parametrize("cfg", [KC(block_k=16, split_k=1), KC(block_k=16, split_k=5), KC(block_k=512, split_k=16)],
                         ids=["one_split", "five_splits", "wide_steps"])
def test_fused_under_other_configs(cfg):
    case = CASES[5]                                                 # H = 2049
    d = make(case, torch.float16)
    y0 = d["y"].clone()
    want = ref_lora.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"], d["weights"],
                                       d["scales"], d["ranks"], y0.clone())
    with configs.override("lora_decode_shrink", cfg), configs.override("lora_decode_expand", KC(block_n=16)):
        got = triton_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"], d["weights"],
                                   d["scales"], d["ranks"], y0.clone())
    assert_close(got, want, torch.float16, what=f"fused {cfg.short()}")
    _check_untouched(got, y0, d, "fused")


@pytest.mark.parametrize("split_k", [1, 3, 32])
def test_weight_grad_split_over_rows(monkeypatch, split_k):
    """An expert's rows split over several programs (partials added in order): the same gradients, deterministic."""
    monkeypatch.setattr(grad_module, "ROWS_PER_SPLIT", 8)
    case = CASES[4]                                                 # 133 rows, all to expert 1
    d = make(case)
    g = torch.Generator().manual_seed(1)
    buf_x = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    dy = torch.randn(case.T, case.N, generator=g)
    args = (d["x"], dy, buf_x, torch.randn(buf_x.shape, generator=g), d["slice_offsets"], d["meta"], d["scales"],
            d["ranks"])
    cfg = KC(block_n=16, block_k=16, split_k=split_k)
    p = grad_module.plan("a", torch.float32, False, case.H, case.N, case.R, case.T, 1, case.E)
    with configs.override("lora_grad_a", cfg), configs.override("lora_grad_b", cfg):
        p = grad_module.plan("a", torch.float32, False, case.H, case.N, case.R, case.T, 1, case.E)
        assert p.split == min(split_k, case.T // case.E // 8)
        ga, gb = triton_weight_grad(*args)
        again = triton_weight_grad(*args)
    ra, rb = ref_lora.lora_weight_grad(*args)
    assert_close(ga, ra, torch.float32, scale=10, what=f"grad_a split {p.split}")
    assert_close(gb, rb, torch.float32, scale=10, what=f"grad_b split {p.split}")
    assert torch.equal(ga, again[0]) and torch.equal(gb, again[1])


def test_gpu_dot_path_with_fp16_in_the_interpreter():
    """DOT16 (16-bit tiles straight into tl.dot, as on a GPU) is exact enough in the interpreter for fp16: the GPU's
    code path of shrink, expand and the weight gradients, run here."""
    case = CASES[3]
    d = make(case, torch.float16)
    y0 = d["y"].clone()
    want_buf = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    want = ref_lora.lora_expand(want_buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"],
                                y0.clone())
    dy = torch.randn(case.T, case.N, generator=torch.Generator().manual_seed(2)).half()
    gargs = (d["x"], dy, want_buf, want_buf.flip(1).contiguous(), d["slice_offsets"], d["meta"], d["scales"],
             d["ranks"])
    with configs.force_dot16():
        assert shrink_module.plan(torch.float16, False, case.H, case.R, 1, 3, 1, 16).dot16
        buf = triton_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
        y = triton_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], y0.clone())
        ga, gb = triton_weight_grad(*gargs)
    ra, rb = ref_lora.lora_weight_grad(*gargs)
    # plain torch on the same 16-bit operands: the fp32 buffers rounded to fp16 before the products
    la, lb = ref_lora.lora_weight_grad(*gargs[:2], *(b.half().float() for b in gargs[2:4]), *gargs[4:])
    assert_close(buf, want_buf, "fp32_of_16bit", what="dot16 shrink")
    assert_close(y, want, torch.float16, what="dot16 expand")
    assert_within_lowp_error(ga, ra, la, torch.float16, what="dot16 grad_a")
    assert_within_lowp_error(gb, rb, lb, torch.float16, what="dot16 grad_b")
    _check_untouched(y, y0, d, "dot16 expand")


# ------------------------------------------------------------------------------------------------ front functions
@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LUMOE_BACKEND", request.param)
    reset_backend()
    yield request.param
    reset_backend()


def test_front_functions_dispatch(backend):
    case = CASES[2]
    d = make(case)
    want = naive(d)
    buf = lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    y = lora.lora_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], d["y"].clone())
    assert_close(y, want, torch.float32, what=f"front {backend}")
    f = lora.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"], d["weights"],
                                d["scales"], d["ranks"], d["y"].clone())
    assert_close(f, want, torch.float32, what=f"front fused {backend}")


def test_front_weight_grad(backend):
    case = CASES[3]
    d = make(case)
    buf_x = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    dy = torch.randn(case.T, case.N, generator=torch.Generator().manual_seed(2))
    args = (d["x"], dy, buf_x, buf_x.flip(1).contiguous(), d["slice_offsets"], d["meta"], d["scales"], d["ranks"])
    ga, gb = lora.lora_weight_grad(*args)
    ra, rb = ref_lora.lora_weight_grad(*args)
    assert_close(ga, ra, torch.float32, scale=10, what=f"front grad_a {backend}")
    assert_close(gb, rb, torch.float32, scale=10, what=f"front grad_b {backend}")
    with pytest.raises(ValueError, match="^buf_x:"):
        lora.lora_weight_grad(d["x"], dy, buf_x[:, :-1], *args[3:])
    with pytest.raises(ValueError, match="^dy:"):
        lora.lora_weight_grad(d["x"], dy[:-1], *args[2:])
    with pytest.raises(ValueError, match="^scales:"):
        lora.lora_weight_grad(*args[:6], d["scales"][:-1], d["ranks"])


def _bad(d: dict, **changes) -> dict:
    return dict(d, **changes)


def _shrink(d):
    return lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"], out=d.get("out"))


def _expand(d):
    buf = d.get("buf", torch.zeros(d["lora_a"].shape[0], d["ids"].numel(), d["lora_a"].shape[2]))
    return lora.lora_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], d["y"])


def _fused(d):
    return lora.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"], d["weights"],
                                   d["scales"], d["ranks"], d["y"])


_C = CASES[2]                                                       # T=7, k=3, E=3, H=59, R=32, S=3, N=60
BAD = [
    ("x_not_2d", _shrink, lambda d: _bad(d, x=d["x"][None]), "x"),
    ("x_not_2d_fused", _fused, lambda d: _bad(d, x=d["x"].reshape(-1)), "x"),
    ("x_columns_strided", _shrink, lambda d: _bad(d, x=d["x"].t().contiguous().t()), "x"),
    ("x_int", _fused, lambda d: _bad(d, x=d["x"].int()), "x"),
    ("h_mismatch", _shrink, lambda d: _bad(d, x=torch.randn(_C.T, _C.H + 1)), "lora_a"),
    ("lora_a_3d", _shrink, lambda d: _bad(d, lora_a=d["lora_a"][0]), "lora_a"),
    ("lora_a_dtype", _shrink, lambda d: _bad(d, lora_a=d["lora_a"].half()), "lora_a"),
    ("lora_a_noncontig", _fused, lambda d: _bad(d, lora_a=d["lora_a"].transpose(0, 1).contiguous().transpose(0, 1)),
     "lora_a"),
    ("r_mismatch", _fused, lambda d: _bad(d, lora_b=d["lora_b"][:, :, :-1].contiguous()), "lora_b"),
    ("e_mismatch", _fused, lambda d: _bad(d, lora_b=d["lora_b"][:-1].contiguous()), "lora_b"),
    ("e_mismatch_meta", _shrink, lambda d: _bad(d, lora_a=d["lora_a"][:, :-1].contiguous()), "meta"),
    ("e_mismatch_expand", _expand, lambda d: _bad(d, lora_b=d["lora_b"][:-1].contiguous()), "meta"),
    ("slices_not_ending_at_n", _expand, lambda d: _bad(d, slice_offsets=torch.tensor([0, 13, 53, 59],
                                                                                      dtype=torch.int32)),
     "slice_offsets"),
    ("slices_descending", _fused, lambda d: _bad(d, slice_offsets=torch.tensor([0, 40, 13, 60], dtype=torch.int32)),
     "slice_offsets"),
    ("slices_not_from_0", _fused, lambda d: _bad(d, slice_offsets=torch.tensor([1, 13, 53, 60], dtype=torch.int32)),
     "slice_offsets"),
    ("slices_wrong_count", _expand, lambda d: _bad(d, slice_offsets=torch.tensor([0, 60], dtype=torch.int32)),
     "slice_offsets"),
    ("slices_int64", _fused, lambda d: _bad(d, slice_offsets=d["slice_offsets"].long()), "slice_offsets"),
    ("rank_negative", _shrink, lambda d: _bad(d, ranks=torch.tensor([4, -1, 2], dtype=torch.int32)), "ranks"),
    ("rank_too_big", _expand, lambda d: _bad(d, ranks=torch.tensor([4, 33, 2], dtype=torch.int32)), "ranks"),
    ("rank_too_big_fused", _fused, lambda d: _bad(d, ranks=torch.tensor([4, 33, 2], dtype=torch.int32)), "ranks"),
    ("ranks_int64", _shrink, lambda d: _bad(d, ranks=d["ranks"].long()), "ranks"),
    ("ranks_wrong_len", _fused, lambda d: _bad(d, ranks=d["ranks"][:2].contiguous()), "ranks"),
    ("scales_fp16", _expand, lambda d: _bad(d, scales=d["scales"].half()), "scales"),
    ("y_dtype", _expand, lambda d: _bad(d, y=d["y"].half()), "y"),
    ("y_shape", _fused, lambda d: _bad(d, y=d["y"][:, :-1].contiguous()), "y"),
    ("y_rows", _expand, lambda d: _bad(d, y=d["y"][:-1].contiguous()), "y"),
    ("meta_other_t", _shrink, lambda d: _bad(d, x=d["x"][:-1].contiguous()), "meta"),
    ("meta_not_meta", _shrink, lambda d: _bad(d, meta=(d["ids"], d["weights"])), "meta"),
    ("buf_wrong_m", _expand, lambda d: _bad(d, buf=torch.zeros(3, _C.T * _C.k + 1, _C.R)), "buf"),
    ("buf_fp16", _expand, lambda d: _bad(d, buf=torch.zeros(3, _C.T * _C.k, _C.R, dtype=torch.float16)), "buf"),
    ("out_wrong_shape", _shrink, lambda d: _bad(d, out=torch.zeros(3, _C.T * _C.k, _C.R + 1)), "out"),
    ("ids_out_of_range", _fused, lambda d: _bad(d, ids=torch.full_like(d["ids"], _C.E)), "ids"),
    ("ids_below_minus1", _fused, lambda d: _bad(d, ids=torch.full_like(d["ids"], -2)), "ids"),
    ("weights_shape", _fused, lambda d: _bad(d, weights=d["weights"][:, :1].contiguous()), "weights"),
]


@pytest.mark.parametrize("call,mutate,name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error_naming_argument(call, mutate, name):
    d = make(_C)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call(mutate(d))


def test_validate_false_skips_value_checks_only():
    d = make(_C)
    bad_ranks = torch.tensor([4, 33, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="^x:"):
        lora.lora_shrink(d["x"][None], d["lora_a"], d["meta"], bad_ranks, validate=False)
    with pytest.raises(ValueError, match="^ranks:"):
        lora.lora_shrink(d["x"], d["lora_a"], d["meta"], bad_ranks)


# ------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
class TestOnGPU:
    """The same comparisons on CUDA (compiled Triton; fp16/bf16 tiles straight into tl.dot), all dtypes, other launch
    configurations, the weight gradients in 16 bits, determinism."""

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
    def test_ops_match_reference(self, case, dtype):
        d = make(case, dtype, device="cuda")
        y0 = d["y"].clone()
        want = ref_lora.lora_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"],
                                           d["weights"], d["scales"], d["ranks"], y0.clone())
        p = shrink_module.plan(dtype, True, case.H, case.R, case.T * case.k, 3, 1, 16)
        assert p.dot16 == (dtype != torch.float32)
        buf = triton_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
        assert_close(buf, ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"]), tol_for_buf(dtype),
                     scale=red(case), what="gpu shrink")
        unfused = triton_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"], y0.clone())
        fused = triton_shrink_expand(d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"], d["weights"],
                                     d["scales"], d["ranks"], y0.clone())
        assert_close(unfused, want, dtype, scale=red(case), what="gpu expand")
        assert_close(fused, want, dtype, scale=red(case), what="gpu fused")
        _check_untouched(unfused, y0, d, "gpu expand")
        _check_untouched(fused, y0, d, "gpu fused")

    @pytest.mark.parametrize("name,block_m,cfgs", CONFIG_VARIANTS, ids=[v[0] for v in CONFIG_VARIANTS])
    def test_other_configs_bf16(self, name, block_m, cfgs):
        case = CASES[3]
        d = make(case, torch.bfloat16, device="cuda")
        meta = build_routing(d["weights"], d["ids"], case.E, block_m)
        y0 = d["y"].clone()
        want_buf = ref_lora.lora_shrink(d["x"], d["lora_a"], meta, d["ranks"])
        want = ref_lora.lora_expand(want_buf, d["lora_b"], d["slice_offsets"], meta, d["scales"], d["ranks"],
                                    y0.clone())
        with contextlib.ExitStack() as stack:
            for op, cfg in cfgs.items():
                stack.enter_context(configs.override(op, cfg))
            buf = triton_shrink(d["x"], d["lora_a"], meta, d["ranks"])
            y = triton_expand(buf, d["lora_b"], d["slice_offsets"], meta, d["scales"], d["ranks"], y0.clone())
        assert_close(buf, want_buf, "fp32_of_16bit", what=f"gpu {name} shrink")
        assert_close(y, want, torch.bfloat16, what=f"gpu {name} expand")

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_weight_grad_and_determinism(self, dtype):
        case = CASES[3]
        d = make(case, dtype, device="cuda")
        buf_x = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
        dy = torch.randn(case.T, case.N, device="cuda").to(dtype)
        args = (d["x"], dy, buf_x, buf_x.flip(1).contiguous(), d["slice_offsets"], d["meta"], d["scales"],
                d["ranks"])
        ga, gb = triton_weight_grad(*args)
        ra, rb = ref_lora.lora_weight_grad(*args)
        if dtype == torch.float32:
            assert_close(ga, ra, torch.float32, scale=10, what="gpu grad_a")
            assert_close(gb, rb, torch.float32, scale=10, what="gpu grad_b")
        else:
            la, lb = ref_lora.lora_weight_grad(*args[:2], *(b.to(dtype).float() for b in args[2:4]), *args[4:])
            assert_within_lowp_error(ga, ra, la, dtype, what="gpu grad_a")
            assert_within_lowp_error(gb, rb, lb, dtype, what="gpu grad_b")
        assert all(torch.equal(g, h) for g, h in zip(triton_weight_grad(*args), (ga, gb)))
        runs = [triton_expand(triton_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"]), d["lora_b"],
                              d["slice_offsets"], d["meta"], d["scales"], d["ranks"], d["y"].clone())
                for _ in range(5)]
        assert all(torch.equal(r, runs[0]) for r in runs[1:])

    def test_weight_grad_split_over_rows_bf16(self):
        """T = 4096 rows of one expert through the grouped kernel: split over rows, deterministic."""
        case = Case("t4096_one", 4096, 1, 2, 256, 16, (512,), (16, 16), "one")
        d = make(case, torch.bfloat16, device="cuda")
        p = grad_module.plan("a", torch.bfloat16, True, case.H, case.N, case.R, case.T, 1, case.E)
        assert p.split > 1
        buf_x = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
        dy = torch.randn(case.T, case.N, device="cuda").bfloat16()
        args = (d["x"], dy, buf_x, buf_x.flip(1).contiguous(), d["slice_offsets"], d["meta"], d["scales"],
                d["ranks"])
        ga, gb = triton_weight_grad(*args)
        ra, rb = ref_lora.lora_weight_grad(*args)
        la, lb = ref_lora.lora_weight_grad(*args[:2], *(b.bfloat16().float() for b in args[2:4]), *args[4:])
        assert_within_lowp_error(ga, ra, la, torch.bfloat16, what="gpu split grad_a")
        assert_within_lowp_error(gb, rb, lb, torch.bfloat16, what="gpu split grad_b")
        assert all(torch.equal(g, h) for g, h in zip(triton_weight_grad(*args), (ga, gb)))
