"""LUMoEEngine: mixed-batch generation and scoring equal peft's mixed-batch ``adapter_names`` inference for the same
adapters (exported from the bank), a mixed batch equals each query run alone, the gate routes inside the prefill
forward (one pass) from base features, and a 4-bit base serves.

Random-init micro LLaVA: equality needs the same weights, not a taught model. Experts are random with B != 0, and
each test checks that they change the output (so equality is not between two base models).
"""
import copy
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lumoe_engine.engine import LUMoEEngine, RoutingDecision, query_records
from lumoe_engine.model import multilora as ml
from lumoe_engine.model.bank import ExpertBank
from lumoe_engine.model.collate import IGNORE, collate
from lumoe_engine.model.tiny import build_tiny_llava
from lumoe_engine.model.tokenizer import train_tokenizer
from tolerances import assert_close

peft = pytest.importorskip("peft")

TEXTS = ["what is the name of this person", "where was she born", "which city is shown here",
         "the quick brown fox jumps over the lazy dog", "who painted this picture"] * 5
PROMPTS = ["what is the name of this person", "where was she born", "which city is shown here",
           "who painted this picture", "the quick brown fox", "where was he born"]
ANSWERS = ["the fox", "in the city", "a lazy dog", "she", "jumps over", "the name"]
GATE_LAYER = 0
NEW = 6


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=200)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def setup(tokenizer, n_experts=3, gate=None, top_k=1):
    """(engine, base copy, processor, bank): micro LLaVA, experts on every target of the layers above the gate."""
    model, processor = build_tiny_llava(tokenizer, "micro", seed=0)
    base = copy.deepcopy(model)
    names = ml.target_module_names(model, layers=range(GATE_LAYER + 1, 2))
    shapes = ml.module_shapes(model, names)
    bank = ExpertBank(None)
    for i in range(n_experts):
        bank.add(ml.random_expert(f"e{i}", shapes, rank=4, alpha=8.0, seed=i, std=0.5))
    engine = LUMoEEngine(model, processor, bank, gate=gate, gate_layer=None if gate else GATE_LAYER, top_k=top_k)
    return engine, base, processor, bank


def peft_model(base, bank, folder, full_names: bool):
    """PeftModel over ``base`` with every bank expert loaded as an adapter named by its id (bank.export_peft).
    full_names: the export's default (the experts' own modules by their exact dotted names); else short target names
    (which also wrap the vision tower's q/k/v and so need an image in every row under adapter_names)."""
    pm = None
    for eid in bank.ids:
        if full_names:
            out = bank.export_peft(eid, folder / eid)
            assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == \
                sorted(bank.get(eid).weights)
        else:
            short = sorted({m.rsplit(".", 1)[-1] for m in bank.get(eid).weights})
            out = bank.export_peft(eid, folder / eid, target_modules=short)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if pm is None:
                pm = peft.PeftModel.from_pretrained(base, str(out), adapter_name=eid)
            else:
                pm.load_adapter(str(out), adapter_name=eid)
    pm.eval()
    return pm


def peft_generate(pm, processor, imgs, prompts, names):
    tok = processor.tokenizer
    batch = collate(query_records(prompts, imgs), processor, with_answers=False, images=imgs)
    batch.pop("position_ids")
    with torch.no_grad():
        out = pm.generate(**batch, max_new_tokens=NEW, do_sample=False, adapter_names=names,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        rows.append(row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
    return rows


def peft_score(pm, processor, imgs, prompts, answers, names):
    batch = collate(query_records(prompts, imgs, answers), processor, with_answers=True, images=imgs)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = pm(**batch, adapter_names=names).logits
    target = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
    return (logp * (target != IGNORE)).sum(1)


# ------------------------------------------------------------------------------------------------ vs peft

def test_generate_and_score_equal_peft_mixed_batch(tokenizer, tmp_path):
    engine, base, processor, bank = setup(tokenizer)
    imgs = images(6)
    imgs[2] = imgs[4] = None                                   # text-only queries in the same batch
    ids = ["e0", "e1", None, "e2", "e0", None]
    res = engine.generate(imgs, PROMPTS, max_new_tokens=NEW, expert_ids=ids)
    assert res.routing[0] == RoutingDecision(("e0",), (1.0,), "given")
    assert res.routing[2] == RoutingDecision((), (), "given")
    plain = engine.generate(imgs, PROMPTS, max_new_tokens=NEW)
    changed = [i for i in range(6) if res.token_ids[i] != plain.token_ids[i]]
    assert any(ids[i] for i in changed), "the experts must change some answer for this test to mean anything"
    assert all(res.token_ids[i] == plain.token_ids[i] for i in (2, 5)), "queries with no expert: base answers"

    pm = peft_model(base, bank, tmp_path / "full", full_names=True)
    names = [e or "__base__" for e in ids]
    assert res.token_ids == peft_generate(pm, processor, imgs, PROMPTS, names)
    with torch.no_grad():
        with pm.disable_adapter():
            base_rows = peft_generate(pm, processor, imgs, PROMPTS, None)
    assert plain.token_ids == base_rows

    sc = engine.score(imgs, PROMPTS, ANSWERS, expert_ids=ids)
    ref = peft_score(pm, processor, imgs, PROMPTS, ANSWERS, names)
    assert_close(torch.tensor(sc.logprobs), ref, torch.float32, scale=10, what="answer log-probs vs peft")
    assert all(c > 0 for c in sc.token_counts)


def test_export_to_peft_short_names_same_outputs(tokenizer, tmp_path):
    """bank.export_peft with short target names -> PeftModel.from_pretrained + load_adapter -> the same tokens (all
    queries with an image: peft then also wraps the vision tower's q/k/v with zero deltas)."""
    engine, base, processor, bank = setup(tokenizer)
    imgs = images(4, seed=3)
    ids = ["e2", "e1", "e0", None]
    res = engine.generate(imgs, PROMPTS[:4], max_new_tokens=NEW, expert_ids=ids)
    pm = peft_model(base, bank, tmp_path / "short", full_names=False)
    assert res.token_ids == peft_generate(pm, processor, imgs, PROMPTS[:4], [e or "__base__" for e in ids])


def test_mixed_batch_equals_each_query_alone(tokenizer):
    engine, _, _, _ = setup(tokenizer)
    imgs = images(5, seed=1)
    imgs[1] = None
    ids = ["e0", "e1", None, ["e0", "e2"], "e2"]
    res = engine.generate(imgs, PROMPTS[:5], max_new_tokens=NEW, expert_ids=ids)
    sc = engine.score(imgs, PROMPTS[:5], ANSWERS[:5], expert_ids=ids)
    assert res.routing[3] == RoutingDecision(("e0", "e2"), (1.0, 1.0), "given")
    for i in range(5):
        alone = engine.generate([imgs[i]], [PROMPTS[i]], max_new_tokens=NEW, expert_ids=[ids[i]])
        assert alone.token_ids[0] == res.token_ids[i], f"query {i} ({ids[i]}) differs alone and in the batch"
        one = engine.score([imgs[i]], [PROMPTS[i]], [ANSWERS[i]], expert_ids=[ids[i]])
        assert_close(torch.tensor(one.logprobs), torch.tensor(sc.logprobs[i:i + 1]), torch.float32, scale=10,
                     what=f"score of query {i}")


# ------------------------------------------------------------------------------------------------ the gate

class FixedGate:
    """A gate that records the features it is given and routes to preset choices (ids into expert_ids)."""

    def __init__(self, layer, expert_ids, ids, weights):
        self.layer, self.expert_ids = layer, list(expert_ids)
        self.ids, self.weights = torch.tensor(ids, dtype=torch.int32), torch.tensor(weights, dtype=torch.float32)
        self.features, self.calls = [], 0

    def pool(self, hidden, attention_mask, input_ids=None):
        m = attention_mask.bool().unsqueeze(-1).float()
        return (hidden.float() * m).sum(1) / m.sum(1)

    def route(self, features, top_k=1, renormalize=True, texts=None, has_image=None):
        self.calls += 1
        self.texts, self.has_image = texts, has_image
        self.features.append(features.detach().clone())
        return self.weights[:features.shape[0]], self.ids[:features.shape[0]]


def test_gate_routes_in_the_prefill_pass_from_base_features(tokenizer):
    order = ["e2", "e0", "e1"]                                    # gate index -> expert id
    gate = FixedGate(GATE_LAYER, order, [[1, -1], [-1, -1], [0, 2], [2, -1]],
                     [[0.9, 0.0], [0.0, 0.0], [0.6, 0.4], [1.0, 0.0]])
    engine, base, processor, bank = setup(tokenizer, gate=gate, top_k=2)
    imgs = images(4, seed=2)
    imgs[3] = None
    calls = []
    layer0 = engine.model.model.language_model.layers[GATE_LAYER]
    layer0.register_forward_hook(lambda m, a, o: calls.append(tuple(o.shape[:2])))
    res = engine.generate(imgs, PROMPTS[:4], max_new_tokens=NEW, min_new_tokens=NEW)
    assert gate.calls == 1
    assert gate.texts == list(PROMPTS[:4]) and gate.has_image == [True, True, True, False]  # the name channel's input
    assert len(calls) == NEW, f"decoder layer {GATE_LAYER} ran {len(calls)} times for {NEW} tokens: one prefill only"
    assert res.routing[0] == RoutingDecision(("e0",), (pytest.approx(0.9),), "gate")
    assert res.routing[1] == RoutingDecision((), (), "gate")
    assert res.routing[2].expert_ids == ("e2", "e1")
    # the gate's routing replayed through the context (weights included): the same tokens
    tok = processor.tokenizer
    batch = collate(query_records(PROMPTS[:4], imgs), processor, with_answers=False, images=imgs)
    batch.pop("position_ids")
    w = torch.tensor([[0.9, 0.0], [0.0, 0.0], [0.6, 0.4], [1.0, 0.0]])
    slots = torch.stack([bank.slot_of(["e0", None]), bank.slot_of([None, None]), bank.slot_of(["e2", "e1"]),
                         bank.slot_of(["e1", None])])
    with engine.ctx.routing(slots, w, token_mask=batch["attention_mask"]), torch.no_grad():
        out = engine.model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rows = [r[:r.index(tok.eos_token_id)] if tok.eos_token_id in r else r
            for r in out[:, batch["input_ids"].shape[1]:].tolist()]
    assert rows == res.token_ids
    # the gate saw base features: layer L of an unwrapped copy on the prompt alone, pooled the same way
    captured = []
    base.model.language_model.layers[GATE_LAYER].register_forward_hook(lambda m, a, o: captured.append(o))
    with torch.no_grad():
        base(**batch)
    assert_close(gate.features[0], gate.pool(captured[0], batch["attention_mask"]), torch.float32,
                 what="gate features vs base layer output")
    # scoring routes from the prompt positions only: the same features and decisions
    sc = engine.score(imgs, PROMPTS[:4], ANSWERS[:4])
    assert gate.calls == 2 and sc.routing == res.routing
    assert_close(gate.features[1], gate.features[0], torch.float32, scale=10, what="score-time gate features")
    # no routing left behind after the call
    assert not engine.ctx.active


def test_gate_top_k_and_no_gate(tokenizer):
    gate = FixedGate(GATE_LAYER, ["e0", "e1", "e2"], [[0, 1], [2, 0]], [[0.5, 0.5], [0.7, 0.3]])
    model, processor = build_tiny_llava(tokenizer, "micro", seed=0)
    names = ml.target_module_names(model, layers=[1])
    bank = ExpertBank(None)
    for i in range(3):
        bank.add(ml.random_expert(f"e{i}", ml.module_shapes(model, names), rank=2, seed=i))
    engine = LUMoEEngine(model, processor, bank, gate=gate, top_k=1)
    res = engine.generate(images(2), PROMPTS[:2], max_new_tokens=2)
    assert [r.expert_ids for r in res.routing] == [("e0",), ("e2",)]
    engine.close()
    assert not isinstance(model.get_submodule(names[0]), ml.MultiLoRALinear)
    with pytest.raises(ValueError, match="gate_layer"):
        LUMoEEngine(model, processor, bank, gate=gate, gate_layer=1)
    with pytest.raises(ValueError, match="gate_layer"):
        LUMoEEngine(model, processor, bank, gate_layer=1)           # no layer above 1 in a 2-layer model
    plain = LUMoEEngine(model, processor, bank)
    assert plain.generate([None], ["where was she born"], max_new_tokens=2).routing[0].source == "none"


# ------------------------------------------------------------------------------------------------ 4-bit, errors

def test_engine_on_4bit_base(tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    from lumoe_engine.model.collate import generate_answers
    from lumoe_engine.model.load import load_model

    model, processor = build_tiny_llava(tokenizer, "micro", seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, proc = load_model(tmp_path, load_in_4bit=True)
    imgs = images(3, seed=4)
    imgs[1] = None
    recs = query_records(PROMPTS[:3], imgs)
    base_texts = generate_answers(q, proc, recs, max_new_tokens=NEW, images=imgs)
    names = ml.target_module_names(q, layers=[1])
    bank = ExpertBank(None)
    for i in range(2):
        bank.add(ml.random_expert(f"e{i}", ml.module_shapes(q, names), rank=4, alpha=8.0, seed=i, std=0.5))
    engine = LUMoEEngine(q, proc, bank, gate_layer=0)
    assert engine.generate(imgs, PROMPTS[:3], max_new_tokens=NEW).texts == base_texts
    res = engine.generate(imgs, PROMPTS[:3], max_new_tokens=NEW, expert_ids=["e0", "e1", None])
    assert res.texts[2] == base_texts[2]
    assert res.texts[:2] != base_texts[:2]
    sc = engine.score(imgs, PROMPTS[:3], ANSWERS[:3], expert_ids=["e0", "e1", None])
    assert all(np.isfinite(sc.logprobs))


def test_engine_bad_inputs(tokenizer):
    engine, _, _, _ = setup(tokenizer)
    with pytest.raises(ValueError, match="images"):
        engine.generate(images(1), PROMPTS[:2])
    with pytest.raises(ValueError, match="expert_ids"):
        engine.generate(images(2), PROMPTS[:2], expert_ids=["e0"])
    with pytest.raises(ValueError, match="unknown expert"):
        engine.generate(images(2), PROMPTS[:2], expert_ids=["e0", "nope"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(images(1), PROMPTS[:1], max_new_tokens=0)
    with pytest.raises(ValueError, match="answers"):
        engine.score(images(2), PROMPTS[:2], ["a"])
    with pytest.raises(ValueError, match="PIL image"):
        engine.generate(["not an image"], PROMPTS[:1])
