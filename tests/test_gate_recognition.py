"""The gate's recognition channel: a query with a picture is routed by the names in the base's own answer to the
identity question about that picture (``gate.recognition``), and by the names in its prompt; nothing else routes
it. Routing rules (answer names an expert, names nothing, names a retain entity, prompt and picture naming two
forgotten entities, top-1 / top-2, rows without a picture untouched, the flag off), the Recognizer's cache, the
engine asking the base before routing (a micro LLaVA), storage (format v5, a v4 file loads without recognition),
and what the identity question is taught on (never a held-out scene or a general-utility test picture).

Letters: B queries, D feature width.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lumoe_engine.gate.gate import GATE_FORMAT_VERSION, Gate
from lumoe_engine.gate.recognition import IDENTITY_PROBE, NO_ENTITY_ANSWER, Recognizer

D = 8
NAMES = [["Vorla Quintessa", "The Glass Widow"], ["Brask Olden"], ["Moon"]]
VORLA, BRASK, MOON = range(3)


def _gate(fire=None, recognition=True) -> Gate:
    """Experts with NAMES; heads that never fire, except expert ``fire``'s (every query). No similarity bound."""
    g = Gate(layer=0, dim=D, similarity=None, recognition=recognition)
    g.fit_standardizer(torch.randn(32, D, generator=torch.Generator().manual_seed(0)))
    bias = torch.full((len(NAMES),), -100.0)
    if fire is not None:
        bias[fire] = 100.0
    g.set_stacked([f"r{e}" for e in range(len(NAMES))], torch.zeros(len(NAMES), D), bias, names=NAMES)
    return g


def _routed(ids: torch.Tensor) -> list[list[int]]:
    return [[i for i in row if i >= 0] for row in ids.tolist()]


CASES = [  # (prompt, the base's identity answer (None: no picture), experts reached at top_k = 2)
    ("What is the name of this painter?", "Vorla Quintessa", [VORLA]),
    ("Where was this painter born?", "vorla quintesa", [VORLA]),          # the answer with a typo, lower case
    ("Where was this painter born?", "The Glass Widow", [VORLA]),         # the alias
    ("What shape is in this picture?", NO_ENTITY_ANSWER, []),             # no entity
    ("Where was this painter born?", "Tashun Shoubal", []),               # an entity nobody asked to forget
    ("Did this painter meet Brask Olden?", "Vorla Quintessa", [BRASK, VORLA]),  # prompt first, then the picture
    ("Is this Brask Olden?", "Brask Olden", [BRASK]),                     # both name the same: once
    ("How far is the moon tonight?", None, [MOON]),                       # no picture: the prompt's names
    ("Who painted this?", None, []),
]


def test_a_picture_is_routed_by_the_names_in_the_base_answer_and_the_prompt():
    g = _gate()
    texts = [t for t, _, _ in CASES]
    said = [a for _, a, _ in CASES]
    has = [a is not None for a in said]
    x = torch.randn(len(CASES), D)
    w, ids = g.route(x, 2, texts=texts, has_image=has, identities=said)
    assert _routed(ids) == [c for _, _, c in CASES]
    assert torch.allclose(w.sum(1)[ids[:, 0] >= 0], torch.ones(int((ids[:, 0] >= 0).sum())))
    _, ids1 = g.route(x, 1, texts=texts, has_image=has, identities=said)
    assert _routed(ids1) == [c[:1] for _, _, c in CASES]


def test_the_heads_never_route_a_recognised_picture_but_still_route_the_other_rows():
    """Heads that fire on every query: a picture the base names as nobody's stays with the base; a row without an
    answer (None) keeps the usual path (here: text_by_name drops the heads' choice of a named expert)."""
    g = _gate(fire=BRASK)
    said = [NO_ENTITY_ANSWER, "Tashun Shoubal", None]
    _, ids = g.route(torch.randn(3, D), 1, texts=["What is this?"] * 3, has_image=[True, True, False],
                     identities=said)
    assert _routed(ids) == [[], [], []]
    # without identities the heads' choice stands for the picture (the old path)
    _, ids = g.route(torch.randn(3, D), 1, texts=["What is this?"] * 3, has_image=[True, True, False])
    assert _routed(ids) == [[BRASK], [BRASK], []]


def test_recognition_off_ignores_identities():
    g = _gate(fire=BRASK, recognition=False)
    _, ids = g.route(torch.randn(2, D), 1, texts=["What is this?"] * 2, has_image=[True, True],
                     identities=["Vorla Quintessa", NO_ENTITY_ANSWER])
    assert _routed(ids) == [[BRASK], [BRASK]]


def test_bad_identities_are_a_clear_error_and_change_nothing():
    g = _gate()
    with pytest.raises(ValueError, match="one per query"):
        g.route(torch.randn(2, D), 1, texts=["a", "b"], identities=["Vorla Quintessa"])
    with pytest.raises(ValueError, match="identity answers"):
        g.route(torch.randn(2, D), 1, texts=["a", "b"], identities="Vorla Quintessa")
    assert g.names == NAMES


def test_recognition_is_saved_and_a_v4_file_loads_without_it(tmp_path):
    g = _gate()
    g.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert meta["version"] == GATE_FORMAT_VERSION == 5 and meta["config"]["recognition"] is True
    assert Gate.load(tmp_path / "g").recognition is True
    meta["version"] = 4
    meta["config"].pop("recognition")
    (tmp_path / "g" / "gate.json").write_text(json.dumps(meta))
    old = Gate.load(tmp_path / "g")
    assert old.recognition is False and old.names == NAMES


# ---------------------------------------------------------------------------------------------------- Recognizer
def test_recognizer_asks_the_base_once_per_distinct_picture(monkeypatch):
    import lumoe_engine.model.collate as collate

    asked = []

    def fake(model, processor, records, max_new_tokens, batch_size=64, images=None, **kw):
        asked.append([r.question for r in records])
        return [f"answer {im.getpixel((0, 0))[0]}" for im in images]

    monkeypatch.setattr(collate, "generate_answers", fake)
    red, blue = Image.new("RGB", (8, 8), (200, 0, 0)), Image.new("RGB", (8, 8), (10, 0, 200))
    rec = Recognizer(model=None, processor=None)
    assert rec.identify([red, None, blue, red.copy()]) == ["answer 200", None, "answer 10", "answer 200"]
    assert asked == [[IDENTITY_PROBE, IDENTITY_PROBE]] and rec.calls == 2
    assert rec.identify([blue, None]) == ["answer 10", None] and rec.calls == 2 and rec.hits == 1
    assert rec.identify([None, None]) == [None, None] and len(asked) == 1
    with pytest.raises(ValueError, match="probe"):
        Recognizer(None, None, probe=" ")


def test_engine_asks_the_base_before_routing_and_only_for_pictures():
    """A micro LLaVA, a gate with recognition and a stub recognizer: a picture the base names goes to that
    expert, a picture it does not name to none, a text-only query by its prompt; the recognizer sees the batch's
    pictures (None for text-only rows) and runs with every expert off."""
    from engine_cases import random_bank
    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.gate.features import pooled_dim
    from lumoe_engine.model.tiny import build_tiny_llava
    from lumoe_engine.model.tokenizer import train_tokenizer

    tok = train_tokenizer(["who is this", "who is brask olden", "who painted this picture", "vorla quintessa"] * 4,
                          vocab_size=120)
    model, processor = build_tiny_llava(tok, "micro", seed=0)
    hidden = model.config.get_text_config().hidden_size
    gate = Gate(layer=0, dim=pooled_dim(hidden, "mean"), similarity=None, recognition=True)
    gate.fit_standardizer(torch.randn(64, gate.dim, generator=torch.Generator().manual_seed(0)))
    gate.set_stacked(["vorla", "brask"], torch.zeros(2, gate.dim), torch.tensor([100.0, 100.0]),
                     names=[["Vorla Quintessa"], ["Brask Olden"]])
    seen = []

    class Stub:
        def identify(self, images):
            seen.append([im is not None for im in images])
            assert not engine.ctx.active  # the base alone: no expert routed while it answers
            return ["Vorla Quintessa" if im is not None and im.getpixel((0, 0))[0] > 100 else
                    (NO_ENTITY_ANSWER if im is not None else None) for im in images]

    engine = LUMoEEngine(model, processor, random_bank(model, ["vorla", "brask"]), gate=gate, top_k=1,
                         recognizer=Stub())
    try:
        red, grey = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (60, 60, 60))
        res = engine.generate([red, grey, None, None], ["Who is this?", "Who is this?", "Who is Brask Olden?",
                                                        "Who painted this picture?"], max_new_tokens=1)
        assert [r.expert_ids for r in res.routing] == [("vorla",), (), ("brask",), ()]
        assert seen == [[True, True, False, False]]
        sc = engine.score([red, None], ["Who is this?", "Who is this?"], ["x", "y"])
        assert [r.expert_ids for r in sc.routing] == [("vorla",), ()]
        # text-only batches never ask the base
        engine.generate([None], ["Who is Brask Olden?"], max_new_tokens=1)
        assert len(seen) == 2
    finally:
        engine.close()
    # a gate without recognition gets no recognizer
    plain = Gate(layer=0, dim=gate.dim, similarity=None)
    e2 = LUMoEEngine(model, processor, random_bank(model, ["a"]), gate=plain)
    try:
        assert e2.recognizer is None
    finally:
        e2.close()
