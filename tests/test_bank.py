"""Expert bank: stacked weights, residency (LRU over thousands of experts on disk), persistence, peft interop,
and bad input leaving the bank unchanged in memory and on disk.

Legend: E resident experts, C slot capacity, r rank, R max rank, H input features, N output features.
"""
import hashlib
import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lumoe_engine.model.bank import (
    Expert,
    ExpertBank,
    ExpertFileError,
    ExpertNotResidentError,
    UnknownExpertError,
    lora_bytes,
    validate_expert_id,
)

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
O = "model.layers.1.self_attn.o_proj"
SHAPES = {Q: (16, 16), V: (16, 8), O: (16, 16)}  # (H, N)


def make_expert(i: int, rank: int = 2, modules=(Q, V), alpha: float | None = None, dtype=torch.float32,
                shapes=SHAPES) -> Expert:
    g = torch.Generator().manual_seed(1000 + i)
    weights = {}
    for m in modules:
        h, n = shapes[m]
        weights[m] = (torch.randn(rank, h, generator=g).to(dtype), torch.randn(n, rank, generator=g).to(dtype))
    return Expert(id=f"req-{i:05d}", rank=rank, alpha=float(2 * rank) if alpha is None else alpha, weights=weights,
                  metadata={"request": f"r{i}", "method": "npo", "loss": 0.25 * i})


def assert_slot_holds(bank: ExpertBank, slot: int, ex: Expert) -> None:
    """The stacked buffers at ``slot`` hold exactly ``ex`` (zero-padded to R, rank 0 on modules it lacks)."""
    for m in bank.modules:
        a, b, ranks, scales = bank.stacked(m)
        assert scales[slot].item() == pytest.approx(ex.scale)
        if m in ex.weights:
            ea, eb = ex.weights[m]
            assert ranks[slot].item() == ex.rank
            assert torch.equal(a[0, slot, :ex.rank], ea.to(bank.dtype)), (m, slot)
            assert torch.equal(b[slot, :, :ex.rank], eb.to(bank.dtype)), (m, slot)
        else:
            assert ranks[slot].item() == 0
        assert not a[0, slot, ranks[slot]:].any() and not b[slot, :, ranks[slot]:].any(), "padding must be zero"


def disk_snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mem_snapshot(bank: ExpertBank):
    stacks = {m: tuple(t.clone() for t in bank.stacked(m)) for m in bank.modules}
    return dict(ids=bank.ids, version=bank.version, resident=bank.resident_ids, capacity=bank.capacity,
                rmax=bank.max_rank, infos=bank.list(), lru=list(bank._lru), stacks=stacks)


def assert_mem_equal(before, after) -> None:
    assert before.keys() == after.keys()
    for k in before:
        if k == "stacks":
            assert before[k].keys() == after[k].keys()
            for m in before[k]:
                for x, y in zip(before[k][m], after[k][m]):
                    assert x.dtype == y.dtype and torch.equal(x, y), m
        else:
            assert before[k] == after[k], k


@pytest.fixture
def bank_dir(tmp_path):
    return tmp_path / "bank"


# ------------------------------------------------------------------------------------------------------- ids, add

@pytest.mark.parametrize("good", ["a", "req-00001", "A.b_c-9", "x" * 128, "..."])
def test_valid_ids(good):
    assert validate_expert_id(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\\b", "../x", "x" * 129, "a b", "é", None, 5])
def test_invalid_ids(bad):
    with pytest.raises(ValueError, match="A-Z, a-z, 0-9"):
        validate_expert_id(bad)


def test_add_stacks_variable_ranks_and_modules():
    bank = ExpertBank(None)
    e0, e1, e2 = make_expert(0, rank=2), make_expert(1, rank=4, modules=(Q, O)), make_expert(2, rank=1, modules=(V,))
    versions = [bank.version]
    for ex in (e0, e1, e2):
        bank.add(ex)
        versions.append(bank.version)
    assert versions == sorted(set(versions)), "version must grow on every add"
    assert bank.ids == ("req-00000", "req-00001", "req-00002") and len(bank) == 3
    assert "req-00001" in bank and "nope" not in bank and bank.index("req-00002") == 2
    assert bank.max_rank == 4 and set(bank.modules) == {Q, V, O}
    for slot, ex in enumerate((e0, e1, e2)):
        assert_slot_holds(bank, slot, ex)
    a, b, ranks, scales = bank.stacked(O)
    assert a.shape == (1, 3, 4, 16) and b.shape == (3, 16, 4) and ranks.dtype == torch.int32
    assert scales.dtype == torch.float32 and ranks.tolist() == [0, 4, 0]
    assert a.is_contiguous() and b.is_contiguous()
    # routing ids (bank indices) and string ids both translate; -1 / None stay -1
    ids = torch.tensor([[0, -1], [2, 1]], dtype=torch.int32)
    assert bank.slot_of(ids).tolist() == [[0, -1], [2, 1]]
    assert bank.slot_of(["req-00002", None, "req-00000"]).tolist() == [2, -1, 0]
    assert bank.ensure_resident(["req-00001"]).tolist() == [1]
    got = bank.get("req-00001")
    assert got.rank == 4 and got.scale == e1.scale and torch.equal(got.weights[O][0], e1.weights[O][0])
    with pytest.raises(KeyError, match="not a target"):
        bank.stacked("model.layers.9.mlp.up_proj")


def test_rank_growth_repads_earlier_experts():
    bank = ExpertBank(None)
    e0 = make_expert(0, rank=2)
    bank.add(e0)
    assert bank.stacked(Q)[0].shape[2] == 2
    e1 = make_expert(1, rank=7)
    bank.add(e1)
    a, b, ranks, _ = bank.stacked(Q)
    assert a.shape[2] == 7 and b.shape[2] == 7 and ranks.tolist() == [2, 7]
    assert_slot_holds(bank, 0, e0)
    assert_slot_holds(bank, 1, e1)


def test_incremental_growth_and_resident_bytes():
    """Adds write into preallocated slots (no re-stack); capacity grows x2 up to the chunk, then by the chunk;
    resident bytes per added expert equal the expert's LoRA bytes plus its rank/scale entries."""
    chunk = 16
    bank = ExpertBank(None, slot_chunk=chunk)
    capacities, ptr_changes, last_ptr = [], 0, None
    per_expert = None
    bytes_at = {}
    for i in range(80):
        ex = make_expert(i, rank=4)
        bank.add(ex)
        per_expert = lora_bytes(ex, bank.dtype) + 4 * len(bank.modules) + 4  # + ranks per module + scale
        ptr = bank.stacked(Q)[0].data_ptr()
        ptr_changes += ptr != last_ptr
        last_ptr = ptr
        capacities.append(bank.capacity)
        bytes_at[len(bank)] = bank.resident_bytes()
        if len(bank) >= chunk:
            assert bank.capacity - len(bank) < chunk
    assert sorted(set(capacities)) == [1, 2, 4, 8, 16, 32, 48, 64, 80]
    assert ptr_changes == len(set(capacities)), "buffers are reallocated only when the capacity grows"
    # between two full capacities, growth per expert is exactly the expert's own bytes (no doubling waste)
    assert (bytes_at[80] - bytes_at[64]) / 16 == per_expert
    assert bytes_at[80] == 80 * per_expert
    assert lora_bytes(make_expert(0, rank=4)) == 4 * (4 * 16 + 16 * 4 + 4 * 16 + 8 * 4)
    assert lora_bytes(make_expert(0, rank=4), torch.bfloat16) == lora_bytes(make_expert(0, rank=4)) // 2


def test_remove_shifts_slots_and_updates_disk(bank_dir):
    bank = ExpertBank(bank_dir)
    experts = [make_expert(0), make_expert(1, modules=(O,)), make_expert(2), make_expert(3)]
    for ex in experts:
        bank.add(ex)
    assert (bank_dir / "experts" / "req-00001.safetensors").exists()
    v = bank.version
    bank.remove("req-00001")
    assert bank.version > v and bank.ids == ("req-00000", "req-00002", "req-00003")
    assert O not in bank.modules, "a module no expert uses any more is dropped"
    for slot, ex in enumerate([experts[0], experts[2], experts[3]]):
        assert bank.index(ex.id) == slot and bank.slot_of([ex.id]).item() == slot
        assert_slot_holds(bank, slot, ex)
    assert not (bank_dir / "experts" / "req-00001.safetensors").exists()
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    assert [e["id"] for e in manifest["experts"]] == list(bank.ids)
    reopened = ExpertBank.open(bank_dir)
    assert reopened.ids == bank.ids
    for slot, ex in enumerate([experts[0], experts[2], experts[3]]):
        assert_slot_holds(reopened, slot, ex)


# ---------------------------------------------------------------------------------------------------- persistence

def test_files_manifest_and_reopen(bank_dir):
    bank = ExpertBank(bank_dir)
    e0, e1 = make_expert(0, rank=3), make_expert(1, rank=5, dtype=torch.float16, modules=(Q, V, O))
    bank.add(e0)
    bank.add(e1)
    files = sorted(p.name for p in (bank_dir / "experts").iterdir())
    assert files == ["req-00000.safetensors", "req-00001.safetensors"], "no temporary files left behind"
    assert sorted(p.name for p in bank_dir.iterdir()) == ["experts", "manifest.json"]
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    assert manifest["format"] == "lumoe-expert-bank" and manifest["version"] == 1
    for entry, ex in zip(manifest["experts"], (e0, e1)):
        path = bank_dir / "experts" / entry["file"]
        assert entry["id"] == ex.id and entry["rank"] == ex.rank and entry["alpha"] == ex.alpha
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["bytes"] == path.stat().st_size and entry["metadata"] == ex.metadata
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            assert meta["id"] == ex.id and meta["rank"] == str(ex.rank) and float(meta["alpha"]) == ex.alpha
            assert json.loads(meta["metadata"]) == ex.metadata
            assert set(f.keys()) == {f"{m}.lora_{p}.weight" for m in ex.weights for p in "AB"}
            assert torch.equal(f.get_tensor(f"{Q}.lora_A.weight"), ex.weights[Q][0])
    reopened = ExpertBank.open(bank_dir, verify=True)
    assert reopened.ids == bank.ids and reopened.version > 0 and reopened.max_rank == 5
    for slot, ex in enumerate((e0, e1)):
        assert_slot_holds(reopened, slot, ex)
    got = reopened.get(e1.id)
    assert got.metadata == e1.metadata and got.alpha == e1.alpha
    for m, (a, b) in e1.weights.items():  # files keep the dtype the expert was added with
        assert got.weights[m][0].dtype == torch.float16 and torch.equal(got.weights[m][0], a)
        assert torch.equal(got.weights[m][1], b)


def test_expert_files_are_byte_identical_across_processes(tmp_path):
    """The same expert written by two processes gives the same bytes (safetensors orders its header metadata by a
    per-process hash; the bank writes the header with sorted keys), so a resumed run and an uninterrupted one hold
    byte-equal expert files and manifest hashes."""
    import subprocess
    import sys
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from test_bank import make_expert, Q, V, O; "
            "from lumoe_engine.model.bank import ExpertBank; "
            "ExpertBank(sys.argv[1]).add(make_expert(7, rank=3, modules=(Q, V, O)))")
    digests = []
    for run in range(3):
        root = tmp_path / f"bank{run}"
        subprocess.run([sys.executable, "-c", code, str(root), str(Path(__file__).parent)], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": str(run)})
        blob = (root / "experts" / "req-00007.safetensors").read_bytes()
        digests.append(hashlib.sha256(blob).hexdigest())
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + n])
        assert list(header["__metadata__"]) == sorted(header["__metadata__"]), "header metadata keys sorted"
    assert len(set(digests)) == 1, digests
    with safe_open(str(root / "experts" / "req-00007.safetensors"), "pt") as f:
        assert f.metadata()["id"] == "req-00007" and torch.equal(f.get_tensor(f"{Q}.lora_A.weight"),
                                                                 make_expert(7, rank=3, modules=(Q, V, O)).weights[Q][0])


def test_create_and_open_rules(bank_dir):
    with pytest.raises(FileNotFoundError, match="holds no expert bank"):
        ExpertBank.open(bank_dir)
    bank = ExpertBank.open(bank_dir, create=True)
    bank.add(make_expert(0))
    with pytest.raises(FileExistsError, match="already holds an expert bank"):
        ExpertBank(bank_dir)
    assert ExpertBank.open(bank_dir, create=True).ids == ("req-00000",)
    with pytest.raises(ValueError, match="needs a root"):
        ExpertBank(None, max_resident=4)


# ------------------------------------------------------------------------------------------------------ residency

def test_lru_eviction_order(bank_dir):
    bank = ExpertBank(bank_dir, max_resident=3)
    experts = [make_expert(i) for i in range(6)]
    for ex in experts:
        bank.add(ex)  # adds are resident, evicting the least recently used
    assert set(bank.resident_ids) == {"req-00003", "req-00004", "req-00005"}
    bank.ensure_resident(["req-00003"])  # 3 is now the most recent; 4 the least
    v = bank.version
    slots = bank.ensure_resident(["req-00000"])
    assert bank.version == v + 1
    assert set(bank.resident_ids) == {"req-00003", "req-00005", "req-00000"}
    assert_slot_holds(bank, slots.item(), experts[0])
    # a hit changes no weights: no version bump
    bank.ensure_resident(["req-00005", "req-00000"])
    assert bank.version == v + 1
    # the requested set is never evicted, even if it is the least recent
    slots = bank.ensure_resident(["req-00003", "req-00001", "req-00002"])
    assert set(bank.resident_ids) == {"req-00003", "req-00001", "req-00002"}
    for s, i in zip(slots.tolist(), (3, 1, 2)):
        assert_slot_holds(bank, s, experts[i])
    with pytest.raises(ExpertNotResidentError, match="ensure_resident"):
        bank.slot_of(["req-00004"])
    assert bank.slot_of(torch.tensor([4, 1, -1]), check=False)[[0, 2]].tolist() == [-1, -1]
    with pytest.raises(ExpertNotResidentError):
        bank.slot_of(torch.tensor([4, -1]))


def test_thousands_of_experts_on_disk(bank_dir):
    n, k = 2000, 16
    shapes = {"a.q": (8, 8), "a.v": (8, 4)}
    rng = random.Random(0)
    ranks = [rng.choice([1, 2, 3]) for _ in range(n)]
    experts = [make_expert(i, rank=ranks[i], modules=("a.q", "a.v"), shapes=shapes) for i in range(n)]
    ExpertBank(bank_dir, durable=False).add_many(experts)
    assert len(list((bank_dir / "experts").iterdir())) == n
    bank = ExpertBank.open(bank_dir, max_resident=k)
    assert len(bank) == n and bank.num_resident == 0 and bank.max_rank == 3
    for step in range(60):
        picks = rng.sample(range(n), rng.randint(1, k))
        ids = torch.tensor(picks + [-1], dtype=torch.int32)  # routing ids = bank indices
        slots = bank.ensure_resident(ids)
        assert slots[-1].item() == -1 and len(set(slots[:-1].tolist())) == len(picks)
        assert bank.num_resident <= k and bank.capacity <= k
        for i, s in zip(picks, slots[:-1].tolist()):
            assert bank.resident_ids[s] == experts[i].id
            assert_slot_holds(bank, s, experts[i])
    a, b, r, sc = bank.stacked("a.q")
    assert a.shape == (1, k, 3, 8) and b.shape == (k, 8, 3) and r.shape == (k,) and sc.shape == (k,)
    with pytest.raises(ValueError, match="max_resident is 16"):
        bank.ensure_resident(list(bank.ids[:k + 1]))


# --------------------------------------------------------------------------------------- bad input: nothing changes

@pytest.fixture
def filled(bank_dir):
    bank = ExpertBank(bank_dir, max_resident=3)
    for i in range(5):
        bank.add(make_expert(i, rank=2 + i % 2))
    bank.ensure_resident(["req-00000"])
    return bank


def _unchanged(bank, root, fn, exc, match):
    disk, mem = disk_snapshot(root), mem_snapshot(bank)
    with pytest.raises(exc, match=match):
        fn()
    assert disk_snapshot(root) == disk, "disk must be byte-identical after a refused call"
    assert_mem_equal(mem, mem_snapshot(bank))


def test_unknown_ids_change_nothing(filled, bank_dir):
    for fn in (lambda: filled.remove("ghost"), lambda: filled.get("ghost"), lambda: filled.index("ghost"),
               lambda: filled.ensure_resident(["req-00001", "ghost"]), lambda: filled.slot_of(["ghost"]),
               lambda: filled.export_peft("ghost", bank_dir.parent / "out")):
        _unchanged(filled, bank_dir, fn, UnknownExpertError, "unknown expert id 'ghost'")
    _unchanged(filled, bank_dir, lambda: filled.ensure_resident(torch.tensor([0, 5])), KeyError, "out of range")
    assert isinstance(UnknownExpertError("x"), KeyError) and str(UnknownExpertError("x y")) == "x y"


def test_refused_adds_change_nothing(filled, bank_dir):
    dup = make_expert(2)
    _unchanged(filled, bank_dir, lambda: filled.add(dup), ValueError, "already in the bank")
    wrong = make_expert(9, shapes={**SHAPES, Q: (16, 12)})
    _unchanged(filled, bank_dir, lambda: filled.add(wrong), ValueError, r"module '.*q_proj'.*\(16, 12\).*\(16, 16\)")
    for bad_value in (float("nan"), float("inf")):
        ex = make_expert(10)
        ex.weights[V][1][3, 1] = bad_value
        _unchanged(filled, bank_dir, lambda: filled.add(ex), ValueError, "NaN or inf")
    for bad_id in ("../escape", "a/b", "..", "."):
        ex = make_expert(11)
        ex.id = bad_id
        _unchanged(filled, bank_dir, lambda: filled.add(ex), ValueError, "not allowed")
    assert not (bank_dir.parent / "escape.safetensors").exists()
    bad_rank = make_expert(12)
    bad_rank.rank = 3
    _unchanged(filled, bank_dir, lambda: filled.add(bad_rank), ValueError, r"A has shape \(2, 16\)")
    # all-or-none: a bad expert at the end of a batch stores none of the batch
    batch = [make_expert(20), make_expert(21), make_expert(1)]
    _unchanged(filled, bank_dir, lambda: filled.add_many(batch), ValueError, "already in the bank")
    _unchanged(filled, bank_dir, lambda: filled.ensure_resident(list(filled.ids[:4])), ValueError,
               "4 distinct experts")


def test_corrupt_file_on_demand_load(filled, bank_dir):
    path = bank_dir / "experts" / "req-00001.safetensors"
    assert not filled.is_resident("req-00001")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, one weight byte flipped
    path.write_bytes(bytes(data))
    _unchanged(filled, bank_dir, lambda: filled.ensure_resident(["req-00001", "req-00002"]), ExpertFileError,
               "req-00001.safetensors is corrupt")
    with pytest.raises(ExpertFileError, match="req-00001.safetensors"):
        filled.verify()
    # the bank stays usable for the other experts
    slots = filled.ensure_resident(["req-00002", "req-00000"])
    assert_slot_holds(filled, slots[0].item(), make_expert(2, rank=2))
    # eager open (no residency limit) reads every file and names the bad one
    with pytest.raises(ExpertFileError, match="req-00001.safetensors is corrupt"):
        ExpertBank.open(bank_dir)
    # lazy open succeeds (sizes match); the bad file is found when it is loaded
    lazy = ExpertBank.open(bank_dir, max_resident=2)
    with pytest.raises(ExpertFileError, match="corrupt"):
        lazy.ensure_resident(["req-00001"])
    with pytest.raises(ExpertFileError, match="req-00001.safetensors"):
        ExpertBank.open(bank_dir, max_resident=2, verify=True)


def test_truncated_and_missing_files_on_open(filled, bank_dir):
    path = bank_dir / "experts" / "req-00001.safetensors"
    original = path.read_bytes()
    path.write_bytes(original[:100])
    disk = disk_snapshot(bank_dir)
    with pytest.raises(ExpertFileError, match=r"req-00001.safetensors has 100 bytes"):
        ExpertBank.open(bank_dir, max_resident=2)
    _unchanged(filled, bank_dir, lambda: filled.ensure_resident(["req-00001"]), ExpertFileError, "100 bytes")
    path.unlink()
    with pytest.raises(ExpertFileError, match=r"req-00001.safetensors named by .*manifest.json is missing"):
        ExpertBank.open(bank_dir, max_resident=2)
    assert disk_snapshot(bank_dir) == {k: v for k, v in disk.items() if k != "experts/req-00001.safetensors"}


def test_not_safetensors_with_matching_manifest(bank_dir):
    bank = ExpertBank(bank_dir)
    bank.add(make_expert(0))
    path = bank_dir / "experts" / "req-00000.safetensors"
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 32
    path.write_bytes(garbage)
    doc = json.loads((bank_dir / "manifest.json").read_text())
    doc["experts"][0].update(sha256=hashlib.sha256(garbage).hexdigest(), bytes=len(garbage))
    (bank_dir / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ExpertFileError, match="req-00000.safetensors"):
        ExpertBank.open(bank_dir)


@pytest.mark.parametrize("field,value,match", [
    ("id", "../evil", "not allowed"),
    ("file", "../../evil.safetensors", "must be 'req-00000.safetensors'"),
    ("rank", 0, "rank must be an int"),
])
def test_manifest_that_would_escape_or_lie(bank_dir, field, value, match):
    bank = ExpertBank(bank_dir)
    bank.add(make_expert(0))
    doc = json.loads((bank_dir / "manifest.json").read_text())
    doc["experts"][0][field] = value
    (bank_dir / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        ExpertBank.open(bank_dir)


# ------------------------------------------------------------------------------------------------------------ peft

@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()

    model = build()
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if n.endswith(("q_proj", "v_proj", "o_proj"))}
    return build, shapes


def _peft_delta(peft_model, name: str) -> torch.Tensor:
    layer = peft_model.base_model.model.get_submodule(name)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (b @ a) * layer.scaling["default"]


def test_export_peft_loads_in_peft(tmp_path, tiny_llama):
    peft = pytest.importorskip("peft")
    build, shapes = tiny_llama
    q0, v1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    g = torch.Generator().manual_seed(3)
    ex = Expert("forget-alice", 4, 12.0, {m: (torch.randn(4, shapes[m][0], generator=g),
                                               torch.randn(shapes[m][1], 4, generator=g)) for m in (q0, v1)},
                {"request": "alice"})
    bank = ExpertBank(tmp_path / "bank")
    bank.add(ex)
    out = bank.export_peft(ex.id, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 12
    assert cfg["target_modules"] == [q0, v1] and cfg["task_type"] is None  # exact dotted names
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{m}.lora_{p}.weight" for m in (q0, v1) for p in "AB"}
    pm = peft.PeftModel.from_pretrained(build(), str(out))
    for m in (q0, v1):
        a, b = ex.weights[m]
        torch.testing.assert_close(_peft_delta(pm, m), (b @ a) * ex.scale, rtol=1e-6, atol=1e-6)
        layer = pm.base_model.model.get_submodule(m)
        x = torch.randn(3, shapes[m][0], generator=g)
        torch.testing.assert_close(layer(x) - layer.base_layer(x), (x @ a.T) @ b.T * 3.0, rtol=1e-5, atol=1e-5)
    # peft wraps the expert's own modules and nothing else (q_proj of layer 1 stays the plain Linear)
    wrapped = sorted(n for n, mod in pm.base_model.model.named_modules() if hasattr(mod, "lora_A"))
    assert wrapped == [q0, v1]
    assert type(pm.base_model.model.get_submodule("model.layers.1.self_attn.q_proj")) is torch.nn.Linear
    # short names on request: peft also wraps the other modules so named, each with a zero delta
    out2 = bank.export_peft(ex.id, tmp_path / "adapter_short", target_modules=["q_proj", "v_proj"])
    assert json.loads((out2 / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about the wrapped modules' missing keys
        pm2 = peft.PeftModel.from_pretrained(build(), str(out2))
    assert not _peft_delta(pm2, "model.layers.1.self_attn.q_proj").any()
    torch.testing.assert_close(_peft_delta(pm2, q0), _peft_delta(pm, q0))
    with pytest.raises(ValueError, match="do not cover"):
        bank.export_peft(ex.id, tmp_path / "adapter2", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="do not cover"):
        bank.export_peft(ex.id, tmp_path / "adapter3", target_modules=["_proj"])  # a name ends at a dot


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_saved_adapter(tmp_path, tiny_llama, rslora):
    peft = pytest.importorskip("peft")
    build, shapes = tiny_llama
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                      use_rslora=rslora))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path / "adapter"))
    bank = ExpertBank(tmp_path / "bank")
    ex = bank.import_peft(tmp_path / "adapter", "imported", module_shapes=shapes, metadata={"request": "bob"})
    targets = sorted(n for n in shapes if n.endswith(("q_proj", "v_proj")))
    assert sorted(ex.weights) == targets and bank.ids == ("imported",)
    assert ex.metadata["request"] == "bob" and ex.metadata["source"] == "peft"
    for m in targets:
        layer = pm.base_model.model.get_submodule(m)
        assert torch.equal(bank.get("imported").weights[m][0], layer.lora_A["default"].weight.detach())
        assert torch.equal(bank.get("imported").weights[m][1], layer.lora_B["default"].weight.detach())
        assert bank.get("imported").scale == pytest.approx(layer.scaling["default"])
        a, b, ranks, scales = bank.stacked(m)
        torch.testing.assert_close((b[0] @ a[0, 0]) * scales[0], _peft_delta(pm, m).detach(), rtol=1e-5, atol=1e-5)


def test_import_peft_refusals_change_nothing(tmp_path, tiny_llama):
    peft = pytest.importorskip("peft")
    build, shapes = tiny_llama
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    adapter = tmp_path / "adapter"
    pm.save_pretrained(str(adapter))
    root = tmp_path / "bank"
    bank = ExpertBank(root)
    bank.add(make_expert(0, modules=(O,), shapes={O: shapes[O]}))
    q0 = "model.layers.0.self_attn.q_proj"
    wrong = {**shapes, q0: (16, 32)}
    _unchanged(bank, root, lambda: bank.import_peft(adapter, "x", module_shapes=wrong), ValueError,
               r"module 'model.layers.0.self_attn.q_proj'.*\(16, 16\).*\(16, 32\)")
    _unchanged(bank, root, lambda: bank.import_peft(adapter, "x", module_shapes={O: shapes[O]}), ValueError,
               "not among the model's target modules")
    _unchanged(bank, root, lambda: bank.import_peft(adapter, "req-00000"), ValueError, "already in the bank")
    _unchanged(bank, root, lambda: bank.import_peft(adapter, "../x"), ValueError, "not allowed")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    _unchanged(bank, root, lambda: bank.import_peft(adapter, "x"), ValueError, r"do not match r = 8")
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    _unchanged(bank, root, lambda: bank.import_peft(adapter, "x"), ValueError, "use_dora")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    state = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(state, adapter / "adapter_model.bin")
    _unchanged(bank, root, lambda: bank.import_peft(adapter, "x"), ValueError, "convert to safetensors")
    (adapter / "adapter_model.bin").unlink()
    save_file({**state, "base_model.model.lm_head.weight": torch.zeros(2, 2)},
              str(adapter / "adapter_model.safetensors"))
    _unchanged(bank, root, lambda: bank.import_peft(adapter, "x"), ValueError, "not a LoRA A/B weight")
