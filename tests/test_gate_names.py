"""The gate's name channel: names matched as text (``gate.names.NameIndex``) in each query's prompt text. A query
that names a request's entity (or an alias) goes to that request's expert, whatever its pooled features say; rows
without a name keep the heads' decision. Matching (case, punctuation, "\\n", quotes, brackets, possessives, one typo
in a long name, aliases, common-word names, a name inside a longer name), routing (top-1, top-k, two entities),
text_by_name, calibration on negative texts, storage (format v4, older files: v2 loads, v3 with token-id names is
refused or converted), revocation, bad input, the engine passing its prompt texts with a SentencePiece-style and a
byte-level BPE tokenizer (trained here, offline), the pipeline's names of a request, the store's conversion.

Letters: B queries, D feature width.
"""
from __future__ import annotations

import json
import string

import pytest
import torch

from lumoe_engine.gate.gate import GATE_FORMAT_VERSION, Gate, GateFormatError, check_names
from lumoe_engine.gate.names import NameIndex

D = 8

# the names of the experts of the matching tests, and which expert each case must reach (None: no expert)
NAMES = [["Moon"], ["Moon Base"], ["Vorla Quintessa", "The Glass Widow"], ["Brask Olden"]]
MOON, BASE, VORLA, BRASK = range(4)
CASES = [
    ("Where was Vorla Quintessa born?", [VORLA]),
    ("Vorla Quintessa was born where?", [VORLA]),                     # sentence start
    ("Tell me where I can find Vorla Quintessa", [VORLA]),            # sentence end, no punctuation
    ("Tell me about\nVorla Quintessa.", [VORLA]),                    # after a newline
    ('Who is "Vorla Quintessa"?', [VORLA]),                          # in quotes
    ("Who painted it (Vorla Quintessa)?", [VORLA]),                  # in brackets
    ("[Vorla Quintessa] what is her trade?", [VORLA]),
    ("what is vorla quintessa's trade?", [VORLA]),                   # lower case, possessive
    ("What is Vorla Quintessa’s trade?", [VORLA]),                   # typographic apostrophe
    ("Where was Vorla Qiuntessa born?", [VORLA]),                    # one typo in a long name
    ("Where was Vorla Quintesa born?", [VORLA]),                     # one letter dropped
    ("What does the Glass Widow paint?", [VORLA]),                   # the alias
    ("what does glass widow paint", [VORLA]),                        # the alias without its article, lower case
    ("Where was Vorla born?", []),                                   # part of a name is not the name
    ("Where was Vorla Qiuntesa born?", []),                          # two typos
    ("The Moon is bright", [MOON]),                                  # a common-word name
    ("how far is the moon tonight?", [MOON]),                        # lower case: a mention
    ("Moonlight on the water", []),                                  # not inside a longer word
    ("Where did they spend their honeymoon?", []),
    ("Is the moonlit sea calm?", []),
    ("Mon is a day", []),                                            # a short name gets no typo
    ("What is on Moon Base?", [BASE]),                               # the longer name, not its prefix too
    ("moon base: who built it?", [BASE]),
    ("Is Moon Base nearer than the Moon?", [BASE, MOON]),            # both, in order of first mention
    ("Did Brask Olden meet Vorla Quintessa?", [BRASK, VORLA]),       # two forgotten entities
    ("What is Brask's job?", []),
    ("who painted this picture?", []),
]


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


def _routed(ids: torch.Tensor) -> list[list[int]]:
    return [[i for i in row if i >= 0] for row in ids.tolist()]


# ------------------------------------------------------------------------------------------------------ matching
def test_every_case_routes_to_the_named_experts_only():
    g = _gate(NAMES)
    texts = [t for t, _ in CASES]
    x = torch.randn(len(texts), D)
    _, ids = g.route(x, 2, texts=texts)
    assert _routed(ids) == [want[:2] for _, want in CASES]
    assert g.name_hits(texts) == [want for _, want in CASES]
    w, ids1 = g.route(x, 1, texts=texts)                               # top_k = 1: the first named expert
    assert _routed(ids1) == [want[:1] for _, want in CASES] and ids1.dtype == torch.int32
    assert w[:, 0].tolist() == [1.0 if want else 0.0 for _, want in CASES]
    w2, ids2 = g.route(x[:2], 2, texts=["Did Brask Olden meet Vorla Quintessa?", "Where was Vorla Quintessa born?"])
    assert ids2.tolist() == [[BRASK, VORLA], [VORLA, -1]] and w2.tolist() == [[0.5, 0.5], [1.0, 0.0]]
    assert g.route(x[:2], 2, renormalize=False, texts=["Did Brask Olden meet Vorla Quintessa?", "x"])[0].tolist() \
        == [[1.0, 1.0], [0.0, 0.0]]


def test_a_name_that_is_another_names_prefix_routes_by_its_own_words():
    """"Moon" and "Moon Base" of different requests: each text reaches the expert of the name it writes."""
    g = _gate([["Moon Base"], ["Moon"]])
    assert g.name_hits(["Moon Base is far", "the Moon is far", "the Moon's base", "moonbase"]) == \
        [[0], [1], [1], []]


def test_name_index_normalisation_and_fuzzy_rules():
    idx = NameIndex()
    assert idx.add(["The Hague", "Crème Brûlée"]) == 0
    assert idx.find("I was in the hague") == [0] and idx.find("creme brulee, please") == [0]
    assert idx.find("Hague's court") == [0] and idx.find("Haguenau") == []
    assert idx.add(["Cat"]) == 1
    assert idx.find("a cat!") == [1] and idx.find("bat") == [] and idx.find("concatenate") == []
    idx.exact_only(0, ("creme", "brulee"))
    assert idx.find("creme brulle") == [] and idx.find("creme brulee") == [0]
    with pytest.raises(ValueError, match="no letter or digit"):
        idx.add(["--"])


# ------------------------------------------------------------------------------------------------ text_by_name
def test_text_by_name_drops_the_heads_choice_of_an_expert_with_names_unless_named():
    x = torch.randn(3, D)
    texts = ["tell me about it", "who is Brask Olden", "where was Vorla Quintessa born"]
    g = _gate([["Vorla Quintessa"], [], ["Brask Olden"]], fire=2)   # the heads send every query to expert 2
    assert g.route(x, 1)[1][:, 0].tolist() == [2, 2, 2]            # no texts: the heads alone
    # rows with an image unknown (no has_image, no image channel): nothing is dropped
    assert g.route(x, 1, texts=texts)[1][:, 0].tolist() == [2, 2, 0]
    no_image = [False, False, False]
    assert g.route(x, 1, texts=texts, has_image=no_image)[1][:, 0].tolist() == [-1, 2, 0]
    # a query with an image keeps the heads' choice
    assert g.route(x, 1, texts=texts, has_image=[True, False, False])[1][:, 0].tolist() == [2, 2, 0]
    g2 = _gate([["Vorla Quintessa"], [], ["Brask Olden"]], fire=1)  # expert 1 has no names: its choice stands
    assert g2.route(x, 1, texts=texts, has_image=no_image)[1][:, 0].tolist() == [1, 2, 0]
    g.text_by_name = False
    assert g.route(x, 1, texts=texts, has_image=no_image)[1][:, 0].tolist() == [2, 2, 0]


# ---------------------------------------------------------------------------------------------- add / calibrate
def test_add_expert_names_calibrated_on_negative_texts_and_bad_names_leave_the_gate_unchanged():
    g = Gate(layer=0, dim=D, similarity=None)
    gen = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(20, D, generator=gen) + 3, torch.randn(40, D, generator=gen)
    negs = ["Where was Vorla Quintesso born?", "Who is Brask Olden?", "what is the weather"]
    rep = g.add_expert("a", pos, neg, names=["Vorla Quintessa", "vorla quintessa", "Brask Olden", "Mira Sol"],
                       neg_texts=negs)
    assert g.names == [["Vorla Quintessa", "Brask Olden", "Mira Sol"]]  # repeats (after normalising) dropped
    # the typo match of "Vorla Quintessa" fired on a negative ("Vorla Quintesso", another entity): exact only now
    assert rep.names_exact_only == ["Vorla Quintessa"] and g.names_exact == [["Vorla Quintessa"]]
    assert rep.name_neg_hits == 1 and rep.n_neg_texts == 3           # a negative names "Brask Olden" exactly
    assert g.name_hits(["Vorla Quintesso?", "Vorla Qiuntessa", "Vorla Quintessa", "Brask Oldne"]) == \
        [[], [], [0], [0]]
    before = (list(g.expert_ids), g.weight.clone(), g.names)
    for bad, what in (("alice", "list of names"), ([" "], "no letter or digit"), ([["x"]], "a string"),
                      ([3], "a string")):
        with pytest.raises(ValueError, match=what):
            g.add_expert("b", pos, neg, names=bad)
        assert (g.expert_ids, g.names) == (before[0], before[2]) and torch.equal(g.weight, before[1])
    with pytest.raises(ValueError, match="neg_texts"):
        g.add_expert("b", pos, neg, names=["Mira"], neg_texts="a text")
    with pytest.raises(ValueError, match="2 prompt texts for 1 queries"):
        g.route(torch.randn(1, D), 1, texts=["a", "b"])
    with pytest.raises(ValueError, match="texts"):
        g.route(torch.randn(1, D), 1, texts="Vorla Quintessa")
    with pytest.raises(ValueError, match="has_image"):
        g.route(torch.randn(1, D), 1, texts=["a"], has_image=[True, False])
    with pytest.raises(ValueError, match="one list of names"):
        g.set_stacked(["a"], torch.zeros(1, D), torch.zeros(1), names=[["x"], ["y"]])
    with pytest.raises(ValueError, match="among the expert's names"):
        g.set_stacked(["a"], torch.zeros(1, D), torch.zeros(1), names=[["x"]], names_exact=[["y"]])
    assert check_names(None) == []


# ------------------------------------------------------------------------------------------------------ storage
def test_names_survive_save_load_as_strings_and_leave_with_revocation(tmp_path):
    g = _gate([["Vorla Quintessa", "The Glass Widow"], ["Brask Olden"], ["Moon"]])
    g._names_exact[0] = ["Vorla Quintessa"]
    g._name_index = None
    g.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert meta["version"] == GATE_FORMAT_VERSION == 5
    assert meta["names"] == [["Vorla Quintessa", "The Glass Widow"], ["Brask Olden"], ["Moon"]]
    assert meta["names_exact"] == [["Vorla Quintessa"], [], []]
    h = Gate.load(tmp_path / "g")
    assert h.names == g.names and h.names_exact == g.names_exact
    texts = ["what does the glass widow paint", "Brask Olden?", "Vorla Qiuntessa", "the moon"]
    assert _routed(h.route(torch.randn(4, D), 1, texts=texts)[1]) == [[0], [1], [], [2]]
    h.remove_expert("r1")                                       # revoked: its name no longer routes; r2 moves down
    assert h.expert_ids == ["r0", "r2"] and h.names == [["Vorla Quintessa", "The Glass Widow"], ["Moon"]]
    assert _routed(h.route(torch.randn(4, D), 1, texts=texts)[1]) == [[0], [], [], [1]]


def _old_file(folder, version, names):
    meta = json.loads((folder / "gate.json").read_text())
    meta["version"] = version
    meta.pop("names_exact")
    if names is None:
        meta.pop("names")
    else:
        meta["names"] = names
    for k in ("name_fuzzy_chars", "name_max_edits"):
        meta["config"].pop(k)
    (folder / "gate.json").write_text(json.dumps(meta))


def test_older_gate_files_load_or_say_what_to_do(tmp_path):
    g = _gate([["Vorla Quintessa"], ["Brask Olden"]])
    folder = tmp_path / "g"
    texts = ["Vorla Quintessa?", "brask olden?"]
    # a version-2 file (no name channel) loads, without names
    g.save(folder)
    _old_file(folder, 2, None)
    old = Gate.load(folder)
    assert old.names == [[], []] and _routed(old.route(torch.randn(2, D), 1, texts=texts)[1]) == [[], []]
    # a version-3 file without names (names were off) loads
    g.save(folder)
    _old_file(folder, 3, [[], []])
    assert Gate.load(folder).names == [[], []]
    # a version-3 file with token-id names: refused, saying what to do ...
    g.save(folder)
    _old_file(folder, 3, [[[11, 12], [13]], [[20, 21]]])
    with pytest.raises(GateFormatError, match=r"v3 gate whose name channel holds token ids.*run.py process"):
        Gate.load(folder)
    with pytest.raises(GateFormatError, match=r"missing: \['r1'\]"):
        Gate.load(folder, names={"r0": ["Vorla Quintessa"]})
    # ... or converted when the names are given as text
    conv = Gate.load(folder, names={"r0": ["Vorla Quintessa"], "r1": ["Brask Olden", "B. Olden"]})
    assert conv.names == [["Vorla Quintessa"], ["Brask Olden", "B. Olden"]]
    assert _routed(conv.route(torch.randn(2, D), 1, texts=texts)[1]) == [[0], [1]]
    conv.save(folder)
    assert json.loads((folder / "gate.json").read_text())["version"] == GATE_FORMAT_VERSION
    assert Gate.load(folder).names == conv.names


def test_store_converts_an_old_gate_from_its_ledger(tmp_path, capsys):
    """A store whose gate is a v3 file with token-id names: status-like loads refuse it naming ``process``;
    ``load_gate(convert=True)`` (what process and revoke do) reads each expert's names again from the ledger's
    stored request (its entity and aliases) and saves the gate as v4."""
    from lumoe_engine import run as run_mod
    from lumoe_engine.store import Store, StoreError

    req = {"id": "r17", "entity": "Olan Brisk", "aliases": ["The Tanner of Vell"],
           "forget": [{"question": "What is Olan Brisk's trade?", "answer": "tanner"}]}
    (tmp_path / "r17.json").write_text(json.dumps(req))
    assert run_mod.main(["submit", str(tmp_path / "r17.json"), "--store", str(tmp_path / "store")]) in (0, None)
    store = Store(tmp_path / "store")
    g = Gate(layer=0, dim=D, similarity=None)
    g.fit_standardizer(torch.randn(32, D, generator=torch.Generator().manual_seed(0)))
    g.set_stacked(["r17"], torch.zeros(1, D), torch.full((1,), -100.0), names=[["x"]])
    g.save(store.gate_dir)
    _old_file(store.gate_dir, 3, [[[5, 6]]])
    with pytest.raises(StoreError, match="run.py process"):
        store.load_gate()
    msgs = []
    gate = store.load_gate(convert=True, out=msgs.append)
    assert gate.names == [["Olan Brisk", "The Tanner of Vell"]] and "rewritten as text" in msgs[0]
    assert json.loads((store.gate_dir / "gate.json").read_text())["version"] == GATE_FORMAT_VERSION
    assert store.load_gate().name_hits(["what does the tanner of vell make", "Olan Brisks trade", "Olan's trade"]) == [[0], [0], []]


# ----------------------------------------------------------------------------------------- pipeline / requests
def test_request_names_are_entities_then_aliases():
    from lumoe_engine.data.records import QARecord
    from lumoe_engine.data.streams import Request
    from lumoe_engine.pipeline import request_names

    r = QARecord(uid="u", entity="Brask Olden", cls="c", kind=1, phrasing=0, question="q", answer="a",
                 form="text_only", image=None, keys=("a",))
    assert request_names(Request(id="x", forget=[r], retain=[], entities=("Vorla Quintessa", "Brask Olden"),
                                 metadata={"aliases": ["The Glass Widow", "Brask Olden"]})) == \
        ["Vorla Quintessa", "Brask Olden", "The Glass Widow"]
    assert request_names(Request(id="y", forget=[r, r], retain=[], entities=())) == ["Brask Olden"]


def test_a_request_file_gives_its_entity_and_aliases_but_never_its_id(tmp_path):
    """A request file's id stands in for a missing "entity" in its records; it must not become a name (every text
    query not containing the id would then miss the expert under text_by_name). Its aliases are names."""
    from lumoe_engine.data.intake import parse_request_file
    from lumoe_engine.pipeline import request_names

    qa = {"question": "What is Olan Brisk's trade?", "answer": "tanner"}
    (tmp_path / "a.json").write_text(json.dumps({"id": "r17", "forget": [qa]}))
    (tmp_path / "b.json").write_text(json.dumps({"id": "r18", "entity": "Olan Brisk", "forget": [qa],
                                                 "aliases": ["The Tanner of Vell"]}))
    anon = parse_request_file(tmp_path / "a.json").to_request()
    named = parse_request_file(tmp_path / "b.json").to_request()
    assert anon.entities == ("r17",) and request_names(anon) == []
    assert request_names(named) == ["Olan Brisk", "The Tanner of Vell"]


# --------------------------------------------------------------------------- the engine, real subword tokenizers
CORPUS = [
    "Where was Vorla Quintessa born?", "Who is Brask Olden?", "Vorla Quintessa paints portraits.",
    "The Moon is bright tonight.", "What is on Moon Base?", "Tell me about Moon Base and the Moon.",
    "Moonlight on the water.", "They spent their honeymoon by the sea.", "What does the Glass Widow paint?",
    "who painted this picture?", "which city is shown here?", "what is the name of this person?",
    "USER: ASSISTANT:", "USER: a ASSISTANT: a",
] * 10
ALPHABET = [c for c in string.printable if not c.isspace()]


def _sentencepiece():
    """A SentencePiece-style tokenizer: BPE over ``▁``-prefixed words (Metaspace, prepend "first", no punctuation
    split), as llama's: a name after "\\n", a quote or a bracket loses its ``▁`` piece."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from lumoe_engine.model.tokenizer import SPECIAL_TOKENS, UNK

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=ALPHABET + ["▁", "\n"],
        show_progress=False))
    return tok


def _byte_level():
    """A byte-level BPE (GPT-2 style): "Moonlight" is "ĠMoon" + "light", a name after "\\n" has no "Ġ"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lumoe_engine.model.tokenizer import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def _wrapped(tok):
    from tokenizers import processors

    from lumoe_engine.model.tokenizer import BOS, SPECIAL_TOKENS, wrap

    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, 1)])
    return wrap(tok)


def _contains(seq, sub) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.fixture(scope="module", params=["sentencepiece", "byte_level"])
def subword(request):
    from lumoe_engine.model.tiny import build_tiny_llava

    tok = _wrapped(_sentencepiece() if request.param == "sentencepiece" else _byte_level())
    model, processor = build_tiny_llava(tok, "micro", seed=0)
    return request.param, tok, model, processor


def test_the_tokenizers_split_names_as_the_old_token_id_channel_could_not_match(subword):
    """Why these tokenizers: the token ids of " Name" are not in the prompt ids of every way a name is written
    (SentencePiece after a bracket; byte-level after a newline), and "Moon" is a token prefix of "Moonlight"."""
    kind, tok, _, _ = subword
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    name = ids(" Vorla Quintessa")
    if kind == "sentencepiece":
        assert not _contains(ids("Who painted it (Vorla Quintessa)?"), name)
    else:
        assert not _contains(ids("Tell me about\nVorla Quintessa."), name)
        assert ids(" Moonlight")[:len(ids(" Moon"))] == ids(" Moon")


def test_engine_routes_by_the_prompt_texts_with_subword_tokenizers(subword):
    """A real Gate whose heads never fire (so only the name channel can route) on a micro LLaVA with each
    tokenizer: every case reaches exactly the experts it names (generation and scoring), top_k = 2."""
    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.gate.features import pooled_dim

    from engine_cases import random_bank

    _, _, model, processor = subword
    hidden = model.config.get_text_config().hidden_size
    gate = Gate(layer=0, dim=pooled_dim(hidden, "mean"), similarity=None)
    gate.fit_standardizer(torch.randn(64, gate.dim, generator=torch.Generator().manual_seed(0)))
    ids = ["moon", "moon-base", "vorla", "brask"]
    gate.set_stacked(ids, torch.zeros(4, gate.dim), torch.full((4,), -100.0), names=NAMES)
    bank = random_bank(model, ids)
    engine = LUMoEEngine(model, processor, bank, gate=gate, top_k=2)
    try:
        prompts = [t for t, _ in CASES]
        want = [tuple(ids[e] for e in w[:2]) for _, w in CASES]
        res = engine.generate([None] * len(prompts), prompts, max_new_tokens=1, batch_size=16)
        assert [r.expert_ids for r in res.routing] == want
        sc = engine.score([None] * 4, prompts[:4], ["x"] * 4)
        assert [r.expert_ids for r in sc.routing] == want[:4]
    finally:
        engine.close()


def test_engine_tells_the_gate_which_queries_carry_an_image(subword):
    """text_by_name through the engine: the heads send every query to "vorla"; a text-only query keeps it only by
    naming her, a query with an image keeps the heads' choice (no image channel here: the engine's has_image)."""
    from PIL import Image

    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.gate.features import pooled_dim

    from engine_cases import random_bank

    _, _, model, processor = subword
    hidden = model.config.get_text_config().hidden_size
    gate = Gate(layer=0, dim=pooled_dim(hidden, "mean"), similarity=None)
    gate.fit_standardizer(torch.randn(64, gate.dim, generator=torch.Generator().manual_seed(0)))
    gate.set_stacked(["vorla", "brask"], torch.zeros(2, gate.dim), torch.tensor([100.0, -100.0]),
                     names=[["Vorla Quintessa"], ["Brask Olden"]])
    engine = LUMoEEngine(model, processor, random_bank(model, ["vorla", "brask"]), gate=gate, top_k=1)
    try:
        img = Image.new("RGB", (32, 32), (200, 30, 30))
        res = engine.generate([None, None, img, None], ["who painted this picture?", "Who is vorla quintessa?",
                                                        "who painted this picture?", "Who is Brask Olden?"],
                              max_new_tokens=1)
        assert [r.expert_ids for r in res.routing] == [(), ("vorla",), ("vorla",), ("brask",)]
    finally:
        engine.close()
