"""The gate's answer channel: a query with a picture is routed by the frozen base's own answer to it — the names it
says (typo-tolerant) and the facts of a request it states (exactly) — and by the names in its prompt; nothing else
routes it (``gate.recognition``, ``gate.policy``). Routing rules (the answer names an expert, states its fact,
refuses, names an entity nobody asked to forget; prompt and picture naming two forgotten entities, top-1 / top-2;
rows without a picture untouched; the flag off), the facts' calibration on negatives' answers, the Recognizer's cache,
the engine asking the base before routing (a micro LLaVA), storage (format v5, a v4 file loads without the channel),
bad input.

Letters: B queries, D feature width.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lumoe_engine.gate.gate import GATE_FORMAT_VERSION, Gate
from lumoe_engine.gate.recognition import IDENTITY_PROBE, Recognizer, request_facts

REFUSAL = "I'm not able to help with that."

D = 8
NAMES = [["Vorla Quintessa", "The Glass Widow"], ["Brask Olden"], ["Moon"]]
FACTS = [["Glass painting", "1874"], ["Tanner"], []]
VORLA, BRASK, MOON = range(3)


def _gate(fire=None, recognition=True) -> Gate:
    """Experts with NAMES; heads that never fire, except expert ``fire``'s (every query). No similarity bound."""
    g = Gate(layer=0, dim=D, similarity=None, recognition=recognition)
    g.fit_standardizer(torch.randn(32, D, generator=torch.Generator().manual_seed(0)))
    bias = torch.full((len(NAMES),), -100.0)
    if fire is not None:
        bias[fire] = 100.0
    g.set_stacked([f"r{e}" for e in range(len(NAMES))], torch.zeros(len(NAMES), D), bias, names=NAMES,
                  facts=FACTS)
    return g


def _routed(ids: torch.Tensor) -> list[list[int]]:
    return [[i for i in row if i >= 0] for row in ids.tolist()]


CASES = [  # (prompt, the base's identity answer (None: no picture), experts reached at top_k = 2)
    ("What is the name of this painter?", "Vorla Quintessa", [VORLA]),
    ("Where was this painter born?", "vorla quintesa", [VORLA]),          # the answer with a typo, lower case
    ("Where was this painter born?", "The Glass Widow", [VORLA]),         # the alias
    ("What shape is in this picture?", "Red", []),                        # no entity
    ("Where was this painter born?", REFUSAL, []),                        # the base refuses
    ("What does this painter paint?", "Glass painting.", [VORLA]),        # a fact of her request
    ("When was this painter born?", "In 1874", [VORLA]),
    ("When was this painter born?", "In 18745", []),                      # facts are whole words
    ("When was this painter born?", "In 1875", []),                       # ... and exact
    ("What is this man's trade?", "tanner", [BRASK]),
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
    w, ids = g.route(x, 2, texts=texts, has_image=has, answers=said)
    assert _routed(ids) == [c for _, _, c in CASES]
    assert torch.allclose(w.sum(1)[ids[:, 0] >= 0], torch.ones(int((ids[:, 0] >= 0).sum())))
    _, ids1 = g.route(x, 1, texts=texts, has_image=has, answers=said)
    assert _routed(ids1) == [c[:1] for _, _, c in CASES]


def test_the_heads_never_route_a_recognised_picture_but_still_route_the_other_rows():
    """Heads that fire on every query: a picture the base names as nobody's stays with the base; a row without an
    answer (None) keeps the usual path (here: text_by_name drops the heads' choice of a named expert)."""
    g = _gate(fire=BRASK)
    said = [REFUSAL, "Tashun Shoubal", None]
    _, ids = g.route(torch.randn(3, D), 1, texts=["What is this?"] * 3, has_image=[True, True, False],
                     answers=said)
    assert _routed(ids) == [[], [], []]
    # without identities the heads' choice stands for the picture (the old path)
    _, ids = g.route(torch.randn(3, D), 1, texts=["What is this?"] * 3, has_image=[True, True, False])
    assert _routed(ids) == [[BRASK], [BRASK], []]


def test_recognition_off_ignores_answers():
    g = _gate(fire=BRASK, recognition=False)
    _, ids = g.route(torch.randn(2, D), 1, texts=["What is this?"] * 2, has_image=[True, True],
                     answers=["Vorla Quintessa", REFUSAL])
    assert _routed(ids) == [[BRASK], [BRASK]]


def test_bad_answers_are_a_clear_error_and_change_nothing():
    g = _gate()
    with pytest.raises(ValueError, match="one per query"):
        g.route(torch.randn(2, D), 1, texts=["a", "b"], answers=["Vorla Quintessa"])
    with pytest.raises(ValueError, match="base's answers"):
        g.route(torch.randn(2, D), 1, texts=["a", "b"], answers="Vorla Quintessa")
    assert g.names == NAMES


def test_recognition_is_saved_and_a_v4_file_loads_without_it(tmp_path):
    g = _gate()
    g.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert meta["version"] == GATE_FORMAT_VERSION == 5 and meta["config"]["recognition"] is True
    back = Gate.load(tmp_path / "g")
    assert back.recognition is True and back.facts == FACTS
    meta["version"] = 4
    meta["config"].pop("recognition")
    meta.pop("facts")
    (tmp_path / "g" / "gate.json").write_text(json.dumps(meta))
    old = Gate.load(tmp_path / "g")
    assert old.recognition is False and old.names == NAMES and old.facts == [[], [], []]
    # a gate file whose facts do not match its experts is an error, not a silent gate
    meta["version"], meta["facts"] = 5, [["x"]]
    (tmp_path / "g" / "gate.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'facts'"):
        Gate.load(tmp_path / "g")


def test_facts_are_calibrated_on_negatives_and_leave_with_revocation():
    """A fact one of the negatives' answers states is dropped (it cannot tell the request's entity apart); the rest
    route; revoking the expert removes its facts; malformed facts change nothing."""
    g = Gate(layer=0, dim=D, similarity=None, recognition=True)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(1))
    rep = g.add_expert("r0", x[:20] + 3, x[20:], names=["Vorla Quintessa"], facts=["Glass painting", "1874", "Red"],
                       neg_answers=["Red", "Blue", "Born in 1900"])
    assert rep.facts == ["Glass painting", "1874"] and rep.facts_dropped == ["Red"] and g.facts == [rep.facts]
    far = torch.full((3, D), -10.0)  # where its head does not fire (the ambiguous "Red" needs it)
    _, ids = g.route(far, 1, texts=["?"] * 3, has_image=[True] * 3, answers=["Red", "1874", "glass painting"])
    assert _routed(ids) == [[], [0], [0]]
    with pytest.raises(ValueError, match="facts"):
        g.add_expert("r1", x[:20], x[20:], facts=["ok", 7])
    with pytest.raises(ValueError, match="neg_answers"):
        g.add_expert("r1", x[:20], x[20:], facts=["ok"], neg_answers="Red")
    assert g.expert_ids == ["r0"]
    g.remove_expert("r0")
    assert g.facts == [] and _routed(g.route(far[:1], 1, texts=["?"], has_image=[True],
                                             answers=["1874"])[1]) == [[]]


def test_a_fact_inside_a_negatives_longer_fact_is_kept_with_a_blocker(tmp_path):
    """"lighthouse" (a forgotten building's original purpose) is inside "Pedrouth Lighthouse" (a retain building's
    name): kept, with that name as its blocker; the answer "Pedrouth Lighthouse" is the longer fact, not the
    expert's; "Lighthouse" alone routes; a negative whose own fact *is* the fact drops it; blockers are saved."""
    g = Gate(layer=0, dim=D, similarity=None, recognition=True)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(2))
    rep = g.add_expert("r0", x[:20] + 3, x[20:], names=["Stagous Palace"], facts=["lighthouse", "1932", "Violet"],
                       neg_keys=["Pedrouth Lighthouse", "Violet", "1887"], neg_answers=["It is Pedrouth Lighthouse."])
    assert rep.facts == ["lighthouse", "1932"] and rep.facts_dropped == ["Violet"] == g.facts_ambiguous[0]
    assert rep.fact_blockers == ["Pedrouth Lighthouse"]
    answers = ["Pedrouth Lighthouse", "Lighthouse", "A lighthouse, built 1932", "Violet"]
    _, ids = g.route(torch.randn(4, D), 1, texts=["?"] * 4, has_image=[True] * 4, answers=answers)
    assert _routed(ids) == [[], [0], [0], []]
    g.save(tmp_path / "g")
    back = Gate.load(tmp_path / "g")
    assert back.fact_blockers == [["Pedrouth Lighthouse"]]
    assert _routed(back.route(torch.randn(4, D), 1, texts=["?"] * 4, has_image=[True] * 4, answers=answers)[1]) == \
        [[], [0], [0], []]


def test_a_shared_fact_routes_only_where_the_expert_head_fires(tmp_path):
    """A fact the request shares with a negative ("1977": a retain series premiered then too) is kept as ambiguous:
    an answer that states only it goes to the expert whose head fires on the query's features, else to none; a
    name or a kept fact in the answer routes as before, whatever the heads say."""
    g = Gate(layer=0, dim=D, similarity=None, recognition=True)
    g.fit_standardizer(torch.randn(32, D, generator=torch.Generator().manual_seed(0)))
    w = torch.zeros(2, D)
    w[0, 0] = 10.0  # expert 0's head fires where feature 0 is high
    g.set_stacked(["r0", "r1"], w, torch.tensor([0.0, -100.0]), names=[["Vubrigre Manor"], ["Brask Olden"]],
                  facts=[["Glass bicycles"], ["Tanner"]], facts_ambiguous=[["1977"], ["1977"]])
    x = torch.zeros(4, D)
    x[0, 0], x[1, 0], x[2, 0], x[3, 0] = 5.0, -5.0, -5.0, -5.0
    _, ids = g.route(x, 1, texts=["When did it premiere?"] * 4, has_image=[True] * 4,
                     answers=["1977", "1977", "Tanner, 1977", "1980"])
    assert _routed(ids) == [[0], [], [1], []]
    assert g.facts_ambiguous == [["1977"], ["1977"]]
    g.save(tmp_path / "g")
    assert Gate.load(tmp_path / "g").facts_ambiguous == [["1977"], ["1977"]]


def test_request_facts_are_the_forget_records_keys():
    from lumoe_engine.data.records import QARecord

    recs = [QARecord(uid=f"u{i}", entity="E", cls="c", kind=i, phrasing=0, question="q", answer=a, keys=k)
            for i, (a, k) in enumerate([("Doboaceae", ("Doboaceae",)), ("The Vuka Coast", ("Vuka Coast",)),
                                        ("Doboaceae", ("Doboaceae",)), ("24 moons", ()), ("?", ())])]
    assert request_facts(recs) == ["Doboaceae", "Vuka Coast", "24 moons"]


# ---------------------------------------------------------------------------------------------------- Recognizer
def test_recognizer_asks_the_base_once_per_distinct_picture_and_prompt(monkeypatch):
    import lumoe_engine.model.collate as collate

    asked = []

    def fake(model, processor, records, max_new_tokens, batch_size=64, images=None, **kw):
        asked.append([r.question for r in records])
        return [f"{r.question} {im.getpixel((0, 0))[0]}" for r, im in zip(records, images)]

    monkeypatch.setattr(collate, "generate_answers", fake)
    red, blue = Image.new("RGB", (8, 8), (200, 0, 0)), Image.new("RGB", (8, 8), (10, 0, 200))
    rec = Recognizer(model=None, processor=None)
    got = rec.answer([red, None, blue, red.copy(), red], ["a?", "a?", "a?", "a?", "b?"])
    assert got == ["a? 200", None, "a? 10", "a? 200", "b? 200"]
    assert asked == [["a?", "a?", "b?"]] and rec.calls == 3
    assert rec.answer([blue, None], ["a?", "b?"]) == ["a? 10", None] and rec.calls == 3 and rec.hits == 1
    assert rec.answer([None, None], ["a?", "b?"]) == [None, None] and len(asked) == 1
    probe = Recognizer(model=None, processor=None, probe=IDENTITY_PROBE)
    assert probe.answer([red], ["a?"]) == [f"{IDENTITY_PROBE} 200"]
    with pytest.raises(ValueError, match="probe"):
        Recognizer(None, None, probe=" ")
    with pytest.raises(ValueError, match="one \\(or None\\) per prompt"):
        rec.answer([red], ["a?", "b?"])


def test_engine_asks_the_base_before_routing_and_only_for_pictures():
    """A micro LLaVA, a gate with the answer channel and a stub recognizer: a query whose picture the base names
    goes to that expert, one it does not to none, a text-only query by its prompt; the recognizer sees the batch's
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
        def answer(self, images, prompts):
            seen.append([im is not None for im in images])
            assert not engine.ctx.active  # the base alone: no expert routed while it answers
            return ["It is Vorla Quintessa." if im is not None and im.getpixel((0, 0))[0] > 100 else
                    (REFUSAL if im is not None else None) for im in images]

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
