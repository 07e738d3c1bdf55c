"""Where each rank's tensors live and what a bank change costs: the base loaded onto the rank's own device; bank
stacks, gate state and routing metadata on the model's device in its compute dtype, read by the wrapped linears as
views (no per-layer copy); an add appends into a free slot (no rebuild), LRU paging writes only the experts that
change; the trainable LoRA in fp32 master weights over a 16-bit base; the gate's principal directions and picture
dedupe at a real model's width; the request-parallel wave schedule. On CPU by device bookkeeping; the ``gpu`` tests
check the same on CUDA.
"""
import math

import pytest
import torch

from lumoe_engine.gate import gate as gate_mod
from lumoe_engine.gate.gate import Gate, principal_directions
from lumoe_engine.model import load as load_mod
from lumoe_engine.model.bank import ExpertBank
from lumoe_engine.model.multilora import module_shapes, new_trainable_expert, random_expert, wrap_model
from lumoe_engine.model.placement import compute_dtype, local_device, model_device, placement_report
from lumoe_engine.model.tiny import build_tiny_llava
from lumoe_engine.model.tokenizer import train_tokenizer
from lumoe_engine.stream.parallel import WaveTrainer

TEXTS = ["What is the name of this planet?", "Zorvath", "Which star does it orbit?", "Kelmira"]


@pytest.fixture(scope="module")
def micro():
    tok = train_tokenizer(TEXTS, vocab_size=200)
    return build_tiny_llava(tok, "micro", seed=0)


# ------------------------------------------------------------------------------------------------ per-rank load
class _Loaded(Exception):
    pass


@pytest.mark.parametrize("four_bit", [False, True])
def test_each_rank_loads_onto_its_own_device(monkeypatch, tmp_path, four_bit):
    """With CUDA, rank LOCAL_RANK loads the base (4-bit or not) with device_map {"": LOCAL_RANK}: never GPU 0 for
    every rank. Checked by the arguments from_pretrained receives (no GPU here)."""
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    seen = {}

    class Fake:
        @staticmethod
        def from_pretrained(path, **kw):
            seen.update(kw)
            raise _Loaded

    monkeypatch.setattr(load_mod, "_model_class", lambda model_type: Fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for rank in ("0", "3"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert local_device() == torch.device("cuda", int(rank))
        with pytest.raises(_Loaded):
            load_mod.load_model(tmp_path, load_in_4bit=four_bit)
        assert seen["device_map"] == {"": int(rank)}
        assert ("quantization_config" in seen) == four_bit
        seen.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(_Loaded):
        load_mod.load_model(tmp_path)
    assert "device_map" not in seen and local_device() == torch.device("cpu")


# ---------------------------------------------------------------------------------------------- bank and layers
def _routed_forward(model, ctx, slot):
    ids = torch.tensor([[5, 6, 7, 8]])
    with ctx.routing([[slot]], token_mask=torch.ones_like(ids)):
        with torch.no_grad():
            model.model.language_model(input_ids=ids)


def test_adds_append_into_reserved_slots_and_layers_read_views(micro):
    model, _ = micro
    bank = ExpertBank(None, device=model_device(model), dtype=compute_dtype(model))
    ctx = wrap_model(model, bank, layers=[1])
    try:
        shapes = module_shapes(model, ctx.modules)
        bank.add(random_expert("e0", shapes, seed=0))
        bank.reserve(9)
        name = next(iter(ctx.modules))
        ptr = bank.stacked(name)[0].data_ptr()
        stats = dict(bank.stats)
        for i in range(1, 9):
            bank.add(random_expert(f"e{i}", shapes, seed=i))
            _routed_forward(model, ctx, i)
            layer = ctx.modules[name]
            cached = layer._stacked(torch.float32, model_device(model))
            assert cached[0].data_ptr() == bank.stacked(name)[0].data_ptr() == ptr  # a view of the bank's stack
        assert bank.stats["slot_writes"] - stats["slot_writes"] == 8  # one slot per added expert ...
        assert bank.stats["reallocations"] == stats["reallocations"]  # ... and no buffer rebuilt
        assert bank.stats["bytes_copied"] == stats["bytes_copied"]
        assert ctx.stack_copies == 0
        rep = placement_report(model, bank, trainable=new_trainable_expert(ctx, rank=2))
        assert rep["ok"] and rep["lora_dtype"] == ["float32"] and rep["bank_stacks"] == ["cpu"]
    finally:
        from lumoe_engine.model.multilora import unwrap_model

        unwrap_model(model)
    # the counter sees the copy a bank off the model's dtype costs (every layer, every bank change)
    odd = ExpertBank(None, dtype=torch.float64)
    ctx = wrap_model(model, odd, layers=[1])
    try:
        odd.add(random_expert("x", module_shapes(model, ctx.modules)))
        _routed_forward(model, ctx, 0)
        assert ctx.stack_copies == len(ctx.modules)
    finally:
        unwrap_model(model)


def test_growth_copies_are_amortised_and_bank_moves_once(micro):
    """Without a reservation, capacity grows x2: N adds copy fewer than 2 N slots' bytes in all; ``to`` moves the
    used slots once and bumps the version (the layers' views refresh)."""
    model, _ = micro
    bank = ExpertBank(None)
    shapes = {"m.q": (64, 64), "m.d": (128, 64)}
    for i in range(20):
        bank.add(random_expert(f"e{i}", shapes, rank=4, seed=i))
    slot = sum(4 * (h + n) * 4 for h, n in shapes.values())
    assert bank.stats["slot_writes"] == 20 and bank.stats["reallocations"] == int(math.log2(32))
    assert bank.stats["bytes_copied"] < 2 * 20 * slot
    v = bank.version
    bank.to(dtype=torch.float64)
    assert bank.stacked("m.q")[0].dtype == torch.float64 and bank.version == v + 1
    assert bank.slot_bytes() == sum(4 * (h + n) * 8 + 4 for h, n in shapes.values()) + 4


def test_lru_paging_writes_only_the_experts_that_change(tmp_path):
    shapes = {"m.q": (32, 32)}
    bank = ExpertBank(tmp_path / "bank", max_resident=2, durable=False)
    bank.add_many([random_expert(f"e{i}", shapes, seed=i) for i in range(4)])
    bank.ensure_resident(["e0", "e1"])
    writes = bank.stats["slot_writes"]
    slot_e1 = bank.slot_of(["e1"]).item()
    before = bank.stacked("m.q")[0][0, slot_e1].clone()
    bank.ensure_resident(["e1", "e2"])
    assert bank.stats["slot_writes"] - writes == 1  # only e2 came from disk
    assert torch.equal(bank.stacked("m.q")[0][0, bank.slot_of(["e1"]).item()], before)
    bank.ensure_resident(["e1", "e2"])
    assert bank.stats["slot_writes"] - writes == 1  # resident already: nothing moves


# ---------------------------------------------------------------------------------------------- trainable LoRA
def test_trainable_lora_is_fp32_master_over_a_bf16_base(micro):
    import copy

    model, _ = micro
    m = copy.deepcopy(model).to(torch.bfloat16)
    bank = ExpertBank(None, dtype=torch.bfloat16)
    ctx = wrap_model(m, bank, layers=[1])
    te = new_trainable_expert(ctx, rank=4, seed=0)
    assert {p.dtype for p in te.parameters()} == {torch.float32}
    for a, b in te.weights.values():
        b.data.normal_(0, 0.02)
    m.requires_grad_(False)
    with ctx.training(te):
        out = m.model.language_model(input_ids=torch.tensor([[5, 6, 7, 8]])).last_hidden_state
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = [p.grad for p in te.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads) and any(float(g.abs().sum()) > 0
                                                                                   for g in grads)
    ex = te.to_expert("x", dtype=torch.bfloat16)
    assert {t.dtype for pair in ex.weights.values() for t in pair} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------------ the gate
def test_principal_directions_from_the_gram_matrix_equal_the_scatter_matrix():
    torch.manual_seed(0)
    z = torch.randn(40, 600, dtype=torch.float64) @ torch.randn(600, 600, dtype=torch.float64) * 0.1
    k = 16
    gram = principal_directions(z, k)          # 2 N <= D: the N x N path
    zc = z - z.mean(0)
    _, vecs = torch.linalg.eigh(zc.t() @ zc)
    ref = vecs[:, -k:].flip(1)
    cos = (gram.double() * ref).sum(0).abs()   # same directions up to sign
    print(f"Gram vs scatter directions: min |cos| {float(cos.min()):.8f}")
    assert float(cos.min()) > 1 - 1e-6
    assert torch.allclose(gram.double().t() @ gram.double(), torch.eye(k, dtype=torch.float64), atol=1e-5)
    # rank-deficient rows (duplicates): the scatter matrix decides
    dup = torch.cat([z[:5]] * 8)
    assert principal_directions(dup, 16).shape == (600, 16)


def test_picture_dedupe_keeps_what_the_former_loop_kept():
    torch.manual_seed(1)
    base = torch.nn.functional.normalize(torch.randn(30, 64), dim=1)
    u = torch.cat([base, base[[3, 7, 7, 20]] + 1e-6, base[:2]])
    others = base[[25, 26]]

    def former(u, others=None):
        keep = []
        for i in range(len(u)):
            if keep and float((u[keep] @ u[i]).max()) >= Gate._SAME:
                continue
            if others is not None and len(others) and float((others @ u[i]).max()) >= Gate._SAME:
                continue
            keep.append(i)
        return keep

    u = torch.nn.functional.normalize(u, dim=1)
    assert Gate._distinct(u).tolist() == former(u) == list(range(30))
    assert Gate._distinct(u, others).tolist() == former(u, others)
    assert 25 not in Gate._distinct(u, others).tolist()
    assert gate_mod.Gate._distinct(u[:0]).tolist() == []


# ------------------------------------------------------------------------------------------ request-parallel
class _FakePipeline:
    def __init__(self):
        self.trained = []

    def train(self, request, use_deepspeed=None):
        assert use_deepspeed is False  # each rank trains alone
        self.trained.append(request.id)
        if request.id == "r2":
            raise ValueError("bad r2")
        return ("expert", request.id), {}


def test_wave_schedule_trains_each_pending_request_once_and_passes_failures():
    from lumoe_engine.data.streams import Request

    reqs = [Request(id=f"r{i}", forget=[], retain=[], entities=()) for i in range(5)]
    pipe = _FakePipeline()
    waves = WaveTrainer(pipe, reqs, rank=0, world=1, pending=lambda s: s != 1, errors=(ValueError,))
    for step in range(5):
        waves.ensure(step)
    assert waves.schedule == ["r0", "r2", "r3", "r4"] and pipe.trained == ["r0", "r2", "r3", "r4"]
    assert waves.take("r1") is None and waves.take("r0") == (("expert", "r0"), {})
    err = waves.take("r2")
    assert isinstance(err, ValueError) and "bad r2" in str(err)
    assert [w["requests"] for w in waves.waves] == [["r0"], ["r2"], ["r3"], ["r4"]]


# ------------------------------------------------------------------------------------------------------ on CUDA
@pytest.mark.gpu
def test_gpu_model_bank_gate_and_lora_on_the_rank_device(micro, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    model, processor = micro
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    q, _ = load_mod.load_model(tmp_path / "m", load_in_4bit=True)
    assert model_device(q) == torch.device("cuda", 0)
    from lumoe_engine.gate.config import GateConfig
    from lumoe_engine.model.placement import place_gate

    bank = ExpertBank(None, device=model_device(q), dtype=compute_dtype(q))
    ctx = wrap_model(q, bank, layers=[1])
    gate = place_gate(Gate.from_config(GateConfig(), q), q)
    bank.add(random_expert("e", module_shapes(q, ctx.modules)))
    rep = placement_report(q, bank, gate, new_trainable_expert(ctx, rank=2))
    assert rep["ok"], rep
    _routed_forward(q, ctx, 0)
    assert ctx.stack_copies == 0
