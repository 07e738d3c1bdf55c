"""The gate's name channel: a query whose prompt contains a request's entity name goes to that request's expert,
whatever its pooled features say; rows without a name keep the heads' decision. Matching, routing (top-1 and
top-k), storage (and older files without names), revocation, bad input, the engine passing the prompts through, and
the stream's names of a request.

Letters: B queries, S prompt positions, D feature width.
"""
from __future__ import annotations

import json

import pytest
import torch

from lumoe_engine.gate.gate import Gate, check_names, name_token_ids

D = 8


def _gate(names_per_expert, fire=None) -> Gate:
    """A gate with one expert per entry of ``names_per_expert``; heads that never fire, except expert ``fire``'s,
    which fires on every query (bias +100). No similarity bound."""
    g = Gate(layer=0, dim=D, similarity=None)
    g.fit_standardizer(torch.randn(32, D, generator=torch.Generator().manual_seed(0)))
    E = len(names_per_expert)
    bias = torch.full((E,), -100.0)
    if fire is not None:
        bias[fire] = 100.0
    g.set_stacked([f"r{e}" for e in range(E)], torch.zeros(E, D), bias, names=names_per_expert)
    return g


def _ids(rows, pad=0):
    S = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (S - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (S - len(r)) for r in rows])
    return ids, mask


def test_name_hits_find_sequences_in_order_of_first_mention_within_the_mask():
    g = _gate([[[7, 8]], [[9]], [[7, 8, 10]]])
    ids, mask = _ids([[1, 5, 7, 8, 6], [1, 9, 2, 7, 8, 10], [1, 7, 5, 8], [1, 2, 3]])
    assert g.name_hits(ids, mask) == [[0], [1, 0, 2], [], []]
    # a name split across masked positions does not count: mask out the 8 of row 0
    mask[0, 3] = 0
    assert g.name_hits(ids, mask)[0] == []
    # left padding: pad positions never match, even when the pad id equals a name token
    g2 = _gate([[[0, 7]]])
    ids2 = torch.tensor([[0, 0, 7, 3], [0, 1, 0, 7]])
    mask2 = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert g2.name_hits(ids2, mask2) == [[], [0]]


def test_route_sends_named_queries_to_their_expert_and_leaves_others_to_the_heads():
    g = _gate([[[7, 8]], [[9]], []], fire=2)               # the heads send every query to expert 2 (no names)
    x = torch.randn(4, D)
    ids, mask = _ids([[1, 7, 8], [1, 9, 4], [1, 4, 4], [1, 9, 7, 8]])
    _, plain = g.route(x, 1)
    assert plain[:, 0].tolist() == [2, 2, 2, 2]             # features alone
    w, got = g.route(x, 1, input_ids=ids, attention_mask=mask)
    assert got[:, 0].tolist() == [0, 1, 2, 1] and got.dtype == torch.int32
    assert w[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0]
    w, got = g.route(x, 2, input_ids=ids, attention_mask=mask)
    assert got.tolist() == [[0, -1], [1, -1], [2, -1], [1, 0]]
    assert w.tolist() == [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.5]]


def test_text_by_name_drops_the_heads_choice_of_an_expert_with_names_unless_named():
    x = torch.randn(3, D)
    ids, mask = _ids([[1, 4, 4], [1, 11, 4], [1, 7, 8]])
    g = _gate([[[7, 8]], [[9]], [[11]]], fire=2)            # expert 2 has a name now
    g.image_token_id = 3                                    # no prompt holds it: every row is without an image
    assert g.route(x, 1)[1][:, 0].tolist() == [2, 2, 2]     # no prompts: the heads alone
    assert g.route(x, 1, input_ids=ids, attention_mask=mask)[1][:, 0].tolist() == [-1, 2, 0]
    g.text_by_name = False                                  # off: the heads' choice stands where no name is
    assert g.route(x, 1, input_ids=ids, attention_mask=mask)[1][:, 0].tolist() == [2, 2, 0]


def test_names_survive_save_load_and_leave_with_revocation(tmp_path):
    g = _gate([[[7, 8]], [[9]], [[11, 12]]])
    g.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert meta["version"] == 3 and meta["names"] == [[[7, 8]], [[9]], [[11, 12]]]
    h = Gate.load(tmp_path / "g")
    assert h.names == [[(7, 8)], [(9,)], [(11, 12)]]
    ids, mask = _ids([[1, 11, 12], [1, 9]])
    assert h.route(torch.randn(2, D), 1, input_ids=ids, attention_mask=mask)[1][:, 0].tolist() == [2, 1]
    h.remove_expert("r1")                                   # revoked: its name no longer routes; r2 moves down
    assert h.expert_ids == ["r0", "r2"] and h.names == [[(7, 8)], [(11, 12)]]
    assert h.route(torch.randn(2, D), 1, input_ids=ids, attention_mask=mask)[1][:, 0].tolist() == [1, -1]
    # a version-2 file (no names) still loads, without a name channel
    meta.pop("names")
    meta["version"] = 2
    (tmp_path / "g" / "gate.json").write_text(json.dumps(meta))
    old = Gate.load(tmp_path / "g")
    assert old.names == [[], [], []]
    assert old.route(torch.randn(2, D), 1, input_ids=ids, attention_mask=mask)[1][:, 0].tolist() == [-1, -1]


def test_add_expert_with_names_and_bad_names_leave_the_gate_unchanged():
    g = Gate(layer=0, dim=D, similarity=None)
    gen = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(20, D, generator=gen) + 3, torch.randn(40, D, generator=gen)
    g.add_expert("a", pos, neg, names=[[5, 6], [5, 6], torch.tensor([6])])
    assert g.names == [[(5, 6), (6,)]]                      # duplicates dropped, tensors accepted
    before = (list(g.expert_ids), g.weight.clone(), g.names)
    for bad, what in (("alice", "list of token-id sequences"), ([[]], "non-empty"), ([[1, -2]], "ints >= 0"),
                      ([["x"]], "token ids"), ([[1.5]], "token ids"), ([[True]], "token ids")):
        with pytest.raises(ValueError, match=what):
            g.add_expert("b", pos, neg, names=bad)
        assert (g.expert_ids, g.names) == (before[0], before[2]) and torch.equal(g.weight, before[1])
    with pytest.raises(ValueError, match="input_ids"):
        g.route(torch.randn(1, D), 1, input_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="attention_mask"):
        g.route(torch.randn(1, D), 1, input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="one list of token-id sequences per expert"):
        g.set_stacked(["a"], torch.zeros(1, D), torch.zeros(1), names=[[[1]], [[2]]])
    assert check_names(None) == []


@pytest.fixture(scope="module")
def micro():
    from lumoe_engine.model.tiny import build_tiny_llava
    from lumoe_engine.model.tokenizer import train_tokenizer

    texts = ["what is the name of this person", "where was Vorla Quintessa born", "which city is shown here",
             "who painted this picture", "tell me about Brask Olden"] * 5
    tok = train_tokenizer(texts, vocab_size=200, kind="word")
    return build_tiny_llava(tok, "micro", seed=0)


def test_name_token_ids_match_the_prompt_tokens(micro):
    from lumoe_engine.data.records import QARecord
    from lumoe_engine.gate.evaluate import prompt_ids

    _, processor = micro
    seqs = name_token_ids(processor, ["Vorla Quintessa"])
    rec = QARecord(uid="q", entity="Vorla Quintessa", cls="Person", kind=1, phrasing=0,
                   question="where was Vorla Quintessa born", answer="x", form="text_only", image=None, keys=("x",))
    ids = prompt_ids(processor, [rec])["q"]
    assert any(tuple(ids[i:i + len(s)].tolist()) == tuple(s) for s in seqs for i in range(len(ids)))
    with pytest.raises(ValueError, match="non-empty strings"):
        name_token_ids(processor, [" "])


def test_engine_passes_the_prompts_to_the_name_channel(micro):
    """A real Gate whose heads never fire: only the name channel can route, so the decisions show that the engine
    gave it the prompt ids (generation and scoring)."""
    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.gate.features import pooled_dim

    from engine_cases import random_bank

    model, processor = micro
    hidden = model.config.get_text_config().hidden_size
    gate = Gate(layer=0, dim=pooled_dim(hidden, "mean"), similarity=None)
    gate.fit_standardizer(torch.randn(64, gate.dim, generator=torch.Generator().manual_seed(0)))
    gate.set_stacked(["vorla", "brask"], torch.zeros(2, gate.dim), torch.full((2,), -100.0),
                     names=[name_token_ids(processor, ["Vorla Quintessa"]), name_token_ids(processor, ["Brask Olden"])])
    bank = random_bank(model, ("vorla", "brask"))
    engine = LUMoEEngine(model, processor, bank, gate=gate, top_k=1)
    try:
        prompts = ["where was Vorla Quintessa born", "who painted this picture", "tell me about Brask Olden"]
        res = engine.generate([None] * 3, prompts, max_new_tokens=2)
        assert [r.expert_ids for r in res.routing] == [("vorla",), (), ("brask",)]
        sc = engine.score([None] * 3, prompts, ["x", "y", "z"])
        assert [r.expert_ids for r in sc.routing] == [("vorla",), (), ("brask",)]
    finally:
        engine.close()


def test_stream_request_names():
    from lumoe_engine.data.records import QARecord
    from lumoe_engine.data.streams import Request
    from lumoe_engine.pipeline import request_names

    class Tok:  # a whitespace tokenizer: one id per word
        vocab: dict = {}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}

    r = QARecord(uid="u", entity="Brask Olden", cls="c", kind=1, phrasing=0, question="q", answer="a",
                 form="text_only", image=None, keys=("a",))
    tok = Tok()
    assert request_names(Request(id="x", forget=[r], retain=[], entities=("Vorla Quintessa", "Brask Olden")),
                         tok) == [[0, 1], [2, 3]]
    assert request_names(Request(id="y", forget=[r, r], retain=[], entities=()), tok) == [[2, 3]]


def test_text_by_name_tells_image_rows_by_the_image_token_without_an_image_channel():
    """No image channel: rows whose prompt holds the image token keep the heads' choice; rows without one reach an
    expert with names only by naming it; a gate that knows no image token drops nothing."""
    x = torch.randn(2, D)
    ids, mask = _ids([[1, 4, 5, 4], [1, 5, 5, 5]])          # row 0 has image tokens (id 4), row 1 none
    g = _gate([[[7, 8]]], fire=0)
    assert g.route(x, 1, input_ids=ids, attention_mask=mask)[1][:, 0].tolist() == [0, 0]  # no image token known
    g.image_token_id = 4
    assert g.route(x, 1, input_ids=ids, attention_mask=mask)[1][:, 0].tolist() == [0, -1]


def test_a_request_file_without_an_entity_gives_no_names(tmp_path):
    """A request file's id stands in for a missing "entity" in its records; it must not become a name (every text
    query not containing the id would then miss the expert under text_by_name)."""
    from lumoe_engine.data.intake import parse_request_file
    from lumoe_engine.pipeline import request_names

    class Tok:
        vocab: dict = {}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}

    qa = {"question": "What is Olan Brisk's trade?", "answer": "tanner"}
    (tmp_path / "a.json").write_text(json.dumps({"id": "r17", "forget": [qa]}))
    (tmp_path / "b.json").write_text(json.dumps({"id": "r18", "entity": "Olan Brisk", "forget": [qa]}))
    anon = parse_request_file(tmp_path / "a.json").to_request()
    named = parse_request_file(tmp_path / "b.json").to_request()
    assert anon.entities == ("r17",) and request_names(anon, Tok()) == []
    assert request_names(named, Tok()) == [[0, 1]]
