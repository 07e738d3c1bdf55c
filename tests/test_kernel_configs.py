"""Launch configurations of the LoRA kernels (``lumoe_engine.kernels.configs``): keys and buckets, the defaults (valid,
within the shared-memory budget, and run by the launchers against the reference at shapes that take each of their
branches), the lookup order (override, table, nearest bucket, default; tables of another device ignored), the switch
that sends 16-bit tiles into tl.dot on a GPU (and fp32 tiles in the interpreter), and the tune mode writing a table
that later launches use.

Legend: T tokens, E experts, k top-k, M = T*k routed rows, S slices, H input features, N output features, R max rank.
"""
from __future__ import annotations

import json

import pytest
import torch

from lumoe_engine.kernels import configs
from lumoe_engine.kernels import lora_decode_expand as decode_expand
from lumoe_engine.kernels import lora_decode_shrink as decode_shrink
from lumoe_engine.kernels import lora_expand as expand_module
from lumoe_engine.kernels import lora_grad as grad_module
from lumoe_engine.kernels import lora_shrink as shrink_module
from lumoe_engine.kernels.configs import KernelConfig
from lumoe_engine.ops import build_routing, ref_lora
import lora_cases
from lora_cases import Case
from tolerances import assert_close, tol_for_buf

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def no_table(monkeypatch):
    """Every test starts from the defaults (no table named, none cached for the interpreter)."""
    monkeypatch.delenv("LUMOE_KERNEL_CONFIGS", raising=False)
    monkeypatch.delenv("LUMOE_TF32", raising=False)
    configs.reset_configs()
    yield
    configs.reset_configs()


def make(case: Case, dtype=torch.float32, block_m: int = 16) -> dict:
    d = lora_cases.make(case, dtype)
    d["meta"] = build_routing(d["weights"], d["ids"], case.E, block_m)
    return d


# ------------------------------------------------------------------------------------------------ keys and defaults
def test_keys_and_row_buckets():
    assert [configs.rows_bucket(m) for m in (0, 1, 3, 16, 17, 4096, 16384, 100_000)] == \
        [1, 1, 4, 16, 32, 4096, 16384, 16384]
    assert configs.config_key("lora_shrink", torch.bfloat16, 4096, 16, 3000) == "lora_shrink/bf16/h4096/r16/m4096"
    assert configs.parse_key("lora_expand/fp16/h11008/r64/m1") == ("lora_expand", "fp16", 11008, 64, 1)
    with pytest.raises(ValueError, match="op"):
        configs.config_key("lora_nope", torch.float32, 1, 1, 1)
    with pytest.raises(ValueError, match="dtype"):
        configs.config_key("lora_shrink", torch.float64, 1, 1, 1)
    assert [configs.block_r(r) for r in (1, 8, 16, 17, 64, 128)] == [16, 16, 16, 32, 64, 64]


@pytest.mark.parametrize("cfg", [dict(block_m=8), dict(block_n=48), dict(block_k=0), dict(split_k=0),
                                 dict(num_warps=3), dict(num_stages=0)])
def test_config_rejects_blocks_a_gpu_cannot_run(cfg):
    with pytest.raises(ValueError, match="KernelConfig"):
        KernelConfig(**cfg)


def _tile_bytes(op: str, cfg: KernelConfig, el: int, rank: int) -> int:
    """Bytes of the tiles one pipeline stage holds (what shared memory has to fit, times num_stages)."""
    br = configs.block_r(rank)
    if op == "lora_shrink":
        return (cfg.block_m * cfg.block_k + cfg.block_k * br) * el
    if op == "lora_expand":
        return cfg.block_m * br * 4 + br * cfg.block_n * el
    if op in ("lora_grad_a", "lora_grad_b"):
        return cfg.block_k * br * 4 + cfg.block_k * cfg.block_n * el
    return 0                                                        # the decode kernels hold vectors only


@pytest.mark.parametrize("op", configs.OPS)
def test_defaults_and_candidates_are_valid_and_fit_everywhere(op):
    for dtype in DTYPES:
        el = torch.empty((), dtype=dtype).element_size()
        for hidden in (59, 4096, 11008):
            for rank in (1, 8, 16, 64, 128):
                for rows in (1, 16, 256, 4096, 16384):
                    cfg = configs.default_config(op, dtype, hidden, rank, rows)
                    assert cfg.num_stages * _tile_bytes(op, cfg, el, rank) <= configs.SAFE_SMEM_BYTES, (op, cfg)
                    cands = configs.candidates(op, dtype, hidden, rank, rows)
                    assert cands[0] == cfg and len(set(cands)) == len(cands) > 1
                    assert all(min(c.block_m, c.block_n, c.block_k) >= 16 for c in cands)


def test_default_split_rules():
    """Small T splits the reduction over programs, large T does not (the rules the defaults document)."""
    assert configs.default_config("lora_shrink", torch.bfloat16, 4096, 16, 16).split_k > 1
    assert configs.default_config("lora_shrink", torch.bfloat16, 4096, 16, 4096).split_k == 1
    assert configs.default_config("lora_shrink", torch.bfloat16, 59, 16, 1).split_k == 1
    assert configs.default_config("lora_decode_shrink", torch.bfloat16, 4096, 16, 1).split_k == 16
    assert configs.default_config("lora_decode_shrink", torch.bfloat16, 59, 16, 1).split_k == 1
    # weight gradients: T = 4096 rows of one expert run on 16 splits x 64 H tiles, not 64 programs
    p = grad_module.plan("a", torch.bfloat16, True, 4096, 4096, 16, 4096, 1, 1)
    assert p.split == 16 and p.grid == (16, 1, 64)
    assert grad_module.plan("a", torch.bfloat16, True, 4096, 4096, 16, 4096, 1, 64).split == 1
    assert grad_module.plan("b", torch.float32, True, 4096, 1000, 64, 16384, 1, 1000).split == 1   # partials cap


# ------------------------------------------------------------------------------------------------ defaults, launched
def _grouped(d, case):
    buf = shrink_module.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
    y = expand_module.lora_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"],
                                  d["y"].clone())
    return buf, y


DEFAULT_SHAPES = [
    # (name, case, what the default does there)
    ("shrink_split_h2049", Case("s", 7, 2, 4, 2049, 16, (48,), (16, 3, 9, 16), "minus1"), "shrink_split"),
    ("shrink_no_split_t2048", Case("s", 2048, 1, 3, 59, 16, (24,), (16, 5, 9), "random"), "shrink_one"),
    ("decode_split_h2049", Case("d", 3, 2, 4, 2049, 8, (40,), (8, 3, 1, 8), "random"), "decode_split"),
    ("decode_no_split_h59", Case("d", 5, 1, 3, 59, 16, (24, 9), (16, 1, 7), "minus1"), "decode_one"),
    ("grad_split_t1100", Case("g", 1100, 1, 2, 37, 16, (24,), (16, 9), "one"), "grad_split"),
    ("grad_no_split", Case("g", 133, 2, 7, 59, 24, (16, 48, 5), (24, 3, 0, 11, 24, 7, 1), "minus1"), "grad_one"),
]


@pytest.mark.parametrize("case,what", [s[1:] for s in DEFAULT_SHAPES], ids=[s[0] for s in DEFAULT_SHAPES])
def test_default_configs_run_and_match_reference(case, what):
    dtype = torch.bfloat16 if what.startswith("shrink") else torch.float32
    d = make(case, dtype)
    S, M = len(case.widths), case.T * case.k
    if what.startswith("shrink"):
        p = shrink_module.plan(dtype, False, case.H, case.R, M, S, d["meta"].block_expert.numel(), 16)
        assert p.source == "default" and (p.split > 1) == (what == "shrink_split")
        pe = expand_module.plan(dtype, False, case.N, case.R, M, S, d["meta"].block_expert.numel(), 16)
        assert pe.source == "default"
        buf, y = _grouped(d, case)
        want_buf = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
        assert_close(buf, want_buf, tol_for_buf(dtype), scale=10 if case.H > 1024 else 1, what=f"{what} buf")
        want = ref_lora.lora_expand(want_buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"],
                                    d["y"].clone())
        assert_close(y, want, dtype, what=f"{what} y")
    elif what.startswith("decode"):
        p = decode_shrink.plan(dtype, case.H, case.R, M, S)
        assert p.source == "default" and (p.split > 1) == (what == "decode_split")
        assert decode_expand.plan(dtype, case.N, case.R, case.T, case.k, S).source == "default"
        from lumoe_engine.kernels.lora_shrink_expand import lora_shrink_expand

        args = (d["x"], d["lora_a"], d["lora_b"], d["slice_offsets"], d["ids"], d["weights"], d["scales"], d["ranks"])
        got = lora_shrink_expand(*args, d["y"].clone())
        assert_close(got, ref_lora.lora_shrink_expand(*args, d["y"].clone()), dtype,
                     scale=10 if case.H > 1024 else 1, what=what)
    else:
        p = grad_module.plan("a", dtype, False, case.H, case.N, case.R, M, S, case.E)
        assert p.source == "default" and (p.split > 1) == (what == "grad_split")
        g = torch.Generator().manual_seed(1)
        buf_x = ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
        args = (d["x"], torch.randn(case.T, case.N, generator=g), buf_x, torch.randn(buf_x.shape, generator=g),
                d["slice_offsets"], d["meta"], d["scales"], d["ranks"])
        ga, gb = grad_module.lora_weight_grad(*args)
        ra, rb = ref_lora.lora_weight_grad(*args)
        assert_close(ga, ra, torch.float32, scale=10, what=f"{what} grad_a")
        assert_close(gb, rb, torch.float32, scale=10, what=f"{what} grad_b")


# ------------------------------------------------------------------------------------------------ lookup order
def _table(tmp_path, entries: dict, device: str = "interpreter"):
    path = tmp_path / "table.json"
    configs.write_table(path, entries, device, merge=False)
    return path


def test_lookup_override_table_nearest_default(tmp_path, monkeypatch):
    exact = KernelConfig(block_m=32, block_k=256, split_k=2, num_warps=8, num_stages=3)
    other = KernelConfig(block_k=16, split_k=4)
    path = _table(tmp_path, {"lora_shrink/bf16/h4096/r16/m4096": exact, "lora_shrink/bf16/h4096/r16/m16": other})
    monkeypatch.setenv("LUMOE_KERNEL_CONFIGS", str(path))
    configs.reset_configs()
    assert configs.lookup("lora_shrink", torch.bfloat16, 4096, 16, 3000) == (exact, "table")
    assert configs.lookup("lora_shrink", torch.bfloat16, 4096, 16, 2048) == (exact, "table~")   # nearest bucket
    assert configs.lookup("lora_shrink", torch.bfloat16, 4096, 16, 8) == (other, "table~")
    assert configs.lookup("lora_shrink", torch.bfloat16, 4096, 64, 4096)[1] == "default"         # other rank
    assert configs.lookup("lora_expand", torch.bfloat16, 4096, 16, 4096)[1] == "default"         # other op
    with configs.override("lora_shrink", other):
        assert configs.lookup("lora_shrink", torch.bfloat16, 4096, 16, 4096) == (other, "override")
    assert configs.lookup("lora_shrink", torch.bfloat16, 4096, 16, 4096) == (exact, "table")
    assert configs.table_path() == str(path)
    doc = json.loads(path.read_text())
    assert doc["device"] == "interpreter" and doc["entries"]["lora_shrink/bf16/h4096/r16/m4096"]["block_k"] == 256


def test_tables_of_another_device_or_unreadable_are_ignored(tmp_path, monkeypatch):
    path = _table(tmp_path, {"lora_shrink/bf16/h4096/r16/m4096": KernelConfig(block_k=256)}, device="NVIDIA H200")
    monkeypatch.setenv("LUMOE_KERNEL_CONFIGS", str(path))
    configs.reset_configs()
    with pytest.warns(RuntimeWarning, match="written on 'NVIDIA H200'"):
        assert configs.lookup("lora_shrink", torch.bfloat16, 4096, 16, 4096)[1] == "default"
    path.write_text("{not json")
    configs.reset_configs()
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert configs.lookup("lora_shrink", torch.bfloat16, 4096, 16, 4096)[1] == "default"
    monkeypatch.setenv("LUMOE_KERNEL_CONFIGS", str(tmp_path / "missing.json"))
    configs.reset_configs()
    with pytest.warns(RuntimeWarning, match="no such file"):
        assert configs.lookup("lora_shrink", torch.bfloat16, 4096, 16, 4096)[1] == "default"


def test_write_table_merges_entries_of_the_same_device(tmp_path):
    path = tmp_path / "t.json"
    configs.write_table(path, {"lora_expand/bf16/h64/r16/m16": KernelConfig(block_n=128)}, "dev")
    configs.write_table(path, {"lora_shrink/bf16/h64/r16/m16": KernelConfig(block_k=128)}, "dev")
    assert set(json.loads(path.read_text())["entries"]) == {"lora_expand/bf16/h64/r16/m16",
                                                             "lora_shrink/bf16/h64/r16/m16"}
    configs.write_table(path, {"lora_shrink/bf16/h64/r16/m16": KernelConfig(block_k=256)}, "other device")
    assert set(json.loads(path.read_text())["entries"]) == {"lora_shrink/bf16/h64/r16/m16"}


# ------------------------------------------------------------------------------------------------ the dot switch
def test_dot_flags(monkeypatch):
    assert configs.dot_flags(torch.bfloat16, on_gpu=True) == (True, False)
    assert configs.dot_flags(torch.float16, on_gpu=True) == (True, False)
    assert configs.dot_flags(torch.float32, on_gpu=True) == (False, False)
    for dtype in DTYPES:                                            # the interpreter: fp32 tiles, exact dots
        assert configs.dot_flags(dtype, on_gpu=False) == (False, False)
    with configs.force_dot16():
        assert configs.dot_flags(torch.float16, on_gpu=False) == (True, False)
        assert configs.dot_flags(torch.bfloat16, on_gpu=False) == (False, False)   # bf16 is wrong there
    monkeypatch.setenv("LUMOE_TF32", "1")
    assert configs.dot_flags(torch.float32, on_gpu=True) == (False, True)
    assert configs.dot_flags(torch.float32, on_gpu=False) == (False, False)
    assert configs.dot_flags(torch.bfloat16, on_gpu=True) == (True, False)
    assert configs.interpreting()                                   # how this suite runs without a GPU
    assert not configs.compiled(torch.zeros(1))


class _Recorder:
    """Stands in for a @triton.jit kernel: records the launch instead of running it."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
        return launch


@pytest.mark.parametrize("dtype,dot16", [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False)])
def test_launchers_send_16bit_tiles_into_dot_when_compiled(monkeypatch, dtype, dot16):
    """What a GPU launch would pass (the launchers' own decision, with the compile check pretended true)."""
    case = Case("c", 7, 1, 3, 59, 16, (24,), (16, 5, 9), "random")
    d = make(case, dtype)
    rec = {name: _Recorder() for name in ("shrink", "expand", "grad")}
    monkeypatch.setattr(shrink_module, "_lora_shrink_kernel", rec["shrink"])
    monkeypatch.setattr(expand_module, "_lora_expand_kernel", rec["expand"])
    monkeypatch.setattr(grad_module, "_lora_grad_kernel", rec["grad"])
    for compiled in (True, False):
        monkeypatch.setattr(configs, "compiled", lambda t, c=compiled: c)
        buf = shrink_module.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])
        expand_module.lora_expand(buf, d["lora_b"], d["slice_offsets"], d["meta"], d["scales"], d["ranks"],
                                  d["y"].clone())
        dy = torch.zeros(case.T, case.N, dtype=dtype)
        grad_module.lora_weight_grad(d["x"], dy, buf, buf, d["slice_offsets"], d["meta"], d["scales"], d["ranks"])
        for name, r in rec.items():
            launches = r.launches[-2:] if name == "grad" else r.launches[-1:]
            for _, kw in launches:
                assert kw["DOT16"] is (dot16 and compiled), (name, compiled)
                assert kw["TF32"] is False and kw["num_warps"] == 4 and kw["num_stages"] == 2


# ------------------------------------------------------------------------------------------------ tune mode
def test_tune_writes_a_table_that_later_launches_use(tmp_path, monkeypatch):
    """The tune mode on the CPU (interpreter, a stand-in timer that prefers one candidate): the winner is written,
    read back through LUMOE_KERNEL_CONFIGS and used by the launcher, which still matches the reference; a candidate
    that disagrees with the default is never chosen."""
    case = Case("t", 33, 1, 3, 59, 16, (24,), (16, 5, 9), "random")
    d = make(case, torch.float16)
    M = case.T * case.k
    winner = KernelConfig(block_k=16, split_k=4)
    sweep = [configs.default_config("lora_shrink", torch.float16, case.H, case.R, M), winner,
             KernelConfig(block_k=32, split_k=2)]

    def run():
        return shrink_module.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"])

    def timer(fn):
        fn()
        cfg = configs.lookup("lora_shrink", torch.float16, case.H, case.R, M)[0]
        return 1.0 if cfg == winner else 2.0

    res = configs.tune("lora_shrink", torch.float16, case.H, case.R, M, run, timer, sweep=sweep)
    assert res.best == winner and res.best_ms == 1.0 and res.default_ms == 2.0
    assert [ms for _, ms, _ in res.tried] == [2.0, 1.0, 2.0]
    bad = configs.tune("lora_shrink", torch.float16, case.H, case.R, M,
                       lambda: run() + (configs.lookup("lora_shrink", torch.float16, 1, 1, 1)[0] == winner),
                       timer, sweep=sweep)
    assert bad.best != winner and bad.tried[1][2] == "disagrees with the default"
    path = configs.write_table(tmp_path / "tuned.json", {res.key: res.best}, configs.device_name())
    monkeypatch.setenv("LUMOE_KERNEL_CONFIGS", str(path))
    configs.reset_configs()
    p = shrink_module.plan(torch.float16, False, case.H, case.R, M, 1, d["meta"].block_expert.numel(), 16)
    assert p.source == "table" and p.cfg == winner and p.split == 4
    assert_close(run(), ref_lora.lora_shrink(d["x"], d["lora_a"], d["meta"], d["ranks"]), "fp32_of_16bit",
                 what="tuned shrink")
